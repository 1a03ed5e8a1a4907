//! Scaling at run time: `corepool scale [POOL] N|+K|-K|auto` over the control socket, and the
//! CPU follow (a derived worker count re-read from the cgroup quota and the affinity).
//!
//! This module parses the request and holds the scale's own state: whether a manual scale
//! pinned the count (the CPU follow then leaves it alone until `corepool scale auto`), and a
//! scale that waits for the rolling reload under way. The supervisor applies a scale (`resize`): new
//! slots start and become ready as any worker does; removed slots (the highest first) drain
//! as a reload's old workers do.

/// The most workers a pool may run (`--instances`, `corepool scale`).
pub const MAX_WORKERS: usize = 4096;

/// How the worker count is to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Exactly this many.
    To(usize),
    /// This many more.
    Up(usize),
    /// This many fewer.
    Down(usize),
    /// Un-pin: back to the count `--instances` gives (from the CPUs now, for `max` and `-K`).
    Auto,
}

impl Change {
    pub fn parse(text: &str) -> Result<Change, String> {
        let t = text.trim();
        if t == "auto" {
            return Ok(Change::Auto);
        }
        let bad = || {
            format!("'{t}' is not a worker count: N (1..={MAX_WORKERS}), +K, -K, or auto (un-pin)")
        };
        let number = |digits: &str| -> Result<usize, String> {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            digits.parse().map_err(|_| bad())
        };
        if let Some(k) = t.strip_prefix('+') {
            Ok(Change::Up(number(k)?))
        } else if let Some(k) = t.strip_prefix('-') {
            Ok(Change::Down(number(k)?))
        } else {
            match number(t)? {
                n @ 1..=MAX_WORKERS => Ok(Change::To(n)),
                n => Err(format!(
                    "{n} workers: a pool runs 1 to {MAX_WORKERS} (corepool scale N)"
                )),
            }
        }
    }

    /// The count this change asks for, from `current`; an error when it leaves 1..=MAX.
    /// None for `Auto` (the pool knows what that comes to).
    pub fn target(self, current: usize) -> Option<Result<usize, String>> {
        let wanted = match self {
            Change::Auto => return None,
            Change::To(n) => Some(n),
            Change::Up(k) => current.checked_add(k),
            Change::Down(k) => current.checked_sub(k),
        };
        Some(match wanted {
            Some(n @ 1..=MAX_WORKERS) => Ok(n),
            _ => Err(format!(
                "{self} from {current} workers leaves 1..={MAX_WORKERS}: a pool runs 1 to \
                 {MAX_WORKERS} workers"
            )),
        })
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::To(n) => write!(f, "{n}"),
            Change::Up(k) => write!(f, "+{k}"),
            Change::Down(k) => write!(f, "-{k}"),
            Change::Auto => f.write_str("auto"),
        }
    }
}

/// A scale request, as the client parses its arguments and the control socket carries it:
/// `scale [POOL] CHANGE`. No pool means the pool (the only one, until several pools exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub pool: Option<String>,
    pub change: Change,
}

impl Request {
    /// From the words after `scale`.
    pub fn parse(words: &[&str]) -> Result<Request, String> {
        let (pool, change) = match words {
            [change] => (None, change),
            [pool, change] => {
                let ok = !pool.is_empty()
                    && pool.len() <= 64
                    && pool
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if !ok {
                    return Err(format!(
                        "'{pool}' is not a pool name (letters, digits, - and _)"
                    ));
                }
                (Some(pool.to_string()), change)
            }
            [] => return Err("a worker count is missing (N, +K, -K or auto)".into()),
            _ => return Err("too many arguments (scale [POOL] N|+K|-K|auto)".into()),
        };
        Ok(Request {
            pool,
            change: Change::parse(change)?,
        })
    }

    /// The request line for the control socket.
    pub fn line(&self) -> String {
        match &self.pool {
            Some(pool) => format!("scale {pool} {}", self.change),
            None => format!("scale {}", self.change),
        }
    }
}

/// Who asked for a scale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// `corepool scale N|+K|-K`: pins the count.
    Manual,
    /// `corepool scale auto`: un-pins, and goes to the derived count.
    Unpin,
    /// The CPU follow, with why (the CPU report): ignored while pinned.
    Cpu(String),
}

impl Origin {
    /// Why the count changes, for the log.
    pub fn why(&self) -> String {
        match self {
            Origin::Manual => "corepool scale".to_string(),
            Origin::Unpin => "corepool scale auto".to_string(),
            Origin::Cpu(why) => why.clone(),
        }
    }
}

/// What to do with a scale request now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Change the slots to this many now.
    Apply(usize),
    /// Nothing to change: the pool has that many already.
    Same,
    /// A rolling reload runs: this count is applied once it is over.
    Queued(usize),
    /// Pinned by a manual scale: the CPU follow changes nothing.
    Pinned,
    /// Refused, with why.
    Refused(String),
}

/// The scale's state: the pin and a scale waiting for the reload.
#[derive(Debug, Default)]
pub struct Scaling {
    pinned: bool,
    /// A count to apply once the rolling reload under way is over, and why.
    pending: Option<(usize, String)>,
    /// `--min-ready`: a manual scale below it is refused, the CPU follow is clamped to it.
    min_ready: usize,
}

