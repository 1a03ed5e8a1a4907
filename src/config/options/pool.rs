//! The options of how a pool's workers run and serve (`Scope::Pool`): settable per pool in a
//! `[pool.NAME]` table, the top-level key being every pool's default.

use super::{Opt, OptSpec, Scope};
use crate::config::values::*;
use crate::units::parse_duration;
use crate::user::{RunAs, parse_user};
use crate::worker::RestartPolicy;
use nix::sys::signal::Signal;
use std::net::IpAddr;
use std::time::Duration;

pub const INSTANCES: Opt<Instances> = Opt {
    spec: OptSpec {
        key: "instances",
        long: "instances",
        short: Some('i'),
        env: "COREPOOL_INSTANCES",
        fallback_env: Some("WEB_CONCURRENCY"),
        switch: false,
        value_name: "N|max|-K",
        default: "max",
        help: "Workers to run: a number, `max` (usable CPUs) or `-K` (usable CPUs minus K). \
                   Falls back to WEB_CONCURRENCY",
        scope: Scope::Pool,
    },
    parse: Instances::parse,
    render: render_instances,
};

pub const KILL_TIMEOUT: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "kill_timeout",
        long: "kill-timeout",
        short: None,
        env: "COREPOOL_KILL_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "10s",
        help: "How long a stopping worker's process group may take before SIGKILL",
        scope: Scope::Pool,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const STOP_SIGNAL: Opt<Signal> = Opt {
    spec: OptSpec {
        key: "stop_signal",
        long: "stop-signal",
        short: None,
        env: "COREPOOL_STOP_SIGNAL",
        fallback_env: None,
        switch: false,
        value_name: "SIGNAL",
        default: "SIGTERM",
        help: "Signal sent to a worker's process group to stop it",
        scope: Scope::Pool,
    },
    parse: parse_stop_signal,
    render: render_signal,
};

pub const RESTART: Opt<RestartPolicy> = Opt {
    spec: OptSpec {
        key: "restart",
        long: "restart",
        short: None,
        env: "COREPOOL_RESTART",
        fallback_env: None,
        switch: false,
        value_name: "always|on-failure|never",
        default: "always",
        help: "When an exited worker is started again",
        scope: Scope::Pool,
    },
    parse: RestartPolicy::parse,
    render: render_restart,
};

pub const RESTART_DELAY: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "restart_delay",
        long: "restart-delay",
        short: None,
        env: "COREPOOL_RESTART_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "100ms",
        help: "First restart backoff; doubles with each consecutive short-lived exit",
        scope: Scope::Pool,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const MAX_RESTART_DELAY: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "max_restart_delay",
        long: "max-restart-delay",
        short: None,
        env: "COREPOOL_MAX_RESTART_DELAY",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "15s",
        help: "Longest restart backoff",
        scope: Scope::Pool,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const MIN_UPTIME: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "min_uptime",
        long: "min-uptime",
        short: None,
        env: "COREPOOL_MIN_UPTIME",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "1s",
        help: "A worker that lived this long resets its backoff and failure count",
        scope: Scope::Pool,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const MAX_RESTARTS: Opt<u32> = Opt {
    spec: OptSpec {
        key: "max_restarts",
        long: "max-restarts",
        short: None,
        env: "COREPOOL_MAX_RESTARTS",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "16",
        help: "Consecutive short-lived exits after which a worker slot is given up (0: never)",
        scope: Scope::Pool,
    },
    parse: parse_count,
    render: render_u32,
};

pub const FAIL_FAST: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "fail_fast",
        long: "fail-fast",
        short: None,
        env: "COREPOOL_FAIL_FAST",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "10s",
        help: "While no worker has ever served, a failing slot is given up once this long has \
                   passed since start, so an app that cannot start ends the pool fast (0: only \
                   --max-restarts gives up)",
        scope: Scope::Pool,
    },
    parse: parse_duration,
    render: render_duration,
};

