//! Launch: how a worker process is created, by hand, with fork and exec.
//!
//! `std::process::Command` would do most of this, but it waits for a child whose exec failed
//! (stealing a status from the reaper, and panicking if the reaper got there first), it cannot
//! put the child's own pid into its environment (`LISTEN_PID` of socket activation must equal
//! the worker's pid), and it cannot place inherited sockets on fixed descriptor numbers. So
//! corepool prepares everything in the parent (every allocation happens before `fork`), and the
//! child makes only async-signal-safe system calls before `execve`:
//!
//! 1. its own process group (`setpgid(0, 0)`), so `kill(-pgid)` reaches it and all it starts;
//!    with `--user`, its supplementary groups, gid and uid (`setgroups`, `setgid`, `setuid`,
//!    in that order); then SIGKILL as its parent-death signal (after the credentials, whose
//!    change would clear it), so it cannot outlive a killed corepool;
//! 2. an empty signal mask and default dispositions (see `signals::reset_for_exec`);
//! 3. stdin from /dev/null, stdout and stderr into pipes that corepool reads line by line;
//! 4. every inherited descriptor from 3 up marked close-on-exec, then the descriptors handed
//!    down on purpose (the listening socket as fd 3, the readiness pipe as fd 4) placed;
//! 5. `LISTEN_PID` written as its own pid, the soft descriptor limit corepool was started with
//!    put back (see `limits`), then `execve`.
//!
//! If a step fails the child writes which one and errno to a close-on-exec pipe and exits 127;
//! the parent reads them and reports the error. The parent never waits for the child: the
//! reaper does.

use crate::fatal::Fatal;
use crate::user::RunAs;
use crate::{exit, limits, signals};
use nix::sys::signal::{SigSet, SigmaskHow};
use nix::unistd::Pid;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What every worker process of the pool is started with.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The resolved program (an absolute or relative path: no PATH search at exec).
    pub program: PathBuf,
    /// argv, argv[0] as the user wrote it: bytes, passed to execve unchanged.
    pub argv: Vec<OsString>,
    /// `--user`: the identity the worker takes before exec.
    pub user: Option<RunAs>,
}

/// What one particular worker gets on top of the spec: variables and descriptors.
#[derive(Debug, Default)]
pub struct WorkerIo {
    /// Variables to set (replacing inherited ones of the same name).
    pub env: Vec<(String, String)>,
    /// Variables to remove from the inherited environment.
    pub unset: Vec<&'static str>,
    /// Descriptors to hand down: (descriptor in corepool, number in the worker). Sources must
    /// be >= 10 so that placing one cannot overwrite another.
    pub fds: Vec<(RawFd, RawFd)>,
    /// Set `LISTEN_PID` to the worker's own pid (socket activation).
    pub listen_pid: bool,
}

/// A freshly started worker process and the read ends of its output pipes.
pub struct Launched {
    pub pid: Pid,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("argument or variable contains a NUL byte"))
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// The environment of one worker: corepool's own, minus `unset` and the names in `set`, plus
/// `set` (where a name is set twice, the later value). `--user` sets HOME, USER and LOGNAME
/// (the worker's own variables still win). `LISTEN_PID` gets a placeholder the child fills in.
fn environment(io: &WorkerIo, user: Option<&RunAs>) -> io::Result<(Vec<CString>, Option<usize>)> {
    let mut set: Vec<(String, String)> = Vec::new();
    let mut unset: Vec<&str> = io.unset.clone();
    for (name, value) in user.map(RunAs::env).unwrap_or_default() {
        match value {
            Some(value) => set.push((name.into(), value)),
            None => unset.push(name),
        }
    }
    set.extend(io.env.iter().cloned());
    let overridden = |name: &OsString| {
        let name = name.as_bytes();
        set.iter().any(|(k, _)| k.as_bytes() == name)
            || unset.iter().any(|k| k.as_bytes() == name)
            || (io.listen_pid && name == b"LISTEN_PID")
    };
    let mut env = Vec::new();
    for (name, value) in crate::config::env::inherited() {
        if !overridden(&name) {
            env.push(cstring(
                &[name.as_bytes(), b"=", value.as_bytes()].concat(),
            )?);
        }
    }
    // One entry per name, the last setting winning: with two, getenv(3) would see the first.
    for (k, (name, value)) in set.iter().enumerate() {
        if !set[k + 1..].iter().any(|(later, _)| later == name) {
            env.push(cstring(format!("{name}={value}").as_bytes())?);
        }
    }
    let mut listen_pid_at = None;
    if io.listen_pid {
        listen_pid_at = Some(env.len());
        // Room for any pid (at most 10 digits); the child writes the digits and a NUL.
        env.push(cstring(b"LISTEN_PID=00000000000")?);
    }
    Ok((env, listen_pid_at))
}

