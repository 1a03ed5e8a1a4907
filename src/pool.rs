//! The pool: the supervisor loop that drives the supervision core.
//!
//! The loop is single-threaded and reads top to bottom: read the clock; apply what woke us (a
//! signal, readiness news, a reload request, a deadline or the one-second safety tick); reap
//! every exited child; let the core do what is due (start, escalate, replace); publish; exit
//! when the pool is finished. Because spawning and reaping happen on the same thread, no exit
//! status can be collected behind anyone's back.
//!
//! Every decision lives in `supervisor` (and the types it ties together: `reload`, `memory`,
//! `drain`, `ending`) and, with several named pools, in `fleet`, which routes each exit and
//! readiness report to its pool; this module only owns the real world (one `os::RealOs` per
//! pool: launcher, balancer, output pumps), the channels and the reporters' view.

use crate::balance::Balancer;
use crate::config::{Config, ReadyOn};
use crate::control::{Command, ReloadAnswer};
use crate::fleet::{Fleet, Member};
use crate::launch::LaunchSpec;
use crate::logs::Output;
use crate::metrics::{PoolView, Shared, Snapshot};
use crate::os::Owners;
use crate::os::{Os, RealOs};
use crate::readiness::Ready;
use crate::reserve;
use crate::signals::{Action, SignalStream};
use crate::supervisor::Settings;
use crate::worker::RestartRules;
use nix::unistd::Pid;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Proxy mode: time between routing away from a replaced worker and signalling it.
const PROXY_HANDOFF: Duration = Duration::from_millis(250);
/// The safety net: reap and re-check at least this often, whatever else happens.
const SAFETY_TICK: Duration = Duration::from_secs(1);
/// How long, after the last worker is gone, to wait for their output pipes to reach EOF.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// What woke the loop.
enum Event {
    /// A deadline, the safety tick, or the first turn.
    Tick,
    Signal(Action),
    Ready(Ready),
    Reload(Option<String>, tokio::sync::oneshot::Sender<ReloadAnswer>),
}

/// One pool as `main` prepared it: its configuration, launcher and balancer.
pub struct Part {
    /// `[pool.NAME]`; empty for the single pool of a configuration without tables.
    pub name: String,
    /// Finishing with 0 ends this pool alone (`oneshot = true`).
    pub oneshot: bool,
    /// Indices of the parts it waits for (`after`).
    pub after: Vec<usize>,
    pub config: Config,
    pub launch: LaunchSpec,
    pub balancer: Balancer,
}

/// The loop's state: the pools, the world they act on, and the channels.
pub struct Pool {
    fleet: Fleet<RealOs>,
    /// Each pool's `min_ready`, for the reporters.
    min_ready: Vec<usize>,
    output: Rc<Output>,
    ready_rx: mpsc::UnboundedReceiver<Ready>,
    /// What the reporters (metrics, status) see.
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
}

/// The core's settings for one pool.
fn settings(config: &Config, launch: &LaunchSpec, balancer: &Balancer) -> Settings {
    let proxy = balancer.mode() == crate::balance::Mode::Proxy;
    let not_ready_hint = if proxy {
        "its private port ($PORT on 127.0.0.1) never accepted a connection"
    } else if config.ready_on == ReadyOn::Message {
        "with --ready-on message a worker is ready once it calls process.send('ready'), \
         and it never did"
    } else {
        "a Node server reports itself through corepool's preload when it listens; another \
         program sends READY=1 to $NOTIFY_SOCKET, or use --balance proxy. A worker that \
         serves no port (a queue consumer) wants --balance none; one that listens on \
         another port wants --port"
    };
    Settings {
        rules: RestartRules {
            policy: config.restart,
            delay: config.restart_delay,
            max_delay: config.max_restart_delay,
            min_uptime: config.min_uptime,
            max_restarts: config.max_restarts,
            fail_fast: config.fail_fast,
        },
        instances: config.instances,
        ready_timeout: config.ready_timeout,
        reload_batch: config.reload_batch,
        stop_signal: config.stop_signal,
        kill_timeout: config.kill_timeout,
        shutdown_delay: config.shutdown_delay,
        max_memory: config.max_memory,
        needs_ready: balancer.needs_ready(),
        handoff: if proxy { PROXY_HANDOFF } else { Duration::ZERO },
        not_ready_hint,
        program: launch.program.display().to_string(),
        start_concurrency: config.start_concurrency,
    }
}

