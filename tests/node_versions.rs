//! Socket mode on every Node.js line corepool supports, with the official builds of each (fetched
//! once from the npm registry by tests/fixtures/nodes/fetch.sh into target/nodes): the preload is
//! loaded the way that version allows (`--import` of a data: URL from 18.18 on, `--require` of a
//! file, removed at exit, before), and an unmodified CommonJS server and an ES module server both adopt the shared
//! socket, see the client's address, report the public port, and stop gracefully.
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

/// Two workers of `server` under the given node: both answer on the one port with the client's
/// address, both print the public port, and a SIGTERM stops them with code 0. Returns stderr.
fn pool_serves(node: &Path, server: &Path) -> String {
    let port = free_port();
    let mut run = Run::start(
        &socket_args(
            2,
            port,
            &["--", node.to_str().unwrap(), server.to_str().unwrap()],
        ),
        &[],
    );
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

fn check(version: &str, line: &str, preload: &str) {
    let node = node(version);
    for server in [PathBuf::from(HELLO), esm_server()] {
        let stderr = pool_serves(&node, &server);
        assert!(
            stderr.contains(&format!("{preload} ")) && stderr.contains(&format!("(node {line}")),
            "Node {version} should load the preload by {preload}:\n{stderr}"
        );
        if let Some((_, rest)) = stderr.split_once("Node preload via --require ") {
            let file = rest.split_whitespace().next().unwrap();
            assert!(
                !std::path::Path::new(file).exists(),
                "the preload {file} outlived corepool"
            );
        }
    }
}

#[test]
fn node_18_19_imports_the_preload_from_a_data_url() {
    check("18.19.1", "18.19", "--import of a data: URL");
}

#[test]
fn node_18_18_imports_the_preload_from_a_data_url() {
    check("18.18.2", "18.18", "--import of a data: URL");
}

#[test]
fn node_18_17_requires_the_preload_from_a_file_removed_at_exit() {
    check("18.17.1", "18.17", "--require");
}

#[test]
fn node_22_imports_the_preload_from_a_data_url() {
    check("22.23.3", "22.23", "--import of a data: URL");
}
