//! `corepool scale` and the CPU follow, against the real binary and real Node workers: the
//! worker count goes up and down under load in socket and proxy mode without a failed
//! request, the highest slots leave, `status` and `/metrics` follow, bad arguments are exit-2
//! one-liners, and a real cgroup v1 CPU quota changed under a running pool moves the count
//! both ways.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

fn status(control: &str) -> serde_json::Value {
    let (code, out, err) = control_client(control, &["status", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
}

fn metric(port: u16, name: &str) -> Option<String> {
    let text = get_ok(port, "/metrics").ok()?;
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(str::to_string)
}

/// Clients that each make requests on new connections until stopped; counts answers by
/// worker slot, and failures with their reasons.
struct Load {
    stop: Arc<AtomicBool>,
    by_worker: Arc<Mutex<BTreeMap<String, u64>>>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        Load::start_in(port, clients, None)
    }

    /// As `start`, the clients in the network namespace of process `netns` when given.
    fn start_in(port: u16, clients: usize, netns: Option<i32>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let by_worker = Arc::new(Mutex::new(BTreeMap::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, by_worker, errors) = (stop.clone(), by_worker.clone(), errors.clone());
                std::thread::spawn(move || {
                    if let Some(pid) = netns {
                        enter_netns(pid);
                    }
                    while !stop.load(Ordering::Relaxed) {
                        match get_json(port) {
                            Ok(v) => {
                                let w = v["worker"].as_str().unwrap_or("?").to_string();
                                *by_worker.lock().unwrap().entry(w).or_insert(0) += 1;
                            }
                            Err(e) => errors.lock().unwrap().push(e),
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            by_worker,
            errors,
            threads,
        }
    }

    fn served_by(&self) -> BTreeMap<String, u64> {
        self.by_worker.lock().unwrap().clone()
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let ok = self.by_worker.lock().unwrap().values().sum();
        let errors = self.errors.lock().unwrap().clone();
        (ok, errors)
    }
}

/// Moves the calling thread into the network namespace of `pid` (we are root).
fn enter_netns(pid: i32) {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    // SAFETY: setns on a descriptor we own; it changes only this thread's namespace.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Waits until the load has seen answers from `worker` (a slot number).
fn wait_served_by(load: &Load, worker: &str, run: &Run) {
    let deadline = std::time::Instant::now() + SECS(30);
    while !load.served_by().contains_key(worker) {
        assert!(
            std::time::Instant::now() < deadline,
            "no answer from worker {worker}: {:?}\n{}",
            load.served_by(),
            run.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until worker `worker` has answered 50 more requests: the load goes on against it.
fn wait_served_more(load: &Load, worker: &str, run: &Run) {
    let before = load.served_by().get(worker).copied().unwrap_or(0);
    let deadline = std::time::Instant::now() + SECS(10);
    while load.served_by().get(worker).copied().unwrap_or(0) < before + 50 {
        assert!(std::time::Instant::now() < deadline, "{}", run.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ends the load, which must have had no failed request, then stops the pool cleanly (exit 0).
fn finish_without_errors(load: Load, mut run: Run, label: &str) {
    let served = load.served_by();
    let (ok, errors) = load.finish();
    assert!(
        errors.is_empty(),
        "{label}: {} of {} requests failed: {:?}\n{}",
        errors.len(),
        ok + errors.len() as u64,
        &errors[..errors.len().min(5)],
        run.stderr()
    );
    eprintln!("{label}: {ok} requests, 0 failed, by worker {served:?}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}

/// Up from 2 to 4 and down to 1 under load, in `mode`: no failed request, the new slots serve,
/// the highest slots go, status and /metrics follow.
fn scale_under_load(mode: &str) {
    let port = free_port();
    let mport = free_port();
    let control = control_name(mode);
    let metrics = format!("127.0.0.1:{mport}");
    let run = Run::start(
        &[
            "-i",
            "2",
            "--balance",
            mode,
            "--host",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--metrics",
            &metrics,
            "--",
            "node",
            HELLO,
        ],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr(" ready (pid ", 2, SECS(30));
    let load = Load::start(port, 4);
    wait_served_by(&load, "0", &run);
    wait_served_by(&load, "1", &run);

    let (code, out, err) = control_client(&control, &["scale", "+2"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: scaling from 2 to 4 workers"),
        "{err}"
    );
    run.wait_stderr(
        "scaling up from 2 to 4 workers (corepool scale)",
        1,
        SECS(5),
    );
    run.wait_stderr(" ready (pid ", 4, SECS(30));
    wait_served_by(&load, "2", &run);
    wait_served_by(&load, "3", &run);
    let st = status(&control);
    assert_eq!(st["instances"], 4, "{st}");
    assert_eq!(st["pinned"], true, "{st}");
    assert_eq!(st["workers"].as_array().unwrap().len(), 4, "{st}");
    assert_eq!(
        metric(mport, "corepool_workers_configured").as_deref(),
        Some("4")
    );
    assert_eq!(
        metric(mport, "corepool_workers_ready").as_deref(),
        Some("4")
    );

    let (code, out, err) = control_client(&control, &["scale", "1"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: scaling from 4 to 1 workers"),
        "{err}"
    );
    run.wait_stderr("workers 3, 2, 1 drain and stop", 1, SECS(5));
    run.wait_stderr("removed by a scale, exited", 3, SECS(30));
    let st = status(&control);
    assert_eq!(st["instances"], 1, "{st}");
    let slots: Vec<u64> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [0], "{st}");
    assert_eq!(
        metric(mport, "corepool_workers_configured").as_deref(),
        Some("1")
    );
    assert_eq!(
        metric(mport, "corepool_workers_pinned").as_deref(),
        Some("1")
    );
    // The load goes on against the one worker left.
    wait_served_more(&load, "0", &run);
    finish_without_errors(load, run, mode);
}

#[test]
fn scale_up_and_down_under_load_in_socket_mode() {
    scale_under_load("socket");
}

#[test]
fn scale_up_and_down_under_load_in_proxy_mode() {
    scale_under_load("proxy");
}

#[test]
fn scale_in_none_mode_and_the_answers_to_bad_requests() {
    let control = control_name("none");
    let mut run = Run::start(
        &["-i", "2", "--min-ready", "2", "--", "sleep", "600"],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr(" started, pid ", 2, SECS(10));
    // Bad arguments: exit 2, one line, before anything is sent.
    for args in [
        &["scale"][..],
        &["scale", "0"],
        &["scale", "x"],
        &["scale", "+1x"],
        &["scale", "5000"],
        &["scale", "a", "b", "c"],
        &["scale", "we b", "1"],
    ] {
        let (code, out, err) = control_client(&control, args);
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("corepool: scale: "), "{args:?}: {err}");
    }
    // Refused by the pool: exit 1 with why.
    let (code, _, err) = control_client(&control, &["scale", "web", "3"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no pool 'web'"), "{err}");
    let (code, _, err) = control_client(&control, &["scale", "1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("below --min-ready 2"), "{err}");
    let (code, _, err) = control_client(&control, &["scale", "-2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("leaves 1..=4096"), "{err}");

    let (code, out, _) = control_client(&control, &["scale", "+2"]);
    assert_eq!((code, out.trim()), (0, "ok: scaling from 2 to 4 workers"));
    run.wait_stderr(" started, pid ", 4, SECS(10));
    let pids = started_pids(&run.stderr());
    let (code, out, _) = control_client(&control, &["scale", "4"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: the pool has 4 workers already")
    );
    let (code, out, _) = control_client(&control, &["scale", "-1"]);
    assert_eq!((code, out.trim()), (0, "ok: scaling from 4 to 3 workers"));
    run.wait_stderr("worker 3 (pid ", 1, SECS(10));
    run.wait_stderr("removed by a scale, exited", 1, SECS(10));
    assert!(!exists(pids[3]) || zombies_of(run.pid()).contains(&pids[3]));
    assert!(exists(pids[2]));
    // `auto` with a fixed count: back to it, un-pinned.
    let (code, out, _) = control_client(&control, &["scale", "auto"]);
    assert_eq!((code, out.trim()), (0, "ok: scaling from 3 to 2 workers"));
    assert_eq!(status(&control)["pinned"], false);
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
    let (code, _, err) = control_client(&control, &["scale", "2"]);
    assert_eq!(code, 1, "{err}");
}

const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

/// A cgroup v1 cpu directory with a quota, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str, quota: i64) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            mounts
                .lines()
                .any(|l| l.contains(" /sys/fs/cgroup/cpu ") && l.contains(" - cgroup ")),
            "prerequisite missing: a cgroup v1 cpu hierarchy mounted at {CPU_ROOT} (run as root)"
        );
        let dir = Path::new(CPU_ROOT).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").unwrap();
        let cg = Cgroup(dir);
        cg.quota(quota);
        cg
    }

    fn quota(&self, quota: i64) {
        std::fs::write(self.0.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
    }

    /// `corepool ARGS` started inside this cgroup.
    fn start(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let script = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", self.0.display());
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script, "sh", bin()]).args(args);
        Run::from_command(cmd, env)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Whatever is left moves back to the root, so the directory can go.
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(Path::new(CPU_ROOT).join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn the_worker_count_follows_a_live_cgroup_quota_change_under_load() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "prerequisite missing: 2 CPUs in our affinity ({cpus})"
    );
    let cg = Cgroup::new("corepool-test-follow", 200_000);
    let port = free_port();
    let control = control_name("cpu");
    let run = cg.start(
        &[
            "--balance",
            "socket",
            "--host",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "--cpu-watch",
            "500ms",
            "--",
            "node",
            HELLO,
        ],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr(
        "starting 2 workers (cgroup v1 cpu.cfs_quota_us 200000/100000",
        1,
        SECS(10),
    );
    run.wait_stderr(" ready (pid ", 2, SECS(30));
    let load = Load::start(port, 4);
    wait_served_by(&load, "1", &run);

    // Down: the pod's CPU limit shrinks to half a CPU.
    cg.quota(50_000);
    run.wait_stderr(
        "usable CPUs changed: instances max now comes to 1, was 2 (cgroup v1 cpu.cfs_quota_us \
         50000/100000",
        1,
        SECS(10),
    );
    run.wait_stderr("scaling down from 2 to 1 workers", 1, SECS(5));
    run.wait_stderr("removed by a scale, exited", 1, SECS(30));
    assert_eq!(status(&control)["instances"], 1);

    // Up again.
    cg.quota(200_000);
    run.wait_stderr("now comes to 2, was 1", 1, SECS(10));
    run.wait_stderr("scaling up from 1 to 2 workers", 1, SECS(5));
    run.wait_stderr(" ready (pid ", 3, SECS(30));
    let before = load.served_by().get("1").copied().unwrap_or(0);
    let deadline = std::time::Instant::now() + SECS(20);
    while load.served_by().get("1").copied().unwrap_or(0) <= before + 20 {
        assert!(std::time::Instant::now() < deadline, "{}", run.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A manual scale pins the count: the next change is only logged.
    let (code, out, _) = control_client(&control, &["scale", "2"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: the pool has 2 workers already")
    );
    cg.quota(100_000);
    run.wait_stderr(
        "the count stays at 2 workers, pinned by corepool scale",
        1,
        SECS(10),
    );
    // `scale auto` un-pins: the count follows the CPUs again.
    let (code, out, _) = control_client(&control, &["scale", "auto"]);
    assert_eq!((code, out.trim()), (0, "ok: scaling from 2 to 1 workers"));
    run.wait_stderr("removed by a scale, exited", 2, SECS(30));

    finish_without_errors(load, run, "cpu follow");
}

#[test]
fn sighup_rereads_the_quota_before_its_reload() {
    let cg = Cgroup::new("corepool-test-hup", 200_000);
    let control = control_name("hup");
    let mut run = cg.start(
        &["--cpu-watch", "1h", "--", "sleep", "600"],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr(" started, pid ", 2, SECS(10));
    cg.quota(50_000);
    std::thread::sleep(Duration::from_millis(200));
    run.signal(libc::SIGHUP);
    run.wait_stderr("scaling down from 2 to 1 workers", 1, SECS(5));
    run.wait_stderr("rolling reload of 1 workers", 1, SECS(5));
    run.wait_stderr("rolling reload complete", 1, SECS(10));
    let st = status(&control);
    assert_eq!(st["instances"], 1, "{st}");
    // A fixed count never follows: --print-config says the watch is not used.
    let (_, out, _) = run_to_end(&["--print-config", "-i", "2", "--", "true"], &[], SECS(5));
    assert!(
        out.contains("cpu_watch = \"5s\"  # default: not used, instances is a fixed number"),
        "{out}"
    );
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}

/// A cgroup v1 memory directory with a limit, removed on drop.
struct MemoryCgroup(PathBuf);

impl MemoryCgroup {
    fn new(name: &str, bytes: u64) -> MemoryCgroup {
        let root = Path::new("/sys/fs/cgroup/memory");
        assert!(
            root.join("memory.limit_in_bytes").exists(),
            "prerequisite missing: a cgroup v1 memory hierarchy at {} (run as root)",
            root.display()
        );
        let dir = root.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let cg = MemoryCgroup(dir);
        cg.limit(bytes);
        cg
    }

    fn limit(&self, bytes: u64) {
        std::fs::write(self.0.join("memory.limit_in_bytes"), bytes.to_string()).unwrap();
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.0.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write("/sys/fs/cgroup/memory/cgroup.procs", pid);
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The `--max-old-space-size` each worker start printed, in order: (slot, MiB).
fn heap_lines(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("heap "))
        .map(|l| {
            let (slot, options) = l.split_once(' ').unwrap_or((l, ""));
            let mib = options
                .split_whitespace()
                .find_map(|w| w.strip_prefix("--max-old-space-size="))
                .unwrap_or("-");
            (slot.to_string(), mib.to_string())
        })
        .collect()
}

#[test]
fn the_heap_share_follows_the_worker_count_and_memory_limit() {
    const MIB: u64 = 1 << 20;
    let cg = MemoryCgroup::new("corepool-test-heap", 1000 * MIB);
    let control = control_name("heap");
    let script = format!("echo $$ > {}/cgroup.procs && exec \"$@\"", cg.0.display());
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, "sh", bin()]).args([
        "-i",
        "2",
        "--",
        "sh",
        "-c",
        "echo \"heap $COREPOOL_WORKER $NODE_OPTIONS\"; exec sleep 600",
    ]);
    let mut run = Run::from_command(cmd, &[("COREPOOL_CONTROL", &control), ("NODE_OPTIONS", "")]);
    run.wait_stdout("heap ", 2, SECS(10));
    // 70% of 1000 MiB over 2 workers.
    let sorted = |mut lines: Vec<(String, String)>| {
        lines.sort();
        lines
    };
    assert_eq!(
        sorted(heap_lines(&run.stdout())[..2].to_vec()),
        [("0".into(), "350".into()), ("1".into(), "350".into())]
    );
    // Four workers: the new ones get a quarter.
    let (code, _, err) = control_client(&control, &["scale", "4"]);
    assert_eq!(code, 0, "{err}");
    run.wait_stdout("heap ", 4, SECS(10));
    assert_eq!(
        sorted(heap_lines(&run.stdout())[2..].to_vec()),
        [("2".into(), "175".into()), ("3".into(), "175".into())]
    );
    run.wait_stderr("new Node workers get --max-old-space-size=175", 1, SECS(5));
    // The limit halves (a live resize); SIGHUP re-reads it and the reload gives every worker
    // the new share.
    cg.limit(500 * MIB);
    run.signal(libc::SIGHUP);
    run.wait_stderr(
        "(memory limit 500 MiB, was 1000 MiB; 4 workers)",
        1,
        SECS(5),
    );
    run.wait_stderr("rolling reload complete", 1, SECS(20));
    // The reload is complete once the last replacement runs (ready at start in none mode);
    // its first line reaches corepool's stdout through a pipe, moments later on a busy CPU.
    run.wait_stdout("heap ", 8, SECS(10));
    let lines = heap_lines(&run.stdout());
    assert_eq!(lines.len(), 8, "{lines:?}");
    assert!(lines[4..].iter().all(|(_, mib)| mib == "87"), "{lines:?}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}

/// Without eBPF (the kernel's hash spreads connections) a pool started with one worker grows
/// to three and shrinks to one under load, in a network namespace of its own with
/// net.ipv4.tcp_migrate_req on: what the hash queued on a removed slot's socket moves to
/// another, and no request fails.
#[test]
fn without_ebpf_a_pool_of_one_grows_and_shrinks_under_load() {
    require("unshare");
    require("setpriv");
    require("ip");
    require("nsenter");
    let port = 8080;
    let control = control_name("hash");
    let script = format!(
        "ip link set lo up && echo 1 > /proc/sys/net/ipv4/tcp_migrate_req && exec setpriv \
         --bounding-set -bpf,-sys_admin,-perfmon {} -i 1 --balance socket --host 127.0.0.1 -p \
         {port} -- node {HELLO}",
        bin()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--net", "sh", "-c", &script]);
    let run = Run::from_command(cmd, &[("COREPOOL_CONTROL", &control)]);
    run.wait_stderr(" ready (pid ", 1, SECS(30));
    let pid = run.pid();
    let scale = |count: &str| {
        let out = Command::new("nsenter")
            .args([&format!("--net=/proc/{pid}/ns/net"), bin(), "scale", count])
            .env("COREPOOL_CONTROL", &control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let load = Load::start_in(port, 4, Some(pid));
    wait_served_by(&load, "0", &run);
    assert_eq!(scale("3"), "ok: scaling from 1 to 3 workers");
    run.wait_stderr(
        "connections by the kernel's hash (no eBPF round robin",
        1,
        SECS(5),
    );
    run.wait_stderr(
        "a dead worker's queued connections move to another",
        1,
        SECS(5),
    );
    run.wait_stderr(" ready (pid ", 3, SECS(30));
    wait_served_by(&load, "1", &run);
    wait_served_by(&load, "2", &run);
    assert_eq!(scale("1"), "ok: scaling from 3 to 1 workers");
    run.wait_stderr("removed by a scale, exited", 2, SECS(30));
    wait_served_more(&load, "0", &run);
    finish_without_errors(load, run, "hash");
}

/// The CPU follow with two pools of `instances = "max"` (cpu_share 3 and 1) under a real
/// cgroup v1 quota: 2 CPUs split 2 + 1 and stay so (a follow that ignored the split would
/// give each pool both CPUs); at half a CPU the web pool alone goes to 1 and, at 2 CPUs
/// again, back to 2, the queue pool keeping its one worker throughout.
#[test]
fn the_cpu_follow_splits_the_cpus_among_pools_again() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(
        cpus >= 2,
        "prerequisite missing: 2 CPUs in our affinity ({cpus})"
    );
    require("node");
    let dir = scratch("scale-pools-cpu");
    let queue = dir.join("queue.sh");
    write_executable(
        &queue,
        "#!/bin/sh\ntrap 'exit 0' TERM\necho \"queue ready $$\"\nwhile :; do sleep 0.1; done\n",
    );
    let port = free_port();
    let file = dir.join("corepool.toml");
    std::fs::write(
        &file,
        format!(
            "host = \"127.0.0.1\"\ncpu_watch = \"300ms\"\n\n\
             [pool.web]\ncommand = [\"node\", \"{HELLO}\"]\ninstances = \"max\"\ncpu_share = 3\n\
             balance = \"socket\"\nport = {port}\n\n\
             [pool.queue]\ncommand = [\"{}\"]\ninstances = \"max\"\ncpu_share = 1\n\
             balance = \"none\"\n",
            queue.display()
        ),
    )
    .unwrap();
    let cg = Cgroup::new("corepool-test-pools-follow", 200_000);
    let control = control_name("pools-cpu");
    let mut run = cg.start(
        &["-c", file.to_str().unwrap()],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr("pool web: worker 1 ready", 1, SECS(30));
    run.wait_stdout("queue ready", 1, SECS(10));
    let counts = |control: &str| {
        let st = status(control);
        (
            st["pools"][0]["instances"].as_u64(),
            st["pools"][1]["instances"].as_u64(),
        )
    };
    assert_eq!(counts(&control), (Some(2), Some(1)));
    // Several looks at the same CPUs change nothing.
    std::thread::sleep(Duration::from_millis(1200));
    assert!(
        !run.stderr().contains("usable CPUs changed"),
        "{}",
        run.stderr()
    );
    assert_eq!(counts(&control), (Some(2), Some(1)));

    cg.quota(50_000);
    run.wait_stderr(
        "pool web: scaling down from 2 to 1 workers (usable CPUs changed: instances max now \
         comes to 1, was 2 (cgroup v1 cpu.cfs_quota_us 50000/100000",
        1,
        SECS(10),
    );
    run.wait_stderr("removed by a scale, exited", 1, SECS(30));
    assert!(
        run.stderr().contains("; cpu_share 3 of 4)"),
        "{}",
        run.stderr()
    );
    assert_eq!(counts(&control), (Some(1), Some(1)));

    cg.quota(200_000);
    run.wait_stderr("pool web: scaling up from 1 to 2 workers", 1, SECS(10));
    run.wait_stderr("pool web: worker 1 ready", 2, SECS(30));
    assert_eq!(counts(&control), (Some(2), Some(1)));
    let err = run.stderr();
    assert!(!err.contains("pool queue: scaling"), "{err}");
    run.assert_stdout_count("queue ready", 1);
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}

#[test]
fn status_lists_the_workers_still_leaving_until_they_exit() {
    // Workers that take their time to stop: each says when the stop signal reached it and
    // leaves only once the test lets it (a file named by its pid).
    let control = control_name("leaving");
    let dir = scratch("scale-leaving");
    let script = format!(
        "trap 'echo \"leaving $$\"; while [ ! -e {0}/go-$$ ]; do sleep 0.05; done; exit 0' TERM; \
         echo \"up $$\"; while :; do sleep 0.1; done",
        dir.display()
    );
    let mut run = Run::start(
        &[
            "-i",
            "2",
            "--kill-timeout",
            "60s",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stdout("up ", 2, SECS(10));
    // "worker N started, pid P": the pids of slots 0 and 1.
    let pid_of = |slot: usize| -> i32 {
        let started = format!("worker {slot} started, pid ");
        run.stderr()
            .lines()
            .rev()
            .find_map(|l| l.split_once(&started)?.1.trim().parse().ok())
            .expect("a started line")
    };
    let pids = [pid_of(0), pid_of(1)];
    let let_go = |pid: i32| std::fs::write(dir.join(format!("go-{pid}")), "").unwrap();
    let leaving = |st: &serde_json::Value| -> Vec<(u64, i64, String)> {
        st["leaving"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|w| {
                        let slot = w["slot"].as_u64().unwrap();
                        let pid = w["pid"].as_i64().unwrap();
                        (slot, pid, w["state"].as_str().unwrap().to_string())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };

    // A scale down: slot 1's worker is listed as removed while it drains, with its usage.
    let (code, out, _) = control_client(&control, &["scale", "1"]);
    assert_eq!((code, out.trim()), (0, "ok: scaling from 2 to 1 workers"));
    run.wait_stdout(&format!("leaving {}", pids[1]), 1, SECS(10));
    let st = status(&control);
    assert_eq!(st["workers"].as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(
        leaving(&st),
        [(1, i64::from(pids[1]), "removed".into())],
        "{st}"
    );
    assert!(
        st["leaving"][0]["rss_bytes"].as_u64().unwrap_or(0) > 0,
        "{st}"
    );
    let (code, table, _) = control_client(&control, &["status"]);
    assert_eq!(code, 0);
    assert!(
        table.lines().any(|l| l.split_whitespace().take(3).eq([
            "1",
            pids[1].to_string().as_str(),
            "removed"
        ]
        .into_iter())),
        "{table}"
    );
    let_go(pids[1]);
    run.wait_stderr("removed by a scale, exited", 1, SECS(10));
    let st = status(&control);
    assert_eq!(leaving(&st), [], "{st}");
    assert!(
        st.get("leaving").is_none(),
        "no list when nothing leaves: {st}"
    );

    // A reload: the replaced worker is listed as retiring until it exits.
    run.signal(libc::SIGHUP);
    run.wait_stdout(&format!("leaving {}", pids[0]), 1, SECS(10));
    let st = status(&control);
    assert_eq!(
        leaving(&st),
        [(0, i64::from(pids[0]), "retiring".into())],
        "{st}"
    );
    let_go(pids[0]);
    run.wait_for("the old worker's exit", SECS(10), |_, _| {
        leaving(&status(&control)).is_empty()
    });
    let replacement: i32 = run
        .stderr()
        .lines()
        .find_map(|l| l.split_once("worker 0: replacement started, pid "))
        .and_then(|(_, p)| p.trim().parse().ok())
        .expect("the replacement's pid");
    run.signal(libc::SIGTERM);
    run.wait_stdout(&format!("leaving {replacement}"), 1, SECS(10));
    let_go(replacement);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}
