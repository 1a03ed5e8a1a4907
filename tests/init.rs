//! corepool's duties as an init: PID 1 in a new pid namespace reaps every orphan, signals reach
//! a worker's whole process group, each worker starts clean (own group, empty signal mask, no
//! ignored signals, no stray descriptors, stdin from /dev/null, the pool's variables), and the
//! signals PID 1 must survive do not stop it.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn as_pid1_in_a_pid_namespace_every_orphan_is_reaped() {
    // The worker double-forks 100 sleeps (they re-parent to PID 1, corepool), prints their
    // pids, and waits. The sleeps outlive the count (a short sleep could end before a loaded
    // machine lets the test look); the test then kills them, and no zombie may remain.
    let worker =
        "for i in $(seq 100); do (sleep 120 & echo orphan $!) ; done; echo spawned; exec sleep 120";
    let mut cmd = as_pid1();
    cmd.args(["-i", "1", "--", "sh", "-c", worker]);
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stdout("spawned", 1, SECS(30));
    assert!(
        run.stderr().contains("running as PID 1"),
        "{}",
        run.stderr()
    );
    // corepool is unshare's child; in our namespace it has an ordinary pid.
    let corepool = children_of(run.pid())
        .first()
        .map(|c| c.0)
        .expect("corepool under unshare");
    // Every sleep is now corepool's child (re-parented to PID 1), beside the worker.
    let kids = children_of(corepool);
    assert_eq!(
        kids.len(),
        101,
        "{} children under PID 1: orphans were not re-parented to it",
        kids.len()
    );
    let worker_pid = children_of(corepool)
        .into_iter()
        .map(|c| c.0)
        .find(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("sleep") && c.contains("120") && pgid_of(pid) == pid)
        })
        .expect("the worker leads its own process group");
    for (pid, _) in kids.iter().filter(|k| k.0 != worker_pid) {
        // SAFETY: kill(2) on a pid read from /proc just now; a stale pid only fails with ESRCH.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + SECS(20);
    loop {
        let kids = children_of(corepool);
        let zombies = kids.iter().filter(|k| k.1 == 'Z').count();
        if kids.len() == 1 && zombies == 0 {
            break; // only the worker is left
        }
        assert!(
            Instant::now() < deadline,
            "{} children, {zombies} zombies left under PID 1",
            kids.len()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on corepool's pid as seen here.
    assert_eq!(unsafe { libc::kill(corepool, libc::SIGTERM) }, 0);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

#[test]
fn not_pid1_it_is_a_subreaper_and_still_reaps_orphans() {
    // As tini's reaping test: 100 orphaned sleeps, all gone afterwards, no zombie left.
    let worker = "for i in $(seq 100); do (sleep 0.3 & echo grandchild $!); done; \
                  echo spawned; exec sleep 60";
    let run = Run::start(&["-i", "1", "--", "sh", "-c", worker], &[]);
    run.wait_stdout("spawned", 1, SECS(10));
    assert!(run.stderr().contains("child subreaper"), "{}", run.stderr());
    let grandchildren: Vec<i32> = run
        .stdout()
        .lines()
        .filter_map(|l| l.strip_prefix("grandchild "))
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert_eq!(grandchildren.len(), 100);
    let deadline = Instant::now() + SECS(5);
    while let Some(left) = grandchildren.iter().find(|&&pid| exists(pid)) {
        assert!(
            Instant::now() < deadline,
            "orphan {left} not reaped (zombies under corepool: {:?})",
            zombies_of(run.pid())
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(zombies_of(run.pid()), Vec::<i32>::new());
}

#[test]
fn signals_reach_the_workers_whole_process_group() {
    // The worker and a child of it in the same group each trap the forwarded signals.
    let worker = "trap 'echo leader-$COREPOOL_WORKER-USR1' USR1; trap 'echo leader-$COREPOOL_WORKER-USR2' USR2; \
                  trap 'echo leader-$COREPOOL_WORKER-WINCH' WINCH; \
                  sh -c \"trap 'echo child-USR1' USR1; trap 'echo child-USR2' USR2; trap 'echo child-WINCH' WINCH; \
                  echo child-up; while :; do sleep 0.05; done\" & \
                  while :; do sleep 0.05; done";
    let run = Run::start(&["-i", "2", "--", "sh", "-c", worker], &[]);
    run.wait_stdout("child-up", 2, SECS(5));
    std::thread::sleep(Duration::from_millis(200));
    for (sig, name) in [
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGWINCH, "WINCH"),
    ] {
        run.signal(sig);
        run.wait_stdout(&format!("child-{name}"), 2, SECS(5));
        run.wait_stdout(&format!("leader-0-{name}"), 1, SECS(5));
        run.wait_stdout(&format!("leader-1-{name}"), 1, SECS(5));
    }
}

#[test]
fn each_worker_starts_clean() {
    // grep is the worker itself: its own signal state and descriptors are what corepool gave.
    let run = Run::start(
        &[
            "-i",
            "1",
            "--restart",
            "never",
            "--",
            "grep",
            "-E",
            "^(SigBlk|SigIgn|PPid)",
            "/proc/self/status",
        ],
        &[],
    );
    run.wait_stdout("SigIgn", 1, SECS(5));
    let out = run.stdout();
    assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");

    let script = "echo env $COREPOOL_WORKER $NODE_APP_INSTANCE $COREPOOL_WORKERS; \
                  set -- $(cut -d' ' -f5 /proc/$$/stat); echo pgid $1 pid $$";
    let (code, out, err) = run_to_end(
        &["-i", "3", "--restart", "never", "--", "sh", "-c", script],
        &[],
        SECS(5),
    );
    assert_eq!(code, 0, "{err}");
    for slot in 0..3 {
        assert!(out.contains(&format!("env {slot} {slot} 3")), "{out}");
    }
    for line in out.lines().filter(|l| l.starts_with("pgid ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            f[1], f[3],
            "worker is not its own process group leader: {line}"
        );
    }

    // Descriptors, seen from outside: only 0, 1, 2, with stdin from /dev/null (and in socket
    // mode the listening socket on 3 and the readiness pipe on 4).
    let fds_of = |pid: i32| -> Vec<(i32, String)> {
        let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                let fd = e.file_name().to_string_lossy().parse().unwrap();
                (
                    fd,
                    std::fs::read_link(e.path()).unwrap().display().to_string(),
                )
            })
            .collect();
        fds.sort();
        fds
    };
    let run = Run::start(&["-i", "1", "--", "sleep", "60"], &[]);
    run.wait_stderr("started, pid", 1, SECS(5));
    let fds = fds_of(started_pids(&run.stderr())[0]);
    assert_eq!(
        fds.iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![0, 1, 2],
        "{fds:?}"
    );
    assert_eq!(fds[0].1, "/dev/null");
    assert!(
        fds[1].1.starts_with("pipe:") && fds[2].1.starts_with("pipe:"),
        "{fds:?}"
    );
    drop(run);
    let port = free_port().to_string();
    let run = Run::start(
        &[
            "-i",
            "1",
            "--balance",
            "socket",
            "--host",
            "127.0.0.1",
            "-p",
            &port,
            "--ready-timeout",
            "1m",
            "--",
            "sleep",
            "60",
        ],
        &[],
    );
    run.wait_stderr("started, pid", 1, SECS(5));
    let fds = fds_of(started_pids(&run.stderr())[0]);
    assert_eq!(
        fds.iter().map(|f| f.0).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4],
        "{fds:?}"
    );
    assert!(
        fds[3].1.starts_with("socket:") && fds[4].1.starts_with("pipe:"),
        "{fds:?}"
    );
}

#[test]
fn job_control_signals_and_sighup_do_not_stop_pid1() {
    let mut run = Run::start(&["-i", "1", "--", "sleep", "60"], &[]);
    run.wait_stderr("started, pid", 1, SECS(5));
    for sig in [libc::SIGHUP, libc::SIGTTIN, libc::SIGTTOU, libc::SIGTSTP] {
        run.signal(sig);
    }
    std::thread::sleep(Duration::from_millis(500));
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", run.pid())).unwrap();
    let state = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert!(state == "S" || state == "R", "corepool is in state {state}");
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "corepool died: {}",
        run.stderr()
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0);
}

