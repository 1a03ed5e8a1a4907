//! Launchers in socket mode: the server behind `npm start`, `npm run`, `pnpm start`, `yarn start`,
//! `npx`, dotenv-cli, tsx or a Node wrapper is a child or grandchild of the process corepool
//! started, and must still get the slot's socket and ready pipe, while the launcher never adopts
//! them; a node:cluster app, a socket-activated server (`listen({fd: 3})`, as SvelteKit's
//! adapter-node) and pm2's `process.send('ready')` (with `--ready-on message`) work too.
//! The launchers are the real ones from the npm registry (tests/fixtures/launchers, installed
//! once with `npm ci` and cached).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The installed fixture directory (built once per test binary: tests run in parallel).
fn fixture_dir() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        require("node");
        require("npm");
        fixture("tests/fixtures/launchers/build.sh", &[])
    })
}

/// The SvelteKit app built with adapter-node (built once per test binary).
fn sveltekit_dir() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        require("npm");
        fixture("tests/fixtures/sveltekit-node/build.sh", &[])
    })
}

/// `corepool -i 2 --balance socket ... -- CMD` run in the launchers fixture, its bins on PATH.
fn start(cmd: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> (Run, u16) {
    start_in(fixture_dir(), cmd, extra_args, env)
}

fn start_in(dir: &str, cmd: &[&str], extra_args: &[&str], env: &[(&str, &str)]) -> (Run, u16) {
    let port = free_port();
    let default_timeout: &[&str] = if extra_args.contains(&"--ready-timeout") {
        &[]
    } else {
        &["--ready-timeout", "90s"]
    };
    let mut args = socket_args(2, port, default_timeout);
    args.extend(extra_args.iter().map(|a| a.to_string()));
    args.push("--".into());
    args.extend(cmd.iter().map(|a| a.to_string()));
    let mut command = Command::new(bin());
    command.args(&args).current_dir(dir);
    let path = format!(
        "{dir}/node_modules/.bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let mut all: Vec<(&str, &str)> = vec![("PATH", &path)];
    all.extend_from_slice(env);
    (Run::from_command(command, &all), port)
}

/// Asks until both workers (0 and 1) have answered; returns the pids that answered.
fn both_answer(run: &Run, port: u16) -> BTreeSet<i64> {
    let deadline = Instant::now() + SECS(30);
    let (mut workers, mut pids) = (BTreeSet::new(), BTreeSet::new());
    while workers.len() < 2 {
        match get_json(port) {
            Ok(json) => {
                workers.insert(json["worker"].as_str().unwrap_or("-").to_string());
                pids.insert(json["pid"].as_i64().unwrap_or(0));
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "no answer from both workers (so far {workers:?}): {err}\n--- stdout:\n{}\n--- stderr:\n{}",
                    run.stdout(),
                    run.stderr()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        assert!(
            Instant::now() < deadline,
            "only workers {workers:?} answered\n--- stderr:\n{}",
            run.stderr()
        );
    }
    assert_eq!(workers, BTreeSet::from(["0".into(), "1".into()]));
    pids
}

/// Both workers are ready, both answer through the shared port, none restarted; the
/// processes corepool started are launchers: the answers come from other processes.
fn serves_behind(cmd: &[&str], env: &[(&str, &str)]) -> Run {
    let (run, port) = start(cmd, &[], env);
    launchers_do_not_answer(run, port)
}

fn launchers_do_not_answer(run: Run, port: u16) -> Run {
    run.wait_stderr("ready (pid", 2, SECS(90));
    let answered = both_answer(&run, port);
    let launchers: BTreeSet<i64> = started_pids(&run.stderr())
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(launchers.len(), 2, "{}", run.stderr());
    assert!(
        answered.is_disjoint(&launchers),
        "a launcher (pids {launchers:?}) answered itself ({answered:?})"
    );
    assert!(
        !run.stderr().contains("exited"),
        "a worker exited:\n{}\n{}",
        run.stderr(),
        run.stdout()
    );
    run
}

#[test]
fn npm_start() {
    serves_behind(&["npm", "start"], &[]);
}

#[test]
fn npm_run_start() {
    serves_behind(&["npm", "run", "start"], &[]);
}

#[test]
fn pnpm_start() {
    serves_behind(&["pnpm", "start"], &[]);
}

#[test]
fn yarn_start() {
    serves_behind(&["yarn", "start"], &[]);
}

#[test]
fn npx_bin() {
    serves_behind(&["npx", "hello-server"], &[]);
}

#[test]
fn dotenv_cli() {
    let (run, port) = start(
        &["dotenv", "-e", ".env", "--", "node", "server.js"],
        &[],
        &[],
    );
    run.wait_stderr("ready (pid", 2, SECS(90));
    both_answer(&run, port);
    let json = get_json(port).unwrap();
    assert_eq!(json["greeting"], "from-dotenv");
    assert!(!started_pids(&run.stderr()).contains(&(json["pid"].as_i64().unwrap() as i32)));
}

/// tsx gives its child an IPC channel at fd 3 (because process.send exists): the socket and
/// the pipe go to other descriptors, named in the child's environment.
#[test]
fn tsx() {
    serves_behind(&["tsx", "server.ts"], &[]);
}

#[test]
fn node_wrapper_with_inherited_stdio() {
    serves_behind(&["node", "wrapper.js"], &[]);
}

/// A wrapper that gives its child pipes of its own at fd 3 and 4: the child's preload must not
/// take fd 3 for the socket nor write READY to fd 4; it gets corepool's at other numbers.
#[test]
fn descriptors_not_corepools_are_left_alone() {
    let run = serves_behind(&["node", "wrapper.js"], &[("WRAPPER_STDIO", "pipes")]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !run.stdout().contains("wrapper got on fd"),
        "the preload wrote to the wrapper's own pipe:\n{}",
        run.stdout()
    );
}

/// An app running node:cluster: its primary adopts the slot's socket when the cluster
/// workers' listen reaches it, and deals connections to them; fd 3 and 4 of a cluster worker
/// (its IPC channel and epoll descriptor) are left alone.
#[test]
fn cluster_app() {
    let (run, port) = start(&["node", "cluster.js"], &[], &[("CLUSTER_WORKERS", "2")]);
    run.wait_stderr("ready (pid", 2, SECS(90));
    run.wait_stdout("listening", 4, SECS(30));
    let pids = both_answer(&run, port);
    let mut greetings = BTreeSet::new();
    for _ in 0..20 {
        let json = get_json(port).unwrap();
        greetings.insert(json["greeting"].as_str().unwrap().to_string());
    }
    assert!(
        greetings.iter().all(|g| g.starts_with("cluster-")),
        "{greetings:?}"
    );
    let launchers: Vec<i32> = started_pids(&run.stderr());
    assert!(pids.iter().all(|p| !launchers.contains(&(*p as i32))));
    assert!(!run.stderr().contains("exited"), "{}", run.stderr());
}

/// A socket-activated server (LISTEN_PID/LISTEN_FDS, then listen({fd: 3}), as adapter-node):
/// that listen is the public one and reports ready, run directly and behind `npm run`
/// (where LISTEN_PID must name the server, not npm).
#[test]
fn socket_activation_listen_fd_3() {
    let run = serves_behind(&["npm", "run", "start:fd"], &[]);
    run.assert_stdout_count("listening on file descriptor 3", 2);
    let (run, port) = start(&["node", "socket-activation.js"], &[], &[]);
    run.wait_stderr("ready (pid", 2, SECS(60));
    both_answer(&run, port);
    run.assert_stdout_count("listening on file descriptor 3", 2);
}

/// A real SvelteKit app built with adapter-node (socket activation: it checks LISTEN_PID and
/// calls listen({fd: 3})): ready and serving run directly, and behind `npm start`.
#[test]
fn sveltekit_adapter_node() {
    let dir = sveltekit_dir();
    let (run, port) = start_in(dir, &["node", "build"], &[], &[]);
    run.wait_stderr("ready (pid", 2, SECS(60));
    both_answer(&run, port);
    run.assert_stdout_count("Listening on file descriptor 3", 2);
    assert!(!run.stderr().contains("exited"), "{}", run.stderr());
    drop(run);
    let (run, port) = start_in(dir, &["npm", "start"], &[], &[]);
    let run = launchers_do_not_answer(run, port);
    run.assert_stdout_count("Listening on file descriptor 3", 2);
}

/// pm2's unguarded process.send('ready'): no TypeError, the callback runs, nothing restarts.
#[test]
fn unguarded_process_send() {
    let (run, port) = start(&["node", "wait-ready.js"], &[], &[]);
    run.wait_stderr("ready (pid", 2, SECS(60));
    run.wait_stdout("send callback", 2, SECS(30));
    both_answer(&run, port);
    assert!(run.stdout().contains("sent ready at"), "{}", run.stdout());
    assert!(!run.stderr().contains("TypeError"), "{}", run.stderr());
    assert!(!run.stderr().contains("exited"), "{}", run.stderr());
}

/// Waits until both workers are ready, then asserts that each became ready at least `quiet`
/// after it listened: corepool's "ready (pid P) after N ms" counts from the spawn, the worker
/// prints its own uptime when it listens, and the spawn comes before the worker's start, so
/// N >= uptime + quiet holds for a worker that was made ready by its later message, whatever
/// the machine's load (a wall-clock window read by the test would not).
fn ready_only_after(run: &Run, quiet: Duration, then: Duration) {
    run.wait_stdout("listening at", 2, SECS(90));
    run.wait_stderr("ready (pid", 2, then);
    let (out, err) = (run.stdout(), run.stderr());
    for line in err.lines().filter(|l| l.contains(" ready (pid ")) {
        // "worker N ready (pid P) after M ms"
        let worker = line
            .split("worker ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .unwrap_or_else(|| panic!("no worker number in {line:?}"));
        let after: u64 = line
            .rsplit("after ")
            .next()
            .and_then(|r| r.trim().strip_suffix("ms"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no 'after N ms' in {line:?}"));
        let uptime: u64 = out
            .lines()
            .find(|l| l.starts_with(&format!("worker {worker} listening at ")))
            .and_then(|l| l.rsplit("uptime ").next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no listening line of worker {worker}:\n{out}"));
        assert!(
            after >= uptime + quiet.as_millis() as u64,
            "worker {worker} was ready {after} ms after its spawn, but it listened at {uptime} ms \
             of its life and sends 'ready' {quiet:?} later at the earliest:\n{err}\n{out}"
        );
    }
}

/// `--ready-on message`: a server that listens at once and sends 'ready' 3 s later is not
/// ready before that (pm2's wait_ready); without it, it is ready as soon as it listens.
#[test]
fn ready_on_message_waits_for_the_message() {
    let env = [("READY_DELAY_MS", "3000")];
    let (run, port) = start(&["node", "wait-ready.js"], &["--ready-on", "message"], &env);
    ready_only_after(&run, Duration::from_millis(2000), SECS(30));
    both_answer(&run, port);
    drop(run);
    let (run, _) = start(&["node", "wait-ready.js"], &[], &env);
    run.wait_stdout("listening at", 2, SECS(90));
    run.wait_stderr("ready (pid", 2, SECS(30));
    assert!(
        !run.stdout().contains("sent ready"),
        "listen mode waited for the message:\n{}",
        run.stdout()
    );
}

/// The same behind `npm run`: the message comes from npm's grandchild.
#[test]
fn ready_on_message_behind_npm() {
    let env = [("READY_DELAY_MS", "3000")];
    let (run, port) = start(
        &["npm", "run", "start:ready"],
        &["--ready-on", "message"],
        &env,
    );
    ready_only_after(&run, Duration::from_millis(2000), SECS(30));
    both_answer(&run, port);
}

/// A worker that never sends 'ready' under `--ready-on message` is restarted at the ready
/// timeout, and the log says what it waited for.
#[test]
fn ready_on_message_never_sent_is_named() {
    let (run, _) = start(
        &["node", "wait-ready.js"],
        &["--ready-on", "message", "--ready-timeout", "2s"],
        &[("READY_DELAY_MS", "600000")],
    );
    run.wait_stderr("and it never did", 1, SECS(60));
    assert!(!run.stderr().contains("ready (pid"), "{}", run.stderr());
}

/// `--ready-on message` needs socket mode: one line naming the flag, exit 2.
#[test]
fn ready_on_message_needs_socket_mode() {
    for mode in ["proxy", "none"] {
        let (code, _, err) = run_to_end(
            &["--balance", mode, "--ready-on", "message", "--", "true"],
            &[],
            SECS(10),
        );
        assert_eq!(code, 2, "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("--ready-on"), "{err}");
    }
    let (code, _, err) = run_to_end(&["--ready-on", "soon", "--", "true"], &[], SECS(10));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--ready-on"), "{err}");
}
