//! `--user`: corepool stays root while its workers run as another user. The worker reports its
//! own ids, groups and HOME; it cannot signal, ptrace or read corepool; a Node server under
//! socket mode still adopts the shared port (the socket, the readiness pipe and the preload are
//! inherited or readable); unknown names and a non-root corepool are refused at start; a
//! credential change that the kernel refuses is one clear line. These tests run as root.

mod common;

use common::*;
use std::process::Command;

fn require_root() {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "prerequisite missing: tests/user.rs must run as root"
    );
}

/// What `id` says of a user, as root sees it in the system's databases.
fn id_of(flag: &str, user: &str) -> String {
    let out = Command::new("id").args([flag, user]).output().expect("id");
    assert!(out.status.success(), "id {flag} {user} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The home directory of `user` in /etc/passwd.
fn home_of(user: &str) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == user).then(|| f[5].to_string())
        })
        .unwrap_or_else(|| panic!("prerequisite missing: no user {user} in /etc/passwd"))
}

/// A worker that prints who it is, once: ids, groups and the user variables.
const WHOAMI: &str = "echo \"who uid=$(id -u) gid=$(id -g) groups=$(id -G) home=$HOME \
                      user=${USER-unset} logname=${LOGNAME-unset}\"";

/// Runs one worker under `--user USER` to its end; returns its "who ..." line.
fn who(user: &str) -> String {
    let args = [
        "-i",
        "1",
        "--restart",
        "never",
        "--user",
        user,
        "--",
        "sh",
        "-c",
        WHOAMI,
    ];
    // corepool's own variables name root: the worker must get the target user's instead.
    let env = [("HOME", "/root"), ("USER", "root"), ("LOGNAME", "root")];
    let (code, stdout, stderr) = run_to_end(&args, &env, SECS(20));
    assert_eq!(code, 0, "stderr:\n{stderr}");
    stdout
        .lines()
        .find(|l| l.starts_with("who "))
        .unwrap_or_else(|| panic!("no who line; stdout:\n{stdout}\nstderr:\n{stderr}"))
        .to_string()
}

#[test]
fn a_worker_runs_as_nobody_with_its_groups_and_home() {
    require_root();
    let expected = format!(
        "who uid={} gid={} groups={} home={} user=nobody logname=nobody",
        id_of("-u", "nobody"),
        id_of("-g", "nobody"),
        id_of("-G", "nobody"),
        home_of("nobody"),
    );
    assert_eq!(who("nobody"), expected);
    // The same user by number: the passwd entry of the uid gives its gid, groups and home.
    assert_eq!(who(&id_of("-u", "nobody")), expected);
}

#[test]
fn a_numeric_uid_without_entry_runs_with_gid_uid_and_home_root() {
    require_root();
    assert_eq!(
        who("12345:12345"),
        "who uid=12345 gid=12345 groups=12345 home=/ user=unset logname=unset"
    );
    // Without :GROUP the gid is the uid (not root's 0, as `docker --user 12345` would give).
    assert_eq!(
        who("12345"),
        "who uid=12345 gid=12345 groups=12345 home=/ user=unset logname=unset"
    );
    // A group by name for a uid without entry.
    let nogroup_gid = id_of("-g", "nobody");
    let nogroup = std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[2] == nogroup_gid).then(|| f[0].to_string())
        })
        .expect("a group named for nobody's gid");
    assert_eq!(
        who(&format!("12345:{nogroup}")),
        format!(
            "who uid=12345 gid={nogroup_gid} groups={nogroup_gid} home=/ user=unset logname=unset"
        )
    );
}

