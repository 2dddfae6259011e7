//! A cluster of real processes for integration tests: `redis-server` (AOF, `appendfsync
//! always`), `imaged catalog`, `imaged sharing` and one `imaged region` per region, each with
//! its own port, data directory and log file under a temporary directory. Processes can be
//! killed with SIGKILL and restarted on the same port and data.

#![allow(dead_code)]

pub mod dev;
pub mod garage;
pub mod raw;

use imagefleet_proto::billing::v1::billing_service_client::BillingServiceClient;
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::CreateAccountRequest;
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::Credentials;
use imagefleet_rpc::client::{region_scope, signed_channel, SignedChannel, CATALOG_SCOPE};
use imagefleet_rpc::cluster::AccountEntry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

pub const IMAGED: &str = env!("CARGO_BIN_EXE_imaged");
pub const IMAGECTL: &str = env!("CARGO_BIN_EXE_imagectl");

/// The file in a cluster's directory that holds the time its services bill by.
pub const CLOCK_FILE: &str = "clock";

pub fn free_port() -> u16 {
    imagefleet_rpc::ports::pick_loopback_port().expect("a free loopback port")
}

/// One child process and how to start it again.
pub struct Proc {
    pub name: String,
    pub port: u16,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// A command the process runs under (e.g. `strace -f -o FILE`); empty: none. A wrapped
    /// process runs in its own process group, and is killed as a group.
    wrapper: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// Serves TLS (its URL is `https://`).
    tls: bool,
}

