//! The pool: the supervisor loop that drives the supervision core.
//!
//! The loop is single-threaded and reads top to bottom: read the clock; apply what woke us (a
//! signal, readiness news, a reload or scale request, a deadline or the one-second safety
//! tick); when due, look at the CPUs and the memory limit again (the CPU follow, the heap
//! share: they read the cgroup, and hand the cores a scale or the balancers a new share); reap
//! every exited child; let the cores do what is due (start, escalate, replace); publish; exit
//! when the pools are finished. Because spawning and reaping happen on the same thread, no exit
//! status can be collected behind anyone's back.
//!
//! Every decision lives in `supervisor` (and the types it ties together: `reload`, `memory`,
//! `drain`, `ending`, `scale`) and, with several named pools, in `fleet`, which routes each exit and
//! readiness report to its pool; this module only owns the real world (one `os::RealOs` per
//! pool: launcher, balancer, output pumps), the channels and the reporters' view.

use crate::balance::Balancer;
use crate::cgroup;
use crate::config::{Config, Instances, ReadyOn};
use crate::control::{Command, ReloadAnswer};
use crate::fleet::{Fleet, Member};
use crate::launch::LaunchSpec;
use crate::logs::Output;
use crate::metrics::{LeavingView, PoolView, Shared, Snapshot};
use crate::os::Owners;
use crate::os::{Os, RealOs};
use crate::readiness::Ready;
use crate::reserve;
use crate::scale::{self, Origin};
use crate::signals::{Action, SignalStream};
use crate::supervisor::{Settings, Supervisor};
use crate::worker::RestartRules;
use nix::unistd::Pid;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Proxy mode: time between routing away from a replaced worker and signalling it.
const PROXY_HANDOFF: Duration = Duration::from_millis(250);
/// Socket and proxy mode: time between routing away from a worker a scale removes and
/// signalling it. Measured with `corepool scale` under wrk (new connection per request, 32 at
/// once, net.ipv4.tcp_migrate_req off, eBPF steering): without it 54 connections queued on the
/// removed slots' sockets were reset; with it, none (see the README's Scaling).
const SCALE_HANDOFF: Duration = Duration::from_millis(250);
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
    Scale(
        scale::Request,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
}

/// The CPU follow: pools with `instances = max` or `-K` work their count out again from the
/// cgroup quota and the affinity (every `every`, the shortest `--cpu-watch` of the pools, and
/// on SIGHUP), the usable CPUs split among them by `cpu_share` as at start, and are scaled to
/// it.
struct CpuFollow {
    every: Option<Duration>,
    next: Option<Instant>,
    /// One per pool, in the fleet's order.
    pools: Vec<Follow>,
}

/// One pool's part in the CPU follow.
struct Follow {
    spec: Instances,
    /// Its weight in the split of the CPUs; 0: takes no part (a fixed count, a oneshot pool).
    share: u32,
    /// `--cpu-watch` is not off for it: it follows.
    follows: bool,
    /// The derived count at the last look: the pool follows changes of it only (so a manual
    /// scale stays until the CPUs change, and the log says so once).
    last: usize,
}

impl CpuFollow {
    /// Each pool's count with the CPUs usable now (None: fixed, it does not derive), and the
    /// report that says why.
    fn derived(&self) -> (Vec<Option<usize>>, cgroup::CpuReport) {
        let report = cgroup::cpu_report();
        let weights: Vec<u32> = self.pools.iter().map(|f| f.share).collect();
        let sharing = weights.iter().filter(|&&w| w > 0).count() > 1;
        let shares = crate::config::cpu_split(report.usable, &weights);
        let counts = self
            .pools
            .iter()
            .zip(shares)
            .map(|(f, share)| {
                (f.share > 0).then(|| f.spec.resolve(if sharing { share } else { report.usable }))
            })
            .collect();
        (counts, report)
    }
}

