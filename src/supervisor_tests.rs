//! The supervision core driven with `FakeOs` and a fake clock (times are offsets in
//! milliseconds from the start): no process, no sleep.

use super::*;
use crate::control::ReloadAnswer;
use crate::exit;
use crate::metrics::Usage;
use crate::os::fake::FakeOs;
use crate::scale::Origin;
use crate::slots::Cause;
use crate::worker::RestartPolicy;

const TERM: i32 = Signal::SIGTERM as i32;
const KILL: i32 = Signal::SIGKILL as i32;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pid(n: i32) -> Pid {
    Pid::from_raw(n)
}

/// The settings of the unit tests here and in `fleet`: short times, a small retry budget.
pub(crate) fn settings(instances: usize) -> Settings {
    Settings {
        rules: RestartRules {
            policy: RestartPolicy::Always,
            delay: ms(100),
            max_delay: ms(1000),
            min_uptime: ms(1000),
            max_restarts: 3,
            fail_fast: Duration::ZERO,
        },
        instances,
        ready_timeout: ms(500),
        reload_batch: 1,
        stop_signal: Signal::SIGTERM,
        kill_timeout: ms(300),
        shutdown_delay: Duration::ZERO,
        max_memory: None,
        needs_ready: true,
        handoff: Duration::ZERO,
        not_ready_hint: "test",
        program: "app".into(),
        min_ready: 1,
        scale_handoff: Duration::ZERO,
        start_concurrency: 0,
    }
}

/// The core, its fake world and the fake clock's origin.
struct Rig {
    core: Supervisor,
    os: FakeOs,
    t0: Instant,
}

impl Rig {
    fn new(s: Settings) -> Rig {
        let t0 = Instant::now();
        Rig {
            core: Supervisor::new(s, t0),
            os: FakeOs::default(),
            t0,
        }
    }

    fn at(&self, t: u64) -> Instant {
        self.t0 + ms(t)
    }

    /// One turn of the loop at `t`: reap, step, and the exit code if the pool is finished.
    fn turn(&mut self, t: u64) -> Option<i32> {
        let now = self.at(t);
        for exit in self.os.reap() {
            self.core.on_exit(exit, now, &mut self.os);
        }
        self.core.step(now, &mut self.os);
        self.core.outcome(now, &mut self.os)
    }

    fn ready(&mut self, p: i32, t: u64) {
        let now = self.at(t);
        self.core.on_ready(pid(p), now, &mut self.os);
    }

    fn signal(&mut self, action: Action, t: u64) {
        let now = self.at(t);
        self.core.on_signal(action, now, &mut self.os);
    }

    /// The current pid of each slot.
    fn pids(&self) -> Vec<Option<i32>> {
        self.core.slots(self.t0).iter().map(|s| s.pid).collect()
    }

    fn states(&self) -> Vec<&'static str> {
        self.core.slots(self.t0).iter().map(|s| s.state).collect()
    }
}

#[test]
fn reload_with_a_failing_replacement_keeps_the_old_workers() {
    let mut r = Rig::new(settings(2));
    r.turn(0);
    assert_eq!(r.pids(), vec![Some(101), Some(102)]);
    r.ready(101, 10);
    r.ready(102, 10);
    assert_eq!(r.core.reload_answer(), ReloadAnswer::Started);
    r.core.request_reload();
    r.turn(20);
    assert_eq!(
        r.core.role(pid(103)),
        Some(Role::Replacement(0, Cause::Reload))
    );
    // The replacement is ready: it takes slot 0, the old one gets the stop signal.
    r.ready(103, 30);
    assert_eq!(r.core.role(pid(103)), Some(Role::Current(0)));
    assert_eq!(r.core.role(pid(101)), Some(Role::Retiring(0)));
    assert_eq!(r.os.signals_to(Target::Group(pid(101))), vec![TERM]);
    r.turn(30);
    assert_eq!(
        r.core.role(pid(104)),
        Some(Role::Replacement(1, Cause::Reload))
    );
    // The old one exits; the second replacement dies before it is ready.
    r.os.exit(pid(101), ExitStatus::Code(0));
    r.os.exit(pid(104), ExitStatus::Code(1));
    r.turn(40);
    assert_eq!((r.core.role(pid(101)), r.core.role(pid(104))), (None, None));
    assert_eq!(r.pids(), vec![Some(103), Some(102)]);
    // The reload is over: nothing more is started, the old worker of slot 1 serves on.
    r.turn(600);
    assert_eq!(r.os.spawned.len(), 4);
    assert_eq!(r.core.reload_answer(), ReloadAnswer::Started);
    assert!(r.os.signals_to(Target::Group(pid(102))).is_empty());
    assert_eq!(r.core.counters(), (1, 0));
}

