#!/usr/bin/env bash
# Builds Dockerfile.example VERBATIM with podman against the Next.js fixture
# (tests/fixtures/nextapp) and runs the image as a user would: the page is served by the
# workers, `podman healthcheck run` is healthy, `podman stop` exits 0. Then runs
# docker/deployment.yaml (one replica, free host ports) with `podman play kube`. Slow (npm ci, next build
# and a release build of corepool inside the build: 5 to 10 minutes on 2 busy cores, mostly
# the two image builds), so not part of ./test.sh: run it by hand (as root) after changing Dockerfile.example.
#
# No image registry is needed: node:20-bookworm-slim is the local build of setup.sh, and
# rust:1-bookworm a local stand-in (that base, gcc, libc6-dev and this machine's Rust
# toolchain), built once. The build itself reaches the npm registry and crates.io.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
log() { echo "example: $*" >&2; }
tests/container/setup.sh >/dev/null
podman() { command podman --runtime runc --cgroup-manager cgroupfs "$@"; }
work=$repo/target/container
exec 9>"$work/lock"
flock 9

# --- the rust:1-bookworm stand-in ---------------------------------------------------------------
sysroot=$(rustc --print sysroot)
rust_key=$( { rustc -vV; sed -n '/^# --- the rust/,/^# --- the build/p' "$0"; \
  podman image inspect --format '{{.Id}}' docker.io/library/node:20-bookworm-slim; } \
  | sha256sum | cut -c1-16)
rust_id=localhost/corepool-rust:$rust_key
if ! podman image exists "$rust_id"; then
  log "rust:1-bookworm stand-in from $sysroot (once)"
  mkdir -p "$work/rust-context"
  cat > "$work/rust-context/Containerfile" <<'EOR'
FROM docker.io/library/node:20-bookworm-slim
USER root
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /usr/local/rust && cp -a /host-rust/bin /host-rust/lib /usr/local/rust/
ENV PATH=/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/usr/local/cargo
EOR
  podman build --pull=never --network host --format docker -q -v "$sysroot:/host-rust:ro" \
    -t "$rust_id" "$work/rust-context" >/dev/null
fi
podman tag "$rust_id" docker.io/library/rust:1-bookworm
flock -u 9

# --- the build ----------------------------------------------------------------------------------
# The build context as a user's app directory would be: the app, the corepool sources in
# ./corepool, the .dockerignore the Dockerfile's header asks for.
ctx=$work/example-context
rm -rf "$ctx" && mkdir -p "$ctx/corepool"
(cd tests/fixtures/nextapp && git ls-files -co --exclude-standard | grep -v '^build.sh$' \
  | tar -cf - -T -) | tar -C "$ctx" -xf -
git ls-files -co --exclude-standard | grep -v '^tests/fixtures/' | tar -cf - -T - \
  | tar -C "$ctx/corepool" -xf -
printf 'node_modules\n.next\ncorepool/target\n.git\n' > "$ctx/.dockerignore"
tag=localhost/corepool-example:latest
log "podman build -f Dockerfile.example (verbatim)"
start=$(date +%s)
podman build --pull=never --network host --format docker -f "$repo/Dockerfile.example" \
  -t "$tag" "$ctx" >"$work/example-build.log" 2>&1 \
  || { tail -n 40 "$work/example-build.log" >&2; exit 1; }
log "built in $(($(date +%s) - start)) s (log: $work/example-build.log)"

# --- the run ------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics=$(free_port)
name=corepool-example-$$
# Whatever this script started goes, however it ends.
cleanup() {
  podman rm -f -t 0 "$name" >/dev/null 2>&1 || true
  podman pod rm -f web-pod-0 >/dev/null 2>&1 || true
  ! declare -F compose >/dev/null || compose down || true
}
trap cleanup EXIT
podman run -d --name "$name" --network host --cpus 2 --memory 1g --read-only \
  -e PORT="$port" -e COREPOOL_METRICS=":$metrics" -e COREPOOL_CONTROL="$name" "$tag" >/dev/null
