//! Resolution: each option's raw text taken by precedence (flag, variable, fallback variable,
//! file, default), parsed by its declaration's parser, and remembered with where it came from
//! (for errors and `--print-config`). Cross-field checks come after, in `validate`.

use super::file::{ConfigFile, find_file};
use super::options::*;
use super::values::{Instances, quoted};
use super::{Config, Invocation, Source, cli, env, validate};
use crate::cgroup::{self, CpuReport};
use crate::fatal::Fatal;
use clap::ArgMatches;
use clap::parser::ValueSource;
use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

/// Where each resolved option came from, by key.
#[derive(Debug, Default)]
pub struct Sources(HashMap<&'static str, Source>);

impl Sources {
    /// Where an option's value came from.
    pub fn of<T>(&self, opt: &Opt<T>) -> &Source {
        self.0.get(opt.spec.key).unwrap_or(&Source::Default)
    }
}

/// Resolves raw values to typed ones, recording where each came from.
pub(super) struct Resolver<'a> {
    pub(super) matches: &'a ArgMatches,
    pub(super) file: Option<&'a ConfigFile>,
    /// A `[pool.NAME]` table: its keys beat flags, variables and the top level.
    pub(super) pool: Option<&'a ConfigFile>,
    pub(super) provenance: Vec<(String, String, String)>,
    pub(super) sources: Sources,
}

impl Resolver<'_> {
    /// The raw text of an option and its source, by precedence.
    pub(super) fn raw(&self, spec: &OptSpec) -> Result<(String, Source), Fatal> {
        if let Some(pool) = self.pool
            && let Some(found) = pool.scalar(spec.key)?
        {
            return Ok(found);
        }
        if let Some(value) = self.matches.get_one::<OsString>(spec.key) {
            let source = match self.matches.value_source(spec.key) {
                Some(ValueSource::EnvVariable) => Source::Env(spec.env.to_string()),
                _ => Source::Flag(format!("--{}", spec.long)),
            };
            return Ok((utf8(value, &source, spec.key)?, source));
        }
        if let Some(var) = spec.fallback_env
            && let Some(value) = env::var(var)
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

    /// Reads one option through its declaration: its parser, and its renderer for
    /// `--print-config`.
    pub(super) fn get<T>(&mut self, opt: &Opt<T>) -> Result<T, Fatal> {
        let key = opt.spec.key;
        let (text, source) = self.raw(&opt.spec)?;
        if text.trim().is_empty() {
            return Err(Fatal::usage(format!(
                "invalid value for {}: is empty",
                source.culprit(key)
            )));
        }
        let value = (opt.parse)(&text).map_err(|why| {
            Fatal::usage(format!("invalid value for {}: {why}", source.culprit(key)))
        })?;
        self.provenance
            .push((key.to_string(), (opt.render)(&value), source.to_string()));
        self.sources.0.insert(key, source);
        Ok(value)
    }
}

/// An option's raw value as text, or the one-line error naming where it came from.
fn utf8(value: &std::ffi::OsStr, source: &Source, key: &str) -> Result<String, Fatal> {
    value.to_str().map(str::to_string).ok_or_else(|| {
        Fatal::usage(format!(
            "invalid value for {}: is not valid UTF-8",
            source.culprit(key)
        ))
    })
}