#[test]
fn a_replacement_that_never_gets_ready_is_stopped() {
    let mut r = Rig::new(settings(1));
    r.turn(0);
    r.ready(101, 10);
    r.core.request_reload();
    r.turn(20);
    assert_eq!(r.core.next_deadline(r.at(20)), Some(r.at(520)));
    r.turn(520);
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), vec![TERM]);
    assert_eq!(r.core.role(pid(102)), Some(Role::Retiring(0)));
    assert_eq!(r.pids(), vec![Some(101)]);
}

#[test]
fn crash_loop_gives_up_and_the_pool_dies() {
    let mut r = Rig::new(settings(1));
    r.turn(0);
    let mut t = 0;
    for (n, backoff) in [(101, 100), (102, 200)] {
        r.os.exit(pid(n), ExitStatus::Code(1));
        assert_eq!(r.turn(t + 10), None);
        assert_eq!(r.states(), vec!["waiting"]);
        t += 10 + backoff;
        r.turn(t);
        assert_eq!(r.pids(), vec![Some(n + 1)]);
    }
    r.os.exit(pid(103), ExitStatus::Code(1));
    assert_eq!(r.turn(t + 10), Some(1));
    assert_eq!(r.states(), vec!["given-up"]);
    assert_eq!(r.os.routing.last().map(String::as_str), Some("close"));
    assert!(r.os.routing.contains(&"abandon 0".to_string()));
}

#[test]
fn fail_fast_gives_up_once_the_window_is_over() {
    let mut s = settings(1);
    s.rules.max_restarts = 0;
    s.rules.fail_fast = ms(200);
    let mut r = Rig::new(s);
    r.turn(0);
    r.os.exit(pid(101), ExitStatus::Code(4));
    r.turn(10);
    r.turn(110);
    r.os.exit(pid(102), ExitStatus::Code(4));
    assert_eq!(r.turn(250), Some(4));
    assert_eq!(r.states(), vec!["given-up"]);
}

#[test]
fn a_failed_start_is_a_failure_and_no_pid_0_exists() {
    let mut r = Rig::new(settings(1));
    r.turn(0);
    r.os.exit(pid(101), ExitStatus::Code(1));
    r.turn(10);
    for _ in 0..2 {
        r.os.spawn_errors.push(std::io::ErrorKind::NotFound.into());
    }
    r.turn(110);
    assert_eq!((r.pids(), r.states()), (vec![None], vec!["waiting"]));
    assert_eq!(r.turn(310), Some(exit::NOT_FOUND));
    assert!(r.os.sent.iter().all(|(t, _)| *t != Target::Group(pid(0))));
}

#[test]
fn a_command_that_cannot_run_at_all_ends_the_pool() {
    let mut r = Rig::new(settings(2));
    r.os.spawn_errors
        .push(std::io::ErrorKind::PermissionDenied.into());
    assert_eq!(r.turn(0), Some(exit::NOT_EXECUTABLE));
    assert!(r.os.spawned.is_empty());
}