/// A private mount namespace whose /etc/passwd and /etc/group have a user `app` (2001) with a
/// primary group and two supplementary ones, so the groups come from /etc/group, not the host.
#[test]
fn supplementary_groups_come_from_etc_group() {
    require_root();
    require("unshare");
    let dir = scratch("user-etc");
    let passwd =
        std::fs::read_to_string("/etc/passwd").unwrap() + "app:x:2001:2001:app:/home/app:/bin/sh\n";
    let group = std::fs::read_to_string("/etc/group").unwrap()
        + "app:x:2001:\nshared:x:3001:other,app\nextra:x:3002:app\nnotmine:x:3003:other\n";
    std::fs::write(dir.join("passwd"), passwd).unwrap();
    std::fs::write(dir.join("group"), group).unwrap();
    let script = format!(
        "mount --bind {d}/passwd /etc/passwd && mount --bind {d}/group /etc/group && \
         exec \"$0\" \"$@\"",
        d = dir.display()
    );
    let run_as = |user: &str| {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .arg(bin())
            .args(["-i", "1", "--restart", "never", "--user", user, "--"])
            .args(["sh", "-c", WHOAMI]);
        let mut run = Run::from_command(cmd, &[]);
        let code = run.exit_code(SECS(20));
        assert_eq!(code, 0, "stderr:\n{}", run.stderr());
        run.stdout()
            .lines()
            .find(|l| l.starts_with("who "))
            .unwrap_or_else(|| panic!("no who line; stderr:\n{}", run.stderr()))
            .to_string()
    };
    assert_eq!(
        run_as("app"),
        "who uid=2001 gid=2001 groups=2001 3001 3002 home=/home/app user=app logname=app"
    );
    // An explicit group replaces the user's groups, as su-exec does.
    assert_eq!(
        run_as("app:extra"),
        "who uid=2001 gid=3002 groups=3002 home=/home/app user=app logname=app"
    );
}

#[test]
fn unknown_names_are_refused_at_start_naming_where_they_came_from() {
    let command = ["--", "sh", "-c", "echo worker-ran"];
    let mut args = vec!["--user", "no-such-user-xyz"];
    args.extend(command);
    let (code, stdout, stderr) = run_to_end(&args, &[], SECS(10));
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert_eq!(
        stderr.trim(),
        "corepool: invalid value for --user: no user 'no-such-user-xyz' in /etc/passwd"
    );
    assert!(!stdout.contains("worker-ran"));

    let (code, _, stderr) = run_to_end(
        &command,
        &[("COREPOOL_USER", "nobody:no-such-group-xyz")],
        SECS(10),
    );
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert_eq!(
        stderr.trim(),
        "corepool: invalid value for COREPOOL_USER: no group 'no-such-group-xyz' in /etc/group"
    );

    let file = scratch("user-file").join("corepool.toml");
    std::fs::write(&file, "instances = 1\nuser = \"no-such-user-xyz\"\n").unwrap();
    let config = file.to_str().unwrap();
    let mut args = vec!["--config", config];
    args.extend(command);
    let (code, _, stderr) = run_to_end(&args, &[], SECS(10));
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert_eq!(
        stderr.trim(),
        format!(
            "corepool: invalid value for {config}:2: user: no user 'no-such-user-xyz' in /etc/passwd"
        )
    );
}

#[test]
fn a_worker_cannot_signal_ptrace_or_read_corepool() {
    require_root();
    require("/usr/bin/python3");
    // $PPID is corepool: the worker's shell was forked by it.
    let script = r#"
kill -TERM $PPID 2>/dev/null && echo "term=sent" || echo "term=denied"
kill -0 $PPID 2>/dev/null && echo "probe=sent" || echo "probe=denied"
head -c 1 /proc/$PPID/environ >/dev/null 2>&1 && echo "environ=read" || echo "environ=denied"
head -c 1 /proc/$PPID/mem >/dev/null 2>&1 && echo "mem=opened" || echo "mem=denied"
/usr/bin/python3 -c '
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
import sys
rc = libc.ptrace(PTRACE_ATTACH, int(sys.argv[1]), None, None)
print("ptrace=%s" % ("attached" if rc == 0 else os.strerror(ctypes.get_errno())), flush=True)
' $PPID
echo checks-done
exec sleep 1000
"#;
    let run = Run::start(
        &["-i", "1", "--user", "nobody", "--", "sh", "-c", script],
        &[],
    );
    run.wait_stdout("checks-done", 1, SECS(20));
    let out = run.stdout();
    for expected in [
        "term=denied",
        "probe=denied",
        "environ=denied",
        "mem=denied",
        "ptrace=Operation not permitted",
    ] {
        assert!(out.contains(expected), "missing {expected} in:\n{out}");
    }
    // corepool got no SIGTERM and still runs its worker.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(exists(run.pid()), "corepool died:\n{}", run.stderr());
    assert!(
        !run.stderr().contains("SIGTERM"),
        "corepool saw a SIGTERM:\n{}",
        run.stderr()
    );
    let mut run = run;
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "stderr:\n{}", run.stderr());
}

