//! `imaged dev`: a whole local cluster in one process. Each service gets its own 127.0.0.1
//! listener; Redis is the one given, else a `redis-server` child process (AOF on, files in the
//! data directory), else the embedded fallback. Writes `cluster.json` and prints a `ready` line
//! once every service answers health checks.

use clap::Args;
use imagefleet_rpc::cluster::{AccountEntry, ClusterFile, RegionEndpoint, ServiceEndpoint};
use imagefleet_rpc::fsutil::{self, DirLock};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where every service keeps its data, and where cluster.json is written.
    #[arg(long, env = "IMAGEFLEET_DATA_DIR", default_value = "./imagefleet-data")]
    data_dir: PathBuf,
    /// First port: catalog on N, sharing on N+1, Redis on N+9, regions on N+10, N+11, ...;
    /// Prometheus metrics of the catalog on N+50, sharing N+51, regions from N+60. 0 picks
    /// free ports.
    #[arg(long, default_value_t = 7100)]
    base_port: u16,
    /// Regions to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ap-guangzhou,ap-shanghai,ap-singapore"
    )]
    regions: Vec<String>,
    /// Where the regions keep their chunks: `local` (each region's data directory), or an
    /// S3-compatible bucket, `s3://bucket/prefix[?...]`, each region under
    /// `prefix/<region>` (endpoint and credentials from the AWS environment variables).
    #[arg(long, env = "IMAGEFLEET_CHUNK_STORE", default_value = "local")]
    chunk_store: String,
    /// Use this Redis instead of starting one.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    #[command(flatten)]
    fair_share: crate::FairShareArgs,
    /// Every region's import limits.
    #[command(flatten)]
    imports: crate::ImportArgs,
    /// Every region's per-account limits and free-space reserve.
    #[command(flatten)]
    storage: super::StorageArgs,
    /// Serve TLS with mutual authentication: make a local CA and a certificate per service
    /// (under `<data dir>/tls`, kept across restarts), refuse plaintext on every endpoint, and
    /// write the CA and a client certificate for `imagectl` and tests to cluster.json.
    #[arg(long, env = "IMAGEFLEET_DEV_TLS")]
    tls: bool,
    /// Calls each service works on at once; past it a new call is refused at once with
    /// RESOURCE_EXHAUSTED `RequestLimitExceeded.ServerBusy`.
    #[arg(long, env = "IMAGEFLEET_MAX_CONCURRENT_CALLS", default_value_t = imagefleet_rpc::metrics::DEFAULT_MAX_CONCURRENT_CALLS)]
    max_concurrent_calls: usize,
    /// The price book billing uses (format: docs/billing.md); default: the shipped book,
    /// deploy/price-book.toml. It must price every region of the cluster.
    #[arg(long, env = "IMAGEFLEET_PRICE_BOOK")]
    price_book: Option<PathBuf>,
    /// FOR TESTING ONLY: simulated time for billing runs N times faster than real time from
    /// the cluster's start (`--time-scale 3600`: an hour a second), so trying billing out from
    /// outside takes seconds; bills then charge hours that never happened.
    #[arg(long, env = "IMAGEFLEET_TIME_SCALE", conflicts_with = "clock", value_parser = clap::value_parser!(u32).range(1..=imagefleet_rpc::clock::MAX_SCALE as i64))]
    time_scale: Option<u32>,
    /// The clock billing dates usage and bills by: `system`, `scale:N[@T0]` or `file:PATH`
    /// (docs/billing.md; anything but `system` is for testing).
    #[arg(long, env = "IMAGEFLEET_CLOCK", default_value = "system", value_parser = imagefleet_rpc::clock::Clock::parse)]
    clock: imagefleet_rpc::clock::Clock,
    #[command(flatten)]
    links: crate::links::LinkArgs,
}

