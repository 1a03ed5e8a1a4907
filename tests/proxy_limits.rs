//! Proxy mode's bounds, against the real binary at a low descriptor limit: idle clients past
//! `--max-connections` wait in the backlog while `/healthz`, worker restarts and new requests
//! keep working; `--idle-timeout` closes idle clients; a worker closing its side frees every
//! descriptor corepool held for the connection; corepool raises its own `RLIMIT_NOFILE` and its
//! workers keep the one it was given.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// A Node TCP server on $PORT. `MODE=echo` (default): echoes whatever comes and never closes
/// a connection itself. `MODE=bye`: writes "bye\n" to each connection and ends it at once.
const SERVER: &str = r#"
const net = require('net');
const bye = process.env.MODE === 'bye';
const s = net.createServer((c) => {
  c.on('error', () => {});
  if (bye) { c.end('bye\n'); return; }
  c.on('data', (d) => c.write(d));
});
s.listen(Number(process.env.PORT), process.env.HOSTNAME);
process.on('SIGTERM', () => process.exit(0));
"#;

fn server() -> String {
    scratch_file("proxy-limits", "server.js", SERVER)
        .to_string_lossy()
        .into_owned()
}

/// corepool with RLIMIT_NOFILE set to (soft, hard) before exec, as `prlimit --nofile` would.
fn start_with_nofile(soft: u64, hard: u64, args: &[String], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    limit_nofile(&mut cmd, soft, hard);
    Run::from_command(cmd, env)
}

fn proxy_args(workers: usize, port: u16, extra: &[&str], command: &[&str]) -> Vec<String> {
    let mut args = pool_args(
        workers,
        "proxy",
        &port.to_string(),
        &["--log-format", "prefix"],
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push("--".into());
    args.extend(command.iter().map(|a| a.to_string()));
    args
}

/// [`proxy_args`] for `workers` workers of [`server`], with /metrics on a port of its own and
/// no idle timeout: (args, public port, metrics port).
fn metered_pool_args(workers: usize) -> (Vec<String>, u16, u16) {
    let server = server();
    let (port, metrics_port) = (free_port(), free_port());
    let metrics = format!("127.0.0.1:{metrics_port}");
    let args = proxy_args(
        workers,
        port,
        &["--metrics", &metrics, "--idle-timeout", "off"],
        &["node", &server],
    );
    (args, port, metrics_port)
}

/// The value of an unlabelled sample in corepool's /metrics, or why there is none.
fn metric(metrics_port: u16, name: &str) -> Result<u64, String> {
    let text = get_ok(metrics_port, "/metrics")?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| format!("no {name} in {text}"))
}

