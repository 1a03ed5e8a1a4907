//! The pool's life against real processes: graceful stop and its exit codes, kill-timeout
//! escalation, crash-loop backoff, pool death, restart policies, and the one-line errors for
//! bad input and bad commands.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn graceful_stop_exits_zero() {
    let run = Run::start(&["-i", "2", "--", "sleep", "60"], &[]);
    run.wait_stderr("started, pid", 2, SECS(5));
    let pids = started_pids(&run.stderr());
    let mut run = run;
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0, "{}", run.stderr());
    for pid in pids {
        assert!(!exists(pid), "worker {pid} outlived corepool");
    }
}

#[test]
fn kill_timeout_escalates_to_sigkill_and_exits_one() {
    // The worker and its child both ignore SIGTERM; the whole group must be killed.
    let script = "trap '' TERM; sh -c 'trap \"\" TERM; echo child $$; exec sleep 60' & wait";
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--kill-timeout",
            "700ms",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    run.wait_stdout("child ", 1, SECS(5));
    let child: i32 = run
        .stdout()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let started = Instant::now();
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 1, "{}", run.stderr());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(650),
        "SIGKILL came before the kill timeout: {took:?}"
    );
    assert!(!exists(child), "the worker's child survived");
    assert!(run.stderr().contains("SIGKILL"), "{}", run.stderr());
}

#[test]
fn second_sigterm_skips_the_wait() {
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--kill-timeout",
            "30s",
            "--",
            "sh",
            "-c",
            "trap '' TERM; echo trapped; while :; do sleep 0.05; done",
        ],
        &[],
    );
    // The worker says when its trap is set: a SIGTERM before that would simply kill it.
    run.wait_stdout("trapped", 1, SECS(5));
    run.signal(libc::SIGTERM);
    run.wait_stderr("stopping 1 workers", 1, SECS(5));
    let started = Instant::now();
    run.signal(libc::SIGINT);
    assert_eq!(run.exit_code(SECS(5)), 1);
    assert!(
        started.elapsed() < SECS(3),
        "the second signal did not skip the 30 s wait"
    );
}

#[test]
fn stop_signal_is_configurable() {
    let script =
        "trap 'echo got-int; exit 0' INT; trap '' TERM; echo trapped; while :; do sleep 0.05; done";
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--stop-signal",
            "SIGINT",
            "--",
            "sh",
            "-c",
            script,
        ],
        &[],
    );
    run.wait_stdout("trapped", 1, SECS(5));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0, "{}", run.stderr());
    assert!(run.stdout().contains("got-int"));
}

#[test]
fn crash_loop_backs_off_then_the_pool_dies_with_the_worker_status() {
    let started = Instant::now();
    let (code, _out, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart-delay",
            "50ms",
            "--max-restart-delay",
            "200ms",
            "--max-restarts",
            "5",
            "--",
            "sh",
            "-c",
            "exit 7",
        ],
        &[],
        SECS(10),
    );
    assert_eq!(code, 7, "{err}");
    assert_eq!(started_pids(&err).len(), 5, "{err}");
    // Backoff 50, 100, 200, 200 ms between the five starts: at least 550 ms in all.
    assert!(
        started.elapsed() >= Duration::from_millis(550),
        "no backoff: {:?}",
        started.elapsed()
    );
    assert!(err.contains("given up after 5"), "{err}");
    let delays: Vec<&str> = err.lines().filter(|l| l.contains("restarts in")).collect();
    assert_eq!(delays.len(), 4, "{err}");
    assert!(
        delays[0].contains("50ms") && delays[2].contains("200ms") && delays[3].contains("200ms"),
        "{delays:?}"
    );
}

