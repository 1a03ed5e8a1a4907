//! Signals: which ones corepool catches, and what each one means to the pool.
//!
//! The kernel drops default-action signals sent to PID 1, so only signals with a handler reach
//! us: every signal we give a meaning to is registered here, before the first worker is spawned,
//! so that an early SIGCHLD or SIGTERM is never lost. TERM, INT and QUIT stop the pool, HUP
//! reloads it, CHLD runs the reaper; TTIN, TTOU and TSTP are caught and ignored, so a stray
//! terminal job-control signal cannot stop PID 1. Every other catchable signal (USR1, USR2,
//! WINCH, PIPE, ALRM, STKFLT, CONT, URG, XCPU, XFSZ, VTALRM, PROF, IO, PWR and the real-time
//! signals SIGRTMIN..SIGRTMAX) is forwarded to every worker's process group, so corepool never
//! dies of one: but only when another process sent it. One the kernel raised for corepool itself
//! (SIGPIPE on a write to a closed pipe, SIGXFSZ, SIGXCPU...) concerns corepool, not the workers,
//! and is dropped; the terminal's SIGWINCH and a job-control SIGCONT are forwarded either way.
//!
//! Fault signals (SEGV, BUS, FPE, ILL, ABRT, TRAP, SYS) are not caught: a real fault in
//! corepool must still end it with a core dump. As PID 1 the kernel drops them when another
//! process sends them (no handler); not as PID 1 they end corepool, and its workers with it
//! (their parent-death signal is SIGKILL). 32 and 33 belong to the C library and are left alone.

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook::consts::signal::*;
use signal_hook::iterator::exfiltrator::WithRawSiginfo;
use signal_hook_tokio::SignalsInfo;

/// What a received signal asks of the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A child changed state: run the reaper.
    Reap,
    /// SIGTERM, SIGINT, SIGQUIT: stop gracefully (a second one skips the wait).
    Stop(Signal),
    /// SIGHUP: rolling reload.
    Reload,
    /// Every other catchable signal: pass on to every worker's process group. A raw number, as
    /// real-time signals have no `Signal` value.
    Forward(i32),
    /// Job-control signals we catch only so that they do nothing.
    Ignore(Signal),
}

/// Standard signals forwarded to the workers.
const FORWARDED: &[i32] = &[
    SIGUSR1,
    SIGUSR2,
    SIGWINCH,
    SIGPIPE,
    SIGALRM,
    libc::SIGSTKFLT,
    SIGCONT,
    SIGURG,
    SIGXCPU,
    SIGXFSZ,
    SIGVTALRM,
    SIGPROF,
    SIGIO,
    libc::SIGPWR,
];

/// Signals with a meaning of their own.
const MEANINGFUL: &[i32] = &[
    SIGCHLD, SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGTTIN, SIGTTOU, SIGTSTP,
];

/// The real-time signals as the C library hands them out (34..64 with glibc).
fn realtime() -> std::ops::RangeInclusive<i32> {
    libc::SIGRTMIN()..=libc::SIGRTMAX()
}

/// Every signal corepool installs a handler for.
pub fn handled() -> Vec<i32> {
    MEANINGFUL
        .iter()
        .chain(FORWARDED)
        .copied()
        .chain(realtime())
        .collect()
}

/// Maps a signal number to its meaning for the pool.
pub fn classify(signo: i32) -> Option<Action> {
    if FORWARDED.contains(&signo) || realtime().contains(&signo) {
        return Some(Action::Forward(signo));
    }
    let sig = Signal::try_from(signo).ok()?;
    Some(match sig {
        Signal::SIGCHLD => Action::Reap,
        Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => Action::Stop(sig),
        Signal::SIGHUP => Action::Reload,
        Signal::SIGTTIN | Signal::SIGTTOU | Signal::SIGTSTP => Action::Ignore(sig),
        _ => return None,
    })
}

/// Whether a signal to forward was sent by some other process (kill, sigqueue, tgkill), rather
/// than raised by the kernel for corepool itself: a write to a closed pipe raises SIGPIPE as if
/// corepool had sent it to itself, a resource limit raises SIGXCPU or SIGXFSZ. `own` is
/// corepool's pid.
fn sent_by_another(info: &libc::siginfo_t, own: i32) -> bool {
    // si_code as the kernel sets it: SI_USER for kill(2), SI_QUEUE for sigqueue(3), SI_TKILL
    // for tgkill(2); positive (SI_KERNEL and the like) or another negative code otherwise.
    const SI_TKILL: i32 = -6;
    if !matches!(info.si_code, libc::SI_USER | libc::SI_QUEUE | SI_TKILL) {
        return false;
    }
    // SAFETY: for these codes the kernel filled in si_pid.
    unsafe { info.si_pid() != own }
}
/// The stream of caught signals, already classified.
pub struct SignalStream {
    signals: SignalsInfo<WithRawSiginfo>,
}

/// Blocks every handled signal on the calling thread until [`SignalStream::install`]: what
/// arrives in between (a SIGTERM while `node --version` runs at start-up, say) stays pending
/// instead of being dropped, as the kernel drops a default-action signal sent to PID 1.
pub fn hold() -> std::io::Result<()> {
    mask(libc::SIG_BLOCK, &handled())
}