/// Waits until `metric` equals `want`; panics with the last reading and corepool's log.
fn wait_metric(run: &Run, metrics_port: u16, name: &str, want: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let got = metric(metrics_port, name);
        if got == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: wanted {want}, last {got:?}\n--- stderr:\n{}",
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// "Max open files" of /proc/PID/limits: (soft, hard).
fn nofile_of(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

fn echo(stream: &mut TcpStream, text: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(text).map_err(|e| format!("write: {e}"))?;
    let mut got = vec![0u8; text.len()];
    stream
        .read_exact(&mut got)
        .map_err(|e| format!("read: {e}"))?;
    Ok(got)
}

/// 100 idle clients against corepool at 256 descriptors (soft = hard, so it cannot raise
/// them): without a limit they took every descriptor (six each) and corepool stopped
/// answering /healthz and could not restart a killed worker ("Too many open files"). With the
/// default limit ((256 - 64 - 8 x 2) / 6 = 29) the rest wait in the backlog, health and restarts
/// work, and a request sent meanwhile is served once the idle clients leave.
#[test]
fn idle_clients_at_a_low_descriptor_limit_leave_health_restarts_and_service() {
    require("node");
    let (args, port, metrics_port) = metered_pool_args(2);
    let run = start_with_nofile(256, 256, &args, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    assert!(
        run.stderr().contains("at most 29 connections at once"),
        "{}",
        run.stderr()
    );

    let idle: Vec<TcpStream> = (0..100)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("client {i}: {e}"))
        })
        .collect();
    // Synchronise: the relays have taken what they can (29 with the limit; before it, every
    // descriptor, with /metrics failing too).
    let deadline = Instant::now() + SECS(10);
    while metric(metrics_port, "corepool_proxy_connections_open").is_ok_and(|n| n < 29) {
        assert!(Instant::now() < deadline, "{}", run.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(get_ok(metrics_port, "/healthz"), Ok("ok\n".into()));
    assert_eq!(
        metric(metrics_port, "corepool_proxy_connections_open"),
        Ok(29)
    );
    assert!(metric(metrics_port, "corepool_proxy_max_connections_reached_total").unwrap() >= 1);

    // A request sent now waits in the backlog behind the idle clients.
    let mut late = TcpStream::connect(("127.0.0.1", port)).unwrap();
    late.set_read_timeout(Some(SECS(20))).unwrap();
    late.write_all(b"late\n").unwrap();

    // A killed worker comes back (its pipes and probe need descriptors).
    let victim = started_pids(&run.stderr())[0];
    // SAFETY: kill(2) on a worker pid corepool reported.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    run.wait_stderr(" ready (pid", 3, SECS(20));
    assert_eq!(get_ok(metrics_port, "/healthz"), Ok("ok\n".into()));

    // The idle clients leave: the late request is served, and so is a new one.
    drop(idle);
    let mut answer = [0u8; 5];
    late.read_exact(&mut answer)
        .unwrap_or_else(|e| panic!("late request not served: {e}\n{}", run.stderr()));
    assert_eq!(&answer, b"late\n");
    let mut fresh = TcpStream::connect(("127.0.0.1", port)).unwrap();
    fresh.set_read_timeout(Some(SECS(10))).unwrap();
    assert_eq!(echo(&mut fresh, b"fresh\n"), Ok(b"fresh\n".to_vec()));
    drop((late, fresh));
    wait_metric(
        &run,
        metrics_port,
        "corepool_proxy_connections_open",
        0,
        SECS(10),
    );
    let log = run.stderr();
    assert!(!log.contains("Too many open files"), "{log}");
    assert!(log.contains("--max-connections"), "{log}");
}

/// `--idle-timeout 1s`: clients that send nothing are closed after about a second, while a
/// client that keeps talking (a byte every 300 ms, for 3 s) is not.
#[test]
fn idle_clients_are_closed_after_the_idle_timeout() {
    require("node");
    let server = server();
    let port = free_port();
    let args = proxy_args(1, port, &["--idle-timeout", "1s"], &["node", &server]);
    let run = Run::start(&args, &[]);
    run.wait_stderr(" ready (pid", 1, SECS(20));
    assert!(
        run.stderr().contains("idle ones closed after 1s"),
        "{}",
        run.stderr()
    );

    let started = Instant::now();
    let idle: Vec<TcpStream> = (0..10)
        .map(|_| {
            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(SECS(10))).unwrap();
            s
        })
        .collect();
    let mut talker = TcpStream::connect(("127.0.0.1", port)).unwrap();
    talker.set_read_timeout(Some(SECS(5))).unwrap();
    let mut last_echo = Instant::now();
    for i in 0..10u8 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(300));
        }
        assert_eq!(
            echo(&mut talker, &[b'a' + i]),
            Ok(vec![b'a' + i]),
            "a talking client was cut at {:?}",
            started.elapsed()
        );
        last_echo = Instant::now();
    }
    for (i, mut s) in idle.into_iter().enumerate() {
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!(
                "idle client {i} not closed ({other:?}) after {:?}\n{}",
                started.elapsed(),
                run.stderr()
            ),
        }
    }
    // The talker falls silent: closed in turn, a second after its last byte.
    let mut buf = [0u8; 16];
    assert!(matches!(talker.read(&mut buf), Ok(0)));
    let waited = last_echo.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < SECS(5),
        "closed {waited:?} after the last byte"
    );
}