impl Proc {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = match self.wrapper.split_first() {
            None => Command::new(&self.program),
            Some((wrapper, wrapper_args)) => {
                let mut command = Command::new(wrapper);
                command.args(wrapper_args).arg(&self.program);
                std::os::unix::process::CommandExt::process_group(&mut command, 0);
                command
            }
        };
        let child = command
            .args(&self.args)
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({}): {e}", self.name, self.program));
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush or clean up (a wrapped process: its whole group).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !self.wrapper.is_empty() {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (e.g. `STOP`, `CONT`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the process is running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg(child.id().to_string()).status();
        for _ in 0..200 {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// SIGKILL, then the same command again (same port, same data).
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// SIGKILL, then starts again with `args` instead of its own (same port, environment and
    /// log), e.g. the sharing service on another Redis.
    pub fn restart_with_args(&mut self, args: Vec<String>) {
        self.kill9();
        self.args = args;
        self.spawn();
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub service_key: String,
    pub redis: Proc,
    pub catalog: Proc,
    pub sharing: Proc,
    pub regions: BTreeMap<String, Proc>,
    pub accounts: Vec<AccountEntry>,
    /// The certificates of a TLS cluster (`start_tls`): `ca.pem`, `<identity>.pem|key`.
    pub tls_dir: Option<PathBuf>,
}

/// The directory of this test process's cluster CA and certificates (one CA per process, as
/// clients' TLS settings are per process), with certificates for `regions` added.
pub fn tls_dir(regions: &[&str]) -> PathBuf {
    static DIR: std::sync::Mutex<Option<tempfile::TempDir>> = std::sync::Mutex::new(None);
    let mut dir = DIR.lock().unwrap_or_else(|e| e.into_inner());
    let path = dir
        .get_or_insert_with(|| tempfile::tempdir().expect("temp dir"))
        .path()
        .join("tls");
    let status = Command::new(IMAGED)
        .args(["certs", "--out"])
        .arg(&path)
        .args(["--regions", &regions.join(",")])
        .stdout(Stdio::null())
        .status()
        .expect("imaged certs runs");
    assert!(status.success(), "imaged certs failed");
    path
}

/// TLS settings of this process's clients acting as `identity` (`client`: the account
/// clients' certificate), from the certificates in `dir`.
pub fn client_tls(dir: &Path, identity: &str) -> imagefleet_rpc::tls::TlsSettings {
    imagefleet_rpc::tls::TlsSettings::from_files(
        Some(&dir.join("ca.pem")),
        Some(&dir.join(format!("{identity}.pem"))),
        Some(&dir.join(format!("{identity}.key"))),
        None,
    )
    .expect("certificate files")
}

fn require_redis() {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("redis-server").is_file()));
    assert!(found, "redis-server is not installed: the integration tests need a real Redis (apt-get install redis-server)");
}

pub async fn wait_serving(url: &str) {
    let channel = imagefleet_rpc::client::endpoint(url)
        .unwrap()
        .connect_lazy();
    let mut client = HealthClient::new(channel);
    for _ in 0..600 {
        if let Ok(r) = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
        {
            if r.into_inner().status == 1 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{url} never became SERVING");
}

/// How one region process is started, beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct RegionOptions {
    /// Extra environment (e.g. `IMAGEFLEET_IMAGE_QUOTA`, `IMAGEFLEET_COPY_DEADLINE`).
    pub env: Vec<(String, String)>,
    /// A command the region runs under, e.g. `["strace", "-f", "-o", FILE]`.
    pub wrapper: Vec<String>,
}

impl RegionOptions {
    pub fn env(pairs: &[(&str, &str)]) -> RegionOptions {
        RegionOptions {
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: Vec::new(),
        }
    }
}

impl Cluster {
    /// Starts Redis, catalog, sharing and the given regions, and creates two accounts.
    pub async fn start(regions: &[&str]) -> Cluster {
        Cluster::start_with(regions, &[]).await
    }

    /// Like `start`, with options for some of the regions.
    pub async fn start_with(regions: &[&str], options: &[(&str, RegionOptions)]) -> Cluster {
        Cluster::start_inner(regions, options, false).await
    }

    /// Like `start`, with every service serving mutual TLS under a cluster CA (plaintext
    /// refused), each with its own certificate. This process's clients present the `client`
    /// certificate for account calls and the `admin` one as `svc-admin`.
    pub async fn start_tls(regions: &[&str]) -> Cluster {
        Cluster::start_inner(regions, &[], true).await
    }

    async fn start_inner(
        regions: &[&str],
        options: &[(&str, RegionOptions)],
        with_tls: bool,
    ) -> Cluster {
        require_redis();
        let dir = tempfile::tempdir().expect("temp dir");
        let service_key = hex::encode(rand::random::<[u8; 16]>());
        let root = dir.path().to_path_buf();
        let mut key_env = vec![("IMAGEFLEET_SERVICE_KEY".to_string(), service_key.clone())];
        if !regions.is_empty() {
            key_env.push(("IMAGEFLEET_CLUSTER_REGIONS".to_string(), regions.join(",")));
        }
        // Every service dates billable usage by the cluster's clock file: the real time until a
        // test sets one (`set_time`).
        key_env.push((
            "IMAGEFLEET_CLOCK".to_string(),
            format!("file:{}", root.join(CLOCK_FILE).display()),
        ));
        let tls = with_tls.then(|| tls_dir(regions));
        if let Some(tls) = &tls {
            use imagefleet_rpc::tls::{install, DEFAULT};
            install(DEFAULT, client_tls(tls, "client"));
            install("admin", client_tls(tls, "admin"));
            key_env.push((
                "IMAGEFLEET_TLS_CA".to_string(),
                tls.join("ca.pem").display().to_string(),
            ));
            key_env.push((
                "IMAGEFLEET_TLS_CLIENT_CA".to_string(),
                tls.join("ca.pem").display().to_string(),
            ));
        }
        let tls_env = |identity: &str| -> Vec<(String, String)> {
            match &tls {
                None => Vec::new(),
                Some(tls) => vec![
                    (
                        "IMAGEFLEET_TLS_CERT".to_string(),
                        tls.join(format!("{identity}.pem")).display().to_string(),
                    ),
                    (
                        "IMAGEFLEET_TLS_KEY".to_string(),
                        tls.join(format!("{identity}.key")).display().to_string(),
                    ),
                ],
            }
        };
        let log = |name: &str| root.join(format!("{name}.log"));

        let redis_port = free_port();
        std::fs::create_dir_all(root.join("redis")).unwrap();
        let mut redis = Proc {
            name: "redis".into(),
            port: redis_port,
            program: "redis-server".into(),
            args: vec![
                "--port".into(),
                redis_port.to_string(),
                "--bind".into(),
                "127.0.0.1".into(),
                "--dir".into(),
                root.join("redis").display().to_string(),
                "--appendonly".into(),
                "yes".into(),
                "--appendfsync".into(),
                "always".into(),
                "--save".into(),
                "".into(),
            ],
            env: vec![],
            wrapper: vec![],
            log: log("redis"),
            child: None,
            tls: false,
        };
        redis.spawn();

        let catalog_port = free_port();
        let mut catalog = Proc {
            name: "catalog".into(),
            port: catalog_port,
            program: IMAGED.into(),
            args: vec![
                "catalog".into(),
                "--listen".into(),
                format!("127.0.0.1:{catalog_port}"),
                "--data-dir".into(),
                root.join("catalog").display().to_string(),
            ],
            env: [key_env.clone(), tls_env("catalog")].concat(),
            wrapper: vec![],
            log: log("catalog"),
            child: None,
            tls: tls.is_some(),
        };
        catalog.spawn();
        let catalog_url = catalog.url();

        let sharing_port = free_port();
        let mut sharing = Proc {
            name: "sharing".into(),
            port: sharing_port,
            program: IMAGED.into(),
            args: vec![
                "sharing".into(),
                "--listen".into(),
                format!("127.0.0.1:{sharing_port}"),
                "--redis-url".into(),
                format!("redis://127.0.0.1:{redis_port}"),
                "--catalog-url".into(),
                catalog_url.clone(),
            ],
            env: [key_env.clone(), tls_env("sharing")].concat(),
            wrapper: vec![],
            log: log("sharing"),
            child: None,
            tls: tls.is_some(),
        };
        sharing.spawn();
        let sharing_url = sharing.url();

        let mut region_procs = BTreeMap::new();
        for region in regions {
            let port = free_port();
            let option = options
                .iter()
                .find(|(r, _)| r == region)
                .map(|(_, o)| o.clone())
                .unwrap_or_default();
            let mut env = key_env.clone();
            env.extend(tls_env(&format!("region-{region}")));
            env.extend(option.env);
            let mut proc = Proc {
                name: region.to_string(),
                port,
                program: IMAGED.into(),
                args: vec![
                    "region".into(),
                    "--region".into(),
                    region.to_string(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--data-dir".into(),
                    root.join("regions").join(region).display().to_string(),
                    "--catalog-url".into(),
                    catalog_url.clone(),
                    "--sharing-url".into(),
                    sharing_url.clone(),
                ],
                env,
                wrapper: option.wrapper,
                log: log(region),
                child: None,
                tls: tls.is_some(),
            };
            proc.spawn();
            region_procs.insert(region.to_string(), proc);
        }

        let mut cluster = Cluster {
            dir,
            service_key,
            redis,
            catalog,
            sharing,
            regions: region_procs,
            accounts: Vec::new(),
            tls_dir: tls,
        };
        wait_serving(&cluster.catalog.url()).await;
        wait_serving(&cluster.sharing.url()).await;
        for proc in cluster.regions.values() {
            wait_serving(&proc.url()).await;
        }
        for name in ["alice", "bob"] {
            let account = cluster.create_account(name).await;
            cluster.accounts.push(account);
        }
        cluster
    }

    /// Sets the time every service of the cluster dates usage and bills by (unix seconds).
    pub fn set_time(&self, unix: i64) {
        let path = self.dir.path().join(CLOCK_FILE);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, unix.to_string()).expect("write the clock file");
        std::fs::rename(&tmp, &path).expect("replace the clock file");
    }

    /// The billing service (in the catalog process) as account `who`.
    pub fn billing(&self, who: usize) -> BillingServiceClient<SignedChannel> {
        let account = &self.accounts[who];
        let credentials = Credentials {
            secret_id: account.secret_id.clone(),
            secret_key: account.secret_key.clone(),
        };
        BillingServiceClient::new(
            signed_channel(&self.catalog.url(), credentials, CATALOG_SCOPE).unwrap(),
        )
    }

    /// The operator's service credentials (`svc-admin`).
    pub fn service_credentials(&self) -> Credentials {
        Credentials::service("admin", &self.service_key)
    }

    /// Service credentials of `identity` (`catalog`, `sharing`, `region-<id>`, ...). On a TLS
    /// cluster, this process's clients signing as `identity` present its certificate.
    pub fn service_credentials_as(&self, identity: &str) -> Credentials {
        if let Some(dir) = &self.tls_dir {
            if dir.join(format!("{identity}.pem")).exists() {
                imagefleet_rpc::tls::install(identity, client_tls(dir, identity));
            }
        }
        Credentials::service(identity, &self.service_key)
    }

    pub fn catalog_internal(&self) -> CatalogInternalServiceClient<SignedChannel> {
        CatalogInternalServiceClient::new(
            signed_channel(
                &self.catalog.url(),
                self.service_credentials(),
                CATALOG_SCOPE,
            )
            .unwrap(),
        )
    }

    pub async fn create_account(&self, name: &str) -> AccountEntry {
        let account = self
            .catalog_internal()
            .create_account(CreateAccountRequest {
                account_id: String::new(),
                name: name.into(),
            })
            .await
            .expect("create account")
            .into_inner()
            .account
            .expect("account in response");
        AccountEntry {
            account_id: account.account_id,
            name: account.name,
            secret_id: account.secret_id,
            secret_key: account.secret_key,
        }
    }

    /// A region client signing as `account`.
    pub fn region_as(
        &self,
        region: &str,
        account: &AccountEntry,
    ) -> RegionServiceClient<SignedChannel> {
        let credentials = Credentials {
            secret_id: account.secret_id.clone(),
            secret_key: account.secret_key.clone(),
        };
        RegionServiceClient::new(
            signed_channel(&self.region_url(region), credentials, &region_scope(region)).unwrap(),
        )
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
    }

    /// `redis-cli` against the cluster's Redis.
    pub fn redis_cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    pub fn region_url(&self, region: &str) -> String {
        self.regions[region].url()
    }

    /// A region client signing as account `who` (0 = alice, 1 = bob).
    pub fn region(&self, region: &str, who: usize) -> RegionServiceClient<SignedChannel> {
        let account = &self.accounts[who];
        let credentials = Credentials {
            secret_id: account.secret_id.clone(),
            secret_key: account.secret_key.clone(),
        };
        RegionServiceClient::new(
            signed_channel(&self.region_url(region), credentials, &region_scope(region)).unwrap(),
        )
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
    }

    pub fn region_dir(&self, region: &str) -> PathBuf {
        self.dir.path().join("regions").join(region)
    }

    pub fn kill9_region(&mut self, region: &str) {
        self.regions.get_mut(region).unwrap().kill9();
    }

    pub async fn restart_region(&mut self, region: &str) {
        self.restart_region_with_env(region, &[]).await;
    }

    /// Kills a region with SIGKILL and starts it again on the same port and data, with extra
    /// environment (e.g. a different quota).
    pub async fn restart_region_with_env(&mut self, region: &str, env: &[(&str, &str)]) {
        let proc = self.regions.get_mut(region).unwrap();
        proc.kill9();
        for (k, v) in env {
            proc.env.push((k.to_string(), v.to_string()));
        }
        proc.spawn();
        let url = proc.url();
        wait_serving(&url).await;
    }

    /// Starts a killed region again without waiting for it.
    pub fn respawn_region(&mut self, region: &str) {
        let proc = self.regions.get_mut(region).unwrap();
        proc.kill9();
        proc.spawn();
    }
}

/// Number of chunk files a region holds: the files under `<region dir>/chunks` (at any depth),
/// leaving out temporary files (names starting with `.`).
pub fn chunk_files(region_dir: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .map(|e| match e.file_type() {
                        Ok(t) if t.is_dir() => count(&e.path()),
                        Ok(t) if t.is_file() => 1,
                        _ => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    count(&region_dir.join("chunks"))
}

pub type Region = RegionServiceClient<SignedChannel>;

pub fn reason(status: &tonic::Status) -> String {
    imagefleet_proto::error::reason(status).unwrap_or_default()
}

/// Asserts a call failed with `code` and `reason`.
#[track_caller]
pub fn assert_refused<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    expected: &str,
) {
    match result {
        Ok(v) => panic!("expected {code:?} {expected}, got Ok({v:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(reason(&status), expected, "{status:?}");
        }
    }
}

pub async fn public_image(region: &mut Region, platform: &str) -> Image {
    region
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "platform".into(),
                values: vec![platform.into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set
        .into_iter()
        .find(|i| i.image_type == ImageType::PublicImage as i32)
        .unwrap_or_else(|| panic!("no public {platform} image"))
}

pub async fn image(region: &mut Region, image_id: &str) -> Image {
    region
        .describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set
        .remove(0)
}

pub async fn wait_image_state(region: &mut Region, image_id: &str, state: ImageState) -> Image {
    for _ in 0..2400 {
        let image = image(region, image_id).await;
        if image.image_state == state as i32 {
            return image;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{image_id} never reached {state:?}");
}

pub async fn run(region: &mut Region, image_id: &str, count: u32) -> Vec<String> {
    let ids = region
        .run_instances(RunInstancesRequest {
            image_id: image_id.into(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: count,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instance_id_set;
    for _ in 0..600 {
        let instances = region
            .describe_instances(DescribeInstancesRequest {
                instance_ids: ids.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .instance_set;
        if instances
            .iter()
            .all(|i| i.instance_state == InstanceState::Running as i32)
        {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("instances never reached RUNNING");
}

pub async fn write(region: &mut Region, instance_id: &str, offset: u64, data: &[u8]) {
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        region
            .write_instance_disk(WriteInstanceDiskRequest {
                instance_id: instance_id.into(),
                offset: offset + (i as u64) * (1 << 20),
                data: piece.to_vec(),
            })
            .await
            .unwrap();
    }
}

pub async fn read(region: &mut Region, instance_id: &str, offset: u64, length: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < offset + length {
        let take = (offset + length - pos).min(1 << 20);
        let data = region
            .read_instance_disk(ReadInstanceDiskRequest {
                instance_id: instance_id.into(),
                offset: pos,
                length: take,
            })
            .await
            .unwrap()
            .into_inner()
            .data;
        out.extend_from_slice(&data);
        pos += take;
    }
    out
}

/// Exports an image and returns (virtual size, the non-zero ranges as (offset, bytes)).
pub async fn export(region: &mut Region, image_id: &str) -> (u64, Vec<(u64, Vec<u8>)>) {
    use futures::StreamExt;
    let mut stream = region
        .export_image(ExportImageRequest {
            image_id: image_id.into(),
            format: ExportFormat::Raw as i32,
        })
        .await
        .unwrap()
        .into_inner();
    let mut size = 0;
    let mut pieces = Vec::new();
    while let Some(piece) = stream.next().await {
        let piece = piece.unwrap();
        size = piece.virtual_size_bytes;
        if !piece.data.is_empty() {
            pieces.push((piece.offset, piece.data));
        }
    }
    (size, pieces)
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    rand::fill(&mut bytes[..]);
    bytes
}

/// The `ErrorInfo` metadata of a status (empty without one).
pub fn error_metadata(status: &tonic::Status) -> std::collections::HashMap<String, String> {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .map(|info| info.metadata)
        .unwrap_or_default()
}

/// An image's description, or `None` once it is `NOT_FOUND`.
pub async fn find_image(region: &mut Region, image_id: &str) -> Option<Image> {
    match region
        .describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.into()],
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().image_set.into_iter().next(),
        Err(status) => {
            assert_eq!(reason(&status), "InvalidImageId.NotFound", "{status:?}");
            None
        }
    }
}

/// Polls `image_id` until `done` holds, for at most `patience`; panics with what it last saw.
pub async fn wait_image_until(
    region: &mut Region,
    image_id: &str,
    patience: Duration,
    what: &str,
    done: impl Fn(&Image) -> bool,
) -> Image {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let image = image(region, image_id).await;
        if done(&image) {
            return image;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{image_id}: not {what} after {patience:?}; last seen {:?} ({:?})",
            ImageState::try_from(image.image_state),
            image.state_reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a copy to become `NORMAL`; fails at once, with the reason, if it ends
/// `CREATEFAILED`.
pub async fn wait_copy_normal(region: &mut Region, image_id: &str) -> Image {
    let image = wait_image_until(
        region,
        image_id,
        Duration::from_secs(300),
        "NORMAL or CREATEFAILED",
        |i| {
            i.image_state == ImageState::Normal as i32
                || i.image_state == ImageState::Createfailed as i32
        },
    )
    .await;
    assert_eq!(
        image.image_state,
        ImageState::Normal as i32,
        "the copy {image_id} failed: {}",
        image.state_reason
    );
    image
}

/// The number of custom images `region` lists for the client's account (every state).
pub async fn custom_image_count(region: &mut Region) -> u32 {
    region
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "image-type".into(),
                values: vec!["PRIVATE_IMAGE".into()],
            }],
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .total_count
}

/// Polls until `region_dir` holds `expected` chunk files, for at most `patience`; returns the
/// last count seen.
pub async fn wait_chunk_files(region_dir: &Path, expected: usize, patience: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let count = chunk_files(region_dir);
        if count == expected || tokio::time::Instant::now() >= deadline {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET url` of a service's metrics endpoint over plain HTTP/1.1: the body of a 200 response
/// in the Prometheus text format.
pub fn scrape_metrics(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http:// URL");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).expect("connect to the metrics port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.to_string()
}

/// Shares `image_id` with `accounts` (or cancels their shares) as the region's caller.
pub async fn share(
    region: &mut Region,
    image_id: &str,
    accounts: &[&str],
    permission: SharePermission,
) -> Result<(), tonic::Status> {
    region
        .modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: image_id.into(),
            account_ids: accounts.iter().map(|a| a.to_string()).collect(),
            permission: permission as i32,
        })
        .await
        .map(|_| ())
}

/// Launches one `S5.SMALL1` instance of `image_id`; its ids, or the refusal.
pub async fn launch(region: &mut Region, image_id: &str) -> Result<Vec<String>, tonic::Status> {
    region
        .run_instances(RunInstancesRequest {
            image_id: image_id.into(),
            instance_type: "S5.SMALL1".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().instance_id_set)
}