#[test]
fn kill_timeout_escalation_makes_the_stop_unclean() {
    let mut s = settings(1);
    s.needs_ready = false;
    let mut r = Rig::new(s);
    r.turn(0);
    r.signal(Action::Stop(Signal::SIGTERM), 10);
    assert_eq!(r.os.signals_to(Target::Group(pid(101))), vec![TERM]);
    assert_eq!(r.turn(300), None);
    assert_eq!(r.turn(310), None);
    assert_eq!(r.os.signals_to(Target::Group(pid(101))), vec![TERM, KILL]);
    r.os.exit(pid(101), ExitStatus::Signaled(9));
    assert_eq!(r.turn(320), Some(exit::KILLED));
}

#[test]
fn a_clean_stop_exits_0_and_sweeps_strays() {
    let mut s = settings(1);
    s.needs_ready = false;
    let mut r = Rig::new(s);
    r.turn(0);
    r.os.children.push(crate::os::Child {
        pid: pid(500),
        pgid: Some(pid(500)),
        zombie: false,
    });
    r.signal(Action::Stop(Signal::SIGINT), 10);
    assert_eq!(r.os.signals_to(Target::Process(pid(500))), vec![TERM]);
    r.os.children.clear();
    r.os.vanish(Target::Process(pid(500)));
    r.os.exit(pid(101), ExitStatus::Code(0));
    assert_eq!(r.turn(50), Some(exit::STOPPED));
}

#[test]
fn shutdown_delay_keeps_serving_then_stops() {
    let mut s = settings(1);
    s.needs_ready = false;
    s.shutdown_delay = ms(200);
    let mut r = Rig::new(s);
    r.turn(0);
    r.signal(Action::Stop(Signal::SIGTERM), 10);
    assert!(r.core.stopping());
    assert_eq!(r.core.next_deadline(r.at(10)), Some(r.at(210)));
    r.turn(100);
    assert!(r.os.sent.is_empty());
    assert!(r.core.slots(r.at(100))[0].ready);
    r.turn(210);
    assert_eq!(r.os.signals_to(Target::Group(pid(101))), vec![TERM]);
    assert_eq!(r.core.reload_answer(), ReloadAnswer::Stopping);
    r.os.exit(pid(101), ExitStatus::Code(0));
    assert_eq!(r.turn(220), Some(exit::STOPPED));
}

#[test]
fn memory_replacement_has_its_own_queue() {
    let mut s = settings(1);
    s.max_memory = Some(1 << 20);
    let mut r = Rig::new(s);
    r.turn(0);
    r.ready(101, 10);
    r.os.usage.insert(
        101,
        Usage {
            rss_bytes: 2 << 20,
            ..Usage::default()
        },
    );
    for t in [2000, 4000, 6000] {
        r.turn(t);
    }
    assert_eq!(
        r.core.role(pid(102)),
        Some(Role::Replacement(0, Cause::Memory))
    );
    assert_eq!(r.core.counters(), (0, 1));
    // It fails: the old worker serves on, and no reload was ever under way.
    r.os.exit(pid(102), ExitStatus::Code(1));
    r.turn(6010);
    assert_eq!(r.pids(), vec![Some(101)]);
    assert_eq!(r.core.reload_answer(), ReloadAnswer::Started);
}

#[test]
fn forwarded_signals_reach_every_live_group() {
    let mut r = Rig::new(settings(2));
    r.turn(0);
    r.ready(101, 10);
    r.core.request_reload();
    r.turn(20);
    r.signal(Action::Forward(libc::SIGUSR2), 30);
    let mut to: Vec<Target> = r.os.sent.iter().map(|&(t, _)| t).collect();
    to.sort_by_key(|t| format!("{t}"));
    let groups = [101, 102, 103].map(|n| Target::Group(pid(n)));
    assert_eq!(to, groups.to_vec());
}

impl Rig {
    fn scale(&mut self, target: usize, origin: Origin, t: u64) -> Result<String, String> {
        let now = self.at(t);
        self.core.scale(target, origin, now, &mut self.os)
    }
}

