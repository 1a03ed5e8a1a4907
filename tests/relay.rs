//! Proxy mode against real servers that only know $PORT: python's http.server, a Node server;
//! large bodies both ways byte-exact, half-closes, a WebSocket upgrade, slow clients, never a
//! connection to a worker that is not ready, and no failed request through kills and reloads.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A Node fixture: GET /big returns N deterministic bytes, POST answers the body's length and
/// checksum, and an `upgrade` handler echoes WebSocket text frames.
const NODE_SERVER: &str = r#"
const http = require('http'), crypto = require('crypto');
const byte = (i) => (i * 31 + (i >> 8)) & 255;
const s = http.createServer((req, res) => {
  if (req.method === 'POST') {
    let n = 0, sum = 0;
    req.on('data', (c) => { for (const b of c) { sum = (sum * 33 + b) >>> 0; } n += c.length; });
    req.on('end', () => res.end(JSON.stringify({ n, sum, worker: process.env.COREPOOL_WORKER })));
  } else if (req.url.startsWith('/big')) {
    const n = Number(req.url.slice(5)); const buf = Buffer.alloc(n);
    for (let i = 0; i < n; i++) buf[i] = byte(i);
    res.setHeader('content-length', n); res.end(buf);
  } else {
    res.end(JSON.stringify({ worker: process.env.COREPOOL_WORKER, pid: process.pid }));
  }
});
s.on('upgrade', (req, sock) => {
  const key = crypto.createHash('sha1').update(req.headers['sec-websocket-key'] + '258EAFA5-E914-47DA-95CA-C5AB0DC85B11').digest('base64');
  sock.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ' + key + '\r\n\r\n');
  sock.on('data', (f) => {
    const len = f[1] & 127, mask = f.slice(2, 6), data = Buffer.alloc(len);
    for (let i = 0; i < len; i++) data[i] = f[6 + i] ^ mask[i % 4];
    sock.write(Buffer.concat([Buffer.from([0x81, len]), data]));
  });
});
const delay = process.env.COREPOOL_WORKER === '1' ? Number(process.env.SLOT1_DELAY || 0) : 0;
setTimeout(() => s.listen(Number(process.env.PORT), process.env.HOSTNAME), delay);
process.on('SIGTERM', () => { s.close(() => process.exit(0)); s.closeIdleConnections?.(); });
"#;

fn node_fixture() -> String {
    let dir = scratch("relay");
    let path = dir.join("server.js");
    std::fs::write(&path, NODE_SERVER).unwrap();
    path.to_string_lossy().into_owned()
}

fn proxy_pool(n: usize, port: u16, command: &[&str], env: &[(&str, &str)]) -> Run {
    let port = port.to_string();
    let n = n.to_string();
    let mut args = vec![
        "-i",
        &n,
        "--balance",
        "proxy",
        "--host",
        "127.0.0.1",
        "-p",
        &port,
        "--log-format",
        "prefix",
        "--",
    ];
    args.extend_from_slice(command);
    Run::start(&args, env)
}

fn exchange(port: u16, request: &[u8]) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(SECS(20))).unwrap();
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    Ok(out)
}

fn body(response: &[u8]) -> &[u8] {
    let at = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    &response[at + 4..]
}

#[test]
fn python_http_server_behind_the_proxy_byte_exact_and_half_closed() {
    require("python3");
    let dir = scratch("pyhttp");
    let file: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("file.bin"), &file).unwrap();
    let port = free_port();
    let serve = format!(
        "exec python3 -m http.server \"$PORT\" --bind \"$HOSTNAME\" --directory {}",
        dir.display()
    );
    let run = proxy_pool(2, port, &["sh", "-c", &serve], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    for _ in 0..30 {
        let response = exchange(port, b"GET /file.bin HTTP/1.0\r\n\r\n").unwrap();
        assert!(body(&response) == file.as_slice(), "file differs");
    }
    // Both workers served (their access logs carry the slot prefix).
    let log = run.stderr();
    assert!(
        log.contains("[0:") && log.contains("[1:") && log.contains("GET /file.bin"),
        "{log}"
    );
    // Half-close: the request, then our write side shut; the whole answer still arrives.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /file.bin HTTP/1.0\r\n\r\n").unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(
        body(&out) == file.as_slice(),
        "half-closed request lost data"
    );
}

