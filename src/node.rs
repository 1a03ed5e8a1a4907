//! Node: what corepool adds to a Node worker. The preload (`preload/*.cjs`, joined and embedded),
//! delivered by `--require` of a private file or, where no directory is writable, by `--import`
//! of a `data:` URL (the probe of the Node version, run only then, says whether that Node has
//! `--import`); the NODE_OPTIONS words; and the heap share under a memory limit
//! (`--heap-share`). The preload adopts socket mode's listening socket, reports readiness and
//! drains on the stop signal (in proxy mode too).
//!
//! Why a file first: `--import` starts Node's ES module loader in every worker, CommonJS apps
//! included, and compiles the 45 KB URL: measured 15 ms of CPU per worker start against 1 ms
//! for `--require` of the same text (node 20, hello server, medians of 21; README "Where the
//! start-up time goes"), and it needs the version probe (6 ms, before anything starts).

use crate::launch::{self, WorkerIo};
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The preload, embedded in the binary (nothing is read from disk at run time): one script
/// joined from its parts in `src/preload/`, in this order (`start.cjs` says what each holds).
const PRELOAD: &str = concat!(
    include_str!("preload/start.cjs"),
    include_str!("preload/adopt.cjs"),
    include_str!("preload/ports.cjs"),
    include_str!("preload/ready.cjs"),
    include_str!("preload/drain.cjs"),
);

/// The preload as the ES module that `--import` loads: `require` made by a prologue.
fn preload_module() -> String {
    format!(
        "import {{ createRequire }} from 'node:module';\nconst require = createRequire('/corepool-preload.cjs');\n{PRELOAD}"
    )
}

/// What every worker's environment gets for Node: the preload and the heap share appended to
/// NODE_OPTIONS, and the stop signal the preload drains on.
#[derive(Debug)]
pub struct NodeEnv {
    pub preload: Option<Preload>,
    /// `--max-old-space-size=…` for each Node worker under a memory limit (heap share).
    pub heap_option: Option<String>,
    /// `--stop-signal`, named to the workers (COREPOOL_STOP_SIGNAL) for the preload's drain.
    pub stop_signal: nix::sys::signal::Signal,
    /// NODE_OPTIONS as corepool found it (from config), which the words are appended to.
    pub node_options: String,
}

impl NodeEnv {
    pub fn new(preload: Option<Preload>, node_options: String) -> NodeEnv {
        NodeEnv {
            preload,
            heap_option: None,
            stop_signal: nix::sys::signal::Signal::SIGTERM,
            node_options,
        }
    }

