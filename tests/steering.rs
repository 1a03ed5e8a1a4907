//! Socket mode deals new connections to ready workers only: a slot whose worker is dead,
//! restarting or crash-looping takes none (with the eBPF steering, and without it, where its
//! socket leaves the reuseport group). See src/balance/socket/ and src/steer/.

mod common;
use common::*;
use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

/// One GET on a new connection, answered within `limit`: the body, or what went wrong.
fn get_within(port: u16, limit: Duration) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), limit)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.to_string()),
        _ => Err(format!("no 200 answer: {text:?}")),
    }
}

/// Slot 1's worker exits at once on every start while slot 0 serves: 100 requests on new
/// connections, one after another, are all answered within 2 s each (before, about half of
/// them waited in slot 1's backlog until the slot was given up, minutes later).
fn crash_looping_slot_takes_no_connection(ebpf: bool) {
    require("node");
    let server = scratch_file(
        "steer-crashloop",
        "server.js",
        "if (process.env.NODE_APP_INSTANCE === '1') process.exit(1);\n\
         require('http').createServer((q, r) => r.end(`${process.pid}\\n`))\n\
           .listen(process.env.PORT, () => console.log('serving'));\n",
    );
    let port = free_port();
    let args = socket_args(2, port, &["--", "node", server.to_str().unwrap()]);
    let run = start_pool(ebpf, &args);
    run.wait_stderr("worker 0 ready", 1, SECS(30));
    // Slot 1 has failed at least twice: it is in its crash loop.
    run.wait_for("slot 1 crash-looping", SECS(30), |_, err| {
        err.matches("worker 1 restarts in").count() >= 2
    });
    let mut slow = Vec::new();
    for i in 0..100 {
        let start = Instant::now();
        if let Err(err) = get_within(port, SECS(2)) {
            slow.push(format!("request {i}: {err} after {:?}", start.elapsed()));
        }
    }
    let stderr = run.stderr();
    assert!(
        !stderr.contains("worker 1 given up"),
        "slot 1 was given up during the test, which proves nothing:\n{stderr}"
    );
    assert!(
        slow.is_empty(),
        "{} of 100 requests not answered within 2 s:\n{}\n{stderr}",
        slow.len(),
        slow.join("\n")
    );
}

/// corepool, with the eBPF steering or (under setpriv, without the capabilities) without it.
fn start_pool(ebpf: bool, args: &[String]) -> Run {
    let cmd = if ebpf {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        cmd
    } else {
        require("setpriv");
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--inh-caps=-all",
            "--bounding-set=-bpf,-sys_admin,-net_admin",
            bin(),
        ])
        .args(args);
        cmd
    };
    let run = Run::from_command(cmd, &[]);
    let spread = if ebpf {
        "connections in turn (eBPF)"
    } else {
        "connections by the kernel's hash"
    };
    run.wait_stderr(spread, 1, SECS(30));
    run
}

/// A worker killed with SIGKILL is restarted and, once ready, takes its share again: its
/// socket, taken out of the group while the slot was empty, is back (in the eBPF map too).
fn restarted_worker_gets_connections_again(ebpf: bool) {
    require("node");
    let server = scratch_file(
        "steer-rejoin",
        "server.js",
        "require('http').createServer((q, r) => r.end(`${process.env.NODE_APP_INSTANCE} ${process.pid}\\n`))\n\
           .listen(process.env.PORT);\n",
    );
    let port = free_port();
    let args = socket_args(2, port, &["--", "node", server.to_str().unwrap()]);
    let run = start_pool(ebpf, &args);
    run.wait_stderr(" ready (pid", 2, SECS(30));
    let victim = started_pids(&run.stderr())[1];
    // SAFETY: kill(2) on a worker of this test's pool.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    // While slot 1 is away, slot 0 answers every request.
    for i in 0..20 {
        if let Err(err) = get_within(port, SECS(2)) {
            panic!("request {i} while worker 1 restarts: {err}");
        }
    }
    run.wait_stderr(" ready (pid", 3, SECS(30));
    let mut slots = std::collections::HashSet::new();
    for i in 0..30 {
        let body = get_within(port, SECS(2)).unwrap_or_else(|e| panic!("request {i}: {e}"));
        slots.insert(body.split(' ').next().unwrap().to_string());
    }
    let stderr = run.stderr();
    assert_eq!(
        slots.len(),
        2,
        "the restarted worker took no connection:\n{stderr}"
    );
    assert!(!stderr.contains("cannot "), "{stderr}");
}