#[test]
fn fifty_megabytes_up_and_down_byte_exact() {
    let server = node_fixture();
    let port = free_port();
    let run = proxy_pool(2, port, &["node", &server], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let n = 50 * 1024 * 1024;
    // Upload: stream 50 MB, compare length and checksum computed on both sides.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SECS(60))).unwrap();
    s.write_all(
        format!("POST /up HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {n}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut sum: u32 = 0;
    let mut chunk = vec![0u8; 1 << 20];
    for block in 0..(n / chunk.len()) {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = ((block * 7 + i * 13) % 256) as u8;
            sum = sum.wrapping_mul(33).wrapping_add(u32::from(*b));
        }
        s.write_all(&chunk).unwrap();
    }
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let v: serde_json::Value = serde_json::from_slice(body(&out)).unwrap();
    assert_eq!(v["n"], n);
    assert_eq!(v["sum"], sum);
    // Download.
    let response = exchange(port, format!("GET /big/{n} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let got = body(&response);
    assert_eq!(got.len(), n);
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, &b)| b == ((i * 31 + (i >> 8)) & 255) as u8),
        "download differs"
    );
}

#[test]
fn websocket_upgrade_and_echo() {
    let server = node_fixture();
    let port = free_port();
    let run = proxy_pool(1, port, &["node", &server], &[]);
    run.wait_stderr(" ready (pid", 1, SECS(15));
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(SECS(5))).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 2 {
        if line.starts_with("Sec-WebSocket-Accept") {
            assert!(line.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{line}");
        }
        line.clear();
    }
    let text = b"hello through corepool";
    let mask = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | text.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).unwrap();
    let mut echo = [0u8; 2 + 22];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo[2..], text);
}

#[test]
fn a_slow_client_blocks_nobody() {
    let server = node_fixture();
    let port = free_port();
    let run = proxy_pool(1, port, &["node", &server], &[]);
    run.wait_stderr(" ready (pid", 1, SECS(15));
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        for b in b"GET /big/200000 HTTP/1.0\r\n\r\n" {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = Vec::new();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf).unwrap() {
                0 => break,
                n => out.extend_from_slice(&buf[..n]),
            }
            if out.len() % 8192 < 64 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        body(&out).len()
    });
    // Meanwhile everyone else is served at once.
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    for _ in 0..50 {
        exchange(port, b"GET / HTTP/1.0\r\n\r\n").unwrap();
    }
    assert!(
        started.elapsed() < SECS(3),
        "fast clients waited behind a slow one: {:?}",
        started.elapsed()
    );
    assert_eq!(slow.join().unwrap(), 200_000);
}

#[test]
fn never_to_a_worker_that_is_not_ready() {
    let server = node_fixture();
    let port = free_port();
    let run = proxy_pool(2, port, &["node", &server], &[("SLOT1_DELAY", "3000")]);
    run.wait_stderr("worker 0 ready", 1, SECS(15));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let v: serde_json::Value =
            serde_json::from_slice(body(&exchange(port, b"GET / HTTP/1.0\r\n\r\n").unwrap()))
                .unwrap();
        assert_eq!(
            v["worker"], "0",
            "a request went to the worker that is not listening yet"
        );
    }
    run.wait_stderr("worker 1 ready", 1, SECS(10));
}

fn load(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(usize, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut ok, mut failed) = (0, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            match exchange(port, b"GET / HTTP/1.0\r\n\r\n") {
                Ok(r) if r.starts_with(b"HTTP/1.1 200") => ok += 1,
                Ok(r) => failed.push(String::from_utf8_lossy(&r[..r.len().min(40)]).into_owned()),
                Err(e) => failed.push(e),
            }
        }
        (ok, failed)
    })
}

