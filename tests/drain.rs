//! A reload loses no request: the Node preload drains the servers of a replaced worker
//! (src/preload/drain.cjs).
//!
//! Each test runs two workers of a real Node app, puts a load on the pool (8 client loops of
//! tests/fixtures/drain/client.js: HTTP/1.1 keep-alive, a new connection per request, or
//! HTTP/2 streams), sends SIGHUP once the load runs, keeps the load until both old workers have
//! exited, and asserts that no request failed (a reset, a connection closed without an answer,
//! a stream reset), in socket mode and in proxy mode. Without the drain every test fails: with
//! keep-alive 8-15 requests were lost per reload here (both modes), with a new connection per
//! request 3-4 (socket mode; proxy mode lost none, it stops routing before it signals): Node's
//! default on SIGTERM is to die at once, and `server.close()` destroys idle keep-alive
//! connections without `Connection: close`.
//!
//! The load tests run one at a time (a lock), so that they do not compete with each other for
//! the machine's cores. `COREPOOL_TEST_BIN` runs them against another build of corepool (to
//! see them fail against one without the drain).

mod common;

use common::*;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/drain");
const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

/// The load: how each client loop sends its requests.
#[derive(Clone, Copy)]
enum Load {
    /// HTTP/1.1, connections kept alive.
    KeepAlive,
    /// HTTP/1.1, `Connection: close`: a new connection per request.
    NewConnections,
    /// HTTP/2 streams, one session per loop.
    H2,
}

impl Load {
    fn arg(self) -> &'static str {
        match self {
            Load::KeepAlive => "http1",
            Load::NewConnections => "close",
            Load::H2 => "h2",
        }
    }
}

/// What the client counted.
#[derive(Debug)]
struct Outcome {
    ok: u64,
    errors: u64,
    refused: u64,
    report: String,
    /// The workers' output (corepool's stdout).
    stdout: String,
}

fn corepool() -> Command {
    Command::new(std::env::var("COREPOOL_TEST_BIN").unwrap_or_else(|_| bin().to_string()))
}

/// A self-signed certificate for 127.0.0.1: (key, cert) paths.
fn certificate() -> (String, String) {
    require("openssl");
    let dir = scratch("drain-tls");
    let key = dir.join("key.pem").display().to_string();
    let cert = dir.join("cert.pem").display().to_string();
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=127.0.0.1", "-keyout", &key, "-out", &cert])
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key, cert)
}

/// Two workers of `command` under `mode`, a SIGHUP reload under `load`, then a SIGTERM stop:
/// what the client counted, and corepool's stderr.
fn reload_under_load(
    mode: &str,
    load: Load,
    secure: bool,
    extra: &[&str],
    command: &[&str],
) -> (Outcome, String) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    require("node");
    let port = free_port();
    let mut cmd = corepool();
    cmd.args(["-i", "2", "--balance", mode, "--host", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .args(extra)
        .arg("--")
        .args(command);
    let mut run = Run::from_command(cmd, &[]);
    run.wait_for("both workers ready", SECS(30), |_, e| {
        e.contains("worker 0 ready") && e.contains("worker 1 ready")
    });

    let scheme = if secure { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}/");
    // Some load before the reload, and the load kept until both old workers are gone.
    let load = hup_under_load(
        &url,
        load.arg(),
        &run,
        Duration::from_millis(1000),
        SECS(30),
        mode,
    );
    let outcome = Outcome {
        ok: load.ok,
        errors: load.errors,
        refused: load.refused,
        report: load.report,
        stdout: String::new(),
    };

    run.signal(libc::SIGTERM);
    let code = run.exit_code(SECS(30));
    let stderr = run.stderr();
    assert_eq!(code, 0, "stop after the reload\n--- stderr:\n{stderr}");
    let outcome = Outcome {
        stdout: run.stdout(),
        ..outcome
    };
    (outcome, stderr)
}

/// No request failed, and the old workers exited as `exit` says.
fn assert_lossless(mode: &str, (outcome, stderr): (Outcome, String), exit: &str) {
    eprintln!("{mode}: {}", outcome.report);
    assert!(
        outcome.errors == 0 && outcome.ok >= 20,
        "{mode}: requests failed in a reload: {}\n--- stderr:\n{stderr}",
        outcome.report
    );
    assert!(
        outcome.refused <= 16,
        "{mode}: too many refused streams: {}",
        outcome.report
    );
    let old: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("exited after its replacement"))
        .collect();
    assert!(
        old.len() == 2 && old.iter().all(|l| l.ends_with(exit)),
        "{mode}: old workers should exit with {exit:?}: {old:?}"
    );
}