impl LaunchSpec {
    /// Starts one worker process. Returns once `execve` has succeeded.
    pub fn launch(&self, io: &WorkerIo) -> io::Result<Launched> {
        let program = cstring(self.program.as_os_str().as_bytes())?;
        let argv: Vec<CString> = self
            .argv
            .iter()
            .map(|a| cstring(a.as_bytes()))
            .collect::<io::Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let (env, listen_pid_at) = environment(io, self.user.as_ref())?;
        let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
        envp.push(std::ptr::null());
        let listen_pid_buf: *mut u8 = match listen_pid_at {
            // SAFETY: points just past "LISTEN_PID=" inside a CString that outlives the fork;
            // only the child (a separate copy of memory) writes through it.
            Some(i) => unsafe { (env[i].as_ptr() as *mut u8).add("LISTEN_PID=".len()) },
            None => std::ptr::null_mut(),
        };

        let devnull = nix::fcntl::open(
            "/dev/null",
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let (exec_r, exec_w) = pipe()?;
        let child_fds = ChildFds {
            parent: nix::unistd::getpid().as_raw(),
            stdin: devnull.as_raw_fd(),
            stdout: out_w.as_raw_fd(),
            stderr: err_w.as_raw_fd(),
            report: exec_w.as_raw_fd(),
        };
        // The identity to take, as plain numbers (no allocation after fork).
        let credentials = self
            .user
            .as_ref()
            .filter(|u| u.switch)
            .map(|u| Credentials {
                uid: u.uid,
                gid: u.gid,
                groups: &u.groups,
            });

        let blocked = AllSignalsBlocked::new()?;
        // SAFETY: after fork the child only calls async-signal-safe functions on memory
        // prepared above, then execs or _exits; it never returns into Rust code.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            // SAFETY: see above; this never returns.
            unsafe {
                child_exec(
                    &child_fds,
                    credentials.as_ref(),
                    &io.fds,
                    listen_pid_buf,
                    program.as_ptr(),
                    argv_ptrs.as_ptr(),
                    envp.as_ptr(),
                )
            }
        }
        drop((blocked, out_w, err_w, exec_w, devnull));
        let pid = Pid::from_raw(pid);
        match read_exec_report(exec_r) {
            Some((Step::Exec, errno)) => Err(io::Error::from_raw_os_error(errno)),
            Some((step, errno)) => {
                // Whatever the errno (EPERM, or EINVAL for an id a user namespace does not
                // map), the worker cannot run as asked: the pool's "not executable" case.
                let why = nix::errno::Errno::from_raw(errno).desc();
                let user = self.user.as_ref().map(RunAs::describe).unwrap_or_default();
                Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("cannot become user {user}: {}: {why}", step.name()),
                ))
            }
            None => Ok(Launched {
                pid,
                stdout: out_r,
                stderr: err_r,
            }),
        }
    }
}

/// Every signal blocked on this thread while it lives, for the span of a fork: a signal that
/// reached the child before its dispositions are reset would run corepool's handler there, and
/// that handler writes to corepool's own signal pipe (a phantom signal for the pool). The child
/// inherits the full mask and clears it in `signals::reset_for_exec`; the parent gets its mask
/// back on drop, and what arrived meanwhile is delivered then.
struct AllSignalsBlocked(SigSet);

impl AllSignalsBlocked {
    fn new() -> io::Result<AllSignalsBlocked> {
        // sigfillset: real-time signals included.
        let old = SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK)?;
        Ok(AllSignalsBlocked(old))
    }
}

impl Drop for AllSignalsBlocked {
    fn drop(&mut self) {
        // Restores the mask saved in `new`; cannot fail with a valid `how`.
        let _ = self.0.thread_set_mask();
    }
}

/// The step of the child that failed: written with errno to the report pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    /// execve, or the set-up around it (process group, descriptors, signals).
    Exec = 0,
    SetGroups = 1,
    SetGid = 2,
    SetUid = 3,
}

impl Step {
    fn from_raw(raw: i32) -> Step {
        match raw {
            1 => Step::SetGroups,
            2 => Step::SetGid,
            3 => Step::SetUid,
            _ => Step::Exec,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Step::Exec => "execve",
            Step::SetGroups => "setgroups",
            Step::SetGid => "setgid",
            Step::SetUid => "setuid",
        }
    }
}

/// The identity the child takes, borrowed from the `RunAs` prepared before the fork.
struct Credentials<'a> {
    uid: u32,
    gid: u32,
    groups: &'a [libc::gid_t],
}

