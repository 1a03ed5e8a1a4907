//! The worker count follows the CPUs the container may use: a real cgroup v1 CPU quota made by
//! the test (this machine mounts cgroup v1; we are root), `taskset`, `-i -K`, and the
//! WEB_CONCURRENCY fallback. Fails loudly when the cgroup hierarchy is missing.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const CPU_ROOT: &str = "/sys/fs/cgroup/cpu";

/// A cgroup v1 cpu directory, removed on drop.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(parent: &Path, name: &str, quota: i64) -> Cgroup {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            mounts.lines().any(|l| l.contains(" /sys/fs/cgroup/cpu ")
                && l.contains(" - cgroup ")
                && l.contains("cpu")),
            "prerequisite missing: a cgroup v1 cpu hierarchy mounted at {CPU_ROOT} (run as root)"
        );
        let dir = parent.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        std::fs::write(dir.join("cpu.cfs_period_us"), "100000").unwrap();
        std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()).unwrap();
        Cgroup(dir)
    }

    /// Runs corepool ARGS inside this cgroup; returns (code, stdout, stderr).
    fn run(&self, args: &str, env: &[(&str, &str)]) -> (i32, String, String) {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} {args}",
            self.0.display(),
            bin()
        );
        let mut cmd = Command::new("sh");
        cmd.args(["-c", &script]);
        let mut run = Run::from_command(cmd, env);
        let code = run.exit_code(SECS(10));
        (code, run.stdout(), run.stderr())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for child in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
            if child.path().is_dir() {
                let _ = std::fs::remove_dir(child.path());
            }
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn instances_line(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with("instances = "))
        .unwrap_or_else(|| panic!("{out}"))
        .to_string()
}

fn affinity_count() -> usize {
    // SAFETY: a zeroed cpu_set_t is valid; the kernel fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        libc::CPU_COUNT(&set) as usize
    }
}

#[test]
fn cgroup_v1_quota_decides_the_count() {
    let half = Cgroup::new(Path::new(CPU_ROOT), "corepool-test-half", 50_000);
    let (code, out, err) = half.run("--print-config -- true", &[]);
    assert_eq!(code, 0, "{err}");
    let line = instances_line(&out);
    assert!(
        line.starts_with(
            "instances = 1  # default: max = 1 usable CPU (cgroup v1 cpu.cfs_quota_us 50000/100000"
        ),
        "{line}"
    );

    let one_and_half = Cgroup::new(Path::new(CPU_ROOT), "corepool-test-1half", 150_000);
    let (_, out, _) = one_and_half.run("--print-config -- true", &[]);
    let expected = affinity_count().min(2);
    assert!(
        instances_line(&out).starts_with(&format!("instances = {expected}  #")),
        "{out}"
    );
    let (_, out, _) = one_and_half.run("--print-config -i -1 -- true", &[]);
    assert!(
        instances_line(&out).starts_with(&format!("instances = {}  #", (expected - 1).max(1))),
        "{out}"
    );

    // Nested: the parent's quota binds a child without one.
    let parent = Cgroup::new(Path::new(CPU_ROOT), "corepool-test-parent", 100_000);
    let child = Cgroup::new(&parent.0, "child", -1);
    let (_, out, _) = child.run("--print-config -- true", &[]);
    assert!(
        instances_line(&out).starts_with("instances = 1  #"),
        "{out}"
    );
    drop(child);
}

#[test]
fn a_real_run_under_a_quota_starts_that_many_workers() {
    let cg = Cgroup::new(Path::new(CPU_ROOT), "corepool-test-run", 50_000);
    let (code, _, err) = cg.run("--restart never -- true", &[("COREPOOL_BALANCE", "none")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("starting 1 worker (cgroup v1 cpu.cfs_quota_us 50000/100000"),
        "{err}"
    );
    assert_eq!(started_pids(&err).len(), 1, "{err}");
}

#[test]
fn taskset_limits_the_count() {
    require("taskset");
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0", bin(), "--print-config", "--", "true"]);
    let mut run = Run::from_command(cmd, &[]);
    assert_eq!(run.exit_code(SECS(5)), 0);
    let line = instances_line(&run.stdout());
    assert!(line.starts_with("instances = 1  #"), "{line}");
    if affinity_count() < 2 {
        return;
    }
    assert!(line.contains("affinity 1 of"), "{line}");
    let (_, out, _) = run_to_end(&["--print-config", "--", "true"], &[], SECS(5));
    assert!(
        instances_line(&out).starts_with(&format!("instances = {}  #", affinity_count())),
        "{out}"
    );
}

#[test]
fn web_concurrency_is_a_fallback() {
    let (_, out, _) = run_to_end(
        &["--print-config", "--", "true"],
        &[("WEB_CONCURRENCY", "3")],
        SECS(5),
    );
    assert_eq!(instances_line(&out), "instances = 3  # env WEB_CONCURRENCY");
    let (_, out, _) = run_to_end(
        &["--print-config", "--", "true"],
        &[("WEB_CONCURRENCY", "3"), ("COREPOOL_INSTANCES", "2")],
        SECS(5),
    );
    assert_eq!(
        instances_line(&out),
        "instances = 2  # env COREPOOL_INSTANCES"
    );
}
