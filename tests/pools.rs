//! Several named pools in one container (`[pool.NAME]` tables), against the real binary and
//! real processes: a web pool in socket mode beside a queue pool, `--only`, a oneshot
//! migration that the web pool waits for (`after`), the container's exit code when one pool
//! dies, the `pool` label of /metrics, `corepool status` grouped by pool and `reload POOL`.

mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

/// A config file in a scratch directory: `[pool.web]` (node hello, socket mode, 2 workers on
/// `port`) and `[pool.queue]` (sh, balance none, 1 worker, restart never), plus `extra` at
/// the end.
fn web_and_queue(dir: &Path, port: u16, extra: &str) -> String {
    let queue = dir.join("queue.sh");
    // "ready" once the trap is set: the test waits for that line before it acts.
    write_executable(
        &queue,
        "#!/bin/sh\ntrap 'echo queue got TERM; exit 0' TERM\necho \"queue ready $$\"\n\
         while :; do sleep 0.1; done\n",
    );
    let file = dir.join("corepool.toml");
    std::fs::write(
        &file,
        format!(
            "host = \"127.0.0.1\"\nkill_timeout = \"5s\"\n\n\
             [pool.web]\ncommand = [\"node\", \"{HELLO}\"]\ninstances = 2\nbalance = \
             \"socket\"\nport = {port}\n\n\
             [pool.queue]\ncommand = [\"{}\"]\ninstances = 1\nbalance = \"none\"\n\
             restart = \"never\"\n{extra}",
            queue.display()
        ),
    )
    .unwrap();
    file.display().to_string()
}

