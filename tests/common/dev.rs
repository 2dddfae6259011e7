//! `imaged dev` as a user runs it: started with a ready line, driven through `imagectl`, and
//! stopped with SIGTERM.

use super::{IMAGECTL, IMAGED};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `imagectl --cluster FILE ARGS...` and returns what it printed.
pub fn imagectl(cluster_file: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(cluster_file)
        .args(args)
        .output()
        .expect("imagectl runs")
}

/// The one JSON document `imagectl` printed.
pub fn json(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "imagectl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

/// Starts `imaged dev` and waits for its ready line; `path_env` replaces its `PATH`.
pub fn start_dev(dir: &std::path::Path, regions: &str, path_env: Option<&str>) -> DevProcess {
    let env: Vec<(&str, &str)> = path_env.map(|path| ("PATH", path)).into_iter().collect();
    start_dev_with_env(dir, regions, &env)
}

/// A running `imaged dev`: stopped with [`stop`]; killed when dropped (a test that fails midway
/// leaves no cluster behind: its children die with it).
pub struct DevProcess(Option<std::process::Child>);

impl std::ops::Deref for DevProcess {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        self.0.as_ref().expect("a running imaged dev")
    }
}

impl std::ops::DerefMut for DevProcess {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        self.0.as_mut().expect("a running imaged dev")
    }
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `imaged dev` with more environment variables and waits for its ready line.
pub fn start_dev_with_env(
    dir: &std::path::Path,
    regions: &str,
    env: &[(&str, &str)],
) -> DevProcess {
    start_dev_with(dir, regions, &[], env)
}

/// Starts `imaged dev` with more arguments (e.g. `--tls`) and environment variables, and waits
/// for its ready line.
pub fn start_dev_with(
    dir: &std::path::Path,
    regions: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> DevProcess {
    std::fs::create_dir_all(dir).unwrap();
    let mut command = Command::new(IMAGED);
    command
        .args(["dev", "--base-port", "0", "--regions", regions])
        .args(args)
        .arg("--data-dir")
        .arg(dir)
        .env_remove("REDIS_URL")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("imaged-dev.log")).unwrap());
    command.envs(env.iter().copied());
    let mut child = DevProcess(Some(command.spawn().unwrap()));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("a ready line");
        if line.contains("ready") {
            break;
        }
    }
    child
}

/// Stops `imaged dev` with SIGTERM and checks it exits cleanly.
pub fn stop(mut dev: DevProcess) {
    let mut child = dev.0.take().expect("a running imaged dev");
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("imaged dev did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "imaged dev exited with {status}");
}
