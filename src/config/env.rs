//! The process environment: every read of it in corepool happens here (balance.rs aside, which
//! moves its own), so that what corepool takes from its surroundings is listed in one place.
//! Options' own variables (`COREPOOL_KILL_TIMEOUT`...) are read by clap through the declaration;
//! this module has the rest.

use super::options::OPTIONS;
use std::ffi::OsString;

/// The command line, bytes as they are: an argument that is not UTF-8 is the worker's business.
pub fn args() -> Vec<OsString> {
    std::env::args_os().collect()
}

/// A variable's value, bytes as they are (UTF-8 or not); None when unset.
pub fn var(name: &str) -> Option<OsString> {
    std::env::var_os(name)
}

/// `PATH`, where the worker command is searched for.
pub fn path() -> Option<OsString> {
    var("PATH")
}

/// `NODE_OPTIONS` as the user set it (empty when unset or not UTF-8).
pub fn node_options() -> String {
    std::env::var("NODE_OPTIONS").unwrap_or_default()
}

/// `COREPOOL_CONTROL`: the control socket's name, when set and not empty.
pub fn control_socket() -> Option<OsString> {
    var("COREPOOL_CONTROL").filter(|n| !n.is_empty())
}

/// The whole environment, which the workers inherit (see `launch`).
pub fn inherited() -> std::env::VarsOs {
    std::env::vars_os()
}

/// The `COREPOOL_*` variables set here that corepool does not know, as warnings.
pub fn unknown_corepool_variables() -> Vec<String> {
    unknown_variables(inherited().map(|(name, _)| name))
}

/// Variables with the `COREPOOL_` prefix that are neither options nor the ones corepool reads
/// or sets for its workers, each described with the nearest known name.
pub fn unknown_variables(names: impl Iterator<Item = OsString>) -> Vec<String> {
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