/// The worker numbers that answered `requests` requests on `port`.
fn workers_answering(port: u16, requests: usize) -> std::collections::HashSet<String> {
    (0..requests)
        .map(|_| {
            let answer = get_json(port).expect("web answers");
            answer["worker"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

/// The pid of the queue worker, from its "queue ready PID" line.
fn queue_pid(run: &Run) -> i32 {
    run.stdout()
        .lines()
        .find_map(|l| l.strip_prefix("queue ready "))
        .and_then(|p| p.trim().parse().ok())
        .expect("queue ready line")
}

#[test]
fn web_and_queue_pools_share_one_container_and_a_dead_pool_stops_it_with_its_code() {
    require("node");
    let dir = scratch("pools-two");
    let (port, metrics) = (free_port(), free_port());
    let file = web_and_queue(&dir, port, "");
    let control = control_name("two");
    let mut run = Run::start(
        &["-c", &file, "--metrics", &format!("127.0.0.1:{metrics}")],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr("pool web: worker 0 ready", 1, SECS(20));
    run.wait_stderr("pool web: worker 1 ready", 1, SECS(20));
    run.wait_stdout("queue ready", 1, SECS(20));
    // Both web workers answer on the web pool's port.
    let seen = workers_answering(port, 40);
    assert_eq!(seen.len(), 2, "{seen:?}");

    // /metrics: every worker series names its pool.
    let text = get_ok(metrics, "/metrics").unwrap();
    for needle in [
        "corepool_workers_ready{pool=\"web\"} 2",
        "corepool_workers_ready{pool=\"queue\"} 1",
        "corepool_worker_restarts_total{pool=\"web\",slot=\"1\"} 0",
        "corepool_worker_restarts_total{pool=\"queue\",slot=\"0\"} 0",
        "corepool_workers{pool=\"queue\",state=\"running\"} 1",
        "corepool_pool_info{pool=\"web\",balance=\"socket\",state=\"running\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
    assert_eq!(get_ok(metrics, "/readyz").map(|_| ()), Ok(()));

    // `corepool status`: one table per pool.
    let (code, out, err) = control_client(&control, &["status"]);
    assert_eq!(code, 0, "{err}");
    let web_at = out.find("pool web (socket, running)").expect(&out);
    let queue_at = out.find("pool queue (none, running)").expect(&out);
    assert!(web_at < queue_at, "{out}");
    assert_eq!(
        out[web_at..queue_at].matches(" running ").count(),
        2,
        "{out}"
    );
    assert_eq!(out[queue_at..].matches(" running ").count(), 1, "{out}");
    let (_, json, _) = control_client(&control, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["workers"][2]["pool"], "queue", "{json}");

    // `corepool reload web` replaces the web workers only.
    let (code, out, err) = control_client(&control, &["reload", "web"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "ok: rolling reload started\n"),
        "{err}"
    );
    run.wait_stderr("pool web: rolling reload complete", 1, SECS(30));
    run.wait_stderr("pool web: old worker 1 (pid", 1, SECS(30));
    assert!(run.stderr().contains("pool web: worker 1: replacement pid"));
    assert!(!run.stderr().contains("pool queue: worker 0: replacement"));
    let (code, _, err) = control_client(&control, &["reload", "nosuch"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no pool 'nosuch' here (pools: web, queue)"),
        "{err}"
    );

    // The queue's only worker dies (restart never): the pool is dead, the web pool is
    // stopped gracefully, and the container exits with the queue worker's status.
    let queue = queue_pid(&run);
    // SAFETY: kill(2) has no memory effects.
    unsafe { libc::kill(queue, libc::SIGKILL) };
    assert_eq!(run.exit_code(SECS(20)), 128 + libc::SIGKILL);
    let err = run.stderr();
    assert!(
        err.contains("pool queue died (exit 137): stopping the container"),
        "{err}"
    );
    assert!(
        err.contains("pool web: pool queue died: stopping 2 workers"),
        "{err}"
    );
    // The web workers drained and exited on their own (the hello server exits 0 on SIGTERM).
    let clean = err
        .lines()
        .filter(|l| l.contains("pool web: worker ") && l.ends_with("exited: exit code 0"))
        .count();
    assert_eq!(clean, 2, "{err}");
}

#[test]
fn only_runs_the_pools_named() {
    require("node");
    let dir = scratch("pools-only");
    let port = free_port();
    let file = web_and_queue(&dir, port, "");
    let control = control_name("only");
    let mut run = Run::start(
        &["-c", &file, "--only", "web"],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr("pool web: worker 1 ready", 1, SECS(20));
    assert!(get_json(port).is_ok());
    let (_, out, _) = control_client(&control, &["status"]);
    assert!(out.contains("pool web (socket, running)"), "{out}");
    assert!(!out.contains("queue"), "{out}");
    assert!(!run.stdout().contains("queue ready"));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0);

    // The variable too, and an unknown name is refused by name.
    let (code, _, err) = run_to_end(&["-c", &file], &[("COREPOOL_ONLY", "web,nosuch")], SECS(10));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("invalid value for COREPOOL_ONLY: no pool 'nosuch' (pools: web, queue)"),
        "{err}"
    );
}

/// `[pool.migrate]` (oneshot, sh: `script`), `[pool.web]` after it, whose worker says
/// whether the migration's file exists when it starts, and `[pool.queue]` beside them, which
/// writes `queue-ready` once its trap is set and says if it is stopped.
fn migrate_then_web(dir: &Path, script: &str) -> String {
    let marker = dir.join("migrated");
    let web = dir.join("web.sh");
    write_executable(
        &web,
        format!(
            "#!/bin/sh\ntrap 'exit 0' TERM\nif [ -e {m} ]; then echo \"web saw $(cat {m})\"; \
             else echo web saw nothing; fi\nwhile :; do sleep 0.1; done\n",
            m = marker.display()
        ),
    );
    let queue = dir.join("queue.sh");
    write_executable(
        &queue,
        format!(
            "#!/bin/sh\ntrap 'echo queue got TERM; exit 0' TERM\ntouch {}\n\
             while :; do sleep 0.1; done\n",
            dir.join("queue-ready").display()
        ),
    );
    let file = dir.join("corepool.toml");
    let script = script
        .replace("MARKER", &marker.display().to_string())
        .replace("DIR", &dir.display().to_string());
    std::fs::write(
        &file,
        format!(
            "balance = \"none\"\nlog_format = \"prefix\"\n\n[pool.web]\ncommand = [\"{}\"]\ninstances = 1\n\
             after = [\"migrate\"]\n\n[pool.migrate]\ncommand = [\"sh\", \"-c\", {}]\n\
             oneshot = true\ninstances = 1\n\n[pool.queue]\ncommand = [\"{}\"]\ninstances = 1\n",
            web.display(),
            toml_string(&script),
            queue.display()
        ),
    )
    .unwrap();
    file.display().to_string()
}

fn toml_string(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[test]
fn a_pool_waits_for_its_oneshot_migration() {
    let dir = scratch("pools-after");
    // The migration ends once the queue pool runs beside it: its end must not stop the queue.
    let file = migrate_then_web(
        &dir,
        "while [ ! -e DIR/queue-ready ]; do sleep 0.05; done; echo schema-v2 > MARKER; exit 0",
    );
    let mut run = Run::start(&["-c", &file], &[]);
    run.wait_stdout("web saw", 1, SECS(20));
    assert!(
        run.stdout().contains("web saw schema-v2"),
        "{}",
        run.stdout()
    );
    let err = run.stderr();
    let finished = err.find("pool migrate: finished (oneshot)").expect(&err);
    let started = err.find("pool web: worker 0 started").expect(&err);
    assert!(finished < started, "{err}");
    // The migration's end stopped nothing: web and queue serve on until told to stop.
    std::thread::sleep(SECS(1));
    assert!(run.child.try_wait().unwrap().is_none(), "{}", run.stderr());
    assert!(!run.stdout().contains("queue got TERM"), "{}", run.stderr());
    assert!(!run.stderr().contains("stray"), "{}", run.stderr());
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
    assert!(run.stdout().contains("queue got TERM"), "{}", run.stdout());
}

#[test]
fn a_failing_migration_stops_the_container_with_its_code() {
    let dir = scratch("pools-after-fail");
    let file = migrate_then_web(&dir, "echo migration failed >&2; exit 4");
    let (code, out, err) = run_to_end(&["-c", &file], &[], SECS(20));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("pool migrate died (exit 4)"), "{err}");
    assert!(!err.contains("pool web: worker 0 started"), "{err}");
    assert!(!out.contains("web saw"), "{out}");
}

#[test]
fn pool_configuration_errors_and_the_cpu_split() {
    let dir = scratch("pools-config");
    let file = dir.join("corepool.toml");
    let check = |text: &str, needle: &str| {
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = run_to_end(
            &["-c", file.to_str().unwrap(), "--print-config"],
            &[],
            SECS(10),
        );
        assert_eq!(code, 2, "{text}\n{out}{err}");
        assert!(err.contains(needle), "{needle} missing in: {err}");
    };
    check(
        "[pool.a]\ncommand = [\"true\"]\nport = 4000\nbalance = \"socket\"\n[pool.b]\n\
         command = [\"true\"]\nport = 4000\nbalance = \"proxy\"\n",
        "pool b: port 4000 is pool a's too",
    );
    check(
        "[pool.a]\ncommand = [\"true\"]\nafter = [\"b\"]\n[pool.b]\ncommand = [\"true\"]\nport = 4001\n",
        "[pool.a] after: pool 'b' is not oneshot = true",
    );
    check(
        "[pool.a]\ncommand = [\"true\"]\n\ninstances = \"lots\"\n",
        "pool a: invalid value for ",
    );
    check(
        "[pool.a]\ncommand = [\"true\"]\nlog_level = \"debug\"\n",
        ":3: [pool.a] log_level: concerns the whole container",
    );
    check(
        "[pool.a]\ncommand = [\"true\"]\noneshot = true\nrestart = \"always\"\n",
        ":4: [pool.a] restart: a oneshot pool needs restart",
    );
    // Two pools with instances = max split the CPUs by cpu_share, equally by default: one
    // each of the 2 that taskset leaves corepool (not 2 each).
    std::fs::write(
        &file,
        "[pool.a]\ncommand = [\"true\"]\nport = 4002\n[pool.b]\ncommand = [\"true\"]\n\
         port = 4003\n",
    )
    .unwrap();
    let out = Command::new("taskset")
        .args([
            "-c",
            "0,1",
            bin(),
            "-c",
            file.to_str().unwrap(),
            "--print-config",
        ])
        .env_remove("WEB_CONCURRENCY")
        .env_remove("COREPOOL_INSTANCES")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("instances = 1  # default: max = 1 usable CPU")
            .count(),
        2,
        "{text}"
    );
    assert_eq!(
        text.matches("this pool's cpu_share 1 of 2: 1 of 2 usable CPUs")
            .count(),
        2,
        "{text}"
    );
}

/// `corepool scale POOL N` with two pools: the pool named grows and shrinks (its metrics and
/// status follow, with the pool label), the other keeps its one worker untouched; without a
/// name, or with an unknown one, the scale is refused with the pools' names.
#[test]
fn scale_changes_the_named_pool_only() {
    require("node");
    let dir = scratch("pools-scale");
    let (port, metrics) = (free_port(), free_port());
    let file = web_and_queue(&dir, port, "");
    let control = control_name("scale");
    let mut run = Run::start(
        &["-c", &file, "--metrics", &format!("127.0.0.1:{metrics}")],
        &[("COREPOOL_CONTROL", &control)],
    );
    run.wait_stderr("pool web: worker 0 ready", 1, SECS(20));
    run.wait_stderr("pool web: worker 1 ready", 1, SECS(20));
    run.wait_stdout("queue ready", 1, SECS(20));
    let queue = queue_pid(&run);

    // Several pools: a name is needed, and must exist.
    let (code, _, err) = control_client(&control, &["scale", "+1"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("2 pools run here (web, queue): name one"),
        "{err}"
    );
    let (code, _, err) = control_client(&control, &["scale", "nosuch", "3"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("no pool 'nosuch' here (pools: web, queue)"),
        "{err}"
    );

    let (code, out, err) = control_client(&control, &["scale", "web", "3"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: scaling from 2 to 3 workers"),
        "{err}"
    );
    run.wait_stderr("pool web: worker 2 ready", 1, SECS(20));
    // The new slot serves on the web pool's port: three workers answer.
    let seen = workers_answering(port, 60);
    assert_eq!(seen.len(), 3, "{seen:?}");
    let text = get_ok(metrics, "/metrics").unwrap();
    for needle in [
        "corepool_workers_configured{pool=\"web\"} 3",
        "corepool_workers_configured{pool=\"queue\"} 1",
        "corepool_workers_pinned{pool=\"web\"} 1",
        "corepool_workers_pinned{pool=\"queue\"} 0",
        "corepool_workers_ready{pool=\"web\"} 3",
        "corepool_workers_ready{pool=\"queue\"} 1",
    ] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
    let (_, json, _) = control_client(&control, &["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (&json["pools"][0]["name"], &json["pools"][0]["instances"]),
        (&serde_json::json!("web"), &serde_json::json!(3)),
        "{json}"
    );
    assert_eq!(json["pools"][0]["pinned"], true, "{json}");
    assert_eq!(json["pools"][1]["instances"], 1, "{json}");
    assert_eq!(json["pools"][1]["pinned"], false, "{json}");
    let (_, table, _) = control_client(&control, &["status"]);
    assert!(
        table.contains("pool web (socket, running, count pinned by corepool scale)"),
        "{table}"
    );

    // Down to one: the highest slots leave, the web pool still answers.
    let (code, out, err) = control_client(&control, &["scale", "web", "-2"]);
    assert_eq!(
        (code, out.trim()),
        (0, "ok: scaling from 3 to 1 workers"),
        "{err}"
    );
    run.wait_stderr("removed by a scale, exited", 2, SECS(20));
    let err = run.stderr();
    assert!(
        err.contains("pool web: worker 2 (pid") && err.contains("pool web: worker 1 (pid"),
        "{err}"
    );
    for _ in 0..20 {
        let answer = get_json(port).expect("web answers");
        assert_eq!(answer["worker"], "0", "{answer}");
    }
    let text = get_ok(metrics, "/metrics").unwrap();
    assert!(
        text.contains("corepool_workers_configured{pool=\"web\"} 1"),
        "{text}"
    );

    // The queue pool was never touched: same worker, no stop, no new one.
    assert!(exists(queue));
    assert_eq!(queue_pid(&run), queue);
    assert!(!run.stdout().contains("queue got TERM"), "{}", run.stdout());
    let err = run.stderr();
    assert!(!err.contains("pool queue: scaling"), "{err}");
    assert!(!err.contains("pool queue: worker 1"), "{err}");
    run.assert_stdout_count("queue ready", 1);

    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
}

#[test]
fn a_oneshot_pool_runs_one_process_on_no_port_by_default() {
    // Two copies of a migration would race each other, and a oneshot never listens: without
    // `instances` and `balance` of its own it is one process in none mode (and explicit values
    // still win).
    let dir = scratch("pools-oneshot-defaults");
    let file = dir.join("corepool.toml");
    std::fs::write(
        &file,
        "[pool.migrate]\ncommand = [\"sh\", \"-c\", \"echo migration ran\"]\noneshot = true\n\n\
         [pool.twice]\ncommand = [\"sh\", \"-c\", \"echo twice ran\"]\noneshot = true\n\
         instances = 2\nbalance = \"none\"\n",
    )
    .unwrap();
    // Without the harness's COREPOOL_BALANCE=none, so that the defaults act; `timeout` bounds it.
    let corepool = |extra: &[&str]| {
        let out = Command::new("timeout")
            .args(["20", bin(), "-c"])
            .arg(&file)
            .args(extra)
            .env_remove("COREPOOL_BALANCE")
            .env_remove("WEB_CONCURRENCY")
            .output()
            .expect("run corepool under timeout(1)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = corepool(&["--print-config"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("instances = 1  # default for a oneshot pool"),
        "{out}"
    );
    assert!(
        out.contains("balance = \"none\"  # default for a oneshot pool"),
        "{out}"
    );
    let (code, out, err) = corepool(&[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.matches("migration ran").count(), 1, "{out}");
    assert_eq!(out.matches("twice ran").count(), 2, "{out}");
    assert!(!err.contains("balance socket"), "{err}");
}

#[test]
fn a_workers_own_pool_member_is_kept_apart_from_corepools_in_json_lines() {
    // Under --log-format json with several pools corepool names each line's pool in "pool": a
    // worker's own JSON "pool" member must not make a second one (JSON readers keep either).
    let dir = scratch("pools-json-pool-key");
    let file = dir.join("corepool.toml");
    let line = r#"{"pool":"db-primary","app_pool":1,"msg":"hi"}"#;
    let script =
        format!("trap 'exit 0' TERM; echo '{line}'; echo plain; while :; do sleep 0.1; done");
    std::fs::write(
        &file,
        format!(
            "log_format = \"json\"\nbalance = \"none\"\n\n\
             [pool.web]\ncommand = [\"sh\", \"-c\", {0}]\ninstances = 1\n\n\
             [pool.jobs]\ncommand = [\"sh\", \"-c\", {0}]\ninstances = 1\n",
            toml_string(&script)
        ),
    )
    .unwrap();
    let mut run = Run::start(&["-c", file.to_str().unwrap()], &[]);
    run.wait_stdout("\"msg\":\"plain\"", 2, SECS(20));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(20)), 0, "{}", run.stderr());
    let out = run.stdout();
    let mut pools = Vec::new();
    for text in out.lines() {
        assert_eq!(
            text.matches("\"pool\":").count(),
            1,
            "one pool member: {text}"
        );
        let v: serde_json::Value = serde_json::from_str(text).expect("a JSON line");
        if v["msg"] == "hi" {
            // The worker's members are kept, renamed past the names already taken.
            assert_eq!(v["app_app_pool"], "db-primary", "{text}");
            assert_eq!(v["app_pool"], 1, "{text}");
            pools.push(v["pool"].as_str().unwrap_or("").to_string());
        }
    }
    pools.sort();
    assert_eq!(pools, ["jobs", "web"], "{out}");
}