impl Scaling {
    pub fn new(min_ready: usize) -> Scaling {
        Scaling {
            min_ready,
            ..Scaling::default()
        }
    }

    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    /// Decides on a request for `target` workers while the pool has `current` and `reloading`
    /// says whether a rolling reload runs.
    pub fn decide(
        &mut self,
        target: usize,
        origin: &Origin,
        current: usize,
        reloading: bool,
    ) -> Decision {
        if !(1..=MAX_WORKERS).contains(&target) {
            return Decision::Refused(format!("{target} workers: a pool runs 1 to {MAX_WORKERS}"));
        }
        let mut target = target;
        match origin {
            Origin::Manual | Origin::Unpin if target < self.min_ready => {
                return Decision::Refused(format!(
                    "{target} workers is below --min-ready {}: /readyz could never pass; lower \
                     --min-ready first",
                    self.min_ready
                ));
            }
            Origin::Manual => self.pinned = true,
            Origin::Unpin => self.pinned = false,
            Origin::Cpu(_) if self.pinned => return Decision::Pinned,
            Origin::Cpu(_) => target = target.max(self.min_ready),
        }
        if reloading {
            self.pending = Some((target, origin.why()));
            return Decision::Queued(target);
        }
        self.pending = None;
        if target == current {
            Decision::Same
        } else {
            Decision::Apply(target)
        }
    }

    /// The scale waiting for the reload, once no reload runs.
    pub fn due(&mut self, reloading: bool) -> Option<(usize, String)> {
        if reloading {
            return None;
        }
        self.pending.take()
    }

    /// The pool stops: nothing waits any more.
    pub fn cancel(&mut self) {
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_counts_and_changes() {
        assert_eq!(Change::parse("3"), Ok(Change::To(3)));
        assert_eq!(Change::parse("+2"), Ok(Change::Up(2)));
        assert_eq!(Change::parse("-1"), Ok(Change::Down(1)));
        assert_eq!(Change::parse("auto"), Ok(Change::Auto));
        for bad in ["0", "4097", "x", "+", "-", "+-1", "1.5", "", " +1x", "++1"] {
            assert!(Change::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Change::Up(2).target(3), Some(Ok(5)));
        assert_eq!(Change::Down(2).target(3), Some(Ok(1)));
        assert!(matches!(Change::Down(3).target(3), Some(Err(_))));
        assert!(matches!(Change::Up(usize::MAX).target(3), Some(Err(_))));
        assert!(matches!(Change::Up(4094).target(3), Some(Err(_))));
        assert_eq!(Change::Auto.target(3), None);
    }

    #[test]
    fn requests_name_an_optional_pool() {
        let r = Request::parse(&["+1"]).unwrap();
        assert_eq!((r.pool, r.change), (None, Change::Up(1)));
        let r = Request::parse(&["web", "4"]).unwrap();
        assert_eq!(r.line(), "scale web 4");
        assert_eq!(Request::parse(&["-2"]).unwrap().line(), "scale -2");
        assert!(Request::parse(&[]).is_err());
        assert!(Request::parse(&["a", "b", "c"]).is_err());
        assert!(Request::parse(&["we b", "1"]).is_err());
        assert!(Request::parse(&["web", "zero"]).is_err());
    }

    #[test]
    fn a_manual_scale_pins_and_auto_unpins() {
        let mut s = Scaling::new(1);
        let cpu = Origin::Cpu("quota".into());
        assert_eq!(s.decide(3, &cpu, 2, false), Decision::Apply(3));
        assert_eq!(s.decide(4, &Origin::Manual, 3, false), Decision::Apply(4));
        assert!(s.is_pinned());
        assert_eq!(s.decide(1, &cpu, 4, false), Decision::Pinned);
        assert_eq!(s.decide(2, &Origin::Unpin, 4, false), Decision::Apply(2));
        assert!(!s.is_pinned());
        assert_eq!(s.decide(2, &cpu, 2, false), Decision::Same);
    }

    #[test]
    fn min_ready_refuses_a_manual_scale_and_clamps_the_cpu_follow() {
        let mut s = Scaling::new(2);
        assert!(matches!(
            s.decide(1, &Origin::Manual, 3, false),
            Decision::Refused(_)
        ));
        assert!(!s.is_pinned());
        let cpu = Origin::Cpu("quota".into());
        assert_eq!(s.decide(1, &cpu, 3, false), Decision::Apply(2));
        assert!(matches!(
            s.decide(0, &Origin::Manual, 3, false),
            Decision::Refused(_)
        ));
    }

    #[test]
    fn a_scale_during_a_reload_waits_for_it() {
        let mut s = Scaling::new(1);
        assert_eq!(s.decide(3, &Origin::Manual, 2, true), Decision::Queued(3));
        assert_eq!(s.due(true), None);
        assert_eq!(s.decide(4, &Origin::Manual, 2, true), Decision::Queued(4));
        assert_eq!(s.due(false), Some((4, "corepool scale".into())));
        assert_eq!(s.due(false), None);
        s.decide(5, &Origin::Manual, 2, true);
        s.cancel();
        assert_eq!(s.due(false), None);
    }
}