#[test]
fn sigterm_during_start_up_always_stops_cleanly() {
    for delay_ms in [0u64, 1, 2, 5, 10, 20, 50, 0, 1, 3] {
        let mut run = Run::start(&["-i", "2", "--", "sleep", "60"], &[]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        run.signal(libc::SIGTERM);
        let status = run.wait_exit(SECS(10));
        // Before the handlers are installed the default action kills it (143); after, 0 or 1.
        let code = status.code();
        let by_signal = std::os::unix::process::ExitStatusExt::signal(&status);
        assert!(
            matches!(code, Some(0) | Some(1)) || by_signal == Some(libc::SIGTERM),
            "delay {delay_ms} ms: {status:?}\n{}",
            run.stderr()
        );
        for pid in started_pids(&run.stderr()) {
            assert!(!exists(pid), "worker {pid} survived");
        }
    }
}

/// As PID 1 a SIGTERM that arrives before the handlers exist would be dropped by the kernel.
/// corepool holds the signals blocked from the start, so one sent while it still asks
/// `node --version` (here a fake node that takes 1.5 s to answer) is acted on once it is ready.
#[test]
fn as_pid1_a_sigterm_before_the_handlers_is_not_lost() {
    let dir = scratch("slow-node");
    let node = dir.join("node");
    write_executable(
        &node,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then sleep 1.5; echo v20.0.0; exit 0; fi\nexec sleep 60\n",
    );
    let port = free_port().to_string();
    let mut cmd = as_pid1();
    cmd.args([
        "-i",
        "1",
        "--balance",
        "socket",
        "-p",
        &port,
        "--",
        "node",
        "server.js",
    ]);
    let path = format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut run = Run::from_command(cmd, &[("PATH", &path)]);
    let started = Instant::now();
    let corepool = loop {
        if let Some(child) = children_of(run.pid()).first() {
            break child.0;
        }
        assert!(started.elapsed() < SECS(5), "corepool never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on corepool's pid as seen here.
    assert_eq!(unsafe { libc::kill(corepool, libc::SIGTERM) }, 0);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
    assert!(
        started.elapsed() < SECS(5),
        "the stop took {:?}: the early SIGTERM was lost",
        started.elapsed()
    );
}

/// The process group of `pid`, from /proc/PID/stat (field 5, after the command in parentheses).
fn pgid_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(2))
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}
