//! Several named pools in one file: the `[pool.NAME]` tables, `--only`, `oneshot`, `after`
//! and `cpu_share`.
//!
//! Each table is resolved like a whole configuration, with its own keys first: a pool's key
//! beats a flag, a variable and the top level, which are every pool's defaults. The options
//! that concern the container (`Scope::Global`) are top-level only. Checks across pools live
//! here: names, `after` (existing oneshot pools, no circle), one port per pool, and the split
//! of the usable CPUs among pools whose instances derive from them.

use super::cli::COMMAND;
use super::file::ConfigFile;
use super::options::{INSTANCES, ONLY, OPTIONS, Scope};
use super::resolve::{Resolver, Sources, resolve_one};
use super::values::Mode;
use super::values::{Instances, quoted};
use super::{Config, RestartPolicy};
use crate::cgroup::CpuReport;
use crate::fatal::Fatal;
use clap::ArgMatches;
use std::collections::BTreeMap;

/// Keys of a `[pool.NAME]` table only.
const POOL_KEYS: &[&str] = &["oneshot", "after", "cpu_share"];

/// An option that concerns the whole container (`Scope::Global`): set at the top level only.
fn container_key(key: &str) -> bool {
    OPTIONS
        .iter()
        .any(|o| o.key == key && o.scope == Scope::Global)
}

/// One `[pool.NAME]` table resolved: its own keys, else the top level's (flags and variables
/// included), else the defaults.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    /// Finishing with 0 ends this pool alone (`oneshot = true`; restart never or on-failure).
    pub oneshot: bool,
    /// Oneshot pools that must have finished with 0 before this one starts.
    pub after: Vec<String>,
    /// Weight of this pool in the split of the usable CPUs among pools with `instances = max`
    /// or `-K`.
    pub cpu_share: u32,
    pub config: Config,
}

/// The `pool` tables of a file, with the span of every key (the rest of the file is ignored).
#[derive(serde::Deserialize)]
struct PoolTables {
    #[serde(default)]
    pool: Option<toml::Spanned<toml::Value>>,
}

/// The `[pool.NAME]` tables: each a table of per-pool options, `command`, `oneshot`,
/// `after` and `cpu_share`.
pub(super) fn parse_pools(
    path: &str,
    text: &str,
) -> Result<Vec<(String, usize, ConfigFile)>, Fatal> {
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let bad = |line: usize, why: String| Fatal::usage(format!("{path}:{line}: {why}"));
    let tables: PoolTables = toml::from_str(text).map_err(|err| {
        bad(
            err.span().map(|s| line_of(s.start)).unwrap_or(1),
            err.message().to_string(),
        )
    })?;
    let Some(spanned) = tables.pool else {
        return Ok(Vec::new());
    };
    let line = line_of(spanned.span().start);
    let toml::Value::Table(_) = spanned.get_ref() else {
        return Err(bad(line, "pool: expected tables, e.g. [pool.web]".into()));
    };
    // Again with spans inside each table, for the lines of its keys.
    #[derive(serde::Deserialize)]
    struct Spanned {
        pool: BTreeMap<String, toml::Spanned<BTreeMap<String, toml::Spanned<toml::Value>>>>,
    }
    let tables: Spanned = toml::from_str(text).map_err(|err| {
        let line = err.span().map(|s| line_of(s.start)).unwrap_or(line);
        bad(
            line,
            "each pool must be a table of options, e.g. [pool.web]".into(),
        )
    })?;
    let mut pools = Vec::new();
    for (name, table) in tables.pool {
        let line = line_of(table.span().start);
        if name.is_empty()
            || name == "all"
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(bad(
                line,
                format!("[pool.{name}]: a pool name is letters, digits, - and _ (and not 'all')"),
            ));
        }
        let mut values = BTreeMap::new();
        for (raw_key, spanned) in table.into_inner() {
            let line = line_of(spanned.span().start);
            let key = raw_key.replace('-', "_");
            if container_key(&key) {
                return Err(bad(
                    line,
                    format!(
                        "[pool.{name}] {raw_key}: concerns the whole container; set it at the top level"
                    ),
                ));
            }
            let known = key == COMMAND
                || POOL_KEYS.contains(&key.as_str())
                || OPTIONS.iter().any(|o| o.key == key);
            if !known {
                return Err(bad(line, format!("[pool.{name}]: unknown key '{raw_key}'")));
            }
            if let Some((_, first)) = values.get(&key) {
                return Err(bad(
                    line,
                    format!(
                        "[pool.{name}]: '{raw_key}' repeats the key of line {first} (- and _ are the same)"
                    ),
                ));
            }
            values.insert(key, (spanned.into_inner(), line));
        }
        pools.push((
            name,
            line,
            ConfigFile {
                path: path.to_string(),
                values,
                pools: Vec::new(),
            },
        ));
    }
    // The file's order, not the map's.
    pools.sort_by_key(|(_, line, _)| *line);
    Ok(pools)
}