/// Region `region`'s chunk store of `imaged dev --chunk-store SPEC`: an `s3://` URL gets the
/// region's name appended to its prefix.
fn region_chunks(
    spec: &str,
    region: &str,
    local_dir: &Path,
) -> anyhow::Result<imagefleet_chunkstore::ChunkStore> {
    let spec = match spec.strip_prefix("s3://") {
        Some(rest) => {
            let (location, query) = rest.split_once('?').unwrap_or((rest, ""));
            let location = location.trim_end_matches('/');
            let query = if query.is_empty() {
                String::new()
            } else {
                format!("?{query}")
            };
            format!("s3://{location}/{region}{query}")
        }
        None => spec.to_string(),
    };
    Ok(imagefleet_chunkstore::ChunkStore::open(&spec, local_dir)?)
}

/// Serves the Prometheus metrics of `identity` on the port `port` (0: any free one); returns
/// the URL of its `/metrics`.
async fn metrics_endpoint(identity: &str, port: u16) -> anyhow::Result<String> {
    let listener = bind(port).await?;
    let url = format!("http://{}/metrics", listener.local_addr()?);
    imagefleet_rpc::process::watch(identity);
    tokio::spawn(imagefleet_rpc::metrics::serve_http(
        listener,
        identity.to_string(),
        std::future::pending(),
    ));
    Ok(url)
}

fn port(base: u16, offset: u16) -> u16 {
    if base == 0 {
        0
    } else {
        base.saturating_add(offset)
    }
}

async fn bind(port: u16) -> anyhow::Result<TcpListener> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

fn url(listener: &TcpListener, tls: bool) -> anyhow::Result<String> {
    let scheme = if tls { "https" } else { "http" };
    Ok(format!("{scheme}://{}", listener.local_addr()?))
}

/// The TLS files of a `--tls` cluster.
struct DevTls {
    ca: PathBuf,
    client: (PathBuf, PathBuf),
    admin: (PathBuf, PathBuf),
}

/// Makes (or reuses) the CA and certificates under `<dir>/tls` and installs each service's.
fn dev_tls(dir: &Path, regions: &[String]) -> anyhow::Result<DevTls> {
    use imagefleet_rpc::tls::{install, TlsSettings, DEFAULT};
    let tls_dir = dir.join("tls");
    let identities = crate::certs::identities(regions);
    crate::certs::ensure(&tls_dir, &identities, &[])?;
    let ca = crate::certs::ca_file(&tls_dir);
    for identity in &identities {
        let (cert, key) = crate::certs::files(&tls_dir, identity);
        let settings = TlsSettings::from_files(Some(&ca), Some(&cert), Some(&key), Some(&ca))?;
        install(identity, settings);
    }
    // In-process clients without an identity of their own (health checks) act as admin.
    let admin = crate::certs::files(&tls_dir, "admin");
    install(
        DEFAULT,
        TlsSettings::from_files(Some(&ca), Some(&admin.0), Some(&admin.1), None)?,
    );
    Ok(DevTls {
        ca,
        client: crate::certs::files(&tls_dir, crate::certs::CLIENT),
        admin,
    })
}

/// The cluster's service key, made once and kept in the data directory.
fn service_key(dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let path = dir.join("service.key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        let key = key.trim().to_string();
        if !key.is_empty() {
            return Ok((key, path));
        }
    }
    let key = hex::encode(rand::random::<[u8; 32]>());
    imagefleet_rpc::fsutil::write_durably(&path, key.as_bytes())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok((key, path))
}

/// Serves `service` on `listener` on a runtime of its own, with its own worker and blocking
/// threads; completes when the service stops. In one process the services would otherwise
/// share one blocking pool and one set of workers: a region whose blocking pool is full of
/// disk work (or whose workers are busy) would hold up the catalog's and sharing service's
/// calls, and every region's that asks them. On its own runtime a service can only use up
/// its own threads; the cores are the operating system's to share.
fn on_own_runtime<F, Fut>(
    name: &str,
    listener: TcpListener,
    service: F,
) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = name.to_string();
    let thread_name = name.clone();
    let started = listener.into_std().and_then(|listener| {
        std::thread::Builder::new()
            .name(format!("{thread_name}-main"))
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name(format!("{thread_name}-rt"))
                    .enable_all()
                    .build();
                let result = match runtime {
                    Ok(runtime) => {
                        let result = runtime.block_on(async move {
                            service(TcpListener::from_std(listener)?).await
                        });
                        runtime.shutdown_timeout(Duration::from_secs(5));
                        result
                    }
                    Err(e) => Err(anyhow::anyhow!("cannot start a runtime: {e}")),
                };
                let _ = tx.send(result);
            })
    });
    async move {
        started.map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        rx.await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("{name} stopped without an answer")))
            .map_err(|e| e.context(name))
    }
}