#[test]
fn an_app_that_cannot_start_ends_the_pool_within_the_fail_fast_window() {
    // A syntax error: every start fails at once. With the default --fail-fast (10s) the pool
    // ends with the app's code in about ten seconds, not after 16 doubling backoffs (~130 s).
    let port = free_port();
    let started = Instant::now();
    let args = socket_args(2, port, &["--", "node", "-e", "this is not javascript("]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _out, err) = run_to_end(&args, &[], SECS(40));
    let took = started.elapsed();
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("(--fail-fast)"), "{err}");
    assert!(
        took >= SECS(9),
        "gave up before the window: {took:?}\n{err}"
    );
    assert!(took < SECS(30), "took {took:?}\n{err}");
}

#[test]
fn a_worker_that_dies_before_it_is_ready_is_a_failure_whatever_its_age() {
    // Never listens, exits 3 after 1.5 s (older than --min-uptime): each exit is a failure.
    // --fail-fast leaves room for the first exit to come (and be counted) on a loaded machine,
    // where Node alone can take seconds to start.
    let port = free_port();
    let started = Instant::now();
    let args = socket_args(
        1,
        port,
        &[
            "--fail-fast",
            "6s",
            "--",
            "node",
            "-e",
            "setTimeout(() => process.exit(3), 1500)",
        ],
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, _out, err) = run_to_end(&args, &[], SECS(40));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("1 short-lived exits in a row"), "{err}");
    assert!(err.contains("(--fail-fast)"), "{err}");
    assert!(started.elapsed() < SECS(25), "{err}");
}

#[test]
fn a_pool_that_has_served_keeps_the_patient_backoff() {
    // The first run serves (lives 1.5 s); then every run fails at once. --fail-fast 1s is long
    // over by then, but it no longer applies: --max-restarts decides.
    let dir = scratch("served");
    let script = format!(
        "if [ -e {m} ]; then exit 1; fi; touch {m}; sleep 1.5; exit 1",
        m = dir.join("served").display()
    );
    let (code, _out, err) = run_to_end(
        &[
            "-i",
            "1",
            "--fail-fast",
            "1s",
            "--max-restarts",
            "3",
            "--max-restart-delay",
            "100ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
        SECS(20),
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("given up after 3 failed runs"), "{err}");
    assert!(!err.contains("--fail-fast"), "{err}");
}

#[test]
fn pool_death_by_signal_reports_128_plus_n() {
    let (code, _, err) = run_to_end(
        &[
            "-i",
            "2",
            "--restart-delay",
            "0",
            "--max-restarts",
            "2",
            "--",
            "sh",
            "-c",
            "kill -SEGV $$",
        ],
        &[],
        SECS(10),
    );
    assert_eq!(code, 128 + libc::SIGSEGV, "{err}");
}

#[test]
fn restart_always_never_exits_zero_on_pool_death() {
    let (code, _, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart-delay",
            "0",
            "--max-restarts",
            "3",
            "--",
            "true",
        ],
        &[],
        SECS(10),
    );
    assert_eq!(
        code, 1,
        "a dead pool under restart=always must not look like success: {err}"
    );
}

#[test]
fn restart_never_and_on_failure() {
    let (code, _, err) = run_to_end(
        &[
            "-i",
            "2",
            "--restart",
            "never",
            "--",
            "sh",
            "-c",
            "exit $((3 + COREPOOL_WORKER))",
        ],
        &[],
        SECS(10),
    );
    assert!(code == 3 || code == 4, "{code}: {err}");
    assert_eq!(started_pids(&err).len(), 2);

    let (code, _, err) = run_to_end(
        &["-i", "1", "--restart", "on-failure", "--", "true"],
        &[],
        SECS(10),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(started_pids(&err).len(), 1);

    // on-failure restarts a failing worker until it succeeds: a counter file decides.
    let dir = scratch("onfail");
    let count = dir.join("count");
    let script = format!(
        "n=$(cat {0} 2>/dev/null || echo 0); echo $((n+1)) > {0}; [ $n -ge 2 ]",
        count.display()
    );
    let (code, _, err) = run_to_end(
        &[
            "-i",
            "1",
            "--restart",
            "on-failure",
            "--restart-delay",
            "10ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
        SECS(10),
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(started_pids(&err).len(), 3, "{err}");
}

#[test]
fn a_long_lived_worker_resets_its_failure_count() {
    // Each run lives 300 ms, longer than --min-uptime 200ms: it is never given up.
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--min-uptime",
            "200ms",
            "--restart-delay",
            "10ms",
            "--max-restarts",
            "2",
            "--",
            "sh",
            "-c",
            "sleep 0.3; exit 1",
        ],
        &[],
    );
    run.wait_stderr("started, pid", 5, SECS(10));
    assert!(!run.stderr().contains("given up"), "{}", run.stderr());
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0);
}

