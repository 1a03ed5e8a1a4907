//! Configuration: one model, three sources.
//!
//! Every option is declared once, in [`OPTIONS`], and read from a command-line flag, a
//! `COREPOOL_*` environment variable or a key of a TOML file, in that order of precedence, with
//! a default last. Raw values from every source are strings checked by the same parser, so a bad
//! value gets the same one-line error wherever it came from, naming that place: the flag, the
//! variable, or `file:line: key`. The resolved [`Config`] remembers where each value came from,
//! for `--print-config`.

use crate::balance::Mode;
use crate::cgroup::{self, CpuReport};
use crate::logs::LogFormat;
use crate::signals::parse_signal;
pub use crate::units::{format_duration, parse_duration, parse_size};
use crate::user::{RunAs, parse_user};
pub use crate::worker::RestartPolicy;
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command};
use nix::sys::signal::Signal;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::level_filters::LevelFilter;

/// One option: its key in the file, its flag and its variable, declared together.
pub struct OptSpec {
    /// Key in the TOML file and in `--print-config` (snake_case; kebab-case is accepted too).
    pub key: &'static str,
    pub long: &'static str,
    pub short: Option<char>,
    pub env: &'static str,
    /// A variable read when `env` is unset (`WEB_CONCURRENCY`, `PORT`).
    pub fallback_env: Option<&'static str>,
    /// A switch: `--flag` alone means true (`--flag=false` to say no).
    pub switch: bool,
    pub value_name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Every option corepool has.
pub const OPTIONS: &[OptSpec] = &[
    OptSpec {
        key: "instances",
        long: "instances",
        short: Some('i'),
        env: "COREPOOL_INSTANCES",
        fallback_env: Some("WEB_CONCURRENCY"),
        switch: false,
        value_name: "N|max|-K",
        default: "max",
        help: "Workers to run: a number, `max` (usable CPUs) or `-K` (usable CPUs minus K). \
               Falls back to WEB_CONCURRENCY",
    },
    OptSpec {
        key: "kill_timeout",
        long: "kill-timeout",
        short: None,
        env: "COREPOOL_KILL_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "10s",
        help: "How long a stopping worker's process group may take before SIGKILL",
    },
    OptSpec {
        key: "stop_signal",
        long: "stop-signal",
        short: None,
        env: "COREPOOL_STOP_SIGNAL",
        fallback_env: None,
        switch: false,
        value_name: "SIGNAL",
        default: "SIGTERM",
        help: "Signal sent to a worker's process group to stop it",
    },
    OptSpec {
        key: "restart",
        long: "restart",
        short: None,
        env: "COREPOOL_RESTART",
        fallback_env: None,
        switch: false,
        value_name: "always|on-failure|never",
        default: "always",
        help: "When an exited worker is started again",
    },
    OptSpec {
        key: "restart_delay",
        long: "restart-delay",
        short: None,
        env: "COREPOOL_RESTART_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "100ms",
        help: "First restart backoff; doubles with each consecutive short-lived exit",
    },
    OptSpec {
        key: "max_restart_delay",
        long: "max-restart-delay",
        short: None,
        env: "COREPOOL_MAX_RESTART_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "15s",
        help: "Longest restart backoff",
    },
    OptSpec {
        key: "min_uptime",
        long: "min-uptime",
        short: None,
        env: "COREPOOL_MIN_UPTIME",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "1s",
        help: "A worker that lived this long resets its backoff and failure count",
    },
    OptSpec {
        key: "max_restarts",
        long: "max-restarts",
        short: None,
        env: "COREPOOL_MAX_RESTARTS",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "16",
        help: "Consecutive short-lived exits after which a worker slot is given up (0: never)",
    },
    OptSpec {
        key: "fail_fast",
        long: "fail-fast",
        short: None,
        env: "COREPOOL_FAIL_FAST",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "10s",
        help: "While no worker has ever served, a failing slot is given up once this long has \
               passed since start, so an app that cannot start ends the pool fast (0: only \
               --max-restarts gives up)",
    },
    OptSpec {
        key: "log_format",
        long: "log-format",
        short: None,
        env: "COREPOOL_LOG_FORMAT",
        fallback_env: None,
        switch: false,
        value_name: "raw|prefix|json",
        default: "raw",
        help: "How worker lines and corepool's own messages are written",
    },
    OptSpec {
        key: "log_level",
        long: "log-level",
        short: None,
        env: "COREPOOL_LOG_LEVEL",
        fallback_env: None,
        switch: false,
        value_name: "LEVEL",
        default: "info",
        help: "corepool's own verbosity: error, warn, info, debug, trace or off",
    },
    OptSpec {
        key: "port",
        long: "port",
        short: Some('p'),
        env: "COREPOOL_PORT",
        fallback_env: Some("PORT"),
        switch: false,
        value_name: "PORT[,PORT...]",
        default: "3000",
        help: "The public port every worker serves, or a list (3000,4041): each port is shared \
               by all workers, the first is the one readiness waits for. Falls back to PORT",
    },
    OptSpec {
        key: "host",
        long: "host",
        short: None,
        env: "COREPOOL_HOST",
        fallback_env: None,
        switch: false,
        value_name: "ADDR",
        default: "0.0.0.0",
        help: "The public address to listen on (an IPv4 or IPv6 address)",
    },
    OptSpec {
        key: "balance",
        long: "balance",
        short: None,
        env: "COREPOOL_BALANCE",
        fallback_env: None,
        switch: false,
        value_name: "socket|proxy|none",
        default: "socket",
        help: "How workers share the port: one socket handed to all (socket), a relay to private \
               ports (proxy), or not at all (none)",
    },
    OptSpec {
        key: "ready_timeout",
        long: "ready-timeout",
        short: None,
        env: "COREPOOL_READY_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "30s",
        help: "A worker not ready (accepting connections) this long after its start is restarted",
    },
    OptSpec {
        key: "reload_batch",
        long: "reload-batch",
        short: None,
        env: "COREPOOL_RELOAD_BATCH",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "1",
        help: "Workers replaced at a time by a rolling reload (SIGHUP)",
    },
    OptSpec {
        key: "port_increment",
        long: "port-increment",
        short: None,
        env: "COREPOOL_PORT_INCREMENT",
        fallback_env: None,
        switch: true,
        value_name: "BOOL",
        default: "false",
        help: "With --balance none: give each worker PORT=port+slot",
    },
    OptSpec {
        key: "metrics",
        long: "metrics",
        short: None,
        env: "COREPOOL_METRICS",
        fallback_env: None,
        switch: false,
        value_name: "ADDR",
        default: "off",
        help: "Serve /metrics, /healthz and /readyz on this address (e.g. :9100, 127.0.0.1:9100)",
    },
    OptSpec {
        key: "min_ready",
        long: "min-ready",
        short: None,
        env: "COREPOOL_MIN_READY",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "1",
        help: "/readyz answers 200 only while at least this many workers are ready",
    },
    OptSpec {
        key: "shutdown_delay",
        long: "shutdown-delay",
        short: None,
        env: "COREPOOL_SHUTDOWN_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "0s",
        help: "On SIGTERM, fail /readyz at once but keep serving this long before stopping",
    },
    OptSpec {
        key: "heap_share",
        long: "heap-share",
        short: None,
        env: "COREPOOL_HEAP_SHARE",
        fallback_env: None,
        switch: false,
        value_name: "auto|off",
        default: "auto",
        help: "Under a cgroup memory limit, give each Node worker --max-old-space-size = \
               70% of the limit / workers (unless NODE_OPTIONS sets it)",
    },
    OptSpec {
        key: "max_memory",
        long: "max-memory",
        short: None,
        env: "COREPOOL_MAX_MEMORY",
        fallback_env: None,
        switch: false,
        value_name: "SIZE",
        default: "off",
        help: "Replace, gracefully and one at a time, a worker whose process group stays above \
               this RSS (e.g. 512MiB)",
    },
    OptSpec {
        key: "user",
        long: "user",
        short: None,
        env: "COREPOOL_USER",
        fallback_env: None,
        switch: false,
        value_name: "USER[:GROUP]",
        default: "off",
        help: "Run the workers as this user (and group): names from /etc/passwd and /etc/group, \
               or numbers. corepool itself stays root",
    },
    OptSpec {
        key: "max_connections",
        long: "max-connections",
        short: None,
        env: "COREPOOL_MAX_CONNECTIONS",
        fallback_env: None,
        switch: false,
        value_name: "N|auto",
        default: "auto",
        help: "With --balance proxy: connections relayed at once; more wait in the listen \
               backlog. auto: as many as the descriptor limit holds",
    },
    OptSpec {
        key: "idle_timeout",
        long: "idle-timeout",
        short: None,
        env: "COREPOOL_IDLE_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION|off",
        default: "60s",
        help: "With --balance proxy: close a connection on which no byte moved either way \
               this long",
    },
    OptSpec {
        key: "ready_on",
        long: "ready-on",
        short: None,
        env: "COREPOOL_READY_ON",
        fallback_env: None,
        switch: false,
        value_name: "listen|message",
        default: "listen",
        help: "When a worker is ready: once it listens, or (socket mode) once it calls \
               process.send('ready') (pm2's wait_ready)",
    },
    OptSpec {
        key: "cpu_watch",
        long: "cpu-watch",
        short: None,
        env: "COREPOOL_CPU_WATCH",
        fallback_env: None,
        switch: false,
        value_name: "DURATION|off",
        default: "5s",
        help: "With instances = max or -K: re-read the CPU quota and affinity this often (and \
               on SIGHUP) and scale the pool to match. A fixed count never follows",
    },
];

/// The config file given by flag or variable, else this one when present.
pub const DEFAULT_FILE: &str = "corepool.toml";

/// A configuration file larger than this is not one (a device or a log named by mistake).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// A configuration mistake: one line, naming where the bad value came from. Exit code 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag(String),
    Env(String),
    File { path: String, line: usize },
    Default,
}