/// A Redis child process; stopped when dropped.
struct RedisChild {
    child: tokio::process::Child,
}

impl RedisChild {
    /// Starts `redis-server` on `dir`. It dies with this process (SIGTERM, which flushes the
    /// AOF), even on `kill -9`, and holds `lock` with it, so no second cluster can start on the
    /// directory while it lives.
    async fn start(dir: &Path, port: u16, lock: &DirLock) -> anyhow::Result<(RedisChild, String)> {
        let port = if port == 0 {
            // A port no outgoing connection or other cluster takes before redis-server binds it.
            imagefleet_rpc::ports::pick_loopback_port()?
        } else {
            port
        };
        imagefleet_rpc::fsutil::private_dir(dir)?;
        let parent = std::process::id();
        let lock_fd = lock.raw_fd();
        let mut command = tokio::process::Command::new("redis-server");
        // SAFETY: the closure makes async-signal-safe calls only (fcntl, prctl, getppid).
        unsafe {
            command.pre_exec(move || {
                fsutil::share_with_child(lock_fd)?;
                fsutil::die_with_parent(parent, libc::SIGTERM)
            });
        }
        let child = command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--dir"])
            .arg(dir)
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "yes",
            ])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                tracing::info!(%url, dir = %dir.display(), "redis-server started (AOF, appendfsync always)");
                return Ok((RedisChild { child }, url));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("redis-server did not start listening on port {port}")
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM lets Redis flush its AOF and exit cleanly.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
            if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Whether the service at `url` answers gRPC health with SERVING (an error if it does not
/// answer at all).
pub async fn serving(url: &str) -> anyhow::Result<bool> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let channel = imagefleet_rpc::client::endpoint(url)?.connect_lazy();
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    Ok(status == ServingStatus::Serving as i32)
}