#[test]
fn scale_up_starts_new_slots_and_down_drains_the_highest() {
    let mut r = Rig::new(settings(2));
    r.turn(0);
    r.ready(101, 10);
    r.ready(102, 10);
    assert_eq!(
        r.scale(4, Origin::Manual, 20),
        Ok("scaling from 2 to 4 workers".into())
    );
    assert!(r.core.pinned());
    r.turn(20);
    assert_eq!(r.os.routing.last().map(String::as_str), Some("resize 4"));
    assert_eq!(r.pids(), vec![Some(101), Some(102), Some(103), Some(104)]);
    assert_eq!(r.os.spawned[2..], [(2, pid(103)), (3, pid(104))]);
    r.ready(103, 30);
    r.ready(104, 30);
    // Down by two: slots 3 then 2 leave, drained as a reload's old workers.
    r.scale(2, Origin::Manual, 40).unwrap();
    assert_eq!(r.pids(), vec![Some(101), Some(102)]);
    assert_eq!(r.core.role(pid(104)), Some(Role::Removed(3)));
    assert_eq!(r.core.role(pid(103)), Some(Role::Removed(2)));
    assert_eq!(r.os.signals_to(Target::Group(pid(104))), vec![TERM]);
    assert_eq!(r.os.signals_to(Target::Group(pid(103))), vec![TERM]);
    assert!(r.os.routing.contains(&"resize 2".to_string()));
    let forgets: Vec<&String> =
        r.os.routing
            .iter()
            .filter(|l| l.starts_with("forget"))
            .collect();
    assert_eq!(forgets, ["forget 104", "forget 103"]);
    // A removed worker that still reports readiness is not routed to.
    r.ready(104, 41);
    let readies = r.os.routing.iter().filter(|l| *l == "ready 104").count();
    assert_eq!(readies, 1);
    // One lingers: SIGKILL after the kill timeout, as for a reload's old worker.
    r.os.exit(pid(103), ExitStatus::Code(0));
    r.turn(50);
    assert_eq!(r.core.role(pid(103)), None);
    r.turn(340);
    assert_eq!(r.os.signals_to(Target::Group(pid(104))), vec![TERM, KILL]);
    // Nothing restarts the removed slots.
    r.turn(2000);
    assert_eq!(r.os.spawned.len(), 4);
    assert_eq!(r.core.configured(), 2);
}

#[test]
fn a_scale_during_a_reload_waits_for_it_and_a_reload_keeps_the_count() {
    let mut r = Rig::new(settings(2));
    r.turn(0);
    r.ready(101, 10);
    r.ready(102, 10);
    r.core.request_reload();
    r.turn(20); // replacement 103 for slot 0
    assert_eq!(
        r.scale(3, Origin::Manual, 25),
        Ok("a rolling reload is under way: the pool goes to 3 workers once it is over".into())
    );
    assert_eq!(r.core.configured(), 2);
    r.ready(103, 30);
    r.turn(30); // replacement 104 for slot 1
    r.ready(104, 40);
    r.turn(40);
    // The reload is complete once the old workers have exited.
    r.os.exit(pid(101), ExitStatus::Code(0));
    r.os.exit(pid(102), ExitStatus::Code(0));
    r.turn(41);
    r.turn(42);
    assert_eq!(r.core.configured(), 3);
    assert_eq!(r.pids(), vec![Some(103), Some(104), Some(105)]);
    r.ready(105, 50);
    // A reload now replaces all three: the scaled count stays.
    r.core.request_reload();
    for (t, p) in [(60, 106), (70, 107), (80, 108)] {
        r.turn(t);
        r.ready(p, t + 5);
    }
    r.turn(90);
    for old in [103, 104, 105] {
        r.os.exit(pid(old), ExitStatus::Code(0));
    }
    r.turn(91);
    assert_eq!(r.pids(), vec![Some(106), Some(107), Some(108)]);
    assert_eq!(r.core.configured(), 3);
}

