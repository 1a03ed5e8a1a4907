#!/usr/bin/env python3
"""corepool against pm2-runtime, a bare node and N direct nodes, on this machine, in one run.

    bench/run.py            full run: 3 rounds, siege 60 s on the Next.js page, wrk 15 s
    bench/run.py --quick    1 round, short loads: under 3 minutes
    bench/run.py --restart  latency while a worker is killed (kill -9) and restarted under load:
                            pm2-runtime cluster, corepool socket with and without eBPF steering

Installs what it needs (wrk and siege from Debian, pm2 from npm into bench/.cache, the Next.js
fixture via tests/fixtures/nextapp/build.sh, corepool's release build). Configurations run in
alternation (A B C ... A B C ...) and medians are quoted. Writes bench/results/<stamp>.md,
.json and .svg. Everything runs on loopback; every load is bounded in time.
"""

import argparse
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


def install(packages=("wrk", "siege")):
    """wrk, siege, pm2, the Next.js build and corepool's release binary."""
    missing = [p for p in packages if not shutil.which(p)]
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
                            check=True, capture_output=True, text=True).stdout.strip()
    corepool = subprocess.run([os.path.join(ROOT, "build-static.sh")], check=True,
                              capture_output=True, text=True).stdout.strip()
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
               ("corepool-socket-hash", lambda: Corepool("corepool-socket-hash", tools, n, "socket", nocaps))]
    servers = [("hello", HELLO), ("nextjs", tools["nextjs"])]
    raw = {}
    for r in range(rounds):
        for sc, server in servers:
            for name, make in configs:
                log(f"round {r + 1}/{rounds}: restart under load, {sc} on {name}")
                cfg = make().start(server)
                try:
                    steady = wrk_kill(cfg, seconds, 20, None)
                    result = wrk_kill(cfg, seconds, 20, seconds / 3)
                finally:
                    cfg.stop()
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
             "corepool-socket-hash runs without CAP_BPF/CAP_SYS_ADMIN/CAP_NET_ADMIN (setpriv): no eBPF. "
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
    lines += ["Goal: p99 / pm2 <= 1 for both corepool rows.", ""]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 round of short loads (under 3 minutes)")
    ap.add_argument("-n", type=int, default=os.cpu_count(), help="workers (default: CPUs)")
    ap.add_argument("--restart", action="store_true", help="only the restart-under-load scenario")
    args = ap.parse_args()
    if args.restart:
        return restart_main(args, install(("wrk",)))
    rounds, next_s, hello_s = (1, 8, 4) if args.quick else (3, 60, 15)
    tools = install()
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
