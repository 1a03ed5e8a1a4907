//! What an operator sees: /metrics, /healthz and /readyz that tell the truth, `corepool health`,
//! `corepool status` and `corepool reload` over the control socket, the shutdown delay, the
//! heap share under a real cgroup v1 memory limit, and --max-memory replacing a fat worker.

mod common;

use common::*;
use std::process::Command;
use std::time::{Duration, Instant};

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn client(args: &[&str], control: &str) -> (i32, String, String) {
    control_client(control, args)
}

fn pool(port: u16, metrics: u16, control: &str, extra: &[&str]) -> Run {
    let metrics = format!("127.0.0.1:{metrics}");
    let mut args = socket_args(2, port, &["--metrics", &metrics]);
    args.extend(
        extra
            .iter()
            .chain(&["--", "node", HELLO])
            .map(|a| a.to_string()),
    );
    Run::start(&args, &[("COREPOOL_CONTROL", control)])
}

#[test]
fn metrics_health_and_readiness_tell_the_truth() {
    let (port, mport) = (free_port(), free_port());
    let run = pool(port, mport, &control_name("metrics"), &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let (code, body) = http(mport, "GET", "/metrics").unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        metric(&body, "corepool_info{version=\"0.1.0\",balance=\"socket\"}"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, "corepool_workers{state=\"running\"}"),
        Some(2.0),
        "{body}"
    );
    assert_eq!(metric(&body, "corepool_workers_ready"), Some(2.0), "{body}");
    for slot in 0..2 {
        let rss = metric(
            &body,
            &format!("corepool_worker_rss_bytes{{slot=\"{slot}\"}}"),
        )
        .unwrap();
        assert!(rss > 10e6, "slot {slot} RSS {rss}");
        assert!(
            metric(
                &body,
                &format!("corepool_worker_cpu_seconds_total{{slot=\"{slot}\"}}")
            )
            .unwrap()
                > 0.0
        );
        assert_eq!(
            metric(
                &body,
                &format!("corepool_worker_restarts_total{{slot=\"{slot}\"}}")
            ),
            Some(0.0)
        );
    }
    assert_eq!(http(mport, "GET", "/healthz").unwrap().0, 200);
    assert_eq!(http(mport, "GET", "/readyz").unwrap().0, 200);
    assert_eq!(http(mport, "GET", "/nope").unwrap().0, 404);
    assert_eq!(http(mport, "POST", "/metrics").unwrap().0, 405);

    // SAFETY: kill(2) on a worker corepool reported.
    unsafe { libc::kill(started_pids(&run.stderr())[0], libc::SIGKILL) };
    run.wait_stderr(" ready (pid", 3, SECS(15));
    let (_, body) = http(mport, "GET", "/metrics").unwrap();
    assert_eq!(
        metric(&body, "corepool_worker_restarts_total{slot=\"0\"}"),
        Some(1.0),
        "{body}"
    );
}

#[test]
fn readyz_fails_until_enough_workers_are_ready() {
    let (port, mport) = (free_port(), free_port());
    let (p, m) = (port.to_string(), format!("127.0.0.1:{mport}"));
    // Slot 1 never listens; --min-ready 2 can't be met.
    let script =
        format!("if [ \"$COREPOOL_WORKER\" = 1 ]; then exec sleep 60; fi; exec node {HELLO}");
    let run = Run::start(
        &[
            "-i",
            "2",
            "--balance",
            "socket",
            "--host",
            "127.0.0.1",
            "-p",
            &p,
            "--metrics",
            &m,
            "--min-ready",
            "2",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[("COREPOOL_CONTROL", &control_name("readyz"))],
    );
    run.wait_stderr("worker 0 ready", 1, SECS(15));
    let (code, body) = http(mport, "GET", "/readyz").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("1 of 2 workers ready, 2 needed"), "{body}");
    assert_eq!(
        http(mport, "GET", "/healthz").unwrap().0,
        200,
        "liveness does not depend on the workers"
    );
}