/// Parses the command line (and the environment and file it points to).
pub fn load(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, Fatal> {
    let matches = cli::command()
        .try_get_matches_from(args)
        .map_err(|err| Fatal::from_clap(&err))?;
    let config = resolve(&matches, cgroup::cpu_report())?;
    if matches.get_flag(cli::PRINT_CONFIG) {
        Ok(Invocation::PrintConfig(config))
    } else if !config.pools.is_empty() {
        // Each pool's command was checked as it was resolved.
        Ok(Invocation::Run(config))
    } else if config.command.is_empty() {
        Err(Fatal::usage(
            "no command to run: give one after -- (corepool -- node server.js) or set command in corepool.toml",
        ))
    } else if config.command[0]
        .as_bytes()
        .iter()
        .all(u8::is_ascii_whitespace)
    {
        Err(Fatal::usage(
            "the command's program name is empty (corepool -- \"\" ...)",
        ))
    } else {
        Ok(Invocation::Run(config))
    }
}

/// Builds the configuration from parsed arguments and the CPU report.
pub fn resolve(matches: &ArgMatches, cpu: CpuReport) -> Result<Config, Fatal> {
    let file = find_file(matches)?;
    super::pools::resolve_from(matches, file, cpu)
}

/// The configuration a file's text gives, defaults and environment aside from flags: the whole
/// path a configuration file takes, for tests and fuzzing.
pub fn from_file_text(path: &str, text: &str, cpu: CpuReport) -> Result<Config, Fatal> {
    let file = ConfigFile::parse(path, text)?;
    let matches = cli::command()
        .try_get_matches_from(["corepool"])
        .map_err(|e| Fatal::usage(e.to_string()))?;
    super::pools::resolve_from(&matches, Some(file), cpu)
}

/// The worker's argv from a pool's table, else the command line, else the file, and how to
/// show where it came from.
fn worker_command(
    matches: &ArgMatches,
    file: Option<&ConfigFile>,
    pool: Option<&ConfigFile>,
) -> Result<(Vec<OsString>, String), Fatal> {
    if let Some((argv, source)) = pool.map(ConfigFile::command).transpose()?.flatten() {
        return Ok((
            argv.into_iter().map(OsString::from).collect(),
            source.to_string(),
        ));
    }
    if let Some(args) = matches.get_many::<OsString>(cli::COMMAND) {
        return Ok((args.cloned().collect(), "command line".to_string()));
    }
    Ok(match file.map(ConfigFile::command).transpose()?.flatten() {
        Some((argv, source)) => (
            argv.into_iter().map(OsString::from).collect(),
            source.to_string(),
        ),
        None => (Vec::new(), "none given".to_string()),
    })
}

/// One configuration: the whole one of a single pool, the top level's, or (`pool`: its table)
/// one pool's.
pub(super) fn resolve_one(
    matches: &ArgMatches,
    file: Option<&ConfigFile>,
    pool: Option<&ConfigFile>,
    cpu: CpuReport,
) -> Result<Config, Fatal> {
    let mut r = Resolver {
        matches,
        file,
        pool,
        provenance: Vec::new(),
        sources: Sources::default(),
    };

    let (command, command_source) = worker_command(matches, file, pool)?;
    // TOML has no bytes: an argument that is not UTF-8 is shown with U+FFFD here only.
    let rendered: Vec<String> = command
        .iter()
        .map(|a| quoted(&a.to_string_lossy()))
        .collect();
    r.provenance.push((
        cli::COMMAND.into(),
        format!("[{}]", rendered.join(", ")),
        command_source,
    ));

    let spec = r.get(&INSTANCES)?;
    let instances = spec.resolve(cpu.usable);
    let usable_cpus = |n: usize| format!("{n} usable CPU{}", if n == 1 { "" } else { "s" });
    let how = match spec {
        Instances::Fixed(_) => String::new(),
        Instances::Max => format!(": max = {} ({cpu})", usable_cpus(cpu.usable)),
        Instances::MinusK(k) => format!(": {} minus {k} ({cpu})", usable_cpus(cpu.usable)),
    };
    // `--print-config` shows the count it came to, and how.
    let source = r.sources.of(&INSTANCES).clone();
    if let Some(last) = r.provenance.last_mut() {
        *last = (
            INSTANCES.spec.key.into(),
            instances.to_string(),
            format!("{source}{how}"),
        );
    }

    let kill_timeout = r.get(&KILL_TIMEOUT)?;
    let stop_signal = r.get(&STOP_SIGNAL)?;
    let restart = r.get(&RESTART)?;
    let restart_delay = r.get(&RESTART_DELAY)?;
    let max_restart_delay = r.get(&MAX_RESTART_DELAY)?;
    let min_uptime = r.get(&MIN_UPTIME)?;
    let max_restarts = r.get(&MAX_RESTARTS)?;
    let fail_fast = r.get(&FAIL_FAST)?;
    let log_format = r.get(&LOG_FORMAT)?;
    let log_level = r.get(&LOG_LEVEL)?;
    let ports = r.get(&PORT)?;
    let host = r.get(&HOST)?;
    let balance = r.get(&BALANCE)?;
    let ready_timeout = r.get(&READY_TIMEOUT)?;
    let reload_batch = r.get(&RELOAD_BATCH)?;
    let port_increment = r.get(&PORT_INCREMENT)?;
    let metrics = r.get(&METRICS)?;
    let min_ready = r.get(&MIN_READY)?;
    let shutdown_delay = r.get(&SHUTDOWN_DELAY)?;
    let heap_share = r.get(&HEAP_SHARE)?;
    let max_memory = r.get(&MAX_MEMORY)?;
    let user = r.get(&USER)?;
    let max_connections = r.get(&MAX_CONNECTIONS)?;
    let idle_timeout = r.get(&IDLE_TIMEOUT)?;
    let ready_on = r.get(&READY_ON)?;
    let sticky = r.get(&STICKY)?;
    let cpu_watch = match (spec, r.get(&CPU_WATCH)?) {
        (Instances::Fixed(_), _) => {
            if let Some(last) = r.provenance.last_mut() {
                last.2.push_str(
                    ": not used, instances is a fixed number (it never follows the CPUs)",
                );
            }
            None
        }
        (_, every) => every,
    };
    let start_concurrency = match r.get(&START_CONCURRENCY)? {
        Some(n) => n,
        None => {
            // `--print-config` shows the count `auto` came to, and how.
            let n = auto_start_concurrency(cpu.usable);
            let source = r.sources.of(&START_CONCURRENCY).clone();
            if let Some(last) = r.provenance.last_mut() {
                *last = (
                    START_CONCURRENCY.spec.key.into(),
                    n.to_string(),
                    format!("{source}: auto = max(4, 2 x {})", usable_cpus(cpu.usable)),
                );
            }
            n
        }
    };

    let Some(&port) = ports.first() else {
        return Err(Fatal::usage(format!(
            "invalid value for {}: no port",
            r.sources.of(&PORT).culprit(PORT.spec.key)
        )));
    };
    let config = Config {
        command,
        instances,
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
        instances_spec: spec,
        cpu_watch,
        ports,
        provenance: r.provenance,
        unknown_env: env::unknown_corepool_variables(),
        runtime_dir: env::var("COREPOOL_RUNTIME_DIR").map(Into::into),
        node_options: env::node_options(),
        search_path: env::path(),
        sticky,
        pools: Vec::new(),
        start_concurrency,
    };
    validate::check(&config, &r.sources)?;
    Ok(config)
}

/// `--start-concurrency auto`: enough starts at once to keep every usable CPU busy (a start is
/// not all CPU), few enough that a loaded machine brings each one up within --ready-timeout.
pub fn auto_start_concurrency(usable_cpus: usize) -> usize {
    usable_cpus.saturating_mul(2).max(4)
}