#[test]
fn the_cpu_follow_respects_the_pin_and_min_ready() {
    let mut s = settings(2);
    s.min_ready = 2;
    let mut r = Rig::new(s);
    r.turn(0);
    let cpu = || Origin::Cpu("quota".into());
    assert!(r.scale(1, Origin::Manual, 5).is_err());
    // Clamped to --min-ready.
    assert_eq!(
        r.scale(1, cpu(), 10),
        Ok("the pool has 2 workers already".into())
    );
    assert_eq!(
        r.scale(3, cpu(), 10),
        Ok("scaling from 2 to 3 workers".into())
    );
    assert!(!r.core.pinned());
    r.scale(4, Origin::Manual, 20).unwrap();
    assert!(r.scale(2, cpu(), 30).unwrap().contains("pinned at 4"));
    assert_eq!(r.core.configured(), 4);
    r.scale(2, Origin::Unpin, 40).unwrap();
    assert_eq!(r.core.configured(), 2);
    assert!(!r.core.pinned());
    // Stopping: refused.
    r.signal(Action::Stop(Signal::SIGTERM), 50);
    assert!(r.scale(3, Origin::Manual, 60).is_err());
}

#[test]
fn removing_a_slot_mid_replacement_drains_both_processes() {
    let mut s = settings(2);
    s.max_memory = Some(1);
    let mut r = Rig::new(s);
    r.turn(0);
    r.ready(101, 10);
    r.ready(102, 10);
    r.core.request_reload();
    r.turn(20);
    r.ready(103, 30);
    r.turn(30); // replacement 104 for slot 1, not ready yet
    assert_eq!(
        r.core.role(pid(104)),
        Some(Role::Replacement(1, Cause::Reload))
    );
    // Queued behind the reload; applied once it ends with the replacement failing.
    r.scale(1, Origin::Manual, 31).unwrap();
    r.os.exit(pid(104), ExitStatus::Code(1));
    r.turn(40);
    r.turn(41);
    assert_eq!(r.core.configured(), 1);
    assert_eq!(r.core.role(pid(102)), Some(Role::Removed(1)));
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), vec![TERM]);
}

#[test]
fn a_removed_worker_is_routed_away_from_before_its_stop_signal() {
    let mut s = settings(2);
    s.scale_handoff = ms(250);
    let mut r = Rig::new(s);
    r.turn(0);
    r.ready(101, 10);
    r.ready(102, 10);
    r.scale(1, Origin::Manual, 100).unwrap();
    assert!(r.os.routing.contains(&"forget 102".to_string()));
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), Vec::<i32>::new());
    assert_eq!(r.core.next_deadline(r.at(100)), Some(r.at(150)));
    r.turn(349);
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), Vec::<i32>::new());
    r.turn(350);
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), vec![TERM]);
    assert_eq!(r.os.signals_to(Target::Group(pid(101))), Vec::<i32>::new());
}

/// Slots whose process is spawned and not ready, in the reporters' view.
fn unready(r: &Rig) -> usize {
    r.core
        .slots(r.t0)
        .iter()
        .filter(|s| s.pid.is_some() && !s.ready)
        .count()
}