/// The step and errno a failed child reported, or None once exec closed the pipe.
fn read_exec_report(pipe: OwnedFd) -> Option<(Step, i32)> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match nix::unistd::read(&pipe, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    (got == 8).then(|| {
        let [s0, s1, s2, s3, e0, e1, e2, e3] = buf;
        (
            Step::from_raw(i32::from_ne_bytes([s0, s1, s2, s3])),
            i32::from_ne_bytes([e0, e1, e2, e3]),
        )
    })
}

/// Descriptors the child places on 0, 1, 2, and where it reports a failed exec.
struct ChildFds {
    /// corepool's pid, to notice that it died before the death signal was armed.
    parent: libc::pid_t,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    report: RawFd,
}

/// The child's side, between fork and exec. Only raw, async-signal-safe system calls.
///
/// # Safety
/// Call only in the child of a `fork` (it never returns: it execs or `_exit`s). Every pointer
/// must be valid in the child's copy of memory: `program`, and the NULL-terminated `argv` and
/// `envp` of NUL-terminated strings; `listen_pid_buf` null or with room for 11 bytes.
unsafe fn child_exec(
    fds: &ChildFds,
    credentials: Option<&Credentials>,
    handed: &[(RawFd, RawFd)],
    listen_pid_buf: *mut u8,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    // SAFETY: the caller's contract above: valid pointers, a fresh single-threaded child; only
    // async-signal-safe calls on memory prepared before the fork.
    unsafe {
        // Keep the report pipe clear of the numbers we are about to fill.
        let report = libc::fcntl(fds.report, libc::F_DUPFD_CLOEXEC, 64);
        let fail_at = |report: RawFd, step: Step| -> ! {
            let errno = *libc::__errno_location();
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&(step as i32).to_ne_bytes());
            bytes[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(report, bytes.as_ptr().cast(), 8);
            libc::_exit(exit::NOT_FOUND)
        };
        let fail = |report: RawFd| -> ! { fail_at(report, Step::Exec) };
        if report < 0 {
            libc::_exit(exit::NOT_FOUND);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(report);
        }
        // Groups first, uid last: once the uid is not 0 nothing else may change. Raw system
        // calls: they change this thread's credentials, and the child has no other thread.
        if let Some(c) = credentials {
            if libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) != 0 {
                fail_at(report, Step::SetGroups);
            }
            if libc::syscall(libc::SYS_setgid, c.gid) != 0 {
                fail_at(report, Step::SetGid);
            }
            if libc::syscall(libc::SYS_setuid, c.uid) != 0 {
                fail_at(report, Step::SetUid);
            }
        }
        // If corepool itself is SIGKILLed (it is not PID 1, or the OOM killer chose it), its
        // workers must not live on holding the port. The signal is tied to the forking thread:
        // corepool forks only from its main thread, which lives as long as the process.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0
            || libc::getppid() != fds.parent
        {
            fail(report);
        }
        if signals::reset_for_exec().is_err() {
            fail(report);
        }
        for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
            if libc::dup2(from, to) < 0 {
                fail(report);
            }
        }
        close_inherited_fds();
        for &(from, to) in handed {
            if from == to {
                libc::fcntl(to, libc::F_SETFD, 0);
            } else if libc::dup2(from, to) < 0 {
                fail(report);
            }
        }
        if !listen_pid_buf.is_null() {
            write_decimal(listen_pid_buf, libc::getpid() as u32);
        }
        // The descriptor limit corepool was given, not the one it raised for itself.
        limits::restore_for_exec();
        libc::execve(program, argv, envp);
        fail(report)
    }
}

/// Writes `n` in decimal followed by a NUL at `buf` (room for 11 bytes). No allocation.
///
/// # Safety
/// `buf` must be valid for writes of 11 bytes.
unsafe fn write_decimal(buf: *mut u8, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller gives 11 writable bytes; len <= 10.
        unsafe { *buf.add(i) = digits[len - 1 - i] };
    }
    // SAFETY: as above: len <= 10, so the NUL lands within the 11 bytes.
    unsafe { *buf.add(len) = 0 };
}

