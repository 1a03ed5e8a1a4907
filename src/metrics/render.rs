//! The Prometheus text exposition of a [`Shared`] snapshot (`/metrics`): the pool's gauges
//! and counters, labelled by slot and pool, built with `prometheus_client` at each scrape.

use super::Shared;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// `corepool_workers_configured`'s help.
const CONFIGURED_HELP: &str =
    "The worker count the pool runs (--instances, then corepool scale or the CPU follow)";
/// `corepool_workers_pinned`'s help.
const PINNED_HELP: &str = "1 while a manual corepool scale pins the worker count";

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, String)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// The Prometheus text exposition of a snapshot.
pub fn render(shared: &Shared) -> String {
    let snap = shared.snapshot();
    let mut registry = Registry::with_prefix("corepool");

    let info = Family::<Labels, Gauge>::default();
    info.get_or_create(&labels(&[
        ("version", env!("CARGO_PKG_VERSION").to_string()),
        ("balance", shared.balance.to_string()),
    ]))
    .set(1);
    registry.register("info", "corepool version and balance mode", info);
    if !snap.pools.is_empty() {
        let pools = Family::<Labels, Gauge>::default();
        for p in &snap.pools {
            pools
                .get_or_create(&labels(&[
                    ("pool", p.name.clone()),
                    ("balance", p.balance.to_string()),
                    ("state", p.state.to_string()),
                ]))
                .set(1);
        }
        registry.register("pool_info", "Each pool, its balance mode and state", pools);
    }

    // Several pools: every worker series gets a `pool` label (none for a single pool).
    let by_pool = snap.slots_by_pool();
    let names: Vec<&str> = if snap.pools.is_empty() {
        vec![""]
    } else {
        snap.pools.iter().map(|p| p.name.as_str()).collect()
    };
    let with_pool = |pool: &str, mut pairs: Vec<(&str, String)>| {
        if !pool.is_empty() {
            pairs.insert(0, ("pool", pool.to_string()));
        }
        labels(&pairs)
    };
    let states = Family::<Labels, Gauge>::default();
    for &pool in &names {
        for state in [
            "waiting", "queued", "starting", "running", "stopping", "done", "given-up",
        ] {
            let n = by_pool
                .iter()
                .filter(|(p, s)| *p == pool && s.state == state)
                .count();
            states
                .get_or_create(&with_pool(pool, vec![("state", state.to_string())]))
                .set(n as i64);
        }
    }
    registry.register("workers", "Worker slots by state", states);

    if snap.pools.is_empty() {
        let configured = Gauge::<i64>::default();
        configured.set(snap.slots.len() as i64);
        registry.register("workers_configured", CONFIGURED_HELP, configured);
        let pinned = Gauge::<i64>::default();
        pinned.set(i64::from(snap.pinned));
        registry.register("workers_pinned", PINNED_HELP, pinned);
    } else {
        let configured = Family::<Labels, Gauge>::default();
        let pinned = Family::<Labels, Gauge>::default();
        for p in &snap.pools {
            configured
                .get_or_create(&with_pool(&p.name, Vec::new()))
                .set(p.slots as i64);
            pinned
                .get_or_create(&with_pool(&p.name, Vec::new()))
                .set(i64::from(p.pinned));
        }
        registry.register("workers_configured", CONFIGURED_HELP, configured);
        registry.register("workers_pinned", PINNED_HELP, pinned);
    }

    if snap.pools.is_empty() {
        let ready = Gauge::<i64>::default();
        ready.set(snap.slots.iter().filter(|s| s.ready).count() as i64);
        registry.register("workers_ready", "Workers accepting connections", ready);
    } else {
        let ready = Family::<Labels, Gauge>::default();
        for &pool in &names {
            let n = by_pool
                .iter()
                .filter(|(p, s)| *p == pool && s.ready)
                .count();
            ready
                .get_or_create(&with_pool(pool, Vec::new()))
                .set(n as i64);
        }
        registry.register("workers_ready", "Workers accepting connections", ready);
    }

    let restarts = Family::<Labels, Counter>::default();
    let rss = Family::<Labels, Gauge<f64, AtomicU64>>::default();
    let cpu = Family::<Labels, Counter<f64, AtomicU64>>::default();
    let groups: Vec<i32> = snap.slots.iter().filter_map(|s| s.pid).collect();
    let usage = shared.cached_usage(&groups);
    for (pool, s) in &by_pool {
        let slot = with_pool(pool, vec![("slot", s.slot.to_string())]);
        restarts.get_or_create(&slot).inc_by(s.restarts);
        if let Some(u) = s.pid.and_then(|p| usage.get(&p)) {
            rss.get_or_create(&slot).set(u.rss_bytes as f64);
            cpu.get_or_create(&slot).inc_by(u.cpu_seconds);
        }
    }
    registry.register("worker_restarts", "Restarts per worker slot", restarts);
    registry.register(
        "worker_rss_bytes",
        "Resident memory of the worker's whole process group",
        rss,
    );
    registry.register(
        "worker_cpu_seconds",
        "CPU time of the worker's current process group",
        cpu,
    );

    let reloads = Counter::<u64>::default();
    reloads.inc_by(snap.reloads);
    registry.register("reloads", "Rolling reloads started", reloads);
    let memory_restarts = Counter::<u64>::default();
    memory_restarts.inc_by(snap.memory_restarts);
    registry.register(
        "memory_restarts",
        "Workers replaced for staying above --max-memory",
        memory_restarts,
    );
    if let (Some(open), Some(total)) = (snap.open_connections, snap.connections_total) {
        let open_gauge = Gauge::<i64>::default();
        open_gauge.set(open as i64);
        registry.register(
            "proxy_connections_open",
            "Connections open: being relayed, or waiting for a ready worker",
            open_gauge,
        );
        let total_counter = Counter::<u64>::default();
        total_counter.inc_by(total);
        registry.register(
            "proxy_connections",
            "Connections accepted by the proxy",
            total_counter,
        );
    }
    if let Some(resent) = snap.connections_resent {
        let resent_counter = Counter::<u64>::default();
        resent_counter.inc_by(resent);
        registry.register(
            "proxy_resent",
            "Requests the proxy sent to another worker because theirs died or closed its \
             server without reading them",
            resent_counter,
        );
    }
    if let Some((max, reached)) = snap.connection_limit {
        let max_gauge = Gauge::<i64>::default();
        max_gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        registry.register(
            "proxy_max_connections",
            "Connections the proxy relays at once (--max-connections)",
            max_gauge,
        );
        let reached_counter = Counter::<u64>::default();
        reached_counter.inc_by(reached);
        registry.register(
            "proxy_max_connections_reached",
            "Times the proxy stopped accepting at --max-connections (clients then wait in the \
             listen backlog)",
            reached_counter,
        );
    }

    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::SlotView;

    #[test]
    fn renders_prometheus_text() {
        let shared = Shared::new("socket", 1);
        let mut snap = shared.snapshot();
        snap.slots = vec![SlotView {
            slot: 0,
            pid: None,
            state: "waiting",
            ready: false,
            restarts: 3,
            uptime: None,
        }];
        shared.publish(snap);
        let text = render(&shared);
        assert!(
            text.contains("corepool_info{version=\"0.1.0\",balance=\"socket\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("corepool_workers{state=\"waiting\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("corepool_worker_restarts_total{slot=\"0\"} 3"),
            "{text}"
        );
        assert!(text.contains("corepool_workers_ready 0"), "{text}");
        assert!(!shared.ready());
    }
}
