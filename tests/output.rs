//! Worker output through corepool: whole lines only, never mixed between workers even when
//! much longer than a pipe buffer; the three formats; nothing lost at exit; over-long lines
//! split and marked with bounded memory; a closed or blocked stdout never stalls the pool, nor
//! makes corepool's memory grow; a worker's JSON line cannot forge corepool's fields.

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
    assert_eq!(
        lines[1]["pid"],
        json_started_pid(&err),
        "corepool's field wins"
    );
    assert_eq!(lines[1]["app_pid"], 1, "the worker's own value is kept");
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

/// The pid in corepool's "worker 0 started, pid P" message, from JSON stderr.
fn json_started_pid(stderr: &str) -> i32 {
    let messages: Vec<String> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some(v["msg"].as_str()?.to_string()))
        .collect();
    started_pids(&messages.join("\n"))[0]
}

#[test]
fn a_worker_json_line_cannot_forge_corepools_fields() {
    let line = r#"{"worker":99,"pid":1,"ts":"x","stream":"y","source":"corepool","msg":"hi"}"#;
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
            &format!("echo '{line}'"),
        ],
        &[],
        SECS(5),
    );
    assert_eq!(code, 0, "{err}");
    let pid = json_started_pid(&err);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["worker"], 0, "{v}");
    assert_eq!(v["pid"], pid, "{v}");
    let ts = v["ts"].as_str().unwrap();
    assert!(ts.len() == 24 && ts.ends_with('Z'), "{v}");
    assert_eq!(v["stream"], "stdout", "{v}");
    assert_eq!(
        v.get("source"),
        None,
        "only corepool's own lines say source=corepool: {v}"
    );
    assert_eq!(v["msg"], "hi");
    assert_eq!(v["app_worker"], 99, "{v}");
    assert_eq!(v["app_pid"], 1, "{v}");
    assert_eq!(v["app_ts"], "x", "{v}");
    assert_eq!(v["app_stream"], "y", "{v}");
    assert_eq!(v["app_source"], "corepool", "{v}");
    assert_eq!(
        out.matches("\"worker\"").count(),
        1,
        "no duplicate keys: {out}"
    );
}

fn vm_rss_kib(pid: i32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// A pipe read to its end on a thread, and the number of lines read so far.
struct Drain {
    lines: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    reader: std::thread::JoinHandle<Vec<u8>>,
}

impl Drain {
    fn start(mut from: impl std::io::Read + Send + 'static) -> Drain {
        let lines = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = lines.clone();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut chunk = vec![0u8; 1 << 16];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&chunk[..n]);
                let new = chunk[..n].iter().filter(|&&b| b == b'\n').count();
                count.fetch_add(new, std::sync::atomic::Ordering::Relaxed);
            }
            all
        });
        Drain { lines, reader }
    }

    fn lines(&self) -> usize {
        self.lines.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Checks a stream of JSON lines from flooding workers: every line whole and valid, each
/// worker's lines numbered 0, 1, 2... with none lost or repeated, each of `FLOOD_LEN` control
/// bytes (except a worker's last, which SIGTERM may have cut short inside the worker).
/// Returns how many worker lines there were.
fn check_flood(out: &[u8], stream: &str) -> usize {
    let text = std::str::from_utf8(out).expect("UTF-8 output");
    assert!(text.is_empty() || text.ends_with('\n'), "a line was cut");
    let mut next = [0usize; 2];
    let mut short = [false; 2];
    let mut count = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not a JSON line ({e}): {}", &line[..line.len().min(80)]));
        if v["source"] == "corepool" {
            continue;
        }
        assert_eq!(v["stream"], stream);
        let slot = v["worker"].as_u64().unwrap() as usize;
        let msg = v["msg"].as_str().unwrap();
        let (head, body) = msg.split_at(msg.find(":x").expect("a numbered line") + 2);
        assert_eq!(
            head,
            format!("{slot}:{}:x", next[slot]),
            "lost or repeated line"
        );
        assert!(!short[slot], "a short line that was not the worker's last");
        assert!(body.bytes().all(|b| b == 1), "corrupted line {head}");
        assert!(body.len() <= FLOOD_LEN);
        short[slot] = body.len() < FLOOD_LEN;
        next[slot] += 1;
        count += 1;
    }
    count
}

/// SIGTERM to a pool the test started, when the test ends early (a failed assertion), so a
/// failing run leaves no flooding pool behind.
struct StopOnDrop(i32);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the test's own child; harmless if it is already gone and reaped.
        unsafe { libc::kill(self.0, libc::SIGTERM) };
    }
}

const FLOOD_LEN: usize = 50_000;

