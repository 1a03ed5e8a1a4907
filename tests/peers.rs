//! What the test suites of tini and dumb-init check of an init, asked of corepool (the ideas,
//! written anew): exit statuses pass through (a code, or 128 + the signal, real-time signals
//! included); every signal without a meaning of its own reaches every worker, as PID 1 and not;
//! the documented differences (TERM/INT/QUIT stop, HUP reloads, TSTP/TTIN/TTOU are ignored)
//! hold; fault signals sent to PID 1 change nothing; a worker starts with a clean signal state
//! whatever corepool inherited; arguments and variables are bytes, passed on unchanged.

mod common;

use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

/// Signals corepool forwards: every catchable one without a meaning of its own.
fn forwardable() -> Vec<i32> {
    let mut signals = vec![
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGWINCH,
        libc::SIGPIPE,
        libc::SIGALRM,
        libc::SIGSTKFLT,
        libc::SIGCONT,
        libc::SIGURG,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
    ];
    signals.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    signals
}

/// A worker that catches every signal it can but the faults, prints "ready SLOT PID" once its
/// handlers are in place, then "SLOT:N" for each signal N it receives; SIGTERM ends it.
fn signal_printer() -> std::path::PathBuf {
    require("python3");
    let path = scratch("printer").join("print_signals.py");
    write_executable(
        &path,
        r#"#!/usr/bin/env python3
import os, signal
slot = os.environ.get("COREPOOL_WORKER", "?")
def handler(n, _frame):
    os.write(1, ("%s:%d\n" % (slot, n)).encode())
    if n == signal.SIGTERM:
        os._exit(0)
faults = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT,
          signal.SIGTRAP, signal.SIGSYS}
for n in range(1, signal.SIGRTMAX + 1):
    if n in faults or n in (signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD, 32, 33):
        continue
    signal.signal(n, handler)
os.write(1, ("ready %s %d\n" % (slot, os.getpid())).encode())
while True:
    signal.pause()
"#,
    );
    path
}

/// Lines of stdout equal to `line`.
fn count_lines(out: &str, line: &str) -> usize {
    out.lines().filter(|l| *l == line).count()
}