impl Pool {
    pub fn new(
        parts: Vec<Part>,
        ready_rx: mpsc::UnboundedReceiver<Ready>,
        output: Output,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Pool {
        let output = Rc::new(output);
        let owners = Owners::default();
        let min_ready = parts.iter().map(|p| p.config.min_ready).collect();
        let members = parts
            .into_iter()
            .enumerate()
            .map(|(i, part)| {
                let settings = settings(&part.config, &part.launch, &part.balancer);
                let os = RealOs {
                    launch: part.launch,
                    balancer: part.balancer,
                    output: output.clone(),
                    pumps: Vec::new(),
                    started: Default::default(),
                    owners: Owners::join(&owners, i),
                    pool: part.name.clone(),
                };
                let mut member = Member::new(part.name, settings, os);
                member.oneshot = part.oneshot;
                member.after = part.after;
                member
            })
            .collect();
        Pool {
            fleet: Fleet::new(members),
            min_ready,
            output,
            ready_rx,
            shared,
            commands,
        }
    }

    /// Runs the pools until they are finished; returns corepool's exit code.
    ///
    /// The clock is read once per turn, at the top; every step below is given that time.
    pub async fn run(mut self, mut signals: SignalStream) -> i32 {
        for m in &mut self.fleet.members {
            m.os.balancer.start();
        }
        reserve::refill();
        let mut event = Event::Tick;
        loop {
            let now = Instant::now();
            let fleet = &mut self.fleet;
            match event {
                Event::Tick => {}
                Event::Signal(action) => fleet.on_signal(action, now),
                Event::Ready(ready) => fleet.on_ready(Pid::from_raw(ready.pid), now),
                Event::Reload(pool, reply) => {
                    let _ = reply.send(fleet.request_reload(pool.as_deref()));
                }
            }
            // A reap after every wake, whatever woke us: one waiter for every pool.
            let exits = match fleet.members.first_mut() {
                Some(first) => first.os.reap(),
                None => Vec::new(),
            };
            for exit in exits {
                fleet.on_exit(exit, now);
            }
            fleet.step(now);
            self.publish(now);
            if let Some(code) = self.fleet.outcome() {
                return self.finish(code).await;
            }
            let mut wake = now + SAFETY_TICK;
            if let Some(at) = self.fleet.next_deadline(now) {
                wake = wake.min(at);
            }
            event = tokio::select! {
                action = signals.next() => Event::Signal(action),
                Some(ready) = self.ready_rx.recv() => Event::Ready(ready),
                Some(Command::Reload(pool, reply)) = self.commands.recv() => {
                    Event::Reload(pool, reply)
                }
                _ = tokio::time::sleep_until(wake.into()) => Event::Tick,
            };
        }
    }

    /// Hands the reporters a fresh view of the pools.
    fn publish(&self, now: Instant) {
        let mut snap = Snapshot {
            heartbeat: now,
            slots: Vec::new(),
            stopping: false,
            reloads: 0,
            memory_restarts: 0,
            open_connections: None,
            connections_total: None,
            connection_limit: None,
            pools: Vec::new(),
        };
        let several = self.fleet.members.iter().any(|m| !m.name.is_empty());
        for (m, &min_ready) in self.fleet.members.iter().zip(&self.min_ready) {
            let balancer = &m.os.balancer;
            let (open, total) = balancer.connections();
            let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
            };
            snap.open_connections = add(
                snap.open_connections.map(|n| n as u64),
                open.map(|n| n as u64),
            )
            .map(|n| n as usize);
            snap.connections_total = add(snap.connections_total, total);
            snap.connection_limit = snap.connection_limit.or(balancer.connection_limit());
            let slots = match &m.core {
                Some(core) => {
                    let (reloads, memory_restarts) = core.counters();
                    snap.reloads += reloads;
                    snap.memory_restarts += memory_restarts;
                    snap.stopping |= core.stopping();
                    core.slots(now)
                }
                None => Vec::new(),
            };
            if several {
                snap.pools.push(PoolView {
                    name: m.name.clone(),
                    balance: balancer.mode().name(),
                    state: m.state(),
                    slots: slots.len(),
                    min_ready,
                });
            }
            snap.slots.extend(slots);
        }
        self.shared.publish(snap);
    }

    /// Lets the workers' last output through, then closes the log writers.
    async fn finish(self, code: i32) -> i32 {
        let deadline = Instant::now() + PIPE_GRACE;
        let pumps = || self.fleet.members.iter().flat_map(|m| &m.os.pumps);
        while pumps().any(|p| !p.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for pump in pumps() {
            pump.abort();
        }
        tracing::info!("exiting with code {code}");
        let Pool { fleet, output, .. } = self;
        // The pools' launchers hold the other references to the output.
        drop(fleet);
        match Rc::try_unwrap(output) {
            Ok(output) => output.finish(PIPE_GRACE),
            Err(_) => tracing::error!("log writers still shared at exit: not flushed"),
        }
        code
    }
}
