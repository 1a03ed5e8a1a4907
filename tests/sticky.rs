//! `--sticky ip`: a client address reaches the same worker while that worker's slot is ready,
//! in socket mode (the eBPF program, and the classic BPF fallback where eBPF may not be loaded:
//! under setpriv without CAP_BPF/CAP_SYS_ADMIN/CAP_NET_ADMIN) and in proxy mode. See
//! src/steer/ and src/proxy.rs. Each test has its counterpart without `--sticky`, which
//! shows what the option changes.

mod common;
use common::*;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq)]
enum Way {
    /// Socket mode, eBPF steering (corepool runs as root).
    Ebpf,
    /// Socket mode, eBPF not allowed: the classic BPF program (or, without --sticky, the
    /// kernel's hash).
    Classic,
    /// Proxy mode.
    Proxy,
}

/// Loopback source addresses the clients bind before they connect.
fn addresses(n: u8) -> Vec<Ipv4Addr> {
    (1..=n).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect()
}

/// corepool with `workers` workers running `command` on 127.0.0.1:`port`, the way asked, with
/// `--sticky ip` or not; returned once every worker is ready.
fn start(way: Way, sticky: bool, workers: usize, port: u16, command: &[&str]) -> Run {
    let mut args: Vec<String> = [
        "-i",
        &workers.to_string(),
        "--balance",
        if way == Way::Proxy { "proxy" } else { "socket" },
        "--host",
        "127.0.0.1",
        "-p",
        &port.to_string(),
    ]
    .into_iter()
    .map(String::from)
    .collect();
    if sticky {
        args.extend(["--sticky".into(), "ip".into()]);
    }
    args.push("--".into());
    args.extend(command.iter().map(|s| s.to_string()));
    let cmd = if way == Way::Classic {
        require("setpriv");
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--inh-caps=-all",
            "--bounding-set=-bpf,-sys_admin,-perfmon,-net_admin",
            bin(),
        ])
        .args(&args);
        cmd
    } else {
        let mut cmd = Command::new(bin());
        cmd.args(&args);
        cmd
    };
    let control = format!("corepool-test-sticky-{port}");
    let run = Run::from_command(cmd, &[("COREPOOL_CONTROL", control.as_str())]);
    let spread = match (way, sticky) {
        (Way::Ebpf, true) => "connections by client address (eBPF)",
        (Way::Ebpf, false) => "connections in turn (eBPF)",
        (Way::Classic, true) => "connections by client address (classic BPF",
        (Way::Classic, false) => "connections by the kernel's hash",
        (Way::Proxy, _) => "balance proxy on",
    };
    run.wait_stderr(spread, 1, SECS(30));
    run.wait_stderr(" ready (pid", workers, SECS(60));
    run
}

/// One GET on a new connection from `source` (bound before connect): the body.
fn get_from(source: Ipv4Addr, port: u16) -> Result<String, String> {
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(source, 0)),
    )
    .map_err(|e| format!("bind {source}: {e}"))?;
    socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)),
    )
    .map_err(|e| format!("connect from {source}: {e}"))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(SECS(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(format!("no 200 answer: {text:?}")),
    }
}