#[test]
fn restarted_worker_gets_connections_again_with_ebpf() {
    restarted_worker_gets_connections_again(true);
}

#[test]
fn restarted_worker_gets_connections_again_without_ebpf() {
    restarted_worker_gets_connections_again(false);
}

#[test]
fn crash_looping_slot_takes_no_connection_with_ebpf() {
    crash_looping_slot_takes_no_connection(true);
}

#[test]
fn crash_looping_slot_takes_no_connection_without_ebpf() {
    crash_looping_slot_takes_no_connection(false);
}

/// Proxy mode: the workers' private ports lie below `net.ipv4.ip_local_port_range`, where no
/// outgoing connection (the relay opens one per client) can take them between the moment
/// corepool picks one and the moment the worker listens on it (a reload's replacement failed
/// with EADDRINUSE that way).
#[test]
fn proxy_private_ports_are_outside_the_ephemeral_range() {
    require("node");
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let start: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
    let server = scratch_file(
        "steer-private-ports",
        "server.js",
        "require('http').createServer((q, r) => r.end(`${process.env.PORT}\\n`))\n\
           .listen(process.env.PORT, process.env.HOSTNAME, () => console.log('port', process.env.PORT));\n",
    );
    let port = free_port();
    let mut run = Run::start(
        &pool_args(
            2,
            "proxy",
            &port.to_string(),
            &["--", "node", server.to_str().unwrap()],
        ),
        &[],
    );
    run.wait_stdout("port ", 2, SECS(30));
    // A reload gives each slot a new process and a new port, while the old ones still listen.
    run.wait_stderr("ready", 2, SECS(30));
    run.signal(libc::SIGHUP);
    run.wait_stdout("port ", 4, SECS(30));
    let ports: Vec<u16> = run
        .stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("port ")?.trim().parse().ok())
        .collect();
    assert_eq!(ports.len(), 4, "{}", run.stdout());
    for p in &ports {
        assert!(
            *p < start && *p != port,
            "private port {p} is inside the ephemeral range {range:?} (or the public port)"
        );
    }
    let mut unique = ports.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "a private port was given twice: {ports:?}");
    let body = get_within(port, SECS(10)).expect("the relay answers");
    assert!(ports.contains(&body.trim().parse().unwrap()), "{body}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(30)), 0, "{}", run.stderr());
}

