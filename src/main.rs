//! corepool: runs N copies of a server as a container's PID 1.
//!
//! `main` runs a client subcommand (`status`, `reload`, `health`: each lives beside the server
//! side of its protocol), or reads the configuration and starts the pool: the start-up steps are
//! in order in [`serve`], ending in the supervisor loop on a single-threaded tokio runtime. Every
//! early failure is one [`Fatal`]: one line on stderr and its exit code (see `exit`).

use corepool::balance::{Balancer, Mode};
use corepool::config::{self, Invocation};
use corepool::fatal::Fatal;
use corepool::node::{self, NodeEnv, Preload};
use corepool::{
    cgroup, control, exit, launch, limits, logs, metrics, pool, proxy, reaper, signals,
};
use std::ffi::OsString;
use std::io::Write;

fn main() {
    std::process::exit(match run() {
        Ok(code) => code,
        Err(fatal) => fatal.report(),
    });
}

/// A client subcommand, or the pool: the exit code, or the one error that ends corepool.
fn run() -> Result<i32, Fatal> {
    // Bytes, not String: an argument that is not UTF-8 is the worker's business (std::env::args
    // would panic on it).
    let args = config::env::args();
    if let Some(answer) = subcommand(&args)? {
        let _ = std::io::stdout().write_all(answer.as_bytes());
        return Ok(0);
    }
    match config::load(args)? {
        Invocation::Run(config) => serve(config),
        Invocation::PrintConfig(config) => {
            let _ = std::io::stdout().write_all(print_config(&config).as_bytes());
            Ok(0)
        }
    }
}

/// `corepool status|reload|health ...`, each beside the server side of its protocol; None when
/// the first argument names no subcommand. Ok is what to print on stdout.
fn subcommand(args: &[OsString]) -> Result<Option<String>, Fatal> {
    let Some(name @ ("status" | "reload" | "health" | "scale")) =
        args.get(1).and_then(|a| a.to_str())
    else {
        return Ok(None);
    };
    let Some(rest) = args[2..]
        .iter()
        .map(|a| a.to_str().map(str::to_string))
        .collect::<Option<Vec<String>>>()
    else {
        return Err(Fatal::usage(format_args!(
            "{name}: an argument is not valid UTF-8"
        )));
    };
    match name {
        "status" => control::status_command(&rest),
        "reload" => control::reload_command(&rest),
        "scale" => control::scale_command(&rest),
        _ => metrics::health::command(&rest),
    }
    .map(Some)
}

/// `--print-config`: the effective configuration, and what heap_share comes to here, as the
/// pool would compute it at start (for each pool, when there are several).
fn print_config(config: &config::Config) -> String {
    let mut text = config.to_toml();
    let workers = total_workers(config);
    for (name, pool) in pools_of(config) {
        let of = if name.is_empty() {
            String::new()
        } else {
            format!(" of pool {name}")
        };
        text.push_str(&match heap_share(pool, workers) {
            Some((_, how)) => format!("# heap share{of}: {how}\n"),
            None if pool.heap_share => format!(
                "# heap share{of}: none (no cgroup memory limit, or NODE_OPTIONS sets \
                 --max-old-space-size)\n"
            ),
            None => format!("# heap share{of}: off\n"),
        });
    }
    text
}

