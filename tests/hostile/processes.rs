//! Secrets on disk and the processes of `imaged dev`: a key file another local user can read,
//! a `redis-server` left running by a killed cluster, and two clusters on one data directory.

use crate::common::dev::*;
use crate::common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The pids of the live (not zombie) processes whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Some((state, ppid)) = stat(pid) {
            if ppid == parent && state != 'Z' {
                children.push(pid);
            }
        }
    }
    children
}

/// A process's state letter and parent pid, from `/proc/<pid>/stat`.
fn stat(pid: u32) -> Option<(char, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn alive(pid: u32) -> bool {
    stat(pid).is_some_and(|(state, _)| state != 'Z')
}

/// Live `redis-server` processes working in `<data>/redis` (Redis changes into its `--dir`,
/// and rewrites its command line, so the working directory is what tells).
fn redis_servers_on(data: &Path) -> Vec<u32> {
    let dir = data.join("redis");
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok();
        if comm.trim() == "redis-server" && cwd.as_deref() == Some(dir.as_path()) && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

fn kill9(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[test]
fn kill_9_of_imaged_dev_leaves_no_child_running() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut dev = start_dev(&data, "ap-guangzhou", None);
    let children = children_of(dev.id());
    assert!(
        !redis_servers_on(&data).is_empty(),
        "imaged dev started its redis-server"
    );
    assert!(!children.is_empty(), "imaged dev has children");
    kill9(&mut dev);
    let deadline = Instant::now() + Duration::from_secs(10);
    while children.iter().any(|pid| alive(*pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let left: Vec<u32> = children.iter().copied().filter(|pid| alive(*pid)).collect();
    assert!(
        left.is_empty(),
        "children of the killed imaged dev still running after 10 s: {left:?}"
    );
}

#[test]
fn a_cluster_restarted_after_kill_9_runs_one_redis_on_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut dev = start_dev(&data, "ap-guangzhou", None);
    kill9(&mut dev);
    // At once, as a supervisor restarting a crashed cluster would.
    let dev = start_dev(&data, "ap-guangzhou", None);
    assert_eq!(
        redis_servers_on(&data).len(),
        1,
        "one redis-server on the cluster's AOF directory"
    );
    stop(dev);
    assert!(
        redis_servers_on(&data).is_empty(),
        "redis-server stops with the cluster"
    );
}

#[test]
fn a_second_cluster_on_a_data_directory_in_use_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = start_dev(&data, "ap-guangzhou", None);
    let second = Command::new(IMAGED)
        .args(["dev", "--base-port", "0", "--regions", "ap-guangzhou"])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("REDIS_URL")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second cluster must not start"
    );
    assert!(
        stderr.contains("in use") && stderr.contains(&data.display().to_string()),
        "the refusal names the directory and why: {stderr}"
    );
    assert!(
        stderr.contains(&first.id().to_string()),
        "the refusal names the holder's pid: {stderr}"
    );
    assert_eq!(redis_servers_on(&data).len(), 1, "no second redis-server");
    stop(first);
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn secrets_are_owner_only_and_data_directories_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let dev = start_dev(&data, "ap-guangzhou", None);
    let cluster_file = data.join("cluster.json");
    // The stores are open (their WAL files exist) and answer.
    let images = json(&imagectl(
        &cluster_file,
        &[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--output",
            "json",
        ],
    ));
    assert!(images.is_object() || images.is_array());
    let mut files = vec![cluster_file.clone(), data.join("service.key")];
    for db in [
        data.join("catalog").join("catalog.db"),
        data.join("regions")
            .join("ap-guangzhou")
            .join("metadata.db"),
    ] {
        for suffix in ["", "-wal", "-shm"] {
            let mut name = db.clone().into_os_string();
            name.push(suffix);
            files.push(name.into());
        }
    }
    for file in &files {
        assert_eq!(mode(file), 0o600, "{} is owner-only", file.display());
    }
    for sub in ["", "catalog", "regions/ap-guangzhou", "redis"] {
        let d = data.join(sub);
        assert_eq!(mode(&d), 0o700, "{} is private", d.display());
    }
    // Redis's append-only files hold every share.
    for entry in walk(&data.join("redis")) {
        if entry.is_file() {
            assert_eq!(mode(&entry) & 0o077, 0, "{} is owner-only", entry.display());
        }
    }
    stop(dev);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path);
    }
    out
}
