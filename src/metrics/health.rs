//! `corepool health [--live] [ADDR]`: the client side of the metrics endpoint, for a
//! HEALTHCHECK in images without curl. It asks /readyz (or /healthz) and exits 0 on 200, else 1
//! (never 2, which Docker reserves), bad usage included.

use crate::config::{self, Invocation};
use crate::fatal::{Fatal, clap_line};
use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

/// The only failure code: Docker reserves 2 for a HEALTHCHECK.
const UNHEALTHY: i32 = 1;

const USAGE: &str = "corepool health [--live] [ADDR | corepool's flags]   (exit 0 when the \
                     metrics address (ADDR, else --metrics / COREPOOL_METRICS / the config \
                     file's metrics, as corepool itself reads them) answers /readyz, or \
                     /healthz with --live; else 1)";

/// Runs the subcommand; Ok is what to print on stdout (exit 0).
pub fn command(args: &[String]) -> Result<String, Fatal> {
    if matches!(args, [flag] if flag == "--help" || flag == "-h") {
        return Ok(format!("usage: {USAGE}\n"));
    }
    let unhealthy = |message: String| Fatal::new(UNHEALTHY, message);
    let live = args.iter().any(|a| a == "--live");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--live").collect();
    let addr = match rest[..] {
        [addr] if !addr.starts_with('-') => match config::parse_metrics_addr(addr) {
            Ok(Some(addr)) => addr,
            Ok(None) => return Err(unhealthy("health: ADDR: off is no address".into())),
            Err(why) => return Err(unhealthy(format!("health: ADDR: {why}"))),
        },
        // The address the pool itself was given: flags, COREPOOL_METRICS, the config file.
        _ => configured_address(&rest).map_err(unhealthy)?,
    };
    // A wildcard listen address is reached on loopback.
    let target = if addr.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], addr.port()))
    } else {
        addr
    };
    let path = if live { "/healthz" } else { "/readyz" };
    probe(target, path, Duration::from_secs(3))
        .map_err(|err| unhealthy(format!("unhealthy: {err}")))?;
    Ok(String::new())
}

/// The metrics address corepool's own flags, variables and file give.
fn configured_address(flags: &[&String]) -> Result<SocketAddr, String> {
    // Flags only: a word that is not an option's value would be taken as a command.
    let words = config::command().try_get_matches_from(
        ["corepool"]
            .into_iter()
            .chain(flags.iter().map(|a| a.as_str())),
    );
    match &words {
        Ok(matches) if matches.contains_id(config::COMMAND_ARG) => {
            return Err(format!("usage: {USAGE}"));
        }
        Ok(_) => {}
        Err(err) => return Err(format!("health: {} (usage: {USAGE})", clap_line(err))),
    }
    let args = ["corepool", "--print-config"]
        .into_iter()
        .map(OsString::from)
        .chain(flags.iter().map(|a| OsString::from(a.as_str())));
    match config::load(args) {
        Ok(Invocation::PrintConfig(config) | Invocation::Run(config)) => {
            config.metrics.ok_or_else(|| {
                "health: no metrics address: give one (corepool health :9100), or set \
                 --metrics, COREPOOL_METRICS or metrics in the config file"
                    .to_string()
            })
        }
        Err(err) => Err(format!("health: {err}")),
    }
}

/// `corepool health [--live] [ADDR]`: GET `path` (/readyz, or /healthz); Ok on 200. For a
/// HEALTHCHECK in images without curl.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: corepool\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or("").to_string();
    if status.starts_with("HTTP/1.1 200") {
        Ok(())
    } else if status.is_empty() {
        Err(format!("{addr}{path}: no answer"))
    } else {
        Err(format!("{addr}{path}: {status}"))
    }
}