#[test]
fn a_crashed_workers_leftover_children_are_stopped() {
    // The worker leaves a child in its process group and dies; the child must not linger.
    let script = "sleep 60 & echo left $!; exit 1";
    let mut run = Run::start(
        &["-i", "1", "--restart", "never", "--", "sh", "-c", script],
        &[],
    );
    assert_eq!(run.exit_code(SECS(5)), 1, "{}", run.stderr());
    let left: i32 = run
        .stdout()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(!exists(left), "leftover {left} survived the pool");
}

#[test]
fn command_errors_have_shell_codes() {
    let (code, _, err) = run_to_end(&["--", "no-such-command-corepool"], &[], SECS(5));
    assert_eq!(code, 127);
    assert_eq!(
        err.trim(),
        "corepool: command not found: no-such-command-corepool"
    );

    let dir = scratch("cmds");
    let (code, _, err) = run_to_end(&["--", dir.to_str().unwrap()], &[], SECS(5));
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("is a directory"), "{err}");

    let plain = dir.join("plain.sh");
    std::fs::write(&plain, "echo hi").unwrap();
    let (code, _, err) = run_to_end(&["--", plain.to_str().unwrap()], &[], SECS(5));
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("not executable"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn assert_usage_error(args: &[&str], env: &[(&str, &str)], names: &str) {
    let (code, out, err) = run_to_end(args, env, SECS(5));
    assert_eq!(code, 2, "{args:?} {env:?}: {err}");
    assert!(out.is_empty());
    assert_eq!(err.lines().count(), 1, "one line expected: {err}");
    assert!(err.contains(names), "{err:?} should name {names}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_one_line_naming_the_culprit() {
    assert_usage_error(
        &["--kill-timeout", "soon", "--", "true"],
        &[],
        "--kill-timeout",
    );
    assert_usage_error(
        &["--", "true"],
        &[("COREPOOL_RESTART_DELAY", "5 parsecs")],
        "COREPOOL_RESTART_DELAY",
    );
    assert_usage_error(
        &["--", "true"],
        &[("COREPOOL_INSTANCES", "lots")],
        "COREPOOL_INSTANCES",
    );
    assert_usage_error(
        &["--", "true"],
        &[("WEB_CONCURRENCY", "x")],
        "WEB_CONCURRENCY",
    );
    assert_usage_error(
        &["--stop-signal", "SIGBOGUS", "--", "true"],
        &[],
        "--stop-signal",
    );
    assert_usage_error(&["--restart", "sometimes", "--", "true"], &[], "--restart");
    assert_usage_error(&["--log-format", "xml", "--", "true"], &[], "--log-format");
    assert_usage_error(&["--no-such-flag", "--", "true"], &[], "--no-such-flag");
    assert_usage_error(&[], &[], "no command");

    let dir = scratch("badfile");
    let file = dir.join("pool.toml");
    std::fs::write(
        &file,
        "# pool\ninstances = 2\n\nkill_timeout = \"forever\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    assert_usage_error(
        &["--config", path, "--", "true"],
        &[],
        &format!("{path}:4: kill_timeout"),
    );
    std::fs::write(&file, "instances = 2\ncolour = \"blue\"\n").unwrap();
    assert_usage_error(
        &["--", "true"],
        &[("COREPOOL_CONFIG", path)],
        &format!("{path}:2: unknown key 'colour'"),
    );
    std::fs::write(&file, "instances = 2\nrestart = \n").unwrap();
    assert_usage_error(
        &["--config", path, "--", "true"],
        &[],
        &format!("{path}:2: invalid TOML"),
    );
    assert_usage_error(
        &["--config", "/nonexistent/pool.toml", "--", "true"],
        &[],
        "--config",
    );
}

/// Values that parse but cannot work, and empty ones, are refused with the option's name
/// rather than run into a broken pool or a silent default.
#[test]
fn values_that_cannot_work_are_refused() {
    let t = |args: &[&str], names: &str| {
        let mut all = args.to_vec();
        all.extend(["--", "true"]);
        assert_usage_error(&all, &[], names);
    };
    t(&["--log-level", ""], "--log-level: is empty");
    t(&["--metrics", " "], "--metrics: is empty");
    t(&["--ready-timeout", "0s"], "--ready-timeout");
    t(&["-i", "2", "--min-ready", "3"], "--min-ready");
    t(&["--restart-delay", "20s"], "--restart-delay");
    t(
        &["--restart-delay", "2s", "--max-restart-delay", "1s"],
        "--max-restart-delay",
    );
    t(&["--max-memory", "512"], "--max-memory");
    t(&["--kill-timeout", "0.5ms"], "finer than a millisecond");
    t(&["--kill-timeout", "-1s"], "--kill-timeout");
    t(&["--stop-signal", "STOP"], "--stop-signal");
    // The error names the option first, as every other one does (it once read
    // "invalid value for 3000: ... (0.0.0.0:--metrics)").
    t(
        &["--metrics", ":3000", "--balance", "socket"],
        "invalid value for --metrics: 0.0.0.0:3000 is the pool's own port (0.0.0.0:3000)",
    );
    t(
        &[
            "--balance",
            "none",
            "--port-increment",
            "-i",
            "4",
            "-p",
            "65534",
        ],
        "--port: 4 workers from port 65534",
    );
    assert_usage_error(&["--", ""], &[], "program name is empty");
    assert_usage_error(
        &["--", "true"],
        &[("COREPOOL_MAX_MEMORY", "")],
        "COREPOOL_MAX_MEMORY: is empty",
    );
    assert_usage_error(
        &["--config", "/dev/zero", "--", "true"],
        &[],
        "not a regular file",
    );
    let dir = scratch("badvalues");
    let file = dir.join("pool.toml");
    std::fs::write(&file, "kill-timeout = \"5s\"\nkill_timeout = \"6s\"\n").unwrap();
    let path = file.to_str().unwrap();
    assert_usage_error(
        &["--config", path, "--", "true"],
        &[],
        &format!("{path}:2: 'kill_timeout' repeats the key of line 1"),
    );
    std::fs::write(&file, "command = \"sh -c 'echo hi'\"\n").unwrap();
    assert_usage_error(
        &["--config", path],
        &[],
        &format!("{path}:1: command: expected a list of strings"),
    );
}

/// A misspelled variable is not silently ignored: corepool says which known one it resembles.
#[test]
fn a_misspelled_variable_is_reported() {
    let (code, out, _) = run_to_end(
        &["--print-config"],
        &[("COREPOOL_KILL_TIMOUT", "5s")],
        SECS(5),
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("# warning: COREPOOL_KILL_TIMOUT is not a corepool variable (did you mean COREPOOL_KILL_TIMEOUT?)"),
        "{out}"
    );
    let mut run = Run::start(
        &["-i", "1", "--", "sleep", "60"],
        &[("COREPOOL_INSTANCE", "4")],
    );
    run.wait_stderr("did you mean COREPOOL_INSTANCES?", 1, SECS(5));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0);
}

/// A file that exists and is executable can still fail to exec: its #! interpreter is missing,
/// or it is no program at all. That is found at the first start, with the shell's code, and
/// not retried for minutes as if the worker had crashed.
#[test]
fn a_command_that_cannot_exec_fails_at_the_first_start() {
    let dir = scratch("noexec");
    let script = dir.join("script.sh");
    write_executable(&script, "#!/no/such/interpreter\necho hi\n");
    let junk = dir.join("junk");
    write_executable(&junk, [0u8, 1, 2, 3, 0xff]);

    let (code, _, err) = run_to_end(&["-i", "2", "--", script.to_str().unwrap()], &[], SECS(5));
    assert_eq!(code, 127, "{err}");
    assert!(err.contains("interpreter"), "{err}");
    assert!(!err.contains("started, pid"), "{err}");
    let (code, _, err) = run_to_end(&["-i", "2", "--", junk.to_str().unwrap()], &[], SECS(5));
    assert_eq!(code, 126, "{err}");
    assert!(err.contains("Exec format error"), "{err}");
}

/// A SIGKILL that ended a crashed worker's leftovers long before the stop does not make a
/// clean stop exit 1: only kills the stop itself needed count.
#[test]
fn a_setsid_chain_that_ignores_sigterm_gets_one_kill_timeout_in_all() {
    // Three levels, each in a session of its own and ignoring SIGTERM: each level becomes
    // corepool's child only when the one above it is killed. The stop has one deadline for all.
    let level3 = "trap '' TERM; echo level3; exec sleep 60";
    let level2 = format!("trap '' TERM; setsid sh -c \"{level3}\" & exec sleep 60");
    let level1 = format!(
        "trap '' TERM; setsid sh -c '{}' & exec sleep 60",
        level2.replace('\'', "'\\''")
    );
    let mut run = Run::start(
        &["-i", "1", "--kill-timeout", "2s", "--", "sh", "-c", &level1],
        &[],
    );
    run.wait_stdout("level3", 1, SECS(10));
    let started = Instant::now();
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 1, "{}", run.stderr());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "SIGKILL came before the kill timeout: {took:?}"
    );
    assert!(
        took < SECS(5),
        "the stop took {took:?}: a kill timeout for each level of the chain"
    );
}