/// `--heap-share`: each new Node worker's `--max-old-space-size` is 70% of the memory limit
/// over the worker count of the whole container; worked out again when the count changes (a
/// scale) or `memory.max` does (re-read with the CPUs, and on SIGHUP).
struct HeapShare {
    node_options: String,
    limit: Option<u64>,
    workers: usize,
    /// The pools (indices) whose workers get it (`--heap-share` on).
    pools: Vec<usize>,
    /// The share new workers get now, in MiB.
    mib: Option<u64>,
}

impl HeapShare {
    /// Recomputes the share for new workers if the count or (with `reread`) the limit changed.
    fn refresh(&mut self, workers: usize, reread: bool, fleet: &mut Fleet<RealOs>) {
        let limit = if reread {
            cgroup::memory_limit().map(|m| m.bytes)
        } else {
            self.limit
        };
        if (workers, limit) == (self.workers, self.limit) {
            return;
        }
        let was = self.limit;
        (self.workers, self.limit) = (workers, limit);
        let mib = limit.and_then(|l| crate::node::heap_share_mib(l, workers, &self.node_options));
        if mib == self.mib {
            return;
        }
        self.mib = mib;
        for &i in &self.pools {
            if let Some(m) = fleet.members.get_mut(i) {
                m.os.balancer
                    .set_heap_option(mib.map(|m| format!("--max-old-space-size={m}")));
            }
        }
        let limit_text =
            |l: Option<u64>| l.map_or("none".to_string(), |l| format!("{} MiB", l >> 20));
        match mib {
            Some(mib) => tracing::info!(
                "heap share: new Node workers get --max-old-space-size={mib} (memory limit {}, \
                 was {}; {workers} workers)",
                limit_text(limit),
                limit_text(was)
            ),
            None => tracing::info!(
                "heap share: none for new workers (memory limit {}, was {}; NODE_OPTIONS may set \
                 --max-old-space-size)",
                limit_text(limit),
                limit_text(was)
            ),
        }
    }
}

/// One pool as `main` prepared it: its configuration, launcher and balancer.
pub struct Part {
    /// `[pool.NAME]`; empty for the single pool of a configuration without tables.
    pub name: String,
    /// Finishing with 0 ends this pool alone (`oneshot = true`).
    pub oneshot: bool,
    /// Indices of the parts it waits for (`after`).
    pub after: Vec<usize>,
    /// Its weight in the split of the CPUs among pools whose count derives from them.
    pub cpu_share: u32,
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
    cpu: CpuFollow,
    /// None when no pool has `--heap-share` on.
    heap: Option<HeapShare>,
    /// None when no proxy pool has `--max-connections auto`.
    relays: Option<RelayShare>,
}

/// `--max-connections auto` of the proxy pools (indices) that have it, following the worker
/// count of the whole container (see `limits::RelayBudget`).
struct RelayShare {
    budget: crate::limits::RelayBudget,
    pools: Vec<usize>,
}