#[test]
fn kills_and_reloads_under_load_fail_nothing_that_was_not_in_flight() {
    let server = node_fixture();
    let port = free_port();
    let mut run = proxy_pool(2, port, &["node", &server], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..4).map(|_| load(port, stop.clone())).collect();
    std::thread::sleep(Duration::from_millis(500));
    let victim = started_pids(&run.stderr())[0];
    // SAFETY: kill(2) on a worker pid corepool reported.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    run.wait_stderr(" ready (pid", 3, SECS(15));
    std::thread::sleep(Duration::from_millis(300));
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload complete", 1, SECS(20));
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    let refused: Vec<_> = failed.iter().filter(|e| e.starts_with("connect")).collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert!(
        failed.len() <= 4,
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 50);
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

#[test]
fn a_burst_of_connections_is_spread_over_the_workers() {
    // Ten connections opened at once, before any sends a byte: each is relayed as it is
    // accepted, and they must not all pick the same "least busy" worker.
    let port = free_port();
    let server = node_fixture();
    let run = proxy_pool(2, port, &["node", &server], &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    for round in 0..3 {
        let mut conns: Vec<TcpStream> = (0..10)
            .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        // Let every relay reach its worker before any request is sent.
        std::thread::sleep(Duration::from_millis(300));
        let mut workers = std::collections::HashSet::new();
        for s in &mut conns {
            s.set_read_timeout(Some(SECS(10))).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).unwrap();
            let answer: serde_json::Value = serde_json::from_slice(body(&out)).unwrap();
            workers.insert(answer["worker"].to_string());
        }
        assert_eq!(
            workers.len(),
            2,
            "round {round}: all ten went to {workers:?}"
        );
    }
}

/// The relays run on threads of their own, one per CPU corepool may use, beside the
/// supervisor's; and when the pool stops, every one of them lets go of the public socket at
/// once: while a worker is still draining, a new client is refused, not left in a backlog.
#[test]
fn relays_run_on_a_thread_per_cpu_and_all_let_go_of_the_port_at_stop() {
    let dir = scratch("relay-threads");
    let server = dir.join("server.js");
    std::fs::write(
        &server,
        r#"
const http = require('http');
const s = http.createServer((req, res) => res.end('hello\n'));
s.listen(Number(process.env.PORT), process.env.HOSTNAME);
process.on('SIGTERM', () => { console.log('stopping'); setTimeout(() => process.exit(0), 4000); });
"#,
    )
    .unwrap();
    let port = free_port();
    let mut pool = proxy_pool(1, port, &["node", server.to_str().unwrap()], &[]);
    let deadline = Instant::now() + SECS(20);
    while get_ok(port, "/").is_err() {
        assert!(Instant::now() < deadline, "no answer: {}", pool.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpus = std::thread::available_parallelism().unwrap().get().min(16);
    let names: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", pool.pid()))
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|name| name.trim().to_string())
        .collect();
    for i in 0..cpus {
        assert!(
            names.contains(&format!("relay-{i}")),
            "no thread relay-{i} among {names:?}"
        );
    }
    // Each thread accepts on a socket of its own: the kernel spreads connections over them.
    assert_eq!(
        listening_sockets(port),
        cpus,
        "one listening socket per relay thread"
    );
    // As many held connections as threads, four times over, each answered.
    let held: Vec<TcpStream> = (0..cpus * 4)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(SECS(10))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
            let mut buf = [0u8; 512];
            let n = s.read(&mut buf).unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).ends_with("hello\n"));
            s
        })
        .collect();
    pool.signal(libc::SIGTERM);
    pool.wait_stdout("stopping", 1, SECS(10));
    // The worker lives on for 4 s; the public port must be closed by now (give the threads a
    // moment to see the stop).
    let deadline = Instant::now() + SECS(2);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(err) if err.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => {
                assert!(
                    Instant::now() < deadline,
                    "public port still open while the pool stops: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    drop(held);
    assert_eq!(pool.exit_code(SECS(20)), 0, "{}", pool.stderr());
}

/// Connections on `port` (local side, IPv4) that are established (or half-closed by the peer)
/// and hold unread bytes: on a worker's private port, requests sent to it that it has not read
/// (from /proc/net/tcp).
fn unread_connections(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let rx = f[4].split_once(':').map_or("0", |(_, rx)| rx);
            f[1].ends_with(&format!(":{port:04X}"))
                && (f[3] == "01" || f[3] == "08")
                && u64::from_str_radix(rx, 16).unwrap() > 0
        })
        .count()
}

