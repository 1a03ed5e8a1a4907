//! User: `--user USER[:GROUP]`, the identity the workers run under.
//!
//! corepool may need root (to load the eBPF steering, to bind port 80) while the application
//! should not have it, as pm2's `uid`/`gid`, nginx's `user`, gosu and su-exec arrange. The user
//! and group are looked up once, at start, in /etc/passwd and /etc/group (a name that is not
//! there is a configuration error naming the flag, variable or file line). A number needs no
//! entry: like `docker --user`, a uid without one runs with gid = uid unless `:GROUP` says
//! otherwise, HOME=/ and no supplementary groups.
//!
//! Everything is computed here, before any fork: the child of `launch` only makes the three
//! system calls `setgroups`, `setgid`, `setuid` (in that order: once the uid is dropped, the
//! groups can no longer be changed) on these numbers. The worker's HOME is the user's home
//! (as gosu and su-exec set it), USER and LOGNAME its name.

use nix::unistd::{Gid, Group, Uid, User};
use std::ffi::CString;

/// Who the workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The value as written (`nobody`, `1000:1000`), for messages and `--print-config`.
    pub spec: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups: the user's from /etc/group (with `gid`), or `[gid]` alone when a
    /// group was given or the uid has no passwd entry.
    pub groups: Vec<libc::gid_t>,
    /// The passwd name, when the uid has an entry.
    pub name: Option<String>,
    /// HOME for the workers: the passwd home, or `/` without an entry.
    pub home: String,
    /// Whether the child must change its credentials: false when corepool, not root, already
    /// is this user and group.
    pub switch: bool,
}

impl RunAs {
    /// Variables the worker gets: HOME always, USER and LOGNAME when the user has a name
    /// (`None`: remove the inherited one, which names corepool's user).
    pub fn env(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("HOME", Some(self.home.clone())),
            ("USER", self.name.clone()),
            ("LOGNAME", self.name.clone()),
        ]
    }

    /// For messages: `nobody (uid 65534, gid 65534)`.
    pub fn describe(&self) -> String {
        format!("{} (uid {}, gid {})", shown(&self.spec), self.uid, self.gid)
    }
}

/// A name as written, with control characters escaped: errors stay on one line.
fn shown(text: &str) -> String {
    text.escape_debug().to_string()
}

fn number(text: &str) -> Option<u32> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // (uid_t)-1 means "no change" to setuid/setgid: not an identity.
    text.parse().ok().filter(|&n| n != u32::MAX)
}

/// Parses `off`, `USER`, `USER:GROUP`, `UID`, `UID:GID` (names or numbers), looking names up
/// in /etc/passwd and /etc/group. Refuses another user when corepool is not root.
pub fn parse_user(text: &str) -> Result<Option<RunAs>, String> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let (user, group) = match t.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (t, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!("'{}' is not USER or USER:GROUP", shown(t)));
    }
    let passwd_error = |err: nix::Error| format!("cannot read /etc/passwd: {}", err.desc());
    let (entry, uid) = match number(user) {
        Some(uid) => (
            User::from_uid(Uid::from_raw(uid)).map_err(passwd_error)?,
            uid,
        ),
        None if user.bytes().all(|b| b.is_ascii_digit()) => {
            return Err(format!("'{}' is not a valid uid", shown(user)));
        }
        None => {
            let entry = User::from_name(user)
                .map_err(passwd_error)?
                .ok_or_else(|| format!("no user '{}' in /etc/passwd", shown(user)))?;
            let uid = entry.uid.as_raw();
            (Some(entry), uid)
        }
    };
    let gid = match group {
        Some(group) => match number(group) {
            Some(gid) => gid,
            None if group.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("'{}' is not a valid gid", shown(group)));
            }
            None => Group::from_name(group)
                .map_err(|err| format!("cannot read /etc/group: {}", err.desc()))?
                .ok_or_else(|| format!("no group '{}' in /etc/group", shown(group)))?
                .gid
                .as_raw(),
        },
        None => entry.as_ref().map_or(uid, |e| e.gid.as_raw()),
    };
    let groups = match (&entry, group) {
        (Some(entry), None) => {
            let name = CString::new(entry.name.as_bytes())
                .map_err(|_| format!("user '{}' has a NUL in its name", shown(&entry.name)))?;
            nix::unistd::getgrouplist(&name, Gid::from_raw(gid))
                .map_err(|err| {
                    format!(
                        "cannot list the groups of '{}' in /etc/group: {}",
                        shown(&entry.name),
                        err.desc()
                    )
                })?
                .into_iter()
                .map(Gid::as_raw)
                .collect()
        }
        _ => vec![gid],
    };
    let home = entry
        .as_ref()
        .map(|e| e.dir.to_string_lossy().into_owned())
        .filter(|dir| !dir.is_empty())
        .unwrap_or_else(|| "/".into());
    let (euid, egid) = (Uid::effective().as_raw(), Gid::effective().as_raw());
    let switch = euid == 0 || (uid, gid) != (euid, egid);
    if euid != 0 && switch {
        return Err(format!(
            "corepool runs as uid {euid} gid {egid}, not root, so it cannot start workers as \
             {} (uid {uid}, gid {gid}): run corepool as root, or drop --user",
            shown(t)
        ));
    }
    Ok(Some(RunAs {
        spec: t.to_string(),
        uid,
        gid,
        groups,
        name: entry.map(|e| e.name),
        home,
        switch,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(parse_user("off"), Ok(None));
        let root = parse_user("0").unwrap().unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.name.as_deref(), Some("root"));
        let by_name = parse_user("root").unwrap().unwrap();
        assert_eq!(by_name.uid, 0);
        assert!(by_name.groups.contains(&0));
        for bad in ["", ":", "root:", ":0", "4294967295", "99999999999"] {
            assert!(parse_user(bad).is_err(), "{bad:?} should be refused");
        }
        let err = parse_user("no-such-user-xyz").unwrap_err();
        assert_eq!(err, "no user 'no-such-user-xyz' in /etc/passwd");
        let err = parse_user("root:no-such-group-xyz").unwrap_err();
        assert_eq!(err, "no group 'no-such-group-xyz' in /etc/group");
        let err = parse_user("a\nb").unwrap_err();
        assert_eq!(err, "no user 'a\\nb' in /etc/passwd");
    }

    #[test]
    fn a_uid_without_entry_gets_its_own_gid() {
        if !Uid::effective().is_root() {
            // Not root: another uid is refused instead (checked by tests/user.rs as root).
            assert!(parse_user("4242").is_err());
            return;
        }
        let lone = parse_user("4242").unwrap().unwrap();
        assert_eq!(
            (lone.uid, lone.gid, lone.groups.clone()),
            (4242, 4242, vec![4242])
        );
        assert_eq!(lone.name, None);
        assert_eq!(lone.home, "/");
        let grouped = parse_user("4242:77").unwrap().unwrap();
        assert_eq!((grouped.gid, grouped.groups), (77, vec![77]));
    }
}
