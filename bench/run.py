#!/usr/bin/env python3
"""corepool against pm2-runtime, a bare node and N direct nodes, on this machine, in one run.

    bench/run.py            full run: 3 rounds, siege 60 s on the Next.js page, wrk 15 s
    bench/run.py --quick    1 round, short loads: under 3 minutes
    bench/run.py --restart  latency while a worker is killed (kill -9) and restarted under load:
                            pm2-runtime cluster, corepool socket with and without eBPF steering,
                            corepool proxy
    bench/run.py --proxies  corepool --balance proxy against HAProxy and nginx (stream) in front
                            of the same two workers: keep-alive, new connections, 100 MiB each
                            way, 1,000 idle connections; relay CPU per request from /proc
    bench/run.py --sizes    corepool's own cost at -i 1, 2, 8, 32, 128 (and pm2-runtime's):
                            start to all ready, RSS, CPU and wake-ups idle and under load,
                            SIGHUP reload, SIGTERM, /metrics scrape
    bench/run.py --start    where start to first 200 goes: bare node against corepool, the
                            `node --version` probe, one strace timeline

Installs what it needs (wrk and siege from Debian, pm2 from npm into bench/.cache, the Next.js
fixture via tests/fixtures/nextapp/build.sh, corepool's release build). Configurations run in
alternation (A B C ... A B C ...) and medians are quoted. Writes bench/results/<stamp>.md,
.json and .svg. Everything runs on loopback; every load is bounded in time.
"""

import argparse
import base64
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
CACHE = os.path.join(BENCH, ".cache")
HELLO = os.path.join(ROOT, "examples", "hello", "server.js")
PM2_VERSION = "7.0.4"


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# Debian packages for a command, where the names differ (nginx's stream module is separate).
PACKAGES = {"nginx": ["nginx-light", "libnginx-mod-stream"]}


def install(packages=("wrk", "siege"), nextjs=True):
    """wrk, siege, pm2, the Next.js build and corepool's release binary."""
    missing = [pkg for p in packages if not shutil.which(p) for pkg in PACKAGES.get(p, [p])]
    if "nginx" in packages and not os.path.exists("/usr/lib/nginx/modules/ngx_stream_module.so"):
        missing.append("libnginx-mod-stream")
    if missing:
        log("installing", missing)
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", *missing], stdout=subprocess.DEVNULL)
    pm2 = os.path.join(CACHE, "node_modules", ".bin", "pm2-runtime")
    if not os.path.exists(pm2):
        os.makedirs(CACHE, exist_ok=True)
        sh(["npm", "install", "--prefix", CACHE, "--no-audit", "--no-fund", "--loglevel=error",
            f"pm2@{PM2_VERSION}"], stdout=subprocess.DEVNULL)
    nextjs = subprocess.run([os.path.join(ROOT, "tests/fixtures/nextapp/build.sh")],
                            check=True, capture_output=True, text=True).stdout.strip() if nextjs else None
    # COREPOOL_BIN measures a build made before (as bench/relay.sh does).
    corepool = os.environ.get("COREPOOL_BIN") or subprocess.run(
        [os.path.join(ROOT, "build-static.sh")], check=True, capture_output=True, text=True).stdout.strip()
    return {"pm2": pm2, "nextjs": nextjs, "corepool": corepool}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def first_200(port, deadline):
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            time.sleep(0.002)
    return False


class Config:
    """A way of running N copies of a server: start it, say where to send load, stop it."""

    def __init__(self, name, tools, n):
        self.name, self.tools, self.n = name, tools, n
        self.procs, self.ports = [], []

    def spawn(self, server, env_extra, port):
        raise NotImplementedError

    def start(self, server):
        port = free_port()
        env = dict(os.environ, NODE_ENV="production", NEXT_TELEMETRY_DISABLED="1",
                   HOSTNAME="127.0.0.1")
        t0 = time.monotonic()
        self.spawn(server, env, port)
        ok = all(first_200(p, t0 + 60) for p in self.ports)
        self.startup_ms = (time.monotonic() - t0) * 1000
        if not ok:
            self.stop()
            raise RuntimeError(f"{self.name} did not answer on {self.ports}")
        time.sleep(0.5)
        self.supervisor_kib = rss_kib(self.procs[0].pid) if self.supervised else None
        return self

    supervised = False

    def stop(self):
        t0 = time.monotonic()
        for p in self.procs:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.stop_ms = (time.monotonic() - t0) * 1000


class Bare(Config):
    def spawn(self, server, env, port):
        self.ports = [port]
        self.procs = [subprocess.Popen(["node", os.path.basename(server)], cwd=os.path.dirname(server),
                                       env=dict(env, PORT=str(port)), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)]


class Direct(Config):
    """N independent nodes on N ports, each loaded with its share: the upper bound."""

    def spawn(self, server, env, port):
        self.ports = [free_port() for _ in range(self.n)]
        self.procs = [subprocess.Popen(["node", os.path.basename(server)], cwd=os.path.dirname(server),
                                       env=dict(env, PORT=str(p)), stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for p in self.ports]


class Pm2(Config):
    supervised = True

    def spawn(self, server, env, port):
        self.ports = [port]
        home = tempfile.mkdtemp(prefix="pm2home-")
        self.procs = [subprocess.Popen([self.tools["pm2"], "start", os.path.basename(server), "-i", str(self.n)],
                                       cwd=os.path.dirname(server),
                                       env=dict(env, PORT=str(port), PM2_HOME=home),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


class Corepool(Config):
    supervised = True

    def __init__(self, name, tools, n, balance, prefix=()):
        super().__init__(name, tools, n)
        self.balance, self.prefix = balance, list(prefix)

    def spawn(self, server, env, port):
        self.ports = [port]
        self.procs = [subprocess.Popen([*self.prefix, self.tools["corepool"], "-i", str(self.n), "--balance", self.balance,
                                        "--host", "127.0.0.1", "-p", str(port), "--", "node",
                                        os.path.basename(server)],
                                       cwd=os.path.dirname(server), env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


def wrk(ports, seconds, connections, close):
    """Runs wrk on every port at once (connections split); returns rps (sum), p50, p99 (ms, max)."""
    runs = []
    # One wrk thread per port: on a 2-core machine a second client thread takes CPU from the
    # workers (measured: -t2 on one port 77k req/s against 111k with -t1).
    for port in ports:
        cmd = ["wrk", "-t", "1", "-c", str(max(1, connections // len(ports))), "-d", f"{seconds}s",
               "--latency", f"http://127.0.0.1:{port}/"]
        if close:
            cmd[1:1] = ["-H", "Connection: close"]
        runs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True))
    rps, p50, p99, errors = 0.0, 0.0, 0.0, 0
    for r in runs:
        out = r.communicate(timeout=seconds + 60)[0]
        rps += float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
        p50 = max(p50, to_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)))
        p99 = max(p99, to_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)))
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
        errors += sum(int(x) for x in m.groups()) if m else 0
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors += int(m.group(1)) if m else 0
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": errors}


def wrk_kill(cfg, seconds, connections, kill_at):
    """wrk on a new connection per request (Connection: close) while one worker of `cfg` is
    killed with SIGKILL `kill_at` seconds in (None: no kill, the steady state): rps, p50, p99,
    max (ms), errors."""
    port = cfg.ports[0]
    cmd = ["wrk", "-H", "Connection: close", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
           "--latency", "--timeout", "10s", f"http://127.0.0.1:{port}/"]
    run = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    if kill_at is not None:
        time.sleep(kill_at)
        victims = worker_pids(cfg.procs[0].pid)
        if not victims:
            run.kill()
            raise RuntimeError(f"{cfg.name}: no worker process to kill")
        os.kill(victims[-1], signal.SIGKILL)
    out = run.communicate(timeout=seconds + 60)[0]
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
              "p50_ms": to_ms(re.search(r"50%\s+([\d.]+\w+)", out).group(1)),
              "p99_ms": to_ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1)),
              "max_ms": to_ms(m.group(1)) if m else 0.0, "errors": 0}
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["errors"] += sum(int(x) for x in m.groups()) if m else 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["errors"] += int(m.group(1)) if m else 0
    return result