pub const PORT: Opt<Vec<u16>> = Opt {
    spec: OptSpec {
        key: "port",
        long: "port",
        short: Some('p'),
        env: "COREPOOL_PORT",
        fallback_env: Some("PORT"),
        switch: false,
        value_name: "PORT[,PORT...]",
        default: "3000",
        help: "The public port every worker serves, or a list (3000,4041): each port is shared \
                   by all workers, the first is the one readiness waits for. Falls back to PORT",
        scope: Scope::Pool,
    },
    parse: parse_ports,
    render: render_ports,
};

pub const HOST: Opt<IpAddr> = Opt {
    spec: OptSpec {
        key: "host",
        long: "host",
        short: None,
        env: "COREPOOL_HOST",
        fallback_env: None,
        switch: false,
        value_name: "ADDR",
        default: "0.0.0.0",
        help: "The public address to listen on (an IPv4 or IPv6 address)",
        scope: Scope::Pool,
    },
    parse: parse_host,
    render: render_host,
};

pub const BALANCE: Opt<Mode> = Opt {
    spec: OptSpec {
        key: "balance",
        long: "balance",
        short: None,
        env: "COREPOOL_BALANCE",
        fallback_env: None,
        switch: false,
        value_name: "socket|proxy|none",
        default: "socket",
        help: "How workers share the port: one socket handed to all (socket), a relay to private \
                   ports (proxy), or not at all (none)",
        scope: Scope::Pool,
    },
    parse: Mode::parse,
    render: render_mode,
};

pub const READY_TIMEOUT: Opt<Duration> = Opt {
    spec: OptSpec {
        key: "ready_timeout",
        long: "ready-timeout",
        short: None,
        env: "COREPOOL_READY_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION",
        default: "30s",
        help: "A worker not ready (accepting connections) this long after its start is restarted",
        scope: Scope::Pool,
    },
    parse: parse_positive_duration,
    render: render_duration,
};

pub const RELOAD_BATCH: Opt<usize> = Opt {
    spec: OptSpec {
        key: "reload_batch",
        long: "reload-batch",
        short: None,
        env: "COREPOOL_RELOAD_BATCH",
        fallback_env: None,
        switch: false,
        value_name: "N",
        default: "1",
        help: "Workers replaced at a time by a rolling reload (SIGHUP)",
        scope: Scope::Pool,
    },
    parse: parse_batch,
    render: render_usize,
};

pub const PORT_INCREMENT: Opt<bool> = Opt {
    spec: OptSpec {
        key: "port_increment",
        long: "port-increment",
        short: None,
        env: "COREPOOL_PORT_INCREMENT",
        fallback_env: None,
        switch: true,
        value_name: "BOOL",
        default: "false",
        help: "With --balance none: give each worker PORT=port+slot",
        scope: Scope::Pool,
    },
    parse: parse_bool,
    render: render_bool,
};

pub const HEAP_SHARE: Opt<bool> = Opt {
    spec: OptSpec {
        key: "heap_share",
        long: "heap-share",
        short: None,
        env: "COREPOOL_HEAP_SHARE",
        fallback_env: None,
        switch: false,
        value_name: "auto|off",
        default: "auto",
        help: "Under a cgroup memory limit, give each Node worker --max-old-space-size = \
                   70% of the limit / workers (unless NODE_OPTIONS sets it)",
        scope: Scope::Pool,
    },
    parse: parse_auto_off,
    render: render_auto_off,
};

pub const MAX_MEMORY: Opt<Option<u64>> = Opt {
    spec: OptSpec {
        key: "max_memory",
        long: "max-memory",
        short: None,
        env: "COREPOOL_MAX_MEMORY",
        fallback_env: None,
        switch: false,
        value_name: "SIZE",
        default: "off",
        help: "Replace, gracefully and one at a time, a worker whose process group stays above \
                   this RSS (e.g. 512MiB)",
        scope: Scope::Pool,
    },
    parse: parse_optional_size,
    render: render_optional_size,
};

