//! Neighbours: a pool shares its machine, its network namespace (a pod's containers) or its
//! /tmp with other processes, other pools among them. Two pools in one network namespace both
//! start and serve; a second pool on a port already served fails with code 3 instead of
//! joining the first's SO_REUSEPORT group; a stranger that joins the group anyway is reported
//! and fails /readyz; the preload file written for an old Node is private, never written
//! through a planted symlink, and removed only by the pool that wrote it.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

/// Runs `f` on a thread that has entered the network namespace of process `pid`.
fn in_netns<T: Send + 'static>(pid: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).expect("open the netns");
        // SAFETY: setns on a descriptor we own; CLONE_NEWNET changes only this thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace")
}

/// The children of process `pid`.
fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// SIGTERM to the corepool under `unshare` process `unshare` (unshare ignores SIGTERM itself).
fn stop_under(unshare: i32) {
    let pids = children(unshare);
    assert_eq!(
        pids.len(),
        1,
        "one corepool under unshare {unshare}: {pids:?}"
    );
    // SAFETY: kill(2) on the corepool we started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGTERM) }, 0);
}

/// Two containers of a pod: one network namespace, each corepool PID 1 of its own pid
/// namespace. Their sd_notify sockets used to be both `@corepool-1-notify`: the second pool
/// exited 3, blaming the (free) public port.
#[test]
fn two_pools_in_one_network_namespace_both_serve() {
    require("unshare");
    require("ip");
    // A fresh network namespace: these ports are free in it whatever the host runs.
    // One worker on 3000, two on 3001: `corepool status` tells the pools apart.
    let pool = |port: u16| {
        format!(
            "unshare --pid --fork --mount-proc --kill-child=SIGTERM {} -i {} --balance socket \
             --host 127.0.0.1 -p {port} -- node {HELLO} & ",
            bin(),
            port - 2999
        )
    };
    let script = format!(
        "ip link set lo up || exit 99; {}{} \
         echo netns $$; wait",
        pool(3000),
        pool(3001)
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--fork",
        "--kill-child=SIGTERM",
        "sh",
        "-c",
        &script,
    ]);
    let mut run = Run::from_command(cmd, &[]);
    run.wait_for("both pools ready", SECS(20), |_, e| {
        e.matches(" ready (pid").count() >= 3 || e.contains("exiting with code")
    });
    let err = run.stderr();
    assert!(!err.contains("exiting with code"), "a pool died:\n{err}");
    let netns: i32 = run
        .stdout()
        .split("netns ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("the namespace's shell pid");
    let answers = in_netns(netns, || {
        [3000, 3001].map(|port| get_json(port).map(|v| v["worker"].to_string()))
    });
    for (port, answer) in [3000, 3001].iter().zip(answers) {
        answer.unwrap_or_else(|e| panic!("the pool on port {port} does not serve: {e}"));
    }
    // Each pool has its control socket, and `corepool status` run in a container (its pid and
    // network namespaces, as `docker exec` does) reaches that container's pool.
    assert!(!err.contains("control socket"), "{err}");
    let mut workers: Vec<usize> = children(netns)
        .into_iter()
        .map(|unshare| {
            let corepool = children(unshare)[0];
            let out = Command::new("nsenter")
                .args(["-t", &corepool.to_string(), "-p", "-n", "--", bin()])
                .args(["status", "--json"])
                .output()
                .expect("nsenter");
            assert!(out.status.success(), "{out:?}");
            let status: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("status JSON");
            status["workers"].as_array().expect("workers").len()
        })
        .collect();
    workers.sort();
    assert_eq!(workers, [1, 2], "each exec reaches its own pool");
    for unshare in children(netns) {
        stop_under(unshare);
    }
    run.wait_exit(SECS(15));
    let err = run.stderr();
    assert_eq!(err.matches("exiting with code 0").count(), 2, "{err}");
}

/// A listener that is not the pool's on the public port: a second corepool is refused (exit 3,
/// naming --port) instead of joining the group and, with its eBPF program, taking every
/// connection; a process of the same user that joins anyway (SO_REUSEPORT) is reported once
/// and fails /readyz until it leaves.
#[test]
fn the_public_port_stays_the_pools_alone() {
    the_public_port_stays_the_pools_alone_in("socket");
}

