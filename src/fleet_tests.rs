//! Several pools driven with `FakeOs` (one per pool, pids apart) and a fake clock.

use super::*;
use crate::os::Target;
use crate::os::fake::FakeOs;
use crate::reaper::ExitStatus;
use crate::worker::RestartPolicy;
use nix::sys::signal::Signal;
use std::time::Duration;

const TERM: i32 = Signal::SIGTERM as i32;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn pid(n: i32) -> Pid {
    Pid::from_raw(n)
}

fn settings(instances: usize, policy: RestartPolicy) -> Settings {
    let mut settings = crate::supervisor::tests::settings(instances);
    settings.rules.policy = policy;
    settings.needs_ready = false;
    settings
}

/// A member whose fake pids start at `base + 1`.
fn member(name: &str, instances: usize, policy: RestartPolicy, base: i32) -> Member<FakeOs> {
    let os = FakeOs {
        next_pid: base,
        ..FakeOs::default()
    };
    Member::new(name.into(), settings(instances, policy), os)
}

struct Rig {
    fleet: Fleet<FakeOs>,
    t0: Instant,
}

impl Rig {
    fn new(members: Vec<Member<FakeOs>>) -> Rig {
        Rig {
            fleet: Fleet::new(members),
            t0: Instant::now(),
        }
    }

    /// One turn of the loop at `t`: reap every pool's exits, step, the container's code.
    fn turn(&mut self, t: u64) -> Option<i32> {
        let now = self.t0 + ms(t);
        let exits: Vec<Exit> = self
            .fleet
            .members
            .iter_mut()
            .flat_map(|m| m.os.reap())
            .collect();
        for exit in exits {
            self.fleet.on_exit(exit, now);
        }
        self.fleet.step(now);
        self.fleet.outcome()
    }

    fn os(&mut self, i: usize) -> &mut FakeOs {
        &mut self.fleet.members[i].os
    }

    fn states(&self) -> Vec<&'static str> {
        self.fleet.members.iter().map(Member::state).collect()
    }
}

#[test]
fn a_dead_pool_stops_the_others_with_its_code() {
    let mut r = Rig::new(vec![
        member("web", 2, RestartPolicy::Always, 100),
        member("queue", 1, RestartPolicy::Never, 200),
    ]);
    assert_eq!(r.turn(0), None);
    assert_eq!(r.os(0).spawned.len(), 2);
    assert_eq!(r.os(1).spawned, vec![(0, pid(201))]);
    // The queue's only worker dies with 7: its pool is dead, so the web pool is stopped.
    r.os(1).exit(pid(201), ExitStatus::Code(7));
    assert_eq!(r.turn(10), None);
    assert_eq!(r.os(0).signals_to(Target::Group(pid(101))), vec![TERM]);
    assert_eq!(r.os(0).signals_to(Target::Group(pid(102))), vec![TERM]);
    assert_eq!(r.states(), vec!["stopping", "done"]);
    // The web workers drain and exit: the container exits with the queue's code.
    r.os(0).exit(pid(101), ExitStatus::Code(0));
    r.os(0).exit(pid(102), ExitStatus::Code(0));
    assert_eq!(r.turn(20), Some(7));
}

#[test]
fn a_reaped_pid_goes_to_its_own_pool() {
    let mut r = Rig::new(vec![
        member("web", 1, RestartPolicy::Always, 100),
        member("queue", 1, RestartPolicy::Always, 200),
    ]);
    r.turn(0);
    // Reported by the first pool's reaper (the only waiter), owned by the second.
    r.os(0).exits.push(Exit {
        pid: pid(201),
        status: ExitStatus::Code(1),
    });
    r.os(1).vanish(Target::Group(pid(201)));
    r.turn(10);
    assert_eq!(r.os(1).routing, vec!["exited 201".to_string()]);
    assert!(r.os(0).routing.is_empty());
    // The queue restarts its worker after the backoff; web is untouched.
    r.turn(200);
    assert_eq!(r.os(1).spawned.len(), 2);
    assert_eq!(r.os(0).spawned.len(), 1);
    assert_eq!(r.states(), vec!["running", "running"]);
}