    /// Adds COREPOOL_STOP_SIGNAL (with a preload) and the NODE_OPTIONS words to `io`.
    pub fn apply(&self, io: &mut WorkerIo) {
        let extra: Vec<&str> = [
            self.preload.as_ref().map(|p| p.node_option.as_str()),
            self.heap_option.as_deref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        if self.preload.is_some() {
            io.env.push((
                "COREPOOL_STOP_SIGNAL".into(),
                self.stop_signal.as_str().into(),
            ));
        }
        if !extra.is_empty() {
            let mut node_options = self.node_options.clone();
            for option in extra {
                if !node_options.trim().is_empty() {
                    node_options.push(' ');
                }
                node_options.push_str(option);
            }
            io.env.push(("NODE_OPTIONS".into(), node_options));
        }
    }
}

/// How the Node preload reaches a worker: the NODE_OPTIONS words to append.
#[derive(Debug)]
pub struct Preload {
    pub node_option: String,
    /// For the start-up log: how it was delivered and why.
    pub how: String,
    /// The file written for `--require`, removed when the pool is done with it.
    _file: Option<PreloadFile>,
}

/// The preload written to a file for `--require`: `preload.cjs` (mode 0644) in a
/// directory this process created (`corepool-<random>`, mode 0711: others may read the file by
/// its name, so workers running as another user can too, but nobody else can list, add, or
/// replace anything in it). Both are created exclusively, never through a symlink, so a name
/// planted in a shared /tmp or /dev/shm is never followed, overwritten or adopted; and only
/// what this process created is removed (on drop), never another pool's file.
#[derive(Debug)]
pub struct PreloadFile {
    pub dir: PathBuf,
    pub file: PathBuf,
}

impl Drop for PreloadFile {
    fn drop(&mut self) {
        for (what, result) in [
            (&self.file, std::fs::remove_file(&self.file)),
            (&self.dir, std::fs::remove_dir(&self.dir)),
        ] {
            if let Err(err) = result {
                tracing::warn!("cannot remove the Node preload {}: {err}", what.display());
            }
        }
    }
}

impl Preload {
    /// Chooses the delivery: `--require` of a file in the first writable of `runtime_dir`
    /// ($COREPOOL_RUNTIME_DIR), /dev/shm, /tmp; where none is (a read-only root filesystem
    /// without a tmpfs), `--import` of a `data:` URL if the Node that will run has it, as
    /// `node_version` (called only then) says.
    pub fn prepare(
        node_version: impl FnOnce() -> Option<(u32, u32)>,
        runtime_dir: Option<&Path>,
    ) -> io::Result<Preload> {
        let no_file = match write_preload_file(runtime_dir) {
            Ok(file) => {
                return Ok(Preload {
                    node_option: format!("--require \"{}\"", file.file.display()),
                    how: format!("--require {} (removed at exit)", file.file.display()),
                    _file: Some(file),
                });
            }
            Err(err) => err,
        };
        let node_version = node_version();
        let version = node_version
            .map(|(a, b)| format!("node {a}.{b}"))
            .unwrap_or_else(|| "node version unknown".into());
        let imports = match node_version {
            // `--import` came with Node 18.18 (and 20.0).
            Some((major, minor)) => major >= 19 || (major == 18 && minor >= 18),
            // No node found to ask: assume a current one.
            None => true,
        };
        if !imports {
            return Err(io::Error::new(
                no_file.kind(),
                format!("{no_file}, and {version} has no --import to load it from memory"),
            ));
        }
        let module = preload_module();
        Ok(Preload {
            node_option: format!(
                "--import=data:text/javascript;base64,{}",
                base64(module.as_bytes())
            ),
            how: format!("--import of a data: URL ({version}; {no_file})"),
            _file: None,
        })
    }
}

fn write_preload_file(runtime_dir: Option<&Path>) -> io::Result<PreloadFile> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = runtime_dir {
        dirs.push(dir.into());
    }
    dirs.extend(["/dev/shm".into(), "/tmp".into()]);
    let mut last = io::Error::other("no candidate directory");
    for dir in dirs {
        match write_preload_in(&dir, PRELOAD.as_bytes()) {
            Ok(file) => return Ok(file),
            Err(err) => last = io::Error::new(err.kind(), format!("{}: {err}", dir.display())),
        }
    }
    Err(io::Error::new(
        last.kind(),
        format!(
            "no writable directory for the Node preload ($COREPOOL_RUNTIME_DIR, /dev/shm, /tmp): {last}"
        ),
    ))
}

