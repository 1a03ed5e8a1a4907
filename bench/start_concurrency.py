#!/usr/bin/env python3
"""bench/start_concurrency.py BIN N ROUNDS: corepool -i N of examples/hello: seconds from spawn to /readyz 200 with --min-ready N,
the slowest single worker's 'ready after', and how many 'not ready after' restarts, for
--start-concurrency 0 (every worker at once, the old behaviour) and auto, alternated."""
import os, re, socket, subprocess, sys, tempfile, time, signal, urllib.request
BIN, N, ROUNDS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
HELLO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "hello", "server.js")
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def ready(mport):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=0.5).status == 200
    except Exception:
        return False
def secs(t):
    m = re.match(r"([\d.]+)(ms|s|m)", t); v = float(m.group(1))
    return v / 1000 if m.group(2) == "ms" else v * 60 if m.group(2) == "m" else v
for r in range(ROUNDS):
    for conc in ("0", "auto"):
        port, mport = free_port(), free_port()
        log = tempfile.NamedTemporaryFile(delete=False)
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        p = subprocess.Popen([BIN, "-i", str(N), "--host", "127.0.0.1", "-p", str(port), "--metrics",
                              f"127.0.0.1:{mport}", "--min-ready", str(N), "--start-concurrency", conc,
                              "--", "node", HELLO], stdout=subprocess.DEVNULL, stderr=log,
                             env=dict(os.environ, NODE_ENV="production"))
        took = None
        while time.monotonic() - t0 < 180 and p.poll() is None:
            if ready(mport):
                took = time.monotonic() - t0; break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM); code = p.wait(60)
        text = open(log.name, errors="replace").read(); os.unlink(log.name)
        afters = [secs(x) for x in re.findall(r"ready \(pid \d+\) after (\S+)", text)]
        print(f"round {r+1} --start-concurrency {conc}: load {load:.1f}, all {N} ready: "
              f"{'%.1f s' % took if took else 'NEVER (exit %s)' % p.returncode}, "
              f"slowest worker {max(afters) if afters else 0:.1f} s, median worker "
              f"{sorted(afters)[len(afters)//2] if afters else 0:.1f} s, "
              f"'not ready after': {text.count('not ready after')}", flush=True)
