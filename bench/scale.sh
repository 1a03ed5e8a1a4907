#!/usr/bin/env bash
# Failed requests while the pool is scaled under wrk (32 connections, 14-16 s), in a network
# namespace of its own (so net.ipv4.tcp_migrate_req is this run's alone; run as root):
#
#   bench/scale.sh scale MIGRATE CLOSE [hash]   corepool scale +2, 1, 4, -2 (5 slot removals)
#   bench/scale.sh cpu MIGRATE                  a cgroup v1 CPU quota 2 -> 0.5 -> 2 -> 0.5 -> 2
#                                               CPUs (--cpu-watch 1s), new connection per request
#
# MIGRATE: net.ipv4.tcp_migrate_req (0 or 1); CLOSE: 1 = a new connection per request
# (`Connection: close`), 0 = keep-alive; `hash`: without eBPF steering (CAP_BPF and
# CAP_SYS_ADMIN dropped). Prints wrk's totals and socket errors, and corepool's warnings about
# reset connections. COREPOOL_BIN picks the build (default: the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${INSIDE:-}" != 1 ]; then
    exec env INSIDE=1 unshare --net "$0" "$@"
fi
what=$1
migrate=$2
close=${3:-1}
bin=${COREPOOL_BIN:-$PWD/target/debug/corepool}
server=$PWD/examples/hello/server.js
work=$(mktemp -d)
cg=
cleanup() {
    kill $(jobs -p) 2>/dev/null || true
    wait || true
    if [ -n "$cg" ]; then
        for pid in $(cat "$cg/cgroup.procs"); do echo "$pid" >/sys/fs/cgroup/cpu/cgroup.procs; done
        rmdir "$cg"
    fi
    rm -rf "$work"
}
trap cleanup EXIT
ip link set lo up
echo "$migrate" >/proc/sys/net/ipv4/tcp_migrate_req
export COREPOOL_CONTROL=bench-scale-$$
prefix=()
[ "${4:-}" = hash ] && prefix=(setpriv --bounding-set -bpf,-sys_admin,-perfmon)
header=()
[ "$close" = 1 ] && header=(-H "Connection: close")
if [ "$what" = cpu ]; then
    cg=/sys/fs/cgroup/cpu/corepool-bench-$$
    mkdir "$cg"
    echo 100000 >"$cg/cpu.cfs_period_us"
    echo 200000 >"$cg/cpu.cfs_quota_us"
    sh -c "echo \$\$ > $cg/cgroup.procs; exec $bin --cpu-watch 1s --balance socket --host 127.0.0.1 \
        -p 8080 -- node $server" 2>"$work/log" >/dev/null &
else
    "${prefix[@]}" "$bin" -i 2 --balance socket --host 127.0.0.1 -p 8080 -- node "$server" \
        2>"$work/log" >/dev/null &
fi
pool=$!
sleep 2
wrk -t2 -c32 -d16s "${header[@]}" http://127.0.0.1:8080/ >"$work/wrk" &
load=$!
sleep 2
if [ "$what" = cpu ]; then
    for quota in 50000 200000 50000 200000; do
        echo "$quota" >"$cg/cpu.cfs_quota_us"
        sleep 3
    done
else
    for count in +2 1 4 -2; do
        "$bin" scale "$count"
        sleep 3
    done
fi
wait "$load"
kill -TERM "$pool"
wait "$pool" || true
grep -E "requests in|Socket errors|Non-2xx" "$work/wrk"
grep -E "scaling (up|down)|reset|balance socket:" "$work/log" | cut -c1-160