/// Creates `<parent>/corepool-<random>/preload.cjs` holding `text` (see [`PreloadFile`]).
pub fn write_preload_in(parent: &Path, text: &[u8]) -> io::Result<PreloadFile> {
    use nix::fcntl::{OFlag, open, openat};
    use nix::sys::stat::{Mode as Perm, fchmod, mkdirat};
    use std::io::Write;
    let parent_fd = open(
        parent,
        OFlag::O_DIRECTORY | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
        Perm::empty(),
    )?;
    // A random name nobody can guess ahead; on the rare clash, another.
    let mut name = String::new();
    for attempt in 0.. {
        name = format!("corepool-{}", random_hex(8)?);
        // mkdir never follows a symlink at the name and fails if anything is there.
        match mkdirat(&parent_fd, name.as_str(), Perm::S_IRWXU) {
            Ok(()) => break,
            Err(nix::errno::Errno::EEXIST) if attempt < 16 => continue,
            Err(err) => return Err(err.into()),
        }
    }
    let dir = parent.join(&name);
    let created = (|| -> io::Result<std::fs::File> {
        let dir_fd = openat(
            &parent_fd,
            name.as_str(),
            OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Perm::empty(),
        )?;
        // Exact modes whatever the umask: 0711, so workers of another user reach the file.
        fchmod(&dir_fd, Perm::from_bits_truncate(0o711))?;
        let fd = openat(
            &dir_fd,
            "preload.cjs",
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Perm::S_IRUSR | Perm::S_IWUSR,
        )?;
        fchmod(&fd, Perm::from_bits_truncate(0o644))?;
        Ok(std::fs::File::from(fd))
    })();
    let mut out = match created {
        Ok(out) => out,
        Err(err) => {
            // Only the directory is ours yet.
            if let Err(rm) = std::fs::remove_dir(&dir) {
                tracing::warn!("cannot remove {}: {rm}", dir.display());
            }
            return Err(err);
        }
    };
    let made = PreloadFile {
        file: dir.join("preload.cjs"),
        dir,
    };
    out.write_all(text)?;
    Ok(made)
}

/// `bytes` random bytes from the kernel (getrandom(2), else /dev/urandom), as hex.
fn random_hex(bytes: usize) -> io::Result<String> {
    let mut buf = vec![0u8; bytes];
    // SAFETY: getrandom writes at most buf.len() bytes into buf.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        use std::io::Read;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    }
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// The version of the `node` that runs the command: the command itself when it is a node
/// binary, else the first `node` on `path` ($PATH). Runs `node --version` once, before any
/// worker.
pub fn node_version(program: &Path, path: Option<OsString>) -> Option<(u32, u32)> {
    let node = if program
        .file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("node"))
    {
        program.to_path_buf()
    } else {
        launch::resolve_program("node", path).ok()?
    };
    // std waits for this child itself; the supervisor loop (the reaper) is not running yet.
    let out = std::process::Command::new(node)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_node_version(&String::from_utf8_lossy(&out.stdout))
}