/// Both modes, the same app and load.
fn both_modes(load: Load, secure: bool, extra: &[&str], command: &[&str], exit: &str) {
    for mode in ["socket", "proxy"] {
        assert_lossless(
            mode,
            reload_under_load(mode, load, secure, extra, command),
            exit,
        );
    }
}

/// A bare `http` server without a signal handler: the preload drains it and exits with 0
/// (Node's default would be death by SIGTERM, cutting every open connection).
#[test]
fn keep_alive_reload_of_a_bare_node_server_loses_nothing() {
    let app = format!("{FIXTURES}/plain.js");
    both_modes(Load::KeepAlive, false, &[], &["node", &app], "exit code 0");
}

/// An app with its own SIGTERM handler calling `server.close(() => process.exit(0))`
/// (examples/hello, as Next.js and many Express apps do): the handler keeps working, and the
/// idle keep-alive connections that `server.close()` would destroy at once are closed politely.
#[test]
fn keep_alive_reload_of_an_app_with_its_own_handler_loses_nothing() {
    both_modes(Load::KeepAlive, false, &[], &["node", HELLO], "exit code 0");
}

/// An Express 5 app from the npm registry (tests/fixtures/express), `app.listen`, no handler.
#[test]
fn keep_alive_reload_of_an_express_app_loses_nothing() {
    let app = fixture("tests/fixtures/express/build.sh", &[]);
    both_modes(Load::KeepAlive, false, &[], &["node", &app], "exit code 0");
}

/// An `https` server: TLS connections kept alive are drained the same way.
#[test]
fn keep_alive_reload_of_an_https_server_loses_nothing() {
    let (key, cert) = certificate();
    let app = format!("{FIXTURES}/secure.js");
    both_modes(
        Load::KeepAlive,
        true,
        &[],
        &["node", &app, "https", &key, &cert],
        "exit code 0",
    );
}

/// An `https` server with a new connection per request: connections the old worker accepted
/// (some in their TLS handshake) are served before it exits.
#[test]
fn new_connection_reload_of_an_https_server_loses_nothing() {
    let (key, cert) = certificate();
    let app = format!("{FIXTURES}/secure.js");
    both_modes(
        Load::NewConnections,
        true,
        &[],
        &["node", &app, "https", &key, &cert],
        "exit code 0",
    );
}

/// An `http2` secure server: each session gets a GOAWAY and its streams finish. A stream the
/// server refused (REFUSED_STREAM, never processed) is sent again, as HTTP/2 clients do.
#[test]
fn reload_of_an_http2_server_loses_no_stream() {
    let (key, cert) = certificate();
    let app = format!("{FIXTURES}/secure.js");
    both_modes(
        Load::H2,
        true,
        &[],
        &["node", &app, "h2", &key, &cert],
        "exit code 0",
    );
}

/// `--stop-signal SIGINT` reaches the preload (COREPOOL_STOP_SIGNAL): it drains on SIGINT.
#[test]
fn the_drain_follows_the_stop_signal() {
    let app = format!("{FIXTURES}/plain.js");
    let extra = ["--stop-signal", "SIGINT"];
    assert_lossless(
        "socket",
        reload_under_load("socket", Load::KeepAlive, false, &extra, &["node", &app]),
        "exit code 0",
    );
}