/// Marks every descriptor from 3 up close-on-exec, so that nothing corepool inherited or opened
/// leaks into a worker. close_range(2) (Linux 5.11+), else a bounded fcntl loop.
fn close_inherited_fds() {
    // SAFETY: raw syscalls on integers; no memory is touched.
    unsafe {
        let done = libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0;
        if !done {
            let mut limit: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(65_536) as i32
            } else {
                1024
            };
            for fd in 3..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
}

/// Finds the program as `execvp` would (PATH search unless it contains a slash) and checks that
/// it is an executable file, so that a typo fails once, clearly, before any worker runs:
/// `exit::NOT_FOUND` (127) when missing, `exit::NOT_EXECUTABLE` (126) when not executable or a
/// directory, as a shell would say.
pub fn resolve_program(
    name: impl AsRef<std::ffi::OsStr>,
    path_var: Option<OsString>,
) -> Result<PathBuf, Fatal> {
    let name = name.as_ref();
    let not_found = || {
        Fatal::new(
            exit::NOT_FOUND,
            format_args!("command not found: {}", name.to_string_lossy()),
        )
    };
    if name.is_empty() {
        return Err(not_found());
    }
    let candidates: Vec<PathBuf> = if name.as_bytes().contains(&b'/') {
        vec![PathBuf::from(name)]
    } else {
        let path_var = path_var.unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
        std::env::split_paths(&path_var)
            .map(|dir| dir.join(name))
            .collect()
    };
    let mut unusable = None;
    for candidate in candidates {
        match check_executable(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(Some(err)) => {
                unusable.get_or_insert(err);
            }
            Err(None) => {}
        }
    }
    Err(unusable.unwrap_or_else(not_found))
}

/// Ok for an executable file; Err(None) when absent; Err(Some) when present but unusable.
fn check_executable(path: &Path) -> Result<(), Option<Fatal>> {
    let meta = std::fs::metadata(path).map_err(|_| None)?;
    let shown = path.display();
    if meta.is_dir() {
        return Err(Some(Fatal::new(
            exit::NOT_EXECUTABLE,
            format_args!("command is a directory: {shown}"),
        )));
    }
    let executable = meta.permissions().mode() & 0o111 != 0
        && nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok();
    if !executable {
        return Err(Some(Fatal::new(
            exit::NOT_EXECUTABLE,
            format_args!("command is not executable (permission denied): {shown}"),
        )));
    }
    Ok(())
}

/// Moves a descriptor to a number >= 10 (close-on-exec), so that placing handed-down
/// descriptors on 3 and 4 in a child can never overwrite another one (see [`WorkerIo::fds`]).
pub fn above_ten(fd: OwnedFd) -> io::Result<OwnedFd> {
    let moved = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new descriptor that we own.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(moved) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_digits() {
        for n in [0u32, 7, 10, 4_194_304, u32::MAX] {
            let mut buf = [b'x'; 11];
            // SAFETY: buf has the 11 bytes write_decimal needs.
            unsafe { write_decimal(buf.as_mut_ptr(), n) };
            let end = buf.iter().position(|&b| b == 0).unwrap();
            assert_eq!(std::str::from_utf8(&buf[..end]).unwrap(), n.to_string());
        }
    }

    #[test]
    fn environment_overrides_and_placeholder() {
        let io = WorkerIo {
            env: vec![("PATH".into(), "/x".into())],
            unset: vec!["HOME"],
            fds: vec![],
            listen_pid: true,
        };
        let (env, at) = environment(&io, None).unwrap();
        let text: Vec<String> = env
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        assert_eq!(text.iter().filter(|e| e.starts_with("PATH=")).count(), 1);
        assert!(text.contains(&"PATH=/x".to_string()));
        assert!(!text.iter().any(|e| e.starts_with("HOME=")));
        assert!(text[at.unwrap()].starts_with("LISTEN_PID="));
    }

    #[test]
    fn environment_of_another_user() {
        let user = RunAs {
            spec: "12345".into(),
            uid: 12345,
            gid: 12345,
            groups: vec![12345],
            name: None,
            home: "/".into(),
            switch: true,
        };
        let io = WorkerIo {
            env: vec![("COREPOOL_WORKER".into(), "0".into())],
            ..WorkerIo::default()
        };
        let (env, _) = environment(&io, Some(&user)).unwrap();
        let text: Vec<String> = env
            .iter()
            .map(|e| e.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            text.iter()
                .filter(|e| e.starts_with("HOME="))
                .collect::<Vec<_>>(),
            ["HOME=/"]
        );
        assert!(
            !text
                .iter()
                .any(|e| e.starts_with("USER=") || e.starts_with("LOGNAME="))
        );
        assert!(text.contains(&"COREPOOL_WORKER=0".to_string()));
    }

    #[test]
    fn resolves_programs() {
        assert!(resolve_program("sh", crate::config::env::path()).is_ok());
        assert_eq!(
            resolve_program("no-such-cmd-xyz", crate::config::env::path())
                .unwrap_err()
                .code,
            exit::NOT_FOUND
        );
        assert_eq!(
            resolve_program("/etc", None).unwrap_err().code,
            exit::NOT_EXECUTABLE
        );
        let plain = std::env::temp_dir().join(format!("corepool-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        let result = resolve_program(plain.to_str().unwrap(), None);
        std::fs::remove_file(&plain).unwrap();
        assert_eq!(result.unwrap_err().code, exit::NOT_EXECUTABLE);
        assert_eq!(
            resolve_program("./missing", None).unwrap_err().code,
            exit::NOT_FOUND
        );
        assert_eq!(resolve_program("", None).unwrap_err().code, exit::NOT_FOUND);
    }
}
