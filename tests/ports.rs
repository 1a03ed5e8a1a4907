//! Every port the app listens on is shared by all workers, as Node's cluster (and pm2's
//! cluster mode) shares them: `--port 3000,4041` (also `COREPOOL_PORT`, `port = [..]`) binds
//! a socket group per port and the preload maps each `listen()` to its descriptor; a port not
//! in the list is shared with `reusePort` where Node has it (22.12+), else it gets a one-line
//! hint naming the flag, and no restart loop. Bad lists are one-line exit-2 errors.
//! The app is tests/fixtures/twoports/server.js: a public server and an admin server.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::PathBuf;

const APP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/twoports/server.js"
);

/// Which workers answered `n` requests on `port`, and the last answer.
fn workers_on(port: u16, n: usize) -> (HashSet<String>, serde_json::Value) {
    let mut seen = HashSet::new();
    let mut last = serde_json::Value::Null;
    for _ in 0..n {
        let v = get_json(port).unwrap_or_else(|e| panic!("port {port}: {e}"));
        seen.insert(v["worker"].as_str().unwrap_or("?").to_string());
        last = v;
    }
    (seen, last)
}

fn start_pool(node: &str, ports: &str, admin: u16, extra_env: &[(&str, &str)]) -> Run {
    let admin = admin.to_string();
    let mut env = vec![("ADMIN_PORT", admin.as_str())];
    env.extend_from_slice(extra_env);
    let mut args: Vec<&str> = vec!["-i", "2", "--balance", "socket", "--host", "127.0.0.1"];
    if !ports.is_empty() {
        args.extend(["-p", ports]);
    }
    args.extend(["--", node, APP]);
    Run::start(&args, &env)
}

#[test]
fn both_listed_ports_are_answered_by_both_workers() {
    let (main, admin) = (free_port(), free_port());
    let run = start_pool("node", &format!("{main},{admin}"), admin, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    run.wait_stdout("admin listening", 2, SECS(10));
    let (on_main, v) = workers_on(main, 60);
    assert_eq!(on_main.len(), 2, "main port {main}: {on_main:?}");
    assert_eq!(v["name"], "main");
    let (on_admin, v) = workers_on(admin, 60);
    assert_eq!(on_admin.len(), 2, "admin port {admin}: {on_admin:?}");
    assert_eq!(v["name"], "admin");
    // systemd's convention: LISTEN_FDS descriptors from fd 3, named in order.
    assert_eq!(v["listen_fds"], "2", "{v}");
    assert_eq!(
        v["listen_fdnames"],
        format!("port-{main}:port-{admin}"),
        "{v}"
    );
    let stderr = run.stderr();
    assert!(!stderr.contains("EADDRINUSE"), "{stderr}");
    assert_eq!(started_pids(&stderr).len(), 2, "no restart: {stderr}");
}

#[test]
fn a_port_list_from_the_file_and_from_the_variable() {
    let (main, admin) = (free_port(), free_port());
    let dir = scratch("ports-file");
    let file = dir.join("corepool.toml");
    std::fs::write(
        &file,
        format!("port = [{main}, {admin}]\nhost = \"127.0.0.1\"\ninstances = 2\n"),
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let run = Run::start(
        &["--config", file, "--balance", "socket", "--", "node", APP],
        &[("ADMIN_PORT", &admin.to_string())],
    );
    run.wait_stderr(" ready (pid", 2, SECS(15));
    run.wait_stdout("admin listening", 2, SECS(10));
    assert_eq!(workers_on(main, 40).0.len(), 2);
    assert_eq!(workers_on(admin, 40).0.len(), 2);
    drop(run);

    // --print-config writes the list back as a TOML array (and one port as a number).
    let (code, out, err) = run_to_end(
        &["--config", file, "--balance", "socket", "--print-config"],
        &[],
        SECS(10),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("port = [{main}, {admin}]")), "{out}");
    let list = format!("{main},{admin}");
    let (code, out, err) = run_to_end(
        &["--balance", "socket", "--print-config"],
        &[("COREPOOL_PORT", list.as_str())],
        SECS(10),
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&format!("port = [{main}, {admin}]  # env COREPOOL_PORT")),
        "{out}"
    );
    let (_, out, _) = run_to_end(&["-p", "3000", "--print-config"], &[], SECS(10));
    assert!(out.contains("port = 3000  #"), "{out}");
}