#[test]
fn an_earlier_kill_does_not_make_a_clean_stop_unclean() {
    let dir = scratch("earlykill");
    let marker = dir.join("second");
    // The first worker leaves a child that ignores SIGTERM and dies; the second just runs. The
    // first worker exits only once the child has set its trap (it says so with a file), or
    // corepool's SIGTERM could reach the child first and kill it.
    let script = format!(
        "if [ -e {m} ]; then exec sleep 60; fi; touch {m}; \
         (trap '' TERM; touch {m}.trapped; exec sleep 60) & \
         while [ ! -e {m}.trapped ]; do sleep 0.01; done; exit 3",
        m = marker.display()
    );
    let mut run = Run::start(
        &[
            "-i",
            "1",
            "--kill-timeout",
            "500ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
        &[],
    );
    run.wait_stderr("still alive after the kill timeout: SIGKILL", 1, SECS(5));
    run.wait_stderr("started, pid", 2, SECS(5));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(5)), 0, "{}", run.stderr());
}

#[test]
fn print_config_shows_every_source() {
    let dir = scratch("printcfg");
    std::fs::write(
        dir.join("corepool.toml"),
        "command = [\"node\", \"server.js\"]\nrestart = \"on-failure\"\nmax-restarts = 4\n",
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(&dir)
        .args(["--print-config", "--kill-timeout", "1500ms", "-i", "3"]);
    let mut run = Run::from_command(
        cmd,
        &[
            ("COREPOOL_STOP_SIGNAL", "INT"),
            ("COREPOOL_MIN_UPTIME", "2m"),
        ],
    );
    assert_eq!(run.exit_code(SECS(5)), 0, "{}", run.stderr());
    let out = run.stdout();
    let line = |key: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("{key} missing:\n{out}"))
            .to_string()
    };
    assert_eq!(
        line("command"),
        "command = [\"node\", \"server.js\"]  # file corepool.toml:1"
    );
    assert_eq!(line("instances"), "instances = 3  # flag --instances");
    assert_eq!(
        line("kill_timeout"),
        "kill_timeout = \"1500ms\"  # flag --kill-timeout"
    );
    assert_eq!(
        line("stop_signal"),
        "stop_signal = \"SIGINT\"  # env COREPOOL_STOP_SIGNAL"
    );
    assert_eq!(
        line("min_uptime"),
        "min_uptime = \"2m\"  # env COREPOOL_MIN_UPTIME"
    );
    assert_eq!(
        line("restart"),
        "restart = \"on-failure\"  # file corepool.toml:2"
    );
    assert_eq!(
        line("max_restarts"),
        "max_restarts = 4  # file corepool.toml:3"
    );
    assert_eq!(
        line("restart_delay"),
        "restart_delay = \"100ms\"  # default"
    );
    // What it prints is itself a valid configuration file.
    let reread = dir.join("again.toml");
    let body: String = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{}\n", l.split("  #").next().unwrap()))
        .collect();
    std::fs::write(&reread, body).unwrap();
    let (code, out2, err) = run_to_end(
        &["--config", reread.to_str().unwrap(), "--print-config"],
        &[],
        SECS(5),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out2.contains("kill_timeout = \"1500ms\"  # file"), "{out2}");
}