/// Proxy mode in a network namespace whose ephemeral range is 32 ports wide, so that the
/// relay's outgoing connections reuse them constantly: five rolling reloads under load all
/// complete, no replacement failing to listen on its private port (before, a port picked by
/// binding port 0 came from that range, and an outgoing connection could take it first).
#[test]
fn proxy_reloads_under_load_with_a_narrow_ephemeral_range() {
    require("node");
    require("unshare");
    require("ip");
    let server = scratch_file(
        "steer-narrow-range",
        "server.js",
        "require('http').createServer((q, r) => r.end('ok\\n'))\n\
           .listen(process.env.PORT, process.env.HOSTNAME);\n",
    );
    let port = 8080;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "sh",
        "-c",
        "ip link set lo up && echo '40000 40031' > /proc/sys/net/ipv4/ip_local_port_range \
         && exec \"$0\" \"$@\"",
        bin(),
    ]);
    cmd.args(pool_args(
        2,
        "proxy",
        &port.to_string(),
        &["--", "node", server.to_str().unwrap()],
    ));
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(30));
    let netns = format!("/proc/{}/ns/net", run.pid());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let (netns, stop) = (netns.clone(), stop.clone());
            std::thread::spawn(move || {
                enter_netns(&netns);
                let (mut ok, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match get_within(port, SECS(5)) {
                        Ok(_) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    for n in 1..=5 {
        run.signal(libc::SIGHUP);
        run.wait_for("a reload to end", SECS(60), |_, err| {
            err.matches("rolling reload complete").count() >= n
                || err.contains("rolling reload stopped")
        });
        let stderr = run.stderr();
        assert!(
            !stderr.contains("rolling reload stopped"),
            "reload {n} stopped:\n{stderr}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = clients
        .into_iter()
        .map(|c| c.join().unwrap())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
    let stderr = run.stderr();
    assert!(ok > 100, "only {ok} requests answered:\n{stderr}");
    assert!(!stderr.contains("EADDRINUSE"), "{stderr}");
    eprintln!("{ok} requests answered, {failed} failed, 5 reloads");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(30)), 0, "{stderr}");
}

/// Where net.ipv4.tcp_migrate_req is 0 and read-only (a fresh network namespace, /proc/sys
/// mounted read-only as in a container) and no eBPF may be loaded, corepool says so, and a
/// crash-looping slot's socket still leaves the group when nothing is queued on it: 100
/// sequential requests on new connections are answered within 2 s each.
#[test]
fn crash_looping_slot_takes_no_connection_without_migration() {
    require("node");
    require("unshare");
    require("setpriv");
    require("ip");
    let server = scratch_file(
        "steer-no-migrate",
        "server.js",
        "if (process.env.NODE_APP_INSTANCE === '1') process.exit(1);\n\
         require('http').createServer((q, r) => r.end(`${process.pid}\\n`))\n\
           .listen(process.env.PORT);\n",
    );
    let port = 8080;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--mount",
        "sh",
        "-c",
        "ip link set lo up && mount --bind /proc/sys /proc/sys \
         && mount -o remount,bind,ro /proc/sys && exec setpriv --inh-caps=-all \
         --bounding-set=-bpf,-sys_admin,-net_admin \"$0\" \"$@\"",
        bin(),
    ]);
    cmd.args(socket_args(
        2,
        port,
        &["--", "node", server.to_str().unwrap()],
    ));
    let run = Run::from_command(cmd, &[]);
    run.wait_stderr("worker 0 ready", 1, SECS(30));
    let stderr = run.stderr();
    assert!(
        stderr.contains("connections by the kernel's hash")
            && stderr.contains("tcp_migrate_req is 0"),
        "{stderr}"
    );
    run.wait_for("slot 1 crash-looping", SECS(30), |_, err| {
        err.matches("worker 1 restarts in").count() >= 2
    });
    let netns = format!("/proc/{}/ns/net", run.pid());
    let slow = std::thread::spawn(move || {
        enter_netns(&netns);
        (0..100)
            .filter_map(|i| {
                get_within(port, SECS(2))
                    .err()
                    .map(|e| format!("request {i}: {e}"))
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let stderr = run.stderr();
    assert!(!stderr.contains("worker 1 given up"), "{stderr}");
    assert!(
        slow.is_empty(),
        "{} of 100 requests not answered within 2 s:\n{}\n{stderr}",
        slow.len(),
        slow.join("\n")
    );
}

/// As PID 1 the network namespace is the container's: corepool turns on
/// net.ipv4.tcp_migrate_req there (a fresh namespace starts with 0). Not as PID 1 (every
/// other test here) it leaves the host's setting alone.
#[test]
fn as_pid1_corepool_turns_on_request_migration_in_its_network_namespace() {
    migration_in_a_fresh_namespace("exec {corepool}", true);
}

/// The same as the child of a container init that is PID 1 (`podman run --init` runs
/// catatonit, `docker run --init` tini): corepool is the container's program.
#[test]
fn under_a_container_init_corepool_turns_on_request_migration() {
    require("catatonit");
    migration_in_a_fresh_namespace("exec catatonit -- {corepool}", true);
}

/// But not as the child of any other PID 1 (here a shell, as a host's init would be): the
/// namespace may be shared with others, and its setting is left alone.
#[test]
fn under_another_pid1_corepool_leaves_request_migration_alone() {
    migration_in_a_fresh_namespace("{corepool}; exit $?", false);
}

/// corepool (2 workers of hello) started by the shell line `exec_corepool` (`{corepool}`
/// standing for corepool and its arguments) in a fresh network and pid namespace, whose
/// tcp_migrate_req starts at 0: whether corepool turned it on. Without the capabilities to load
/// eBPF, whose steering program would move the queued connections itself (see
/// `a_dead_workers_queue_moves_by_the_ebpf_program`).
fn migration_in_a_fresh_namespace(exec_corepool: &str, turned_on: bool) {
    let exec_corepool = exec_corepool.replace(
        "{corepool}",
        "setpriv --inh-caps=-all --bounding-set=-bpf,-sys_admin,-net_admin \"$0\" \"$@\"",
    );
    require("node");
    require("ip");
    let hello = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child=SIGTERM",
        "sh",
        "-c",
        &format!("ip link set lo up && cat /proc/sys/net/ipv4/tcp_migrate_req && {exec_corepool}"),
        bin(),
    ]);
    cmd.args(socket_args(2, 8080, &["--", "node", hello]));
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(30));
    assert_eq!(run.stdout().lines().next(), Some("0"), "a fresh namespace");
    let said = match turned_on {
        true => "net.ipv4.tcp_migrate_req set to 1 in this network namespace",
        false => "net.ipv4.tcp_migrate_req is 0 and corepool is neither PID 1 nor a container",
    };
    assert!(run.stderr().contains(said), "{}", run.stderr());
    // unshare ignores SIGTERM: the stop goes to the namespace's PID 1 (corepool, catatonit
    // which forwards it, or the shell, which passes it to nobody: then to corepool).
    let init = children_of(run.pid());
    assert_eq!(init.len(), 1, "{init:?}");
    let target = match turned_on {
        true => init[0].0,
        false => children_of(init[0].0)[0].0,
    };
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(target, libc::SIGTERM) }, 0);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}