/// A worker that ends every connection at once ("bye" and FIN), with clients that stay,
/// neither reading further nor closing: corepool must release each relay when the worker
/// closes, client socket included, and its descriptor count must come back to where it was.
/// Before, each such client kept 4 descriptors in corepool (two sockets, a pipe) until it left,
/// and the open-connections gauge kept counting them.
#[test]
fn a_worker_closing_its_side_frees_corepools_descriptors() {
    require("node");
    let (args, port, metrics_port) = metered_pool_args(1);
    let run = Run::start(&args, &[("MODE", "bye")]);
    run.wait_stderr(" ready (pid", 1, SECS(20));
    std::thread::sleep(Duration::from_millis(200));
    let before = open_fds(run.pid());

    let clients: Vec<TcpStream> = (0..50)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(SECS(10))).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got)
                .unwrap_or_else(|e| panic!("client {i}: {e}"));
            assert_eq!(got, b"bye\n", "client {i}");
            s
        })
        .collect();
    // Every client has seen the worker's end of stream; corepool must hold nothing for them.
    let deadline = Instant::now() + SECS(5);
    let mut now = open_fds(run.pid());
    while now > before + 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        now = open_fds(run.pid());
    }
    assert!(
        now <= before + 2,
        "corepool holds {now} descriptors with 50 clients the worker closed, {before} before"
    );
    wait_metric(
        &run,
        metrics_port,
        "corepool_proxy_connections_open",
        0,
        SECS(2),
    );
    drop(clients);
}