#[test]
fn the_health_command() {
    let (port, mport) = (free_port(), free_port());
    let control = control_name("health");
    let run = pool(port, mport, &control, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    assert_eq!(
        client(&["health", &format!("127.0.0.1:{mport}")], &control).0,
        0
    );
    let out = Command::new(bin())
        .arg("health")
        .env("COREPOOL_METRICS", format!(":{mport}"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "wildcard :PORT is probed on loopback"
    );
    let (code, _, err) = client(&["health", &format!("127.0.0.1:{}", free_port())], &control);
    assert_eq!(code, 1);
    assert!(
        err.starts_with("corepool: unhealthy:") && err.lines().count() == 1,
        "{err}"
    );
    let out = Command::new(bin())
        .arg("health")
        .env_remove("COREPOOL_METRICS")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "never 2: Docker reserves it");
    // Without ADDR, the address the pool itself reads: a flag, the config file (named or
    // ./corepool.toml), as corepool resolves them.
    let dir = scratch("health-config");
    let file = dir.join("corepool.toml");
    std::fs::write(&file, format!("metrics = \"127.0.0.1:{mport}\"\n")).unwrap();
    let health = |args: &[&str], cwd: &std::path::Path| {
        let out = Command::new(bin())
            .arg("health")
            .args(args)
            .current_dir(cwd)
            .env_remove("COREPOOL_METRICS")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let elsewhere = std::env::temp_dir();
    assert_eq!(health(&[], &dir).0, Some(0), "./corepool.toml");
    let named = file.to_str().unwrap();
    assert_eq!(
        health(&["-c", named], &elsewhere).0,
        Some(0),
        "--config FILE"
    );
    let flag = format!("127.0.0.1:{mport}");
    assert_eq!(health(&["--metrics", &flag], &elsewhere).0, Some(0));
    for bad in [&["--bogus"][..], &["a", "b"][..]] {
        let (code, err) = health(bad, &dir);
        assert_eq!(code, Some(1), "never 2, even for bad usage {bad:?}: {err}");
    }
}

#[test]
fn status_and_reload_from_inside_the_container() {
    let (port, mport) = (free_port(), free_port());
    let control = control_name("status");
    let run = pool(port, mport, &control, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let pids = started_pids(&run.stderr());
    let (code, table, err) = client(&["status"], &control);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("SLOT") && lines[0].contains("RSS") && lines[0].contains("CPU%"),
        "{table}"
    );
    assert_eq!(lines.len(), 3, "{table}");
    for (slot, pid) in pids.iter().enumerate() {
        let row = lines[slot + 1];
        assert!(
            row.contains(&pid.to_string()) && row.contains("running") && row.contains("yes"),
            "{row}"
        );
    }
    let (code, json, _) = client(&["status", "--json"], &control);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let listed: Vec<i64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(
        listed,
        pids.iter().map(|&p| i64::from(p)).collect::<Vec<_>>()
    );

    let (code, out, _) = client(&["reload"], &control);
    assert_eq!(code, 0);
    assert!(out.starts_with("ok"), "{out}");
    run.wait_stderr("rolling reload complete", 1, SECS(15));
    let (_, body) = http(mport, "GET", "/metrics").unwrap();
    assert_eq!(metric(&body, "corepool_reloads_total"), Some(1.0));

    // Another user is refused; no pool under a name answers with a clear message.
    require("setpriv");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "status",
        ])
        .env("COREPOOL_CONTROL", &control)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    let (code, _, err) = client(&["status"], &control_name("nobody-here"));
    assert_eq!(code, 1);
    assert!(err.contains("no corepool is running"), "{err}");
}

#[test]
fn the_shutdown_delay_withdraws_readiness_first() {
    let (port, mport) = (free_port(), free_port());
    let mut run = pool(
        port,
        mport,
        &control_name("delay"),
        &["--shutdown-delay", "1500ms"],
    );
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let started = Instant::now();
    run.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(mport, "GET", "/readyz").unwrap().0, 503);
    while started.elapsed() < Duration::from_millis(1100) {
        assert_eq!(
            http(port, "GET", "/").unwrap().0,
            200,
            "workers stopped serving during the delay"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(run.exit_code(SECS(10)), 0);
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let err = run.stderr();
    assert!(
        err.contains("shutdown delay of 1500ms") && err.contains("shutdown delay over"),
        "{err}"
    );
}

#[test]
fn a_metrics_address_in_use_fails_before_any_worker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let m = format!("127.0.0.1:{}", taken.local_addr().unwrap().port());
    let mut run = Run::start(&["-i", "1", "--metrics", &m, "--", "sleep", "5"], &[]);
    assert_eq!(run.exit_code(SECS(5)), 3);
    assert!(
        run.stderr().contains("--metrics") && run.stderr().contains(&m),
        "{}",
        run.stderr()
    );
    assert!(!run.stderr().contains("started, pid"));
}