/// An app whose only SIGTERM listener is signal-exit's cleanup hook (npm's signal-exit, which
/// many libraries install): the hook runs, and the worker still exits once drained instead of
/// waiting for SIGKILL (signal-exit dies of the signal only when it sees itself as the last
/// listener, so the drain's own listener is not shown to it).
#[test]
fn keep_alive_reload_of_an_app_with_a_signal_exit_hook_loses_nothing() {
    let app = fixture("tests/fixtures/express/build.sh", &[]);
    let app = app.replace("/app.js", "/signal-exit-app.js");
    let extra = ["--kill-timeout", "8s"];
    for mode in ["socket", "proxy"] {
        let (outcome, stderr) =
            reload_under_load(mode, Load::KeepAlive, false, &extra, &["node", &app]);
        let hooks = outcome.stdout.matches("cleanup hook (SIGTERM)").count();
        assert_lossless(mode, (outcome, stderr), "exit code 0");
        // Two old workers in the reload, two more at the stop.
        assert_eq!(
            hooks, 4,
            "{mode}: the cleanup hook should run in each worker"
        );
    }
}

/// An app whose own graceful shutdown destroys idle keep-alive connections at once (Express
/// with http-graceful-shutdown from the npm registry, the library nitro vendors as Nuxt's
/// SIGTERM handler): the app's handler runs after the preload's drain, finds no connection
/// left to destroy, and exits with code 0 as it means to (its close() of the server the drain
/// closed does not fail). Without that order a reload lost 2-8 requests to resets here.
#[test]
fn keep_alive_reload_of_an_app_with_http_graceful_shutdown_loses_nothing() {
    let app = fixture("tests/fixtures/express/build.sh", &[]);
    let app = app.replace("/app.js", "/graceful-shutdown-app.js");
    for mode in ["socket", "proxy"] {
        let (outcome, stderr) =
            reload_under_load(mode, Load::KeepAlive, false, &[], &["node", &app]);
        let shutdowns = outcome
            .stdout
            .matches("graceful shutdown (SIGTERM)")
            .count();
        assert_lossless(mode, (outcome, stderr), "exit code 0");
        // The app's own handler ran in each old worker, and in both at the stop.
        assert_eq!(
            shutdowns, 4,
            "{mode}: the app's handler should run in each worker"
        );
    }
}

/// A response in progress when the stop signal comes (the drain finds it where Node keeps it,
/// it is not followed before the signal) is waited for, goes out whole with `Connection:
/// close`, and the worker exits once it has: on a keep-alive connection, in both modes, with
/// and without the app's own handler.
#[test]
fn a_response_in_progress_at_the_stop_finishes_with_connection_close() {
    use std::io::{BufRead, BufReader, Read, Write};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for (mode, handler) in [
        ("socket", false),
        ("proxy", false),
        ("socket", true),
        ("proxy", true),
    ] {
        let dir = scratch(&format!("drain-in-progress-{mode}-{handler}"));
        let server = dir.join("server.js");
        std::fs::write(
            &server,
            format!(
                "const http = require('http');\n\
                 const s = http.createServer((req, res) => {{\n\
                   if (req.url !== '/slow') return res.end('quick\\n');\n\
                   console.log('slow request in progress');\n\
                   setTimeout(() => res.end('slow answer\\n'), 1500);\n\
                 }}).listen(process.env.PORT);\n\
                 {}",
                match handler {
                    true => "process.on('SIGTERM', () => s.close(() => process.exit(0)));\n",
                    false => "",
                }
            ),
        )
        .unwrap();
        let port = free_port();
        let mut run = Run::start(
            &pool_args(
                1,
                mode,
                &port.to_string(),
                &["--", "node", server.to_str().unwrap()],
            ),
            &[],
        );
        run.wait_stderr(" ready (pid", 1, SECS(20));
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(SECS(20))).unwrap();
        // One exchange first: the connection is a kept-alive one when the slow request comes.
        conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        assert!(
            head.to_lowercase().contains("connection: keep-alive"),
            "{head}"
        );
        let mut quick = [0u8; 6];
        reader.read_exact(&mut quick).unwrap();
        conn.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        run.wait_stdout("slow request in progress", 1, SECS(10));
        run.signal(libc::SIGTERM);
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(
            rest.starts_with("HTTP/1.1 200") && rest.ends_with("slow answer\n"),
            "{mode}, handler {handler}: {rest:?}"
        );
        assert!(
            rest.to_lowercase().contains("connection: close"),
            "{mode}, handler {handler}: {rest:?}"
        );
        assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
        assert!(!run.stderr().contains("SIGKILL"), "{}", run.stderr());
    }
}