def worker_pids(supervisor):
    """The supervisor's child processes (the workers: corepool's, pm2-runtime's cluster)."""
    try:
        with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def restart_main(args, tools):
    """--restart: p99 and max latency while a worker dies and restarts, in one run."""
    n = max(2, args.n)
    rounds, seconds = (1, 4) if args.quick else (3, 6)
    nocaps = ["setpriv", "--inh-caps=-all", "--bounding-set=-bpf,-sys_admin,-net_admin"]
    configs = [("pm2", lambda: Pm2("pm2", tools, n)),
               ("corepool-socket-ebpf", lambda: Corepool("corepool-socket-ebpf", tools, n, "socket")),
               ("corepool-socket-hash", lambda: Corepool("corepool-socket-hash", tools, n, "socket", nocaps)),
               ("corepool-proxy", lambda: Corepool("corepool-proxy", tools, n, "proxy")),
               # net.ipv4.tcp_migrate_req 0 (corepool neither PID 1 nor under a container init
               # leaves the namespace's setting alone): the eBPF program moves a dead worker's
               # queue itself; without eBPF the queue waits for the slot's restart.
               ("corepool-socket-ebpf-sysctl0", lambda: Corepool("corepool-socket-ebpf-sysctl0", tools, n, "socket")),
               ("corepool-socket-hash-sysctl0", lambda: Corepool("corepool-socket-hash-sysctl0", tools, n, "socket", nocaps))]
    servers = [("hello", HELLO), ("nextjs", tools["nextjs"])]
    servers = [(sc, path) for sc, path in servers if sc in args.servers.split(",")]
    raw = {}
    for r in range(rounds):
        for sc, server in servers:
            for name, make in configs:
                log(f"round {r + 1}/{rounds}: restart under load, {sc} on {name}")
                migrate_queued(not name.endswith("-sysctl0"))
                cfg = make().start(server)
                try:
                    steady = wrk_kill(cfg, seconds, 20, None)
                    result = wrk_kill(cfg, seconds, 20, seconds / 3)
                finally:
                    cfg.stop()
                    migrate_queued(True)
                result.update({f"steady_{k}": v for k, v in steady.items()})
                raw.setdefault(sc, {}).setdefault(name, []).append(result)
    summary = {sc: {name: {k: statistics.median([x[k] for x in runs]) for k in runs[0]}
                    for name, runs in per.items()} for sc, per in raw.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(os.path.join(BENCH, "results"), exist_ok=True)
    base = os.path.join(BENCH, "results", f"restart-{stamp}" + ("-quick" if args.quick else ""))
    info = machine()
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "workers": n, "rounds": rounds, "summary": summary, "raw": raw}, f, indent=1)
    lines = [f"# Restart under load {stamp}{' (quick)' if args.quick else ''}", "",
             f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Node {info['node']}; {n} workers; "
             f"wrk -c 20 -d {seconds}s, a new connection per request; one worker killed with SIGKILL "
             f"{seconds / 3:.0f} s in; {rounds} round(s), medians; configurations alternated. "
             "corepool-socket-hash runs without CAP_BPF/CAP_SYS_ADMIN/CAP_NET_ADMIN (setpriv): no eBPF; "
             "corepool-proxy relays (least connections, no eBPF). "
             "net.ipv4.tcp_migrate_req is 1 (as corepool sets it as PID 1 of a container) except for "
             "the -sysctl0 rows (the namespace's 0, left alone by a corepool that is not the container's "
             "program): with eBPF the steering program migrates a dead worker's queue itself. "
             "Steady: the same load on the same pool just before, nothing killed.", ""]
    for sc, per in summary.items():
        lines += [f"## {sc}", "", "| config | req/s | p50 ms | p99 ms | max ms | errors | p99 / pm2 | max / pm2 | "
                  "steady p99 ms | steady max ms | p99 / steady |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        ref = per["pm2"]
        for name, v in per.items():
            lines.append(f"| {name} | {v['rps']:.0f} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | {v['max_ms']:.0f} | "
                         f"{v['errors']:.0f} | {v['p99_ms'] / ref['p99_ms']:.2f} | {v['max_ms'] / ref['max_ms']:.2f} | "
                         f"{v['steady_p99_ms']:.1f} | {v['steady_max_ms']:.0f} | {v['p99_ms'] / v['steady_p99_ms']:.2f} |")
        lines.append("")
    lines += ["Goal: p99 / pm2 <= 1 for every corepool row.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    log(f"results: {base}.md, .json")


def to_ms(text):
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1, "s": 1000, "m": 60000}[unit]


def siege(ports, seconds, concurrency):
    """siege, as the article this project started from measured a Next.js page."""
    # siege can hang past -t waiting on a connection that never answers (seen against
    # pm2-runtime): 20 s after the deadline it gets SIGINT, on which it still prints its report.
    out = subprocess.run(["timeout", "-s", "INT", "-k", "10", str(seconds + 20),
                          "siege", "-b", "-c", str(concurrency), "-t", f"{seconds}S", "-q", "-j",
                          *[f"http://127.0.0.1:{p}/" for p in ports]],
                         capture_output=True, text=True)
    if out.returncode == 124:
        log(f"  siege did not end by itself {seconds} s in; interrupted 20 s later")
    text = out.stdout + out.stderr
    start = text.find("{")
    data = json.loads(text[start:text.rfind("}") + 1]) if start >= 0 else {}
    return {"rps": float(data.get("transaction_rate", 0)),
            "failed": int(data.get("failed_transactions", 0)),
            "longest_ms": float(data.get("longest_transaction", 0)) * 1000,
            "availability": float(data.get("availability", 0)),
            "siege_hung": out.returncode == 124}


def machine():
    node = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    return {"cores": os.cpu_count(), "kernel": platform.release(), "node": node,
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")}


def svg(summary, path):
    """Throughput and p99 per configuration and scenario, as grouped bars."""
    scenarios = list(summary)
    names = list(next(iter(summary.values())))
    w, h, pad = 900, 170 * len(scenarios) + 40, 160
    colors = ["#888", "#bbb", "#d9534f", "#2b7bb9", "#5cb85c"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="10" y="20" font-size="15">corepool vs pm2-runtime: requests/s (bars) and p99 (labels), medians</text>']
    y = 40
    for sc in scenarios:
        parts.append(f'<text x="10" y="{y + 14}" font-weight="bold">{sc}</text>')
        top = max(v["rps"] for v in summary[sc].values()) or 1
        for i, name in enumerate(names):
            v = summary[sc][name]
            bw = (w - pad - 120) * v["rps"] / top
            yy = y + 22 + i * 26
            p99 = f', p99 {v["p99_ms"]:.1f} ms' if v.get("p99_ms") else ""
            parts.append(f'<text x="10" y="{yy + 14}">{name}</text>')
            parts.append(f'<rect x="{pad}" y="{yy}" width="{bw:.0f}" height="20" fill="{colors[i % len(colors)]}"/>')
            parts.append(f'<text x="{pad + bw + 5:.0f}" y="{yy + 14}">{v["rps"]:.0f}/s{p99}</text>')
        y += 170
    parts.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(parts))


# ---------------------------------------------------------------------------------------------
# --proxies: corepool's proxy mode against HAProxy and nginx in front of the same two workers.

STREAM = os.path.join(BENCH, "stream.js")


def proc_tree(pid):
    """`pid` and its descendants (nginx's master and its workers)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def cpu_s(pids):
    """utime + stime of `pids`, in seconds (their own, not their children's)."""
    total, hz = 0, os.sysconf("SC_CLK_TCK")
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / hz


def wait_listen(port, deadline):
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.01)
    return False


class Relayed:
    """Two workers of bench/stream.js and what sits in front of them; `relay_pids()` is what
    relays (None: nothing, the clients reach the workers' ports)."""

    front = None

    def __init__(self, name, tools):
        self.name, self.tools, self.procs, self.dir = name, tools, [], tempfile.mkdtemp(prefix="bench-")

    def node_workers(self, n=2):
        self.worker_ports = [free_port() for _ in range(n)]
        for p in self.worker_ports:
            self.procs.append(subprocess.Popen(["node", STREAM], env=dict(os.environ, PORT=str(p)),
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        if not all(wait_listen(p, time.monotonic() + 30) for p in self.worker_ports):
            raise RuntimeError(f"{self.name}: workers did not listen")

    def start(self):
        self.spawn()
        if not all(first_200(p, time.monotonic() + 30) for p in self.ports):
            try:
                said = open(os.path.join(self.dir, "stderr")).read()[-500:]
            except OSError:
                said = ""
            self.stop()
            raise RuntimeError(f"{self.name} did not answer on {self.ports}: {said}")
        time.sleep(0.3)
        return self

    def relay_pids(self):
        return proc_tree(self.front.pid) if self.front else None

    def stop(self):
        for p in ([self.front] if self.front else []) + self.procs:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in ([self.front] if self.front else []) + self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class RelayedDirect(Relayed):
    def spawn(self):
        self.node_workers()
        self.ports = self.worker_ports


class RelayedHaproxy(Relayed):
    def spawn(self):
        self.node_workers()
        port = free_port()
        cfg = os.path.join(self.dir, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write("global\n  maxconn 4000\n"
                    "defaults\n  mode tcp\n  balance leastconn\n  option splice-auto\n"
                    "  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n"
                    f"frontend public\n  bind 127.0.0.1:{port}\n  default_backend workers\n"
                    "backend workers\n" +
                    "".join(f"  server w{i} 127.0.0.1:{p}\n" for i, p in enumerate(self.worker_ports)))
        self.front = subprocess.Popen(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(self.dir, "stderr"), "w"))
        self.ports = [port]


class RelayedNginx(Relayed):
    def spawn(self):
        self.node_workers()
        port = free_port()
        cfg = os.path.join(self.dir, "nginx.conf")
        with open(cfg, "w") as f:
            f.write("load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
                    f"daemon off;\nworker_processes auto;\npid {self.dir}/nginx.pid;\n"
                    f"error_log {self.dir}/error.log;\nworker_rlimit_nofile 20000;\n"
                    "events { worker_connections 10000; }\n"
                    "stream {\n  upstream workers {\n    least_conn;\n    zone workers 64k;\n" +
                    "".join(f"    server 127.0.0.1:{p};\n" for p in self.worker_ports) +
                    f"  }}\n  server {{\n    listen 127.0.0.1:{port};\n    proxy_pass workers;\n"
                    "    proxy_timeout 120s;\n  }\n}\n")
        self.front = subprocess.Popen(["nginx", "-e", "stderr", "-p", self.dir, "-c", cfg],
                                      stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "stderr"), "w"))
        self.ports = [port]


class RelayedCorepool(Relayed):
    def __init__(self, name, tools, balance, binary=None):
        super().__init__(name, tools)
        self.balance, self.binary = balance, binary or tools["corepool"]

    def spawn(self):
        port = free_port()
        self.front = subprocess.Popen([self.binary, "-i", "2", "--balance", self.balance,
                                       "--host", "127.0.0.1", "-p", str(port), "--", "node", STREAM],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ports = [port]

    def relay_pids(self):
        # Only corepool's own process: its workers are the servers.
        return [self.front.pid]


def wrk_requests(ports, seconds, connections, close):
    """wrk (see `wrk`) plus the number of requests it completed."""
    result = wrk(ports, seconds, connections, close)
    result["requests"] = result["rps"] * seconds
    return result


def tcp_out_segments():
    """TCP segments sent in this network namespace so far (/proc/net/snmp, Tcp: OutSegs)."""
    with open("/proc/net/snmp") as f:
        head, values = [line.split() for line in f if line.startswith("Tcp:")][:2]
    return int(values[head.index("OutSegs")])


def measured(cfg, fn):
    """Runs `fn`, adding the relay's CPU seconds over it and, for requests, the TCP segments
    sent per request in the benchmark's network namespace (every side's: client, relay,
    workers; a count, not a timing, so it does not move with the machine's load)."""
    pids = cfg.relay_pids()
    c0 = cpu_s(pids) if pids else None
    s0 = tcp_out_segments()
    result = fn()
    segments = tcp_out_segments() - s0
    if result.get("requests"):
        result["segments_per_req"] = segments / result["requests"]
    if pids:
        result["relay_cpu_s"] = cpu_s(pids) - c0
        if result.get("requests"):
            result["cpu_us_per_req"] = result["relay_cpu_s"] / result["requests"] * 1e6
    return result


def curl_transfer(port, upload, times=7):
    """A 100 MiB download (GET /bulk) or upload (POST /sink) through `port`, `times` over (a
    single transfer takes a fifth of a second here, and where the scheduler puts curl, the relay
    and the worker on two cores moves it by half): MiB/s of the median transfer."""
    cmd = ["curl", "-sf", "-o", "/dev/null", "-w", "%{time_total}"]
    if upload:
        cmd += ["--data-binary", "@" + upload, "-H", "content-type: application/octet-stream",
                f"http://127.0.0.1:{port}/sink"]
    else:
        cmd += [f"http://127.0.0.1:{port}/bulk?mb=100"]
    seconds = [float(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)
               for _ in range(times)]
    return {"mib_s": 100 / statistics.median(seconds), "requests": 0, "transfers": times}


def hold_idle(ports, count):
    """`count` keep-alive connections, each having made one request (so a relay holds its
    worker connection too), spread over `ports`."""
    held = []
    for i in range(count):
        s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=10)
        s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while not data.endswith(b"hello\n"):
            chunk = s.recv(4096)
            if not chunk:
                raise RuntimeError("connection closed while held")
            data += chunk
        held.append(s)
    return held


def rss_sum(pids):
    return sum(rss_kib(p) or 0 for p in pids)


def proxies_main(args, tools):
    """--proxies: corepool --balance proxy against HAProxy and nginx (stream), same workers."""
    rounds, seconds, idle = (1, 4, 1000) if args.quick else (3, 8, 1000)
    configs = [("direct", lambda: RelayedDirect("direct", tools)),
               ("corepool-socket", lambda: RelayedCorepool("corepool-socket", tools, "socket")),
               ("haproxy", lambda: RelayedHaproxy("haproxy", tools)),
               ("nginx", lambda: RelayedNginx("nginx", tools)),
               ("corepool-proxy", lambda: RelayedCorepool("corepool-proxy", tools, "proxy"))]
    if args.baseline:
        # Another build of corepool (the one before a change), in the same run.
        configs.append(("corepool-proxy-baseline",
                        lambda: RelayedCorepool("corepool-proxy-baseline", tools, "proxy", args.baseline)))
    upload = os.path.join(tempfile.mkdtemp(prefix="bench-up-"), "upload.bin")
    with open(upload, "wb") as f:
        f.write(b"u" * (100 << 20))
    raw = {}
    for r in range(rounds):
        for name, make in configs:
            log(f"round {r + 1}/{rounds}: proxies, {name}")
            cfg = make().start()
            res = {}
            try:
                pids = cfg.relay_pids()
                before = rss_sum(pids) if pids else None
                held = hold_idle(cfg.ports, idle)
                time.sleep(0.5)
                res["idle"] = measured(cfg, lambda: wrk_requests(cfg.ports, seconds, 64, False))
                if pids:
                    pids = cfg.relay_pids()
                    res["idle"]["rss_kib_per_conn"] = (rss_sum(pids) - before) / idle
                    res["idle"]["rss_kib"] = rss_sum(pids)
                for s in held:
                    s.close()
                time.sleep(0.5)
                res["keepalive"] = measured(cfg, lambda: wrk_requests(cfg.ports, seconds, 64, False))
                res["new-connection"] = measured(cfg, lambda: wrk_requests(cfg.ports, seconds, 64, True))
                res["download"] = measured(cfg, lambda: curl_transfer(cfg.ports[0], None))
                res["upload"] = measured(cfg, lambda: curl_transfer(cfg.ports[0], upload))
            finally:
                cfg.stop()
            for sc, v in res.items():
                raw.setdefault(sc, {}).setdefault(name, []).append(v)
    shutil.rmtree(os.path.dirname(upload), ignore_errors=True)
    summary = {sc: {name: {k: statistics.median([x[k] for x in runs if x.get(k) is not None])
                           for k in runs[0]} for name, runs in per.items()} for sc, per in raw.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(BENCH, "results", f"proxies-{stamp}" + ("-quick" if args.quick else ""))
    info = machine()
    info["haproxy"] = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    info["nginx"] = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "rounds": rounds, "summary": summary, "raw": raw}, f, indent=1)
    lines = [f"# Proxies {stamp}{' (quick)' if args.quick else ''}", "",
             f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Node {info['node']}, "
             f"{info['haproxy']}, {info['nginx']}; two workers of bench/stream.js; {rounds} round(s), "
             "medians; configurations alternated. HAProxy: mode tcp, balance leastconn, option "
             "splice-auto, 2 threads; nginx: stream, least_conn, worker_processes auto (2). "
             f"wrk -t1 -c64 -d{seconds}s; curl for 100 MiB each way, 7 transfers, the median; relay CPU = utime+stime of the proxy's "
             "processes (for corepool: its own process, workers excluded) over the load. "
             f"idle: {idle} keep-alive connections held (one request each) while wrk runs; RSS per "
             "connection = the proxy's RSS growth / connections (user memory only: pipes and socket "
             "buffers are the kernel's). TCP segments/req: segments every side sent in the benchmark's "
             "network namespace per request (a count: it does not move with the machine's load).", ""]
    heads = {"idle": ("req/s", "rps"), "keepalive": ("req/s", "rps"), "new-connection": ("req/s", "rps"),
             "download": ("MiB/s", "mib_s"), "upload": ("MiB/s", "mib_s")}
    for sc, per in summary.items():
        unit, key = heads[sc]
        extra = " RSS KiB/conn | RSS MiB |" if sc == "idle" else ""
        lines += [f"## {sc}", "", f"| config | {unit} | / haproxy | / direct | relay CPU s | CPU µs/req | "
                  f"CPU / haproxy's | TCP segments/req |{extra}",
                  "|---|---|---|---|---|---|---|---|" + ("---|---|" if extra else "")]
        for name, v in per.items():
            ratio = lambda ref, k: f"{v[k] / per[ref][k]:.2f}" if per.get(ref, {}).get(k) and v.get(k) is not None else "-"
            row = (f"| {name} | {v[key]:.0f} | {ratio('haproxy', key)} | {ratio('direct', key)} | "
                   f"{v['relay_cpu_s']:.2f} |" if v.get("relay_cpu_s") is not None else
                   f"| {name} | {v[key]:.0f} | {ratio('haproxy', key)} | {ratio('direct', key)} | - |")
            row += f" {v['cpu_us_per_req']:.1f} |" if v.get("cpu_us_per_req") is not None else " - |"
            cpu_key = "cpu_us_per_req" if v.get("cpu_us_per_req") is not None else "relay_cpu_s"
            row += f" {ratio('haproxy', cpu_key)} |"
            row += f" {v['segments_per_req']:.2f} |" if v.get("segments_per_req") is not None else " - |"
            if extra:
                row += (f" {v['rss_kib_per_conn']:.1f} | {v['rss_kib'] / 1024:.1f} |" if v.get("rss_kib") else " - | - |")
            lines.append(row)
        lines.append("")
    lines += ["Goal: corepool-proxy / haproxy >= 1 on each, and its CPU / haproxy's <= 1.", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    log(f"results: {base}.md, .json")


# ---------------------------------------------------------------------------------------------
# --sizes: what corepool itself costs as the pool grows (2 cores: not a throughput test).

def http_status(port, path, timeout=2):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except Exception:
        return None, b""


def wakeups(pid):
    """Times the threads of `pid` were put on a CPU so far (/proc/PID/task/*/schedstat, third
    field), and their number."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0, 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[2])
        except (OSError, IndexError, ValueError):
            pass
    return total, len(tasks)


def wait_for(pred, seconds, every=0.005):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(every)
    return False


def idle_and_load(pid, port, idle_s, load_s):
    """corepool's (or pm2-runtime's) own RSS, CPU and wake-ups while idle, then under wrk."""
    time.sleep(1)
    c0, (w0, threads), t0 = cpu_s([pid]), wakeups(pid), time.monotonic()
    time.sleep(idle_s)
    c1, (w1, _), t1 = cpu_s([pid]), wakeups(pid), time.monotonic()
    out = {"rss_idle_kib": rss_kib(pid), "cpu_idle_pct": (c1 - c0) / (t1 - t0) * 100,
           "wakeups_idle_s": (w1 - w0) / (t1 - t0), "threads": threads}
    c0, (w0, _), t0 = cpu_s([pid]), wakeups(pid), time.monotonic()
    load = wrk([port], load_s, 64, False)
    c1, (w1, _), t1 = cpu_s([pid]), wakeups(pid), time.monotonic()
    out.update(rss_load_kib=rss_kib(pid), cpu_load_pct=(c1 - c0) / (t1 - t0) * 100,
               wakeups_load_s=(w1 - w0) / (t1 - t0), load_rps=load["rps"])
    return out


def sigterm_ms(procs):
    """SIGTERM to every one of `procs`, then the time until all have exited (ms); one still
    there after 60 s is killed."""
    t0 = time.monotonic()
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return (time.monotonic() - t0) * 1000


def sizes_corepool(tools, n, idle_s, load_s):
    port, mport = free_port(), free_port()
    logf = tempfile.NamedTemporaryFile(prefix="corepool-sizes-", suffix=".log", delete=False)
    env = dict(os.environ, NODE_ENV="production")
    t0 = time.monotonic()
    proc = subprocess.Popen([tools["corepool"], "-i", str(n), "--host", "127.0.0.1", "-p", str(port),
                             "--metrics", f"127.0.0.1:{mport}", "--min-ready", str(n), "--", "node", HELLO],
                            env=env, stdout=subprocess.DEVNULL, stderr=logf)
    out = {}
    try:
        if not wait_for(lambda: http_status(mport, "/readyz", 0.5)[0] == 200, 240):
            m = re.search(rb"corepool_workers_ready (\d+)", http_status(mport, "/metrics")[1])
            raise RuntimeError(f"corepool -i {n}: {m.group(1).decode() if m else '?'} ready after 240 s")
        out["all_ready_ms"] = (time.monotonic() - t0) * 1000
        out.update(idle_and_load(proc.pid, port, idle_s, load_s))
        times = []
        for _ in range(20):
            s = time.monotonic()
            status, body = http_status(mport, "/metrics")
            times.append((time.monotonic() - s) * 1000)
            if status != 200:
                raise RuntimeError("metrics scrape failed")
        out["metrics_ms"] = statistics.median(times)
        out["metrics_max_ms"] = max(times)
        out["metrics_bytes"] = len(body)
        # SIGHUP: until the reload's end is logged.
        text = lambda: open(logf.name, errors="replace").read()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGHUP)
        if not wait_for(lambda: "rolling reload complete" in text(), 300, 0.01):
            raise RuntimeError(f"corepool -i {n}: reload did not complete in 300 s")
        out["reload_ms"] = (time.monotonic() - t0) * 1000
        time.sleep(0.5)
    finally:
        out["term_ms"] = sigterm_ms([proc])
        os.unlink(logf.name)
    return out


def sizes_pm2(tools, n, idle_s, load_s):
    """pm2-runtime: 'all ready' = n workers forked and the port answering (pm2 has no
    readiness of its own without wait_ready); SIGHUP kills pm2-runtime, so no reload."""
    port = free_port()
    home = tempfile.mkdtemp(prefix="pm2home-")
    env = dict(os.environ, NODE_ENV="production", PORT=str(port), PM2_HOME=home)
    t0 = time.monotonic()
    proc = subprocess.Popen([tools["pm2"], "start", os.path.basename(HELLO), "-i", str(n)],
                            cwd=os.path.dirname(HELLO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    try:
        ok = wait_for(lambda: len(worker_pids(proc.pid)) >= n and http_status(port, "/", 0.5)[0] == 200, 240, 0.01)
        if not ok:
            raise RuntimeError(f"pm2 -i {n}: {len(worker_pids(proc.pid))} workers forked after 240 s")
        out["all_ready_ms"] = (time.monotonic() - t0) * 1000
        # pm2 forks the last worker before it listens: let the pool settle before measuring idle.
        time.sleep(2)
        out.update(idle_and_load(proc.pid, port, idle_s, load_s))
    finally:
        out["term_ms"] = sigterm_ms([proc])
        shutil.rmtree(home, ignore_errors=True)
    return out


def sizes_node(tools, n, idle_s, load_s):
    """The anchor: n bare `node` hello servers started at once, each on a port of its own; all
    ready = every one answers 200 (the time Node itself needs to start n servers here)."""
    ports = [free_port() for _ in range(n)]
    env = dict(os.environ, NODE_ENV="production")
    t0 = time.monotonic()
    procs = [subprocess.Popen(["node", HELLO], env=dict(env, PORT=str(p)), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for p in ports]
    out = {}
    try:
        waiting = set(ports)
        deadline = time.monotonic() + 240
        while waiting and time.monotonic() < deadline:
            waiting = {p for p in waiting if http_status(p, "/", 0.5)[0] != 200}
            if waiting:
                time.sleep(0.005)
        if waiting:
            raise RuntimeError(f"{n} bare nodes: {n - len(waiting)} answered after 240 s")
        out["all_ready_ms"] = (time.monotonic() - t0) * 1000
    finally:
        out["term_ms"] = sigterm_ms(procs)
    return out


def sizes_main(args, tools):
    """--sizes: corepool -i 1, 2, 8, 32, 128 (and pm2-runtime at the same counts)."""
    rounds, idle_s, load_s = (1, 3, 3) if args.quick else (2, 5, 4)
    counts = [int(c) for c in args.counts.split(",")]
    raw = {}
    for r in range(rounds):
        for n in counts:
            for name, fn in (("corepool", sizes_corepool), ("pm2", sizes_pm2), ("node", sizes_node)):
                log(f"round {r + 1}/{rounds}: -i {n} on {name}")
                try:
                    v = fn(tools, n, idle_s, load_s)
                except Exception as err:
                    log(f"  {name} -i {n}: {err}")
                    v = {"error": str(err)}
                raw.setdefault(name, {}).setdefault(str(n), []).append(v)
    summary = {name: {n: {k: statistics.median([x[k] for x in runs if k in x])
                          for k in runs[0] if k != "error"} for n, runs in per.items()}
               for name, per in raw.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(BENCH, "results", f"sizes-{stamp}" + ("-quick" if args.quick else ""))
    info = machine()
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "rounds": rounds, "summary": summary, "raw": raw}, f, indent=1)
    lines = [f"# Pool sizes {stamp}{' (quick)' if args.quick else ''}", "",
             f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Node {info['node']}; "
             f"examples/hello, socket mode; {rounds} round(s), medians; corepool and pm2-runtime "
             f"alternated at each count. Idle: {idle_s} s; load: wrk -t1 -c64 -d{load_s}s. Wake-ups: "
             "/proc/PID/task/*/schedstat (times put on a CPU), all threads of the supervisor. "
             "corepool all ready: /readyz with --min-ready N; pm2: N workers forked and a 200. "
             "Reload: SIGHUP to `rolling reload complete` (reload batch 1).", "",
             "node: N bare nodes on N ports started at once, all answering 200 (the anchor for start "
             "and SIGTERM).", "",
             "| config | -i | all ready ms | / -i 1 | / node's | RSS idle MiB | RSS load MiB | CPU idle % | "
             "wake-ups/s idle | CPU load % | wake-ups/s load | req/s | /metrics ms | reload ms | "
             "reload ms/worker | SIGTERM ms |", "|---|" * 1 + "---|" * 15]
    for name, per in summary.items():
        ref = per.get("1", {})
        for n, v in per.items():
            f = lambda k, fmt="{:.0f}", scale=1: fmt.format(v[k] / scale) if k in v else "-"
            node = summary.get("node", {}).get(n, {}).get("all_ready_ms")
            lines.append(f"| {name} | {n} | {f('all_ready_ms')} | " +
                         (f"{v['all_ready_ms'] / ref['all_ready_ms']:.1f} | " if 'all_ready_ms' in v and ref.get('all_ready_ms') else "- | ") +
                         (f"{v['all_ready_ms'] / node:.2f} | " if 'all_ready_ms' in v and node else "- | "))
            lines[-1] += (f"{f('rss_idle_kib', '{:.1f}', 1024)} | {f('rss_load_kib', '{:.1f}', 1024)} | "
                          f"{f('cpu_idle_pct', '{:.2f}')} | {f('wakeups_idle_s', '{:.1f}')} | {f('cpu_load_pct', '{:.1f}')} | "
                          f"{f('wakeups_load_s')} | {f('load_rps')} | {f('metrics_ms', '{:.1f}')} | {f('reload_ms')} | "
                          f"{(v['reload_ms'] / int(n)) if 'reload_ms' in v else 0:.0f} | {f('term_ms')} |")
    lines.append("")
    lines += [f"- {name} -i {n}: {x['error']}" for name, per in raw.items() for n, runs in per.items()
              for x in runs if "error" in x]
    lines.append("")
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    log(f"results: {base}.md, .json")


# ---------------------------------------------------------------------------------------------
# --start: where the time from start to first 200 goes, corepool against a bare node.

def timed(cmd, **kw):
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    CPU_AT_200.setdefault(" ".join(cmd) + ", CPU ms", []).append((usage.ru_utime + usage.ru_stime) * 1000)
    return (time.monotonic() - t0) * 1000


def on_cpu_ms(pid):
    """CPU time of all threads of `pid` so far, in ms (/proc/PID/task/*/schedstat, ns)."""
    total = 0
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return total / 1e6


CPU_AT_200 = {}


def first_200_ms(cmd, port, env, name=None):
    """Wall time from start to the first 200; with `name`, also records in CPU_AT_200 the CPU
    time the started process and its descendants had used by then (less sensitive than wall
    time to a busy machine)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(HELLO), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not first_200(port, t0 + 30):
            raise RuntimeError(f"{cmd[0]}: no 200 in 30 s")
        wall = (time.monotonic() - t0) * 1000
        if name:
            tree = proc_tree(proc.pid)
            CPU_AT_200.setdefault(name + ", its own CPU ms", []).append(on_cpu_ms(proc.pid))
            if len(tree) > 1:
                CPU_AT_200.setdefault(name + ", its workers' CPU ms", []).append(
                    sum(on_cpu_ms(p) for p in tree[1:]))
        return wall
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def strace_timeline(tools):
    """One start of `corepool -i 1` under strace -f: the moments that matter, in ms from its
    execve (strace slows every syscall down: read the gaps, not the total)."""
    port = free_port()
    out = tempfile.NamedTemporaryFile(prefix="strace-", delete=False).name
    cmd = ["strace", "-f", "-ttt", "-e", "trace=execve,exit_group,bind,listen,accept4,sendmsg,connect",
           "-e", "signal=none", "-o", out, tools["corepool"], "-i", "1", "--host", "127.0.0.1",
           "-p", str(port), "--", "node", "server.js"]
    strace = subprocess.Popen(cmd, cwd=os.path.dirname(HELLO), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        if not first_200(port, time.monotonic() + 30):
            raise RuntimeError("corepool under strace: no 200 in 30 s")
    finally:
        # SIGTERM to strace would only detach it: stop the traced corepool itself.
        for pid in worker_pids(strace.pid):
            os.kill(pid, signal.SIGTERM)
        try:
            strace.wait(timeout=20)
        except subprocess.TimeoutExpired:
            strace.kill()
            strace.wait()
    events, t0 = [], None
    for line in open(out):
        m = re.match(r"(\d+) ([\d.]+) (.*)", line)
        if not m:
            continue
        pid, t, call = int(m.group(1)), float(m.group(2)), m.group(3)
        t0 = t if t0 is None else t0
        if call.startswith(("execve(", "exit_group(", "listen(", "accept4(")) and "resumed" not in call \
                and "= -1 EAGAIN" not in call:
            events.append((round((t - t0) * 1000, 1), pid, call[:110]))
    os.unlink(out)
    return events


def preload_option(tools):
    """The NODE_OPTIONS corepool gives its workers (the preload), read from a worker's
    environment; with `--require FILE`, FILE (removed when corepool exits) is copied first.
    Returns (the option, the preload's text)."""
    port = free_port()
    proc = subprocess.Popen([tools["corepool"], "-i", "1", "--host", "127.0.0.1", "-p", str(port), "--",
                             "node", "server.js"], cwd=os.path.dirname(HELLO),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not first_200(port, time.monotonic() + 30):
            raise RuntimeError("corepool did not answer")
        for var in open(f"/proc/{worker_pids(proc.pid)[0]}/environ", "rb").read().split(b"\0"):
            if var.startswith(b"NODE_OPTIONS="):
                option = var.split(b"=", 1)[1].decode()
                m = re.match(r'--require "([^"]+)"', option)
                if not m:
                    raise RuntimeError(f"the preload is not a file: {option[:80]}")
                text = open(m.group(1)).read()
                copy = os.path.join(tempfile.mkdtemp(prefix="bench-preload-"), "preload.cjs")
                with open(copy, "w") as f:
                    f.write(text)
                return f'--require "{copy}"', text
        raise RuntimeError("no NODE_OPTIONS in the worker's environment")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)


def start_main(args, tools):
    """--start: first 200 of the hello server, bare node against corepool, and its parts."""
    rounds = 5 if args.quick else 15
    env = dict(os.environ, NODE_ENV="production")
    preload, text = preload_option(tools)
    # The same text as corepool delivers it where no directory is writable (src/node.rs).
    module = ("import { createRequire } from 'node:module';\n"
              "const require = createRequire('/corepool-preload.cjs');\n" + text)
    imported = "--import=data:text/javascript;base64," + base64.b64encode(module.encode()).decode()
    configs = {
        "bare node + corepool's preload (its NODE_OPTIONS, no COREPOOL_* variables), first 200":
            lambda: (lambda p: first_200_ms(["node", "server.js"], p, dict(env, PORT=str(p), NODE_OPTIONS=preload),
                                            "bare node + preload"))(free_port()),
        "bare node + the preload by --import of a data: URL (no writable directory), first 200":
            lambda: (lambda p: first_200_ms(["node", "server.js"], p, dict(env, PORT=str(p), NODE_OPTIONS=imported),
                                            "bare node + preload by --import"))(free_port()),
        "node --version": lambda: timed(["node", "--version"]),
        "node -e 0": lambda: timed(["node", "-e", "0"]),
        "bare node, first 200": lambda: (lambda p: first_200_ms(["node", "server.js"], p, dict(env, PORT=str(p)),
                                                                "bare node"))(free_port()),
        "corepool -i 1 socket, first 200": lambda: (lambda p: first_200_ms(
            [tools["corepool"], "-i", "1", "--host", "127.0.0.1", "-p", str(p), "--", "node", "server.js"], p, env,
            "corepool socket"))(free_port()),
        "corepool -i 1 proxy, first 200": lambda: (lambda p: first_200_ms(
            [tools["corepool"], "-i", "1", "--balance", "proxy", "--host", "127.0.0.1", "-p", str(p), "--", "node", "server.js"], p, env))(free_port()),
        "corepool -i 1 socket, first 200, argv[0] not node (sh -c exec node)": lambda: (lambda p: first_200_ms(
            [tools["corepool"], "-i", "1", "--host", "127.0.0.1", "-p", str(p), "--", "sh", "-c", "exec node server.js"], p, env))(free_port()),
    }
    raw = {k: [] for k in configs}
    for r in range(rounds):
        log(f"round {r + 1}/{rounds}: start")
        for name, fn in configs.items():
            raw[name].append(fn())
    raw.update(CPU_AT_200)
    summary = {k: statistics.median(v) for k, v in raw.items()}
    spread = {k: (min(v), max(v)) for k, v in raw.items()}
    timeline = strace_timeline(tools)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join(BENCH, "results", f"start-{stamp}" + ("-quick" if args.quick else ""))
    info = machine()
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "rounds": rounds, "summary": summary, "raw": raw, "strace": timeline}, f, indent=1)
    bare = summary["bare node, first 200"]
    lines = [f"# Start time {stamp}{' (quick)' if args.quick else ''}", "",
             f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Node {info['node']}; "
             f"examples/hello; {rounds} rounds, all measurements alternated, medians (min-max).", "",
             "| measurement | ms | min-max | - bare node |", "|---|---|---|---|"]
    for k, v in summary.items():
        lines.append(f"| {k} | {v:.1f} | {spread[k][0]:.0f}-{spread[k][1]:.0f} | "
                     + (f"{v - bare:+.1f} |" if k.endswith("first 200") else "- |"))
    lines += ["", "One start of `corepool -i 1 -- node server.js` under `strace -f -ttt` (ms from the "
              "first event; strace slows every syscall: read the gaps):", "", "```"]
    lines += [f"{t:8.1f}  {pid:>7}  {call}" for t, pid, call in timeline]
    lines += ["```", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    log(f"results: {base}.md, .json")


def private_network():
    """Runs the rest of the benchmark in a network namespace of its own, with only loopback.

    On a host with firewall rules (podman's netavark adds some), the kernel tracks every loopback
    connection, and keeps each closed one for 120 s: a new connection per request (twice
    through a relay) fills nf_conntrack's table (262,144 entries here) within a minute of load,
    after which the kernel drops SYNs and a row measures retransmit timers, not the server.
    Runs late in a benchmark were hit and runs early were not. A fresh namespace has no rules,
    so nothing is tracked (as in a Kubernetes pod's own namespace), and no other job's
    connections or TIME_WAIT share its port space. Everything was installed before this."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        err = ctypes.get_errno()
        log(f"cannot make a network namespace ({os.strerror(err)}): measuring in the host's, "
            "where connection tracking may fill and drop SYNs (see dmesg)")
        return
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    PRIVATE_NETWORK.append(True)
    # What corepool does as PID 1 in its container's namespace (a fresh one has 0): a listening
    # socket leaving an SO_REUSEPORT group hands its queued connections to another.
    migrate_queued(True)
    log("measuring in a network namespace of its own (loopback only, no connection tracking, "
        "net.ipv4.tcp_migrate_req=1 as corepool sets it as PID 1)")


PRIVATE_NETWORK = []


def migrate_queued(on):
    """net.ipv4.tcp_migrate_req in the benchmark's own network namespace (never the host's)."""
    if not PRIVATE_NETWORK:
        return
    with open("/proc/sys/net/ipv4/tcp_migrate_req", "w") as f:
        f.write("1" if on else "0")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of short loads (under 3 minutes)")
    ap.add_argument("-n", type=int, default=os.cpu_count(), help="workers (default: CPUs)")
    ap.add_argument("--restart", action="store_true", help="only the restart-under-load scenario")
    ap.add_argument("--proxies", action="store_true", help="only corepool proxy against HAProxy and nginx")
    ap.add_argument("--servers", default="hello,nextjs", help="--restart: which servers (hello,nextjs)")
    ap.add_argument("--baseline", metavar="BIN", help="--proxies: also another corepool build, in the same run")
    ap.add_argument("--sizes", action="store_true", help="only the cost of -i 1, 2, 8, 32, 128")
    ap.add_argument("--counts", default="1,2,8,32,128", help="--sizes: the pool sizes")
    ap.add_argument("--start", action="store_true", help="only where the start-up time goes")
    args = ap.parse_args()
    if args.start:
        tools = install(("wrk", "strace"), nextjs=False)
        private_network()
        return start_main(args, tools)
    if args.restart:
        tools = install(("wrk",), nextjs="nextjs" in args.servers.split(","))
        private_network()
        return restart_main(args, tools)
    if args.proxies:
        tools = install(("wrk", "curl", "haproxy", "nginx"), nextjs=False)
        private_network()
        return proxies_main(args, tools)
    if args.sizes:
        tools = install(("wrk",), nextjs=False)
        private_network()
        return sizes_main(args, tools)
    rounds, next_s, hello_s = (1, 8, 4) if args.quick else (3, 60, 15)
    tools = install()
    private_network()
    n = args.n
    configs = [("bare", lambda: Bare("bare", tools, 1)),
               ("direct", lambda: Direct("direct", tools, n)),
               ("pm2", lambda: Pm2("pm2", tools, n)),
               ("corepool-socket", lambda: Corepool("corepool-socket", tools, n, "socket")),
               ("corepool-proxy", lambda: Corepool("corepool-proxy", tools, n, "proxy"))]
    scenarios = [
        ("nextjs-page", tools["nextjs"], lambda ports: {**siege(ports, next_s, 50),
                                                          **{k: v for k, v in wrk(ports, max(3, next_s // 4), 50, False).items() if k in ("p50_ms", "p99_ms")}}),
        ("hello-keepalive", HELLO, lambda ports: wrk(ports, hello_s, 64, False)),
        ("hello-new-connection", HELLO, lambda ports: wrk(ports, hello_s, 64, True)),
    ]
    raw = {}
    for r in range(rounds):
        for sc, server, load in scenarios:
            for name, make in configs:
                log(f"round {r + 1}/{rounds}: {sc} on {name}")
                cfg = make().start(server)
                try:
                    result = load(cfg.ports)
                finally:
                    cfg.stop()
                result.update(startup_ms=cfg.startup_ms, stop_ms=cfg.stop_ms, supervisor_kib=cfg.supervisor_kib)
                raw.setdefault(sc, {}).setdefault(name, []).append(result)
    summary = {sc: {name: {k: statistics.median([x[k] for x in runs if x.get(k) is not None])
                           for k in runs[0] if any(x.get(k) is not None for x in runs)}
                    for name, runs in per.items()} for sc, per in raw.items()}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(os.path.join(BENCH, "results"), exist_ok=True)
    base = os.path.join(BENCH, "results", stamp + ("-quick" if args.quick else ""))
    info = machine()
    with open(base + ".json", "w") as f:
        json.dump({"machine": info, "workers": n, "rounds": rounds, "summary": summary, "raw": raw}, f, indent=1)
    svg(summary, base + ".svg")
    lines = [f"# corepool benchmark {stamp}{' (quick)' if args.quick else ''}", "",
             f"{info['cores']} cores ({info['cpu']}), Linux {info['kernel']}, Node {info['node']}; "
             f"{n} workers; {rounds} round(s), medians; configurations alternated.", ""]
    for sc, per in summary.items():
        lines += [f"## {sc}", "",
                  "| config | req/s | vs pm2 | vs direct | p50 ms | p99 ms | failed | longest ms | start ms | stop ms | supervisor RSS |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in per.items():
            ratio = lambda ref: f"{v['rps'] / per[ref]['rps']:.2f}" if per.get(ref, {}).get("rps") else "-"
            kib = v.get("supervisor_kib")
            lines.append(f"| {name} | {v['rps']:.0f} | {ratio('pm2')} | {ratio('direct')} | {v.get('p50_ms', 0):.1f} | "
                         f"{v.get('p99_ms', 0):.1f} | {v.get('failed', v.get('errors', 0)):.0f} | {v.get('longest_ms', 0):.0f} | "
                         f"{v['startup_ms']:.0f} | {v['stop_ms']:.0f} | {f'{kib / 1024:.1f} MiB' if kib else '-'} |")
        lines.append("")
    bare_start = summary["hello-keepalive"]["bare"]["startup_ms"]
    lines += ["## Goals", "",
              f"- corepool socket / direct, hello keep-alive: {summary['hello-keepalive']['corepool-socket']['rps'] / summary['hello-keepalive']['direct']['rps']:.2f} (goal >= 0.97)",
              f"- corepool socket / pm2, Next.js page: {summary['nextjs-page']['corepool-socket']['rps'] / summary['nextjs-page']['pm2']['rps']:.2f} (goal >= 1), "
              f"p99 {summary['nextjs-page']['corepool-socket'].get('p99_ms', 0):.1f} vs {summary['nextjs-page']['pm2'].get('p99_ms', 0):.1f} ms",
              f"- corepool socket / pm2, new connection per request: {summary['hello-new-connection']['corepool-socket']['rps'] / summary['hello-new-connection']['pm2']['rps']:.2f} (goal >= 1.3)",
              f"- supervisor RSS: corepool {summary['hello-keepalive']['corepool-socket']['supervisor_kib'] / 1024:.1f} MiB vs pm2 {summary['hello-keepalive']['pm2']['supervisor_kib'] / 1024:.1f} MiB (goal <= 5 MiB)",
              f"- first response: corepool socket {summary['hello-keepalive']['corepool-socket']['startup_ms']:.0f} ms vs bare node {bare_start:.0f} ms (goal within 30 ms)",
              "", f"Chart: {os.path.basename(base)}.svg", ""]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    log(f"results: {base}.md, .json, .svg")


if __name__ == "__main__":
    main()