/// A cgroup v1 memory directory, removed on drop.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn new(limit: u64) -> MemoryCgroup {
        let root = std::path::Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "prerequisite missing: cgroup v1 memory controller at {}",
            root.display()
        );
        let dir = root.join(format!("corepool-test-heap-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        MemoryCgroup(dir)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn heap_share_under_a_real_memory_limit() {
    let cg = MemoryCgroup::new(1 << 30);
    let report = "console.log('opts=' + process.env.NODE_OPTIONS + ' limit=' + require('v8').getHeapStatistics().heap_size_limit)";
    let run_in = |extra: &str, env: &[(&str, &str)]| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} -i 2 --restart never {extra} -- node -e \"{report}\"",
            cg.0.display(),
            bin()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut run = Run::from_command(cmd, env);
        assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
        (run.stdout(), run.stderr())
    };
    let (out, err) = run_in("", &[]);
    assert!(
        err.contains("memory limit 1024 MiB") && err.contains("--max-old-space-size=358"),
        "{err}"
    );
    // --print-config shows what `auto` comes to under this limit.
    let (printed, _) = run_in("--print-config", &[]);
    assert!(
        printed.contains("# heap share: memory limit 1024 MiB")
            && printed.contains("--max-old-space-size=358"),
        "{printed}"
    );
    assert_eq!(
        out.matches("opts=--max-old-space-size=358 ").count(),
        2,
        "{out}"
    );
    for line in out.lines() {
        let limit: f64 = line.rsplit('=').next().unwrap().parse().unwrap();
        assert!(
            (358.0 * 1048576.0..460.0 * 1048576.0).contains(&limit),
            "heap limit {limit}: {line}"
        );
    }
    let (out, _) = run_in("", &[("NODE_OPTIONS", "--max-old-space-size=300")]);
    assert_eq!(
        out.matches("opts=--max-old-space-size=300 ").count(),
        2,
        "the user's value must win: {out}"
    );
    let (out, _) = run_in("--heap-share off", &[]);
    assert_eq!(out.matches("opts=undefined").count(), 2, "{out}");
    // Socket mode adds its preload to the same variable: one NODE_OPTIONS with both.
    let port = format!("--balance socket --ready-timeout 5s -p {}", free_port());
    let (out, _) = run_in(&port, &[]);
    for line in out.lines() {
        assert!(
            line.starts_with("opts=--max-old-space-size=358 --require ")
                || line.starts_with("opts=--require ")
                    && line.contains(" --max-old-space-size=358 "),
            "{}…",
            &line[..line.len().min(120)]
        );
        let limit: f64 = line.rsplit('=').next().unwrap().parse().unwrap();
        assert!(limit < 460.0 * 1048576.0, "heap share ignored: {line}");
    }
    assert_eq!(out.lines().count(), 2, "{out}");
}

#[test]
fn max_memory_replaces_a_fat_worker() {
    let mport = free_port();
    let m = format!("127.0.0.1:{mport}");
    let fat = "const b = Buffer.alloc(150 * 1024 * 1024, 1); setInterval(() => b[0]++, 1000)";
    let run = Run::start(
        &[
            "-i",
            "1",
            "--max-memory",
            "100MiB",
            "--metrics",
            &m,
            "--",
            "node",
            "-e",
            fat,
        ],
        &[("COREPOOL_CONTROL", &control_name("maxmem"))],
    );
    run.wait_stderr("above --max-memory 100 MiB", 1, SECS(20));
    run.wait_stderr("replacement started", 1, SECS(5));
    let (_, body) = http(mport, "GET", "/metrics").unwrap();
    assert!(
        metric(&body, "corepool_memory_restarts_total").unwrap() >= 1.0,
        "{body}"
    );
}