impl Source {
    /// How an error names this place: `--kill-timeout`, `COREPOOL_KILL_TIMEOUT`, `f.toml:3: key`.
    fn culprit(&self, key: &str) -> String {
        match self {
            Source::Flag(flag) => flag.clone(),
            Source::Env(var) => var.clone(),
            Source::File { path, line } => format!("{path}:{line}: {key}"),
            Source::Default => format!("the default of {key}"),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag(flag) => write!(f, "flag {flag}"),
            Source::Env(var) => write!(f, "env {var}"),
            Source::File { path, line } => write!(f, "file {path}:{line}"),
            Source::Default => f.write_str("default"),
        }
    }
}

/// How many workers, as the user wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Instances {
    /// One per usable CPU (`max`, or `0` as pm2 has it).
    Max,
    /// Exactly this many.
    Fixed(usize),
    /// Usable CPUs minus this many, at least one.
    MinusK(usize),
}

impl Instances {
    pub fn parse(text: &str) -> Result<Instances, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("max") || t == "0" {
            return Ok(Instances::Max);
        }
        let bad = || format!("'{t}' is not an instance count (a number, max, or -K)");
        if let Some(k) = t.strip_prefix('-') {
            let k: usize = k.parse().map_err(|_| bad())?;
            return Ok(Instances::MinusK(k));
        }
        let n: usize = t.parse().map_err(|_| bad())?;
        if n > crate::scale::MAX_WORKERS {
            return Err(format!(
                "{n} workers is more than the limit of {}",
                crate::scale::MAX_WORKERS
            ));
        }
        Ok(Instances::Fixed(n))
    }

    /// The worker count for this many usable CPUs.
    pub fn resolve(self, usable: usize) -> usize {
        match self {
            Instances::Max => usable.max(1),
            Instances::Fixed(n) => n,
            Instances::MinusK(k) => usable.saturating_sub(k).max(1),
        }
    }
}

/// When a worker counts as ready (`--ready-on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyOn {
    /// Once its server listens on the public port (or, elsewhere, once its port answers).
    Listen,
    /// Once it calls `process.send('ready')`, as pm2's `wait_ready` has it.
    Message,
}

