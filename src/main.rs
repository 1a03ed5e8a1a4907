//! corepool: runs N copies of a server as a container's PID 1.
//!
//! `main` reads the configuration, checks the command, installs the signal handlers (before any
//! child exists), starts the log writers, and hands over to the pool's supervisor loop on a
//! single-threaded tokio runtime. Every early failure is one line on stderr and a distinct exit
//! code (see `exit`).

use corepool::balance::{Balancer, Mode};
use corepool::config::{self, ClapOrConfig, Invocation};
use corepool::node::{self, NodeEnv, Preload};
use corepool::{
    cgroup, control, exit, launch, limits, logs, metrics, pool, proxy, reaper, signals,
};
use std::ffi::OsString;
use std::io::Write;

fn main() {
    std::process::exit(run());
}

/// One line on stderr, prefixed so it is clear who speaks in a container's log.
fn fail(code: i32, message: impl std::fmt::Display) -> i32 {
    let _ = writeln!(std::io::stderr(), "corepool: {message}");
    code
}

fn run() -> i32 {
    // Bytes, not String: an argument that is not UTF-8 is the worker's business (std::env::args
    // would panic on it).
    let args: Vec<OsString> = std::env::args_os().collect();
    let subcommand = args.get(1).and_then(|a| a.to_str());
    if let Some(name @ ("status" | "reload" | "health" | "scale")) = subcommand {
        let Some(rest) = args[2..]
            .iter()
            .map(|a| a.to_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
        else {
            return fail(
                exit::USAGE,
                format_args!("{name}: an argument is not valid UTF-8"),
            );
        };
        return match name {
            "status" => client_status(&rest),
            "reload" => client_reload(&rest),
            "scale" => client_scale(&rest),
            _ => client_health(&rest),
        };
    }
    let config = match config::load(args) {
        Ok(Invocation::Run(config)) => config,
        Ok(Invocation::PrintConfig(config)) => {
            let mut text = config.to_toml();
            // What heap_share comes to here, as the pool would compute it at start.
            text.push_str(&match heap_share(&config) {
                Some((_, how)) => format!("# heap share: {how}\n"),
                None if config.heap_share => "# heap share: none (no cgroup memory limit, or \
                                              NODE_OPTIONS sets --max-old-space-size)\n"
                    .to_string(),
                None => "# heap share: off\n".to_string(),
            });
            let _ = std::io::stdout().write_all(text.as_bytes());
            return 0;
        }
        Err(ClapOrConfig::Clap(err)) => return clap_failure(err),
        Err(ClapOrConfig::Config(err)) => return fail(exit::USAGE, err),
    };

    // Room for corepool's own descriptors (a proxied connection costs six); the workers get
    // the soft limit back before exec. Logged once logging runs.
    let nofile = limits::raise_nofile();

    // From here a SIGTERM waits, pending, for the handlers instead of being lost.
    if let Err(err) = signals::hold() {
        return fail(exit::STARTUP, format_args!("cannot block signals: {err}"));
    }
    let program = match launch::resolve_program(&config.command[0], config.search_path.clone()) {
        Ok(program) => program,
        Err(err) => return fail(err.code, err.message),
    };

    // Asked once, before any worker exists (and before the reaper runs).
    // Proxy mode too, for the preload's drain (see preload.cjs); there it is not needed to
    // serve, so a preload that cannot be written (an old Node on a read-only root) is only
    // reported, once logging runs.
    let mut preload_warning = None;
    let prepare = || {
        Preload::prepare(
            node::node_version(&program, config.search_path.clone()),
            config.runtime_dir.as_deref(),
        )
    };
    let preload = match config.balance {
        Mode::Socket => match prepare() {
            Ok(preload) => Some(preload),
            Err(err) => return fail(exit::STARTUP, err),
        },
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

    // Handlers first: a SIGTERM or SIGCHLD that arrives from here on is never lost.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            return fail(
                exit::STARTUP,
                format_args!("cannot start the event loop: {err}"),
            );
        }
    };
    // Bound before any worker starts, so that a wrong address fails at once.
    let metrics_listener = match config.metrics.map(metrics::bind).transpose() {
        Ok(listener) => listener,
        Err(err) => {
            let addr = config.metrics.map(|a| a.to_string()).unwrap_or_default();
            return fail(
                exit::STARTUP,
                format_args!("cannot serve metrics on {addr} (--metrics): {err}"),
            );
        }
    };
    let heap_option = heap_share(&config);
    runtime.block_on(async move {
        let signals = match signals::SignalStream::install() {
            Ok(signals) => signals,
            Err(err) => {
                return fail(
                    exit::STARTUP,
                    format_args!("cannot install signal handlers: {err}"),
                );
            }
        };
        let output = match logs::Output::start(config.log_format) {
            Ok(output) => output,
            Err(err) => {
                return fail(
                    exit::STARTUP,
                    format_args!("cannot start log writers: {err}"),
                );
            }
        };
        output.install_tracing(config.log_level);
        for warning in &config.unknown_env {
            tracing::warn!("{warning}");
        }
        if let Some(warning) = grace_warning(&config) {
            tracing::warn!("{warning}");
        }
        if let Some(warning) = &preload_warning {
            tracing::warn!("{warning}");
        }
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
        tracing::info!(
            "corepool {} starting {} worker{} ({}); {role}",
            env!("CARGO_PKG_VERSION"),
            config.instances,
            if config.instances == 1 { "" } else { "s" },
            config.cpu
        );
        if let Some(user) = &config.user {
            tracing::info!(
                "workers run as {} (groups {:?}, HOME={})",
                user.describe(),
                user.groups,
                user.home
            );
        }
        let proxy_limits = proxy_limits(&config);
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
        let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut balancer = match Balancer::new(
            config.balance,
            config.host,
            config.port,
            config.instances,
            config.port_increment,
            NodeEnv::new(preload, config.node_options.clone()),
            ready_tx,
        ) {
            Ok(balancer) => balancer,
            Err(err) => {
                tracing::error!("{err}");
                output.finish(std::time::Duration::from_secs(1));
                return exit::STARTUP;
            }
        };
        if let Err(err) = balancer.share_ports(config.ports.get(1..).unwrap_or_default()) {
            tracing::error!("{err}");
            output.finish(std::time::Duration::from_secs(1));
            return exit::STARTUP;
        }
        balancer.set_proxy_limits(proxy_limits.0);
        balancer.set_ready_on_message(config.ready_on == config::ReadyOn::Message);
        balancer.set_stop_signal(config.stop_signal);
        balancer.set_node_workers(
            program
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("node")),
        );
        if !balancer.spread().is_empty() {
            tracing::info!("balance socket: {}", balancer.spread());
        }
        balancer.set_heap_option(heap_option.map(|(option, how)| {
            tracing::info!("{how}");
            option
        }));
        let shared = metrics::Shared::new(config.balance.name(), config.min_ready);
        balancer.watch_port(shared.clone());
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
        let launch = launch::LaunchSpec {
            program,
            argv: config.command.clone(),
            user: config.user.clone(),
        };
        pool::Pool::new(
            config, launch, balancer, ready_rx, output, shared, command_rx,
        )
        .run(signals)
        .await
    })
}

