//! The metrics and control listeners cannot be turned against the pool: idle connections under
//! a low descriptor limit lock out neither /healthz nor a worker restart, and are closed after
//! the request timeout; a refused uid is disconnected at once; the client trusts only a server
//! of root or its own user; a /metrics flood does not keep the supervisor's thread busy; many
//! reload requests at once all get a truthful answer and are coalesced. A start that fails for
//! corepool's own lack of processes (a real pids cgroup) is retried, not counted as a crash.

mod common;

use common::*;
use std::io::Read;
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");
const NOBODY: u32 = 65534;

/// corepool with `-i 2` hello servers, --metrics on `mport`, a descriptor limit if asked.
fn pool(port: u16, mport: u16, control: &str, nofile: Option<u64>, extra: &[&str]) -> Run {
    let metrics = format!("127.0.0.1:{mport}");
    let mut cmd = Command::new(bin());
    cmd.args(socket_args(2, port, &["--metrics", &metrics]))
        .args(extra)
        .args(["--", "node", HELLO]);
    if let Some(limit) = nofile {
        limit_nofile(&mut cmd, limit, limit);
    }
    Run::from_command(cmd, &[("COREPOOL_CONTROL", control)])
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether the server closed this connection (EOF or reset), without waiting.
fn closed_by_server(stream: &mut impl Read, set_nonblocking: impl FnOnce()) -> bool {
    set_nonblocking();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

fn control_addr(name: &str) -> SocketAddr {
    SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
}

/// Waits until every stream is closed by the server; panics with how many are still open.
fn all_closed_within<S>(streams: &mut [S], within: Duration, is_closed: impl Fn(&mut S) -> bool) {
    let deadline = Instant::now() + within;
    let mut open: Vec<&mut S> = streams.iter_mut().collect();
    while !open.is_empty() {
        open.retain_mut(|s| !is_closed(s));
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} connections still open after {within:?}",
            open.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn idle_connections_starve_neither_probes_nor_restarts() {
    let (port, mport) = (free_port(), free_port());
    let control = control_name("idle");
    // About 40 descriptors in use at rest; the bounded listeners need at most 80 more.
    let limit = 160;
    let run = pool(port, mport, &control, Some(limit), &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));

    // Idle clients: connected, never a byte sent.
    let mut idle_tcp = Vec::new();
    for _ in 0..300 {
        if let Ok(s) = TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], mport)),
            Duration::from_millis(500),
        ) {
            idle_tcp.push(s);
        }
    }
    let mut idle_unix = Vec::new();
    for _ in 0..40 {
        idle_unix.push(UnixStream::connect_addr(&control_addr(&control)).expect("connect control"));
    }
    let held_at = Instant::now();
    assert!(idle_tcp.len() >= 250, "only {} connects", idle_tcp.len());

    // Probes answer, every one of them.
    for i in 0..10 {
        let start = Instant::now();
        let got = http(mport, "GET", "/healthz");
        assert!(
            matches!(got, Ok((200, _))),
            "/healthz {i} with idle connections held: {got:?}\n{}",
            run.stderr()
        );
        assert!(
            start.elapsed() < SECS(2),
            "/healthz {i} took {:?}",
            start.elapsed()
        );
    }
    let fds = open_fds(run.pid());
    assert!(
        fds < limit as usize - 16,
        "{fds} descriptors open of {limit}"
    );

    // A killed worker comes back, not counted as a failure of the app.
    let pids = started_pids(&run.stderr());
    // SAFETY: kill(2) on a worker of our corepool.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    run.wait_stderr(" started, pid ", 3, SECS(15));
    run.wait_stderr(" ready (pid", 3, SECS(20));
    let err = run.stderr();
    assert!(!err.contains("cannot start"), "{err}");
    assert!(!err.contains("given up"), "{err}");

    // The idle clients are disconnected after the request timeouts (metrics 5 s; control 2 s,
    // 16 at a time, so 40 take three rounds).
    all_closed_within(
        &mut idle_tcp,
        SECS(9).saturating_sub(held_at.elapsed()),
        |s| {
            let c = s.try_clone().unwrap();
            closed_by_server(s, move || c.set_nonblocking(true).unwrap())
        },
    );
    all_closed_within(
        &mut idle_unix,
        SECS(12).saturating_sub(held_at.elapsed()),
        |s| {
            let c = s.try_clone().unwrap();
            closed_by_server(s, move || c.set_nonblocking(true).unwrap())
        },
    );
    assert!(matches!(http(mport, "GET", "/healthz"), Ok((200, _))));
}