/// corepool raises its soft descriptor limit to the hard one; a worker sees the soft limit
/// corepool was started with.
#[test]
fn workers_keep_the_soft_descriptor_limit_corepool_raises_its_own() {
    let hard = nofile_of(std::process::id() as i32).1.min(4096);
    assert!(
        hard > 256,
        "this test needs a hard limit above 256, have {hard}"
    );
    let args: Vec<String> = [
        "-i",
        "1",
        "--",
        "sh",
        "-c",
        "echo \"nofile $(ulimit -n) $(ulimit -Hn)\"; exec sleep 1000",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let run = start_with_nofile(256, hard, &args, &[]);
    run.wait_stdout("nofile ", 1, SECS(10));
    assert!(
        run.stdout().contains(&format!("nofile 256 {hard}\n")),
        "worker: {}",
        run.stdout()
    );
    assert_eq!(nofile_of(run.pid()), (hard, hard), "corepool's own limits");
    let worker = started_pids(&run.stderr())[0];
    assert_eq!(nofile_of(worker), (256, hard), "the worker's limits");
    assert!(
        run.stderr()
            .contains(&format!("descriptor limit raised from 256 to {hard}")),
        "{}",
        run.stderr()
    );
}

/// `clients` idle clients connected to `port`: the relays take `open` of them and no more
/// (the rest wait in the backlog), and corepool stays healthy.
fn hold_idle_at_the_limit(
    run: &Run,
    metrics_port: u16,
    port: u16,
    clients: usize,
    open: u64,
) -> Vec<TcpStream> {
    let idle: Vec<TcpStream> = (0..clients)
        .map(|i| {
            TcpStream::connect(("127.0.0.1", port)).unwrap_or_else(|e| panic!("client {i}: {e}"))
        })
        .collect();
    wait_metric(
        run,
        metrics_port,
        "corepool_proxy_connections_open",
        open,
        SECS(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        metric(metrics_port, "corepool_proxy_connections_open"),
        Ok(open)
    );
    assert_eq!(get_ok(metrics_port, "/healthz"), Ok("ok\n".into()));
    idle
}

/// `--max-connections auto` follows the worker count: at 256 descriptors, 2 workers leave
/// (256 - 64 - 8 x 2) / 6 = 29 relays and 8 workers (256 - 64 - 8 x 8) / 6 = 21. Before, a
/// scale kept 29, and the relays could take the descriptors the new workers' pipes need.
#[test]
fn the_automatic_connection_limit_follows_a_scale() {
    require("node");
    let control = control_name("relay-budget");
    let (args, port, metrics_port) = metered_pool_args(2);
    let run = start_with_nofile(256, 256, &args, &[("COREPOOL_CONTROL", &control)]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    assert_eq!(
        metric(metrics_port, "corepool_proxy_max_connections"),
        Ok(29)
    );

    let (code, out, err) = control_client(&control, &["scale", "8"]);
    assert_eq!(code, 0, "{out}{err}");
    run.wait_stderr(" ready (pid", 8, SECS(30));
    run.wait_stderr("proxy: at most 21 connections at once now", 1, SECS(10));
    assert_eq!(
        metric(metrics_port, "corepool_proxy_max_connections"),
        Ok(21)
    );
    // 40 idle clients: 21 relayed, the rest wait in the backlog; corepool stays healthy.
    let idle = hold_idle_at_the_limit(&run, metrics_port, port, 40, 21);

    // Back to 2 workers: 29 again, and the waiting clients get relays at once.
    let (code, out, err) = control_client(&control, &["scale", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    run.wait_stderr("proxy: at most 29 connections at once now", 1, SECS(10));
    assert_eq!(
        metric(metrics_port, "corepool_proxy_max_connections"),
        Ok(29)
    );
    drop(idle);
    wait_metric(
        &run,
        metrics_port,
        "corepool_proxy_connections_open",
        0,
        SECS(20),
    );
    let mut fresh = TcpStream::connect(("127.0.0.1", port)).unwrap();
    fresh.set_read_timeout(Some(SECS(10))).unwrap();
    assert_eq!(echo(&mut fresh, b"fresh\n"), Ok(b"fresh\n".to_vec()));
    assert!(
        !run.stderr().contains("Too many open files"),
        "{}",
        run.stderr()
    );
}

/// Two proxy pools at 256 descriptors share them: (256 - 64 - 8 x 4) / 6 = 26 relays, 13 each.
/// Before, each pool counted only its own workers and took 29: 58 relays, 348 descriptors.
#[test]
fn proxy_pools_share_the_descriptor_budget() {
    require("node");
    let server = server();
    let dir = scratch("proxy-limits-pools");
    let (a, b, metrics_port) = (free_port(), free_port(), free_port());
    let file = dir.join("corepool.toml");
    std::fs::write(
        &file,
        format!(
            "host = \"127.0.0.1\"\nbalance = \"proxy\"\nidle_timeout = \"off\"\n\
             metrics = \"127.0.0.1:{metrics_port}\"\n\n\
             [pool.a]\ncommand = [\"node\", \"{server}\"]\ninstances = 2\nport = {a}\n\n\
             [pool.b]\ncommand = [\"node\", \"{server}\"]\ninstances = 2\nport = {b}\n"
        ),
    )
    .unwrap();
    let args = vec!["-c".to_string(), file.display().to_string()];
    let run = start_with_nofile(256, 256, &args, &[("COREPOOL_BALANCE", "proxy")]);
    run.wait_stderr(" ready (pid", 4, SECS(20));
    run.wait_stderr("at most 13 connections at once", 2, SECS(5));
    assert!(
        run.stderr().contains("the rest split among 2 proxy pools"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        metric(metrics_port, "corepool_proxy_max_connections"),
        Ok(26)
    );
    // 30 idle clients on one pool: it relays 13, corepool stays healthy and the other pool
    // still serves.
    let idle = hold_idle_at_the_limit(&run, metrics_port, a, 30, 13);
    let mut other = TcpStream::connect(("127.0.0.1", b)).unwrap();
    other.set_read_timeout(Some(SECS(10))).unwrap();
    assert_eq!(echo(&mut other, b"other\n"), Ok(b"other\n".to_vec()));
    drop((idle, other));
    assert!(
        !run.stderr().contains("Too many open files"),
        "{}",
        run.stderr()
    );
}