/// clap's verdict: help and version go to stdout with 0; a usage error is one line and 2.
fn clap_failure(err: clap::Error) -> i32 {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = err.print();
            0
        }
        _ => {
            let rendered = err.to_string();
            let first = rendered.lines().next().unwrap_or("invalid arguments");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            fail(exit::USAGE, format_args!("{first} (see corepool --help)"))
        }
    }
}

/// The proxy's bounds, and how they were chosen for the start-up log. `--max-connections
/// auto` is what the (raised) descriptor limit holds beside corepool's reserve; a number the
/// limit cannot hold is kept, with a warning.
fn proxy_limits(config: &config::Config) -> (proxy::Limits, String) {
    let nofile = match limits::nofile() {
        Ok(n) => n,
        Err(err) => {
            tracing::warn!("cannot read the descriptor limit: {err}; assuming 1024");
            1024
        }
    };
    let (max_connections, how) = match config.max_connections {
        None => {
            let n = limits::auto_max_connections(nofile, config.instances);
            (
                n,
                format!(
                    "at most {n} connections at once (--max-connections auto: {nofile} \
                     descriptors, {} kept for corepool, 6 per connection)",
                    limits::reserve(config.instances)
                ),
            )
        }
        Some(n) => {
            let needed = limits::needed(n, config.instances);
            if needed > nofile {
                tracing::warn!(
                    "--max-connections {n} needs about {needed} descriptors but the limit is \
                     {nofile}: past {} connections, accepts and worker starts may fail with \
                     'Too many open files'",
                    limits::auto_max_connections(nofile, config.instances)
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

/// The `--max-old-space-size` option for each Node worker, and a log line saying why.
fn heap_share(config: &config::Config) -> Option<(String, String)> {
    if !config.heap_share {
        return None;
    }
    let limit = cgroup::memory_limit()?;
    let mib = node::heap_share_mib(limit.bytes, config.instances, &config.node_options)?;
    Some((
        format!("--max-old-space-size={mib}"),
        format!(
            "memory limit {} MiB ({}): each of {} Node workers gets --max-old-space-size={mib} \
             (70% of the limit shared; --heap-share off to disable)",
            limit.bytes >> 20,
            limit.dir.display(),
            config.instances
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

/// `corepool SUBCOMMAND --help`: the usage line on stdout, exit 0.
fn usage(text: &str) -> i32 {
    let _ = writeln!(std::io::stdout(), "usage: {text}");
    0
}

fn wants_help(args: &[String]) -> bool {
    matches!(args, [flag] if flag == "--help" || flag == "-h")
}

/// `corepool status [--json]`.
fn client_status(args: &[String]) -> i32 {
    const USAGE: &str = "corepool status [--json]   (each worker of the pool running here)";
    if wants_help(args) {
        return usage(USAGE);
    }
    let json = match args {
        [] => false,
        [flag] if flag == "--json" => true,
        _ => return fail(exit::USAGE, format_args!("usage: {USAGE}")),
    };
    match control::request("status") {
        Ok(answer) => {
            let text = if json {
                answer
            } else {
                match serde_json::from_str::<control::Status>(&answer) {
                    Ok(status) => control::status_table(&status),
                    Err(_) => answer,
                }
            };
            let _ = std::io::stdout().write_all(text.as_bytes());
            0
        }
        Err(err) => fail(1, err),
    }
}

/// `corepool reload`.
fn client_reload(args: &[String]) -> i32 {
    const USAGE: &str = "corepool reload   (a rolling reload of the pool running here)";
    if wants_help(args) {
        return usage(USAGE);
    }
    if !args.is_empty() {
        return fail(exit::USAGE, format_args!("usage: {USAGE}"));
    }
    match control::request("reload") {
        Ok(answer) => {
            let _ = std::io::stdout().write_all(answer.as_bytes());
            0
        }
        Err(err) => fail(1, err),
    }
}

/// `corepool scale [POOL] N|+K|-K|auto`.
fn client_scale(args: &[String]) -> i32 {
    const USAGE: &str = "corepool scale [POOL] N|+K|-K|auto   (change the worker count of the pool \
                         running here; N, +K, -K pin it, auto follows --instances again)";
    if wants_help(args) {
        return usage(USAGE);
    }
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let request = match corepool::scale::Request::parse(&words) {
        Ok(request) => request,
        Err(err) => return fail(exit::USAGE, format_args!("scale: {err} (usage: {USAGE})")),
    };
    match control::request(&request.line()) {
        Ok(answer) => {
            let _ = std::io::stdout().write_all(answer.as_bytes());
            0
        }
        Err(err) => fail(1, format_args!("scale: {err}")),
    }
}

/// `corepool health [--live] [ADDR]`: exit 0 when /readyz (or, with `--live`, /healthz) answers
/// 200, else 1 (never 2, which Docker reserves).
fn client_health(args: &[String]) -> i32 {
    const USAGE: &str = "corepool health [--live] [ADDR | corepool's flags]   (exit 0 when the \
                         metrics address (ADDR, else --metrics / COREPOOL_METRICS / the config \
                         file's metrics, as corepool itself reads them) answers /readyz, or \
                         /healthz with --live; else 1)";
    if wants_help(args) {
        return usage(USAGE);
    }
    // Exit codes are 0 and 1 only, bad usage included: Docker reserves 2 for a HEALTHCHECK.
    const UNHEALTHY: i32 = 1;
    let live = args.iter().any(|a| a == "--live");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--live").collect();
    let addr = match rest[..] {
        [addr] if !addr.starts_with('-') => match config::parse_metrics_addr(addr) {
            Ok(Some(addr)) => addr,
            Ok(None) => return fail(UNHEALTHY, "health: ADDR: off is no address"),
            Err(why) => return fail(UNHEALTHY, format_args!("health: ADDR: {why}")),
        },
        // The address the pool itself was given: flags, COREPOOL_METRICS, the config file.
        _ => {
            // Flags only: a word that is not an option's value would be taken as a command.
            let words = config::command().try_get_matches_from(
                ["corepool"]
                    .into_iter()
                    .chain(rest.iter().map(|a| a.as_str())),
            );
            if let Ok(matches) = &words
                && matches.contains_id("command")
            {
                return fail(UNHEALTHY, format_args!("usage: {USAGE}"));
            }
            let flags = rest.iter().map(|a| OsString::from(a.as_str()));
            let args = ["corepool", "--print-config"]
                .into_iter()
                .map(OsString::from)
                .chain(flags);
            match config::load(args) {
                Ok(Invocation::PrintConfig(config) | Invocation::Run(config)) => {
                    match config.metrics {
                        Some(addr) => addr,
                        None => {
                            return fail(
                                UNHEALTHY,
                                "health: no metrics address: give one (corepool health :9100), \
                                 or set --metrics, COREPOOL_METRICS or metrics in the config file",
                            );
                        }
                    }
                }
                Err(ClapOrConfig::Clap(err)) => {
                    let text = err.to_string();
                    let first = text.lines().next().unwrap_or("invalid arguments");
                    let first = first.strip_prefix("error: ").unwrap_or(first);
                    return fail(UNHEALTHY, format_args!("health: {first} (usage: {USAGE})"));
                }
                Err(ClapOrConfig::Config(err)) => {
                    return fail(UNHEALTHY, format_args!("health: {err}"));
                }
            }
        }
    };
    // A wildcard listen address is reached on loopback.
    let target = if addr.ip().is_unspecified() {
        std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let path = if live { "/healthz" } else { "/readyz" };
    match metrics::probe(target, path, std::time::Duration::from_secs(3)) {
        Ok(()) => 0,
        Err(err) => fail(UNHEALTHY, format_args!("unhealthy: {err}")),
    }
}
