//! One port for the whole pool, socket mode: an unmodified Node server (CommonJS or ESM) adopts
//! the shared socket, the client's address reaches it, load spreads, readiness tells the truth
//! (preload pipe, sd_notify, ready timeout), a failing reload keeps the old workers, and a
//! read-only root does not matter. Loopback only; every load is bounded.

mod common;

use common::*;
use std::collections::HashMap;
use std::time::Duration;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

fn socket_pool(n: usize, port: u16, extra: &[&str], command: &[&str], env: &[(&str, &str)]) -> Run {
    let mut args = socket_args(n, port, extra);
    args.push("--".into());
    args.extend(command.iter().map(|a| a.to_string()));
    Run::start(&args, env)
}

#[test]
fn workers_share_one_port_and_see_the_client() {
    let port = free_port();
    let run = socket_pool(2, port, &[], &["node", HELLO], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let mut by_worker: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let v = get_json(port).expect("request");
        assert_eq!(
            v["client"], "127.0.0.1",
            "the app must see the real client: {v}"
        );
        *by_worker
            .entry(v["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(by_worker.len(), 2, "{by_worker:?}");
    // The app's own start-up line shows the public port.
    run.wait_stdout(&format!("listening on 127.0.0.1:{port}"), 2, SECS(5));
    // One SO_REUSEPORT listening socket per slot on the port, all held by corepool.
    assert_eq!(
        listening_sockets(port),
        2,
        "expected one listening socket per slot on {port}"
    );
}

#[test]
fn a_thousand_connections_spread_with_no_worker_above_60_percent() {
    let port = free_port();
    let run = socket_pool(2, port, &[], &["node", HELLO], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let counts: Vec<HashMap<String, usize>> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut m = HashMap::new();
                for _ in 0..63 {
                    let v = get_json(port).expect("request");
                    *m.entry(v["worker"].as_str().unwrap().to_string())
                        .or_default() += 1;
                }
                m
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .collect();
    let mut total: HashMap<String, usize> = HashMap::new();
    for m in counts {
        for (k, v) in m {
            *total.entry(k).or_default() += v;
        }
    }
    let all: usize = total.values().sum();
    let top = *total.values().max().unwrap();
    eprintln!("spread over {all} connections: {total:?}");
    assert!(
        top * 100 <= all * 60,
        "one worker took {top} of {all}: {total:?}"
    );
}

/// Which worker answers on each of `n` keep-alive connections opened one after another and
/// all held open (as wrk or a browser holds them).
fn workers_of_held_connections(port: u16, n: usize) -> HashMap<String, usize> {
    use std::io::{BufRead, BufReader, Write};
    let held: Vec<std::net::TcpStream> = (0..n)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let mut by_worker = HashMap::new();
    for mut conn in held {
        conn.set_read_timeout(Some(SECS(10))).unwrap();
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let body = BufReader::new(conn)
            .lines()
            .map(|l| l.unwrap())
            .find(|l| l.starts_with('{'))
            .expect("a JSON body");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        *by_worker
            .entry(v["worker"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    by_worker
}

/// With the eBPF round robin (root here) 64 long-lived connections split exactly 32/32; the
/// kernel's hash alone splits them binomially (27/37 seen in the benchmark).
#[test]
fn held_connections_are_dealt_in_turn() {
    let port = free_port();
    let run = socket_pool(2, port, &[], &["node", HELLO], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    assert!(
        run.stderr()
            .contains("balance socket: connections in turn (eBPF)"),
        "steering needs root (CAP_BPF, CAP_NET_ADMIN): {}",
        run.stderr()
    );
    let by_worker = workers_of_held_connections(port, 64);
    assert_eq!(
        by_worker.values().copied().collect::<Vec<_>>(),
        [32, 32],
        "{by_worker:?}"
    );
}

/// Without the capabilities eBPF needs (a container's default), corepool says so once and the
/// kernel's hash spreads connections: the pool serves as before.
#[test]
fn without_bpf_capabilities_the_kernel_hash_spreads() {
    require("setpriv");
    let port = free_port();
    let mut args: Vec<String> = ["--bounding-set", "-bpf,-sys_admin,-perfmon", bin()]
        .into_iter()
        .map(String::from)
        .collect();
    args.extend(socket_args(2, port, &["--", "node", HELLO]));
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(&args);
    let run = Run::from_command(cmd, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    assert!(
        run.stderr().contains(
            "connections by the kernel's hash (no eBPF round robin: Operation not permitted"
        ),
        "{}",
        run.stderr()
    );
    let by_worker = workers_of_held_connections(port, 64);
    assert_eq!(by_worker.len(), 2, "{by_worker:?}");
}

#[test]
fn esm_servers_adopt_the_socket_and_user_node_options_are_kept() {
    let dir = scratch("esm");
    let server = dir.join("server.mjs");
    std::fs::write(
        &server,
        "import http from 'node:http';\n\
         const s = http.createServer((req, res) => res.end(JSON.stringify({worker: process.env.COREPOOL_WORKER, \
         client: req.socket.remoteAddress, options: process.env.NODE_OPTIONS, execArgv: process.execArgv})));\n\
         s.listen({ port: Number(process.env.PORT), host: '0.0.0.0' });\n",
    )
    .unwrap();
    let port = free_port();
    let run = socket_pool(
        2,
        port,
        &[],
        &["node", server.to_str().unwrap()],
        &[("NODE_OPTIONS", "--max-http-header-size=20000")],
    );
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let mut workers = std::collections::HashSet::new();
    for _ in 0..50 {
        let v = get_json(port).unwrap();
        assert!(
            v["options"]
                .as_str()
                .unwrap()
                .starts_with("--max-http-header-size=20000 "),
            "{v}"
        );
        workers.insert(v["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(workers.len(), 2);
}

#[test]
fn sd_notify_makes_a_non_node_worker_ready() {
    require("python3");
    let worker = "import os, socket, time\n\
                  addr = os.environ['NOTIFY_SOCKET']\n\
                  addr = '\\0' + addr[1:] if addr.startswith('@') else addr\n\
                  time.sleep(0.3)\n\
                  s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
                  s.sendto(b'READY=1\\nSTATUS=serving', addr)\n\
                  time.sleep(60)\n";
    let port = free_port();
    let run = socket_pool(1, port, &[], &["python3", "-c", worker], &[]);
    run.wait_stderr("worker 0 ready (pid", 1, SECS(10));
}

#[test]
fn a_worker_that_never_listens_is_restarted_after_the_ready_timeout() {
    let port = free_port();
    let run = socket_pool(
        1,
        port,
        &["--ready-timeout", "500ms", "--kill-timeout", "1s"],
        &["sleep", "60"],
        &[],
    );
    run.wait_stderr("started, pid", 2, SECS(5));
    assert!(
        run.stderr().contains("not ready after 500ms: restarting"),
        "{}",
        run.stderr()
    );
}

/// examples/hello, except that a process started once the returned marker file exists never
/// listens (new code that is broken): (the server script, the marker).
fn breakable_server(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    let (server, marker) = (dir.join("server.js"), dir.join("broken"));
    std::fs::write(
        &server,
        format!(
            "if (require('fs').existsSync({marker:?})) {{ setInterval(() => {{}}, 1000); }} else {{ require({HELLO:?}); }}"
        ),
    )
    .unwrap();
    (server, marker)
}

#[test]
fn a_reload_whose_replacement_never_gets_ready_keeps_the_old_workers() {
    let (server, marker) = breakable_server("badreload");
    let port = free_port();
    let run = socket_pool(
        2,
        port,
        &["--ready-timeout", "1s", "--kill-timeout", "1s"],
        &["node", server.to_str().unwrap()],
        &[],
    );
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let before: std::collections::HashSet<i64> = (0..20)
        .map(|_| get_json(port).unwrap()["pid"].as_i64().unwrap())
        .collect();
    std::fs::write(&marker, "").unwrap();
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload stopped", 1, SECS(10));
    assert!(
        run.stderr().contains("was not ready after 1s"),
        "{}",
        run.stderr()
    );
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..20 {
        let pid = get_json(port).expect("old workers keep serving")["pid"]
            .as_i64()
            .unwrap();
        assert!(
            before.contains(&pid),
            "served by {pid}, not an old worker {before:?}"
        );
    }
}

/// A replacement that dies right after it took its slot (new code that crashes once it
/// listens, as an app whose second listener fails) stops the reload, which does not claim to be
/// complete: it completes only once the old workers it replaced have exited.
#[test]
fn a_replacement_that_dies_after_it_took_over_stops_the_reload() {
    let dir = scratch("diesafter");
    let marker = dir.join("new-code");
    let server = dir.join("server.js");
    // The old code takes 2 s to stop after the drain; the new code exits 300 ms after it
    // listens (and is ready).
    std::fs::write(
        &server,
        format!(
            "const http = require('http');\n\
             const s = http.createServer((q, r) => r.end(String(process.pid)));\n\
             if (require('fs').existsSync({marker:?})) {{\n\
               s.listen(Number(process.env.PORT), () => setTimeout(() => process.exit(1), 300));\n\
             }} else {{\n\
               s.listen(Number(process.env.PORT));\n\
               process.on('SIGTERM', () => setTimeout(() => process.exit(0), 2000));\n\
             }}\n"
        ),
    )
    .unwrap();
    let port = free_port();
    let run = socket_pool(1, port, &[], &["node", server.to_str().unwrap()], &[]);
    run.wait_stderr(" ready (pid", 1, SECS(15));
    std::fs::write(&marker, "").unwrap();
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload stopped", 1, SECS(15));
    run.wait_stderr("exited after its replacement", 1, SECS(15));
    let stderr = run.stderr();
    assert!(
        stderr.contains("the replacement of worker 0 (pid ")
            && stderr.contains("exited after it took over: exit code 1"),
        "{stderr}"
    );
    assert!(!stderr.contains("rolling reload complete"), "{stderr}");
}

/// SIGHUPs that arrive while a reload runs (new code deployed twice in a row) are one more
/// whole reload after it, so no worker keeps code older than the last request.
#[test]
fn a_reload_asked_for_during_a_reload_follows_it() {
    let dir = scratch("reload-twice");
    let server = dir.join("server.js");
    // Listens 700 ms after start, so a reload of two workers takes well over a second.
    std::fs::write(
        &server,
        format!("setTimeout(() => require({HELLO:?}), 700);"),
    )
    .unwrap();
    let port = free_port();
    let mut run = socket_pool(2, port, &[], &["node", server.to_str().unwrap()], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    run.signal(libc::SIGHUP);
    run.wait_stderr("replacement started", 1, SECS(5));
    for _ in 0..3 {
        run.signal(libc::SIGHUP);
        std::thread::sleep(Duration::from_millis(20));
    }
    run.wait_stderr("rolling reload complete", 2, SECS(20));
    let err = run.stderr();
    assert_eq!(
        err.matches("rolling reload of 2 workers").count(),
        2,
        "{err}"
    );
    assert_eq!(err.matches("another will follow it").count(), 1, "{err}");
    assert_eq!(err.matches("replacement started").count(), 4, "{err}");
    // The workers now serving are the second reload's.
    let second: Vec<i32> = err
        .split("rolling reload of 2 workers")
        .nth(2)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_once("replacement started, pid ")
                .map(|(_, p)| p.trim())
        })
        .map(|p| p.parse().unwrap())
        .collect();
    for _ in 0..20 {
        let pid = get_json(port).unwrap()["pid"].as_i64().unwrap() as i32;
        assert!(second.contains(&pid), "served by {pid}, not by {second:?}");
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0);
}

/// The old worker dies while its replacement is still starting: the replacement takes the slot
/// as a worker that is not ready yet, so the ready timeout still applies to it.
#[test]
fn a_replacement_that_takes_over_early_is_still_held_to_the_ready_timeout() {
    let (server, marker) = breakable_server("takeover");
    let port = free_port();
    let run = socket_pool(
        1,
        port,
        &["--ready-timeout", "1500ms", "--kill-timeout", "1s"],
        &["node", server.to_str().unwrap()],
        &[],
    );
    run.wait_stderr(" ready (pid", 1, SECS(15));
    let old = started_pids(&run.stderr())[0];
    std::fs::write(&marker, "").unwrap();
    run.signal(libc::SIGHUP);
    run.wait_stderr("replacement started", 1, SECS(5));
    // SAFETY: kill(2) on the worker corepool reported.
    unsafe { libc::kill(old, libc::SIGKILL) };
    run.wait_stderr("its replacement takes over", 1, SECS(5));
    let replacement = started_pids(&run.stderr().replace("replacement started,", "started,"))[1];
    run.wait_stderr(
        &format!("(pid {replacement}) not ready after 1500ms"),
        1,
        SECS(5),
    );
}

/// A reload's replacement that dies before it is ready takes what it left in its process
/// group with it, as a crashed worker does.
#[test]
fn a_failed_replacements_leftovers_are_stopped() {
    let dir = scratch("replacement-leftovers");
    let marker = dir.join("broken");
    let script = format!(
        "if [ -e {m} ]; then sleep 60 & echo left $!; exit 3; fi; exec node {HELLO}",
        m = marker.display()
    );
    let port = free_port();
    let run = socket_pool(
        1,
        port,
        &["--kill-timeout", "1s"],
        &["sh", "-c", &script],
        &[],
    );
    run.wait_stderr(" ready (pid", 1, SECS(15));
    std::fs::write(&marker, "").unwrap();
    run.signal(libc::SIGHUP);
    run.wait_stderr("exited before it was ready", 1, SECS(10));
    run.wait_stdout("left ", 1, SECS(5));
    let left: i32 = run
        .stdout()
        .split("left ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the leftover's pid");
    let deadline = std::time::Instant::now() + SECS(5);
    while exists(left) {
        assert!(
            std::time::Instant::now() < deadline,
            "the replacement's leftover {left} is still running:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The old worker kept serving.
    get_json(port).expect("the old worker serves");
}

#[test]
fn the_port_in_use_fails_at_once_with_code_3() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut run = socket_pool(2, port, &[], &["node", HELLO], &[]);
    assert_eq!(run.exit_code(SECS(5)), 3);
    let err = run.stderr();
    assert!(
        err.contains(&format!("127.0.0.1:{port}")) && err.contains("in use"),
        "{err}"
    );
    assert!(!err.contains("started, pid"), "{err}");
}

#[test]
fn socket_mode_works_on_a_read_only_root() {
    require("unshare");
    let port = free_port();
    // Every mount read-only (/, /tmp, /dev/shm...), then corepool with a Node pool.
    let script = format!(
        "mount --make-rprivate / && for m in $(awk '{{print $2}}' /proc/mounts | sort -u); do \
           mount -o remount,bind,ro \"$m\" 2>/dev/null; done; \
         if touch /corepool-probe 2>/dev/null || touch /tmp/corepool-probe 2>/dev/null || touch /dev/shm/corepool-probe 2>/dev/null; \
         then echo WRITABLE; exit 99; fi; \
         exec {} -i 2 --balance socket --host 127.0.0.1 -p {port} -- node {HELLO}",
        bin()
    );
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--fork",
        "--kill-child=SIGTERM",
        "sh",
        "-c",
        &script,
    ]);
    let run = Run::from_command(cmd, &[]);
    run.wait_for("two ready workers", SECS(15), |o, e| {
        o.contains("WRITABLE") || e.matches(" ready (pid").count() >= 2
    });
    assert!(
        !run.stdout().contains("WRITABLE"),
        "the test could not make the root read-only"
    );
    for _ in 0..10 {
        get_json(port).expect("served from a read-only root");
    }
}
