//! cgroup: how many CPUs and how much memory this container may really use.
//!
//! The host's core count says nothing about a pod: a 2-CPU pod on a 64-core node must run 2
//! workers, not 64. The usable CPU count is the smaller of the CPUs in our affinity mask
//! (`taskset`, cpusets) and the cgroup CPU quota rounded up (`cpu.max` in cgroup v2,
//! `cpu.cfs_quota_us / cpu.cfs_period_us` in v1), at least one. The memory limit comes from
//! `memory.max` (v2) or `memory.limit_in_bytes` (v1).
//!
//! Our own cgroup is found through /proc/self/cgroup, and where its hierarchy is mounted
//! through /proc/self/mountinfo; limits of every ancestor up to the mount point count (the
//! tightest wins). Every function takes a `root` under which those absolute paths are read, so
//! the parsers are tested on fixture trees; a missing or garbled file means "no limit there",
//! never a panic.

use std::fmt;
use std::path::{Path, PathBuf};

/// Which cgroup hierarchy a limit came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A CPU bandwidth limit: `quota_us` of CPU time per `period_us`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuQuota {
    pub version: CgroupVersion,
    pub quota_us: u64,
    pub period_us: u64,
    /// The cgroup directory that set it.
    pub dir: PathBuf,
}

impl CpuQuota {
    /// CPUs the quota allows, rounded up.
    pub fn cpus(&self) -> usize {
        self.quota_us.div_ceil(self.period_us).max(1) as usize
    }

    fn ratio(&self) -> f64 {
        self.quota_us as f64 / self.period_us as f64
    }
}

/// How the usable CPU count was reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuReport {
    /// min(affinity, ceil(quota / period)), at least 1.
    pub usable: usize,
    pub online: usize,
    pub affinity: usize,
    pub quota: Option<CpuQuota>,
}

impl fmt::Display for CpuReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.quota {
            Some(q) => {
                let file = match q.version {
                    CgroupVersion::V2 => "v2 cpu.max",
                    CgroupVersion::V1 => "v1 cpu.cfs_quota_us",
                };
                write!(f, "cgroup {file} {}/{}; ", q.quota_us, q.period_us)?;
            }
            None => f.write_str("no cgroup CPU limit; ")?,
        }
        if self.affinity < self.online {
            write!(
                f,
                "affinity {} of {} CPUs online",
                self.affinity, self.online
            )
        } else {
            write!(f, "{} CPUs online", self.online)
        }
    }
}

/// A memory limit in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryLimit {
    pub bytes: u64,
    pub version: CgroupVersion,
    pub dir: PathBuf,
}

/// Values at or above this are v1's way of saying "no limit".
const UNLIMITED: u64 = 1 << 60;

/// The live system's CPU report.
pub fn cpu_report() -> CpuReport {
    let online = online_cpus();
    cpu_report_at(Path::new("/"), affinity_cpus().unwrap_or(online), online)
}

/// The CPU report with every absolute path read under `root`.
pub fn cpu_report_at(root: &Path, affinity: usize, online: usize) -> CpuReport {
    let quota = cgroup_dirs(root, "cpu")
        .into_iter()
        .flat_map(|(version, dirs)| dirs.into_iter().map(move |d| (version, d)))
        .filter_map(|(version, dir)| read_cpu_quota(version, &dir))
        .min_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    let mut usable = affinity.max(1);
    if let Some(q) = &quota {
        usable = usable.min(q.cpus());
    }
    CpuReport {
        usable,
        online,
        affinity,
        quota,
    }
}

/// The live system's memory limit, if any.
pub fn memory_limit() -> Option<MemoryLimit> {
    memory_limit_at(Path::new("/"))
}