/// The pool, start-up steps in order: descriptors, signals held, the program, the Node preload,
/// the runtime, the metrics listener; then, on the runtime, handlers, logs, the balancer, the
/// endpoints and the supervisor loop. Until logging runs a failure is a [`Fatal`]; after, it
/// is logged and ends with `exit::STARTUP`.
fn serve(config: config::Config) -> Result<i32, Fatal> {
    // Room for corepool's own descriptors (a proxied connection costs six); the workers get
    // the soft limit back before exec. Logged once logging runs.
    let nofile = limits::raise_nofile();

    // From here a SIGTERM waits, pending, for the handlers instead of being lost.
    signals::hold().map_err(|err| Fatal::startup(format_args!("cannot block signals: {err}")))?;
    let several = !config.pools.is_empty();
    // Each pool's program, and its Node preload: asked once, before any worker exists (and
    // before the reaper runs). Proxy mode too, for the preload's drain (see preload/drain.cjs);
    // there it is not needed to serve, so a preload that cannot be written (an old Node on a
    // read-only root) is only reported, once logging runs.
    let mut prepared = Vec::new();
    for (name, pool) in pools_of(&config) {
        let whose = if name.is_empty() {
            String::new()
        } else {
            format!("pool {name}: ")
        };
        let program = launch::resolve_program(&pool.command[0], pool.search_path.clone())
            .map_err(|err| Fatal::new(err.code, format_args!("{whose}{}", err.message)))?;
        let mut preload_warning = None;
        let prepare = || {
            Preload::prepare(
                || node::node_version(&program, pool.search_path.clone()),
                pool.runtime_dir.as_deref(),
            )
        };
        let preload = match pool.balance {
            Mode::Socket => {
                Some(prepare().map_err(|err| Fatal::startup(format_args!("{whose}{err}")))?)
            }
            Mode::Proxy => match prepare() {
                Ok(preload) => Some(preload),
                Err(err) => {
                    preload_warning = Some(format!(
                        "no Node preload in proxy mode, so no drain on the stop signal: {err}"
                    ));
                    None
                }
            },
            _ => None,
        };
        prepared.push((program, preload, preload_warning));
    }

    // Handlers first: a SIGTERM or SIGCHLD that arrives from here on is never lost.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| Fatal::startup(format_args!("cannot start the event loop: {err}")))?;
    // Bound before any worker starts, so that a wrong address fails at once.
    let metrics_listener = config
        .metrics
        .map(metrics::bind)
        .transpose()
        .map_err(|err| {
            let addr = config.metrics.map(|a| a.to_string()).unwrap_or_default();
            Fatal::startup(format_args!(
                "cannot serve metrics on {addr} (--metrics): {err}"
            ))
        })?;
    let workers = total_workers(&config);
    runtime.block_on(async move {
        let signals = signals::SignalStream::install()
            .map_err(|err| Fatal::startup(format_args!("cannot install signal handlers: {err}")))?;
        let output = logs::Output::start(config.log_format)
            .map_err(|err| Fatal::startup(format_args!("cannot start log writers: {err}")))?;
        output.install_tracing(config.log_level);
        for warning in &config.unknown_env {
            tracing::warn!("{warning}");
        }
        let relays = relay_budget(&config);
        match &nofile {
            Ok(n) if n.now > n.before => tracing::info!(
                "descriptor limit raised from {} to {} (the hard limit) for corepool; workers \
                 keep {}",
                n.before,
                n.now,
                n.before
            ),
            Ok(n) => tracing::debug!("descriptor limit {} (hard {})", n.now, n.hard),
            Err(err) => tracing::warn!("cannot raise the descriptor limit: {err}"),
        }
        let role = reaper::adopt_orphans();
        if several {
            let names: Vec<&str> = config.pools.iter().map(|p| p.name.as_str()).collect();
            tracing::info!(
                "corepool {} starting {} pools ({}; {workers} workers in all; {}); {role}",
                env!("CARGO_PKG_VERSION"),
                names.len(),
                names.join(", "),
                config.cpu
            );
        } else {
            tracing::info!(
                "corepool {} starting {} worker{} ({}); {role}",
                env!("CARGO_PKG_VERSION"),
                config.instances,
                if config.instances == 1 { "" } else { "s" },
                config.cpu
            );
        }
        let shared = if several {
            metrics::Shared::new("pools", 1)
        } else {
            metrics::Shared::new(config.balance.name(), config.min_ready)
        };
        let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let pools = pools_of(&config);
        let mut parts = Vec::new();
        for ((name, pool), (program, preload, preload_warning)) in pools.iter().zip(prepared) {
            let _span =
                (!name.is_empty()).then(|| tracing::info_span!("pool", pool = %name).entered());
            if let Some(warning) = grace_warning(pool) {
                tracing::warn!("{warning}");
            }
            if let Some(warning) = &preload_warning {
                tracing::warn!("{warning}");
            }
            if several {
                tracing::info!(
                    "{} worker{} of {}",
                    pool.instances,
                    if pool.instances == 1 { "" } else { "s" },
                    program.display()
                );
            }
            let heap_option = heap_share(pool, workers);
            let balancer = match setup_balancer(
                pool,
                preload,
                &program,
                heap_option,
                ready_tx.clone(),
                &shared,
                &relays,
            ) {
                Ok(balancer) => balancer,
                Err(err) => {
                    tracing::error!("{err}");
                    output.finish(std::time::Duration::from_secs(1));
                    return Ok(exit::STARTUP);
                }
            };
            let (oneshot, after, cpu_share) = match config.pools.iter().find(|p| p.name == *name) {
                Some(p) => (
                    p.oneshot,
                    p.after
                        .iter()
                        .filter_map(|a| pools.iter().position(|(n, _)| n == a))
                        .collect(),
                    p.cpu_share,
                ),
                None => (false, Vec::new(), 1),
            };
            parts.push(pool::Part {
                name: name.to_string(),
                oneshot,
                after,
                cpu_share,
                config: (*pool).clone(),
                launch: launch::LaunchSpec {
                    program,
                    argv: pool.command.clone(),
                    user: pool.user.clone(),
                },
                balancer,
            });
        }
        drop(ready_tx);
        if let Some(listener) = metrics_listener {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => {
                    tracing::info!(
                        "metrics on http://{}/metrics (/healthz, /readyz)",
                        config.metrics.map(|a| a.to_string()).unwrap_or_default()
                    );
                    tokio::spawn(metrics::serve(listener, shared.clone()));
                }
                Err(err) => tracing::error!("metrics endpoint unavailable: {err}"),
            }
        }
        let (command_tx, command_rx) = tokio::sync::mpsc::unbounded_channel();
        match control::bind() {
            Ok(listener) => {
                tokio::spawn(control::serve(listener, shared.clone(), command_tx));
            }
            Err(err) => tracing::warn!(
                "control socket @{} unavailable ({err}): corepool status/reload will not reach \
                 this pool (set COREPOOL_CONTROL to a unique name)",
                control::socket_name().to_string_lossy()
            ),
        }
        let code = pool::Pool::new(parts, ready_rx, output, shared, command_rx, relays)
            .run(signals)
            .await;
        Ok(code)
    })
}