/// The same in proxy mode, whose relay threads accept on a group of SO_REUSEPORT sockets of
/// their own (one per CPU): a stranger joining it would take connections from the relays.
#[test]
fn the_public_port_stays_the_relays_alone() {
    let cpus = std::thread::available_parallelism().unwrap().get();
    assert!(
        cpus >= 2,
        "this test needs 2 CPUs (one relay thread per CPU makes the group); found {cpus}"
    );
    the_public_port_stays_the_pools_alone_in("proxy");
}

fn the_public_port_stays_the_pools_alone_in(mode: &str) {
    require("python3");
    let port = free_port();
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    let args = pool_args(
        2,
        mode,
        &port.to_string(),
        &["--metrics", &metrics_addr, "--", "node", HELLO],
    );
    let first = Run::start(&args, &[]);
    first.wait_stderr(" ready (pid", 2, SECS(15));
    assert_eq!(http(metrics, "GET", "/readyz").unwrap().0, 200);

    let mut second = Run::start(
        &pool_args(2, mode, &port.to_string(), &["--", "node", HELLO]),
        &[],
    );
    assert_eq!(second.exit_code(SECS(10)), 3, "{}", second.stderr());
    let err = second.stderr();
    assert!(
        err.contains(&format!("127.0.0.1:{port} (--host/--port)"))
            && err.contains(&format!("port {port} is in use")),
        "{err}"
    );
    assert!(!err.contains("started, pid"), "{err}");
    for _ in 0..20 {
        get_json(port).expect("the first pool keeps serving");
    }

    let mut stranger = join_port(port);
    first.wait_stderr("listening socket(s) not corepool's", 1, SECS(10));
    let err = first.stderr();
    assert!(
        err.contains(&format!("pid {} (python3)", stranger.id())),
        "the warning names the holder: {err}"
    );
    let (code, body) = http(metrics, "GET", "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(&format!("port {port} is shared")), "{body}");

    drop(stranger.stdin.take());
    stranger.wait().unwrap();
    first.wait_stderr("foreign listening sockets are gone", 1, SECS(10));
    assert_eq!(http(metrics, "GET", "/readyz").unwrap().0, 200);
    assert_eq!(
        first.stderr().matches("not corepool's").count(),
        1,
        "one warning, not one per check: {}",
        first.stderr()
    );
}

/// A python3 process of the same user that joins `port` on 127.0.0.1 with SO_REUSEPORT, as a
/// stranger to the pool would, once it says it listens. It leaves when its stdin is closed.
fn join_port(port: u16) -> std::process::Child {
    let joiner = format!(
        "import socket, sys, time\n\
         s = socket.socket()\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n\
         s.bind(('127.0.0.1', {port}))\n\
         s.listen(16)\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut stranger = Command::new("python3")
        .args(["-c", &joiner])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(stranger.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "the stranger could not join the port");
    stranger
}

/// Two pools, a stranger on each one's port: /readyz fails while either is there. The first
/// to leave must not clear the other's report (each port's watch answers for its own port).
/// (Both in proxy mode, whose relay threads make an SO_REUSEPORT group on 2 CPUs; socket
/// mode's watch is the same code, tested alone above.)
#[test]
fn a_stranger_on_either_pools_port_fails_readyz_until_it_leaves() {
    require("python3");
    let (web, api, metrics) = (free_port(), free_port(), free_port());
    let config = scratch_file(
        "two-strangers",
        "corepool.toml",
        &format!(
            "host = \"127.0.0.1\"\nmetrics = \"127.0.0.1:{metrics}\"\n\n\
             [pool.web]\ncommand = [\"node\", \"{HELLO}\"]\ninstances = 2\nbalance = \"proxy\"\n\
             port = {web}\nmax_connections = 100\n\n\
             [pool.api]\ncommand = [\"node\", \"{HELLO}\"]\ninstances = 2\nbalance = \"proxy\"\n\
             port = {api}\nmax_connections = 200\n"
        ),
    );
    let mut run = Run::start(&["--config", config.to_str().unwrap()], &[]);
    run.wait_stderr(" ready (pid", 4, SECS(20));
    assert_eq!(http(metrics, "GET", "/readyz").unwrap().0, 200);
    // Each pool has a connection limit of its own: /metrics reports what they hold together.
    let scraped = get_ok(metrics, "/metrics").unwrap();
    assert!(
        scraped
            .lines()
            .any(|l| l == "corepool_proxy_max_connections 300"),
        "{}",
        scraped
            .lines()
            .filter(|l| l.contains("max_connections"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let mut on_web = join_port(web);
    let mut on_api = join_port(api);
    run.wait_stderr("listening socket(s) not corepool's", 2, SECS(10));
    let (code, body) = http(metrics, "GET", "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains(&format!("port {web} is shared"))
            && body.contains(&format!("port {api} is shared")),
        "{body}"
    );

    drop(on_api.stdin.take());
    on_api.wait().unwrap();
    run.wait_stderr("foreign listening sockets are gone", 1, SECS(10));
    let (code, body) = http(metrics, "GET", "/readyz").unwrap();
    assert_eq!(code, 503, "the stranger on {web} is still there: {body}");
    assert!(body.contains(&format!("port {web} is shared")), "{body}");
    assert!(!body.contains(&format!("port {api} is shared")), "{body}");

    drop(on_web.stdin.take());
    on_web.wait().unwrap();
    run.wait_stderr("foreign listening sockets are gone", 2, SECS(10));
    assert_eq!(http(metrics, "GET", "/readyz").unwrap().0, 200);
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}

/// corepool as PID 1 of a pid namespace, with COREPOOL_RUNTIME_DIR, running `rest`.
fn pid1_pool(runtime: &std::path::Path, args: &[String]) -> Run {
    let mut cmd = as_pid1();
    cmd.args(args);
    Run::from_command(cmd, &[("COREPOOL_RUNTIME_DIR", runtime.to_str().unwrap())])
}

/// The preload is a file (Node 18.17 has no `--import` to take it otherwise). Its name used to be fixed for a PID 1
/// (`corepool-preload-1.cjs`) and written with a plain write: a symlink planted there made
/// corepool overwrite the file it points to, and a second pool that failed to start removed
/// the first's file. Now: a private directory of a random name, never a planted name.
#[test]
fn an_old_nodes_preload_file_is_private_and_only_its_own_is_removed() {
    require("unshare");
    let node = fixture(
        "tests/fixtures/nodes/fetch.sh",
        &[
            "18.17.1",
            concat!(env!("CARGO_MANIFEST_DIR"), "/target/nodes"),
        ],
    );
    let runtime = scratch("preload-runtime");
    let victim = scratch("preload-victim").join("precious");
    std::fs::write(&victim, "precious").unwrap();
    let planted = runtime.join("corepool-preload-1.cjs");
    std::os::unix::fs::symlink(&victim, &planted).unwrap();

    let port = free_port();
    let args = socket_args(2, port, &["--", &node, HELLO]);
    let mut first = pid1_pool(&runtime, &args);
    first.wait_stderr(" ready (pid", 2, SECS(20));
    let err = first.stderr();
    let file = err
        .split("Node preload via --require ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| panic!("no --require preload in the log:\n{err}"));
    assert!(
        err.contains(&format!("{} (removed at exit)", file.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(planted.is_symlink(), "the planted symlink is left alone");
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = file.parent().unwrap();
    assert_eq!(dir.parent().unwrap(), runtime);
    let (dir_meta, file_meta) = (
        std::fs::symlink_metadata(dir).unwrap(),
        std::fs::symlink_metadata(&file).unwrap(),
    );
    assert!(dir_meta.is_dir() && file_meta.is_file());
    assert_eq!(dir_meta.permissions().mode() & 0o7777, 0o711);
    assert_eq!(file_meta.permissions().mode() & 0o7777, 0o644);
    // SAFETY: geteuid has no memory effects.
    let me = unsafe { libc::geteuid() };
    assert_eq!((dir_meta.uid(), file_meta.uid()), (me, me));
    get_json(port).expect("the old Node adopts the socket");

    // A second pool, PID 1 too, fails to start (the port is the first's): its own preload goes,
    // the first's stays.
    let mut second = pid1_pool(&runtime, &args);
    assert_eq!(second.exit_code(SECS(15)), 3, "{}", second.stderr());
    assert!(
        file.is_file(),
        "the second pool removed the first's preload"
    );
    let entries = std::fs::read_dir(&runtime).unwrap().count();
    assert_eq!(entries, 2, "the first's directory and the planted symlink");
    get_json(port).expect("the first pool keeps serving");

    stop_under(first.pid());
    assert_eq!(first.exit_code(SECS(15)), 0, "{}", first.stderr());
    assert!(!dir.exists(), "the preload directory is removed at exit");
    assert!(planted.is_symlink(), "what corepool did not create stays");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
}