/// With the eBPF steering, the connections queued on a dead worker's socket go to a ready
/// worker at once, even where net.ipv4.tcp_migrate_req is 0 (a fresh network namespace;
/// corepool neither PID 1 nor under a container init, so it leaves the setting alone): the
/// program is loaded to choose for migration too. Six requests wait on a worker that is busy
/// (it accepts nothing); it is killed; all are answered by the other worker, long before the
/// dead worker's slot could restart (`--restart-delay 5s`).
#[test]
fn a_dead_workers_queue_moves_by_the_ebpf_program() {
    dead_workers_queue_reaches_the_other_worker(true);
}

/// Without eBPF and without migration (the default Docker container: no CAP_BPF, /proc/sys
/// read-only), corepool accepts what is queued on the dead worker's socket and relays it to the
/// group: answered by the other worker too, not after the restart.
#[test]
fn a_dead_workers_queue_is_relayed_without_migration() {
    require("setpriv");
    dead_workers_queue_reaches_the_other_worker(false);
}

/// A Node server in `dir` that answers its pid, except /busy where `takes` (a JS expression)
/// holds: there it writes its pid to $BUSY_FILE (atomically) and spins forever, accepting
/// nothing more and deaf to signals.
fn busy_server(dir: &std::path::Path, takes: &str) -> std::path::PathBuf {
    let server = dir.join("server.js");
    std::fs::write(
        &server,
        format!(
            "const fs = require('fs');\n\
             require('http').createServer((q, r) => {{\n\
               if (q.url === '/busy' && ({takes})) {{\n\
                 fs.writeFileSync(process.env.BUSY_FILE + '.tmp', String(process.pid));\n\
                 fs.renameSync(process.env.BUSY_FILE + '.tmp', process.env.BUSY_FILE);\n\
                 for (;;) {{}}\n\
               }}\n\
               r.end(`${{process.pid}}\\n`);\n\
             }}).listen(process.env.PORT);\n"
        ),
    )
    .unwrap();
    server
}

