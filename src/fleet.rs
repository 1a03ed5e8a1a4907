//! Several named pools in one container (`[pool.NAME]` tables): one supervision core per
//! pool, driven together by the one loop of `pool`, with one reaper and one signal policy.
//!
//! The fleet routes what the loop hears to the pool it concerns: a reaped pid or a readiness
//! report goes to the pool that knows the pid (an orphan to the first pool, which logs it); a
//! signal goes to every pool. It decides, with `ending`, how the pools' endings combine:
//! a `oneshot` pool whose slots all finished with 0 ends alone and lets the pools that wait for
//! it (`after`) start; any other pool that dies (every slot over or given up) stops the whole
//! container, which then exits with that pool's code. Without `[pool.*]` tables the fleet has
//! one unnamed member that starts at once: corepool behaves as a single pool always did.
//!
//! Like the supervisor, the fleet has no process, clock or socket of its own: it is generic
//! over [`Os`], and unit-tested with `FakeOs`.

use crate::ending::{Ending, PoolEnd, container_code, pool_end};
use crate::os::Os;
use crate::reaper::Exit;
use crate::signals::Action;
use crate::supervisor::{Settings, Supervisor};
use nix::unistd::Pid;
use std::time::Instant;

/// One pool of the container.
pub struct Member<O> {
    /// Its name (`[pool.NAME]`); empty for the single pool of a configuration without tables.
    pub name: String,
    /// Finishing with 0 ends this pool alone (a migration step).
    pub oneshot: bool,
    /// The members (indices) that must have finished before this one starts.
    pub after: Vec<usize>,
    pub settings: Settings,
    /// The core, once the pool has started.
    pub core: Option<Supervisor>,
    pub os: O,
    /// How the pool ended, once nothing of it is left.
    pub end: Option<PoolEnd>,
}

impl<O: Os> Member<O> {
    pub fn new(name: String, settings: Settings, os: O) -> Member<O> {
        Member {
            name,
            oneshot: false,
            after: Vec::new(),
            settings,
            core: None,
            os,
            end: None,
        }
    }

    /// Where the pool is, for status and metrics: waiting, running, stopping, finished, done.
    pub fn state(&self) -> &'static str {
        match (&self.core, self.end) {
            (_, Some(PoolEnd::Finished)) => "finished",
            (_, Some(_)) => "done",
            (None, None) => "waiting",
            (Some(core), None) if core.stopping() => "stopping",
            (Some(_), None) => "running",
        }
    }
}

/// A span naming the pool in every log line the core writes meanwhile (none when unnamed).
pub fn span(name: &str) -> tracing::span::EnteredSpan {
    if name.is_empty() {
        tracing::Span::none().entered()
    } else {
        tracing::info_span!("pool", pool = %name).entered()
    }
}

/// Every pool of the container, and how the container ends.
pub struct Fleet<O> {
    pub members: Vec<Member<O>>,
    /// The pool that died first, and its code: the container's exit code.
    first_death: Option<(usize, i32)>,
    /// The container stops (a stop signal, or a pool died): nothing more starts.
    stopping: bool,
}

impl<O: Os> Fleet<O> {
    pub fn new(members: Vec<Member<O>>) -> Fleet<O> {
        Fleet {
            members,
            first_death: None,
            stopping: false,
        }
    }

    /// Starts the pools that may start: those not waiting for an unfinished `after`.
    fn start_due(&mut self, now: Instant) {
        if self.stopping {
            return;
        }
        for i in 0..self.members.len() {
            let m = &self.members[i];
            if m.core.is_some() || m.end.is_some() {
                continue;
            }
            let ready = m
                .after
                .iter()
                .all(|&d| self.members[d].end == Some(PoolEnd::Finished));
            if ready {
                let m = &mut self.members[i];
                let _span = span(&m.name);
                if !m.after.is_empty() {
                    tracing::info!("starting: every pool it waits for finished with 0");
                }
                let mut core = Supervisor::new(m.settings.clone(), now);
                core.set_oneshot(m.oneshot);
                m.core = Some(core);
            }
        }
    }

    /// One reaped exit, to the pool that knows the pid (an orphan: the first pool logs it).
    pub fn on_exit(&mut self, exit: Exit, now: Instant) {
        let owner = self
            .members
            .iter()
            .position(|m| m.core.as_ref().is_some_and(|c| c.role(exit.pid).is_some()))
            .or_else(|| self.members.iter().position(|m| m.core.is_some()));
        if let Some(i) = owner {
            let m = &mut self.members[i];
            let _span = span(&m.name);
            if let Some(core) = m.core.as_mut() {
                core.on_exit(exit, now, &mut m.os);
            }
        } else {
            tracing::debug!("reaped orphan pid {} ({})", exit.pid, exit.status);
        }
    }

    /// Readiness news, to the pool that knows the pid (else to the first pool, whose core
    /// ignores a pid it does not know, as a single pool always did).
    pub fn on_ready(&mut self, pid: Pid, now: Instant) {
        let owner = self
            .members
            .iter()
            .position(|m| m.core.as_ref().is_some_and(|c| c.role(pid).is_some()))
            .or_else(|| self.members.iter().position(|m| m.core.is_some()));
        if let Some(i) = owner {
            let m = &mut self.members[i];
            let _span = span(&m.name);
            if let Some(core) = m.core.as_mut() {
                core.on_ready(pid, now, &mut m.os);
            }
        }
    }

