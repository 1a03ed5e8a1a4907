//! The pool: the supervisor loop that drives the supervision core.
//!
//! The loop is single-threaded and reads top to bottom: read the clock; apply what woke us (a
//! signal, readiness news, a reload or scale request, a deadline or the one-second safety
//! tick); when due, look at the CPUs and the memory limit again (the CPU follow, the heap
//! share: they read the cgroup, and hand the core a scale or the balancer a new share); reap
//! every exited child; let the core do what is due (start, escalate, replace); publish; exit
//! when the pool is finished. Because spawning and reaping happen on the same thread, no exit
//! status can be collected behind anyone's back.
//!
//! Every decision lives in `supervisor` (and the types it ties together: `reload`, `memory`,
//! `drain`, `ending`, `scale`); this module only owns the real world (`os::RealOs`: launcher, balancer,
//! output pumps), the channels and the reporters' view.

use crate::balance::Balancer;
use crate::cgroup;
use crate::config::{Config, Instances, ReadyOn};
use crate::control::{Command, ReloadAnswer};
use crate::launch::LaunchSpec;
use crate::logs::Output;
use crate::metrics::{Shared, Snapshot};
use crate::os::{Os, RealOs};
use crate::readiness::Ready;
use crate::reserve;
use crate::scale::{self, Origin};
use crate::signals::{Action, SignalStream};
use crate::supervisor::{Settings, Supervisor};
use crate::worker::RestartRules;
use nix::unistd::Pid;
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
    Reload(tokio::sync::oneshot::Sender<ReloadAnswer>),
    Scale(
        scale::Request,
        tokio::sync::oneshot::Sender<Result<String, String>>,
    ),
}

/// The CPU follow: with `instances = max` or `-K`, the derived count is worked out again from
/// the cgroup quota and the affinity every `every` (and on SIGHUP), and the pool scaled to it.
struct CpuFollow {
    spec: Instances,
    every: Option<Duration>,
    next: Option<Instant>,
    /// The derived count at the last look: the pool follows changes of it only (so a manual
    /// scale stays until the CPUs change, and the log says so once).
    last: usize,
}

/// `--heap-share`: each new Node worker's `--max-old-space-size` is 70% of the memory limit
/// over the worker count; worked out again when the count changes (a scale) or `memory.max`
/// does (re-read with the CPUs, and on SIGHUP).
struct HeapShare {
    node_options: String,
    limit: Option<u64>,
    workers: usize,
    /// The share new workers get now, in MiB.
    mib: Option<u64>,
}