#[test]
fn a_large_pool_starts_at_most_k_workers_at_once() {
    let mut s = settings(64);
    s.start_concurrency = 4;
    s.ready_timeout = ms(1000);
    let mut r = Rig::new(s);
    r.turn(0);
    assert_eq!(r.os.spawned.len(), 4);
    assert_eq!(r.states().iter().filter(|&&s| s == "queued").count(), 60);
    // A full queue waits for news, not the clock: the next deadline is a readiness timeout.
    assert_eq!(r.core.next_deadline(r.at(0)), Some(r.at(1000)));
    let mut t = 0;
    while r.os.spawned.len() < 64 || unready(&r) > 0 {
        t += 10;
        assert!(t < 10_000, "the pool never finished starting");
        // The oldest unready worker becomes ready, then the loop turns.
        let next = r.os.spawned.iter().map(|&(_, p)| p).find(|&p| {
            r.core
                .slots(r.t0)
                .iter()
                .any(|s| s.pid == Some(p.as_raw()) && !s.ready)
        });
        if let Some(p) = next {
            r.ready(p.as_raw(), t);
        }
        r.turn(t);
        assert!(unready(&r) <= 4, "{} unready at {t}", unready(&r));
    }
    assert_eq!(r.os.spawned.len(), 64);
    assert!(r.core.slots(r.t0).iter().all(|s| s.ready));
    assert!(r.os.sent.is_empty(), "no worker was restarted");
}

#[test]
fn a_queued_worker_times_out_from_its_own_spawn() {
    let mut s = settings(2);
    s.start_concurrency = 1;
    let mut r = Rig::new(s);
    r.turn(0);
    assert_eq!(r.pids(), vec![Some(101), None]);
    assert_eq!(r.states(), vec!["starting", "queued"]);
    r.ready(101, 400);
    r.turn(400);
    assert_eq!(r.states()[0], "running", "ready: running");
    r.turn(400);
    assert_eq!(r.pids(), vec![Some(101), Some(102)]);
    // 500 ms after the pool started, but only 200 ms after its spawn: not restarted.
    r.turn(600);
    assert!(r.os.signals_to(Target::Group(pid(102))).is_empty());
    assert_eq!(r.core.next_deadline(r.at(600)), Some(r.at(900)));
    r.turn(900);
    assert_eq!(r.os.signals_to(Target::Group(pid(102))), vec![TERM]);
}

#[test]
fn restarts_after_backoff_wait_their_turn() {
    let mut s = settings(3);
    s.start_concurrency = 2;
    let mut r = Rig::new(s);
    r.turn(0);
    assert_eq!(r.pids(), vec![Some(101), Some(102), None]);
    // Slot 0 crashes before it is ready: slot 2 takes its place in the start window.
    r.os.exit(pid(101), ExitStatus::Code(1));
    r.turn(10);
    assert_eq!(r.pids(), vec![None, Some(102), Some(103)]);
    // Slot 0's backoff is over, but two workers are still starting: it queues.
    r.turn(110);
    let states: Vec<_> = r.core.slots(r.at(110)).iter().map(|s| s.state).collect();
    assert_eq!(states, vec!["queued", "starting", "starting"]);
    r.ready(102, 150);
    r.turn(150);
    assert_eq!(r.pids(), vec![Some(104), Some(102), Some(103)]);
}

#[test]
fn a_pool_within_the_bound_starts_at_once() {
    let mut s = settings(4);
    s.start_concurrency = 4;
    let mut r = Rig::new(s);
    r.turn(0);
    assert_eq!(r.os.spawned.len(), 4);
    // Without readiness to wait for, no bound applies at all.
    let mut s = settings(16);
    s.start_concurrency = 4;
    s.needs_ready = false;
    let mut r = Rig::new(s);
    r.turn(0);
    assert_eq!(r.os.spawned.len(), 16);
}

#[test]
fn a_scale_up_goes_through_the_same_bound() {
    let mut s = settings(2);
    s.start_concurrency = 2;
    let mut r = Rig::new(s);
    r.turn(0);
    r.ready(101, 10);
    r.ready(102, 10);
    assert!(r.scale(8, Origin::Manual, 20).is_ok());
    r.turn(20);
    // Two of the six new slots start; the others wait for them to become ready.
    assert_eq!(r.os.spawned.len(), 4);
    let views = r.core.slots(r.at(20));
    assert_eq!(views.iter().filter(|s| s.state == "queued").count(), 4);
    r.ready(103, 30);
    r.turn(30);
    assert_eq!(r.os.spawned.len(), 5);
    assert_eq!(unready(&r), 2);
}