/// The configuration: a single pool's, or the top level's with each `[pool.NAME]` table that
/// `--only` selects resolved in `pools`.
pub(super) fn resolve_from(
    matches: &ArgMatches,
    file: Option<ConfigFile>,
    cpu: CpuReport,
) -> Result<Config, Fatal> {
    let mut top = resolve_one(matches, file.as_ref(), None, cpu.clone())?;
    let mut r = Resolver {
        matches,
        file: file.as_ref(),
        pool: None,
        provenance: Vec::new(),
        sources: Sources::default(),
    };
    let only = r.get(&ONLY)?;
    let only_source = r.sources.of(&ONLY).clone();
    let tables = file
        .as_ref()
        .map(|f| f.pools.as_slice())
        .unwrap_or_default();
    if tables.is_empty() {
        if only.is_some() {
            return Err(Fatal::usage(format!(
                "invalid value for {}: the configuration has no [pool.NAME] tables to choose from",
                only_source.culprit("only")
            )));
        }
        return Ok(top);
    }
    let names: Vec<&str> = tables.iter().map(|(n, _, _)| n.as_str()).collect();
    if let Some(only) = &only
        && let Some(unknown) = only.iter().find(|n| !names.contains(&n.as_str()))
    {
        return Err(Fatal::usage(format!(
            "invalid value for {}: no pool '{unknown}' (pools: {})",
            only_source.culprit("only"),
            names.join(", ")
        )));
    }
    let selected: Vec<&(String, usize, ConfigFile)> = tables
        .iter()
        .filter(|(n, _, _)| only.as_ref().is_none_or(|o| o.contains(n)))
        .collect();
    // First pass: the pool-only keys, and who takes a share of the CPUs.
    struct Plan {
        oneshot: bool,
        after: Vec<String>,
        cpu_share: u32,
        derived: bool,
    }
    let mut plans = Vec::new();
    for (name, line, table) in &selected {
        let in_pool = |e: Fatal| Fatal::usage(format!("pool {name}: {e}"));
        let r = Resolver {
            matches,
            file: file.as_ref(),
            pool: Some(table),
            provenance: Vec::new(),
            sources: Sources::default(),
        };
        let (text, _) = r.raw(&INSTANCES.spec).map_err(in_pool)?;
        let derived = !matches!(Instances::parse(&text), Ok(Instances::Fixed(_)));
        let at = |key: &str| {
            table
                .values
                .get(key)
                .map(|(v, l)| (v, format!("{}:{l}: [pool.{name}] {key}", table.path)))
        };
        let oneshot = match at("oneshot") {
            None => false,
            Some((toml::Value::Boolean(b), _)) => *b,
            Some((_, culprit)) => {
                return Err(Fatal::usage(format!("{culprit}: expected true or false")));
            }
        };
        let after = match at("after") {
            None => Vec::new(),
            Some((toml::Value::Array(items), culprit)) => items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Fatal::usage(format!(
                            "{culprit}: expected pool names, e.g. [\"migrate\"]"
                        ))
                    })
                })
                .collect::<Result<_, _>>()?,
            Some((_, culprit)) => {
                return Err(Fatal::usage(format!(
                    "{culprit}: expected a list of pool names, e.g. [\"migrate\"]"
                )));
            }
        };
        let cpu_share = match at("cpu_share") {
            None => 1,
            Some((toml::Value::Integer(n), _)) if (1..=1000).contains(n) => *n as u32,
            Some((_, culprit)) => {
                return Err(Fatal::usage(format!(
                    "{culprit}: expected a weight from 1 to 1000"
                )));
            }
        };
        for dep in &after {
            let culprit = format!("{}:{line}: [pool.{name}] after", table.path);
            match tables.iter().find(|(n, _, _)| n == dep) {
                None => {
                    return Err(Fatal::usage(format!(
                        "{culprit}: no pool '{dep}' (pools: {})",
                        names.join(", ")
                    )));
                }
                Some((_, _, t))
                    if !matches!(
                        t.values.get("oneshot"),
                        Some((toml::Value::Boolean(true), _))
                    ) =>
                {
                    return Err(Fatal::usage(format!(
                        "{culprit}: pool '{dep}' is not oneshot = true, so it never finishes \
                         for '{name}' to start"
                    )));
                }
                _ => {}
            }
        }
        plans.push(Plan {
            oneshot,
            after,
            cpu_share,
            derived: derived && !oneshot,
        });
    }
    if let Some(cycle) = after_cycle(
        &selected
            .iter()
            .map(|(n, _, _)| n.as_str())
            .collect::<Vec<_>>(),
        &plans.iter().map(|p| p.after.clone()).collect::<Vec<_>>(),
    ) {
        return Err(Fatal::usage(format!(
            "{}: pools wait for each other in a circle: {cycle}",
            file.as_ref()
                .map_or("the configuration", |f| f.path.as_str())
        )));
    }
    // `instances = max` (or -K) in several pools: the usable CPUs are split by cpu_share.
    let weight: u32 = plans
        .iter()
        .filter(|p| p.derived)
        .map(|p| p.cpu_share)
        .sum();
    let sharing = plans.iter().filter(|p| p.derived).count() > 1;
    let shares = cpu_split(
        cpu.usable,
        &plans
            .iter()
            .map(|p| if p.derived { p.cpu_share } else { 0 })
            .collect::<Vec<_>>(),
    );
    for (((name, _, table), plan), share) in selected.iter().zip(plans).zip(shares) {
        let in_pool = |e: Fatal| Fatal::usage(format!("pool {name}: {e}"));
        let mut pool_cpu = cpu.clone();
        if plan.derived && sharing {
            pool_cpu.usable = share;
        }
        let mut config =
            resolve_one(matches, file.as_ref(), Some(table), pool_cpu).map_err(in_pool)?;
        if config.command.is_empty() {
            return Err(Fatal::usage(format!(
                "pool {name}: no command to run: set command in [pool.{name}] (or at the top level)"
            )));
        }
        // A oneshot pool runs once unless told otherwise.
        if plan.oneshot
            && let Some(entry) = config
                .provenance
                .iter_mut()
                .find(|(key, _, source)| key == "restart" && source == "default")
        {
            config.restart = RestartPolicy::Never;
            *entry = (
                "restart".into(),
                quoted("never"),
                "default for a oneshot pool".into(),
            );
        }
        // ... as one process (two copies of a migration would race each other) that serves no
        // port (it would never become ready, and would take the port's default 3000).
        if plan.oneshot {
            for (key, value, source) in config.provenance.iter_mut() {
                // "default", or "default: max = N usable CPUs (...)" for instances.
                if source != "default" && !source.starts_with("default:") {
                    continue;
                }
                if key == "instances" {
                    config.instances = 1;
                    *value = "1".into();
                    *source = "default for a oneshot pool".into();
                } else if key == "balance" {
                    config.balance = Mode::None;
                    *value = quoted("none");
                    *source = "default for a oneshot pool".into();
                }
            }
        }
        if plan.oneshot && config.restart == RestartPolicy::Always {
            let source = match table.values.get("restart") {
                Some((_, l)) => format!("{}:{l}: [pool.{name}] restart", table.path),
                None => format!("{}: [pool.{name}] oneshot", table.path),
            };
            return Err(Fatal::usage(format!(
                "{source}: a oneshot pool needs restart = \"never\" or \"on-failure\" (always \
                 never lets it finish)"
            )));
        }
        if plan.derived && sharing {
            for (key, _, source) in &mut config.provenance {
                if key == "instances" {
                    source.push_str(&format!(
                        "; this pool's cpu_share {} of {weight}: {share} of {} usable CPUs",
                        plan.cpu_share, cpu.usable
                    ));
                }
            }
        }
        config.provenance.retain(|(key, _, _)| !container_key(key));
        if plan.oneshot {
            config
                .provenance
                .push(("oneshot".into(), "true".into(), "file".into()));
        }
        if !plan.after.is_empty() {
            let list: Vec<String> = plan.after.iter().map(|a| quoted(a)).collect();
            config.provenance.push((
                "after".into(),
                format!("[{}]", list.join(", ")),
                "file".into(),
            ));
        }
        if table.values.contains_key("cpu_share") || sharing && plan.derived {
            config.provenance.push((
                "cpu_share".into(),
                plan.cpu_share.to_string(),
                if table.values.contains_key("cpu_share") {
                    "file"
                } else {
                    "default"
                }
                .into(),
            ));
        }
        // Only those `--only` selects wait for a pool; one left out counts as done.
        let after = plan
            .after
            .into_iter()
            .filter(|a| selected.iter().any(|(n, _, _)| n == a))
            .collect();
        top.pools.push(PoolConfig {
            name: name.clone(),
            oneshot: plan.oneshot,
            after,
            cpu_share: plan.cpu_share,
            config,
        });
    }
    check_ports(&top.pools)?;
    top.provenance.retain(|(key, _, _)| container_key(key));
    top.provenance.extend(r.provenance);
    Ok(top)
}