impl ReadyOn {
    pub fn parse(text: &str) -> Result<ReadyOn, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "listen" => Ok(ReadyOn::Listen),
            "message" => Ok(ReadyOn::Message),
            other => Err(format!("'{other}' is not listen or message")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ReadyOn::Listen => "listen",
            ReadyOn::Message => "message",
        }
    }
}

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The worker's argv, as bytes: passed to execve unchanged, UTF-8 or not.
    pub command: Vec<OsString>,
    pub instances: usize,
    pub kill_timeout: Duration,
    pub stop_signal: Signal,
    pub restart: RestartPolicy,
    pub restart_delay: Duration,
    pub max_restart_delay: Duration,
    pub min_uptime: Duration,
    pub max_restarts: u32,
    pub fail_fast: Duration,
    pub log_format: LogFormat,
    pub log_level: LevelFilter,
    /// The primary port (the first of `ports`).
    pub port: u16,
    pub host: IpAddr,
    pub balance: Mode,
    pub ready_timeout: Duration,
    pub reload_batch: usize,
    pub port_increment: bool,
    pub metrics: Option<SocketAddr>,
    pub min_ready: usize,
    pub shutdown_delay: Duration,
    pub heap_share: bool,
    pub max_memory: Option<u64>,
    /// `--user`: who the workers run as (None: corepool's own user).
    pub user: Option<RunAs>,
    /// Proxy mode: relays at once; None = auto (from the descriptor limit, see `limits`).
    pub max_connections: Option<usize>,
    /// Proxy mode: a relay idle this long is closed; None = never.
    pub idle_timeout: Option<Duration>,
    /// When a worker counts as ready: listening, or (socket mode) after process.send('ready').
    pub ready_on: ReadyOn,
    pub cpu: CpuReport,
    /// `instances` as written: `max` and `-K` follow the CPUs, a number does not.
    pub instances_spec: Instances,
    /// How often the CPU follow re-reads the quota and affinity; None: off (or a fixed count).
    pub cpu_watch: Option<Duration>,
    /// Every port the workers share (`--port 3000,4041`), the primary first.
    pub ports: Vec<u16>,
    /// For `--print-config`: each key, its value as TOML, and a comment on where it came from.
    pub provenance: Vec<(String, String, String)>,
    /// `COREPOOL_*` variables corepool does not know (a misspelling, most likely), each with
    /// the known name it resembles: logged as warnings once logging runs.
    pub unknown_env: Vec<String>,
    /// `$COREPOOL_RUNTIME_DIR`: where a Node without `--import` gets its preload file.
    pub runtime_dir: Option<std::path::PathBuf>,
    /// `$NODE_OPTIONS` as corepool found it: the words corepool adds are appended to it.
    pub node_options: String,
    /// `$PATH`: where the command and `node` are looked up.
    pub search_path: Option<OsString>,
}

/// What `main` should do.
pub enum Invocation {
    Run(Config),
    PrintConfig(Config),
}

/// Parses corepool's own log level.
pub fn parse_log_level(text: &str) -> Result<LevelFilter, String> {
    text.trim().to_ascii_lowercase().parse().map_err(|_| {
        format!(
            "'{}' is not a log level (error, warn, info, debug, trace, off)",
            text.trim()
        )
    })
}

/// `true`/`false` (also yes/no, on/off, 1/0).
pub fn parse_bool(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        other => Err(format!("'{other}' is not true or false")),
    }
}

/// The most ports one pool shares (each costs a socket per worker).
pub const MAX_PORTS: usize = 16;

/// A port or a comma-separated list of distinct ports (`3000,4041`), the first the primary.
pub fn parse_ports(text: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for item in text.split(',') {
        let port = parse_port(item)?;
        if ports.contains(&port) {
            return Err(format!("port {port} is listed twice"));
        }
        ports.push(port);
    }
    if ports.len() > MAX_PORTS {
        return Err(format!(
            "{} ports listed, at most {MAX_PORTS} can be shared",
            ports.len()
        ));
    }
    Ok(ports)
}

/// A TCP port, 1 to 65535.
pub fn parse_port(text: &str) -> Result<u16, String> {
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(format!("'{}' is not a port (1 to 65535)", text.trim())),
    }
}

/// An IP address to listen on; `localhost` means 127.0.0.1.
pub fn parse_host(text: &str) -> Result<IpAddr, String> {
    let t = text.trim().trim_start_matches('[').trim_end_matches(']');
    if t.eq_ignore_ascii_case("localhost") {
        return Ok(IpAddr::from([127, 0, 0, 1]));
    }
    t.parse()
        .map_err(|_| format!("'{t}' is not an IP address (e.g. 0.0.0.0, ::, 127.0.0.1)"))
}

/// `off`, or where to serve metrics: `:9100`, `9100`, `127.0.0.1:9100`, `[::]:9100`.
pub fn parse_metrics_addr(text: &str) -> Result<Option<SocketAddr>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let bad = || format!("'{t}' is not an address (write :9100, 127.0.0.1:9100 or off)");
    if let Some(port) = t.strip_prefix(':').or(t.parse::<u16>().ok().map(|_| t)) {
        let port = parse_port(port).map_err(|_| bad())?;
        return Ok(Some(SocketAddr::from(([0, 0, 0, 0], port))));
    }
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let host = parse_host(host).map_err(|_| bad())?;
    let port = parse_port(port).map_err(|_| bad())?;
    Ok(Some(SocketAddr::new(host, port)))
}

/// `off`, or a size.
pub fn parse_optional_size(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match parse_size(t)? {
        n if n < 1 << 20 => Err(format!(
            "'{t}' is {n} bytes, less than any worker needs (write e.g. 512MiB, or off)"
        )),
        n => Ok(Some(n)),
    }
}

fn parse_auto_off(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" | "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("'{other}' is not auto or off")),
    }
}

/// A duration that must not be zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("'{}' must be longer than 0", text.trim())),
        d => Ok(d),
    }
}

/// A signal that can end a worker: not one that stops (suspends) a process or that a process
/// ignores unless it asks for it.
fn parse_stop_signal(text: &str) -> Result<Signal, String> {
    let signal = parse_signal(text)?;
    match signal {
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU => Err(format!(
            "{} suspends a process instead of stopping it",
            signal.as_str()
        )),
        Signal::SIGCONT | Signal::SIGCHLD => {
            Err(format!("{} cannot stop a process", signal.as_str()))
        }
        _ => Ok(signal),
    }
}