/// A perl program (run as nobody): connects to the abstract `name` without sending anything
/// and prints how many ms passed until the server closed, then what it said.
const HOLD: &str = r#"
use Socket; use Time::HiRes qw(time);
socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
connect($s, pack_sockaddr_un("\0" . $ARGV[0])) or die "connect: $!";
my ($t0, $got, $rin) = (time, '', '');
vec($rin, fileno($s), 1) = 1;
while (1) {
    my $left = 8 - (time - $t0);
    if ($left <= 0) { print "still-open $got\n"; exit 0 }
    select(my $r = $rin, undef, undef, $left) or next;
    my $n = sysread($s, my $buf, 256);
    if (!$n) { printf "%d %s\n", (time - $t0) * 1000, $got; exit 0 }
    $got .= $buf;
}
"#;

#[test]
fn a_refused_uid_is_disconnected_at_once() {
    let (port, mport) = (free_port(), free_port());
    let control = control_name("refused");
    let run = pool(port, mport, &control, None, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    require("perl");
    let out = Command::new("perl")
        .args(["-e", HOLD, &control])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let (ms, said) = text.trim().split_once(' ').unwrap_or(("", ""));
    let ms: u64 = ms.parse().unwrap_or_else(|_| {
        panic!(
            "not closed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(ms < 1000, "a refused client was held {ms} ms");
    assert!(said.contains("permission denied"), "{said}");
    // The client as nobody gets the refusal too, not a broken pipe.
    let out = Command::new(bin())
        .arg("status")
        .env("COREPOOL_CONTROL", &control)
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    run.wait_stderr("control socket: refused a client of uid 65534", 1, SECS(5));
}

#[test]
fn the_client_trusts_only_root_or_its_own_user() {
    // Someone else (nobody) holds the name and answers like a pool would.
    let name = control_name("impostor");
    require("perl");
    let fake = r#"
use Socket; $| = 1; alarm 20; $SIG{PIPE} = "IGNORE";
socket(my $s, AF_UNIX, SOCK_STREAM, 0) or die "socket: $!";
bind($s, pack_sockaddr_un("\0" . $ARGV[0])) or die "bind: $!";
listen($s, 5) or die "listen: $!";
print "ready\n";
while (accept(my $c, $s)) { print $c qq({"balance":"socket","workers":[]}\n); close $c }
"#;
    let mut server = Command::new("perl")
        .args(["-e", fake, &name])
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = [0u8; 6];
    server.stdout.take().unwrap().read_exact(&mut line).unwrap();
    assert_eq!(&line, b"ready\n");
    for request in ["status", "reload"] {
        let out = Command::new(bin())
            .arg(request)
            .env("COREPOOL_CONTROL", &name)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{request}: {err}");
        assert!(
            err.contains("served by uid 65534") && err.contains("not trusted"),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// utime + stime of corepool's main thread (the supervisor's), in clock ticks.
fn main_thread_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_metrics_flood_leaves_the_supervisor_free() {
    let (port, mport) = (free_port(), free_port());
    let run = pool(port, mport, &control_name("flood"), None, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    // Many processes make every /proc scan dear, as on a busy node.
    let mut sleepers: Vec<std::process::Child> = (0..300)
        .map(|_| Command::new("sleep").arg("60").spawn().unwrap())
        .collect();
    let ticks_before = main_thread_ticks(run.pid());
    let stop_at = Instant::now() + SECS(4);
    let flooders: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < stop_at && n < 20_000 {
                    if let Ok((200, _)) = http(mport, "GET", "/metrics") {
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    while Instant::now() < stop_at {
        let start = Instant::now();
        let got = http(mport, "GET", "/healthz");
        assert!(matches!(got, Ok((200, _))), "{got:?}");
        worst = worst.max(start.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let requests: u64 = flooders.into_iter().map(|t| t.join().unwrap()).sum();
    let ticks = main_thread_ticks(run.pid()) - ticks_before;
    for s in &mut sleepers {
        let _ = s.kill();
        let _ = s.wait();
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let ms_per_request = ticks as f64 * 1000.0 / hz / requests.max(1) as f64;
    eprintln!(
        "{requests} /metrics in 4 s: supervisor thread {:.3} ms CPU each; worst /healthz {worst:?}",
        ms_per_request
    );
    // CPU per request is the measure (it does not depend on how loaded the machine is); the
    // bounds on count and wall time only catch a supervisor that stopped answering, and leave
    // room for a CI box whose two cores are busy with other tests.
    assert!(requests > 100, "only {requests} /metrics answered");
    assert!(worst < Duration::from_secs(2), "/healthz took {worst:?}");
    assert!(
        ms_per_request < 1.0,
        "the supervisor's thread spent {ms_per_request:.3} ms per /metrics"
    );
}

#[test]
fn parallel_reloads_are_all_answered_and_coalesced() {
    let (port, mport) = (free_port(), free_port());
    let control = control_name("reloads");
    let run = pool(port, mport, &control, None, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    let clients = 40;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (barrier, control) = (barrier.clone(), control.clone());
            std::thread::spawn(move || {
                let mut cmd = Command::new(bin());
                cmd.arg("reload").env("COREPOOL_CONTROL", &control);
                barrier.wait();
                let out = cmd.output().unwrap();
                (
                    out.status.code(),
                    String::from_utf8_lossy(&out.stdout).into_owned()
                        + &String::from_utf8_lossy(&out.stderr),
                )
            })
        })
        .collect();
    let answers: Vec<(Option<i32>, String)> =
        threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (code, text) in &answers {
        assert_eq!(*code, Some(0), "{text}");
    }
    let started = answers
        .iter()
        .filter(|(_, t)| t.contains("rolling reload started"))
        .count();
    let merged = answers
        .iter()
        .filter(|(_, t)| t.contains("one more follows it"))
        .count();
    assert_eq!(started + merged, clients, "{answers:?}");
    // Every reload started, and the follow-ups, run to the end.
    let expected = started + usize::from(merged > 0);
    run.wait_stderr("rolling reload complete", started, SECS(60));
    std::thread::sleep(Duration::from_millis(300));
    let err = run.stderr();
    let reloads = err.matches("rolling reload of ").count();
    eprintln!("{clients} reload requests: {started} started, {merged} merged, {reloads} reloads");
    assert!(
        reloads <= 2 * started && started <= 5,
        "{clients} requests: {started} answered started, {merged} merged, {reloads} reloads \
         (expected about {expected})\n{err}"
    );
    run.wait_stderr("rolling reload complete", reloads, SECS(60));
}

/// A pids cgroup (v1) holding corepool, removed when dropped.
struct PidsCgroup(std::path::PathBuf);

impl PidsCgroup {
    fn new() -> PidsCgroup {
        let root = std::path::Path::new("/sys/fs/cgroup/pids");
        assert!(
            root.join("cgroup.procs").exists(),
            "prerequisite missing: cgroup v1 pids controller at {}",
            root.display()
        );
        let dir = root.join(format!("corepool-test-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        PidsCgroup(dir)
    }

    fn write(&self, file: &str, value: &str) {
        std::fs::write(self.0.join(file), value)
            .unwrap_or_else(|e| panic!("write {value} to {}: {e}", self.0.join(file).display()));
    }

    fn current(&self) -> String {
        std::fs::read_to_string(self.0.join("pids.current"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for PidsCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn a_start_short_of_processes_is_retried_not_counted() {
    let cgroup = PidsCgroup::new();
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--max-restarts",
            "2",
            "--restart-delay",
            "100ms",
            "--",
            "sh",
            "-c",
            "echo up; exec sleep 600",
        ],
        &[],
    );
    run.wait_stdout("up", 1, SECS(10));
    // corepool (with its threads) alone in the cgroup; not one process more.
    cgroup.write("cgroup.procs", &run.pid().to_string());
    cgroup.write("pids.max", &cgroup.current());
    let pids = started_pids(&run.stderr());
    // SAFETY: kill(2) on corepool's worker.
    unsafe { libc::kill(pids[0], libc::SIGKILL) };
    run.wait_stderr("short of resources", 4, SECS(15));
    assert!(!run.stderr().contains("given up"), "{}", run.stderr());
    cgroup.write("pids.max", "max");
    run.wait_stdout("up", 2, SECS(10));
    let err = run.stderr();
    assert!(!err.contains("given up"), "{err}");
    assert!(
        err.contains("not counted as a failure of the worker"),
        "{err}"
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}
