//! A reserve of file descriptors, so that starting a worker never fails because corepool's own
//! descriptor table is full.
//!
//! corepool holds `SIZE` descriptors of /dev/null (close-on-exec, so no worker sees them). When
//! a worker start fails with EMFILE or ENFILE, the pool releases the reserve and tries once more:
//! a start needs about ten descriptors (pipes for output and the exec report, /dev/null for
//! stdin), and the reserve frees more than that. The reserve is topped up again after every start
//! and as soon as descriptors come free.
//!
//! A start that still fails for want of resources (EMFILE, ENFILE, EAGAIN from fork, ENOMEM) is
//! corepool's trouble, not the application's: the pool retries it later without counting it
//! towards --max-restarts (see `is_resource_shortage`).

use std::fs::File;
use std::io;
use std::sync::Mutex;

/// How many descriptors are held back.
pub const SIZE: usize = 16;

static RESERVE: Mutex<Vec<File>> = Mutex::new(Vec::new());

/// Opens /dev/null until the reserve holds `SIZE` descriptors, or the table is full.
pub fn refill() {
    let mut held = RESERVE.lock().unwrap_or_else(|p| p.into_inner());
    while held.len() < SIZE {
        match File::open("/dev/null") {
            Ok(file) => held.push(file),
            Err(err) => {
                tracing::debug!("descriptor reserve at {} of {SIZE}: {err}", held.len());
                return;
            }
        }
    }
}

/// Closes every reserved descriptor; returns how many were freed.
pub fn release() -> usize {
    let mut held = RESERVE.lock().unwrap_or_else(|p| p.into_inner());
    let freed = held.len();
    held.clear();
    freed
}

/// How many descriptors the reserve holds now.
pub fn held() -> usize {
    RESERVE.lock().unwrap_or_else(|p| p.into_inner()).len()
}

/// The descriptor table (corepool's or the system's) is full.
pub fn is_fd_shortage(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// A failure of corepool's own resources rather than of the program it starts: no descriptor,
/// no process (fork's EAGAIN: a pids or process limit), no memory.
pub fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::EAGAIN | libc::ENOMEM)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_and_releases() {
        refill();
        assert_eq!(held(), SIZE);
        assert_eq!(release(), SIZE);
        assert_eq!(held(), 0);
        refill();
        assert_eq!(held(), SIZE);
    }

    #[test]
    fn classifies_errors() {
        let e = |n| io::Error::from_raw_os_error(n);
        assert!(is_fd_shortage(&e(libc::EMFILE)) && is_fd_shortage(&e(libc::ENFILE)));
        assert!(!is_fd_shortage(&e(libc::EAGAIN)));
        assert!(is_resource_shortage(&e(libc::EAGAIN)) && is_resource_shortage(&e(libc::ENOMEM)));
        assert!(!is_resource_shortage(&e(libc::ENOENT)));
    }
}
