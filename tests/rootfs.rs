//! corepool as PID 1 of a minimal, read-only root filesystem made here: the static release
//! binary and busybox (Debian's busybox-static) in an empty directory, entered with
//! `unshare --pid --mount --fork` and `chroot`. No shell, libc or Node on the image side: this
//! is what a `FROM scratch` image with corepool looks like. It must serve, reap and stop cleanly.

mod common;

use common::*;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn static_binary() -> String {
    fixture("build-static.sh", &[])
}

fn make_rootfs(root: &Path, corepool: &str) {
    for dir in ["bin", "proc", "dev", "www", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("copy busybox");
    for applet in ["sh", "httpd", "sleep", "touch", "cat"] {
        symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::copy(corepool, root.join("corepool")).expect("copy corepool");
    std::fs::write(root.join("www/index.html"), "hello from a busybox worker\n").unwrap();
    let status = Command::new("mknod")
        .args([root.join("dev/null").to_str().unwrap(), "c", "1", "3"])
        .status()
        .unwrap();
    assert!(status.success(), "mknod /dev/null");
}

/// The pid (as seen from here) of the process named `name` below `ancestor`.
fn descendant_named(ancestor: i32, name: &str) -> Option<i32> {
    let mut frontier = vec![ancestor];
    while let Some(pid) = frontier.pop() {
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name) {
            return Some(pid);
        }
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                frontier.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
    None
}

#[test]
fn pid1_in_a_read_only_busybox_root_serves_reaps_and_stops() {
    require("unshare");
    require("chroot");
    require("mknod");
    assert!(
        Path::new("/bin/busybox").exists(),
        "prerequisite missing: /bin/busybox (Debian package busybox-static)"
    );
    let corepool = static_binary();
    let root = scratch("rootfs");
    make_rootfs(&root, &corepool);
    let port = free_port();
    let r = root.to_str().unwrap();
    // Each worker leaves an orphan behind (re-parented to PID 1), checks that / is read-only,
    // then becomes a busybox web server on its private port.
    let worker = "(sleep 0.2 &); touch /probe 2>/dev/null && echo root-is-WRITABLE || echo root-is-read-only; \
                  exec httpd -f -p 127.0.0.1:$PORT -h /www";
    let script = format!(
        "mount --make-rprivate / && mount --bind {r} {r} && mount -o remount,bind,ro {r} && \
         mount -t proc proc {r}/proc && exec chroot {r} /corepool -i 2 --balance proxy --host 127.0.0.1 -p {port} \
         --kill-timeout 3s -- /bin/sh -c '{worker}'"
    );
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--mount",
        "--fork",
        "--kill-child=SIGTERM",
        "sh",
        "-c",
        &script,
    ]);
    let mut run = Run::from_command(
        cmd,
        &[(
            "COREPOOL_CONTROL",
            &format!("cp-rootfs-{}", std::process::id()),
        )],
    );
    run.wait_stderr(" ready (pid", 2, SECS(15));
    assert!(
        run.stderr().contains("running as PID 1"),
        "{}",
        run.stderr()
    );
    assert_eq!(
        run.stdout().matches("root-is-read-only").count(),
        2,
        "{}",
        run.stdout()
    );

    for _ in 0..20 {
        let page = get_ok(port, "/index.html").expect("request through corepool");
        assert!(page.contains("hello from a busybox worker"), "{page}");
    }

    let pid1 = descendant_named(run.pid(), "corepool").expect("corepool below unshare");
    // The orphaned sleeps have exited by now; PID 1 must have reaped them.
    let deadline = Instant::now() + SECS(3);
    while !zombies_of(pid1).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        zombies_of(pid1),
        Vec::<i32>::new(),
        "zombies left under PID 1"
    );

    // SAFETY: kill(2) on corepool's pid as seen from this namespace.
    assert_eq!(unsafe { libc::kill(pid1, libc::SIGTERM) }, 0);
    assert_eq!(run.exit_code(SECS(10)), 0, "{}", run.stderr());
    assert!(
        run.stderr().contains("exiting with code 0"),
        "{}",
        run.stderr()
    );
    let _ = std::fs::remove_dir_all(&root);
}
