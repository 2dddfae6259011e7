//! Garage (an S3-compatible object store) for tests: one node, or several nodes in their own
//! zones, each a real `garage server` process on free loopback ports with its files under a
//! temporary directory; a bucket and an access key made with the `garage` CLI.

use super::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The `garage` binary: on `PATH`, else in `~/.cargo/bin` (where `cargo install garage` puts
/// it; `deploy/garage/ensure.sh` installs it there).
pub fn garage_binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("garage"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        let home = std::env::var_os("HOME")?;
        let f = Path::new(&home).join(".cargo/bin/garage");
        f.is_file().then_some(f)
    })
}

/// Starts a Garage cluster of `nodes` nodes (one zone each; replication factor `nodes`), or
/// prints why the test is skipped and returns `None` when `garage` cannot be found.
pub fn start_or_skip(test: &str, nodes: usize) -> Option<Garage> {
    match garage_binary() {
        Some(binary) => Some(Garage::start(binary, nodes)),
        None => {
            eprintln!(
                "SKIPPED {test}: the garage binary is not on PATH nor in ~/.cargo/bin \
                 (deploy/garage/ensure.sh installs it with `cargo install garage --locked`)"
            );
            None
        }
    }
}

/// One `garage server` process.
pub struct Node {
    pub config: PathBuf,
    pub rpc_port: u16,
    pub s3_port: u16,
    pub id: String,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Garage {
    pub dir: tempfile::TempDir,
    binary: PathBuf,
    pub nodes: Vec<Node>,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

/// The S3 region Garage answers to.
pub const S3_REGION: &str = "garage";

impl Garage {
    fn start(binary: PathBuf, nodes: usize) -> Garage {
        let dir = tempfile::tempdir().expect("temp dir");
        let secret: String = hex::encode(rand::random::<[u8; 32]>());
        let mut garage = Garage {
            dir,
            binary,
            nodes: Vec::new(),
            bucket: "imagefleet-chunks".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        for n in 0..nodes {
            let root = garage.dir.path().join(format!("node{n}"));
            std::fs::create_dir_all(&root).unwrap();
            let (rpc_port, s3_port, admin_port) = (free_port(), free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
replication_factor = {nodes}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{S3_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin_port}"
"#,
                    root = root.display(),
                ),
            )
            .unwrap();
            let mut node = Node {
                config,
                rpc_port,
                s3_port,
                id: String::new(),
                log: root.join("garage.log"),
                child: None,
            };
            garage.spawn(&mut node);
            node.id = garage.wait_node_id(&node);
            garage.nodes.push(node);
        }
        // Every node knows every other, then each gets a role in its own zone.
        for n in 1..garage.nodes.len() {
            let peer = format!(
                "{}@127.0.0.1:{}",
                garage.nodes[n].id, garage.nodes[n].rpc_port
            );
            garage.cli_retry(&["node", "connect", &peer]);
        }
        for n in 0..garage.nodes.len() {
            let id = garage.nodes[n].id.clone();
            let zone = format!("dc{}", n + 1);
            garage.cli_retry(&["layout", "assign", "-z", &zone, "-c", "1G", &id]);
        }
        garage.cli_retry(&["layout", "apply", "--version", "1"]);
        let bucket = garage.bucket.clone();
        garage.cli_retry(&["bucket", "create", &bucket]);
        let key = garage.cli_retry(&["key", "create", "imagefleet-tests"]);
        garage.key_id = field(&key, "Key ID").expect("key create prints the key id");
        garage.secret = field(&key, "Secret key").expect("key create prints the secret key");
        let key_id = garage.key_id.clone();
        garage.cli_retry(&[
            "bucket", "allow", "--read", "--write", "--owner", &bucket, "--key", &key_id,
        ]);
        garage
    }

    fn spawn(&self, node: &mut Node) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("garage log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("garage server starts");
        node.child = Some(child);
    }

    /// The node's id, once its server answers the CLI.
    fn wait_node_id(&self, node: &Node) -> String {
        for _ in 0..600 {
            if let Ok(out) = self.cli_on(&node.config, &["node", "id", "-q"]) {
                if let Some(id) = out.trim().split('@').next().filter(|id| !id.is_empty()) {
                    return id.to_string();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "garage node never answered: {}",
            std::fs::read_to_string(&node.log).unwrap_or_default()
        );
    }

    fn cli_on(&self, config: &Path, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.binary)
            .arg("-c")
            .arg(config)
            .args(args)
            .env("RUST_LOG", "error")
            .output()
            .map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr).into_owned()
            ))
        }
    }

    /// Runs `garage <args>` against the first running node, retrying while the cluster
    /// settles (a fresh layout takes a moment to reach every node).
    pub fn cli_retry(&self, args: &[&str]) -> String {
        let mut last = String::new();
        for _ in 0..300 {
            let node = self
                .nodes
                .iter()
                .find(|n| n.child.is_some())
                .expect("a running garage node");
            match self.cli_on(&node.config, args) {
                Ok(out) => return out,
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("garage {args:?} kept failing: {last}");
    }

    /// The S3 endpoint (of the first node).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.nodes[0].s3_port)
    }

    /// `s3://bucket/prefix` with `?query` appended if not empty.
    pub fn url(&self, prefix: &str, query: &str) -> String {
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("s3://{}/{prefix}{query}", self.bucket)
    }

    /// The environment a region process reaches this Garage with.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_REGION", S3_REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret.clone()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Options of a region that keeps its chunks in this Garage under `prefix`, reclaiming at
    /// once (grace window 0: no other replica shares the prefix).
    pub fn region_options(&self, prefix: &str) -> super::RegionOptions {
        let mut env = self.env();
        env.push((
            "IMAGEFLEET_CHUNK_STORE".into(),
            self.url(prefix, "grace=0s"),
        ));
        super::RegionOptions {
            env,
            wrapper: Vec::new(),
        }
    }

    /// The settings an in-process backend reaches this Garage with.
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint", self.endpoint()),
            ("aws_region", S3_REGION.to_string()),
            ("aws_access_key_id", self.key_id.clone()),
            ("aws_secret_access_key", self.secret.clone()),
            ("aws_allow_http", "true".to_string()),
        ]
    }

    /// An in-process backend on `url` of this Garage.
    pub fn backend(&self, url: &str) -> imagefleet_chunkstore::ObjectStore {
        let options = self.options();
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        imagefleet_chunkstore::ObjectStore::open_with(url, &options).expect("open the bucket")
    }

    /// Chunks stored under `prefix`.
    pub fn chunk_count(&self, prefix: &str) -> usize {
        use imagefleet_chunkstore::ChunkBackend;
        self.backend(&self.url(prefix, ""))
            .list()
            .expect("list")
            .len()
    }

    /// Stops node `n` with SIGKILL.
    pub fn kill_node(&mut self, n: usize) {
        if let Some(mut child) = self.nodes[n].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `n` again on its ports and data.
    pub fn restart_node(&mut self, n: usize) {
        let mut node = std::mem::replace(
            &mut self.nodes[n],
            Node {
                config: PathBuf::new(),
                rpc_port: 0,
                s3_port: 0,
                id: String::new(),
                log: PathBuf::new(),
                child: None,
            },
        );
        self.spawn(&mut node);
        self.nodes[n] = node;
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in 0..self.nodes.len() {
            self.kill_node(n);
        }
    }
}

/// The value of a `Name: value` line of the CLI's output.
fn field(output: &str, name: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_string())
    })
}