/// One GET from `source` to `to` (either family), on a new connection: the body.
fn get_between(source: IpAddr, to: SocketAddr) -> Result<String, String> {
    let family = match source {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("socket: {e}"))?;
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let bound = match (source, to) {
        (IpAddr::V4(s), SocketAddr::V4(t)) => {
            socket::bind(raw, &SockaddrIn::from(SocketAddrV4::new(s, 0)))
                .and_then(|()| socket::connect(raw, &SockaddrIn::from(t)))
        }
        (IpAddr::V6(s), SocketAddr::V6(t)) => socket::bind(
            raw,
            &SockaddrIn6::from(std::net::SocketAddrV6::new(s, 0, 0, 0)),
        )
        .and_then(|()| socket::connect(raw, &SockaddrIn6::from(t))),
        _ => return Err("mixed families".into()),
    };
    bound.map_err(|e| format!("{source} to {to}: {e}"))?;
    let mut s = TcpStream::from(fd);
    s.set_read_timeout(Some(SECS(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(format!("no 200 answer: {text:?}")),
    }
}

/// `rounds` requests from each address, the addresses taking turns: for each address, the
/// answers ("SLOT PID") it got.
fn survey(port: u16, from: &[Ipv4Addr], rounds: usize) -> BTreeMap<Ipv4Addr, BTreeSet<String>> {
    let mut seen: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
    for round in 0..rounds {
        for &source in from {
            let answer =
                get_from(source, port).unwrap_or_else(|e| panic!("round {round}, {source}: {e}"));
            seen.entry(source).or_default().insert(answer);
        }
    }
    seen
}

const SERVER: &str = "require('http').createServer((q, r) => \
     r.end(`${process.env.NODE_APP_INSTANCE} ${process.pid}\\n`)).listen(process.env.PORT);\n";

/// 2 workers; 8 loopback addresses make 12 connections each: every address reaches one worker
/// only, and the addresses use both. Then worker 0 is killed: while it restarts, its addresses
/// are served by worker 1 (and worker 1's keep theirs); once it is back, every address reaches
/// the slot it reached before (in classic BPF, slot 0's socket left the kernel's array and
/// came back at its end: the program must follow).
fn addresses_stick(way: Way) {
    require("node");
    let dir = scratch("sticky-addresses");
    let server = dir.join("server.js");
    std::fs::write(&server, SERVER).unwrap();
    let port = free_port();
    let run = start(way, true, 2, port, &["node", server.to_str().unwrap()]);
    let from = addresses(8);
    let seen = survey(port, &from, 12);
    let slot_of: BTreeMap<Ipv4Addr, String> = seen
        .iter()
        .map(|(a, answers)| {
            assert_eq!(
                answers.len(),
                1,
                "{a} reached more than one worker: {seen:?}\n{}",
                run.stderr()
            );
            let slot = answers.first().unwrap().split(' ').next().unwrap();
            (*a, slot.to_string())
        })
        .collect();
    let slots: BTreeSet<&String> = slot_of.values().collect();
    assert_eq!(
        slots.len(),
        2,
        "the addresses all went to one worker: {seen:?}"
    );

    let victim = started_pids(&run.stderr())
        .into_iter()
        .find(|&pid| {
            seen.values()
                .any(|s| s.first().unwrap() == &format!("0 {pid}"))
        })
        .expect("worker 0's pid among the answers");
    // SAFETY: kill(2) on a worker of this test's pool.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    run.wait_stderr("exited: signal SIGKILL", 1, SECS(10));
    let meanwhile = survey(port, &from, 2);
    for (a, answers) in &meanwhile {
        if slot_of[a] == "1" {
            assert_eq!(
                answers, &seen[a],
                "{a} lost its worker 1 while worker 0 restarted"
            );
        }
    }
    run.wait_stderr(" ready (pid", 3, SECS(30));
    let after = survey(port, &from, 4);
    for (a, answers) in &after {
        let slots: BTreeSet<&str> = answers
            .iter()
            .map(|s| s.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            slots,
            BTreeSet::from([slot_of[a].as_str()]),
            "{a} reached slot {} before the restart, now {answers:?}\n{}",
            slot_of[a],
            run.stderr()
        );
    }
    let stderr = run.stderr();
    assert!(!stderr.contains("cannot "), "{stderr}");
}

/// Without --sticky, the same survey (7 addresses) finds an address that reaches both workers.
fn addresses_spread_without_sticky(way: Way) {
    require("node");
    let dir = scratch("sticky-spread");
    let server = dir.join("server.js");
    std::fs::write(&server, SERVER).unwrap();
    let port = free_port();
    let run = start(way, false, 2, port, &["node", server.to_str().unwrap()]);
    // An odd count, so that a round robin does not hand each address the same worker.
    let seen = survey(port, &addresses(7), 12);
    assert!(
        seen.values().any(|answers| answers.len() > 1),
        "without --sticky every address still reached one worker: {seen:?}\n{}",
        run.stderr()
    );
}

#[test]
fn addresses_stick_with_ebpf() {
    addresses_stick(Way::Ebpf);
}

#[test]
fn addresses_stick_with_classic_bpf() {
    addresses_stick(Way::Classic);
}

#[test]
fn addresses_stick_in_proxy_mode() {
    addresses_stick(Way::Proxy);
}

#[test]
fn addresses_spread_without_sticky_ebpf() {
    addresses_spread_without_sticky(Way::Ebpf);
}

#[test]
fn addresses_spread_without_sticky_kernel_hash() {
    addresses_spread_without_sticky(Way::Classic);
}

#[test]
fn addresses_spread_without_sticky_proxy() {
    addresses_spread_without_sticky(Way::Proxy);
}

/// socket.io with its default transports (HTTP long-polling, then the upgrade to WebSocket;
/// tests/fixtures/socketio/sticky.js and polling.js): 16 clients from 4 loopback addresses
/// connect, emit while polling, upgrade and emit again. With `--sticky ip` every session stays
/// on its worker: no error, no 400 from engine.io, both workers used. Without it, requests of
/// a session reach the other worker: "xhr poll/post error" (400 "Session ID unknown").
fn socketio(way: Way, sticky: bool) {
    require("node");
    require("npm");
    let dir = fixture("tests/fixtures/socketio/build.sh", &[]);
    let port = free_port();
    let app = format!("{dir}/sticky.js");
    let run = start(way, sticky, 2, port, &["node", &app]);
    let url = format!("http://127.0.0.1:{port}");
    let mut client = Command::new("node");
    client.arg(format!("{dir}/polling.js")).args([&url, "16"]);
    client.args(addresses(4).iter().map(Ipv4Addr::to_string));
    let out = client.output().expect("run node polling.js");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
    // Let the workers print what engine.io refused.
    std::thread::sleep(Duration::from_millis(300));
    let refused = run.stdout().matches("engine error").count();
    if sticky {
        let pids: BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("client"))
            .filter_map(|l| l.split(": pid ").nth(1)?.split(' ').next())
            .collect();
        assert!(
            out.status.success() && errors.is_empty() && refused == 0,
            "{} client errors, {refused} sessions refused by engine.io:\n{text}\n{}\n{}",
            errors.len(),
            String::from_utf8_lossy(&out.stderr),
            run.stdout()
        );
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("client") && l.ends_with("(websocket)"))
                .count(),
            16,
            "not every client upgraded:\n{text}"
        );
        assert_eq!(pids.len(), 2, "the clients all went to one worker:\n{text}");
    } else {
        assert!(
            !out.status.success() && errors.iter().any(|e| e.contains("xhr")),
            "without --sticky, socket.io's long-polling did not fail:\n{text}"
        );
    }
}

