//! The options of corepool itself (`Scope::Global`): logs, the metrics endpoint, readiness
//! and stop; one value for the whole container.

use super::{Opt, OptSpec, Scope};
use crate::config::values::*;
use crate::logs::LogFormat;
use crate::units::parse_duration;
use std::net::SocketAddr;
use std::time::Duration;
use tracing::level_filters::LevelFilter;

pub const LOG_FORMAT: Opt<LogFormat> = Opt {
    spec: OptSpec {
        key: "log_format",
        long: "log-format",
        short: None,
        env: "COREPOOL_LOG_FORMAT",
        fallback_env: None,
        switch: false,
        value_name: "raw|prefix|json",
        default: "raw",
        help: "How worker lines and corepool's own messages are written",
        scope: Scope::Global,
    },
    parse: LogFormat::parse,
    render: render_log_format,
};

pub const LOG_LEVEL: Opt<LevelFilter> = Opt {
    spec: OptSpec {
        key: "log_level",
        long: "log-level",
        short: None,
        env: "COREPOOL_LOG_LEVEL",
        fallback_env: None,
        switch: false,
        value_name: "LEVEL",
        default: "info",
        help: "corepool's own verbosity: error, warn, info, debug, trace or off",
        scope: Scope::Global,
    },
    parse: parse_log_level,
    render: render_log_level,
};

pub const METRICS: Opt<Option<SocketAddr>> = Opt {
    spec: OptSpec {
        key: "metrics",
        long: "metrics",
        short: None,
        env: "COREPOOL_METRICS",
        fallback_env: None,
        switch: false,
        value_name: "ADDR",
        default: "off",
        help: "Serve /metrics, /healthz and /readyz on this address (e.g. :9100, 127.0.0.1:9100)",
        scope: Scope::Global,
    },
    parse: parse_metrics_addr,
    render: render_metrics,
};

pub const MIN_READY: Opt<usize> = Opt {
    spec: OptSpec {
        key: "min_ready",
        long: "min-ready",
        short: None,
        env: "COREPOOL_MIN_READY",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "1",
        help: "/readyz answers 200 only while at least this many workers are ready",
        scope: Scope::Global,
    },
    parse: parse_batch,
    render: render_usize,
};

pub const SHUTDOWN_DELAY: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "shutdown_delay",
        long: "shutdown-delay",
        short: None,
        env: "COREPOOL_SHUTDOWN_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "0s",
        help: "On SIGTERM, fail /readyz at once but keep serving this long before stopping",
        scope: Scope::Global,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const ONLY: Opt<Option<Vec<String>>> = Opt {
    spec: OptSpec {
        key: "only",
        long: "only",
        short: None,
        env: "COREPOOL_ONLY",
        fallback_env: None,
        switch: false,
        value_name: "POOL[,POOL...]",
        default: "all",
        help: "With [pool.NAME] tables in the config file: run only these pools \
               (pm2-runtime's --only)",
        scope: Scope::Global,
    },
    parse: crate::config::pools::parse_only,
    render: crate::config::pools::render_only,
};
