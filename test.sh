#!/usr/bin/env bash
# Runs every check of the project: installs the tools the tests drive (Debian packages), then
# formatting, lints, and the whole test suite (unit tests and integration tests that run the
# real binary against real processes, some as PID 1 in a new pid namespace and in cgroups:
# run as root). The same command runs in CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v unshare >/dev/null 2>&1 || need+=(util-linux)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
command -v setpriv >/dev/null 2>&1 || need+=(util-linux)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ps >/dev/null 2>&1 || need+=(procps)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -x /bin/busybox ] || need+=(busybox-static)
if [ "${#need[@]}" -gt 0 ]; then
  echo "installing: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The container tests' podman, runc and images (installed and built once, then cached); the
# test (tests/container.rs) would run this itself, but here its time shows apart.
tests/container/setup.sh >/dev/null

cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --all-targets -- --test-threads="${COREPOOL_TEST_THREADS:-4}"