#[test]
fn a_bare_corepool_runs_the_command_from_its_file() {
    let dir = scratch("bare");
    std::fs::write(dir.join("corepool.toml"), "instances = 2\nrestart = \"never\"\ncommand = [\"sh\", \"-c\", \"echo slot-$COREPOOL_WORKER\"]\n").unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.current_dir(&dir);
    let mut run = Run::from_command(cmd, &[]);
    assert_eq!(run.exit_code(SECS(5)), 0, "{}", run.stderr());
    assert!(
        run.stdout().contains("slot-0") && run.stdout().contains("slot-1"),
        "{}",
        run.stdout()
    );
}

#[test]
fn workers_do_not_outlive_a_killed_corepool() {
    let mut run = Run::start(&["-i", "2", "--", "sleep", "60"], &[]);
    run.wait_stderr("started, pid", 2, SECS(5));
    let pids = started_pids(&run.stderr());
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let deadline = Instant::now() + SECS(3);
    while pids.iter().any(|&p| exists(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in pids {
        assert!(!exists(pid), "worker {pid} outlived a SIGKILLed corepool");
    }
}

#[test]
fn balance_none_with_port_increment_gives_each_worker_its_port() {
    let (code, out, err) = run_to_end(
        &[
            "-i",
            "3",
            "--balance",
            "none",
            "-p",
            "4100",
            "--port-increment",
            "--restart",
            "never",
            "--",
            "sh",
            "-c",
            "echo port-$COREPOOL_WORKER-$PORT-${LISTEN_FDS:-none}",
        ],
        &[("LISTEN_FDS", "7")],
        SECS(5),
    );
    assert_eq!(code, 0, "{err}");
    for slot in 0..3 {
        assert!(
            out.contains(&format!("port-{slot}-{}-none", 4100 + slot)),
            "{out}"
        );
    }
    let (code, _, err) = run_to_end(
        &["--balance", "socket", "--port-increment", "--", "true"],
        &[],
        SECS(5),
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("--port-increment") && err.contains("--balance none"),
        "{err}"
    );
}

#[test]
fn a_stop_longer_than_the_default_grace_period_is_warned_about() {
    for (kill_timeout, warned) in [("10s", false), ("30s", true)] {
        let mut run = Run::start(
            &[
                "-i",
                "1",
                "--kill-timeout",
                kill_timeout,
                "--",
                "sleep",
                "60",
            ],
            &[],
        );
        run.wait_stderr("started, pid", 1, SECS(5));
        let err = run.stderr();
        assert_eq!(
            err.contains("a stop may take 30s") && err.contains("terminationGracePeriodSeconds"),
            warned,
            "{err}"
        );
        run.signal(libc::SIGTERM);
        assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
    }
}
