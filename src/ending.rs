//! The ending: how the pool comes to stop, and the one function that decides corepool's exit
//! code.
//!
//! A stop signal ends the pool (after `--shutdown-delay` for a first SIGTERM, during which
//! /readyz fails and the workers serve on); so does every slot being finished or given up.
//! Either way every live group is drained, and the exit code is chosen here once nothing is
//! left: 0 for a clean stop, 1 when some group needed SIGKILL, and the last worker's status
//! (as a shell says it) when the pool died. Time is always passed in.

use crate::exit;
use crate::reaper::ExitStatus;
use crate::units::format_duration as human;
use crate::worker::RestartPolicy;
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// Why the pool is ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// A stop signal: exit 0, or 1 if some group needed SIGKILL.
    Stop(Signal),
    /// Every slot is finished or given up, or the command cannot run: exit with this code.
    PoolDied(i32),
}

/// What a stop signal does, as decided by [`Shutdown::on_stop_signal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopStep {
    /// A first SIGTERM under --shutdown-delay: not ready any more; the stop begins later.
    Delay(Duration),
    /// A stop signal during the shutdown delay: the stop begins now.
    Hurry,
    /// The stop begins now.
    Begin,
    /// A stop signal during the stop: kill what is left at once.
    KillNow,
}

/// The pool's way to its end.
#[derive(Debug)]
pub struct Shutdown {
    delay: Duration,
    /// SIGTERM under --shutdown-delay: the stop begins at this time, with this signal.
    stop_at: Option<(Instant, Signal)>,
    ending: Option<Ending>,
}

impl Shutdown {
    pub fn new(delay: Duration) -> Shutdown {
        Shutdown {
            delay,
            stop_at: None,
            ending: None,
        }
    }

    /// Decides what the stop signal `sig` does now (and says so, but for `Begin`).
    pub fn on_stop_signal(&mut self, sig: Signal, now: Instant) -> StopStep {
        if self.ending.is_some() {
            tracing::warn!("{sig} again: killing every remaining process group now");
            return StopStep::KillNow;
        }
        if self.stop_at.is_some() {
            tracing::info!("{sig} during the shutdown delay: stopping now");
            self.stop_at = Some((now, sig));
            return StopStep::Hurry;
        }
        if sig == Signal::SIGTERM && !self.delay.is_zero() {
            tracing::info!(
                "SIGTERM: not ready any more (/readyz fails); workers keep serving for the \
                 shutdown delay of {}, then stop",
                human(self.delay)
            );
            self.stop_at = Some((now + self.delay, sig));
            return StopStep::Delay(self.delay);
        }
        StopStep::Begin
    }

    /// The shutdown delay is over: the signal the stop begins with.
    pub fn delay_over(&self, now: Instant) -> Option<Signal> {
        match self.stop_at {
            Some((at, sig)) if at <= now && self.ending.is_none() => Some(sig),
            _ => None,
        }
    }

    /// The pool ends, for this reason (the first reason stands).
    pub fn begin(&mut self, ending: Ending) {
        self.ending.get_or_insert(ending);
    }

    /// Why the pool ends, once it does.
    pub fn ending(&self) -> Option<Ending> {
        self.ending
    }

    /// Whether the stop has begun.
    pub fn is_ending(&self) -> bool {
        self.ending.is_some()
    }

    /// Whether the pool says it is stopping (not ready): during the delay or the stop.
    pub fn is_announced(&self) -> bool {
        self.ending.is_some() || self.stop_at.is_some()
    }

    /// When the shutdown delay ends, if one runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.stop_at
            .map(|(at, _)| at)
            .filter(|_| self.ending.is_none())
    }

    /// The exit code, once the pool is ending and nothing of it is left (`any_killed`: some
    /// group needed SIGKILL during the stop).
    pub fn exit_code(&self, any_killed: bool) -> Option<i32> {
        Some(match self.ending? {
            Ending::Stop(_) if any_killed => exit::KILLED,
            Ending::Stop(_) => exit::STOPPED,
            Ending::PoolDied(code) => code,
        })
    }
}

/// The code of a pool whose every slot is over: the last worker's status as a shell says it,
/// except that a clean exit under `--restart always` is still a failure (the pool was meant
/// to run for ever).
pub fn pool_death_code(last: ExitStatus, policy: RestartPolicy) -> i32 {
    let code = last.shell_code();
    if code == 0 && policy == RestartPolicy::Always {
        1
    } else {
        code
    }
}

/// Every slot of the pool is over, the last with `last`: says so (for a `oneshot` pool,
/// finishing with 0 is its success), and the ending it comes to.
pub fn pool_died(last: ExitStatus, policy: RestartPolicy, oneshot: bool) -> Ending {
    let code = pool_death_code(last, policy);
    if oneshot && code == 0 {
        tracing::info!("every worker slot finished with 0");
    } else {
        tracing::error!("every worker slot is finished: the pool is dead (exit {code})");
    }
    Ending::PoolDied(code)
}

