//! The one declaration of every option: its key, flag, variable, default, scope, parser and
//! renderer, as a typed constant ([`Opt`]). The resolver reads an option through its constant
//! (`r.get(&KILL_TIMEOUT)`), so a misspelt option is a compile error; [`OPTIONS`] lists them all
//! for clap, the file's key check, the variable check and the README test.
//!
//! The declarations are grouped by scope: `pool` (per pool) and `global` (the container's);
//! this module holds the types and the one `options!` list.

mod global;
mod pool;

pub use global::*;
pub use pool::*;

/// Where an option may be set once pools (`[pool.NAME]` tables) exist: per pool, with the
/// top-level key as every pool's default, or only once for the whole container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// corepool's own behaviour (logs, metrics endpoint, stop): one value for the container.
    Global,
    /// How a pool's workers run: settable per pool.
    Pool,
}

/// One option: its key in the file, its flag and its variable, declared together.
#[derive(Debug)]
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
    pub scope: Scope,
}

/// An option and its typed value: how raw text becomes a `T`, and how a `T` is written back as
/// TOML for `--print-config`.
pub struct Opt<T: 'static> {
    pub spec: OptSpec,
    pub parse: fn(&str) -> Result<T, String>,
    pub render: fn(&T) -> String,
}

/// Lists the options once: [`OPTIONS`] for clap, the file and the README test, and a test hook
/// that checks every declaration with its own type.
macro_rules! options {
    ($($name:ident),* $(,)?) => {
        /// Every option corepool has, in the order `--help` and `--print-config` show them.
        pub const OPTIONS: &[&OptSpec] = &[$(&$name.spec),*];

        /// Runs `check_default` on every option (see the tests).
        #[cfg(test)]
        fn check_every_default() {
            $(tests::check_default(&$name);)*
        }
    };
}

options![
    INSTANCES,
    KILL_TIMEOUT,
    STOP_SIGNAL,
    RESTART,
    RESTART_DELAY,
    MAX_RESTART_DELAY,
    MIN_UPTIME,
    MAX_RESTARTS,
    FAIL_FAST,
    LOG_FORMAT,
    LOG_LEVEL,
    PORT,
    HOST,
    BALANCE,
    READY_TIMEOUT,
    RELOAD_BATCH,
    PORT_INCREMENT,
    METRICS,
    MIN_READY,
    SHUTDOWN_DELAY,
    HEAP_SHARE,
    MAX_MEMORY,
    USER,
    MAX_CONNECTIONS,
    IDLE_TIMEOUT,
    READY_ON,
    STICKY,
    ONLY,
    CPU_WATCH,
    START_CONCURRENCY,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_option_is_declared_once() {
        for (i, a) in OPTIONS.iter().enumerate() {
            for b in &OPTIONS[i + 1..] {
                assert_ne!(a.key, b.key);
                assert_ne!(a.long, b.long);
                assert_ne!(a.env, b.env);
                assert!(a.short.is_none() || a.short != b.short, "{}", a.key);
            }
            assert_eq!(
                a.long.replace('-', "_"),
                a.key,
                "--{} and {}",
                a.long,
                a.key
            );
            assert_eq!(a.env, format!("COREPOOL_{}", a.key.to_uppercase()));
        }
    }

    /// An option's default parses, renders, and reads back the same.
    pub(super) fn check_default<T>(opt: &Opt<T>) {
        let value = (opt.parse)(opt.spec.default)
            .unwrap_or_else(|why| panic!("default of {}: {why}", opt.spec.key));
        let rendered = (opt.render)(&value);
        let text: String = match rendered.parse::<toml::Value>() {
            Ok(toml::Value::String(s)) => s,
            _ => rendered.clone(),
        };
        let again = (opt.parse)(&text)
            .unwrap_or_else(|why| panic!("{} rendered as {rendered}: {why}", opt.spec.key));
        assert_eq!((opt.render)(&again), rendered, "{}", opt.spec.key);
    }

    #[test]
    fn every_default_parses_and_renders_back() {
        check_every_default();
    }
}
