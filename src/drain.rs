//! Drains: targets that were (or are about to be) sent the stop signal, and the SIGKILL that
//! follows when one outlives the kill timeout.
//!
//! A drain is begun for a worker that never became ready, an old worker replaced by a reload,
//! what a dead leader left in its group, and every group when the pool stops. Once a stop has
//! begun, every drain shares one deadline (the stop's kill timeout), so a chain of setsid'd
//! processes that each appear only when the one above is killed costs one kill timeout, not one
//! per level. Time is always passed in: nothing here reads the clock.

use crate::os::{Os, Target};
use nix::sys::signal::Signal;
use std::time::{Duration, Instant};

/// A target that was sent the stop signal and has until `deadline` before SIGKILL.
#[derive(Debug)]
struct Drain {
    target: Target,
    /// When the stop signal is due, until it is sent (then None).
    signal_at: Option<Instant>,
    deadline: Instant,
    killed: bool,
}

/// Every drain under way, and the stop's shared deadline.
#[derive(Debug)]
pub struct Drains {
    list: Vec<Drain>,
    stop_signal: Signal,
    kill_timeout: Duration,
    /// Once a stop has begun: when its kill timeout runs out.
    stop_deadline: Option<Instant>,
    /// Some target needed SIGKILL during the stop.
    any_killed: bool,
}

impl Drains {
    pub fn new(stop_signal: Signal, kill_timeout: Duration) -> Drains {
        Drains {
            list: Vec::new(),
            stop_signal,
            kill_timeout,
            stop_deadline: None,
            any_killed: false,
        }
    }

    /// The stop begins: from now on no drain outlives `now + kill timeout`.
    pub fn begin_stop(&mut self, now: Instant) {
        self.stop_deadline = Some(now + self.kill_timeout);
    }

    /// A second stop signal: every remaining target gets its signal and SIGKILL at once.
    pub fn hurry(&mut self, now: Instant) {
        self.stop_deadline = Some(now);
        for drain in &mut self.list {
            drain.deadline = drain.deadline.min(now);
            drain.signal_at = drain.signal_at.map(|at| at.min(now));
        }
    }

    /// Stops routing to `target` at once, sends it the stop signal after `delay` (at once
    /// when zero) and SIGKILL after the kill timeout on top. A target already draining keeps
    /// its drain.
    pub fn add(&mut self, os: &mut dyn Os, target: Target, delay: Duration, now: Instant) {
        if let Target::Group(pgid) = target {
            os.unroute(pgid);
        }
        if self.list.iter().any(|d| d.target == target) {
            return;
        }
        let signal_at = if delay.is_zero() {
            os.signal(target, self.stop_signal);
            None
        } else {
            Some(now + delay)
        };
        let mut deadline = now + delay + self.kill_timeout;
        if let Some(stop) = self.stop_deadline {
            deadline = deadline.min(stop);
        }
        self.list.push(Drain {
            target,
            signal_at,
            deadline,
            killed: false,
        });
    }

    /// Forgets targets that are gone; signals those whose delay ran out; SIGKILLs those past
    /// their deadline. `stopping`: the pool is ending, so a kill makes the stop unclean.
    pub fn escalate(&mut self, os: &mut dyn Os, now: Instant, stopping: bool) {
        self.list.retain(|d| os.alive(d.target));
        for drain in &mut self.list {
            if drain.signal_at.is_some_and(|at| at <= now) {
                os.signal(drain.target, self.stop_signal);
                drain.signal_at = None;
            }
            if !drain.killed && drain.deadline <= now {
                tracing::warn!(
                    "{} still alive after the kill timeout: SIGKILL",
                    drain.target
                );
                os.signal(drain.target, Signal::SIGKILL);
                drain.killed = true;
                // Only a kill the stop needed makes the stop unclean (exit 1); leftovers of a
                // crash or a reload killed earlier are not part of it.
                self.any_killed |= stopping;
            }
        }
    }

