//! Applying a scale to the pool (`corepool scale`, the CPU follow): a request goes through
//! [`Scaling`]'s decision, then the slots change: new ones start and become ready as any worker
//! does; removed ones, the highest first, drain as a reload's old workers do. It lives apart
//! from `scale`, which config and balance read too (the parsing, `MAX_WORKERS`), so that
//! `scale` needs nothing of the core (no import cycle).

use crate::drain::Drains;
use crate::os::{Os, Target};
use crate::scale::{Decision, Origin, Scaling};
use crate::slots::Slots;
use std::time::{Duration, Instant};

/// Applies a request for `target` workers to `pool` (`reloading`: a rolling reload runs):
/// what the pool made of it, for the client; Err when refused.
pub fn request(
    scaling: &mut Scaling,
    target: usize,
    origin: Origin,
    reloading: bool,
    pool: Resize<'_>,
    now: Instant,
    os: &mut dyn Os,
) -> Result<String, String> {
    let current = pool.slots.len();
    match scaling.decide(target, &origin, current, reloading) {
        Decision::Refused(why) => Err(why),
        Decision::Pinned => Ok(format!(
            "the count is pinned at {current} workers by corepool scale (corepool scale \
             auto follows the CPUs again)"
        )),
        Decision::Same => Ok(format!("the pool has {current} workers already")),
        Decision::Queued(n) => {
            tracing::info!(
                "scale to {n} workers ({}) waits for the rolling reload under way",
                origin.why()
            );
            Ok(format!(
                "a rolling reload is under way: the pool goes to {n} workers once it is over"
            ))
        }
        Decision::Apply(n) => resize(pool, n, &origin.why(), now, os)
            .map(|()| format!("scaling from {current} to {n} workers")),
    }
}

/// What a scale changes: the pool's slots, and the drains that stop removed workers after
/// `handoff` (the time to route away from them first).
pub struct Resize<'a> {
    pub slots: &'a mut Slots,
    pub drains: &'a mut Drains,
    pub handoff: Duration,
}

/// Changes the slots to `n`: new ones start (and become ready as any worker does);
/// removed ones, the highest first, drain as a reload's old workers do.
pub fn resize(
    pool: Resize<'_>,
    n: usize,
    why: &str,
    now: Instant,
    os: &mut dyn Os,
) -> Result<(), String> {
    let from = pool.slots.len();
    if n > from {
        os.resize(n)
            .map_err(|err| format!("cannot add worker slots: {err}"))?;
        pool.slots.grow(n, now);
        tracing::info!(
            "scaling up from {from} to {n} workers ({why}): worker{} {} start{}",
            if n - from == 1 { "" } else { "s" },
            slot_list(from..n),
            if n - from == 1 { "s" } else { "" },
        );
        return Ok(());
    }
    tracing::info!(
        "scaling down from {from} to {n} workers ({why}): worker{} {} drain{} and stop",
        if from - n == 1 { "" } else { "s" },
        slot_list((n..from).rev()),
        if from - n == 1 { "s" } else { "" },
    );
    if let Err(err) = os.resize(n) {
        tracing::warn!("scaling down: {err}");
    }
    while pool.slots.len() > n {
        let Some((_, pids)) = pool.slots.remove_last() else {
            break;
        };
        for pid in pids {
            pool.drains.add(os, Target::Group(pid), pool.handoff, now);
        }
    }
    Ok(())
}

/// Slots for the log: `2, 3`.
fn slot_list(slots: impl Iterator<Item = usize>) -> String {
    slots.map(|s| s.to_string()).collect::<Vec<_>>().join(", ")
}
