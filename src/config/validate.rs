//! Cross-field checks, after every option is resolved: values that are each fine alone but
//! cannot go together. Each error names the option to change, where it was set.

use super::options::*;
use super::resolve::Sources;
use super::values::Mode;
use super::{Config, ReadyOn, Source};
use crate::fatal::Fatal;
use crate::units::format_duration;
use std::time::Duration;

/// The first combination that cannot work, as a one-line usage error.
pub fn check(c: &Config, sources: &Sources) -> Result<(), Fatal> {
    let culprit = |opt: &OptSpec, source: &Source| source.culprit(opt.key);
    let fail = |opt: &OptSpec, source: &Source, why: String| {
        Err(Fatal::usage(format!(
            "invalid value for {}: {why}",
            culprit(opt, source)
        )))
    };

    if c.max_restart_delay < c.restart_delay {
        let (first, max) = (
            format_duration(c.restart_delay),
            format_duration(c.max_restart_delay),
        );
        let source = sources.of(&MAX_RESTART_DELAY);
        return if *source == Source::Default {
            fail(
                &RESTART_DELAY.spec,
                sources.of(&RESTART_DELAY),
                format!("{first} is longer than max_restart_delay ({max})"),
            )
        } else {
            fail(
                &MAX_RESTART_DELAY.spec,
                source,
                format!("{max} is shorter than restart_delay ({first})"),
            )
        };
    }

    let port_source = sources.of(&PORT);
    if c.port_increment && c.balance != Mode::None {
        return fail(
            &PORT_INCREMENT.spec,
            sources.of(&PORT_INCREMENT),
            "port_increment needs --balance none (socket and proxy share one port)".into(),
        );
    }
    if c.ports.len() > 1 && c.balance != Mode::Socket {
        return fail(
            &PORT.spec,
            port_source,
            format!(
                "a list of ports needs --balance socket ({} mode serves one port)",
                c.balance.name()
            ),
        );
    }
    if c.port_increment && usize::from(c.port) + c.instances - 1 > usize::from(u16::MAX) {
        let (opt, source) = match port_source {
            Source::Default => (&PORT_INCREMENT.spec, sources.of(&PORT_INCREMENT)),
            _ => (&PORT.spec, port_source),
        };
        return fail(
            opt,
            source,
            format!(
                "{} workers from port {} would go past 65535",
                c.instances, c.port
            ),
        );
    }

    if let Some(addr) = c.metrics
        && c.balance != Mode::None
        && c.ports.contains(&addr.port())
        && (addr.ip() == c.host || addr.ip().is_unspecified() || c.host.is_unspecified())
    {
        return fail(
            &METRICS.spec,
            sources.of(&METRICS),
            format!("{addr} is the pool's own port ({}:{})", c.host, addr.port()),
        );
    }
    if c.min_ready > c.instances {
        return fail(
            &MIN_READY.spec,
            sources.of(&MIN_READY),
            format!(
                "{} ready workers asked for, but the pool has {} (instances), so it could never \
                 be ready",
                c.min_ready, c.instances
            ),
        );
    }

    // Outside proxy mode they mean nothing; a default value (as `--print-config` writes it back)
    // passes, another is a mistake to report.
    if c.balance != Mode::Proxy {
        let default_idle = Some(Duration::from_secs(60));
        for (set, opt, source) in [
            (
                c.max_connections.is_some(),
                &MAX_CONNECTIONS.spec,
                sources.of(&MAX_CONNECTIONS),
            ),
            (
                c.idle_timeout != default_idle,
                &IDLE_TIMEOUT.spec,
                sources.of(&IDLE_TIMEOUT),
            ),
        ] {
            if set {
                return fail(
                    opt,
                    source,
                    format!(
                        "{} applies to --balance proxy only (corepool relays no connection in {} \
                         mode)",
                        opt.key,
                        c.balance.name()
                    ),
                );
            }
        }
    }

    if c.ready_on == ReadyOn::Message && c.balance != Mode::Socket {
        return fail(
            &READY_ON.spec,
            sources.of(&READY_ON),
            "ready_on = message needs --balance socket (the Node preload that hears \
             process.send('ready') runs in socket mode only)"
                .into(),
        );
    }

    if c.sticky && c.balance == Mode::None {
        return fail(
            &STICKY.spec,
            sources.of(&STICKY),
            "sticky = ip needs --balance socket or proxy (corepool routes no connection in none \
             mode)"
                .into(),
        );
    }
    Ok(())
}