impl HeapShare {
    /// Recomputes the share for new workers if the count or (with `reread`) the limit changed.
    fn refresh(&mut self, workers: usize, reread: bool, os: &mut RealOs) {
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
        os.balancer
            .set_heap_option(mib.map(|m| format!("--max-old-space-size={m}")));
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

impl CpuFollow {
    /// The count `instances` gives with the CPUs usable now, and the report that says why.
    fn derived(&self) -> (usize, cgroup::CpuReport) {
        let report = cgroup::cpu_report();
        (self.spec.resolve(report.usable), report)
    }
}

/// The loop's state: the core, the world it acts on, and the channels.
pub struct Pool {
    core: Supervisor,
    os: RealOs,
    ready_rx: mpsc::UnboundedReceiver<Ready>,
    /// What the reporters (metrics, status) see.
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    cpu: CpuFollow,
    /// None with `--heap-share off`.
    heap: Option<HeapShare>,
}

impl Pool {
    pub fn new(
        config: Config,
        launch: LaunchSpec,
        balancer: Balancer,
        ready_rx: mpsc::UnboundedReceiver<Ready>,
        output: Output,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
    ) -> Pool {
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
        let settings = Settings {
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
        };
        let now = Instant::now();
        let cpu = CpuFollow {
            spec: config.instances_spec,
            every: config.cpu_watch,
            next: config.cpu_watch.map(|every| now + every),
            last: config.instances,
        };
        Pool {
            core: Supervisor::new(settings, now),
            os: RealOs {
                launch,
                balancer,
                output,
                pumps: Vec::new(),
            },
            ready_rx,
            shared,
            commands,
            cpu,
            heap: config.heap_share.then(|| {
                let limit = cgroup::memory_limit().map(|m| m.bytes);
                HeapShare {
                    mib: limit.and_then(|l| {
                        crate::node::heap_share_mib(l, config.instances, &config.node_options)
                    }),
                    node_options: config.node_options.clone(),
                    limit,
                    workers: config.instances,
                }
            }),
        }
    }

    /// Runs the pool until it is finished; returns corepool's exit code.
    ///
    /// The clock is read once per turn, at the top; every step below is given that time.
    pub async fn run(mut self, mut signals: SignalStream) -> i32 {
        self.os.balancer.start();
        reserve::refill();
        let mut event = Event::Tick;
        loop {
            let now = Instant::now();
            let (core, os) = (&mut self.core, &mut self.os);
            match event {
                Event::Tick => {}
                Event::Signal(Action::Reload) => {
                    // SIGHUP looks at the CPUs and the memory limit first: the reload then
                    // covers the new count, with the new heap share.
                    if self.cpu.every.is_some() {
                        follow_cpu(&mut self.cpu, core, now, os);
                    }
                    if let Some(heap) = &mut self.heap {
                        heap.refresh(core.configured(), true, os);
                    }
                    core.on_signal(Action::Reload, now, os);
                }
                Event::Signal(action) => core.on_signal(action, now, os),
                Event::Ready(ready) => core.on_ready(Pid::from_raw(ready.pid), now, os),
                Event::Reload(reply) => {
                    let _ = reply.send(core.reload_answer());
                    core.request_reload();
                }
                Event::Scale(request, reply) => {
                    let answer = scale_request(&mut self.cpu, &request, core, now, os);
                    let _ = reply.send(answer);
                }
            }
            let mut reread = false;
            if self.cpu.next.is_some_and(|at| at <= now) {
                self.cpu.next = self.cpu.every.map(|every| now + every);
                follow_cpu(&mut self.cpu, core, now, os);
                reread = true;
            }
            // Before the step that starts new slots' workers.
            if let Some(heap) = &mut self.heap {
                heap.refresh(core.configured(), reread, os);
            }
            // A reap after every wake, whatever woke us.
            for exit in os.reap() {
                core.on_exit(exit, now, os);
            }
            core.step(now, os);
            self.publish(now);
            if let Some(code) = self.core.outcome(now, &mut self.os) {
                return self.finish(code).await;
            }
            let mut wake = now + SAFETY_TICK;
            if let Some(at) = self.core.next_deadline(now) {
                wake = wake.min(at);
            }
            if let Some(at) = self.cpu.next {
                wake = wake.min(at);
            }
            event = tokio::select! {
                action = signals.next() => Event::Signal(action),
                Some(ready) = self.ready_rx.recv() => Event::Ready(ready),
                Some(command) = self.commands.recv() => match command {
                    Command::Reload(reply) => Event::Reload(reply),
                    Command::Scale(request, reply) => Event::Scale(request, reply),
                },
                _ = tokio::time::sleep_until(wake.into()) => Event::Tick,
            };
        }
    }

    /// Hands the reporters a fresh view of the pool.
    fn publish(&self, now: Instant) {
        let (open, total) = self.os.balancer.connections();
        let (reloads, memory_restarts) = self.core.counters();
        self.shared.publish(Snapshot {
            heartbeat: now,
            slots: self.core.slots(now),
            stopping: self.core.stopping(),
            reloads,
            memory_restarts,
            open_connections: open,
            connections_total: total,
            connection_limit: self.os.balancer.connection_limit(),
            pinned: self.core.pinned(),
        });
    }

    /// Lets the workers' last output through, then closes the log writers.
    async fn finish(self, code: i32) -> i32 {
        let pumps = &self.os.pumps;
        let deadline = Instant::now() + PIPE_GRACE;
        while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for pump in pumps {
            pump.abort();
        }
        tracing::info!("exiting with code {code}");
        self.os.output.finish(PIPE_GRACE);
        code
    }
}

/// `corepool scale [POOL] N|+K|-K|auto`: what the pool made of it, for the client.
fn scale_request(
    cpu: &mut CpuFollow,
    request: &scale::Request,
    core: &mut Supervisor,
    now: Instant,
    os: &mut dyn Os,
) -> Result<String, String> {
    if let Some(pool) = &request.pool {
        return Err(format!(
            "no pool named '{pool}': this corepool runs one unnamed pool (corepool scale {})",
            request.change
        ));
    }
    let (target, origin) = match request.change.target(core.configured()) {
        Some(target) => (target?, Origin::Manual),
        None => {
            let (derived, _) = cpu.derived();
            cpu.last = derived;
            (derived, Origin::Unpin)
        }
    };
    core.scale(target, origin, now, os)
}

/// Looks at the CPUs again; when the derived count changed, scales the pool to it (unless a
/// manual scale pinned it: then says so, once per change).
fn follow_cpu(cpu: &mut CpuFollow, core: &mut Supervisor, now: Instant, os: &mut dyn Os) {
    let (derived, report) = cpu.derived();
    if derived == cpu.last {
        return;
    }
    let from = std::mem::replace(&mut cpu.last, derived);
    let why = format!(
        "usable CPUs changed: instances {} now comes to {derived}, was {from} ({report})",
        match cpu.spec {
            Instances::MinusK(k) => format!("-{k}"),
            _ => "max".to_string(),
        }
    );
    match core.scale(derived, Origin::Cpu(why.clone()), now, os) {
        Ok(_) if core.pinned() => tracing::info!(
            "{why}; the count stays at {} workers, pinned by corepool scale (corepool scale \
             auto follows the CPUs again)",
            core.configured()
        ),
        Ok(_) => {}
        Err(err) => tracing::warn!("{why}; not scaled: {err}"),
    }
}