/// `auto`, or a number of connections (1 to 10 million).
fn parse_max_connections(text: &str) -> Result<Option<usize>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    match t.parse::<usize>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(Some(n)),
        _ => Err(format!(
            "'{t}' is not a connection count (auto, or 1 to 10000000)"
        )),
    }
}

/// `off` or `0` (never), or a duration.
fn parse_idle_timeout(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match parse_duration(t)? {
        Duration::ZERO => Ok(None),
        d => Ok(Some(d)),
    }
}

fn parse_batch(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{}' is not a positive whole number", text.trim())),
    }
}

fn parse_count(text: &str) -> Result<u32, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{}' is not a whole number", text.trim()))
}

/// The clap command: every option of [`OPTIONS`] plus `--config`, `--print-config` and the
/// worker command.
pub fn command() -> Command {
    let mut cmd = Command::new("corepool")
        .version(env!("CARGO_PKG_VERSION"))
        .about("Runs N copies of a server as a container's PID 1, sharing one port")
        .override_usage("corepool [OPTIONS] [--] COMMAND [ARGS...]")
        .after_help(
            "Subcommands, to the pool running in this container:\n  \
             corepool status [--json]   each worker: pid, state, uptime, restarts, RSS, CPU%\n  \
             corepool reload            a rolling reload (as SIGHUP)\n  \
             corepool scale N|+K|-K|auto  change the worker count (auto: follow --instances)\n  \
             corepool health [--live] [ADDR]  exit 0 when the metrics endpoint answers /readyz \
             (/healthz with --live), else 1",
        )
        .arg(
            Arg::new("config")
                .long("config")
                .short('c')
                .env("COREPOOL_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(OsString))
                .help("TOML file with any of these options (default ./corepool.toml if present)"),
        )
        .arg(
            Arg::new("print_config")
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration as TOML, with where each value came from, and exit"),
        )
        .arg(
            Arg::new("command")
                .value_name("COMMAND")
                .num_args(1..)
                .trailing_var_arg(true)
                .value_parser(clap::value_parser!(OsString))
                .help("The worker command and its arguments"),
        );
    for spec in OPTIONS {
        let mut arg = Arg::new(spec.key)
            .long(spec.long)
            .env(spec.env)
            .value_name(spec.value_name)
            // Bytes: a value that is not UTF-8 gets our one-line error naming the flag or
            // variable (see `Resolver::raw`), not clap's anonymous one.
            .value_parser(clap::value_parser!(OsString))
            .help(format!("{} [default: {}]", spec.help, spec.default))
            // `--kill-timeout -1s` reaches our parser (which names the flag) instead of
            // clap's "unexpected argument '-1'".
            .allow_hyphen_values(!spec.switch);
        if let Some(short) = spec.short {
            arg = arg.short(short);
        }
        if spec.switch {
            arg = arg
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("true");
        }
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A TOML file read into raw values with their lines.
struct ConfigFile {
    path: String,
    values: BTreeMap<String, (toml::Value, usize)>,
}

impl ConfigFile {
    fn load(path: &Path, named_by: &str) -> Result<ConfigFile, ConfigError> {
        let shown = path.display().to_string();
        let cannot = |why: String| ConfigError(format!("{named_by}: cannot read {shown}: {why}"));
        let meta = std::fs::metadata(path).map_err(|err| cannot(err.to_string()))?;
        if !meta.is_file() {
            return Err(cannot("not a regular file".into()));
        }
        if meta.len() > MAX_FILE_BYTES {
            return Err(cannot(format!("larger than {} KiB", MAX_FILE_BYTES >> 10)));
        }
        let text = std::fs::read_to_string(path).map_err(|err| cannot(err.to_string()))?;
        ConfigFile::parse(&shown, &text)
    }

    fn parse(path: &str, text: &str) -> Result<ConfigFile, ConfigError> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let table: BTreeMap<String, toml::Spanned<toml::Value>> =
            toml::from_str(text).map_err(|err| {
                let line = err.span().map(|s| line_of(s.start)).unwrap_or(1);
                let message = err
                    .message()
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string();
                ConfigError(format!("{path}:{line}: invalid TOML: {message}"))
            })?;
        let mut values = BTreeMap::new();
        for (raw_key, spanned) in table {
            let line = line_of(spanned.span().start);
            let key = raw_key.replace('-', "_");
            let known = key == "command" || OPTIONS.iter().any(|o| o.key == key);
            if !known {
                return Err(ConfigError(format!(
                    "{path}:{line}: unknown key '{raw_key}'"
                )));
            }
            if let Some((_, first)) = values.get(&key) {
                return Err(ConfigError(format!(
                    "{path}:{line}: '{raw_key}' repeats the key of line {first} (- and _ are the same)"
                )));
            }
            values.insert(key, (spanned.into_inner(), line));
        }
        Ok(ConfigFile {
            path: path.to_string(),
            values,
        })
    }

    /// The raw string of a scalar key, with its source.
    fn scalar(&self, key: &str) -> Result<Option<(String, Source)>, ConfigError> {
        let Some((value, line)) = self.values.get(key) else {
            return Ok(None);
        };
        let source = Source::File {
            path: self.path.clone(),
            line: *line,
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            // `port = [3000, 4041]`: the same text as `--port 3000,4041`.
            toml::Value::Array(items) if key == "port" => items
                .iter()
                .map(|item| match item {
                    toml::Value::Integer(i) => Ok(i.to_string()),
                    toml::Value::String(s) => Ok(s.clone()),
                    _ => Err(ConfigError(format!(
                        "{}: expected port numbers, e.g. [3000, 4041]",
                        source.culprit(key)
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            _ => {
                return Err(ConfigError(format!(
                    "{}: expected a string or a number",
                    source.culprit(key)
                )));
            }
        };
        Ok(Some((text, source)))
    }

    /// `command = ["node", "server.js"]`. A single string is refused: splitting it would have to
    /// guess at the shell's quoting.
    fn command(&self) -> Result<Option<(Vec<String>, Source)>, ConfigError> {
        let Some((value, line)) = self.values.get("command") else {
            return Ok(None);
        };
        let source = Source::File {
            path: self.path.clone(),
            line: *line,
        };
        let bad = || {
            ConfigError(format!(
                "{}: expected a list of strings",
                source.culprit("command")
            ))
        };
        let argv: Vec<String> = match value {
            toml::Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
                .collect::<Result<_, _>>()?,
            toml::Value::String(s) => {
                let words: Vec<String> = s.split_whitespace().map(quoted).collect();
                return Err(ConfigError(format!(
                    "{}: expected a list of strings, e.g. command = [{}]",
                    source.culprit("command"),
                    words.join(", ")
                )));
            }
            _ => return Err(bad()),
        };
        if argv.first().is_none_or(|program| program.is_empty()) {
            return Err(ConfigError(format!(
                "{}: is empty",
                source.culprit("command")
            )));
        }
        Ok(Some((argv, source)))
    }
}

/// Resolves raw values to typed ones, recording where each came from.
struct Resolver<'a> {
    matches: &'a ArgMatches,
    file: Option<&'a ConfigFile>,
    provenance: Vec<(String, String, String)>,
}

impl Resolver<'_> {
    /// The raw text of an option and its source, by precedence.
    fn raw(&self, spec: &OptSpec) -> Result<(String, Source), ConfigError> {
        if let Some(value) = self.matches.get_one::<OsString>(spec.key) {
            let source = match self.matches.value_source(spec.key) {
                Some(ValueSource::EnvVariable) => Source::Env(spec.env.to_string()),
                _ => Source::Flag(format!("--{}", spec.long)),
            };
            return Ok((utf8(value, &source, spec.key)?, source));
        }
        if let Some(var) = spec.fallback_env
            && let Some(value) = std::env::var_os(var)
            && !value.is_empty()
        {
            let source = Source::Env(var.into());
            return Ok((utf8(&value, &source, spec.key)?, source));
        }
        if let Some(file) = self.file
            && let Some(found) = file.scalar(spec.key)?
        {
            return Ok(found);
        }
        Ok((spec.default.to_string(), Source::Default))
    }

    /// Reads one option through `parse`; `render` gives its TOML form for `--print-config`.
    fn get<T>(
        &mut self,
        key: &str,
        parse: impl Fn(&str) -> Result<T, String>,
        render: impl Fn(&T) -> String,
    ) -> Result<(T, Source), ConfigError> {
        let spec = OPTIONS
            .iter()
            .find(|o| o.key == key)
            .unwrap_or_else(|| unreachable!("option {key} is declared in OPTIONS"));
        let (text, source) = self.raw(spec)?;
        if text.trim().is_empty() {
            return Err(ConfigError(format!(
                "invalid value for {}: is empty",
                source.culprit(key)
            )));
        }
        let value = parse(&text).map_err(|why| {
            ConfigError(format!("invalid value for {}: {why}", source.culprit(key)))
        })?;
        self.provenance
            .push((key.to_string(), render(&value), source.to_string()));
        Ok((value, source))
    }
}

/// An option's raw value as text, or the one-line error naming where it came from.
fn utf8(value: &std::ffi::OsStr, source: &Source, key: &str) -> Result<String, ConfigError> {
    value.to_str().map(str::to_string).ok_or_else(|| {
        ConfigError(format!(
            "invalid value for {}: is not valid UTF-8",
            source.culprit(key)
        ))
    })
}

fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

/// Parses the command line (and the environment and file it points to).
pub fn load(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, ClapOrConfig> {
    let matches = command()
        .try_get_matches_from(args)
        .map_err(ClapOrConfig::Clap)?;
    let config = resolve(&matches, cgroup::cpu_report()).map_err(ClapOrConfig::Config)?;
    if matches.get_flag("print_config") {
        Ok(Invocation::PrintConfig(config))
    } else if config.command.is_empty() {
        Err(ClapOrConfig::Config(ConfigError(
            "no command to run: give one after -- (corepool -- node server.js) or set command in corepool.toml".into(),
        )))
    } else if config.command[0]
        .as_bytes()
        .iter()
        .all(u8::is_ascii_whitespace)
    {
        Err(ClapOrConfig::Config(ConfigError(
            "the command's program name is empty (corepool -- \"\" ...)".into(),
        )))
    } else {
        Ok(Invocation::Run(config))
    }
}

/// Either clap's own verdict (help, version, unknown flag) or ours.
pub enum ClapOrConfig {
    Clap(clap::Error),
    Config(ConfigError),
}

fn find_file(matches: &ArgMatches) -> Result<Option<ConfigFile>, ConfigError> {
    if let Some(path) = matches.get_one::<OsString>("config") {
        let named_by = match matches.value_source("config") {
            Some(ValueSource::EnvVariable) => "COREPOOL_CONFIG",
            _ => "--config",
        };
        return ConfigFile::load(Path::new(path), named_by).map(Some);
    }
    let default = PathBuf::from(DEFAULT_FILE);
    // A link to nowhere is a mistake to report, not a file to ignore.
    if default.symlink_metadata().is_ok() {
        return ConfigFile::load(&default, DEFAULT_FILE).map(Some);
    }
    Ok(None)
}

/// Builds the configuration from parsed arguments and the CPU report.
pub fn resolve(matches: &ArgMatches, cpu: CpuReport) -> Result<Config, ConfigError> {
    let file = find_file(matches)?;
    resolve_from(matches, file, cpu)
}

/// The configuration a file's text gives, defaults and environment aside from flags: the whole
/// path a configuration file takes, for tests and fuzzing.
pub fn from_file_text(path: &str, text: &str, cpu: CpuReport) -> Result<Config, ConfigError> {
    let file = ConfigFile::parse(path, text)?;
    let matches = command()
        .try_get_matches_from(["corepool"])
        .map_err(|e| ConfigError(e.to_string()))?;
    resolve_from(&matches, Some(file), cpu)
}

fn resolve_from(
    matches: &ArgMatches,
    file: Option<ConfigFile>,
    cpu: CpuReport,
) -> Result<Config, ConfigError> {
    let mut r = Resolver {
        matches,
        file: file.as_ref(),
        provenance: Vec::new(),
    };

    let (command, command_source): (Vec<OsString>, String) =
        match matches.get_many::<OsString>("command") {
            Some(args) => (args.cloned().collect(), "command line".to_string()),
            None => match file
                .as_ref()
                .map(ConfigFile::command)
                .transpose()?
                .flatten()
            {
                Some((argv, source)) => (
                    argv.into_iter().map(OsString::from).collect(),
                    source.to_string(),
                ),
                None => (Vec::new(), "none given".to_string()),
            },
        };
    // TOML has no bytes: an argument that is not UTF-8 is shown with U+FFFD here only.
    let rendered: Vec<String> = command
        .iter()
        .map(|a| quoted(&a.to_string_lossy()))
        .collect();
    r.provenance.push((
        "command".into(),
        format!("[{}]", rendered.join(", ")),
        command_source,
    ));

    let (spec, source) = r.get("instances", Instances::parse, |_| String::new())?;
    let instances = spec.resolve(cpu.usable);
    let usable_cpus = |n: usize| format!("{n} usable CPU{}", if n == 1 { "" } else { "s" });
    let how = match spec {
        Instances::Fixed(_) => String::new(),
        Instances::Max => format!(": max = {} ({cpu})", usable_cpus(cpu.usable)),
        Instances::MinusK(k) => format!(": {} minus {k} ({cpu})", usable_cpus(cpu.usable)),
    };
    if let Some(last) = r.provenance.last_mut() {
        *last = (
            "instances".into(),
            instances.to_string(),
            format!("{source}{how}"),
        );
    }

    let dur = |d: &Duration| quoted(&format_duration(*d));
    let (kill_timeout, _) = r.get("kill_timeout", parse_duration, dur)?;
    let (stop_signal, _) = r.get("stop_signal", parse_stop_signal, |s: &Signal| {
        quoted(s.as_str())
    })?;
    let (restart, _) = r.get("restart", RestartPolicy::parse, |p: &RestartPolicy| {
        quoted(p.name())
    })?;
    let (restart_delay, first_source) = r.get("restart_delay", parse_duration, dur)?;
    let (max_restart_delay, source) = r.get("max_restart_delay", parse_duration, dur)?;
    if max_restart_delay < restart_delay {
        let (first, max) = (
            format_duration(restart_delay),
            format_duration(max_restart_delay),
        );
        return Err(ConfigError(if source == Source::Default {
            format!(
                "invalid value for {}: {first} is longer than max_restart_delay ({max})",
                first_source.culprit("restart_delay")
            )
        } else {
            format!(
                "invalid value for {}: {max} is shorter than restart_delay ({first})",
                source.culprit("max_restart_delay")
            )
        }));
    }
    let (min_uptime, _) = r.get("min_uptime", parse_duration, dur)?;
    let (max_restarts, _) = r.get("max_restarts", parse_count, u32::to_string)?;
    let (fail_fast, _) = r.get("fail_fast", parse_duration, dur)?;
    let (log_format, _) = r.get("log_format", LogFormat::parse, |f: &LogFormat| {
        quoted(f.name())
    })?;
    let (log_level, _) = r.get("log_level", parse_log_level, |l: &LevelFilter| {
        quoted(&l.to_string().to_lowercase())
    })?;

    let (ports, port_source) = r.get("port", parse_ports, |p: &Vec<u16>| match p.as_slice() {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })?;
    let Some(&port) = ports.first() else {
        return Err(ConfigError(format!(
            "invalid value for {}: no port",
            port_source.culprit("port")
        )));
    };
    let (host, _) = r.get("host", parse_host, |h: &IpAddr| quoted(&h.to_string()))?;
    let (balance, _) = r.get("balance", Mode::parse, |m: &Mode| quoted(m.name()))?;
    let (ready_timeout, _) = r.get("ready_timeout", parse_positive_duration, dur)?;
    let (reload_batch, _) = r.get("reload_batch", parse_batch, usize::to_string)?;
    let (port_increment, source) = r.get("port_increment", parse_bool, bool::to_string)?;
    if port_increment && balance != Mode::None {
        return Err(ConfigError(format!(
            "invalid value for {}: port_increment needs --balance none (socket and proxy share one port)",
            source.culprit("port_increment")
        )));
    }
    if ports.len() > 1 && balance != Mode::Socket {
        return Err(ConfigError(format!(
            "invalid value for {}: a list of ports needs --balance socket ({} mode serves one \
             port)",
            port_source.culprit("port"),
            balance.name()
        )));
    }
    if port_increment && usize::from(port) + instances - 1 > usize::from(u16::MAX) {
        let culprit = match port_source {
            Source::Default => source.culprit("port_increment"),
            _ => port_source.culprit("port"),
        };
        return Err(ConfigError(format!(
            "invalid value for {culprit}: {instances} workers from port {port} would go past 65535"
        )));
    }

    let (metrics, source) = r.get("metrics", parse_metrics_addr, |m: &Option<SocketAddr>| {
        quoted(&m.map(|a| a.to_string()).unwrap_or_else(|| "off".into()))
    })?;
    if let Some(addr) = metrics
        && balance != Mode::None
        && ports.contains(&addr.port())
        && (addr.ip() == host || addr.ip().is_unspecified() || host.is_unspecified())
    {
        return Err(ConfigError(format!(
            "invalid value for {}: {addr} is the pool's own port ({host}:{})",
            addr.port(),
            source.culprit("metrics")
        )));
    }
    let (min_ready, source) = r.get("min_ready", parse_batch, usize::to_string)?;
    if min_ready > instances {
        return Err(ConfigError(format!(
            "invalid value for {}: {min_ready} ready workers asked for, but the pool has \
             {instances} (instances), so it could never be ready",
            source.culprit("min_ready")
        )));
    }
    let (shutdown_delay, _) = r.get("shutdown_delay", parse_duration, dur)?;
    let (heap_share, _) = r.get("heap_share", parse_auto_off, |b: &bool| {
        quoted(if *b { "auto" } else { "off" })
    })?;
    let (max_memory, _) = r.get("max_memory", parse_optional_size, |m: &Option<u64>| {
        m.map(|b| b.to_string()).unwrap_or_else(|| quoted("off"))
    })?;
    let (user, _) = r.get("user", parse_user, |u: &Option<RunAs>| {
        quoted(u.as_ref().map_or("off", |u| u.spec.as_str()))
    })?;
    let (max_connections, max_source) = r.get(
        "max_connections",
        parse_max_connections,
        |m: &Option<usize>| m.map(|n| n.to_string()).unwrap_or_else(|| quoted("auto")),
    )?;
    let (idle_timeout, idle_source) = r.get(
        "idle_timeout",
        parse_idle_timeout,
        |d: &Option<Duration>| quoted(&d.map(format_duration).unwrap_or_else(|| "off".into())),
    )?;
    // Outside proxy mode they mean nothing; a default value (as `--print-config` writes it back)
    // passes, another is a mistake to report.
    if balance != Mode::Proxy {
        let default_idle = Some(Duration::from_secs(60));
        for (set, source, key) in [
            (max_connections.is_some(), max_source, "max_connections"),
            (idle_timeout != default_idle, idle_source, "idle_timeout"),
        ] {
            if set {
                return Err(ConfigError(format!(
                    "invalid value for {}: {key} applies to --balance proxy only (corepool relays \
                     no connection in {} mode)",
                    source.culprit(key),
                    balance.name()
                )));
            }
        }
    }

    let (ready_on, source) = r.get("ready_on", ReadyOn::parse, |m: &ReadyOn| quoted(m.name()))?;
    if ready_on == ReadyOn::Message && balance != Mode::Socket {
        return Err(ConfigError(format!(
            "invalid value for {}: ready_on = message needs --balance socket (the Node preload \
             that hears process.send('ready') runs in socket mode only)",
            source.culprit("ready_on")
        )));
    }

    let (cpu_watch, _) = r.get("cpu_watch", parse_idle_timeout, |d: &Option<Duration>| {
        quoted(&d.map(format_duration).unwrap_or_else(|| "off".into()))
    })?;
    let cpu_watch = match spec {
        Instances::Fixed(_) => {
            if let Some(last) = r.provenance.last_mut() {
                last.2.push_str(
                    ": not used, instances is a fixed number (it never follows the CPUs)",
                );
            }
            None
        }
        _ => cpu_watch,
    };

    Ok(Config {
        command,
        instances,
        instances_spec: spec,
        cpu_watch,
        kill_timeout,
        stop_signal,
        restart,
        restart_delay,
        max_restart_delay,
        min_uptime,
        max_restarts,
        fail_fast,
        log_format,
        log_level,
        port,
        host,
        balance,
        ready_timeout,
        reload_batch,
        port_increment,
        metrics,
        min_ready,
        shutdown_delay,
        heap_share,
        max_memory,
        user,
        max_connections,
        idle_timeout,
        ready_on,
        cpu,
        ports,
        provenance: r.provenance,
        unknown_env: unknown_variables(std::env::vars_os().map(|(name, _)| name)),
        runtime_dir: std::env::var_os("COREPOOL_RUNTIME_DIR").map(Into::into),
        node_options: std::env::var("NODE_OPTIONS").unwrap_or_default(),
        search_path: std::env::var_os("PATH"),
    })
}

/// Variables with the `COREPOOL_` prefix that are neither options nor the ones corepool reads
/// or sets for its workers, each described with the nearest known name.
fn unknown_variables(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<String> {
    const OTHERS: &[&str] = &[
        "COREPOOL_CONFIG",
        "COREPOOL_CONTROL",
        "COREPOOL_RUNTIME_DIR",
        // Set by corepool for its workers (seen again by a corepool started inside one).
        "COREPOOL_WORKER",
        "COREPOOL_WORKERS",
        "COREPOOL_LISTEN_FD",
        "COREPOOL_PUBLIC_PORT",
        "COREPOOL_READY_FD",
        "COREPOOL_LISTEN_INODE",
        "COREPOOL_READY_INODE",
        "COREPOOL_EXTRA_PORTS",
    ];
    let known: Vec<&str> = OPTIONS
        .iter()
        .map(|o| o.env)
        .chain(OTHERS.iter().copied())
        .collect();
    names
        .filter_map(|name| name.into_string().ok())
        .filter(|name| name.starts_with("COREPOOL_") && !known.contains(&name.as_str()))
        .map(|name| {
            let nearest = known
                .iter()
                .map(|k| (strsim::levenshtein(&name, k), k))
                .min()
                .filter(|(d, _)| *d <= 3);
            match nearest {
                Some((_, k)) => {
                    format!("{name} is not a corepool variable (did you mean {k}?); ignored")
                }
                None => format!("{name} is not a corepool variable; ignored"),
            }
        })
        .collect()
}

impl Config {
    /// The effective configuration as TOML, each value commented with its origin.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# corepool effective configuration\n");
        for (key, value, source) in &self.provenance {
            if key == "command" && self.command.is_empty() {
                // `command = []` would not load back: say so in a comment instead.
                out.push_str(&format!("# command: {source}\n"));
                continue;
            }
            out.push_str(&format!("{key} = {value}  # {source}\n"));
        }
        for warning in &self.unknown_env {
            out.push_str(&format!("# warning: {warning}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(usable: usize) -> CpuReport {
        CpuReport {
            usable,
            online: 8,
            affinity: 8,
            quota: None,
        }
    }

    fn resolve_args(args: &[&str]) -> Result<Config, ConfigError> {
        let argv = std::iter::once("corepool").chain(args.iter().copied());
        let matches = command().try_get_matches_from(argv).expect("clap accepts");
        resolve(&matches, cpu(4))
    }

    #[test]
    fn readme_documents_every_option() {
        let readme = include_str!("../README.md");
        for spec in OPTIONS {
            let row = readme
                .lines()
                .find(|l| {
                    let first = l.split(" | ").next().unwrap_or("");
                    first.starts_with("| `") && first.contains(&format!("--{}", spec.long))
                })
                .unwrap_or_else(|| panic!("README has no row for --{}", spec.long));
            assert!(
                row.contains(spec.env),
                "README row of --{} lacks {}",
                spec.long,
                spec.env
            );
            assert!(
                row.contains(&format!("`{}`", spec.key)),
                "README row of --{} lacks key",
                spec.long
            );
            assert!(
                row.contains(&format!("`{}`", spec.default)),
                "README row of --{} lacks its default",
                spec.long
            );
        }
    }

    #[test]
    fn unknown_variables_are_named_with_the_nearest_known_one() {
        let names = [
            "COREPOOL_INSTANCE",
            "COREPOOL_PORT",
            "COREPOOL_WORKER",
            "COREPOOL_ZZZZZZZZ",
            "PATH",
        ];
        let found = unknown_variables(names.iter().map(std::ffi::OsString::from));
        assert_eq!(
            found,
            [
                "COREPOOL_INSTANCE is not a corepool variable (did you mean COREPOOL_INSTANCES?); ignored",
                "COREPOOL_ZZZZZZZZ is not a corepool variable; ignored",
            ]
        );
    }

    #[test]
    fn metrics_addresses() {
        assert_eq!(parse_metrics_addr("off"), Ok(None));
        assert_eq!(
            parse_metrics_addr(":9100"),
            Ok(Some("0.0.0.0:9100".parse().unwrap()))
        );
        assert_eq!(
            parse_metrics_addr("9100"),
            Ok(Some("0.0.0.0:9100".parse().unwrap()))
        );
        assert_eq!(
            parse_metrics_addr("127.0.0.1:9"),
            Ok(Some("127.0.0.1:9".parse().unwrap()))
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9"),
            Ok(Some("[::1]:9".parse().unwrap()))
        );
        for bad in ["x", ":0", ":99999", "host:9", "1.2.3.4"] {
            assert!(parse_metrics_addr(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_optional_size("off"), Ok(None));
        assert_eq!(parse_optional_size("1Gi"), Ok(Some(1 << 30)));
        assert!(parse_optional_size("0").is_err());
    }

    #[test]
    fn instances() {
        assert_eq!(Instances::parse("max"), Ok(Instances::Max));
        assert_eq!(Instances::parse("0"), Ok(Instances::Max));
        assert_eq!(Instances::parse("3"), Ok(Instances::Fixed(3)));
        assert_eq!(Instances::parse("-1"), Ok(Instances::MinusK(1)));
        assert!(Instances::parse("many").is_err());
        assert!(Instances::parse("1000000").is_err());
        assert_eq!(Instances::MinusK(1).resolve(4), 3);
        assert_eq!(Instances::MinusK(9).resolve(4), 1);
        assert_eq!(Instances::Max.resolve(0), 1);
    }

    #[test]
    fn defaults_and_flags() {
        let c = resolve_args(&["--", "node", "server.js"]).unwrap();
        assert_eq!(c.command, vec!["node", "server.js"]);
        assert_eq!(c.instances, 4);
        assert_eq!(c.kill_timeout, Duration::from_secs(10));
        assert_eq!(c.stop_signal, Signal::SIGTERM);
        assert_eq!(c.restart, RestartPolicy::Always);
        let c = resolve_args(&["-i", "-1", "--kill-timeout", "2s", "node"]).unwrap();
        assert_eq!(c.instances, 3);
        assert_eq!(c.kill_timeout, Duration::from_secs(2));
    }

    #[test]
    fn errors_name_the_flag() {
        let err = resolve_args(&["--kill-timeout", "soon", "x"]).unwrap_err();
        assert!(err.0.contains("--kill-timeout"), "{err}");
        assert!(!err.0.contains('\n'));
        let err = resolve_args(&["--stop-signal", "SIGNOPE", "x"]).unwrap_err();
        assert!(err.0.contains("--stop-signal"), "{err}");
    }

    #[test]
    fn file_values_and_lines() {
        let text =
            "# comment\ninstances = 2\nkill-timeout = \"3s\"\ncommand = [\"node\", \"s.js\"]\n";
        let file = ConfigFile::parse("c.toml", text).unwrap();
        assert_eq!(
            file.scalar("instances").unwrap().unwrap().1,
            Source::File {
                path: "c.toml".into(),
                line: 2
            }
        );
        assert_eq!(file.command().unwrap().unwrap().0, vec!["node", "s.js"]);
        let err = ConfigFile::parse("c.toml", "a = 1\n\nbogus = 2\n")
            .err()
            .unwrap();
        assert_eq!(err.0, "c.toml:1: unknown key 'a'");
        let err = ConfigFile::parse("c.toml", "instances = 2\nrestart = [\n")
            .err()
            .unwrap();
        assert!(err.0.starts_with("c.toml:"), "{err}");
        let file = ConfigFile::parse("c.toml", "\n\ninstances = [1]\n").unwrap();
        let err = file.scalar("instances").err().unwrap();
        assert_eq!(err.0, "c.toml:3: instances: expected a string or a number");
    }

    #[test]
    fn proxy_limits() {
        assert_eq!(parse_max_connections("auto"), Ok(None));
        assert_eq!(parse_max_connections("500"), Ok(Some(500)));
        for bad in ["0", "-1", "many", "10000001"] {
            assert!(parse_max_connections(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_idle_timeout("off"), Ok(None));
        assert_eq!(parse_idle_timeout("0"), Ok(None));
        assert_eq!(parse_idle_timeout("90s"), Ok(Some(Duration::from_secs(90))));
        assert!(parse_idle_timeout("soon").is_err());
        let c = resolve_args(&["--balance", "proxy", "x"]).unwrap();
        assert_eq!(c.max_connections, None);
        assert_eq!(c.idle_timeout, Some(Duration::from_secs(60)));
        let c = resolve_args(&["--balance", "proxy", "--max-connections", "9", "x"]).unwrap();
        assert_eq!(c.max_connections, Some(9));
        let err = resolve_args(&["--balance", "socket", "--idle-timeout", "5s", "x"]).unwrap_err();
        assert!(
            err.0.contains("--idle-timeout") && err.0.contains("proxy"),
            "{err}"
        );
        // The defaults, written back by --print-config, pass in any mode.
        assert!(resolve_args(&["--max-connections", "auto", "--idle-timeout", "1m", "x"]).is_ok());
    }

    #[test]
    fn port_lists() {
        assert_eq!(parse_ports("3000"), Ok(vec![3000]));
        assert_eq!(parse_ports(" 3000 , 4041"), Ok(vec![3000, 4041]));
        assert!(
            parse_ports("3000,3000")
                .unwrap_err()
                .contains("listed twice")
        );
        assert!(parse_ports("3000,0").is_err());
        assert!(parse_ports("3000,").is_err());
        assert!(parse_ports("a").is_err());
        let many: Vec<String> = (1..=17).map(|p| p.to_string()).collect();
        assert!(
            parse_ports(&many.join(","))
                .unwrap_err()
                .contains("at most 16")
        );
    }
}
