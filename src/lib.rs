//! corepool as a library: the modules behind the `corepool` binary, public so that tests, fuzz
//! targets and benchmarks can drive each piece on its own.
//!
//! Where a behaviour lives:
//! - `config`: flags, `COREPOOL_*` variables, the TOML file, `--print-config`: `options` declares
//!   each option once (typed, with its scope), `resolve` applies precedence, `file` reads TOML,
//!   `validate` checks options together, `env` is every read of the environment, `pools` the
//!   `[pool.NAME]` tables, `--only`, `oneshot`/`after`/`cpu_share`;
//! - `fatal`: the one error that ends corepool early, with its exit code;
//! - `cgroup`: usable CPUs and the memory limit, from cgroup v1/v2 and CPU affinity;
//! - `signals`: which signals are caught and what each means;
//! - `reaper`: the one `waitpid(-1)` loop;
//! - `worker`: a slot's lifecycle state machine, and how a worker process is started;
//! - `balance`: one public port for the pool, one type per mode (`balance/socket/`,
//!   `balance/proxied.rs`; `balance/ports.rs` binds the port and keeps it the pool's alone);
//! - `readiness`: how a worker says it is ready (ready pipe, sd_notify socket);
//! - `node`: the Node preload, the Node version probe, NODE_OPTIONS and the heap share; the
//!   preload's own parts are `src/preload/*.cjs` (start, adopt, ports, ready, drain);
//! - `steer`: socket mode's round robin (or `--sticky ip` hash) over the slot sockets (an eBPF
//!   reuseport program; a classic BPF one for `--sticky ip` where eBPF is not allowed);
//! - `launch`: fork and exec of a worker, and command resolution;
//! - `limits`: the descriptor limit raised for corepool, restored for its workers;
//! - `proxy`: `--balance proxy`: private ports, readiness probes, least connections;
//! - `relay`: the bytes of one proxied connection, moved by splice(2);
//! - `metrics`: /metrics, /healthz, /readyz and process-group usage; `metrics::health`: the
//!   `corepool health` client;
//! - `control`: `corepool status` and `corepool reload [POOL]` over an abstract unix socket,
//!   server and client;
//! - `pool`: the supervisor loop: wait, reap, dispatch to the core, publish;
//! - `fleet`: several named pools driven by that loop: exits and readiness to their pool,
//!   signals to all, `oneshot`/`after`, a dead pool stops the container;
//! - `supervisor`: the core's decisions (start, restart, forward, stop), with no process or
//!   clock of its own; `os`: its edge with the OS (real, and a fake for unit tests);
//! - `slots`: the slots and which pid plays which role; `replace`: replacement processes,
//!   asked for by `reload` (the rolling reload) and `memory` (`--max-memory`);
//! - `scale`: `corepool scale` and the CPU follow (parsing, the pin, a scale waiting for a
//!   reload); `resize`: applying one to the slots;
//! - `drain`: stop signal, kill timeout and SIGKILL; `ending`: shutdown delay, stop, exit code;
//! - `logs`: worker output and corepool's own messages, a whole line at a time;
//! - `exit`: exit codes;
//! - `units`: durations and sizes as users write them;
//! - `user`: `--user`, the identity the workers run under;
//! - `reserve`: spare descriptors, so that a worker start never fails for want of one.

pub mod balance;
pub mod cgroup;
pub mod config;
pub mod control;
pub mod drain;
pub mod ending;
pub mod exit;
pub mod fatal;
pub mod fleet;
pub mod launch;
pub mod limits;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod os;
pub mod pool;
pub mod proxy;
pub mod readiness;
pub mod reaper;
pub mod relay;
pub mod reload;
pub mod replace;
pub mod reserve;
pub mod resize;
pub mod scale;
pub mod signals;
pub mod slots;
pub mod starts;
pub mod steer;
pub mod supervisor;
pub mod units;
pub mod user;
pub mod worker;