/// The memory limit with every absolute path read under `root`.
pub fn memory_limit_at(root: &Path) -> Option<MemoryLimit> {
    cgroup_dirs(root, "memory")
        .into_iter()
        .flat_map(|(version, dirs)| dirs.into_iter().map(move |d| (version, d)))
        .filter_map(|(version, dir)| {
            let file = match version {
                CgroupVersion::V2 => "memory.max",
                CgroupVersion::V1 => "memory.limit_in_bytes",
            };
            let bytes: u64 = read_trimmed(&dir.join(file))?.parse().ok()?;
            (bytes < UNLIMITED).then_some(MemoryLimit {
                bytes,
                version,
                dir,
            })
        })
        .min_by_key(|m| m.bytes)
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_cpu_quota(version: CgroupVersion, dir: &Path) -> Option<CpuQuota> {
    let (quota, period) = match version {
        CgroupVersion::V2 => {
            let text = read_trimmed(&dir.join("cpu.max"))?;
            let mut parts = text.split_whitespace();
            let quota = parts.next()?;
            let period = parts.next().unwrap_or("100000");
            (quota.to_string(), period.to_string())
        }
        CgroupVersion::V1 => (
            read_trimmed(&dir.join("cpu.cfs_quota_us"))?,
            read_trimmed(&dir.join("cpu.cfs_period_us"))?,
        ),
    };
    let quota_us: u64 = quota.parse().ok()?; // "max" and -1 fail here: no limit
    let period_us: u64 = period.parse().ok()?;
    (quota_us > 0 && period_us > 0).then(|| CpuQuota {
        version,
        quota_us,
        period_us,
        dir: dir.to_path_buf(),
    })
}

/// For each hierarchy carrying `controller` (v1) or the unified one (v2): our cgroup's
/// directory and its ancestors up to the mount point.
fn cgroup_dirs(root: &Path, controller: &str) -> Vec<(CgroupVersion, Vec<PathBuf>)> {
    let under = |p: &str| root.join(p.trim_start_matches('/'));
    let (Some(cgroups), Some(mounts)) = (
        read_trimmed(&under("/proc/self/cgroup")),
        std::fs::read_to_string(under("/proc/self/mountinfo")).ok(),
    ) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for line in cgroups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let version = if controllers.is_empty() {
            CgroupVersion::V2
        } else if controllers.split(',').any(|c| c == controller) {
            CgroupVersion::V1
        } else {
            continue;
        };
        for (mount_root, mount_point) in mounts_of(&mounts, version, controller) {
            let relative = path
                .strip_prefix(mount_root.as_str())
                .unwrap_or("")
                .trim_start_matches('/');
            let top = under(&mount_point);
            let mut dirs = Vec::new();
            let mut dir = top.join(relative);
            while dir.starts_with(&top) {
                dirs.push(dir.clone());
                if !dir.pop() {
                    break;
                }
            }
            found.push((version, dirs));
        }
    }
    found
}

/// (mount root, mount point) of every mount of the hierarchy.
fn mounts_of(mountinfo: &str, version: CgroupVersion, controller: &str) -> Vec<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next();
            let options = right.next().unwrap_or("");
            let wanted = match version {
                CgroupVersion::V2 => fstype == "cgroup2",
                CgroupVersion::V1 => {
                    fstype == "cgroup" && options.split(',').any(|o| o == controller)
                }
            };
            (wanted && left.len() >= 5).then(|| (unescape(left[3]), unescape(left[4])))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash as `\040`-style octal escapes.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn online_cpus() -> usize {
    use nix::unistd::{SysconfVar, sysconf};
    match sysconf(SysconfVar::_NPROCESSORS_ONLN) {
        Ok(Some(n)) if n > 0 => n as usize,
        _ => 1,
    }
}