#[test]
fn after_waits_for_a_oneshot_pool_that_finishes_with_0() {
    let mut migrate = member("migrate", 1, RestartPolicy::Never, 300);
    migrate.oneshot = true;
    let mut web = member("web", 1, RestartPolicy::Always, 100);
    web.after = vec![1];
    let mut r = Rig::new(vec![web, migrate]);
    r.turn(0);
    assert_eq!(r.states(), vec!["waiting", "running"]);
    assert!(r.os(0).spawned.is_empty());
    r.os(1).exit(pid(301), ExitStatus::Code(0));
    assert_eq!(r.turn(50), None);
    // Finished alone, and web starts in the same turn.
    assert_eq!(r.states(), vec!["running", "finished"]);
    assert_eq!(r.os(0).spawned, vec![(0, pid(101))]);
    // A stop signal then ends the container with 0.
    r.fleet
        .on_signal(Action::Stop(Signal::SIGTERM), r.t0 + ms(60));
    r.os(0).exit(pid(101), ExitStatus::Code(0));
    assert_eq!(r.turn(70), Some(0));
}

#[test]
fn a_failing_oneshot_pool_stops_the_container_before_the_others_start() {
    let mut migrate = member("migrate", 1, RestartPolicy::Never, 300);
    migrate.oneshot = true;
    let mut web = member("web", 1, RestartPolicy::Always, 100);
    web.after = vec![1];
    let queue = member("queue", 1, RestartPolicy::Always, 200);
    let mut r = Rig::new(vec![web, migrate, queue]);
    r.turn(0);
    r.os(1).exit(pid(301), ExitStatus::Code(3));
    assert_eq!(r.turn(10), None);
    assert!(r.os(0).spawned.is_empty());
    assert_eq!(r.os(2).signals_to(Target::Group(pid(201))), vec![TERM]);
    r.os(2).exit(pid(201), ExitStatus::Code(0));
    assert_eq!(r.turn(20), Some(3));
    assert_eq!(r.states(), vec!["done", "done", "done"]);
}

#[test]
fn a_stop_signal_reaches_every_pool_and_reload_one() {
    let mut r = Rig::new(vec![
        member("web", 1, RestartPolicy::Always, 100),
        member("queue", 1, RestartPolicy::Always, 200),
    ]);
    r.turn(0);
    r.fleet.request_reload(Some("queue"));
    r.turn(10);
    // Only the queue got a replacement.
    assert_eq!(r.os(1).spawned.len(), 2);
    assert_eq!(r.os(0).spawned.len(), 1);
    r.fleet
        .on_signal(Action::Stop(Signal::SIGTERM), r.t0 + ms(20));
    assert_eq!(r.os(0).signals_to(Target::Group(pid(101))), vec![TERM]);
    assert_eq!(r.os(1).signals_to(Target::Group(pid(201))), vec![TERM]);
    for p in [201, 202] {
        r.os(1).exit(pid(p), ExitStatus::Code(0));
    }
    assert_eq!(r.turn(30), None);
    r.os(0).exit(pid(101), ExitStatus::Code(0));
    assert_eq!(r.turn(40), Some(0));
}

#[test]
fn a_container_of_oneshot_pools_ends_with_0_once_all_finished() {
    let mut a = member("a", 1, RestartPolicy::Never, 100);
    a.oneshot = true;
    let mut b = member("b", 2, RestartPolicy::OnFailure, 200);
    b.oneshot = true;
    b.after = vec![0];
    let mut r = Rig::new(vec![a, b]);
    r.turn(0);
    r.os(0).exit(pid(101), ExitStatus::Code(0));
    assert_eq!(r.turn(10), None);
    assert_eq!(r.os(1).spawned.len(), 2);
    r.os(1).exit(pid(201), ExitStatus::Code(0));
    assert_eq!(r.turn(20), None);
    assert_eq!(r.states(), vec!["finished", "running"]);
    r.os(1).exit(pid(202), ExitStatus::Code(0));
    assert_eq!(r.turn(30), Some(0));
    assert_eq!(r.states(), vec!["finished", "finished"]);
}

#[test]
fn a_stop_before_an_after_pool_started_ends_it_unstarted() {
    let mut migrate = member("migrate", 1, RestartPolicy::Never, 300);
    migrate.oneshot = true;
    let mut web = member("web", 1, RestartPolicy::Always, 100);
    web.after = vec![1];
    let mut r = Rig::new(vec![web, migrate]);
    r.turn(0);
    r.fleet
        .on_signal(Action::Stop(Signal::SIGTERM), r.t0 + ms(5));
    // The migration is stopped (it exits 0 on TERM): that is no success that starts web.
    r.os(1).exit(pid(301), ExitStatus::Code(0));
    assert_eq!(r.turn(10), Some(0));
    assert!(r.os(0).spawned.is_empty());
}
