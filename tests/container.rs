//! corepool as PID 1 of a real OCI container: podman (Debian's Docker-compatible CLI) with runc,
//! on an image built here by tests/container/setup.sh (a local Node 20 base, the static
//! corepool, tests/container/app/server.js). Each test runs its own container (a unique name,
//! removed by a guard even when the test fails), with `--network host` and ports of its own,
//! and drives it as a user would: `podman run/stop/kill/exec/healthcheck run`, CPU and memory
//! limits, a read-only root, a numeric user without capabilities.
//!
//! Needs root and podman: setup.sh installs podman, runc and debootstrap when missing (a test
//! fails, never skips, when that is impossible).

mod common;

use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The test image, built (or found in the cache) once per test run.
fn image() -> &'static str {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let image = fixture("tests/container/setup.sh", &[]);
        require("podman");
        image
    })
}

/// `podman` with the runtime settings this host needs (crun refuses cgroup v1; no systemd).
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    cmd
}

/// Runs `podman ARGS` to its end: (exit code, stdout, stderr).
fn podman_out(args: &[&str]) -> (i32, String, String) {
    let out = podman()
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run podman {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A container running the test image, attached (`podman run` without `-d`, so its output and
/// exit code are the container's). Removed with `podman rm -f` when dropped.
struct Container {
    name: String,
    port: u16,
    run: Run,
}

impl Container {
    /// `podman run OPTS -e ENV... IMAGE` with the app on a free port, metrics on another and a
    /// control socket named after the container (abstract sockets are per network namespace,
    /// and the host's is shared here).
    fn start(test: &str, opts: &[&str], env: &[(&str, &str)]) -> Container {
        let image = image();
        let name = format!("corepool-test-{test}-{}", std::process::id());
        let _ = podman_out(&["rm", "-f", "-t", "0", &name]);
        let port = free_port();
        let metrics = free_port();
        let mut cmd = podman();
        cmd.args(["run", "--name", &name, "--network", "host"])
            .args(opts)
            .args(["-e", &format!("COREPOOL_PORT={port}")])
            .args(["-e", &format!("COREPOOL_METRICS=127.0.0.1:{metrics}")])
            .args(["-e", &format!("COREPOOL_CONTROL={name}")])
            .args(["-e", "COREPOOL_HOST=127.0.0.1"]);
        for (k, v) in env {
            cmd.args(["-e", &format!("{k}={v}")]);
        }
        cmd.arg(image);
        Container {
            name,
            port,
            run: Run::from_command(cmd, &[]),
        }
    }

    /// Waits until `n` workers have said they are ready.
    fn wait_ready(&self, n: usize) {
        self.run.wait_stderr(" ready (pid ", n, SECS(60));
    }

    /// `podman exec NAME ARGS...`: (exit code, stdout, stderr).
    fn exec(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        podman_out(&all)
    }

    /// `podman inspect --format FORMAT NAME`, trimmed.
    fn inspect(&self, format: &str) -> String {
        let (code, out, err) = podman_out(&["inspect", "--format", format, &self.name]);
        assert_eq!(code, 0, "podman inspect {}: {err}", self.name);
        out.trim().to_string()
    }

    /// `podman stop [EXTRA] NAME`: how long it took; fails the test if podman stop fails.
    fn stop(&self, extra: &[&str]) -> Duration {
        let started = Instant::now();
        let mut args = vec!["stop"];
        args.extend_from_slice(extra);
        args.push(&self.name);
        let (code, _, err) = podman_out(&args);
        let took = started.elapsed();
        assert_eq!(code, 0, "podman stop {}: {err}", self.name);
        took
    }

    /// The container's exit code, once `podman run` has returned.
    fn exit_code(&mut self) -> i32 {
        let attached = self.run.exit_code(SECS(60));
        let recorded = self.inspect("{{.State.ExitCode}}");
        assert_eq!(
            recorded,
            attached.to_string(),
            "podman run and podman inspect disagree"
        );
        attached
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman_out(&["rm", "-f", "-t", "0", &self.name]);
    }
}

#[test]
fn pid1_two_workers_under_cpus_1_5_each_with_a_share_of_512m() {
    let c = Container::start("cpus15", &["--cpus", "1.5", "--memory", "512m"], &[]);
    c.wait_ready(2);
    let log = c.run.stderr();
    assert!(log.contains("starting 2 workers ("), "{log}");
    assert!(log.contains("running as PID 1"), "{log}");
    let (code, comm, err) = c.exec(&["cat", "/proc/1/comm"]);
    assert_eq!((code, comm.trim()), (0, "corepool"), "{err}");
    // 70% of 512 MiB over 2 workers = 179 MiB of old space; V8 adds its young generation.
    assert!(log.contains("--max-old-space-size=179"), "{log}");
    let answer = get_json(c.port).expect("the app answers");
    let heap = answer["heap_mib"].as_u64().unwrap();
    assert!(
        (179..=200).contains(&heap),
        "heap limit {heap} MiB: {answer}"
    );
}

#[test]
fn one_worker_under_cpus_1() {
    let c = Container::start("cpus1", &["--cpus", "1"], &[]);
    c.wait_ready(1);
    let log = c.run.stderr();
    assert!(log.contains("starting 1 worker ("), "{log}");
    get_json(c.port).expect("the app answers");
}

#[test]
fn one_worker_under_cpuset_cpus_0() {
    let c = Container::start("cpuset0", &["--cpuset-cpus", "0"], &[]);
    c.wait_ready(1);
    let log = c.run.stderr();
    assert!(log.contains("starting 1 worker ("), "{log}");
    assert!(
        log.contains("1 usable CPU") || log.contains("affinity"),
        "{log}"
    );
}

#[test]
fn podman_stop_answers_the_request_in_flight_and_exits_0() {
    let mut c = Container::start("stop", &["--cpus", "1"], &[]);
    c.wait_ready(1);
    let port = c.port;
    let request = std::thread::spawn(move || get_ok(port, "/slow?ms=1500"));
    c.run.wait_stdout("slow start", 1, SECS(20));
    let took = c.stop(&[]);
    let answer = request.join().unwrap();
    eprintln!("podman stop with a request in flight took {took:?}");
    assert!(answer.is_ok(), "the request in flight: {answer:?}");
    assert_eq!(c.exit_code(), 0, "{}", c.run.stderr());
    assert!(
        took >= Duration::from_millis(900) && took < SECS(8),
        "podman stop took {took:?}"
    );
}

#[test]
fn podman_stop_t_2_ends_a_worker_ignoring_sigterm_with_corepool_s_kill_not_the_runtime_s() {
    let mut c = Container::start(
        "ignoreterm",
        &["--cpus", "1"],
        &[("APP_MODE", "ignore-term"), ("COREPOOL_KILL_TIMEOUT", "1s")],
    );
    c.run.wait_stdout("SIGTERM trap set", 1, SECS(60));
    c.wait_ready(1);
    let took = c.stop(&["-t", "2"]);
    eprintln!("podman stop -t 2, kill timeout 1s, a worker ignoring SIGTERM: {took:?}");
    // 1: corepool's own SIGKILL after its kill timeout; 137 would be podman's after 2 s.
    assert_eq!(c.exit_code(), 1, "{}", c.run.stderr());
    assert!(c.run.stdout().contains("SIGTERM ignored"));
    assert!(
        c.run.stderr().contains("SIGKILL"),
        "corepool says it killed: {}",
        c.run.stderr()
    );
}

#[test]
fn podman_kill_hup_under_load_reloads_without_a_failed_request() {
    let c = Container::start("hup", &["--cpus", "2"], &[]);
    c.wait_ready(2);
    let done = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (done, ok, failed, port) = (done.clone(), ok.clone(), failed.clone(), c.port);
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    match get_json(port) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failed.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (code, _, err) = podman_out(&["kill", "-s", "HUP", &c.name]);
    assert_eq!(code, 0, "podman kill -s HUP: {err}");
    c.run.wait_stderr("rolling reload complete", 1, SECS(60));
    std::thread::sleep(Duration::from_millis(300));
    done.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    let ok = ok.load(Ordering::Relaxed);
    eprintln!(
        "reload under load: {ok} requests answered, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(ok > 20, "only {ok} requests during the reload");
    assert_eq!(started_pids(&c.run.stderr()).len(), 4);
}

#[test]
fn a_worker_killed_with_sigkill_is_restarted() {
    let c = Container::start("kill9", &["--cpus", "1"], &[]);
    c.wait_ready(1);
    let pid = started_pids(&c.run.stderr())[0];
    let (code, _, err) = c.exec(&["sh", "-c", &format!("kill -9 {pid}")]);
    assert_eq!(code, 0, "kill -9 {pid} in the container: {err}");
    c.run.wait_stderr(" started, pid ", 2, SECS(30));
    c.wait_ready(2);
    let log = c.run.stderr();
    assert!(
        log.contains(&format!("worker 0 (pid {pid}) exited: signal")),
        "{log}"
    );
    get_json(c.port).expect("the restarted worker answers");
}

#[test]
fn healthcheck_is_healthy_while_serving_and_unhealthy_while_no_worker_is_ready() {
    let serving = Container::start("healthy", &["--cpus", "1"], &[]);
    let unready = Container::start("unready", &["--cpus", "1"], &[("APP_MODE", "no-listen")]);
    serving.wait_ready(1);
    unready.run.wait_stderr("worker 0 started", 1, SECS(60));
    let (code, out, err) = podman_out(&["healthcheck", "run", &serving.name]);
    assert_eq!(code, 0, "healthcheck of a serving pool: {out}{err}");
    assert_eq!(serving.inspect("{{.State.Health.Status}}"), "healthy");
    // Its supervisor loop turns (/healthz is 200), but nothing serves: not healthy.
    let (code, out, err) = podman_out(&["healthcheck", "run", &unready.name]);
    assert_eq!(code, 1, "healthcheck of a pool never ready: {out}{err}");
    assert_eq!(unready.inspect("{{.State.Health.Status}}"), "unhealthy");
    // Docker reserves exit code 2 of a health check: a bad or missing address is 1.
    for args in [
        &["env", "-u", "COREPOOL_METRICS", "corepool", "health"][..],
        &["corepool", "health", "not-an-address"][..],
        &["corepool", "health", "a", "b"][..],
    ] {
        let (code, _, err) = serving.exec(args);
        assert_eq!(code, 1, "{args:?}: {err}");
    }
    // --live asks only whether corepool's loop turns.
    let (code, _, err) = unready.exec(&["corepool", "health", "--live"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn read_only_root_numeric_user_and_no_capabilities() {
    let mut c = Container::start(
        "readonly",
        &[
            "--cpus",
            "1",
            "--read-only",
            "--user",
            "12345:0",
            "--cap-drop",
            "ALL",
        ],
        &[],
    );
    c.wait_ready(1);
    get_json(c.port).expect("the app answers");
    let (code, out, err) = c.exec(&["sh", "-c", "id -u; grep CapEff /proc/1/status"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("12345") && out.contains("0000000000000000"),
        "{out}"
    );
    let (code, _, err) = c.exec(&["corepool", "status"]);
    assert_eq!(code, 0, "{err}");
    c.stop(&[]);
    assert_eq!(c.exit_code(), 0, "{}", c.run.stderr());
}

#[test]
fn status_and_reload_through_podman_exec() {
    let c = Container::start("control", &["--cpus", "2"], &[]);
    c.wait_ready(2);
    let (code, out, err) = c.exec(&["corepool", "status", "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status --json");
    let workers = status["workers"].as_array().expect("workers");
    assert_eq!(workers.len(), 2, "{out}");
    let (code, out, err) = c.exec(&["corepool", "status"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains("running")).count(),
        2,
        "{out}"
    );
    let (code, _, err) = c.exec(&["corepool", "reload"]);
    assert_eq!(code, 0, "{err}");
    c.run.wait_stderr("rolling reload complete", 1, SECS(60));
    assert_eq!(started_pids(&c.run.stderr()).len(), 4);
}

#[test]
fn an_app_crashing_at_start_ends_the_container_with_its_exit_code() {
    image();
    let started = Instant::now();
    let mut c = Container::start(
        "crash",
        &["--cpus", "1"],
        &[("APP_MODE", "crash"), ("COREPOOL_MAX_RESTARTS", "4")],
    );
    let code = c.exit_code();
    let took = started.elapsed();
    let log = c.run.stderr();
    eprintln!(
        "an app exiting 3 at start, 4 restarts allowed: container exit {code} after {took:?}\n{log}"
    );
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("given up"), "{log}");
    assert!(took < SECS(30), "{took:?}");
}

#[test]
fn two_pools_sharing_a_network_namespace_both_start() {
    // Both are PID 1 of their container and share the host's network namespace, abstract unix
    // sockets included (as the containers of one Kubernetes pod share theirs).
    let a = Container::start("netns-a", &["--cpus", "1"], &[]);
    let b = Container::start("netns-b", &["--cpus", "1"], &[]);
    a.wait_ready(1);
    b.wait_ready(1);
    get_json(a.port).expect("the first pool answers");
    get_json(b.port).expect("the second pool answers");
}