#[test]
fn socketio_long_polling_with_ebpf() {
    socketio(Way::Ebpf, true);
}

#[test]
fn socketio_long_polling_with_classic_bpf() {
    socketio(Way::Classic, true);
}

#[test]
fn socketio_long_polling_in_proxy_mode() {
    socketio(Way::Proxy, true);
}

#[test]
fn socketio_long_polling_fails_without_sticky_ebpf() {
    socketio(Way::Ebpf, false);
}

#[test]
fn socketio_long_polling_fails_without_sticky_kernel_hash() {
    socketio(Way::Classic, false);
}

#[test]
fn socketio_long_polling_fails_without_sticky_proxy() {
    socketio(Way::Proxy, false);
}

/// In a fresh network namespace, with 6 IPv6 addresses added to `lo` and corepool (3 workers)
/// on `::`: every IPv6 and IPv4 source address (3 connections each) reaches slot
/// `proxy::address_hash(address) % 3`, the same in every way (eBPF, classic BPF, proxy), so
/// the IPv6 path of each program hashes the whole address as proxy mode does.
fn every_way_picks_the_same_slot(way: Way) {
    require("node");
    require("unshare");
    require("ip");
    let dir = scratch("sticky-families");
    let server = dir.join("server.js");
    std::fs::write(&server, SERVER).unwrap();
    let v6: Vec<Ipv6Addr> = (1..=6u16)
        .map(|i| Ipv6Addr::new(0xfd00, 0xc0, 0x7e, 0, 0, 0, i * 257, i * 4099))
        .collect();
    let mut setup = String::from("ip link set lo up");
    for a in &v6 {
        setup.push_str(&format!(" && ip addr add {a}/128 dev lo nodad"));
    }
    let privileges = if way == Way::Classic {
        require("setpriv");
        "setpriv --inh-caps=-all --bounding-set=-bpf,-sys_admin,-perfmon,-net_admin"
    } else {
        ""
    };
    let port = 8080;
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--net",
        "sh",
        "-c",
        &format!("{setup} && exec {privileges} \"$0\" \"$@\""),
        bin(),
        "-i",
        "3",
        "--balance",
        if way == Way::Proxy { "proxy" } else { "socket" },
        "--host",
        "::",
        "-p",
        "8080",
        "--sticky",
        "ip",
        "--",
        "node",
        server.to_str().unwrap(),
    ]);
    let run = Run::from_command(cmd, &[]);
    run.wait_stderr(" ready (pid", 3, SECS(60));
    let stderr = run.stderr();
    match way {
        Way::Ebpf => assert!(stderr.contains("by client address (eBPF)"), "{stderr}"),
        Way::Classic => assert!(
            stderr.contains("by client address (classic BPF"),
            "{stderr}"
        ),
        Way::Proxy => {}
    }
    let netns = format!("/proc/{}/ns/net", run.pid());
    let sources: Vec<IpAddr> = v6
        .iter()
        .map(|&a| IpAddr::V6(a))
        .chain(addresses(6).into_iter().map(IpAddr::V4))
        .collect();
    let wrong = std::thread::spawn(move || {
        let ns = std::fs::File::open(&netns).expect("the pool's network namespace");
        // SAFETY: setns(2) on this thread only, with an open namespace descriptor.
        let ret = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
        let mut wrong = Vec::new();
        for _ in 0..3 {
            for &source in &sources {
                let to: SocketAddr = match source {
                    IpAddr::V4(_) => (Ipv4Addr::LOCALHOST, port).into(),
                    IpAddr::V6(_) => (Ipv6Addr::LOCALHOST, port).into(),
                };
                let answer = get_between(source, to).unwrap_or_else(|e| panic!("{e}"));
                let slot = answer.split(' ').next().unwrap_or("").to_string();
                let expected = (corepool::proxy::address_hash(source) % 3).to_string();
                if slot != expected {
                    wrong.push(format!("{source}: slot {slot}, expected {expected}"));
                }
            }
        }
        wrong
    })
    .join()
    .unwrap();
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), run.stderr());
}

