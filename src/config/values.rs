//! Option values: the types options resolve to, the parsers that read them from text (the same
//! for a flag, a variable and a file, so an error reads the same wherever it came from) and the
//! renderers that write them back as TOML for `--print-config`.

use crate::logs::LogFormat;
use crate::signals::parse_signal;
pub use crate::units::{format_duration, parse_duration, parse_size};
use crate::user::RunAs;
use crate::worker::RestartPolicy;
use nix::sys::signal::Signal;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tracing::level_filters::LevelFilter;

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

pub fn parse_auto_off(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "auto" | "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("'{other}' is not auto or off")),
    }
}

/// A duration that must not be zero.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        Duration::ZERO => Err(format!("'{}' must be longer than 0", text.trim())),
        d => Ok(d),
    }
}

/// A signal that can end a worker: not one that stops (suspends) a process or that a process
/// ignores unless it asks for it.
pub fn parse_stop_signal(text: &str) -> Result<Signal, String> {
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
pub fn parse_max_connections(text: &str) -> Result<Option<usize>, String> {
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
pub fn parse_idle_timeout(text: &str) -> Result<Option<Duration>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    match parse_duration(t)? {
        Duration::ZERO => Ok(None),
        d => Ok(Some(d)),
    }
}

pub fn parse_batch(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("'{}' is not a positive whole number", text.trim())),
    }
}

pub fn parse_count(text: &str) -> Result<u32, String> {
    text.trim()
        .parse()
        .map_err(|_| format!("'{}' is not a whole number", text.trim()))
}

/// A string as a TOML value (quoted and escaped).
pub fn quoted(text: &str) -> String {
    toml::Value::String(text.to_string()).to_string()
}

pub fn render_instances(instances: &Instances) -> String {
    match instances {
        Instances::Max => quoted("max"),
        Instances::Fixed(n) => n.to_string(),
        Instances::MinusK(k) => format!("-{k}"),
    }
}

pub fn render_duration(d: &Duration) -> String {
    quoted(&format_duration(*d))
}

pub fn render_signal(s: &Signal) -> String {
    quoted(s.as_str())
}

pub fn render_restart(p: &RestartPolicy) -> String {
    quoted(p.name())
}

pub fn render_u32(n: &u32) -> String {
    n.to_string()
}

pub fn render_usize(n: &usize) -> String {
    n.to_string()
}

pub fn render_bool(b: &bool) -> String {
    b.to_string()
}

pub fn render_log_format(f: &LogFormat) -> String {
    quoted(f.name())
}

pub fn render_log_level(l: &LevelFilter) -> String {
    quoted(&l.to_string().to_lowercase())
}

pub fn render_ports(ports: &Vec<u16>) -> String {
    match ports.as_slice() {
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn render_host(h: &IpAddr) -> String {
    quoted(&h.to_string())
}

pub fn render_mode(m: &Mode) -> String {
    quoted(m.name())
}

pub fn render_metrics(m: &Option<SocketAddr>) -> String {
    quoted(&m.map(|a| a.to_string()).unwrap_or_else(|| "off".into()))
}

pub fn render_auto_off(b: &bool) -> String {
    quoted(if *b { "auto" } else { "off" })
}

pub fn render_optional_size(m: &Option<u64>) -> String {
    m.map(|b| b.to_string()).unwrap_or_else(|| quoted("off"))
}

pub fn render_user(u: &Option<RunAs>) -> String {
    quoted(u.as_ref().map_or("off", |u| u.spec.as_str()))
}

pub fn render_max_connections(m: &Option<usize>) -> String {
    m.map(|n| n.to_string()).unwrap_or_else(|| quoted("auto"))
}

pub fn render_idle_timeout(d: &Option<Duration>) -> String {
    quoted(&d.map(format_duration).unwrap_or_else(|| "off".into()))
}

pub fn render_ready_on(m: &ReadyOn) -> String {
    quoted(m.name())
}

/// `off` or `ip` (`--sticky`): whether connections stick to a slot by client address.
pub fn parse_sticky(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "ip" => Ok(true),
        "off" | "none" => Ok(false),
        other => Err(format!("'{other}' is not off or ip")),
    }
}

pub fn render_sticky(on: &bool) -> String {
    quoted(if *on { "ip" } else { "off" })
}

/// How workers share the public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Socket,
    Proxy,
    None,
}

impl Mode {
    pub fn parse(text: &str) -> Result<Mode, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "socket" => Ok(Mode::Socket),
            "proxy" => Ok(Mode::Proxy),
            "none" => Ok(Mode::None),
            other => Err(format!(
                "'{other}' is not a balance mode (socket, proxy or none)"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Socket => "socket",
            Mode::Proxy => "proxy",
            Mode::None => "none",
        }
    }
}