fn mask(how: libc::c_int, signals: &[i32]) -> std::io::Result<()> {
    // SAFETY: sigset operations on a stack value, then pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &signo in signals {
            libc::sigaddset(&mut set, signo);
        }
        match libc::pthread_sigmask(how, &set, std::ptr::null_mut()) {
            0 => Ok(()),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

impl SignalStream {
    /// Installs the handlers, then delivers whatever [`hold`] kept pending. Must run before
    /// any worker is spawned.
    pub fn install() -> std::io::Result<SignalStream> {
        let handled = handled();
        let signals = SignalsInfo::<WithRawSiginfo>::new(&handled)?;
        mask(libc::SIG_UNBLOCK, &handled)?;
        Ok(SignalStream { signals })
    }

    /// The next signal with a meaning; pending forever once the stream is closed. A signal to
    /// forward that the kernel raised for corepool itself is dropped here (see the module doc).
    pub async fn next(&mut self) -> Action {
        let own = std::process::id() as i32;
        loop {
            let Some(info) = self.signals.next().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match classify(info.si_signo) {
                Some(Action::Forward(signo))
                    if signo != SIGWINCH && signo != SIGCONT && !sent_by_another(&info, own) =>
                {
                    tracing::debug!(
                        "{} raised for corepool itself (si_code {}): not forwarded",
                        crate::reaper::signal_name(signo),
                        info.si_code
                    );
                }
                Some(action) => return action,
                None => {}
            }
        }
    }
}

/// Puts the calling (freshly forked) process back to a clean signal state before exec: an empty
/// signal mask and the default disposition for every catchable signal, real-time ones included. Exec resets caught
/// signals to default but keeps ignored ones and the mask, and Rust ignores SIGPIPE, so without
/// this a worker would inherit corepool's choices.
///
/// Async-signal-safe: only raw syscalls, no allocation. For use in `pre_exec`.
pub fn reset_for_exec() -> std::io::Result<()> {
    // SAFETY: plain libc calls on stack values; valid after fork in a multithreaded parent.
    unsafe {
        // Dispositions first: `launch` forks with every signal blocked, so none can run
        // corepool's handler in the child (and write to corepool's signal pipe) before this.
        for signo in 1..=64 {
            if signo == libc::SIGKILL || signo == libc::SIGSTOP {
                continue;
            }
            set_default(signo);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        if libc::sigemptyset(&mut empty) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The kernel's own `struct sigaction` (x86_64 and aarch64 layout).
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Sets the default disposition with the raw system call: the C library refuses the signals it
/// reserves for itself (32 and 33), yet a parent may have left them ignored, and an ignored
/// signal survives exec.
///
/// # Safety
/// Only for a freshly forked child about to exec (see [`reset_for_exec`]): in corepool itself
/// it would take away a handler that signal-hook installed and relies on.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
unsafe fn set_default(signo: i32) {
    let action = KernelSigaction {
        handler: libc::SIG_DFL,
        flags: 0,
        restorer: 0,
        mask: 0,
    };
    // SAFETY: a valid kernel sigaction on the stack; the old action is not asked for. Failure
    // (EINVAL for numbers the kernel does not know) leaves nothing to undo.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            signo,
            &action as *const KernelSigaction,
            std::ptr::null_mut::<KernelSigaction>(),
            8usize,
        );
    }
}

/// Sets the default disposition with signal(2) where the kernel's sigaction layout is not known.
///
/// # Safety
/// Only for a freshly forked child about to exec (see [`reset_for_exec`]): in corepool itself
/// it would take away a handler that signal-hook installed and relies on.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn set_default(signo: i32) {
    // SAFETY: signal(2) with SIG_DFL; glibc rejects its reserved numbers, which is harmless.
    unsafe { libc::signal(signo, libc::SIG_DFL) };
}

/// Parses a signal as users write it: `SIGTERM`, `TERM`, `term` or `15`.
pub fn parse_signal(text: &str) -> Result<Signal, String> {
    let trimmed = text.trim();
    if let Ok(num) = trimmed.parse::<i32>() {
        return Signal::try_from(num).map_err(|_| format!("no signal has number {num}"));
    }
    let upper = trimmed.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>()
        .map_err(|_| format!("'{trimmed}' is not a signal name (e.g. SIGTERM, INT, 15)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(classify(SIGTERM), Some(Action::Stop(Signal::SIGTERM)));
        assert_eq!(classify(SIGHUP), Some(Action::Reload));
        assert_eq!(classify(SIGUSR2), Some(Action::Forward(SIGUSR2)));
        assert_eq!(classify(libc::SIGPWR), Some(Action::Forward(libc::SIGPWR)));
        assert_eq!(classify(34), Some(Action::Forward(34)));
        assert_eq!(classify(64), Some(Action::Forward(64)));
        assert_eq!(classify(SIGCHLD), Some(Action::Reap));
        assert_eq!(classify(SIGTSTP), Some(Action::Ignore(Signal::SIGTSTP)));
        for fault in [SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS] {
            assert_eq!(classify(fault), None, "{fault}");
        }
        assert_eq!(classify(32), None);
        assert_eq!(classify(33), None);
        assert_eq!(classify(9999), None);
    }

    #[test]
    fn every_catchable_signal_has_a_meaning_but_the_faults() {
        // 1..=64 minus what cannot be caught, the faults, and the C library's own two.
        let left_out = [
            SIGKILL, SIGSTOP, SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT, SIGTRAP, SIGSYS, 32, 33,
        ];
        for signo in (1..=64).filter(|s| !left_out.contains(s)) {
            assert!(classify(signo).is_some(), "signal {signo} has no meaning");
            assert!(handled().contains(&signo), "signal {signo} is not caught");
        }
        for signo in left_out {
            assert!(!handled().contains(&signo), "signal {signo} is caught");
        }
    }

    #[test]
    fn parses_signal_names() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("int"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal(" 9 "), Ok(Signal::SIGKILL));
        assert!(parse_signal("SIGFOO").is_err());
        assert!(parse_signal("0").is_err());
        assert!(parse_signal("").is_err());
        assert!(parse_signal("-3").is_err());
    }
}
