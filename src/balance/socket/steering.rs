//! Socket mode's steering glue: the `steer` program attached to the first port's group (eBPF
//! round robin or `--sticky ip`, or the classic sticky fallback), kept in step with the slots
//! that are ready, taken out, removed or added by a scale. What each call does to the kernel
//! is `steer`'s; this type decides which steering the group gets and logs what fails.

use super::slots::Leaving;
use crate::steer;
use std::os::fd::OwnedFd;

/// The steering of the first port's group, if any, and how it should deal.
#[derive(Default)]
pub(super) struct GroupSteering {
    /// Round-robin steering over the slot sockets, when the kernel allows it.
    steering: Option<steer::Steering>,
    /// `--sticky ip`: the steering deals by client address.
    pub(super) sticky: bool,
}

impl GroupSteering {
    /// Round-robin steering over a group of several sockets (`bind`), and how connections
    /// are spread, for the start-up log.
    pub(super) fn round_robin(group: &[&OwnedFd]) -> (GroupSteering, String) {
        let (steering, spread) = match steer::round_robin(group, crate::scale::MAX_WORKERS as u32) {
            Ok(steering) => (Some(steering), "connections in turn (eBPF)".to_string()),
            Err(err) => (
                None,
                format!("connections by the kernel's hash (no eBPF round robin: {err})"),
            ),
        };
        (
            GroupSteering {
                steering,
                sticky: false,
            },
            spread,
        )
    }

    /// Whether the eBPF program moves a stopped listener's queued connections to a ready slot
    /// (whatever `net.ipv4.tcp_migrate_req` says).
    pub(super) fn migrates(&self) -> bool {
        self.steering
            .as_ref()
            .is_some_and(steer::Steering::migrates)
    }

    /// Puts slot `slot`'s socket back into the steering's socket map (it listens again).
    pub(super) fn rejoin(&self, slot: usize, socket: &OwnedFd) {
        if let Some(steering) = &self.steering
            && let Err(err) = steering.rejoin(slot as u32, socket)
        {
            tracing::warn!("worker {slot}: cannot steer connections to its socket again: {err}");
        }
    }

    /// `socket` stopped listening: it left the group.
    pub(super) fn left(&self, socket: &OwnedFd) {
        if let Some(steering) = &self.steering {
            steering.left(socket);
        }
    }

    /// Tells the steering which slots are ready (`steered`: as last written, updated).
    pub(super) fn deal(
        &self,
        ready: Vec<u32>,
        steered: &mut Vec<u32>,
        sockets: &[Option<OwnedFd>],
        leaving: &[Leaving],
    ) {
        if let Some(steering) = &self.steering {
            // The classic program names positions in the kernel's array of the group, which
            // moves when a socket leaves it even if the ready slots stay the same.
            if ready != *steered || steering.follows_group() {
                let leaving: Vec<&OwnedFd> =
                    leaving.iter().flat_map(|l| l.sockets.first()).collect();
                match steering.set_ready(&ready, sockets, &leaving) {
                    Ok(()) => *steered = ready,
                    Err(err) => tracing::warn!("cannot update the eBPF steering: {err}"),
                }
            }
        }
    }

    /// `--sticky ip` on the group formed by `group`: the eBPF program replaced in place, or a
    /// new one, else the classic program. The new spread for the log; None when neither could
    /// be attached (said here).
    pub(super) fn set_sticky(&mut self, group: &[&OwnedFd]) -> Option<String> {
        let ebpf = match &mut self.steering {
            Some(round_robin) => round_robin.redeal(steer::Deal::Sticky, group[0]),
            None => steer::ebpf(group, steer::Deal::Sticky, crate::scale::MAX_WORKERS as u32)
                .map(|s| self.steering = Some(s)),
        };
        let (steering, spread) = match ebpf {
            Ok(()) => (None, "connections by client address (eBPF)".to_string()),
            // Replaces the round robin, if any, in the kernel too (one program per group).
            Err(err) => match steer::classic(group) {
                Ok(steering) => (
                    Some(steering),
                    format!("connections by client address (classic BPF; no eBPF: {err})"),
                ),
                Err(classic) => {
                    tracing::warn!(
                        "--sticky ip: cannot steer by client address (no eBPF: {err}; no classic \
                         BPF: {classic}); connections are spread as without it"
                    );
                    return None;
                }
            },
        };
        if let Some(steering) = steering {
            self.steering = Some(steering);
        }
        Some(spread)
    }

    /// The pool now has `n` slots; `listening`: a socket that listens in the group.
    pub(super) fn resize(&mut self, n: usize, listening: Option<&OwnedFd>) {
        if let Some(steering) = &mut self.steering
            && let Err(err) = steering.resize(n as u32, listening)
        {
            tracing::warn!("the steering cannot follow the scale to {n} slots: {err}");
        }
    }

    /// Steering for a pool that started with one slot and grew, `listening` being slot i's
    /// socket at entry i. The spread for the log, and whether every one of `listening` is
    /// now dealt to (eBPF).
    pub(super) fn setup(&mut self, listening: &[&OwnedFd]) -> (String, bool) {
        let deal = if self.sticky {
            steer::Deal::Sticky
        } else {
            steer::Deal::Turn
        };
        match steer::ebpf(listening, deal, crate::scale::MAX_WORKERS as u32) {
            Ok(steering) => {
                self.steering = Some(steering);
                let spread = match deal {
                    steer::Deal::Turn => "connections in turn (eBPF)".to_string(),
                    steer::Deal::Sticky => "connections by client address (eBPF)".to_string(),
                };
                (spread, true)
            }
            Err(err) if self.sticky => match steer::classic(listening) {
                Ok(steering) => {
                    self.steering = Some(steering);
                    let spread =
                        format!("connections by client address (classic BPF; no eBPF: {err})");
                    (spread, false)
                }
                Err(classic) => {
                    tracing::warn!(
                        "--sticky ip: cannot steer by client address (no eBPF: {err}; no classic \
                         BPF: {classic}); connections are spread as without it"
                    );
                    let spread = format!("connections by the kernel's hash (no eBPF: {err})");
                    (spread, false)
                }
            },
            Err(err) => {
                let spread =
                    format!("connections by the kernel's hash (no eBPF round robin: {err})");
                (spread, false)
            }
        }
    }
}