fn dead_workers_queue_reaches_the_other_worker(ebpf: bool) {
    require("node");
    require("unshare");
    require("ip");
    let dir = scratch(if ebpf {
        "steer-ebpf-migrate"
    } else {
        "steer-rescue"
    });
    let busy_file = dir.join("busy");
    let server = busy_server(&dir, "true");
    let port = 8080;
    let mut cmd = Command::new("unshare");
    let exec = match ebpf {
        true => "exec",
        false => "exec setpriv --inh-caps=-all --bounding-set=-bpf,-sys_admin,-net_admin",
    };
    cmd.args([
        "--net",
        "sh",
        "-c",
        &format!("ip link set lo up && {exec} \"$0\" \"$@\""),
        bin(),
    ]);
    cmd.args(socket_args(
        2,
        port,
        &[
            "--restart-delay",
            "5s",
            "--",
            "node",
            server.to_str().unwrap(),
        ],
    ));
    let run = Run::from_command(cmd, &[("BUSY_FILE", busy_file.to_str().unwrap())]);
    run.wait_stderr(" ready (pid", 2, SECS(30));
    let stderr = run.stderr();
    let said = match ebpf {
        true => [
            "connections in turn (eBPF)",
            "the eBPF program migrates them",
        ],
        false => ["connections by the kernel's hash", "tcp_migrate_req is 0"],
    };
    assert!(said.iter().all(|s| stderr.contains(s)), "{stderr}");
    let corepool = run.pid();
    let netns = format!("/proc/{corepool}/ns/net");
    let busy_file_here = busy_file.clone();
    let (busy, survivor, answers) = std::thread::spawn(move || {
        enter_netns(&netns);
        // Both workers' pids: in turn, two requests tell them; by the kernel's hash, as many as
        // it takes until both have answered.
        let mut pids = std::collections::HashSet::new();
        for _ in 0..200 {
            pids.insert(get_within(port, SECS(5)).unwrap().trim().to_string());
            if pids.len() == 2 {
                break;
            }
        }
        assert_eq!(pids.len(), 2, "{pids:?}");
        let mut busy_conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        busy_conn.write_all(b"GET /busy HTTP/1.0\r\n\r\n").unwrap();
        let deadline = Instant::now() + SECS(10);
        while !busy_file_here.exists() {
            assert!(Instant::now() < deadline, "no worker got /busy");
            std::thread::sleep(Duration::from_millis(10));
        }
        let busy = std::fs::read_to_string(&busy_file_here).unwrap();
        let survivor = pids.iter().find(|p| **p != busy).unwrap().clone();
        // Dealt in turn, every other connection waits on the busy worker's socket; by the
        // kernel's hash, about half of them.
        let waiting: Vec<std::net::TcpStream> = (0..12)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
                s
            })
            .collect();
        let deadline = Instant::now() + SECS(10);
        while accept_queue(corepool, port) < if ebpf { 6 } else { 1 } {
            assert!(
                Instant::now() < deadline,
                "{} connections queued on the busy worker",
                accept_queue(corepool, port)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: kill(2) on the worker that reported its pid.
        unsafe { libc::kill(busy.parse().unwrap(), libc::SIGKILL) };
        let killed = Instant::now();
        let answers: Vec<(String, Duration)> = waiting
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(SECS(20))).unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                let pid = out.lines().last().unwrap_or("").trim().to_string();
                (pid, killed.elapsed())
            })
            .collect();
        (busy, survivor, answers)
    })
    .join()
    .unwrap();
    for (i, (pid, after)) in answers.iter().enumerate() {
        assert!(
            *pid == survivor && *after < SECS(3),
            "request {i}: answered by {pid:?} {after:?} after the kill (busy {busy}, other \
             {survivor})\n{}",
            run.stderr()
        );
    }
}

/// Connections waiting in the accept queues of the sockets listening on `port`, in the network
/// namespace of process `pid` (/proc/PID/net/tcp: a listener's rx_queue is its accept queue).
fn accept_queue(pid: i32, port: u16) -> usize {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    tcp.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let listening = f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A";
            let rx = f[4].split_once(':')?.1;
            listening.then(|| usize::from_str_radix(rx, 16).unwrap_or(0))
        })
        .sum()
}