/// A worker killed with requests relayed to it that it never read (they wait in its accept
/// queue while it is busy) loses none of them: each is reset by the kernel, and the relay sends
/// the kept request to the other worker, a half-closed client's end of stream included. The
/// request the worker had read is not sent again: its client gets end of stream, no answer.
#[test]
fn requests_a_killed_worker_never_read_go_to_another_worker() {
    const BUSY_SERVER: &str = r#"
const http = require('http'), fs = require('fs');
http.createServer((req, res) => {
  if (req.url === '/busy') {
    // Tell the test, then keep the event loop busy: no connection is accepted any more.
    fs.writeFileSync(process.env.BUSY_FILE + '.tmp', process.env.PORT);
    fs.renameSync(process.env.BUSY_FILE + '.tmp', process.env.BUSY_FILE);
    for (;;) {}
  }
  res.end(JSON.stringify({ pid: process.pid }));
}).listen(Number(process.env.PORT), process.env.HOSTNAME);
"#;
    let dir = scratch("resend");
    let server = dir.join("server.js");
    std::fs::write(&server, BUSY_SERVER).unwrap();
    let busy_file = dir.join("busy");
    let port = free_port();
    let metrics = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics}");
    // --sticky ip: every connection from 127.0.0.1 goes to one worker while it is ready.
    let mut args = pool_args(2, "proxy", &port.to_string(), &["--sticky", "ip"]);
    args.extend(
        [
            "--metrics",
            &metrics_addr,
            "--log-format",
            "prefix",
            "--",
            "node",
        ]
        .map(String::from),
    );
    args.push(server.to_string_lossy().into_owned());
    let mut run = Run::start(&args, &[("BUSY_FILE", busy_file.to_str().unwrap())]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let pid_of = |out: &[u8]| -> i64 {
        let v: serde_json::Value = serde_json::from_slice(body(out)).unwrap();
        v["pid"].as_i64().unwrap()
    };
    let sticky = pid_of(&exchange(port, b"GET / HTTP/1.0\r\n\r\n").unwrap());

    let mut busy = TcpStream::connect(("127.0.0.1", port)).unwrap();
    busy.write_all(b"GET /busy HTTP/1.0\r\n\r\n").unwrap();
    let deadline = Instant::now() + SECS(10);
    while !busy_file.exists() {
        assert!(Instant::now() < deadline, "the worker never got /busy");
        std::thread::sleep(Duration::from_millis(10));
    }
    let private: u16 = std::fs::read_to_string(&busy_file)
        .unwrap()
        .parse()
        .unwrap();

    // Five requests, the last from a client that half-closes after it: all relayed to the
    // busy worker, where they wait unread.
    let mut waiting: Vec<TcpStream> = (0..5)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            if i == 4 {
                s.shutdown(Shutdown::Write).unwrap();
            }
            s
        })
        .collect();
    let deadline = Instant::now() + SECS(10);
    while unread_connections(private) < 5 {
        assert!(
            Instant::now() < deadline,
            "the requests never reached the busy worker's port {private} ({} there)",
            unread_connections(private)
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // SAFETY: kill(2) on the worker pid the server itself reported.
    unsafe { libc::kill(sticky as i32, libc::SIGKILL) };
    for (i, s) in waiting.iter_mut().enumerate() {
        s.set_read_timeout(Some(SECS(20))).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out)
            .unwrap_or_else(|e| panic!("request {i}: {e}"));
        assert!(
            out.starts_with(b"HTTP/1.1 200"),
            "request {i}: {:?}",
            String::from_utf8_lossy(&out)
        );
        assert_ne!(
            pid_of(&out),
            sticky,
            "request {i} answered by the dead worker?"
        );
    }
    busy.set_read_timeout(Some(SECS(20))).unwrap();
    let mut out = Vec::new();
    let _ = busy.read_to_end(&mut out);
    assert!(
        out.is_empty(),
        "the request the worker had read was sent again: {:?}",
        String::from_utf8_lossy(&out)
    );
    // The count reaches /metrics with the pool's next publication.
    let deadline = Instant::now() + SECS(10);
    loop {
        let scraped = get_ok(metrics, "/metrics").unwrap();
        let resent: Vec<&str> = scraped
            .lines()
            .filter(|l| l.starts_with("corepool_proxy_resent_total"))
            .collect();
        if resent == ["corepool_proxy_resent_total 5"] {
            break;
        }
        assert!(Instant::now() < deadline, "{resent:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}
