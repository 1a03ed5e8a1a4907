//! Worker output through corepool: whole lines only, never mixed between workers even when
//! much longer than a pipe buffer; the three formats; nothing lost at exit; over-long lines
//! split and marked with bounded memory; a closed or blocked stdout never stalls the pool.

mod common;

use common::*;
use std::time::{Duration, Instant};

/// A python worker writing `count` lines of `len` bytes: "<slot>:<n>:" then a fill character
/// chosen by slot, to the given stream.
fn writer(count: usize, len: usize, stream: &str) -> String {
    format!(
        "import os, sys\n\
         slot = int(os.environ['COREPOOL_WORKER'])\n\
         out = sys.{stream}.buffer\n\
         fill = b'abcdefgh'[slot:slot + 1]\n\
         for n in range({count}):\n\
         \x20   head = f'{{slot}}:{{n}}:'.encode()\n\
         \x20   out.write(head + fill * ({len} - len(head)) + b'\\n')\n\
         out.flush()\n"
    )
}

fn check_lines(text: &str, workers: usize, count: usize, len: usize) {
    let mut seen = std::collections::HashSet::new();
    for line in text.lines().filter(|l| !l.starts_with("corepool ")) {
        assert_eq!(
            line.len(),
            len,
            "a line was cut or glued: {}...",
            &line[..line.len().min(60)]
        );
        let mut parts = line.splitn(3, ':');
        let slot: usize = parts.next().unwrap().parse().unwrap();
        let n: usize = parts.next().unwrap().parse().unwrap();
        let fill = b"abcdefgh"[slot];
        assert!(
            parts.next().unwrap().bytes().all(|b| b == fill),
            "line {slot}:{n} mixes workers"
        );
        assert!(seen.insert((slot, n)), "line {slot}:{n} twice");
    }
    assert_eq!(seen.len(), workers * count, "lines missing");
}

#[test]
fn concurrent_100kb_lines_never_interleave() {
    require("python3");
    let (code, out, err) = run_to_end(
        &[
            "-i",
            "4",
            "--restart",
            "never",
            "--",
            "python3",
            "-c",
            &writer(50, 100_000, "stdout"),
        ],
        &[],
        SECS(30),
    );
    assert_eq!(code, 0, "{err}");
    check_lines(&out, 4, 50, 100_000);

    let (code, _, err) = run_to_end(
        &[
            "-i",
            "2",
            "--restart",
            "never",
            "--",
            "python3",
            "-c",
            &writer(30, 100_000, "stderr"),
        ],
        &[],
        SECS(30),
    );
    assert_eq!(code, 0);
    check_lines(&err, 2, 30, 100_000);
}

#[test]
fn prefix_and_json_formats() {
    let (code, out, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart",
            "never",
            "--log-format",
            "prefix",
            "--",
            "sh",
            "-c",
            "echo hello",
        ],
        &[],
        SECS(5),
    );
    assert_eq!(code, 0);
    let pid = started_pids(&err)[0];
    assert_eq!(out.trim(), format!("[0:{pid}] hello"));

    let script = r#"echo plain text; echo '{"level":"info","msg":"x","pid":1}'; echo oops >&2"#;
    let (code, out, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart",
            "never",
            "--log-format",
            "json",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
        SECS(5),
    );
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["msg"], "plain text");
    assert_eq!(lines[0]["worker"], 0);
    assert_eq!(lines[0]["stream"], "stdout");
    assert!(lines[0]["ts"].as_str().unwrap().ends_with('Z'));
    assert_eq!(lines[1]["msg"], "x");
    assert_eq!(lines[1]["level"], "info");
    assert_eq!(lines[1]["pid"], 1, "the worker's own field wins");
    assert_eq!(lines[1]["worker"], 0);
    let err_lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).expect("stderr is all JSON"))
        .collect();
    let oops = err_lines
        .iter()
        .find(|v| v["msg"] == "oops")
        .expect("worker stderr line");
    assert_eq!(oops["stream"], "stderr");
    assert!(
        err_lines
            .iter()
            .any(|v| v["source"] == "corepool" && v["level"] == "info")
    );
}

#[test]
fn nothing_written_before_exit_is_lost() {
    let script = "i=0; while [ $i -lt 10000 ]; do echo line-$i; i=$((i+1)); done; printf 'last-without-newline'";
    let (code, out, _) = run_to_end(
        &["-i", "1", "--restart", "never", "--", "sh", "-c", script],
        &[],
        SECS(20),
    );
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 10_001, "lines lost");
    assert_eq!(lines[9_999], "line-9999");
    assert_eq!(lines[10_000], "last-without-newline");
}

#[test]
fn a_10mb_line_is_split_marked_and_memory_stays_bounded() {
    require("python3");
    let script = "import sys, time\nsys.stdout.buffer.write(b'x' * 10_000_000)\nsys.stdout.flush()\ntime.sleep(2)\nprint()\n";
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--restart",
            "never",
            "--",
            "python3",
            "-c",
            script,
        ],
        &[],
    );
    run.wait_for("the first 9.9 MB", SECS(10), |o, _| o.len() > 9_900_000);
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", run.pid()))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap();
    assert_eq!(run.exit_code(SECS(10)), 0);
    assert!(
        rss_kib < 32 * 1024,
        "corepool's peak RSS was {rss_kib} KiB for a 10 MB line"
    );
    let out = run.stdout();
    let pieces: Vec<&str> = out.lines().collect();
    let mark = " [corepool: line split]";
    let payload: usize = pieces.iter().map(|p| p.trim_end_matches(mark).len()).sum();
    assert_eq!(payload, 10_000_000);
    assert_eq!(pieces.len(), 10_000_000 / (256 * 1024) + 1);
    assert!(
        pieces[..pieces.len() - 1]
            .iter()
            .all(|p| p.ends_with(mark) && p.len() == 256 * 1024 + mark.len())
    );
    assert!(!pieces.last().unwrap().ends_with(mark));
}

#[test]
fn a_closed_stdout_does_not_kill_the_pool() {
    let mut cmd = std::process::Command::new(bin());
    cmd.args([
        "-i",
        "2",
        "--",
        "sh",
        "-c",
        "while :; do echo tick; sleep 0.01; done",
    ])
    .env("COREPOOL_BALANCE", "none")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // the reader is gone: writes to corepool's stdout fail with EPIPE
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        child.try_wait().unwrap().is_none(),
        "corepool died when its stdout closed"
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + SECS(5);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
}

#[test]
fn a_blocked_stdout_stalls_neither_signals_nor_reaping() {
    // Nobody reads corepool's stdout: its pipe fills, the writer thread blocks, the workers'
    // pipes fill. SIGTERM must still stop the pool promptly.
    let mut cmd = std::process::Command::new(bin());
    cmd.args([
        "-i",
        "2",
        "--kill-timeout",
        "1s",
        "--",
        "sh",
        "-c",
        "yes corepool-flood",
    ])
    .env("COREPOOL_BALANCE", "none")
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let _unread = child.stdout.take();
    std::thread::sleep(Duration::from_millis(1000));
    let started = Instant::now();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < SECS(8),
            "corepool hung behind a blocked stdout"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(matches!(status.code(), Some(0) | Some(1)), "{status:?}");
}
