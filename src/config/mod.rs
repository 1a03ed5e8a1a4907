//! Configuration: one model, three sources.
//!
//! Every option is declared once, as a typed constant in `options` (listed in [`OPTIONS`]), and
//! read from a command-line flag, a `COREPOOL_*` environment variable or a key of a TOML file, in
//! that order of precedence, with a default last (`resolve`). Raw values from every source are
//! strings checked by the same parser (`values`), so a bad value gets the same one-line error
//! wherever it came from, naming that place: the flag, the variable, or `file:line: key`
//! (`file`). Checks across options come after resolution (`validate`). The resolved [`Config`]
//! remembers where each value came from, for `--print-config`. Every read of the process
//! environment happens here (`env`).

mod cli;
pub mod env;
mod file;
pub mod options;
mod pools;
mod resolve;
mod validate;
pub mod values;

pub use crate::worker::RestartPolicy;
pub use cli::{COMMAND as COMMAND_ARG, command};
pub use file::DEFAULT_FILE;
pub use options::{OPTIONS, Opt, OptSpec, Scope};
pub use pools::{PoolConfig, cpu_split};
pub use resolve::{from_file_text, load, resolve};
pub use values::*;

use crate::cgroup::CpuReport;
use crate::logs::LogFormat;
use crate::user::RunAs;
use nix::sys::signal::Signal;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tracing::level_filters::LevelFilter;

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
    pub fn culprit(&self, key: &str) -> String {
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
    /// `--sticky ip`: a client address reaches the same slot while that slot is ready.
    pub sticky: bool,
    /// `[pool.NAME]` tables (those `--only` selects), in the file's order; empty without tables,
    /// when this configuration is the single pool's.
    pub pools: Vec<PoolConfig>,
}

/// What `main` should do.
pub enum Invocation {
    Run(Config),
    PrintConfig(Config),
}

impl Config {
    /// The effective configuration as TOML, each value commented with its origin.
    pub fn to_toml(&self) -> String {
        let mut out = String::from("# corepool effective configuration\n");
        for (key, value, source) in &self.provenance {
            if key == cli::COMMAND && self.command.is_empty() {
                // `command = []` would not load back: say so in a comment instead.
                out.push_str(&format!("# command: {source}\n"));
                continue;
            }
            out.push_str(&format!("{key} = {value}  # {source}\n"));
        }
        for warning in &self.unknown_env {
            out.push_str(&format!("# warning: {warning}\n"));
        }
        for pool in &self.pools {
            out.push_str(&format!("\n[pool.{}]\n", pool.name));
            for (key, value, source) in &pool.config.provenance {
                out.push_str(&format!("{key} = {value}  # {source}\n"));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::env::unknown_variables;
    use super::file::ConfigFile;
    use super::*;
    use crate::fatal::Fatal;

    fn cpu(usable: usize) -> CpuReport {
        CpuReport {
            usable,
            online: 8,
            affinity: 8,
            quota: None,
        }
    }

    fn resolve_args(args: &[&str]) -> Result<Config, Fatal> {
        let argv = std::iter::once("corepool").chain(args.iter().copied());
        let matches = command().try_get_matches_from(argv).expect("clap accepts");
        resolve(&matches, cpu(4))
    }

    #[test]
    fn readme_documents_every_option() {
        let readme = include_str!("../../README.md");
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
        assert!(err.message.contains("--kill-timeout"), "{err}");
        assert!(!err.message.contains('\n'));
        let err = resolve_args(&["--stop-signal", "SIGNOPE", "x"]).unwrap_err();
        assert!(err.message.contains("--stop-signal"), "{err}");
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
        assert_eq!(err.message, "c.toml:1: unknown key 'a'");
        let err = ConfigFile::parse("c.toml", "instances = 2\nrestart = [\n")
            .err()
            .unwrap();
        assert!(err.message.starts_with("c.toml:"), "{err}");
        let file = ConfigFile::parse("c.toml", "\n\ninstances = [1]\n").unwrap();
        let err = file.scalar("instances").err().unwrap();
        assert_eq!(
            err.message,
            "c.toml:3: instances: expected a string or a number"
        );
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
            err.message.contains("--idle-timeout") && err.message.contains("proxy"),
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

    #[test]
    fn sticky() {
        assert!(!resolve_args(&["x"]).unwrap().sticky);
        assert!(resolve_args(&["--sticky", "ip", "x"]).unwrap().sticky);
        assert!(
            resolve_args(&["--balance", "proxy", "--sticky", "ip", "x"])
                .unwrap()
                .sticky
        );
        let err = resolve_args(&["--balance", "none", "--sticky", "ip", "x"]).unwrap_err();
        assert!(err.message.contains("--sticky"), "{err}");
        let err = resolve_args(&["--sticky", "cookie", "x"]).unwrap_err();
        assert!(err.message.contains("not off or ip"), "{err}");
    }
}