#[test]
fn an_unlisted_port_gets_a_one_line_hint_and_no_restart_loop() {
    // Node 20 (the machine's) has no reusePort: the second worker's bind fails.
    let (main, admin) = (free_port(), free_port());
    let run = start_pool("node", &main.to_string(), admin, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    let hint = format!("port {admin} is not shared by the pool");
    run.wait_stderr(&hint, 1, SECS(10));
    // Time for a crash and a restart, were there one.
    std::thread::sleep(SECS(2));
    let stderr = run.stderr();
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(&hint)).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].contains(&format!("--port {main},{admin}")),
        "the hint names the flag that fixes it: {}",
        lines[0]
    );
    assert!(!stderr.contains(" exited"), "no worker died: {stderr}");
    assert_eq!(started_pids(&stderr).len(), 2, "no restart: {stderr}");
    // The pool serves on: both workers on the main port, the admin port by the one that has it.
    assert_eq!(workers_on(main, 60).0.len(), 2);
    assert_eq!(workers_on(admin, 10).0.len(), 1);
}

#[test]
fn an_unlisted_port_is_shared_with_reuse_port_on_node_22() {
    require("npm");
    let cache = concat!(env!("CARGO_MANIFEST_DIR"), "/target/nodes");
    let node = PathBuf::from(fixture(
        "tests/fixtures/nodes/fetch.sh",
        &["22.23.3", cache],
    ));
    let (main, admin) = (free_port(), free_port());
    let run = start_pool(node.to_str().unwrap(), &main.to_string(), admin, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(20));
    run.wait_stdout("admin listening", 2, SECS(10));
    assert_eq!(workers_on(main, 60).0.len(), 2);
    let (on_admin, _) = workers_on(admin, 60);
    assert_eq!(on_admin.len(), 2, "admin port {admin}: {on_admin:?}");
    let stderr = run.stderr();
    assert!(!stderr.contains("is not shared"), "{stderr}");
    assert_eq!(started_pids(&stderr).len(), 2, "no restart: {stderr}");
}