impl RelayShare {
    /// Gives the pools their new limit if the worker count changed it.
    fn refresh(&mut self, workers: usize, fleet: &mut Fleet<RealOs>) {
        let Some(share) = self.budget.follow(workers) else {
            return;
        };
        for &i in &self.pools {
            if let Some(m) = fleet.members.get(i) {
                m.os.balancer.set_max_connections(share);
            }
        }
        tracing::info!(
            "proxy: at most {share} connections at once{} now (--max-connections auto: \
             {workers} workers, {} descriptors kept for corepool)",
            if self.pools.len() > 1 {
                " per pool"
            } else {
                ""
            },
            crate::limits::reserve(workers)
        );
    }
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
        min_ready: config.min_ready,
        scale_handoff: if balancer.mode() == crate::balance::Mode::None {
            Duration::ZERO
        } else {
            SCALE_HANDOFF
        },
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
        relays: crate::limits::RelayBudget,
    ) -> Pool {
        let output = Rc::new(output);
        let owners = Owners::default();
        let min_ready = parts.iter().map(|p| p.config.min_ready).collect();
        let now = Instant::now();
        let every = parts.iter().filter_map(|p| p.config.cpu_watch).min();
        let cpu = CpuFollow {
            every,
            next: every.map(|every| now + every),
            pools: parts
                .iter()
                .map(|p| {
                    let derived = !matches!(p.config.instances_spec, Instances::Fixed(_));
                    Follow {
                        spec: p.config.instances_spec,
                        share: if derived && !p.oneshot {
                            p.cpu_share
                        } else {
                            0
                        },
                        follows: derived && !p.oneshot && p.config.cpu_watch.is_some(),
                        last: p.config.instances,
                    }
                })
                .collect(),
        };
        let workers: usize = parts.iter().map(|p| p.config.instances).sum();
        let heap_pools: Vec<usize> = (0..parts.len())
            .filter(|&i| parts[i].config.heap_share)
            .collect();
        let heap = parts.iter().find(|p| p.config.heap_share).map(|first| {
            let limit = cgroup::memory_limit().map(|m| m.bytes);
            HeapShare {
                mib: limit.and_then(|l| {
                    crate::node::heap_share_mib(l, workers, &first.config.node_options)
                }),
                node_options: first.config.node_options.clone(),
                limit,
                workers,
                pools: heap_pools,
            }
        });
        let relay_pools: Vec<usize> = (0..parts.len())
            .filter(|&i| {
                parts[i].balancer.mode() == crate::balance::Mode::Proxy
                    && parts[i].config.max_connections.is_none()
            })
            .collect();
        let relays = (!relay_pools.is_empty()).then_some(RelayShare {
            budget: relays,
            pools: relay_pools,
        });
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
            cpu,
            heap,
            relays,
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
                Event::Signal(Action::Reload) => {
                    // SIGHUP looks at the CPUs and the memory limit first: the reload then
                    // covers the new counts, with the new heap share.
                    if self.cpu.every.is_some() {
                        follow_cpu(&mut self.cpu, fleet, now);
                    }
                    if let Some(heap) = &mut self.heap {
                        heap.refresh(configured(fleet), true, fleet);
                    }
                    fleet.on_signal(Action::Reload, now);
                }
                Event::Signal(action) => fleet.on_signal(action, now),
                Event::Ready(ready) => fleet.on_ready(Pid::from_raw(ready.pid), now),
                Event::Reload(pool, reply) => {
                    let _ = reply.send(fleet.request_reload(pool.as_deref()));
                }
                Event::Scale(request, reply) => {
                    let _ = reply.send(scale_request(&mut self.cpu, &request, fleet, now));
                }
            }
            let mut reread = false;
            if self.cpu.next.is_some_and(|at| at <= now) {
                self.cpu.next = self.cpu.every.map(|every| now + every);
                follow_cpu(&mut self.cpu, fleet, now);
                reread = true;
            }
            // Before the step that starts new slots' workers.
            let workers = configured(fleet);
            if let Some(heap) = &mut self.heap {
                heap.refresh(workers, reread, fleet);
            }
            if let Some(relays) = &mut self.relays {
                relays.refresh(workers, fleet);
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
            if let Some(at) = self.cpu.next {
                wake = wake.min(at);
            }
            event = tokio::select! {
                action = signals.next() => Event::Signal(action),
                Some(ready) = self.ready_rx.recv() => Event::Ready(ready),
                Some(command) = self.commands.recv() => match command {
                    Command::Reload(pool, reply) => Event::Reload(pool, reply),
                    Command::Scale(request, reply) => Event::Scale(request, reply),
                },
                _ = tokio::time::sleep_until(wake.into()) => Event::Tick,
            };
        }
    }

    /// Hands the reporters a fresh view of the pools.
    fn publish(&self, now: Instant) {
        let mut snap = Snapshot::empty(now);
        let several = self.fleet.members.iter().any(|m| !m.name.is_empty());
        for (m, &min_ready) in self.fleet.members.iter().zip(&self.min_ready) {
            let balancer = &m.os.balancer;
            let (open, total, resent) = balancer.connections();
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
            snap.connections_resent = add(snap.connections_resent, resent);
            // Each proxy pool has a limit of its own: the pools' limits and stops add up.
            snap.connection_limit = match (snap.connection_limit, balancer.connection_limit()) {
                (Some((max, reached)), Some((more, times))) => Some((max + more, reached + times)),
                (limit, other) => limit.or(other),
            };
            let slots =
                match &m.core {
                    Some(core) => {
                        let (reloads, memory_restarts) = core.counters();
                        snap.reloads += reloads;
                        snap.memory_restarts += memory_restarts;
                        snap.stopping |= core.stopping();
                        snap.pinned |= core.pinned();
                        snap.leaving.extend(core.leaving().into_iter().map(
                            |(slot, pid, state)| LeavingView {
                                pool: m.name.clone(),
                                slot,
                                pid,
                                state,
                            },
                        ));
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
                    pinned: m.core.as_ref().is_some_and(Supervisor::pinned),
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

/// The worker count of every pool together (a pool not started yet: its configured count).
fn configured(fleet: &Fleet<RealOs>) -> usize {
    fleet
        .members
        .iter()
        .filter(|m| m.end.is_none())
        .map(|m| {
            m.core
                .as_ref()
                .map_or(m.settings.instances, Supervisor::configured)
        })
        .sum()
}

/// `corepool scale [POOL] N|+K|-K|auto`: what the pool named (or the only one) made of it,
/// for the client.
fn scale_request(
    cpu: &mut CpuFollow,
    request: &scale::Request,
    fleet: &mut Fleet<RealOs>,
    now: Instant,
) -> Result<String, String> {
    let i = fleet.scale_target(request.pool.as_deref(), request.change)?;
    let change = request.change;
    let derived = (change == scale::Change::Auto).then(|| cpu.derived().0);
    let m = &mut fleet.members[i];
    let _span = crate::fleet::span(&m.name);
    let Some(core) = m.core.as_mut() else {
        return Err(format!(
            "pool {} is {}: nothing to scale yet",
            m.name,
            m.state()
        ));
    };
    if m.end.is_some() {
        return Err(format!("pool {} is {}", m.name, m.state()));
    }
    let (target, origin) = match change.target(core.configured()) {
        Some(target) => (target?, Origin::Manual),
        None => {
            let follow = &mut cpu.pools[i];
            let target = derived
                .and_then(|d| d.get(i).copied().flatten())
                .unwrap_or(m.settings.instances);
            if follow.share > 0 {
                follow.last = target;
            }
            (target, Origin::Unpin)
        }
    };
    core.scale(target, origin, now, &mut m.os)
}

/// Looks at the CPUs again; for each following pool whose derived count changed, scales it to
/// it (unless a manual scale pinned it: then says so, once per change). A pool not started
/// yet starts with the new count.
fn follow_cpu(cpu: &mut CpuFollow, fleet: &mut Fleet<RealOs>, now: Instant) {
    let (derived, report) = cpu.derived();
    let total: u32 = cpu.pools.iter().map(|f| f.share).sum();
    for ((follow, m), derived) in cpu.pools.iter_mut().zip(&mut fleet.members).zip(derived) {
        let Some(derived) = derived else {
            continue;
        };
        if !follow.follows || derived == follow.last || m.end.is_some() {
            continue;
        }
        let from = std::mem::replace(&mut follow.last, derived);
        let _span = crate::fleet::span(&m.name);
        let why = format!(
            "usable CPUs changed: instances {} now comes to {derived}, was {from} ({report}{})",
            match follow.spec {
                Instances::MinusK(k) => format!("-{k}"),
                _ => "max".to_string(),
            },
            if total > follow.share {
                format!("; cpu_share {} of {total}", follow.share)
            } else {
                String::new()
            }
        );
        let Some(core) = m.core.as_mut() else {
            m.settings.instances = derived;
            tracing::info!("{why}; the pool will start with {derived} workers");
            continue;
        };
        match core.scale(derived, Origin::Cpu(why.clone()), now, &mut m.os) {
            Ok(_) if core.pinned() => tracing::info!(
                "{why}; the count stays at {} workers, pinned by corepool scale (corepool scale \
                 auto follows the CPUs again)",
                core.configured()
            ),
            Ok(_) => {}
            Err(err) => tracing::warn!("{why}; not scaled: {err}"),
        }
    }
}