/// A python worker that writes, as fast as it can, numbered lines of [`FLOOD_LEN`] control
/// bytes (6 bytes each in JSON) to both stdout and stderr.
fn flood_script() -> String {
    format!(
        "import os\n\
         slot = os.environ['COREPOOL_WORKER']\n\
         body = b'\\x01' * {FLOOD_LEN} + b'\\n'\n\
         n = 0\n\
         while True:\n\
         \x20   head = f'{{slot}}:{{n}}:x'.encode()\n\
         \x20   os.write(1, head + body)\n\
         \x20   os.write(2, head + body)\n\
         \x20   n += 1\n"
    )
}

#[test]
fn unread_output_does_not_grow_corepools_memory() {
    require("python3");
    // Two workers write, as fast as they can, lines of control bytes (6 bytes each in JSON) to
    // both streams; nobody reads corepool's stdout or stderr. Before the byte bound, corepool
    // queued 256 such lines per stream (~75 MB each here) and grew by hundreds of MB.
    let script = flood_script();
    let mut child = std::process::Command::new(bin())
        .args([
            "-i",
            "2",
            "--log-format",
            "json",
            "--kill-timeout",
            "5s",
            "--",
            "python3",
            "-c",
            &script,
        ])
        .env("COREPOOL_BALANCE", "none")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let _stop = StopOnDrop(pid);
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let mut peak = 0;
    let watch = Instant::now();
    while watch.elapsed() < SECS(5) {
        assert!(child.try_wait().unwrap().is_none(), "corepool died");
        peak = peak.max(vm_rss_kib(pid).expect("corepool's VmRSS"));
        assert!(
            peak < 32 * 1024,
            "corepool's RSS reached {peak} KiB after {:?} with its output unread",
            watch.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("peak VmRSS over 5 s with unread output: {peak} KiB");
    // The workers are blocked on their pipes, not dead: now read, and the flood goes on.
    let (out, err) = (Drain::start(stdout), Drain::start(stderr));
    let reading = Instant::now();
    while out.lines() < 100 || err.lines() < 100 {
        assert!(
            reading.elapsed() < SECS(60),
            "the flood did not resume: {} and {} lines",
            out.lines(),
            err.lines()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + SECS(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    let (out, err) = (out.reader.join().unwrap(), err.reader.join().unwrap());
    assert!(check_flood(&out, "stdout") >= 100);
    assert!(check_flood(&err, "stderr") >= 100);
    let err = String::from_utf8_lossy(&err);
    assert!(
        err.contains("exiting with code 0"),
        "corepool's own lines got out"
    );
}

/// A cgroup v1 memory directory with a limit, removed on drop.
struct MemoryCgroup(std::path::PathBuf);

impl MemoryCgroup {
    fn new(name: &str, limit: u64) -> MemoryCgroup {
        let root = std::path::Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "prerequisite missing: cgroup v1 memory controller at {} (run as root)",
            root.display()
        );
        let dir = root.join(format!("corepool-test-{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join("memory.limit_in_bytes"), limit.to_string()).unwrap();
        // With swap, the limit would only make it swap: cap memory + swap too where offered.
        let memsw = dir.join("memory.memsw.limit_in_bytes");
        if memsw.exists() {
            std::fs::write(memsw, limit.to_string()).unwrap();
        }
        MemoryCgroup(dir)
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.0.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: kill(2); leftovers of a failed test only.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn unread_output_inside_a_64mib_memory_cgroup_does_not_get_corepool_oom_killed() {
    require("python3");
    // The container case: corepool and two flooding workers in a 64 MiB memory cgroup, its
    // output unread. Before the byte bound corepool outgrew the limit within seconds and the
    // kernel's OOM killer ended it (and with it the container).
    let cg = MemoryCgroup::new("log-flood", 64 << 20);
    let script = flood_script();
    let shell = format!(
        "echo $$ > {}/cgroup.procs && exec {} -i 2 --log-format json --kill-timeout 5s -- python3 -c \"$FLOOD\"",
        cg.0.display(),
        bin()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &shell])
        .env("FLOOD", &script)
        .env("COREPOOL_BALANCE", "none")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let _stop = StopOnDrop(pid);
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let watch = Instant::now();
    while watch.elapsed() < SECS(8) {
        if let Some(status) = child.try_wait().unwrap() {
            let oom = std::fs::read_to_string(cg.0.join("memory.oom_control")).unwrap_or_default();
            panic!(
                "corepool died after {:?} in a 64 MiB cgroup: {status:?}; {}",
                watch.elapsed(),
                oom.replace('\n', ", ")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let peak: u64 = std::fs::read_to_string(cg.0.join("memory.max_usage_in_bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    eprintln!("cgroup peak usage over 8 s: {} KiB", peak / 1024);
    let (out, err) = (Drain::start(stdout), Drain::start(stderr));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + SECS(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(check_flood(&out.reader.join().unwrap(), "stdout") > 0);
    assert!(check_flood(&err.reader.join().unwrap(), "stderr") > 0);
}