#[test]
fn bad_port_lists_exit_2_naming_the_culprit() {
    let many: Vec<String> = (20000..20017).map(|p| p.to_string()).collect();
    let many = many.join(",");
    for (args, env, expect) in [
        (
            vec!["-p", "3000,3000"],
            vec![],
            "invalid value for --port: port 3000 is listed twice",
        ),
        (
            vec!["-p", "3000,0"],
            vec![],
            "invalid value for --port: '0' is not a port",
        ),
        (
            vec!["-p", "3000,http"],
            vec![],
            "invalid value for --port: 'http' is not a port",
        ),
        (
            vec!["-p", many.as_str()],
            vec![],
            "invalid value for --port: 17 ports listed, at most 16",
        ),
        (
            vec![],
            vec![("COREPOOL_PORT", "3000,x")],
            "invalid value for COREPOOL_PORT: 'x' is not a port",
        ),
        (
            vec!["-p", "3000,4041", "--balance", "proxy"],
            vec![],
            "invalid value for --port: a list of ports needs --balance socket",
        ),
        (
            vec!["-p", "3000,4041", "--balance", "none"],
            vec![],
            "invalid value for --port: a list of ports needs --balance socket",
        ),
    ] {
        let mut all = args.clone();
        if !args.contains(&"--balance") {
            all.extend(["--balance", "socket"]);
        }
        all.extend(["--", "true"]);
        let (code, _, err) = run_to_end(&all, &env, SECS(10));
        assert_eq!(code, 2, "{args:?} {env:?}: {err}");
        assert!(err.contains(expect), "{args:?} {env:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    }
    let dir = scratch("ports-bad-file");
    let file = dir.join("corepool.toml");
    std::fs::write(&file, "instances = 1\nport = [3000, 3000]\n").unwrap();
    let file = file.to_str().unwrap();
    let (code, _, err) = run_to_end(
        &["--config", file, "--balance", "socket", "--", "true"],
        &[],
        SECS(10),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("{file}:2: port: port 3000 is listed twice")),
        "{err}"
    );
    std::fs::write(file, "port = [3000, true]\n").unwrap();
    let (code, _, err) = run_to_end(
        &["--config", file, "--balance", "socket", "--", "true"],
        &[],
        SECS(10),
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{file}:1: port")), "{err}");
}

#[test]
fn a_server_behind_a_launcher_gets_every_port() {
    // A plain Node wrapper (as npm start is) that spawns the server with stdio inherited: the
    // preload hands every port's descriptor down to it.
    let dir = scratch("ports-launcher");
    let wrapper = dir.join("wrap.js");
    std::fs::write(
        &wrapper,
        "const { spawn } = require('child_process');\n\
         const child = spawn(process.execPath, [process.argv[2]], { stdio: 'inherit' });\n\
         child.on('exit', (code) => process.exit(code ?? 1));\n\
         process.on('SIGTERM', () => child.kill('SIGTERM'));\n",
    )
    .unwrap();
    let (main, admin) = (free_port(), free_port());
    let admin_text = admin.to_string();
    let list = format!("{main},{admin}");
    let run = Run::start(
        &pool_args(
            2,
            "socket",
            &list,
            &["--", "node", wrapper.to_str().unwrap(), APP],
        ),
        &[("ADMIN_PORT", &admin_text)],
    );
    run.wait_stderr(" ready (pid", 2, SECS(20));
    run.wait_stdout("admin listening", 2, SECS(10));
    let (on_admin, v) = workers_on(admin, 60);
    assert_eq!(on_admin.len(), 2, "admin port {admin}: {on_admin:?}");
    assert_eq!(workers_on(main, 60).0.len(), 2);
    let launchers = started_pids(&run.stderr());
    assert!(
        !launchers.contains(&(v["pid"].as_i64().unwrap() as i32)),
        "the launcher's child serves, not the launcher: {v}"
    );
    assert_eq!(v["listen_fdnames"], format!("port-{main}:port-{admin}"));
}

#[test]
fn a_reload_loses_no_request_on_the_second_port() {
    let (main, admin) = (free_port(), free_port());
    let run = start_pool("node", &format!("{main},{admin}"), admin, &[]);
    run.wait_stderr(" ready (pid", 2, SECS(15));
    run.wait_stdout("admin listening", 2, SECS(10));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match get_json(admin) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    run.signal(libc::SIGHUP);
    run.wait_stderr("rolling reload complete", 1, SECS(30));
    run.wait_stdout("admin listening", 4, SECS(10));
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = client.join().unwrap();
    assert!(ok > 20, "only {ok} requests answered");
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    // Both replacements serve the second port.
    assert_eq!(workers_on(admin, 60).0.len(), 2);
}

#[test]
fn a_listed_port_in_use_fails_at_once_with_code_3() {
    let (main, admin) = (free_port(), free_port());
    let _stranger = std::net::TcpListener::bind(("127.0.0.1", admin)).unwrap();
    let list = format!("{main},{admin}");
    let args = pool_args(2, "socket", &list, &["--", "node", APP]);
    let (code, _, err) = run_to_end(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[],
        SECS(10),
    );
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(&format!("port {admin} is in use")),
        "names the port: {err}"
    );
    assert!(!err.contains(" started, pid"), "no worker started: {err}");
}