/// The pools to run, each with its name: the `[pool.NAME]` tables `--only` selected, else
/// the single unnamed pool of the whole configuration.
fn pools_of(config: &config::Config) -> Vec<(&str, &config::Config)> {
    if config.pools.is_empty() {
        return vec![("", config)];
    }
    config
        .pools
        .iter()
        .map(|p| (p.name.as_str(), &p.config))
        .collect()
}

/// The descriptors left for relays, as `--max-connections auto` shares them among the proxy
/// pools (see `limits::RelayBudget`).
fn relay_budget(config: &config::Config) -> limits::RelayBudget {
    let nofile = match limits::nofile() {
        Ok(n) => n,
        Err(err) => {
            tracing::warn!("cannot read the descriptor limit: {err}; assuming 1024");
            1024
        }
    };
    let (mut fixed, mut auto_pools) = (0usize, 0usize);
    for (_, pool) in pools_of(config) {
        match (pool.balance, pool.max_connections) {
            (Mode::Proxy, Some(n)) => fixed = fixed.saturating_add(n),
            (Mode::Proxy, None) => auto_pools += 1,
            _ => {}
        }
    }
    limits::RelayBudget {
        nofile,
        fixed,
        auto_pools,
        workers: total_workers(config),
    }
}

/// Workers of every pool, for the heap share of the container's memory.
fn total_workers(config: &config::Config) -> usize {
    pools_of(config).iter().map(|(_, c)| c.instances).sum()
}

/// One pool's balancer: the public port bound (socket and proxy mode), its settings made, and
/// the start-up log lines that say how it balances.
fn setup_balancer(
    config: &config::Config,
    preload: Option<Preload>,
    program: &std::path::Path,
    heap_option: Option<(String, String)>,
    ready_tx: tokio::sync::mpsc::UnboundedSender<corepool::readiness::Ready>,
    shared: &std::sync::Arc<metrics::Shared>,
    relays: &limits::RelayBudget,
) -> Result<Balancer, String> {
    if let Some(user) = &config.user {
        tracing::info!(
            "workers run as {} (groups {:?}, HOME={})",
            user.describe(),
            user.groups,
            user.home
        );
    }
    let proxy_limits = proxy_limits(config, relays);
    match (&preload, config.balance) {
        (Some(p), Mode::Proxy) => tracing::info!(
            "balance proxy on {}:{}, workers on private loopback ports; {}; Node preload \
             via {}",
            config.host,
            config.port,
            proxy_limits.1,
            p.how
        ),
        (Some(p), _) => tracing::info!(
            "balance socket on {}:{}; Node preload via {}",
            config.host,
            config
                .ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
            p.how
        ),
        (None, Mode::Proxy) => tracing::info!(
            "balance proxy on {}:{}, workers on private loopback ports; {}",
            config.host,
            config.port,
            proxy_limits.1
        ),
        (None, mode) => tracing::info!("balance {}", mode.name()),
    }
    let mut balancer = Balancer::new(
        config.balance,
        config.host,
        config.port,
        config.instances,
        config.port_increment,
        NodeEnv::new(preload, config.node_options.clone()),
        ready_tx,
    )?;
    balancer.share_ports(config.ports.get(1..).unwrap_or_default())?;
    balancer.set_proxy_limits(proxy_limits.0);
    balancer.set_ready_on_message(config.ready_on == config::ReadyOn::Message);
    balancer.set_stop_signal(config.stop_signal);
    balancer.set_node_workers(
        program
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("node")),
    );
    if config.sticky {
        balancer.set_sticky(config.instances);
    }
    if !balancer.spread().is_empty() {
        tracing::info!("balance socket: {}", balancer.spread());
    }
    balancer.set_heap_option(heap_option.map(|(option, how)| {
        tracing::info!("{how}");
        option
    }));
    balancer.watch_port(shared.clone());
    Ok(balancer)
}