/// A scale-down without eBPF and without migration (the default Docker container): with the
/// kernel's hash, connections keep landing on the removed worker's socket until the worker has
/// exited, and its shutdown reset them. corepool now accepts what is queued there first and
/// relays it to the group: answered by the worker that stays. Here the removed worker, slot
/// 1's, is busy, so about half of the requests wait on its socket; `corepool scale 1` stops it
/// (killed after --kill-timeout 2s: it cannot run its handler), and every request is answered
/// by slot 0's worker.
#[test]
fn a_removed_workers_queue_is_relayed_without_migration() {
    require("node");
    require("unshare");
    require("ip");
    require("setpriv");
    let dir = scratch("steer-rescue-scale");
    let busy_file = dir.join("busy");
    // Only slot 1's worker takes /busy (to block); slot 0's answers it as any request.
    let server = busy_server(&dir, "process.env.COREPOOL_WORKER === '1'");
    let port = 8080;
    let control = control_name("rescue-scale");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "sh",
        "-c",
        "ip link set lo up && exec setpriv --inh-caps=-all --bounding-set=-bpf,-sys_admin,-net_admin \"$0\" \"$@\"",
        bin(),
    ]);
    cmd.args(socket_args(
        2,
        port,
        &[
            "--kill-timeout",
            "2s",
            "--",
            "node",
            server.to_str().unwrap(),
        ],
    ));
    let run = Run::from_command(
        cmd,
        &[
            ("BUSY_FILE", busy_file.to_str().unwrap()),
            ("COREPOOL_CONTROL", &control),
        ],
    );
    run.wait_stderr(" ready (pid", 2, SECS(30));
    assert!(
        run.stderr().contains("tcp_migrate_req is 0"),
        "{}",
        run.stderr()
    );
    let corepool = run.pid();
    let netns = format!("/proc/{corepool}/ns/net");
    let busy_file_here = busy_file.clone();
    let (busy, answers) = std::thread::spawn(move || {
        // The control socket is an abstract one: it lives in corepool's network namespace.
        enter_netns(&netns);
        // /busy until slot 1's worker has it (the kernel's hash picks the socket).
        let mut held = Vec::new();
        let deadline = Instant::now() + SECS(20);
        while !busy_file_here.exists() {
            assert!(Instant::now() < deadline, "slot 1's worker never got /busy");
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /busy HTTP/1.0\r\n\r\n").unwrap();
            held.push(s);
            std::thread::sleep(Duration::from_millis(20));
        }
        let busy = std::fs::read_to_string(&busy_file_here).unwrap();
        // Twelve requests or more, until at least three wait on the busy worker's socket (on
        // loopback the handshake is over, and the connection queued, when connect returns).
        let mut waiting = Vec::new();
        while waiting.len() < 12 || accept_queue(corepool, port) < 3 {
            assert!(waiting.len() < 200, "nothing queued on the busy worker");
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            waiting.push(s);
        }
        let (code, out, err) = control_client(&control, &["scale", "1"]);
        assert_eq!(
            (code, out.trim()),
            (0, "ok: scaling from 2 to 1 workers"),
            "{err}"
        );
        let answers: Vec<String> = waiting
            .into_iter()
            .map(|mut s| {
                s.set_read_timeout(Some(SECS(20))).unwrap();
                let mut out = String::new();
                let _ = s.read_to_string(&mut out);
                out.lines().last().unwrap_or("").trim().to_string()
            })
            .collect();
        drop(held);
        (busy, answers)
    })
    .join()
    .unwrap();
    let survivor = run
        .stderr()
        .lines()
        .find_map(|l| {
            l.split_once("worker 0 ready (pid ")
                .map(|(_, p)| p.to_string())
        })
        .and_then(|p| p.split(')').next().map(str::to_string))
        .expect("slot 0's pid");
    assert_ne!(busy, survivor);
    for (i, pid) in answers.iter().enumerate() {
        assert_eq!(
            *pid,
            survivor,
            "request {i}: answered by {pid:?} (removed {busy})\n{}",
            run.stderr()
        );
    }
    run.wait_stderr("relayed to the other workers", 1, SECS(5));
}
