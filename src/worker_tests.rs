//! The slot state machine's verbs, one transition at a time.

use super::*;

fn rules(policy: RestartPolicy) -> RestartRules {
    RestartRules {
        policy,
        delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(1),
        min_uptime: Duration::from_secs(1),
        max_restarts: 3,
        fail_fast: Duration::ZERO,
    }
}

fn running(now: Instant) -> Worker {
    let mut w = Worker::new(0, now);
    w.started(Pid::from_raw(10), now, true);
    w
}

#[test]
fn backoff_doubles_and_caps() {
    let r = rules(RestartPolicy::Always);
    let ms: Vec<u128> = (0..7).map(|f| r.backoff(f).as_millis()).collect();
    assert_eq!(ms, vec![100, 100, 200, 400, 800, 1000, 1000]);
    assert_eq!(r.backoff(u32::MAX), Duration::from_secs(1));
}

#[test]
fn short_lived_exits_give_up() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let mut w = running(t0);
    let crash = ExitStatus::Code(1);
    assert_eq!(
        w.exited(crash, t0, &r, false, false),
        AfterExit::RestartAt(t0 + Duration::from_millis(100))
    );
    w.started(Pid::from_raw(11), t0, true);
    assert_eq!(
        w.exited(crash, t0, &r, false, false),
        AfterExit::RestartAt(t0 + Duration::from_millis(200))
    );
    w.started(Pid::from_raw(12), t0, true);
    assert_eq!(w.exited(crash, t0, &r, false, false), AfterExit::GaveUp);
    assert_eq!(w.state, State::GivenUp { status: crash });
    assert_eq!(w.restarts, 2);
}

#[test]
fn a_retry_counts_nothing() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let mut w = running(t0);
    w.exited(ExitStatus::Code(1), t0, &r, false, false);
    let (failures, restarts) = (w.failures, w.restarts);
    let later = t0 + Duration::from_secs(1);
    w.retry_at(later);
    assert_eq!(w.state, State::Waiting { at: later });
    assert_eq!((w.failures, w.restarts), (failures, restarts));
    // Only a waiting slot is put off.
    w.started(Pid::from_raw(11), later, true);
    w.retry_at(later + Duration::from_secs(1));
    assert!(matches!(w.state, State::Running { .. }));
}

#[test]
fn long_life_resets_failures() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let mut w = running(t0);
    w.exited(ExitStatus::Code(1), t0, &r, false, false);
    w.started(Pid::from_raw(11), t0, true);
    w.exited(ExitStatus::Code(1), t0, &r, false, false);
    assert_eq!(w.failures, 2);
    w.started(Pid::from_raw(12), t0, true);
    let later = t0 + Duration::from_secs(5);
    assert_eq!(
        w.exited(ExitStatus::Code(1), later, &r, false, false),
        AfterExit::RestartAt(later + Duration::from_millis(100))
    );
    assert_eq!(w.failures, 0);
}

#[test]
fn policies() {
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(5);
    let mut w = running(t0);
    assert_eq!(
        w.exited(
            ExitStatus::Code(0),
            later,
            &rules(RestartPolicy::OnFailure),
            false,
            false
        ),
        AfterExit::Finished
    );
    let mut w = running(t0);
    assert!(matches!(
        w.exited(
            ExitStatus::Code(2),
            later,
            &rules(RestartPolicy::OnFailure),
            false,
            false
        ),
        AfterExit::RestartAt(_)
    ));
    let mut w = running(t0);
    assert_eq!(
        w.exited(
            ExitStatus::Code(2),
            later,
            &rules(RestartPolicy::Never),
            false,
            false
        ),
        AfterExit::Finished
    );
    let mut w = running(t0);
    assert_eq!(
        w.exited(
            ExitStatus::Code(2),
            later,
            &rules(RestartPolicy::Always),
            true,
            false
        ),
        AfterExit::Finished
    );
    let mut w = running(t0);
    w.stopping();
    assert!(matches!(w.state, State::Stopping { .. }));
    assert_eq!(
        w.exited(
            ExitStatus::Code(0),
            later,
            &rules(RestartPolicy::Always),
            false,
            false
        ),
        AfterExit::Finished
    );
    let mut w = Worker::new(1, t0);
    w.stopping();
    assert_eq!(w.state, State::Done { status: None });
}

#[test]
fn an_exit_before_ready_is_a_failure_whatever_its_age() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let later = t0 + Duration::from_secs(5);
    let mut w = Worker::new(0, t0);
    w.started(Pid::from_raw(10), t0, false);
    assert!(matches!(
        w.exited(ExitStatus::Code(3), later, &r, false, false),
        AfterExit::RestartAt(_)
    ));
    assert_eq!(w.failures, 1);
    w.started(Pid::from_raw(11), later, false);
    w.exited(
        ExitStatus::Code(3),
        later + Duration::from_secs(5),
        &r,
        false,
        false,
    );
    assert_eq!(w.failures, 2);
}

#[test]
fn fail_fast_gives_up_a_failure_but_not_a_long_life() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let mut w = running(t0);
    assert_eq!(
        w.exited(ExitStatus::Code(1), t0, &r, false, true),
        AfterExit::GaveUp
    );
    let mut w = running(t0);
    let later = t0 + Duration::from_secs(5);
    assert!(matches!(
        w.exited(ExitStatus::Code(1), later, &r, false, true),
        AfterExit::RestartAt(_)
    ));
}

#[test]
fn a_failed_start_is_a_failure_without_a_process() {
    let r = rules(RestartPolicy::Always);
    let t0 = Instant::now();
    let mut w = running(t0);
    w.exited(ExitStatus::Code(1), t0, &r, false, false);
    assert_eq!(w.pid(), None);
    let gone = ExitStatus::Code(127);
    assert!(matches!(
        w.start_failed(gone, t0, &r, false, false),
        AfterExit::RestartAt(_)
    ));
    assert_eq!((w.failures(), w.restarts(), w.pid()), (2, 2, None));
    assert_eq!(
        w.start_failed(gone, t0, &r, false, false),
        AfterExit::GaveUp
    );
    assert_eq!(w.state(), State::GivenUp { status: gone });
    // Only a waiting slot can fail to start.
    let mut w = running(t0);
    assert_eq!(
        w.start_failed(gone, t0, &r, false, false),
        AfterExit::Finished
    );
    assert!(w.is_running());
}