/// How one of several pools ended (see `fleet`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolEnd {
    /// A `oneshot` pool whose every slot finished with 0: the others go on, and the pools
    /// that wait for it (`after`) may start.
    Finished,
    /// The pool died (every slot over or given up) with this code: the container stops.
    Died(i32),
    /// The pool was stopped (a stop signal, or another pool died); its drain's code, 0 or 1.
    Stopped(i32),
}

/// What a pool's ending means for the container: `oneshot` pools may finish with 0 alone.
pub fn pool_end(oneshot: bool, ending: Ending, code: i32) -> PoolEnd {
    match ending {
        Ending::PoolDied(0) if oneshot => PoolEnd::Finished,
        Ending::PoolDied(died) => PoolEnd::Died(died),
        Ending::Stop(_) => PoolEnd::Stopped(code),
    }
}

/// The container's exit code once every pool is over: the code of the first pool that died,
/// else 1 when some stop needed SIGKILL, else 0. With one pool, that pool's own code.
pub fn container_code(first_death: Option<i32>, ends: impl IntoIterator<Item = PoolEnd>) -> i32 {
    if let Some(code) = first_death {
        return code;
    }
    ends.into_iter()
        .map(|end| match end {
            PoolEnd::Finished => exit::STOPPED,
            PoolEnd::Died(code) | PoolEnd::Stopped(code) => code,
        })
        .max()
        .unwrap_or(exit::STOPPED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn shutdown_delay_then_stop() {
        let t0 = Instant::now();
        let mut s = Shutdown::new(ms(300));
        assert!(!s.is_announced());
        assert_eq!(
            s.on_stop_signal(Signal::SIGTERM, t0),
            StopStep::Delay(ms(300))
        );
        assert!(s.is_announced() && !s.is_ending());
        assert_eq!(s.next_deadline(), Some(t0 + ms(300)));
        assert_eq!(s.delay_over(t0 + ms(299)), None);
        assert_eq!(s.delay_over(t0 + ms(300)), Some(Signal::SIGTERM));
        s.begin(Ending::Stop(Signal::SIGTERM));
        assert_eq!(s.delay_over(t0 + ms(400)), None);
        assert_eq!(s.next_deadline(), None);
        assert_eq!(s.on_stop_signal(Signal::SIGTERM, t0), StopStep::KillNow);
    }

    #[test]
    fn a_second_signal_cuts_the_delay_short() {
        let t0 = Instant::now();
        let mut s = Shutdown::new(ms(300));
        s.on_stop_signal(Signal::SIGTERM, t0);
        assert_eq!(
            s.on_stop_signal(Signal::SIGINT, t0 + ms(10)),
            StopStep::Hurry
        );
        assert_eq!(s.delay_over(t0 + ms(10)), Some(Signal::SIGINT));
    }

    #[test]
    fn no_delay_for_sigint_or_without_the_option() {
        let t0 = Instant::now();
        assert_eq!(
            Shutdown::new(ms(300)).on_stop_signal(Signal::SIGINT, t0),
            StopStep::Begin
        );
        assert_eq!(
            Shutdown::new(Duration::ZERO).on_stop_signal(Signal::SIGTERM, t0),
            StopStep::Begin
        );
    }

    #[test]
    fn exit_code_choice() {
        let mut s = Shutdown::new(Duration::ZERO);
        assert_eq!(s.exit_code(false), None);
        s.begin(Ending::Stop(Signal::SIGTERM));
        assert_eq!(s.exit_code(false), Some(exit::STOPPED));
        assert_eq!(s.exit_code(true), Some(exit::KILLED));
        // The first reason stands.
        s.begin(Ending::PoolDied(3));
        assert_eq!(s.exit_code(false), Some(exit::STOPPED));
        let mut s = Shutdown::new(Duration::ZERO);
        s.begin(Ending::PoolDied(3));
        assert_eq!(s.exit_code(true), Some(3));
        use RestartPolicy::*;
        assert_eq!(pool_death_code(ExitStatus::Code(0), Always), 1);
        assert_eq!(pool_death_code(ExitStatus::Code(0), OnFailure), 0);
        assert_eq!(pool_death_code(ExitStatus::Code(4), Never), 4);
        assert_eq!(pool_death_code(ExitStatus::Signaled(9), Never), 137);
    }

    #[test]
    fn several_pools_end_together() {
        let term = Ending::Stop(Signal::SIGTERM);
        assert_eq!(pool_end(true, Ending::PoolDied(0), 0), PoolEnd::Finished);
        assert_eq!(pool_end(false, Ending::PoolDied(0), 0), PoolEnd::Died(0));
        assert_eq!(pool_end(true, Ending::PoolDied(3), 3), PoolEnd::Died(3));
        assert_eq!(pool_end(true, term, 1), PoolEnd::Stopped(1));
        use PoolEnd::*;
        // The first pool that died gives its code, whatever the others' drains did.
        assert_eq!(container_code(Some(3), [Died(3), Stopped(1)]), 3);
        assert_eq!(container_code(Some(0), [Died(0), Stopped(1)]), 0);
        assert_eq!(container_code(None, [Finished, Stopped(0)]), 0);
        assert_eq!(container_code(None, [Finished, Stopped(1)]), 1);
        assert_eq!(container_code(None, [Finished, Finished]), 0);
    }
}