pub const USER: Opt<Option<RunAs>> = Opt {
    spec: OptSpec {
        key: "user",
        long: "user",
        short: None,
        env: "COREPOOL_USER",
        fallback_env: None,
        switch: false,
        value_name: "USER[:GROUP]",
        default: "off",
        help: "Run the workers as this user (and group): names from /etc/passwd and /etc/group, \
                   or numbers. corepool itself stays root",
        scope: Scope::Pool,
    },
    parse: parse_user,
    render: render_user,
};

pub const MAX_CONNECTIONS: Opt<Option<usize>> = Opt {
    spec: OptSpec {
        key: "max_connections",
        long: "max-connections",
        short: None,
        env: "COREPOOL_MAX_CONNECTIONS",
        fallback_env: None,
        switch: false,
        value_name: "N|auto",
        default: "auto",
        help: "With --balance proxy: connections relayed at once; more wait in the listen \
                   backlog. auto: as many as the descriptor limit holds",
        scope: Scope::Pool,
    },
    parse: parse_max_connections,
    render: render_max_connections,
};

pub const IDLE_TIMEOUT: Opt<Option<Duration>> = Opt {
    spec: OptSpec {
        key: "idle_timeout",
        long: "idle-timeout",
        short: None,
        env: "COREPOOL_IDLE_TIMEOUT",
        fallback_env: None,
        switch: false,
        value_name: "DURATION|off",
        default: "60s",
        help: "With --balance proxy: close a connection on which no byte moved either way \
                   this long",
        scope: Scope::Pool,
    },
    parse: parse_idle_timeout,
    render: render_idle_timeout,
};

pub const READY_ON: Opt<ReadyOn> = Opt {
    spec: OptSpec {
        key: "ready_on",
        long: "ready-on",
        short: None,
        env: "COREPOOL_READY_ON",
        fallback_env: None,
        switch: false,
        value_name: "listen|message",
        default: "listen",
        help: "When a worker is ready: once it listens, or (socket mode) once it calls \
                   process.send('ready') (pm2's wait_ready)",
        scope: Scope::Pool,
    },
    parse: ReadyOn::parse,
    render: render_ready_on,
};

pub const STICKY: Opt<bool> = Opt {
    spec: OptSpec {
        key: "sticky",
        long: "sticky",
        short: None,
        env: "COREPOOL_STICKY",
        fallback_env: None,
        switch: false,
        value_name: "off|ip",
        default: "off",
        help: "ip: a client address always reaches the same worker slot while it is ready \
                   (socket.io's long-polling needs it)",
        scope: Scope::Pool,
    },
    parse: parse_sticky,
    render: render_sticky,
};

pub const CPU_WATCH: Opt<Option<Duration>> = Opt {
    spec: OptSpec {
        key: "cpu_watch",
        long: "cpu-watch",
        short: None,
        env: "COREPOOL_CPU_WATCH",
        fallback_env: None,
        switch: false,
        value_name: "DURATION|off",
        default: "5s",
        help: "With instances = max or -K: re-read the CPU quota and affinity this often (and \
                   on SIGHUP) and scale the pool to match. A fixed count never follows",
        scope: Scope::Pool,
    },
    parse: parse_idle_timeout,
    render: render_idle_timeout,
};

pub const START_CONCURRENCY: Opt<Option<usize>> = Opt {
    spec: OptSpec {
        key: "start_concurrency",
        long: "start-concurrency",
        short: None,
        env: "COREPOOL_START_CONCURRENCY",
        fallback_env: None,
        switch: false,
        value_name: "N|auto",
        default: "auto",
        help: "Workers started but not yet ready at once; the others queue (first start, \
                   restarts, scale-ups). auto: max(4, 2 x usable CPUs); 0: no bound",
        scope: Scope::Pool,
    },
    parse: parse_start_concurrency,
    render: render_start_concurrency,
};