#[test]
fn a_node_server_as_nobody_serves_the_shared_port() {
    require_root();
    require("node");
    let dir = scratch("user-node");
    let server = dir.join("server.js");
    std::fs::write(
        &server,
        "const http = require('http');\n\
         const s = http.createServer((req, res) => res.end(JSON.stringify({uid: \
         process.getuid(), gid: process.getgid(), worker: process.env.COREPOOL_WORKER, \
         home: process.env.HOME})));\n\
         s.listen(Number(process.env.PORT), () => console.log('listening'));\n\
         process.on('SIGTERM', () => s.close(() => process.exit(0)));\n",
    )
    .unwrap();
    let port = free_port();
    let mut args = socket_args(2, port, &["--user", "nobody", "--"]);
    args.extend(["node".to_string(), server.display().to_string()]);
    let mut run = Run::start(&args, &[]);
    // Ready means the preload adopted fd 3 and wrote READY=1 to the inherited pipe (fd 4).
    run.wait_stderr(" ready (pid", 2, SECS(20));
    let uid: u64 = id_of("-u", "nobody").parse().unwrap();
    let mut workers = std::collections::HashSet::new();
    for _ in 0..40 {
        let v = get_json(port).expect("request on the shared port");
        assert_eq!(v["uid"], uid, "{v}");
        assert_eq!(v["home"], home_of("nobody"), "{v}");
        workers.insert(v["worker"].as_str().unwrap().to_string());
    }
    assert_eq!(workers.len(), 2, "both workers serve: {workers:?}");
    run.signal(libc::SIGTERM);
    assert_eq!(run.exit_code(SECS(15)), 0, "stderr:\n{}", run.stderr());
}

#[test]
fn a_refused_credential_change_is_one_clear_line() {
    require_root();
    require("setpriv");
    // Root without CAP_SETUID and CAP_SETGID: the configuration is fine, the kernel says no.
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-setuid,-setgid", "--"])
        .arg(bin())
        .args([
            "-i",
            "1",
            "--user",
            "nobody",
            "--",
            "sh",
            "-c",
            "echo worker-ran",
        ]);
    let mut run = Run::from_command(cmd, &[]);
    let code = run.exit_code(SECS(20));
    let stderr = run.stderr();
    assert_eq!(code, 126, "stderr:\n{stderr}");
    assert!(!run.stdout().contains("worker-ran"));
    let line = stderr
        .lines()
        .find(|l| l.contains("cannot become user"))
        .unwrap_or_else(|| panic!("no credential error in:\n{stderr}"));
    let (uid, gid) = (id_of("-u", "nobody"), id_of("-g", "nobody"));
    let expected = format!(
        "sh: cannot become user nobody (uid {uid}, gid {gid}): setgroups: \
         Operation not permitted"
    );
    assert!(line.contains("cannot run "), "{line}");
    assert!(line.ends_with(&expected), "{line}");
}

#[test]
fn a_corepool_that_is_not_root_cannot_run_workers_as_another_user() {
    require_root();
    require("setpriv");
    let nobody = id_of("-u", "nobody");
    let as_nobody = |user: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            &nobody,
            "--regid",
            &nobody,
            "--clear-groups",
            "--",
        ])
        .arg(bin())
        .args(["-i", "1", "--restart", "never", "--user", user, "--"])
        .args(["sh", "-c", WHOAMI]);
        let mut run = Run::from_command(cmd, &[]);
        let code = run.exit_code(SECS(20));
        (code, run.stdout(), run.stderr())
    };
    let (code, stdout, stderr) = as_nobody("root");
    assert_eq!(code, 2, "stderr:\n{stderr}");
    assert!(!stdout.contains("who "));
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "corepool: invalid value for --user: corepool runs as uid {nobody} gid {nobody}, \
             not root"
        )),
        "{stderr}"
    );
    // Naming corepool's own user and group is no change: allowed.
    let (code, stdout, stderr) = as_nobody(&format!("{nobody}:{nobody}"));
    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert!(
        stdout.contains(&format!("who uid={nobody} gid={nobody} ")),
        "{stdout}"
    );
}

/// Changing the uid clears the parent-death signal: it must be armed after the switch, or a
/// SIGKILLed corepool leaves its workers holding the port.
#[test]
fn workers_as_another_user_do_not_outlive_a_killed_corepool() {
    require_root();
    let mut run = Run::start(&["-i", "2", "--user", "nobody", "--", "sleep", "60"], &[]);
    run.wait_stderr("started, pid", 2, SECS(10));
    let pids = started_pids(&run.stderr());
    run.child.kill().unwrap();
    run.child.wait().unwrap();
    let deadline = std::time::Instant::now() + SECS(3);
    while pids.iter().any(|&p| exists(p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    for pid in pids {
        assert!(!exists(pid), "worker {pid} outlived a SIGKILLed corepool");
    }
}