/// The proxy's bounds, and how they were chosen for the start-up log. `--max-connections
/// auto` is this pool's share of what the (raised) descriptor limit holds beside corepool's
/// reserve (`relays`); a number the limit cannot hold is kept, with a warning.
fn proxy_limits(config: &config::Config, relays: &limits::RelayBudget) -> (proxy::Limits, String) {
    let nofile = relays.nofile;
    let (max_connections, how) = match config.max_connections {
        None => {
            let n = relays.share();
            let mut split = String::new();
            if relays.fixed > 0 {
                split.push_str(&format!(
                    ", {} for the pools with a fixed --max-connections",
                    relays.fixed
                ));
            }
            if relays.auto_pools > 1 {
                split.push_str(&format!(
                    ", the rest split among {} proxy pools",
                    relays.auto_pools
                ));
            }
            (
                n,
                format!(
                    "at most {n} connections at once (--max-connections auto: {nofile} \
                     descriptors, {} kept for corepool and {} workers, 6 per connection{split}; \
                     worked out again when the worker count changes)",
                    limits::reserve(relays.workers),
                    relays.workers
                ),
            )
        }
        Some(n) => {
            let needed = limits::needed(n, relays.workers);
            if needed > nofile {
                tracing::warn!(
                    "--max-connections {n} needs about {needed} descriptors but the limit is \
                     {nofile}: past {} connections, accepts and worker starts may fail with \
                     'Too many open files'",
                    limits::auto_max_connections(nofile, relays.workers)
                );
            }
            (n, format!("at most {n} connections at once"))
        }
    };
    let idle = match config.idle_timeout {
        Some(d) => format!("idle ones closed after {}", config::format_duration(d)),
        None => "no idle timeout".to_string(),
    };
    (
        proxy::Limits {
            max_connections,
            idle_timeout: config.idle_timeout,
        },
        format!("{how}, {idle}"),
    )
}

/// The `--max-old-space-size` option for each Node worker, and a log line saying why
/// (`workers`: of every pool, which share the container's memory).
fn heap_share(config: &config::Config, workers: usize) -> Option<(String, String)> {
    if !config.heap_share {
        return None;
    }
    let limit = cgroup::memory_limit()?;
    let mib = node::heap_share_mib(limit.bytes, workers, &config.node_options)?;
    Some((
        format!("--max-old-space-size={mib}"),
        format!(
            "memory limit {} MiB ({}): each of {} Node workers gets --max-old-space-size={mib} \
             (70% of the limit shared; --heap-share off to disable)",
            limit.bytes >> 20,
            limit.dir.display(),
            workers
        ),
    ))
}

/// The longest stop corepool may take: the shutdown delay, then the kill timeout.
/// Kubernetes' default grace period (`terminationGracePeriodSeconds`) is 30 s; after it the
/// kubelet SIGKILLs the container, corepool's drain unfinished. corepool cannot read the pod's
/// setting, so past the default it says what to check.
fn grace_warning(config: &config::Config) -> Option<String> {
    const KUBERNETES_DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);
    let stop = config.shutdown_delay + config.kill_timeout;
    (stop >= KUBERNETES_DEFAULT_GRACE).then(|| {
        format!(
            "a stop may take {} (--shutdown-delay {} + --kill-timeout {}): the container's \
             grace period must be longer (Kubernetes terminationGracePeriodSeconds, default 30s; \
             docker stop -t, default 10s), or the runtime's SIGKILL ends the pool first",
            config::format_duration(stop),
            config::format_duration(config.shutdown_delay),
            config::format_duration(config.kill_timeout)
        )
    })
}
