#!/usr/bin/env bash
# The proxy relay (src/relay.rs) against its reference in the same run: one node server reached
# directly, then the same server as 1 worker behind `corepool --balance proxy`. Measures bulk
# download and upload throughput (curl, loopback) and the CPU seconds corepool spent relaying
# them, then hello-world requests/s with keep-alive and with a new connection per request (wrk).
#
#   bench/relay.sh [ROUNDS]     (default 3; medians are printed)
#
# Needs node, curl, wrk (installed from Debian when missing) and corepool's release build.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
# COREPOOL_BIN measures another build (an older relay, say) with the same harness.
bin=${COREPOOL_BIN:-}
[ -n "$bin" ] || { cargo build --release --quiet; bin=$PWD/target/release/corepool; }
server=$PWD/bench/stream.js
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
head -c 1000000000 /dev/zero >"$work/upload.bin"
download_mib=2000
upload_mib=$(echo "1000000000 / 1048576" | bc -l)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# CPU seconds (user+system) of a pid so far.
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
mibps() { echo "$1 / $2" | bc -l | xargs printf '%.0f'; }
wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return; sleep 0.1; done; echo "port $1 never answered" >&2; exit 1; }

# measure LABEL PORT PID: one line of figures for the server on PORT (PID is what relays, or -).
measure() {
  local label=$1 port=$2 pid=$3 c0 c1 c2 s e down up ka cl
  c0=$([ "$pid" = - ] && echo 0 || cpu "$pid")
  s=$(date +%s.%N); curl -sf -o /dev/null "http://127.0.0.1:$port/bulk?mb=$download_mib"; e=$(date +%s.%N)
  down=$(mibps "$download_mib" "($e - $s)")
  c1=$([ "$pid" = - ] && echo 0 || cpu "$pid")
  s=$(date +%s.%N)
  curl -sf -o /dev/null --data-binary @"$work/upload.bin" -H 'content-type: application/octet-stream' "http://127.0.0.1:$port/sink"
  e=$(date +%s.%N)
  up=$(mibps "$upload_mib" "($e - $s)")
  c2=$([ "$pid" = - ] && echo 0 || cpu "$pid")
  ka=$(wrk -t2 -c50 -d8s "http://127.0.0.1:$port/" | awk '/Requests\/sec/ { printf "%.0f", $2 }')
  cl=$(wrk -t2 -c50 -d8s -H 'Connection: close' "http://127.0.0.1:$port/" | awk '/Requests\/sec/ { printf "%.0f", $2 }')
  printf '%s %s %s %s %s %s\n' "$label" "$down" "$up" "$(echo "$c1 - $c0" | bc -l)" "$(echo "$c2 - $c1" | bc -l)" "$ka $cl"
}

for round in $(seq "$rounds"); do
  port=$(free_port)
  PORT=$port node "$server" & direct=$!
  wait_port "$port"
  measure direct "$port" - >>"$work/rows"
  kill "$direct"; wait "$direct" 2>/dev/null || true

  port=$(free_port)
  "$bin" -i 1 --balance proxy -p "$port" --log-level warn -- node "$server" & pool=$!
  wait_port "$port"
  measure proxy "$port" "$pool" >>"$work/rows"
  kill "$pool"; wait "$pool" 2>/dev/null || true
  echo "round $round done" >&2
done

python3 - "$work/rows" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    label, *values = line.split()
    rows.setdefault(label, []).append([float(v) for v in values])
names = ["download MiB/s", "upload MiB/s", "relay CPU s (download)", "relay CPU s (upload)",
         "keep-alive req/s", "new-connection req/s"]
med = {k: [statistics.median(col) for col in zip(*v)] for k, v in rows.items()}
print(f"| {'figure (median of %d)' % len(rows['direct']):<28} | {'direct':>8} | {'proxy':>8} | proxy/direct |")
print("|" + "-" * 30 + "|----------|----------|--------------|")
for i, name in enumerate(names):
    d, p = med["direct"][i], med["proxy"][i]
    ratio = f"{p / d:.2f}" if i not in (2, 3) and d else "-"
    print(f"| {name:<28} | {d:>8.2f} | {p:>8.2f} | {ratio:>12} |")
EOF
