//! Shared harness for the integration tests: runs the real `corepool` binary as a child of the
//! test, collects its stdout and stderr as they come, and waits for lines or for its exit with
//! deadlines, so that a hung corepool fails a test instead of hanging it.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_corepool")
}

/// A running corepool and everything it has printed so far. Runs with COREPOOL_BALANCE=none
/// unless the test sets another mode (flag or variable).
pub struct Run {
    pub child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// Set when the collector read the pipe's end (every writer closed it).
    ends: [Arc<std::sync::atomic::AtomicBool>; 2],
}

/// A pipe's bytes as they arrive, and whether its end (EOF) has been read.
type Collected = (Arc<Mutex<Vec<u8>>>, Arc<std::sync::atomic::AtomicBool>);

fn collect(mut from: impl Read + Send + 'static) -> Collected {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sink, eof) = (buf.clone(), done.clone());
    std::thread::spawn(move || {
        let mut chunk = [0u8; 65536];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
        eof.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    (buf, done)
}

impl Run {
    /// Starts `corepool ARGS` with extra environment variables.
    pub fn start<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(bin());
        cmd.args(args);
        Run::from_command(cmd, env)
    }

    /// Starts a prepared command (e.g. `unshare ... corepool ...`).
    pub fn from_command(mut cmd: Command, env: &[(&str, &str)]) -> Run {
        cmd.env_remove("WEB_CONCURRENCY");
        // Most tests are about processes, not ports: no shared socket unless a test asks.
        cmd.env("COREPOOL_BALANCE", "none");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // A safety net behind Drop: when the test's thread ends, the pool gets SIGTERM.
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn corepool");
        let (stdout, out_end) = collect(child.stdout.take().unwrap());
        let (stderr, err_end) = collect(child.stderr.take().unwrap());
        Run {
            child,
            stdout,
            stderr,
            ends: [out_end, err_end],
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    pub fn stdout_bytes(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until `pred` holds for (stdout, stderr); panics with both after `timeout`.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str, &str) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.stdout(), &self.stderr()) {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until stderr contains `needle` `count` times.
    pub fn wait_stderr(&self, needle: &str, count: usize, timeout: Duration) {
        self.wait_for(
            &format!("{count}x {needle:?} on stderr"),
            timeout,
            |_, e| e.matches(needle).count() >= count,
        );
    }

    /// Waits until stdout contains `needle` `count` times.
    pub fn wait_stdout(&self, needle: &str, count: usize, timeout: Duration) {
        self.wait_for(
            &format!("{count}x {needle:?} on stdout"),
            timeout,
            |o, _| o.matches(needle).count() >= count,
        );
    }

    /// Asserts that `needle` stands exactly `n` times in stdout so far.
    pub fn assert_stdout_count(&self, needle: &str, n: usize) {
        let out = self.stdout();
        assert_eq!(out.matches(needle).count(), n, "{out}");
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of our own child.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({}, {sig})", self.pid());
    }

    /// Waits for corepool to exit; panics (after killing it) past `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Let the collector threads read the last bytes: until both pipes end, or for
                // at most 5 s (a process corepool started may outlive it holding a pipe).
                let until = Instant::now() + Duration::from_secs(5);
                while Instant::now() < until
                    && !self
                        .ends
                        .iter()
                        .all(|e| e.load(std::sync::atomic::Ordering::SeqCst))
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "corepool did not exit within {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                    self.stdout(),
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the exit and returns its code (panics if corepool itself was killed).
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait_exit(timeout);
        status.code().unwrap_or_else(|| {
            panic!(
                "corepool died of a signal: {status:?}\n--- stderr:\n{}",
                self.stderr()
            )
        })
    }
}

impl Drop for Run {
    /// A test that failed half-way still stops its pool gracefully (SIGTERM, then SIGKILL after
    /// 5 s), so that no worker outlives the test holding a port.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.pid(), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `corepool -i N --balance socket --host 127.0.0.1 -p PORT` followed by `rest`.
pub fn socket_args(n: usize, port: u16, rest: &[&str]) -> Vec<String> {
    pool_args(n, "socket", &port.to_string(), rest)
}

/// `corepool -i N --balance MODE --host 127.0.0.1 -p PORTS` followed by `rest`; `ports` is one
/// port or a list (`3000,3001`).
pub fn pool_args(n: usize, mode: &str, ports: &str, rest: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-i", &n.to_string(), "--balance", mode]
        .into_iter()
        .chain(["--host", "127.0.0.1", "-p", ports])
        .map(String::from)
        .collect();
    args.extend(rest.iter().map(|a| a.to_string()));
    args
}

/// Runs a fixture script of the repository (`tests/fixtures/...`, `build-static.sh`) with
/// bash and returns what it printed: the path of what it built or fetched. Fails the test with
/// the script's stderr when it fails.
pub fn fixture(script: &str, args: &[&str]) -> String {
    let path = format!("{}/{script}", env!("CARGO_MANIFEST_DIR"));
    // One build of a fixture at a time: two tests (threads of one test binary, or two test
    // processes) asking for the same uncached fixture would run `npm ci` in one directory at
    // once. flock(1) holds a lock file beside the script while it runs.
    let lock = format!("{path}.lock");
    let out = Command::new("flock")
        .args([lock.as_str(), "bash", path.as_str()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs corepool to completion with a timeout: (exit code, stdout, stderr).
pub fn run_to_end(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (i32, String, String) {
    let mut run = Run::start(args, env);
    let code = run.exit_code(timeout);
    (code, run.stdout(), run.stderr())
}

/// Pids of the worker processes, from "worker N started, pid P" lines, in order of appearance.
pub fn started_pids(stderr: &str) -> Vec<i32> {
    stderr
        .lines()
        .filter_map(|l| l.split_once(" started, pid ").map(|(_, p)| p.trim()))
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// True when a process exists (zombies included).
pub fn exists(pid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// A fresh scratch directory under the system temp dir, never the same twice in one test
/// process (tests run in parallel, and two of them may ask for the same name: a clock read
/// told them apart only by chance, and one then removed the other's files).
pub fn scratch(name: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("corepool-test-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `file` in the scratch directory `name` (see [`scratch`]); returns its path.
pub fn scratch_file(name: &str, file: &str, text: &str) -> std::path::PathBuf {
    let path = scratch(name).join(file);
    std::fs::write(&path, text).unwrap();
    path
}

/// Moves the calling thread into the network namespace at `netns` (`/proc/PID/ns/net`), so that
/// a client thread reaches a pool that runs in a namespace of its own.
pub fn enter_netns(netns: &str) {
    let ns = std::fs::File::open(netns).expect("the pool's network namespace");
    // SAFETY: setns(2) on this thread only, with an open namespace descriptor.
    let ret = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
    assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Sets RLIMIT_NOFILE to (soft, hard) in `cmd`'s child before exec, as `prlimit --nofile` would.
pub fn limit_nofile(cmd: &mut Command, soft: u64, hard: u64) {
    // SAFETY: setrlimit is async-signal-safe; the closure touches only its copied integers.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (tests run in parallel: never a fixed one).
pub fn free_port() -> u16 {
    // The kernel may hand the same free port out twice once the probe is closed (two calls in
    // a row for a pool's port and its metrics port collided on a busy machine): never give a
    // port twice in one test process.
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Fails loudly when a prerequisite of a test is missing, instead of skipping the test.
pub fn require(cmd: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "prerequisite missing: `{cmd}` must be installed (see .ci/run)"
    );
}

pub const SECS: fn(u64) -> Duration = Duration::from_secs;

/// One HTTP/1.1 request on a new connection (`Connection: close`): the status code and the body,
/// or which step failed (connect, write, read).
pub fn http(port: u16, method: &str, path: &str) -> Result<(u16, String), String> {
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    let body = text.split_once("\r\n\r\n").map(|b| b.1).unwrap_or("");
    Ok((code, body.to_string()))
}

/// GET `path`: the body of a 200 answer, else why there was none.
pub fn get_ok(port: u16, path: &str) -> Result<String, String> {
    match http(port, "GET", path)? {
        (200, body) => Ok(body),
        (code, body) => Err(format!("status {code}: {body:?}")),
    }
}

/// GET / of a server that answers JSON (examples/hello/server.js): the parsed body.
pub fn get_json(port: u16) -> Result<serde_json::Value, String> {
    let body = get_ok(port, "/")?;
    serde_json::from_str(body.trim()).map_err(|e| format!("body {body:?}: {e}"))
}

/// Pids of the zombie children of `parent`.
pub fn zombies_of(parent: i32) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, after)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = after.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1).and_then(|p| p.parse().ok()) == Some(parent) {
            found.push(entry.file_name().to_string_lossy().parse().unwrap_or(0));
        }
    }
    found
}

/// Writes `text` to `path` as an executable file (mode 755): a fake program or a script.
pub fn write_executable(path: &std::path::Path, text: impl AsRef<[u8]>) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
}

/// (state, ppid) of every process, from /proc.
pub fn processes() -> Vec<(i32, char, i32)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let after = stat.rsplit_once(')')?.1;
            let mut f = after.split_whitespace();
            let state = f.next()?.chars().next()?;
            let ppid = f.next()?.parse().ok()?;
            Some((pid, state, ppid))
        })
        .collect()
}

pub fn children_of(parent: i32) -> Vec<(i32, char)> {
    processes()
        .into_iter()
        .filter(|&(_, _, ppid)| ppid == parent)
        .map(|(pid, state, _)| (pid, state))
        .collect()
}

/// `unshare ... corepool`: corepool as PID 1 of a new pid namespace, its arguments to follow.
pub fn as_pid1() -> Command {
    require("unshare");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child=SIGTERM",
        bin(),
    ]);
    cmd
}

/// What the drain load client (tests/fixtures/drain/client.js) counted over one reload.
pub struct ReloadLoad {
    pub ok: u64,
    pub errors: u64,
    pub refused: u64,
    /// The client's JSON report line, as printed.
    pub report: String,
}

/// Runs the drain load client (`kind`: http1, new-connection, h2; 8 loops) against `url`
/// while `run` makes a SIGHUP rolling reload: `warmup` of load first, then the reload, the load
/// kept until both old workers are gone. `label` names the case in failure messages.
pub fn hup_under_load(
    url: &str,
    kind: &str,
    run: &Run,
    warmup: Duration,
    reload_timeout: Duration,
    label: &str,
) -> ReloadLoad {
    use std::io::BufRead;
    let client_js = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/drain/client.js"
    );
    let mut client = Command::new("node")
        .args([client_js, url, kind, "8", "60000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the load client");
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = client.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(SECS(30));
    assert_eq!(
        first.as_deref().ok(),
        Some("running"),
        "{label}: the load client never got an answer\n--- stderr:\n{}",
        run.stderr()
    );
    std::thread::sleep(warmup);
    // The load client's `client error <epoch ms> ...` lines are read against this moment.
    let epoch_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    eprintln!("{label}: SIGHUP at {epoch_ms} (epoch ms)");
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload complete", 1, reload_timeout);
    run.wait_stderr("exited after its replacement", 2, SECS(30));
    std::thread::sleep(Duration::from_millis(500));
    drop(client.stdin.take());
    let report = rx.recv_timeout(SECS(30)).unwrap_or_else(|e| {
        let _ = client.kill();
        panic!("{label}: no report from the load client: {e}")
    });
    let _ = client.wait();
    let value: serde_json::Value =
        serde_json::from_str(&report).unwrap_or_else(|e| panic!("report {report:?}: {e}"));
    let count = |k: &str| value[k].as_u64().unwrap_or(u64::MAX);
    ReloadLoad {
        ok: count("ok"),
        errors: count("errors"),
        refused: count("refused"),
        report,
    }
}

/// A control socket name (COREPOOL_CONTROL) that no other test, in this process or another,
/// uses: the label, this process's pid and a counter.
pub fn control_name(label: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        "corepool-test-{label}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// `corepool ARGS` (status, reload, scale, ...) as a client of the pool whose control socket is
/// `control`: (exit code, stdout, stderr).
pub fn control_client(control: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("COREPOOL_CONTROL", control)
        .output()
        .expect("run corepool as a control client");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Listening IPv4 TCP sockets on `port` in this network namespace (from /proc/net/tcp).
pub fn listening_sockets(port: u16) -> usize {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    tcp.lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(3) == Some(&"0A") && f[1].ends_with(&format!(":{port:04X}"))
        })
        .count()
}