#[test]
fn ipv6_and_ipv4_addresses_pick_the_hash_slot_with_ebpf() {
    every_way_picks_the_same_slot(Way::Ebpf);
}

#[test]
fn ipv6_and_ipv4_addresses_pick_the_hash_slot_with_classic_bpf() {
    every_way_picks_the_same_slot(Way::Classic);
}

#[test]
fn ipv6_and_ipv4_addresses_pick_the_hash_slot_in_proxy_mode() {
    every_way_picks_the_same_slot(Way::Proxy);
}

/// `corepool scale` under `--sticky ip`: 3 workers, worker 0 killed and back (in classic BPF
/// its socket left the kernel's array and came back at the end), then a scale to 4 and one
/// to 2: once the new worker is ready, and at once after the scale down (the removed slots'
/// sockets still in the group while their workers drain) as after they are gone, each of 16
/// addresses reaches slot `address_hash % the new count`, the same in every way.
fn addresses_follow_a_scale(way: Way) {
    require("node");
    let dir = scratch("sticky-scale");
    let server = dir.join("server.js");
    std::fs::write(&server, SERVER).unwrap();
    let port = free_port();
    let run = start(way, true, 3, port, &["node", server.to_str().unwrap()]);
    let control = format!("corepool-test-sticky-{port}");
    let scale = |count: &str| {
        let out = Command::new(bin())
            .args(["scale", count])
            .env("COREPOOL_CONTROL", &control)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let from = addresses(16);
    let check = |slots: u32, when: &str| {
        let mut wrong = Vec::new();
        for (a, answers) in survey(port, &from, 2) {
            let expected = (corepool::proxy::address_hash(IpAddr::V4(a)) % slots).to_string();
            for answer in answers {
                if answer.split(' ').next() != Some(expected.as_str()) {
                    wrong.push(format!("{a}: {answer}, expected slot {expected}"));
                }
            }
        }
        assert!(
            wrong.is_empty(),
            "{when}:\n{}\n{}",
            wrong.join("\n"),
            run.stderr()
        );
    };
    check(3, "3 workers");
    let victim = started_pids(&run.stderr())[0];
    // SAFETY: kill(2) on a worker of this test's pool.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    run.wait_stderr("exited: signal SIGKILL", 1, SECS(10));
    run.wait_stderr(" ready (pid", 4, SECS(30));
    check(3, "worker 0 back");
    scale("4");
    run.wait_stderr(" ready (pid", 5, SECS(30));
    check(4, "scaled up to 4");
    scale("2");
    check(2, "right after the scale down to 2");
    run.wait_stderr("removed by a scale, exited", 2, SECS(20));
    check(2, "the removed workers gone");
    let stderr = run.stderr();
    assert!(!stderr.contains("cannot "), "{stderr}");
}

#[test]
fn addresses_follow_a_scale_with_ebpf() {
    addresses_follow_a_scale(Way::Ebpf);
}

#[test]
fn addresses_follow_a_scale_with_classic_bpf() {
    addresses_follow_a_scale(Way::Classic);
}

#[test]
fn addresses_follow_a_scale_in_proxy_mode() {
    addresses_follow_a_scale(Way::Proxy);
}
