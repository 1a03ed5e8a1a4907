//! corepool: runs N copies of a server as a container's PID 1.
//!
//! `main` reads the configuration, checks the command, installs the signal handlers (before any
//! child exists), starts the log writers, and hands over to the pool's supervisor loop on a
//! single-threaded tokio runtime. Every early failure is one line on stderr and a distinct exit
//! code (see `exit`).

use corepool::balance::{self, Balancer, Mode, Preload};
use corepool::config::{self, ClapOrConfig, Invocation};
use corepool::{exit, launch, logs, pool, reaper, signals};
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
    let config = match config::load(std::env::args()) {
        Ok(Invocation::Run(config)) => config,
        Ok(Invocation::PrintConfig(config)) => {
            let _ = std::io::stdout().write_all(config.to_toml().as_bytes());
            return 0;
        }
        Err(ClapOrConfig::Clap(err)) => return clap_failure(err),
        Err(ClapOrConfig::Config(err)) => return fail(exit::USAGE, err),
    };

    let program = match launch::resolve_program(&config.command[0], std::env::var_os("PATH")) {
        Ok(program) => program,
        Err(err) => return fail(err.code, err.message),
    };

    // Asked once, before any worker exists (and before the reaper runs).
    let preload = match config.balance {
        Mode::Socket => match Preload::prepare(balance::node_version(&program)) {
            Ok(preload) => Some(preload),
            Err(err) => return fail(exit::STARTUP, err),
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
        let role = reaper::adopt_orphans();
        tracing::info!(
            "corepool {} starting {} workers ({}); {role}",
            env!("CARGO_PKG_VERSION"),
            config.instances,
            config.cpu
        );
        match (&preload, config.balance) {
            (Some(p), _) => tracing::info!(
                "balance socket on {}:{}; Node preload via {}",
                config.host,
                config.port,
                p.how
            ),
            (None, Mode::Proxy) => tracing::info!(
                "balance proxy on {}:{}, workers on private loopback ports",
                config.host,
                config.port
            ),
            (None, mode) => tracing::info!("balance {}", mode.name()),
        }
        let (ready_tx, ready_rx) = tokio::sync::mpsc::unbounded_channel();
        let balancer = match Balancer::new(
            config.balance,
            config.host,
            config.port,
            config.port_increment,
            preload,
            ready_tx,
        ) {
            Ok(balancer) => balancer,
            Err(err) => {
                let addr = std::net::SocketAddr::new(config.host, config.port);
                tracing::error!("cannot listen on {addr} (--host/--port): {err}");
                output.finish(std::time::Duration::from_secs(1));
                return exit::STARTUP;
            }
        };
        let launch = launch::LaunchSpec {
            program,
            argv: config.command.clone(),
        };
        pool::Pool::new(config, launch, balancer, ready_rx, output)
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
