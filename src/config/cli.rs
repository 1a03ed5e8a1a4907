//! The clap command: every option of [`OPTIONS`] as a flag with its variable, plus `--config`,
//! `--print-config` and the worker command. Values stay bytes here; the resolver parses them.

use super::options::OPTIONS;
use clap::{Arg, ArgAction, Command};
use std::ffi::OsString;

/// The id of `--config FILE` (also `COREPOOL_CONFIG`).
pub const CONFIG: &str = "config";
/// The id of `--print-config`.
pub const PRINT_CONFIG: &str = "print_config";
/// The id of the worker command; also its key in the file.
pub const COMMAND: &str = "command";

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
             corepool reload [POOL]     a rolling reload (as SIGHUP), of one pool if named\n  \
             corepool scale [POOL] N|+K|-K|auto  change a pool's worker count (POOL: needed \
             with several pools; auto: follow instances again)\n  \
             corepool health [--live] [ADDR]  exit 0 when the metrics endpoint answers /readyz \
             (/healthz with --live), else 1",
        )
        .arg(
            Arg::new(CONFIG)
                .long("config")
                .short('c')
                .env("COREPOOL_CONFIG")
                .value_name("FILE")
                .value_parser(clap::value_parser!(OsString))
                .help("TOML file with any of these options (default ./corepool.toml if present)"),
        )
        .arg(
            Arg::new(PRINT_CONFIG)
                .long("print-config")
                .action(ArgAction::SetTrue)
                .help("Print the effective configuration as TOML, with where each value came from, and exit"),
        )
        .arg(
            Arg::new(COMMAND)
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