/// corepool's pid as seen from here when `unshare` runs it as PID 1 of a new namespace.
fn corepool_under_unshare(run: &Run) -> i32 {
    let deadline = Instant::now() + SECS(5);
    loop {
        if let Some(child) = children_of(run.pid()).first() {
            return child.0;
        }
        assert!(Instant::now() < deadline, "corepool never started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// State letter of a process (R, S, T, Z...).
fn state_of(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit_once(')')
        .and_then(|(_, after)| after.split_whitespace().next())
        .unwrap_or("gone")
        .to_string()
}

#[test]
fn exit_codes_pass_through() {
    for code in [0, 1, 2, 42, 126, 127, 128, 255] {
        let script = format!("exit {code}");
        let (got, _, err) = run_to_end(
            &["-i", "1", "--restart", "never", "--", "sh", "-c", &script],
            &[],
            SECS(10),
        );
        assert_eq!(got, code, "worker exit {code}\n{err}");
    }
}

#[test]
fn a_worker_killed_by_a_signal_gives_128_plus_n() {
    // Real-time signals were lost (waitpid failed with EINVAL) and the pool hung.
    let rt = libc::SIGRTMIN();
    for sig in [
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGKILL,
        rt,
        rt + 6,
        libc::SIGRTMAX(),
    ] {
        let script = format!("kill -{sig} $$");
        let (got, _, err) = run_to_end(
            &["-i", "1", "--restart", "never", "--", "sh", "-c", &script],
            &[],
            SECS(10),
        );
        assert_eq!(got, 128 + sig, "worker killed by signal {sig}\n{err}");
        assert!(err.contains(&format!("({})", 128 + sig)), "{err}");
    }
    let (_, _, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart",
            "never",
            "--",
            "sh",
            "-c",
            &format!("kill -{} $$", rt + 2),
        ],
        &[],
        SECS(10),
    );
    assert!(err.contains("signal SIGRTMIN+2"), "{err}");
}

/// Sends each forwardable signal to corepool (`pid`) and reads it back from both workers.
fn every_signal_reaches_every_worker(run: &Run, pid: i32) {
    run.wait_for("both workers ready", SECS(15), |o, _| {
        o.lines().filter(|l| l.starts_with("ready ")).count() >= 2
    });
    for sig in forwardable() {
        kill(pid, sig);
        for slot in 0..2 {
            let line = format!("{slot}:{sig}");
            run.wait_for(&format!("{line} from the worker"), SECS(5), |o, _| {
                count_lines(o, &line) == 1
            });
        }
    }
    assert_eq!(
        run.stdout()
            .lines()
            .filter(|l| l.starts_with("ready "))
            .count(),
        2,
        "a worker was restarted:\n{}",
        run.stderr()
    );
}

#[test]
fn every_forwardable_signal_reaches_every_worker() {
    let printer = signal_printer();
    let mut run = Run::start(
        &[
            OsStr::new("-i"),
            "2".as_ref(),
            "--".as_ref(),
            printer.as_os_str(),
        ],
        &[],
    );
    every_signal_reaches_every_worker(&run, run.pid());
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

#[test]
fn as_pid1_every_forwardable_signal_reaches_every_worker() {
    let printer = signal_printer();
    let mut cmd = as_pid1();
    cmd.args(["-i", "2", "--"]).arg(&printer);
    let mut run = Run::from_command(cmd, &[]);
    let corepool = corepool_under_unshare(&run);
    every_signal_reaches_every_worker(&run, corepool);
    assert!(
        run.stderr().contains("running as PID 1"),
        "{}",
        run.stderr()
    );
    kill(corepool, libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

/// corepool's contract where it differs from a plain forwarder: TSTP, TTIN and TTOU are
/// ignored, HUP is a rolling reload (a new worker, the old one gets the stop signal), and
/// TERM, INT and QUIT are a graceful stop (the worker gets the stop signal, SIGTERM).
#[test]
fn stop_reload_and_job_control_signals_are_corepools_own() {
    let printer = signal_printer();
    let start = |rest: &[&str]| {
        let mut args: Vec<&OsStr> = ["-i", "1"].iter().map(OsStr::new).collect();
        args.extend(rest.iter().map(OsStr::new));
        args.push(OsStr::new("--"));
        args.push(printer.as_os_str());
        let run = Run::start(&args, &[]);
        run.wait_stdout("ready 0 ", 1, SECS(15));
        run
    };

    let run = start(&[]);
    for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
        run.signal(sig);
    }
    // A forwarded signal sent after them, as a marker: once it is back, they had their turn.
    run.signal(libc::SIGUSR1);
    run.wait_stdout(&format!("0:{}", libc::SIGUSR1), 1, SECS(5));
    std::thread::sleep(Duration::from_millis(300));
    let out = run.stdout();
    for sig in [libc::SIGTSTP, libc::SIGTTIN, libc::SIGTTOU] {
        assert_eq!(count_lines(&out, &format!("0:{sig}")), 0, "{out}");
    }
    let state = state_of(run.pid());
    assert!(state == "S" || state == "R", "corepool is in state {state}");

    // HUP: a second worker starts, the first gets SIGTERM; the worker never sees SIGHUP.
    run.signal(libc::SIGHUP);
    run.wait_stdout("ready 0 ", 2, SECS(15));
    run.wait_stdout(&format!("0:{}", libc::SIGTERM), 1, SECS(10));
    assert_eq!(
        count_lines(&run.stdout(), &format!("0:{}", libc::SIGHUP)),
        0
    );
    drop(run);

    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT] {
        let mut run = start(&[]);
        run.signal(sig);
        assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
        let out = run.stdout();
        assert_eq!(
            count_lines(&out, &format!("0:{}", libc::SIGTERM)),
            1,
            "{out}"
        );
    }
    // The stop signal is configurable: what the worker gets is --stop-signal.
    let mut run = start(&["--stop-signal", "SIGINT"]);
    run.signal(libc::SIGTERM);
    run.wait_stdout(&format!("0:{}", libc::SIGINT), 1, SECS(5));
    // The printer does not exit on SIGINT: the kill timeout ends it (exit 1 says so).
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 1, "{}", run.stderr());
}

/// Fault signals are not caught: a real fault in corepool must still end it with a core. Sent
/// by kill(2) to PID 1 (no handler) the kernel drops them: corepool and its worker carry on.
#[test]
fn as_pid1_fault_signals_from_outside_change_nothing() {
    let printer = signal_printer();
    let mut cmd = as_pid1();
    cmd.args(["-i", "1", "--"]).arg(&printer);
    let mut run = Run::from_command(cmd, &[]);
    let corepool = corepool_under_unshare(&run);
    run.wait_stdout("ready 0 ", 1, SECS(15));
    for sig in [
        libc::SIGSEGV,
        libc::SIGBUS,
        libc::SIGFPE,
        libc::SIGILL,
        libc::SIGABRT,
        libc::SIGTRAP,
        libc::SIGSYS,
    ] {
        // Twice: Rust's stack-overflow handler takes the first SEGV/BUS and restores the
        // default, the second meets no handler.
        kill(corepool, sig);
        kill(corepool, sig);
    }
    kill(corepool, libc::SIGUSR2);
    run.wait_stdout(&format!("0:{}", libc::SIGUSR2), 1, SECS(5));
    assert!(
        run.child.try_wait().unwrap().is_none(),
        "corepool died: {}",
        run.stderr()
    );
    assert_eq!(
        started_pids(&run.stderr()).len(),
        1,
        "the worker was restarted:\n{}",
        run.stderr()
    );
    kill(corepool, libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

/// Not as PID 1 a fault signal ends corepool as it would any program, and its workers with it
/// (their parent-death signal).
#[test]
fn not_pid1_a_fault_signal_ends_corepool_and_its_workers() {
    let mut cmd = Command::new(bin());
    cmd.args(["-i", "1", "--", "sleep", "60"]);
    // SAFETY: setrlimit is async-signal-safe; no core file from this test.
    unsafe {
        cmd.pre_exec(|| {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &none);
            Ok(())
        });
    }
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stderr("started, pid", 1, SECS(5));
    let worker = started_pids(&run.stderr())[0];
    run.signal(libc::SIGABRT);
    let status = run.wait_exit(SECS(5));
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGABRT),
        "{status:?}"
    );
    let deadline = Instant::now() + SECS(5);
    while !matches!(state_of(worker).as_str(), "gone" | "Z") {
        assert!(
            Instant::now() < deadline,
            "worker {worker} outlived corepool"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A SIGPIPE corepool brings on itself (its stdout is a pipe nobody reads any more) concerns
/// corepool, not the workers: only signals another process sends are forwarded.
#[test]
fn a_sigpipe_corepool_raises_itself_is_not_forwarded() {
    require("bash");
    let worker = "trap 'echo got-PIPE >&2' PIPE; echo ready >&2; \
                  while :; do echo line; sleep 0.02; done";
    let mut cmd = Command::new("bash");
    // corepool replaces bash, its stdout the write end of a pipe whose reader exits at once.
    cmd.args(["-c", "exec \"$0\" \"$@\" > >(exit 0)", bin()])
        .args(["--log-level", "debug", "-i", "1", "--", "sh", "-c", worker]);
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stderr("ready", 1, SECS(5));
    // corepool's write to its closed stdout raised SIGPIPE (the debug line says it was
    // dropped); had it been forwarded, the worker's trap would say so.
    run.wait_for("corepool's own SIGPIPE", SECS(10), |_, e| {
        e.contains("SIGPIPE raised for corepool itself") || e.contains("got-PIPE")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!run.stderr().contains("got-PIPE"), "{}", run.stderr());
    // One sent by another process is forwarded.
    run.signal(libc::SIGPIPE);
    run.wait_stderr("got-PIPE", 1, SECS(5));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

/// tini's signal-configuration test, turned around: whatever corepool inherits (signals blocked
/// or ignored by whoever started it, real-time ones included), each worker starts with an empty
/// mask and nothing ignored, and corepool still answers SIGTERM.
#[test]
fn a_worker_starts_clean_whatever_corepool_inherited() {
    let mut cmd = Command::new(bin());
    cmd.args([
        "-i",
        "1",
        "--",
        "sh",
        "-c",
        "grep -E '^(SigBlk|SigIgn)' /proc/self/status; exec sleep 60",
    ]);
    let chosen = [
        libc::SIGTTOU,
        libc::SIGSEGV,
        libc::SIGINT,
        libc::SIGTTIN,
        libc::SIGILL,
        libc::SIGTERM,
        libc::SIGUSR1,
        libc::SIGPIPE,
        libc::SIGHUP,
        libc::SIGRTMIN(),
        libc::SIGRTMAX(),
    ];
    // SAFETY: sigprocmask and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &sig in &chosen {
                libc::sigaddset(&mut set, sig);
                libc::signal(sig, libc::SIG_IGN);
            }
            libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let mut run = Run::from_command(cmd, &[]);
    run.wait_stdout("SigIgn", 1, SECS(5));
    let out = run.stdout();
    assert!(out.contains("SigBlk:\t0000000000000000"), "{out}");
    assert!(out.contains("SigIgn:\t0000000000000000"), "{out}");
    // corepool itself: none of the signals it handles stays blocked (it keeps what it does
    // not handle, SEGV and ILL here, as it found them: a real fault still ends it).
    let status = std::fs::read_to_string(format!("/proc/{}/status", run.pid())).unwrap();
    let blocked = status
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:\t"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    for &sig in chosen
        .iter()
        .filter(|&&s| s != libc::SIGSEGV && s != libc::SIGILL)
    {
        assert_eq!(
            blocked & (1 << (sig - 1)),
            0,
            "signal {sig} blocked: {status}"
        );
    }
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
}

#[test]
fn a_non_utf8_argument_reaches_the_worker_byte_exact() {
    let byte = OsStr::from_bytes(b"\xff");
    let mut run = Run::start(
        &[
            OsStr::new("-i"),
            "1".as_ref(),
            "--restart".as_ref(),
            "never".as_ref(),
            "--".as_ref(),
            "printf".as_ref(),
            "%s\\n".as_ref(),
            byte,
        ],
        &[],
    );
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
    assert_eq!(run.stdout_bytes(), b"\xff\n");
}

#[test]
fn a_non_utf8_variable_reaches_the_worker_unchanged() {
    let mut cmd = Command::new(bin());
    cmd.args(["-i", "1", "--restart", "never", "--", "printenv", "ODD"])
        .env("ODD", OsStr::from_bytes(b"a\xfe\xffb"));
    let mut run = Run::from_command(cmd, &[]);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
    assert_eq!(run.stdout_bytes(), b"a\xfe\xffb\n");
}

#[test]
fn a_non_utf8_option_value_is_a_usage_error_naming_it() {
    let bad = OsStr::from_bytes(b"1\xffs");
    let mut run = Run::start(
        &[
            OsStr::new("--kill-timeout"),
            bad,
            "--".as_ref(),
            "true".as_ref(),
        ],
        &[],
    );
    assert_eq!(run.exit_code(SECS(5)), 2, "{}", run.stderr());
    let err = run.stderr();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("--kill-timeout") && err.contains("UTF-8"),
        "{err}"
    );

    // Through env(1): Run::from_command removes WEB_CONCURRENCY from what it passes on.
    for var in ["COREPOOL_KILL_TIMEOUT", "WEB_CONCURRENCY"] {
        let mut setting = format!("{var}=").into_bytes();
        setting.extend_from_slice(b"\xff");
        let mut cmd = Command::new("env");
        cmd.arg(OsStr::from_bytes(&setting))
            .args([bin(), "--", "true"]);
        let mut run = Run::from_command(cmd, &[]);
        assert_eq!(run.exit_code(SECS(5)), 2, "{var}: {}", run.stderr());
        let err = run.stderr();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(var) && err.contains("UTF-8"), "{err}");
    }
}