/// The usable CPUs split by weight (0: takes no part): each part is `usable × weight / total`
/// rounded down, the CPUs left over go to the largest remainders, and every part is at least 1.
pub fn cpu_split(usable: usize, weights: &[u32]) -> Vec<usize> {
    let total: usize = weights.iter().map(|&w| w as usize).sum();
    if total == 0 {
        return vec![usable.max(1); weights.len()];
    }
    let mut parts: Vec<usize> = weights
        .iter()
        .map(|&w| usable * w as usize / total)
        .collect();
    let left = usable - parts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] > 0).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(usable * weights[i] as usize % total));
    // Fewer CPUs are left over than there are parts (each remainder is below one CPU).
    for &i in order.iter().take(left) {
        parts[i] += 1;
    }
    parts.iter().map(|&p| p.max(1)).collect()
}

/// `--only web,queue`: None for all.
pub(super) fn parse_only(text: &str) -> Result<Option<Vec<String>>, String> {
    if text.trim() == "all" {
        return Ok(None);
    }
    let names: Vec<String> = text.split(',').map(|n| n.trim().to_string()).collect();
    if names.iter().any(String::is_empty) {
        return Err(format!("'{text}' has an empty pool name"));
    }
    Ok(Some(names))
}

/// `--only` as TOML.
pub(super) fn render_only(only: &Option<Vec<String>>) -> String {
    quoted(
        &only
            .as_ref()
            .map_or("all".to_string(), |names| names.join(",")),
    )
}