    /// A signal: every running pool hears it. A stop stops the container: pools still waiting
    /// to start never will.
    pub fn on_signal(&mut self, action: Action, now: Instant) {
        if matches!(action, Action::Stop(_)) {
            self.stopping = true;
        }
        for m in &mut self.members {
            if let Some(core) = m.core.as_mut()
                && m.end.is_none()
            {
                let _span = span(&m.name);
                core.on_signal(action, now, &mut m.os);
            }
        }
    }

    /// A reload (`corepool reload [POOL]`): of the pool named, or of every running pool.
    pub fn request_reload(&mut self, pool: Option<&str>) -> crate::control::ReloadAnswer {
        let mut answer = crate::control::ReloadAnswer::Stopping;
        for m in &mut self.members {
            if pool.is_some_and(|p| p != m.name) || m.end.is_some() {
                continue;
            }
            if let Some(core) = m.core.as_mut() {
                let _span = span(&m.name);
                answer = core.reload_answer();
                core.request_reload();
            }
        }
        answer
    }

    /// The pool a scale (`corepool scale [POOL] CHANGE`) is for: the one named, or without a
    /// name the only pool; with several a name is needed.
    pub fn scale_target(
        &self,
        pool: Option<&str>,
        change: crate::scale::Change,
    ) -> Result<usize, String> {
        match pool {
            Some(name) => self.index_of(name).ok_or_else(|| {
                let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
                format!("no pool '{name}' here (pools: {})", names.join(", "))
            }),
            None if self.members.len() == 1 => Ok(0),
            None => {
                let names: Vec<&str> = self.members.iter().map(|m| m.name.as_str()).collect();
                Err(format!(
                    "{} pools run here ({}): name one, e.g. corepool scale {} {change}",
                    names.len(),
                    names.join(", "),
                    names.first().copied().unwrap_or("POOL")
                ))
            }
        }
    }

    /// What is due: pools that may start, each pool's own step, and the endings.
    pub fn step(&mut self, now: Instant) {
        self.start_due(now);
        for m in &mut self.members {
            if let Some(core) = m.core.as_mut()
                && m.end.is_none()
            {
                let _span = span(&m.name);
                core.step(now, &mut m.os);
            }
        }
        self.settle(now);
    }

    /// Notes the pools that are over, and stops the container when one died.
    fn settle(&mut self, now: Instant) {
        loop {
            let mut changed = false;
            for i in 0..self.members.len() {
                let m = &mut self.members[i];
                let Some(core) = m.core.as_mut() else {
                    continue;
                };
                if m.end.is_some() {
                    continue;
                }
                let ending = core.ending();
                // A pool that died stops the others at once, not once its own drain is over.
                if let Some(Ending::PoolDied(code)) = ending
                    && !(m.oneshot && code == 0)
                    && self.first_death.is_none()
                {
                    self.first_death = Some((i, code));
                    self.stop_all(i, now);
                    changed = true;
                    continue;
                }
                let m = &mut self.members[i];
                let Some(core) = m.core.as_mut() else {
                    continue;
                };
                let _span = span(&m.name);
                if let (Some(ending), Some(code)) = (ending, core.outcome(now, &mut m.os)) {
                    let end = pool_end(m.oneshot, ending, code);
                    if end == PoolEnd::Finished {
                        tracing::info!("finished (oneshot): the pools waiting for it may start");
                    }
                    m.end = Some(end);
                    changed = true;
                }
            }
            if !changed {
                break;
            }
            // A oneshot pool that finished may let others start.
            self.start_due(now);
            for m in &mut self.members {
                if let Some(core) = m.core.as_mut()
                    && m.end.is_none()
                {
                    let _span = span(&m.name);
                    core.step(now, &mut m.os);
                }
            }
        }
    }

    /// Pool `dead` died: every other pool stops; those not started never will.
    fn stop_all(&mut self, dead: usize, now: Instant) {
        self.stopping = true;
        if self.members.len() == 1 {
            return;
        }
        let name = self.members[dead].name.clone();
        let code = self.first_death.map_or(0, |(_, c)| c);
        tracing::error!("pool {name} died (exit {code}): stopping the container");
        for (i, m) in self.members.iter_mut().enumerate() {
            if i == dead || m.end.is_some() {
                continue;
            }
            match m.core.as_mut() {
                Some(core) => {
                    let _span = span(&m.name);
                    core.stop_now(&format!("pool {name} died"), now, &mut m.os);
                }
                None => m.end = Some(PoolEnd::Stopped(0)),
            }
        }
    }

    /// The container's exit code, once every pool is over.
    pub fn outcome(&mut self) -> Option<i32> {
        if !self.stopping {
            // Every pool finished (all oneshot): nothing is left to run.
            if self.members.iter().all(|m| m.end.is_some()) {
                return Some(container_code(
                    None,
                    self.members.iter().filter_map(|m| m.end),
                ));
            }
            return None;
        }
        for m in &mut self.members {
            if m.core.is_none() && m.end.is_none() {
                m.end = Some(PoolEnd::Stopped(0));
            }
        }
        if self.members.iter().any(|m| m.end.is_none()) {
            return None;
        }
        Some(container_code(
            self.first_death.map(|(_, c)| c),
            self.members.iter().filter_map(|m| m.end),
        ))
    }

    /// The next time something is due in any pool.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.members
            .iter()
            .filter(|m| m.end.is_none())
            .filter_map(|m| m.core.as_ref()?.next_deadline(now))
            .min()
    }

    /// The member named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }
}

#[cfg(test)]
#[path = "fleet_tests.rs"]
mod tests;