fn parse_node_version(text: &str) -> Option<(u32, u32)> {
    let mut parts = text.trim().trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The heap share of one Node worker under a memory limit, in MiB: 70% of the limit divided
/// among the workers, leaving 30% for what V8's old-space limit does not cover (young
/// generation, code, buffers, native modules, the other processes of the container). At least
/// 64 MiB, so that a tiny limit still lets Node start. None when NODE_OPTIONS already sets it.
pub fn heap_share_mib(limit_bytes: u64, workers: usize, node_options: &str) -> Option<u64> {
    if node_options.contains("--max-old-space-size") || workers == 0 {
        return None;
    }
    let share = limit_bytes / 10 * 7 / workers as u64;
    Some((share >> 20).max(64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_base64() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar!"), "Zm9vYmFyIQ==");
    }

    #[test]
    fn node_versions() {
        assert_eq!(parse_node_version("v20.20.2\n"), Some((20, 20)));
        assert_eq!(parse_node_version("v18.19.0"), Some((18, 19)));
        assert_eq!(parse_node_version("garbage"), None);
    }

    /// With a writable directory the preload is a file there, and the version probe (a node
    /// started) does not run at all.
    #[test]
    fn a_writable_directory_gets_the_file_without_probing_node() {
        let parent = std::env::temp_dir().join(format!("corepool-unit-{}", random_hex(6).unwrap()));
        std::fs::create_dir(&parent).unwrap();
        let probe = || -> Option<(u32, u32)> { panic!("the version probe ran") };
        let preload = Preload::prepare(probe, Some(&parent)).unwrap();
        let file = preload._file.as_ref().unwrap().file.clone();
        assert!(file.starts_with(&parent), "{}", file.display());
        assert_eq!(
            preload.node_option,
            format!("--require \"{}\"", file.display())
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), PRELOAD);
        drop(preload);
        assert!(!file.exists());
        std::fs::remove_dir(&parent).unwrap();
    }

    /// Each pool gets a directory of its own (0711, ours) with the file (0644, ours) inside,
    /// and removes only those: a neighbour's file and the parent stay.
    #[test]
    fn preload_files_are_private_and_removed_alone() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let parent = std::env::temp_dir().join(format!("corepool-unit-{}", random_hex(6).unwrap()));
        std::fs::create_dir(&parent).unwrap();
        let neighbour = parent.join("corepool-neighbour");
        std::fs::create_dir(&neighbour).unwrap();
        std::fs::write(neighbour.join("preload.cjs"), "theirs").unwrap();
        let a = write_preload_in(&parent, b"a").unwrap();
        let b = write_preload_in(&parent, b"b").unwrap();
        assert_ne!(a.dir, b.dir);
        assert_eq!(std::fs::read(&a.file).unwrap(), b"a");
        let (dir, file) = (a.dir.metadata().unwrap(), a.file.metadata().unwrap());
        assert_eq!(dir.permissions().mode() & 0o7777, 0o711);
        assert_eq!(file.permissions().mode() & 0o7777, 0o644);
        let me = nix::unistd::geteuid().as_raw();
        assert_eq!((dir.uid(), file.uid()), (me, me));
        let (a_dir, b_dir) = (a.dir.clone(), b.dir.clone());
        drop(a);
        assert!(!a_dir.exists() && b_dir.join("preload.cjs").exists());
        drop(b);
        assert!(!b_dir.exists());
        assert_eq!(
            std::fs::read(neighbour.join("preload.cjs")).unwrap(),
            b"theirs"
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    /// The parts, each ending in a newline (so joining them glues no two lines), joined in
    /// PRELOAD's order, parse as one script: as the CommonJS file of `--require` and as the
    /// ES module of `--import`. Needs `node` on PATH (fails without it).
    #[test]
    fn preload_parts_join_into_one_script() {
        let parts = [
            ("start.cjs", include_str!("preload/start.cjs")),
            ("adopt.cjs", include_str!("preload/adopt.cjs")),
            ("ports.cjs", include_str!("preload/ports.cjs")),
            ("ready.cjs", include_str!("preload/ready.cjs")),
            ("drain.cjs", include_str!("preload/drain.cjs")),
        ];
        for (name, text) in parts {
            assert!(
                text.ends_with('\n'),
                "src/preload/{name} must end in a newline"
            );
            assert!(
                text.starts_with(&format!("// {name}")) || name == "start.cjs",
                "src/preload/{name} opens with a comment naming its role"
            );
        }
        let joined: String = parts.iter().map(|(_, text)| *text).collect();
        assert_eq!(joined, PRELOAD, "the test's list of parts is PRELOAD's");
        let dir = std::env::temp_dir().join(format!("corepool-unit-{}", random_hex(6).unwrap()));
        std::fs::create_dir(&dir).unwrap();
        for (file, text) in [
            ("preload.cjs", PRELOAD.to_string()),
            ("preload.mjs", preload_module()),
        ] {
            let path = dir.join(file);
            std::fs::write(&path, text).unwrap();
            let out = std::process::Command::new("node")
                .arg("--check")
                .arg(&path)
                .output()
                .unwrap_or_else(|err| {
                    panic!("node --check {}: {err} (node on PATH?)", path.display())
                });
            assert!(
                out.status.success(),
                "node --check {}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn heap_shares() {
        assert_eq!(heap_share_mib(2 << 30, 2, ""), Some(716));
        assert_eq!(heap_share_mib(128 << 20, 4, ""), Some(64));
        assert_eq!(heap_share_mib(2 << 30, 2, "--max-old-space-size=100"), None);
    }
}