    /// Children of ours outside every known group (they called setsid, or are orphans of a
    /// worker's children that did): stop them too, so nothing outlives the pool unasked.
    pub fn sweep_strays(&mut self, now: Instant, os: &mut dyn Os) {
        for child in os.children() {
            if !self.covers(child.pid, child.pgid) && !child.zombie {
                tracing::info!("stopping stray process {}", child.pid);
                self.add(os, Target::Process(child.pid), Duration::ZERO, now);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether some drain covers `pid` (its group is drained, or the process itself).
    pub fn covers(&self, pid: nix::unistd::Pid, pgid: Option<nix::unistd::Pid>) -> bool {
        self.list.iter().any(|d| match d.target {
            Target::Group(g) => pgid == Some(g),
            Target::Process(p) => p == pid,
        })
    }

    /// Some target needed SIGKILL during the stop.
    pub fn any_killed(&self) -> bool {
        self.any_killed
    }

    /// The next time something is due: a delayed signal or a deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        let deadlines = self.list.iter().filter(|d| !d.killed).map(|d| d.deadline);
        deadlines
            .chain(self.list.iter().filter_map(|d| d.signal_at))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::os::fake::FakeOs;
    use nix::unistd::Pid;

    const TERM: i32 = Signal::SIGTERM as i32;
    const KILL: i32 = Signal::SIGKILL as i32;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn group(n: i32) -> Target {
        Target::Group(Pid::from_raw(n))
    }

    #[test]
    fn kill_timeout_escalates_to_sigkill_once() {
        let mut os = FakeOs::default();
        let mut d = Drains::new(Signal::SIGTERM, ms(100));
        let t0 = Instant::now();
        d.add(&mut os, group(10), Duration::ZERO, t0);
        d.add(&mut os, group(10), Duration::ZERO, t0);
        assert_eq!(os.signals_to(group(10)), vec![TERM]);
        assert_eq!(d.next_deadline(), Some(t0 + ms(100)));
        d.escalate(&mut os, t0 + ms(99), false);
        assert_eq!(os.signals_to(group(10)), vec![TERM]);
        d.escalate(&mut os, t0 + ms(100), false);
        d.escalate(&mut os, t0 + ms(150), false);
        assert_eq!(os.signals_to(group(10)), vec![TERM, KILL]);
        // A kill outside a stop does not make the stop unclean.
        assert!(!d.any_killed());
        os.vanish(group(10));
        d.escalate(&mut os, t0 + ms(200), false);
        assert!(d.is_empty());
    }

    #[test]
    fn a_target_gone_in_time_is_never_killed() {
        let mut os = FakeOs::default();
        let mut d = Drains::new(Signal::SIGINT, ms(100));
        let t0 = Instant::now();
        d.begin_stop(t0);
        d.add(&mut os, group(10), Duration::ZERO, t0);
        os.vanish(group(10));
        d.escalate(&mut os, t0 + ms(500), true);
        assert_eq!(os.signals_to(group(10)), vec![Signal::SIGINT as i32]);
        assert!(d.is_empty() && !d.any_killed());
    }

    #[test]
    fn delayed_signal_then_kill() {
        let mut os = FakeOs::default();
        let mut d = Drains::new(Signal::SIGTERM, ms(100));
        let t0 = Instant::now();
        d.add(&mut os, group(10), ms(250), t0);
        assert!(os.sent.is_empty());
        assert_eq!(d.next_deadline(), Some(t0 + ms(250)));
        d.escalate(&mut os, t0 + ms(250), false);
        assert_eq!(os.signals_to(group(10)), vec![TERM]);
        assert_eq!(d.next_deadline(), Some(t0 + ms(350)));
        d.escalate(&mut os, t0 + ms(350), false);
        assert_eq!(os.signals_to(group(10)), vec![TERM, KILL]);
        assert_eq!(d.next_deadline(), None);
    }

    #[test]
    fn the_stop_has_one_deadline_for_all() {
        let mut os = FakeOs::default();
        let mut d = Drains::new(Signal::SIGTERM, ms(100));
        let t0 = Instant::now();
        d.begin_stop(t0);
        d.add(&mut os, group(10), Duration::ZERO, t0);
        // A stray found later shares the stop's deadline.
        d.add(
            &mut os,
            Target::Process(Pid::from_raw(20)),
            Duration::ZERO,
            t0 + ms(80),
        );
        d.escalate(&mut os, t0 + ms(100), true);
        assert_eq!(os.signals_to(group(10)), vec![TERM, KILL]);
        assert_eq!(
            os.signals_to(Target::Process(Pid::from_raw(20))),
            vec![TERM, KILL]
        );
        assert!(d.any_killed());
    }

    #[test]
    fn a_second_stop_signal_kills_at_once() {
        let mut os = FakeOs::default();
        let mut d = Drains::new(Signal::SIGTERM, ms(100));
        let t0 = Instant::now();
        d.begin_stop(t0);
        d.add(&mut os, group(10), ms(50), t0);
        d.hurry(t0 + ms(10));
        d.escalate(&mut os, t0 + ms(10), true);
        assert_eq!(os.signals_to(group(10)), vec![TERM, KILL]);
        assert!(d.covers(Pid::from_raw(11), Some(Pid::from_raw(10))));
        assert!(!d.covers(Pid::from_raw(11), Some(Pid::from_raw(12))));
    }
}