/// Waits until every endpoint answers gRPC health with SERVING.
async fn wait_healthy(endpoints: &[String]) -> anyhow::Result<()> {
    for endpoint in endpoints {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !serving(endpoint).await.unwrap_or(false) {
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("{endpoint} did not become healthy");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn path_text(path: Option<&PathBuf>) -> String {
    path.map(|p| p.display().to_string()).unwrap_or_default()
}

pub async fn run(args: DevArgs) -> anyhow::Result<()> {
    if args.regions.is_empty() {
        anyhow::bail!("give at least one region");
    }
    let dir = args.data_dir.clone();
    // One cluster per data directory: its stores, its Redis AOF and cluster.json.
    let lock = DirLock::acquire(&dir, super::LOCK_PATIENCE)?;
    let (key, key_file) = service_key(&dir)?;
    imagefleet_rpc::identity::set_cluster_regions(args.regions.iter().cloned());
    args.links.install()?;
    let tls = if args.tls {
        Some(dev_tls(&dir, &args.regions)?)
    } else {
        None
    };

    let catalog_listener = bind(port(args.base_port, 0)).await?;
    let sharing_listener = bind(port(args.base_port, 1)).await?;
    let mut region_listeners = Vec::new();
    for (i, _) in args.regions.iter().enumerate() {
        region_listeners.push(bind(port(args.base_port, 10 + i as u16)).await?);
    }
    let catalog_url = url(&catalog_listener, tls.is_some())?;
    let sharing_url = url(&sharing_listener, tls.is_some())?;
    let price_book = match &args.price_book {
        Some(path) => imagefleet_billing::PriceBook::load(path)?,
        None => imagefleet_billing::PriceBook::shipped(),
    };
    let regions: Vec<&str> = args.regions.iter().map(String::as_str).collect();
    price_book.check_covers(&regions, &[]).map_err(|e| {
        anyhow::anyhow!("{e}: give a price book that prices every region of the cluster (--price-book FILE, format: docs/billing.md)")
    })?;
    let clock = match args.time_scale {
        Some(scale) => {
            imagefleet_rpc::clock::Clock::scaled(scale, Some(imagefleet_rpc::time::unix_now()))
        }
        None => args.clock.clone(),
    };
    if !clock.is_system() {
        tracing::warn!(clock = %clock.spec(), "billing runs on simulated time: for testing only");
    }
    if args.max_concurrent_calls == 0 {
        anyhow::bail!("--max-concurrent-calls must be positive");
    }
    // Metrics: catalog on N+50, sharing on N+51, regions from N+60.
    let mut identities = vec![
        imagefleet_rpc::identity::CATALOG.to_string(),
        imagefleet_rpc::identity::SHARING.to_string(),
    ];
    identities.extend(
        args.regions
            .iter()
            .map(|r| format!("{}{r}", imagefleet_rpc::identity::REGION_PREFIX)),
    );
    let mut metrics_urls = Vec::new();
    for (i, identity) in identities.iter().enumerate() {
        imagefleet_rpc::metrics::set_call_limit(identity, args.max_concurrent_calls);
        let offset = if i < 2 { 50 + i } else { 60 + i - 2 };
        metrics_urls.push(metrics_endpoint(identity, port(args.base_port, offset as u16)).await?);
    }

    let (redis_child, backend, redis_url) = match args.redis_url.clone() {
        Some(url) => (None, imagefleet_sharing::MapsBackend::redis(&url)?, url),
        None if on_path("redis-server") => {
            let (child, url) =
                RedisChild::start(&dir.join("redis"), port(args.base_port, 9), &lock).await?;
            (
                Some(child),
                imagefleet_sharing::MapsBackend::redis(&url)?,
                url,
            )
        }
        None => {
            tracing::warn!("no redis-server on PATH: using the embedded ownership maps (install Redis for the real thing)");
            let maps = dir.join("maps");
            (
                None,
                imagefleet_sharing::MapsBackend::Embedded { dir: maps },
                "embedded".to_string(),
            )
        }
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut tasks = tokio::task::JoinSet::new();

    let catalog = imagefleet_catalog::Catalog::open(imagefleet_catalog::CatalogConfig {
        data_dir: dir.join("catalog"),
        service_key: key.clone(),
        price_book,
        clock: clock.clone(),
    })?;
    let mut accounts = catalog.accounts()?;
    if accounts.is_empty() {
        for name in ["demo-a", "demo-b"] {
            catalog.create_account(None, name)?;
        }
        accounts = catalog.accounts()?;
    }
    let stop = stopped(stop_rx.clone());
    tasks.spawn(on_own_runtime("catalog", catalog_listener, |listener| {
        imagefleet_catalog::run(catalog, listener, stop)
    }));
    let sharing = imagefleet_sharing::SharingConfig {
        backend,
        service_key: key.clone(),
        catalog_url: catalog_url.clone(),
    };
    let stop = stopped(stop_rx.clone());
    tasks.spawn(on_own_runtime("sharing", sharing_listener, |listener| {
        imagefleet_sharing::run(sharing, listener, stop)
    }));
    let mut region_endpoints = Vec::new();
    for (name, listener) in args.regions.iter().zip(region_listeners) {
        let endpoint = url(&listener, tls.is_some())?;
        let config = imagefleet_region::RegionConfig {
            region: name.clone(),
            data_dir: dir.join("regions").join(name),
            advertise_url: endpoint.clone(),
            public_url: String::new(),
            catalog_url: catalog_url.clone(),
            sharing_url: sharing_url.clone(),
            billing_url: String::new(),
            clock: clock.clone(),
            service_key: key.clone(),
            image_quota: 500,
            copy_deadline: imagefleet_region::RegionConfig::DEFAULT_COPY_DEADLINE,
            instance_retention: imagefleet_region::RegionConfig::DEFAULT_INSTANCE_RETENTION,
            chunks: Some(region_chunks(
                &args.chunk_store,
                name,
                &dir.join("regions").join(name).join("chunks"),
            )?),
            account_rate: imagefleet_region::RegionConfig::DEFAULT_ACCOUNT_RATE,
            fair_share: args.fair_share.limits(),
            storage: args.storage.limits()?,
            imports: args.imports.limits(),
        };
        let stop = stopped(stop_rx.clone());
        tasks.spawn(on_own_runtime(name, listener, |listener| async move {
            let region = imagefleet_region::Region::open(config)?;
            imagefleet_region::run(region, listener, stop).await
        }));
        region_endpoints.push(RegionEndpoint {
            region: name.clone(),
            endpoint,
            metrics: metrics_urls[2 + region_endpoints.len()].clone(),
        });
    }

    let cluster = ClusterFile {
        catalog: ServiceEndpoint {
            endpoint: catalog_url.clone(),
            metrics: metrics_urls[0].clone(),
        },
        sharing: ServiceEndpoint {
            endpoint: sharing_url.clone(),
            metrics: metrics_urls[1].clone(),
        },
        regions: region_endpoints.clone(),
        accounts: accounts
            .iter()
            .map(|a| AccountEntry {
                account_id: a.account_id.clone(),
                name: a.name.clone(),
                secret_id: a.secret_id.clone(),
                secret_key: a.secret_key.clone(),
            })
            .collect(),
        redis_url,
        service_key_file: key_file.display().to_string(),
        tls_ca_file: path_text(tls.as_ref().map(|t| &t.ca)),
        tls_client_cert_file: path_text(tls.as_ref().map(|t| &t.client.0)),
        tls_client_key_file: path_text(tls.as_ref().map(|t| &t.client.1)),
        admin_cert_file: path_text(tls.as_ref().map(|t| &t.admin.0)),
        admin_key_file: path_text(tls.as_ref().map(|t| &t.admin.1)),
    };
    let cluster_path = dir.join("cluster.json");
    cluster.store(&cluster_path)?;

    let mut endpoints = vec![catalog_url.clone(), sharing_url.clone()];
    endpoints.extend(region_endpoints.iter().map(|r| r.endpoint.clone()));
    let shutdown = imagefleet_rpc::server::shutdown_signal();
    tokio::pin!(shutdown);
    tokio::select! {
        ready = wait_healthy(&endpoints) => {
            ready?;
            let regions: Vec<String> = region_endpoints.iter().map(|r| format!("{}={}", r.region, r.endpoint)).collect();
            println!(
                "imagefleet cluster ready: catalog={catalog_url} sharing={sharing_url} {} cluster={}",
                regions.join(" "),
                cluster_path.display()
            );
            tracing::info!(cluster = %cluster_path.display(), "cluster ready");
        }
        _ = &mut shutdown => {}
        Some(done) = tasks.join_next() => {
            anyhow::bail!("a service stopped during start-up: {:?}", done.map(|r| r.map_err(|e| e.to_string())));
        }
    }

    let mut failure = None;
    tokio::select! {
        _ = &mut shutdown => {}
        Some(done) = tasks.join_next() => {
            failure = Some(format!("{:?}", done.map(|r| r.map_err(|e| format!("{e:#}")))));
        }
    }
    let _ = stop_tx.send(true);
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = format!("{e:#}"), "service stopped with an error");
        }
    }
    if let Some(redis) = redis_child {
        redis.stop().await;
    }
    tracing::info!("cluster stopped");
    match failure {
        Some(f) => anyhow::bail!("a service stopped unexpectedly: {f}"),
        None => Ok(()),
    }
}
