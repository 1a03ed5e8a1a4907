//! Exit codes: corepool's contract with whoever started it (Docker, Kubernetes, a shell).
//!
//! A pool that dies exits with the status of the last worker to die, as a shell reports it (the
//! code, or 128 + the signal), so the orchestrator's restart and its logs carry the real cause.

/// Graceful stop: every worker was gone before the kill timeout.
pub const STOPPED: i32 = 0;
/// Graceful stop in which some process group had to be killed with SIGKILL.
pub const KILLED: i32 = 1;
/// Usage or configuration error (flag, variable or file).
pub const USAGE: i32 = 2;
/// corepool could not set itself up (signal handlers, log threads, listening socket), or could
/// not start the first worker process (fork or pipe failed: EAGAIN, EMFILE); later starts that
/// fail so are retried (see `reserve`).
pub const STARTUP: i32 = 3;
/// The worker command is not executable, or is a directory.
pub const NOT_EXECUTABLE: i32 = 126;
/// The worker command was not found.
pub const NOT_FOUND: i32 = 127;
