//! A pool larger than the machine starts without missing its ready timeouts: at most
//! `--start-concurrency` workers are spawned and not yet ready at once, the others wait
//! (`queued` in `corepool status`), and each one's `--ready-timeout` counts from its own spawn.

mod common;

use common::*;
use std::process::Command;

/// A server that burns `BURN_MS` of CPU (its own, not wall time) before it listens: a Node app
/// that compiles and warms up at start.
const SLOW_SERVER: &str = "const burn = Number(process.env.BURN_MS) * 1000;\n\
     while (process.cpuUsage().user + process.cpuUsage().system < burn) {}\n\
     require('http').createServer((q, s) => s.end('ok'))\n\
       .listen(process.env.PORT);\n";

const WORKERS: usize = 60;

/// The tests of this file measure CPU-bound starts: one at a time, never sharing the CPUs.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// 60 workers of 0.4 s CPU each (0.3 s burnt, Node's own start) under an 8 s ready timeout:
/// started all at once on 2 CPUs they need 12 s or more together, and on a box with L other
/// runnable tasks each gets 2 / (L + 60) of a CPU, so they miss the timeout whatever the load.
/// Two at a time, each gets 2 / (L + 2): enough up to a load of about 35.
fn slow_pool(concurrency: &str, control: &str) -> Run {
    slow_pool_of(WORKERS, concurrency, control)
}

fn slow_pool_of(workers: usize, concurrency: &str, control: &str) -> Run {
    let port = free_port();
    let args = socket_args(
        workers,
        port,
        &[
            "--start-concurrency",
            concurrency,
            "--ready-timeout",
            "8s",
            "--fail-fast",
            "0",
            "--max-restarts",
            "0",
            "--",
            "node",
            "-e",
            SLOW_SERVER,
        ],
    );
    Run::start(&args, &[("BURN_MS", "300"), ("COREPOOL_CONTROL", control)])
}

fn status(control: &str) -> String {
    client(&["status"], control)
}

fn client(args: &[&str], control: &str) -> String {
    let out = Command::new(bin())
        .args(args)
        .env("COREPOOL_CONTROL", control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_pool_larger_than_the_machine_starts_a_few_at_a_time() {
    require("node");
    let _alone = alone();
    let control = format!("cp-test-starts-{}", std::process::id());
    let mut run = slow_pool("2", &control);
    run.wait_stderr("workers queued: at most 2 start at once", 1, SECS(10));
    // The queue is there for `status` to see, and no more than 2 workers are starting.
    let table = status(&control);
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), WORKERS, "{table}");
    let queued = rows.iter().filter(|r| r.contains("queued")).count();
    let starting = rows.iter().filter(|r| r.contains("starting")).count();
    assert!(queued > WORKERS / 2, "few queued:\n{table}");
    assert!(starting <= 2, "{starting} starting at once:\n{table}");
    run.wait_stderr(" ready (pid", WORKERS, SECS(120));
    let err = run.stderr();
    assert!(
        !err.contains("not ready after"),
        "a worker timed out:\n{err}"
    );
    assert_eq!(started_pids(&err).len(), WORKERS, "{err}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());

    // The same pool with no bound (`0`, corepool's old behaviour) misses its timeouts: the
    // part above fails without the bound.
    let control = format!("cp-test-unbounded-{}", std::process::id());
    let mut run = slow_pool("0", &control);
    run.wait_stderr("not ready after 8s: restarting it", 1, SECS(60));
    assert!(!run.stderr().contains("workers queued"), "{}", run.stderr());
    run.signal(libc::SIGTERM);
    run.exit_code(SECS(15));
}

/// `corepool scale` adds its workers through the same bound.
#[test]
fn a_scale_up_starts_a_few_at_a_time_too() {
    require("node");
    let _alone = alone();
    let control = format!("cp-test-scale-starts-{}", std::process::id());
    let mut run = slow_pool_of(2, "2", &control);
    run.wait_stderr(" ready (pid", 2, SECS(30));
    assert!(!run.stderr().contains("workers queued"), "{}", run.stderr());
    let answer = client(&["scale", "20"], &control);
    assert!(answer.contains("scaling from 2 to 20"), "{answer}");
    run.wait_stderr("16 workers queued: at most 2 start at once", 1, SECS(10));
    run.wait_stderr(" ready (pid", 20, SECS(120));
    let err = run.stderr();
    assert!(
        !err.contains("not ready after"),
        "a worker timed out:\n{err}"
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}