/// A circle of `after` among the pools, as `a -> b -> a`, if there is one.
fn after_cycle(names: &[&str], after: &[Vec<String>]) -> Option<String> {
    fn visit(
        i: usize,
        names: &[&str],
        after: &[Vec<String>],
        path: &mut Vec<usize>,
        done: &mut Vec<bool>,
    ) -> Option<String> {
        if let Some(at) = path.iter().position(|&p| p == i) {
            let mut cycle: Vec<&str> = path[at..].iter().map(|&p| names[p]).collect();
            cycle.push(names[i]);
            return Some(cycle.join(" -> "));
        }
        if done[i] {
            return None;
        }
        path.push(i);
        for dep in &after[i] {
            if let Some(j) = names.iter().position(|n| n == dep)
                && let Some(cycle) = visit(j, names, after, path, done)
            {
                return Some(cycle);
            }
        }
        path.pop();
        done[i] = true;
        None
    }
    let mut done = vec![false; names.len()];
    (0..names.len()).find_map(|i| visit(i, names, after, &mut Vec::new(), &mut done))
}

/// One port per pool: two pools that serve a port (socket or proxy mode) may not share one.
fn check_ports(pools: &[PoolConfig]) -> Result<(), Fatal> {
    let serving = |p: &&PoolConfig| p.config.balance != Mode::None;
    for (i, a) in pools.iter().enumerate().filter(|(_, p)| serving(p)) {
        for b in pools[..i].iter().filter(serving) {
            if let Some(port) = a.config.ports.iter().find(|p| b.config.ports.contains(p)) {
                return Err(Fatal::usage(format!(
                    "pool {}: port {port} is pool {}'s too: give each pool its own port \
                     (port = ... in [pool.{}])",
                    a.name, b.name, a.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::from_file_text;
    use super::*;

    fn cpu(usable: usize) -> CpuReport {
        CpuReport {
            usable,
            online: 8,
            affinity: 8,
            quota: None,
        }
    }

    #[test]
    fn cpus_are_split_among_pools_by_weight() {
        assert_eq!(cpu_split(2, &[1, 1]), vec![1, 1]);
        assert_eq!(cpu_split(3, &[1, 1]), vec![2, 1]);
        assert_eq!(cpu_split(8, &[3, 1]), vec![6, 2]);
        assert_eq!(cpu_split(8, &[1, 0, 1]), vec![4, 1, 4]);
        assert_eq!(cpu_split(1, &[1, 1]), vec![1, 1]);
        assert_eq!(cpu_split(10, &[1, 2, 2]), vec![2, 4, 4]);
    }

    #[test]
    fn pools_from_a_file() {
        let text = "kill_timeout = \"3s\"\nport = 4000\n\n[pool.web]\ncommand = [\"node\", \"s.js\"]\n\
                instances = \"max\"\n\n[pool.queue]\ncommand = [\"node\", \"w.js\"]\n\
                instances = \"max\"\ncpu_share = 3\nbalance = \"none\"\nkill_timeout = \"9s\"\n";
        let config = from_file_text("f.toml", text, cpu(8)).unwrap();
        let pools: Vec<(&str, usize, u64)> = config
            .pools
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.config.instances,
                    p.config.kill_timeout.as_secs(),
                )
            })
            .collect();
        assert_eq!(pools, vec![("web", 2, 3), ("queue", 6, 9)]);
        let toml = config.to_toml();
        assert!(toml.contains("\n[pool.queue]\n"), "{toml}");
        assert!(
            toml.contains("kill_timeout = \"9s\"  # file f.toml:13"),
            "{toml}"
        );
        let err = |text: &str| {
            from_file_text("f.toml", text, cpu(8))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err("[pool.web]\ncommand = [\"a\"]\nkill_timeout = \"x\"\n"),
            "pool web: invalid value for f.toml:3: kill_timeout: 'x' is not a duration (write \
         e.g. 1500ms, 10s, 2m)"
        );
        assert!(
            err("[pool.web]\ncommand = [\"a\"]\nbogus = 1\n")
                .contains("f.toml:3: [pool.web]: unknown key 'bogus'")
        );
        assert!(err("[pool.web]\ninstances = 1\n").contains("pool web: no command to run"));
        assert!(
            err(
                "[pool.a]\ncommand = [\"a\"]\noneshot = true\nafter = [\"b\"]\n\
             [pool.b]\ncommand = [\"a\"]\noneshot = true\nafter = [\"a\"]\n"
            )
            .contains("pools wait for each other in a circle: a -> b -> a")
        );
        assert!(err("only = \"x\"\ncommand = [\"a\"]\n").contains("no [pool.NAME] tables"));
    }
}