for _ in $(seq 1 60); do
  curl -fsS -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null && break
  sleep 1
done
page=$(curl -fsS "http://127.0.0.1:$port/")
log "page: $(echo "$page" | head -c 200 | tr '\n' ' ')..."
podman exec "$name" corepool status
podman healthcheck run "$name" >/dev/null
log "podman healthcheck run: healthy ($(podman inspect --format '{{.State.Health.Status}}' "$name"))"
log "user: $(podman exec "$name" id -u):$(podman exec "$name" id -g)"
start=$(date +%s%N)
podman stop "$name" >/dev/null
took=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(podman inspect --format '{{.State.ExitCode}}' "$name")
podman logs "$name" 2>&1 | grep 'corepool' | tail -n 12 >&2
log "podman stop: exit code $code after $took ms"
[ "$code" = 0 ]
echo "Dockerfile.example: built, served, healthy, stopped with exit 0"

# --- docker/deployment.yaml with `podman play kube` ---------------------------------------------
# One replica, the image under the name the file gives, its ports published on free host ports.
podman tag "$tag" registry.example/web:latest
kube=$work/deployment.yaml
sed -e 's/replicas: 3/replicas: 1/' \
  -e "s/containerPort: 3000 }/containerPort: 3000, hostPort: $port }/" \
  -e "s/containerPort: 9100 }/containerPort: 9100, hostPort: $metrics }/" \
  docker/deployment.yaml > "$kube"
podman pod rm -f web-pod-0 >/dev/null 2>&1 || true
podman play kube "$kube" >/dev/null
for _ in $(seq 1 60); do
  curl -fsS -o /dev/null "http://127.0.0.1:$metrics/readyz" 2>/dev/null && break
  sleep 1
done
curl -fsS -o /dev/null "http://127.0.0.1:$port/"
log "play kube: /readyz: $(curl -fsS "http://127.0.0.1:$metrics/readyz"); user $(podman exec web-pod-0-web id -u)"
podman exec web-pod-0-web sh -c 'touch /probe 2>/dev/null && exit 1 || true'
start=$(date +%s%N)
podman pod stop web-pod-0 >/dev/null
took=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(podman inspect --format '{{.State.ExitCode}}' web-pod-0-web)
log "podman pod stop: exit code $code after $took ms"
[ "$code" = 0 ]
echo "docker/deployment.yaml: served by podman play kube (read-only root, uid 1000), stopped with exit 0"

# --- docker/compose.yaml with podman-compose ----------------------------------------------------
# In the app directory as the file expects (docker/ beside Dockerfile.example), on free ports.
command -v podman-compose >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman-compose >/dev/null
}
mkdir -p "$ctx/docker"
cp Dockerfile.example "$ctx/"
sed -e "s/\"3000:3000\"/\"$port:3000\"/" -e "s/\"9100:9100\"/\"$metrics:9100\"/" docker/compose.yaml \
  > "$ctx/docker/compose.yaml"
compose() {
  (cd "$ctx" && podman-compose --podman-args='--runtime runc --cgroup-manager cgroupfs' \
    --podman-build-args='--pull=never --network host --format docker' -f docker/compose.yaml "$@") \
    >>"$work/example-compose.log" 2>&1
}
: >"$work/example-compose.log"
compose up -d --build || { tail -n 30 "$work/example-compose.log" >&2; exit 1; }
for _ in $(seq 1 60); do
  curl -fsS -o /dev/null "http://127.0.0.1:$metrics/readyz" 2>/dev/null && break
  sleep 1
done
curl -fsS -o /dev/null "http://127.0.0.1:$port/"
podman healthcheck run docker_web_1 >/dev/null
start=$(date +%s%N)
compose stop
took=$(( ($(date +%s%N) - start) / 1000000 ))
code=$(podman inspect --format '{{.State.ExitCode}}' docker_web_1)
log "podman-compose stop: exit code $code after $took ms"
[ "$code" = 0 ]
echo "docker/compose.yaml: built and served by podman-compose, healthy, stopped with exit 0"