fn affinity_cpus() -> Option<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    let set = sched_getaffinity(nix::unistd::Pid::from_raw(0)).ok()?;
    let n = (0..CpuSet::count())
        .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
        .count();
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixture tree: files given as (absolute path, contents) under a fresh directory.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str, files: &[(&str, &str)]) -> Tree {
            let dir =
                std::env::temp_dir().join(format!("corepool-cg-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            for (path, text) in files {
                let full = dir.join(path.trim_start_matches('/'));
                std::fs::create_dir_all(full.parent().unwrap()).unwrap();
                std::fs::write(full, text).unwrap();
            }
            Tree(dir)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const V2_MOUNT: &str = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
    const V1_MOUNT: &str = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                            35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";

    #[test]
    fn v2_quota() {
        let t = Tree::new(
            "v2",
            &[
                ("/proc/self/cgroup", "0::/kubepods/pod1\n"),
                ("/proc/self/mountinfo", V2_MOUNT),
                ("/sys/fs/cgroup/kubepods/pod1/cpu.max", "400000 100000\n"),
                ("/sys/fs/cgroup/kubepods/pod1/memory.max", "536870912\n"),
            ],
        );
        let r = cpu_report_at(&t.0, 64, 64);
        assert_eq!(r.usable, 4);
        assert_eq!(
            r.to_string(),
            "cgroup v2 cpu.max 400000/100000; 64 CPUs online"
        );
        assert_eq!(memory_limit_at(&t.0).unwrap().bytes, 512 << 20);
    }

    #[test]
    fn v2_max_and_nested() {
        let t = Tree::new(
            "v2n",
            &[
                ("/proc/self/cgroup", "0::/a/b\n"),
                ("/proc/self/mountinfo", V2_MOUNT),
                ("/sys/fs/cgroup/a/b/cpu.max", "max 100000\n"),
                ("/sys/fs/cgroup/a/cpu.max", "150000 100000\n"),
                ("/sys/fs/cgroup/a/b/memory.max", "max\n"),
            ],
        );
        let r = cpu_report_at(&t.0, 8, 8);
        assert_eq!(r.usable, 2, "the parent's quota binds");
        assert!(r.quota.unwrap().dir.ends_with("sys/fs/cgroup/a"));
        assert_eq!(memory_limit_at(&t.0), None);

        let t = Tree::new(
            "v2c",
            &[
                ("/proc/self/cgroup", "0::/a/b\n"),
                ("/proc/self/mountinfo", V2_MOUNT),
                ("/sys/fs/cgroup/a/b/cpu.max", "50000 100000\n"),
                ("/sys/fs/cgroup/a/cpu.max", "300000 100000\n"),
            ],
        );
        assert_eq!(
            cpu_report_at(&t.0, 8, 8).usable,
            1,
            "the child's quota binds"
        );
    }

    #[test]
    fn v1_combined_controller() {
        let t = Tree::new(
            "v1",
            &[
                (
                    "/proc/self/cgroup",
                    "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
                ),
                ("/proc/self/mountinfo", V1_MOUNT),
                (
                    "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us",
                    "150000\n",
                ),
                (
                    "/sys/fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_period_us",
                    "100000\n",
                ),
                (
                    "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes",
                    "9223372036854771712\n",
                ),
            ],
        );
        let r = cpu_report_at(&t.0, 4, 4);
        assert_eq!(r.usable, 2);
        assert_eq!(
            r.to_string(),
            "cgroup v1 cpu.cfs_quota_us 150000/100000; 4 CPUs online"
        );
        assert_eq!(
            memory_limit_at(&t.0),
            None,
            "v1's huge value means no limit"
        );
        assert_eq!(cpu_report_at(&t.0, 1, 4).usable, 1, "affinity binds");
        assert_eq!(
            cpu_report_at(&t.0, 1, 4).to_string(),
            "cgroup v1 cpu.cfs_quota_us 150000/100000; affinity 1 of 4 CPUs online"
        );
    }

    #[test]
    fn v1_unlimited_and_container_view() {
        // Inside a container the mount root is the container's own cgroup path.
        let t = Tree::new(
            "v1c",
            &[
                ("/proc/self/cgroup", "4:cpu,cpuacct:/docker/abc\n"),
                (
                    "/proc/self/mountinfo",
                    "32 31 0:29 /docker/abc /sys/fs/cgroup/cpu\\040x rw - cgroup cgroup rw,cpu,cpuacct\n",
                ),
                ("/sys/fs/cgroup/cpu x/cpu.cfs_quota_us", "-1\n"),
                ("/sys/fs/cgroup/cpu x/cpu.cfs_period_us", "100000\n"),
            ],
        );
        let r = cpu_report_at(&t.0, 2, 2);
        assert_eq!(r.quota, None);
        assert_eq!(r.to_string(), "no cgroup CPU limit; 2 CPUs online");
        std::fs::write(t.0.join("sys/fs/cgroup/cpu x/cpu.cfs_quota_us"), "50000").unwrap();
        assert_eq!(
            cpu_report_at(&t.0, 2, 2).usable,
            1,
            "escaped mount point read"
        );
    }

    #[test]
    fn garbage_means_no_limit() {
        let t = Tree::new(
            "junk",
            &[
                ("/proc/self/cgroup", "nonsense\n::\n0::\n"),
                ("/proc/self/mountinfo", "garbage line\n - \n"),
                ("/sys/fs/cgroup/cpu.max", "banana 0\n"),
            ],
        );
        assert_eq!(cpu_report_at(&t.0, 3, 3).usable, 3);
        assert_eq!(cpu_report_at(Path::new("/nonexistent"), 0, 2).usable, 1);
        let t = Tree::new(
            "zero",
            &[
                ("/proc/self/cgroup", "0::/\n"),
                ("/proc/self/mountinfo", V2_MOUNT),
                ("/sys/fs/cgroup/cpu.max", "100000 0\n"),
            ],
        );
        assert_eq!(cpu_report_at(&t.0, 3, 3).quota, None, "zero period ignored");
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\134c"), "a b\\c");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn live_report_is_sane() {
        let r = cpu_report();
        assert!(r.usable >= 1 && r.usable <= r.online.max(r.affinity));
    }
}
