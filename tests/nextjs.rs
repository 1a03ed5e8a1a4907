//! A real Next.js standalone server (tests/fixtures/nextapp, a force-dynamic page) under corepool
//! in socket mode: both workers serve the one public port, a worker killed with SIGKILL under
//! load refuses no connection, and a SIGHUP rolling reload under load fails no request.
//!
//! The fixture is built by tests/fixtures/nextapp/build.sh (npm ci + next build, cached while
//! the lockfile and sources are unchanged); it needs node and npm, and fails loudly without.

mod common;

use common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn build_fixture() -> std::path::PathBuf {
    require("npm");
    std::path::PathBuf::from(fixture("tests/fixtures/nextapp/build.sh", &[]))
}

/// GET / on a new connection; the `worker=N pid=P` text of the page, or why it failed.
fn get_worker(port: u16) -> Result<String, String> {
    let body = get_ok(port, "/")?;
    let at = body.find("worker=").ok_or("no worker= in page")?;
    let rest = &body[at..];
    Ok(rest[..rest.find('<').unwrap_or(rest.len())].to_string())
}

/// Runs `clients` threads sending requests until `stop`; returns (ok, failures seen).
fn load(
    port: u16,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<(usize, Vec<String>)>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let deadline = Instant::now() + SECS(60);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match get_worker(port) {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e),
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

fn finish(handles: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>) -> (usize, Vec<String>) {
    handles.into_iter().map(|h| h.join().unwrap()).fold(
        (0, Vec::new()),
        |(a, mut f), (ok, failed)| {
            f.extend(failed);
            (a + ok, f)
        },
    )
}

#[test]
fn nextjs_standalone_serves_survives_kill_and_reloads_without_errors() {
    let server = build_fixture();
    let port = free_port();
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(server.parent().unwrap()).args(socket_args(
        2,
        port,
        &["--", "node", "server.js"],
    ));
    let mut run = Run::from_command(cmd, &[("NEXT_TELEMETRY_DISABLED", "1")]);
    run.wait_stderr(" ready (pid", 2, SECS(30));

    // Both workers answer on the one port.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60 {
        seen.insert(get_worker(port).expect("request"));
    }
    let slots: std::collections::HashSet<_> = seen
        .iter()
        .map(|w| w.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(slots.len(), 2, "both workers should serve: {seen:?}");

    // SIGKILL a worker under load: no request fails, the pool is back to two.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(port, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(700));
    let victim = started_pids(&run.stderr())[0];
    // SAFETY: kill(2) on a worker pid corepool reported.
    assert_eq!(unsafe { libc::kill(victim, libc::SIGKILL) }, 0);
    run.wait_stderr(" ready (pid", 3, SECS(30));
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = finish(clients);
    // A SIGKILL takes the requests the victim was answering with it (at most one per client);
    // what must not happen is a refused or unanswered new connection.
    let refused: Vec<_> = failed.iter().filter(|e| e.starts_with("connect")).collect();
    assert!(
        refused.is_empty(),
        "connections refused around the kill: {refused:?}"
    );
    assert!(
        failed.len() <= 4,
        "{} of {} requests failed around the kill: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "too few requests got through: {ok}");

    // SIGHUP rolling reload under load: no request fails, new pids serve afterwards.
    let stop = Arc::new(AtomicBool::new(false));
    let clients = load(port, 4, stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload complete", 1, SECS(60));
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = finish(clients);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the reload: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    let replacements: Vec<i32> = run
        .stderr()
        .lines()
        .filter_map(|l| {
            l.split_once("replacement started, pid ")
                .map(|(_, p)| p.trim().parse().unwrap())
        })
        .collect();
    assert_eq!(replacements.len(), 2, "{}", run.stderr());
    for _ in 0..40 {
        let w = get_worker(port).unwrap();
        let pid: i32 = w.rsplit('=').next().unwrap().parse().unwrap();
        assert!(
            replacements.contains(&pid),
            "an old worker still serves: {w} (new: {replacements:?})"
        );
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
}
