#!/usr/bin/env bash
# Builds the release binary statically linked (glibc's static libc, no shared libraries), so it
# runs in any image: distroless, alpine, busybox, scratch. Prints its path.
set -euo pipefail
cd "$(dirname "$0")"
target=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
  cargo build --release --locked --target "$target" >&2
bin="$PWD/target/$target/release/corepool"
if ldd "$bin" 2>&1 | grep -q '=>'; then
  echo "build-static.sh: $bin is dynamically linked" >&2
  exit 1
fi
echo "$bin"
