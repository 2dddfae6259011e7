//! `imaged`: the server binary. `imaged dev` runs a whole cluster in one process (catalog,
//! sharing, every region, and a Redis child process when one is installed); `imaged catalog`,
//! `imaged sharing` and `imaged region` run one service each, as containers do.

mod certs;
mod dev;
mod links;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "imaged",
    version,
    about = "imagefleet server: regional VM-image services over gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a local multi-region cluster in one process.
    Dev(dev::DevArgs),
    /// Run the catalog service.
    Catalog(CatalogArgs),
    /// Run the sharing service.
    Sharing(SharingArgs),
    /// Run one region service.
    Region(Box<RegionArgs>),
    /// Check a service's gRPC health: exit 0 when it is SERVING (for container healthchecks).
    Health(HealthArgs),
    /// Make a cluster CA and a certificate per service identity (for mutual TLS).
    Certs(certs::CertsArgs),
}

/// TLS and the cluster's membership, for one service (or a client such as `imaged health`).
#[derive(Args, Debug, Clone, Default)]
struct TransportArgs {
    /// This service's certificate chain (PEM): the service then serves TLS only, and presents
    /// it as its client certificate when it calls other services.
    #[arg(long, env = "IMAGEFLEET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, env = "IMAGEFLEET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The CA that issued the certificates of the services this one calls at https:// URLs
    /// (the cluster CA).
    #[arg(long, env = "IMAGEFLEET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// Demand a client certificate issued by this CA on every connection (mutual TLS); a
    /// service's SecretId must then match its certificate.
    #[arg(long, env = "IMAGEFLEET_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// The regions of the cluster: `svc-region-<id>` is a known service identity only for
    /// these (default: any well-formed region id).
    #[arg(long, env = "IMAGEFLEET_CLUSTER_REGIONS", value_delimiter = ',')]
    cluster_regions: Vec<String>,
}

impl TransportArgs {
    /// Installs the TLS settings for service `identity` (and as the process's default client)
    /// and the cluster's regions.
    fn install(&self, identity: &str) -> anyhow::Result<bool> {
        let regions: Vec<&String> = self
            .cluster_regions
            .iter()
            .filter(|r| !r.is_empty())
            .collect();
        if !regions.is_empty() {
            imagefleet_rpc::identity::set_cluster_regions(regions.into_iter().cloned());
        }
        if self.tls_cert.is_none() && self.tls_ca.is_none() {
            return Ok(false);
        }
        let settings = imagefleet_rpc::tls::TlsSettings::from_files(
            self.tls_ca.as_deref(),
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_client_ca.as_deref(),
        )?;
        imagefleet_rpc::tls::install(identity, settings.clone());
        imagefleet_rpc::tls::install(imagefleet_rpc::tls::DEFAULT, settings);
        Ok(self.tls_cert.is_some())
    }
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// The service to ask, e.g. http://127.0.0.1:7110.
    #[arg(
        long,
        env = "IMAGEFLEET_HEALTH_URL",
        default_value = "http://127.0.0.1:7100"
    )]
    url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout_secs: u64,
    #[command(flatten)]
    transport: TransportArgs,
}

/// The cluster's service key: given directly, or read from a file.
#[derive(Args, Debug, Clone)]
struct ServiceKeyArgs {
    /// The shared key services sign their calls to each other with.
    #[arg(long, env = "IMAGEFLEET_SERVICE_KEY", hide_env_values = true)]
    service_key: Option<String>,
    /// A file holding the service key (ignored when --service-key is given).
    #[arg(long, env = "IMAGEFLEET_SERVICE_KEY_FILE")]
    service_key_file: Option<PathBuf>,
}

impl ServiceKeyArgs {
    fn resolve(&self) -> anyhow::Result<String> {
        if let Some(key) = &self.service_key {
            return Ok(key.clone());
        }
        if let Some(path) = &self.service_key_file {
            let key = std::fs::read_to_string(path)?.trim().to_string();
            if !key.is_empty() {
                return Ok(key);
            }
        }
        anyhow::bail!("a service key is required: --service-key, IMAGEFLEET_SERVICE_KEY or --service-key-file")
    }
}

/// Per-account storage and instance limits of a region, and its free-space reserve.
#[derive(Args, Debug, Clone)]
struct StorageArgs {
    /// Instances (not terminated) each account may have in a region.
    #[arg(long, env = "IMAGEFLEET_INSTANCE_QUOTA", default_value_t = imagefleet_region::StorageLimits::DEFAULT_INSTANCE_QUOTA)]
    instance_quota: u32,
    /// Bytes each account may store in a region: its custom images' stored bytes plus what
    /// was written to its instances' disks (see `DescribeImageQuota`).
    #[arg(long, env = "IMAGEFLEET_STORAGE_BYTES_QUOTA", default_value_t = imagefleet_region::StorageLimits::DEFAULT_STORAGE_BYTES_QUOTA)]
    storage_bytes_quota: u64,
    /// Free bytes a region keeps on the filesystem of its data directory: calls that would
    /// store data are refused (`ResourceInsufficient.DiskSpace`) rather than go below it.
    #[arg(long, env = "IMAGEFLEET_FREE_SPACE_RESERVE_BYTES", default_value_t = imagefleet_region::StorageLimits::DEFAULT_FREE_SPACE_RESERVE_BYTES)]
    free_space_reserve_bytes: u64,
}

impl StorageArgs {
    fn limits(&self) -> anyhow::Result<imagefleet_region::StorageLimits> {
        if self.instance_quota == 0 || self.storage_bytes_quota == 0 {
            anyhow::bail!("--instance-quota and --storage-bytes-quota must be positive");
        }
        Ok(imagefleet_region::StorageLimits {
            instance_quota: self.instance_quota,
            storage_bytes_quota: self.storage_bytes_quota,
            free_space_reserve_bytes: self.free_space_reserve_bytes,
        })
    }
}

#[derive(Args, Debug)]
struct CatalogArgs {
    #[arg(long, env = "IMAGEFLEET_LISTEN", default_value = "127.0.0.1:7100")]
    listen: SocketAddr,
    #[arg(
        long,
        env = "IMAGEFLEET_DATA_DIR",
        default_value = "./imagefleet-data/catalog"
    )]
    data_dir: PathBuf,
    /// JSON file of accounts to load at start ([{account_id, name, secret_id, secret_key}]).
    #[arg(long, env = "IMAGEFLEET_ACCOUNTS_FILE")]
    accounts_file: Option<PathBuf>,
    /// The price book bills and quotes are rated with (TOML, docs/billing.md); default: the
    /// shipped book, deploy/price-book.toml.
    #[arg(long, env = "IMAGEFLEET_PRICE_BOOK", value_name = "FILE")]
    price_book: Option<PathBuf>,
    /// The clock billing dates usage and bills by: system, scale:N[@T0] or file:PATH
    /// (docs/billing.md).
    #[arg(
        long,
        env = "IMAGEFLEET_CLOCK",
        value_name = "SPEC",
        default_value = "system",
        value_parser = imagefleet_rpc::clock::Clock::parse
    )]
    clock: imagefleet_rpc::clock::Clock,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    key: ServiceKeyArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args, Debug)]
struct SharingArgs {
    #[arg(long, env = "IMAGEFLEET_LISTEN", default_value = "127.0.0.1:7101")]
    listen: SocketAddr,
    /// Redis holding the ownership maps: `redis://host:port` (one server) or
    /// `redis+cluster://host:port,host:port` (a Redis Cluster, by some of its nodes).
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// A Redis Cluster holding the ownership maps, by some of its nodes (`host:port,...`).
    #[arg(
        long,
        env = "REDIS_CLUSTER_NODES",
        value_name = "HOST:PORT,...",
        conflicts_with = "redis_url"
    )]
    redis_cluster_nodes: Option<String>,
    /// On a Redis Cluster: how many replicas must hold each write before it is acknowledged
    /// (`WAIT`), so that a master's failover loses no acknowledged change; 0 acknowledges on
    /// the master's append-only file alone.
    #[arg(
        long,
        env = "IMAGEFLEET_REDIS_REPLICA_ACKS",
        default_value_t = imagefleet_sharing::DEFAULT_REPLICA_ACKS
    )]
    redis_replica_acks: usize,
    /// Without Redis: keep the maps in this directory (embedded fallback, for quick starts).
    #[arg(
        long,
        env = "IMAGEFLEET_EMBEDDED_MAPS_DIR",
        conflicts_with_all = ["redis_url", "redis_cluster_nodes"]
    )]
    embedded_dir: Option<PathBuf>,
    #[arg(
        long,
        env = "IMAGEFLEET_CATALOG_URL",
        default_value = "http://127.0.0.1:7100"
    )]
    catalog_url: String,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    key: ServiceKeyArgs,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Args, Debug)]
struct RegionArgs {
    /// The region this service owns, e.g. ap-guangzhou.
    #[arg(long, env = "IMAGEFLEET_REGION")]
    region: String,
    #[arg(long, env = "IMAGEFLEET_LISTEN", default_value = "127.0.0.1:7110")]
    listen: SocketAddr,
    /// The URL other services reach this region at; default http://<listen>.
    #[arg(long, env = "IMAGEFLEET_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// The URL clients outside the services' network reach this region at (e.g. a port
    /// published by docker compose); default: the advertised URL.
    #[arg(long, env = "IMAGEFLEET_PUBLIC_URL")]
    public_url: Option<String>,
    #[arg(long, env = "IMAGEFLEET_DATA_DIR")]
    data_dir: PathBuf,
    /// Where the region keeps its chunks: `local` (`<data dir>/chunks`), or an S3-compatible
    /// bucket, `s3://bucket/prefix[?grace=1h&quota=100GiB]`, reached with the endpoint,
    /// region and credentials of the AWS environment variables (docs/storage.md).
    #[arg(long, env = "IMAGEFLEET_CHUNK_STORE", default_value = "local")]
    chunk_store: String,
    #[arg(
        long,
        env = "IMAGEFLEET_CATALOG_URL",
        default_value = "http://127.0.0.1:7100"
    )]
    catalog_url: String,
    #[arg(
        long,
        env = "IMAGEFLEET_SHARING_URL",
        default_value = "http://127.0.0.1:7101"
    )]
    sharing_url: String,
    /// The billing service the region reports usage to and asks prices of; default: the
    /// catalog's URL (the catalog process serves billing).
    #[arg(long, env = "IMAGEFLEET_BILLING_URL", default_value = "")]
    billing_url: String,
    /// The clock that dates usage events: `system`, `scale:N[@T0]` or `file:PATH` (for
    /// trying billing out; see docs/billing.md).
    #[arg(long = "clock", env = "IMAGEFLEET_CLOCK", default_value = "system", value_parser = imagefleet_rpc::clock::Clock::parse)]
    clock: imagefleet_rpc::clock::Clock,
    /// Custom images per account in this region.
    #[arg(long, env = "IMAGEFLEET_IMAGE_QUOTA", default_value_t = 500)]
    image_quota: u32,
    /// How long a copy into this region keeps retrying transient failures (source region
    /// down, disk full) before it fails, e.g. `24h`, `30m`.
    #[arg(long, env = "IMAGEFLEET_COPY_DEADLINE", default_value = "24h", value_parser = humantime::parse_duration)]
    copy_deadline: std::time::Duration,
    /// How long terminated instances stay listed before they are purged, e.g. `1h`.
    #[arg(long, env = "IMAGEFLEET_INSTANCE_RETENTION", default_value = "1h", value_parser = humantime::parse_duration)]
    instance_retention: std::time::Duration,
    /// Calls per second each account may make to this region (0: unlimited); calls over it
    /// wait their turn, or are refused with `RequestLimitExceeded` past a second's wait.
    #[arg(long, env = "IMAGEFLEET_ACCOUNT_RATE", default_value_t = 1000)]
    account_rate: u32,
    #[command(flatten)]
    fair_share: FairShareArgs,
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    imports: ImportArgs,
    #[command(flatten)]
    transport: TransportArgs,
    #[command(flatten)]
    key: ServiceKeyArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    links: links::LinkArgs,
}

/// Metrics and load shedding of one service (`imaged catalog|sharing|region`).
#[derive(Args, Debug, Clone)]
struct ServeArgs {
    /// Serve Prometheus metrics over HTTP at this address (`GET /metrics`), e.g.
    /// `127.0.0.1:9100`; not served when unset.
    #[arg(long, env = "IMAGEFLEET_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Calls the service works on at once; past it a new call is refused at once with
    /// RESOURCE_EXHAUSTED `RequestLimitExceeded.ServerBusy` instead of waiting in a queue.
    #[arg(long, env = "IMAGEFLEET_MAX_CONCURRENT_CALLS", default_value_t = imagefleet_rpc::metrics::DEFAULT_MAX_CONCURRENT_CALLS)]
    max_concurrent_calls: usize,
}

impl ServeArgs {
    /// Sets the service's concurrency limit and starts its metrics endpoint, if any.
    async fn start(&self, identity: &str) -> anyhow::Result<()> {
        if self.max_concurrent_calls == 0 {
            anyhow::bail!("--max-concurrent-calls must be positive");
        }
        imagefleet_rpc::metrics::set_call_limit(identity, self.max_concurrent_calls);
        if let Some(addr) = self.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
            tracing::info!(%addr, "metrics at /metrics");
            imagefleet_rpc::process::watch(identity);
            tokio::spawn(imagefleet_rpc::metrics::serve_http(
                listener,
                identity.to_string(),
                std::future::pending(),
            ));
        }
        Ok(())
    }
}

/// Per-account limits of a region on streams, exports and copies, and the stall timeout of
/// streams (`imaged region` and `imaged dev`).
#[derive(Args, Debug, Clone)]
struct FairShareArgs {
    /// A stream (export, copy) whose reader takes nothing for this long is cut off with
    /// DEADLINE_EXCEEDED `RequestTimeout.SlowReader`, e.g. `30s`.
    #[arg(long, env = "IMAGEFLEET_STREAM_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    stream_stall_timeout: std::time::Duration,
    /// Streams an account may have open at once in a region (its exports and the chunk
    /// streams of copies of its images); past it RESOURCE_EXHAUSTED
    /// `LimitExceeded.ConcurrentStreams`. 0: no limit.
    #[arg(long, env = "IMAGEFLEET_MAX_STREAMS_PER_ACCOUNT", default_value_t = imagefleet_region::FairShare::DEFAULT_MAX_STREAMS)]
    max_streams_per_account: u32,
    /// Exports an account may have open at once in a region; past it RESOURCE_EXHAUSTED
    /// `LimitExceeded.ConcurrentExports`. 0: no limit.
    #[arg(long, env = "IMAGEFLEET_MAX_EXPORTS_PER_ACCOUNT", default_value_t = imagefleet_region::FairShare::DEFAULT_MAX_EXPORTS)]
    max_exports_per_account: u32,
    /// Copies into a region an account may have in flight; past it RESOURCE_EXHAUSTED
    /// `LimitExceeded.ConcurrentCopies`. 0: no limit.
    #[arg(long, env = "IMAGEFLEET_MAX_COPIES_PER_ACCOUNT", default_value_t = imagefleet_region::FairShare::DEFAULT_MAX_COPIES)]
    max_copies_per_account: u32,
}

impl FairShareArgs {
    fn limits(&self) -> imagefleet_region::FairShare {
        imagefleet_region::FairShare {
            stream_stall_timeout: self.stream_stall_timeout,
            max_streams: self.max_streams_per_account,
            max_exports: self.max_exports_per_account,
            max_copies: self.max_copies_per_account,
        }
    }
}

/// Limits of image imports in a region (`imaged region` and `imaged dev`).
#[derive(Args, Debug, Clone)]
struct ImportArgs {
    /// Imports (UploadImage, ImportImage) an account may have under way at once in a region;
    /// past it RESOURCE_EXHAUSTED `LimitExceeded.ConcurrentImports`. 0: no limit.
    #[arg(long, env = "IMAGEFLEET_MAX_IMPORTS_PER_ACCOUNT", default_value_t = imagefleet_region::ImportLimits::DEFAULT_MAX_IMPORTS)]
    max_imports_per_account: u32,
    /// Largest virtual (guest) size of an imported disk, in bytes
    /// (`InvalidImage.VirtualSizeTooLarge`); default 500 GiB.
    #[arg(long, env = "IMAGEFLEET_MAX_IMPORT_VIRTUAL_SIZE", default_value_t = imagefleet_region::ImportLimits::DEFAULT_MAX_VIRTUAL_SIZE)]
    max_import_virtual_size: u64,
    /// Largest imported file, in bytes (`InvalidImage.FileTooLarge`); default 50 GiB.
    #[arg(long, env = "IMAGEFLEET_MAX_IMPORT_FILE_SIZE", default_value_t = imagefleet_region::ImportLimits::DEFAULT_MAX_FILE_SIZE)]
    max_import_file_size: u64,
    /// Let ImportImage pull from hosts whose addresses are not public (loopback, private,
    /// link-local...). For tests and closed networks only.
    #[arg(long, env = "IMAGEFLEET_IMPORT_ALLOW_PRIVATE_URLS")]
    import_allow_private_urls: bool,
    /// How long a URL import may take in all, e.g. `6h`.
    #[arg(long, env = "IMAGEFLEET_IMPORT_TIMEOUT", default_value = "6h", value_parser = humantime::parse_duration)]
    import_timeout: std::time::Duration,
    /// A PEM file of CA certificates ImportImage trusts for https URLs, besides the Mozilla
    /// roots (e.g. a closed network's own CA).
    #[arg(long, env = "IMAGEFLEET_IMPORT_CA_FILE")]
    import_ca_file: Option<std::path::PathBuf>,
}

impl ImportArgs {
    fn limits(&self) -> imagefleet_region::ImportLimits {
        imagefleet_region::ImportLimits {
            max_imports: self.max_imports_per_account,
            max_virtual_size: self.max_import_virtual_size,
            max_file_size: self.max_import_file_size,
            allow_private_urls: self.import_allow_private_urls,
            timeout: self.import_timeout,
            ca_file: self.import_ca_file.clone(),
        }
    }
}

/// Chunk-sized buffers (1 MiB chunks, the messages that carry them) come from the allocator's
/// heaps, so that a stream reuses the pages of the buffers it freed instead of mapping, faulting
/// in and zeroing fresh ones for every chunk (measured on copy_full: the source's system time
/// fell from 1.4 s to 0.5 s per GiB). Buffers larger than a few chunks still get pages of their
/// own. What a burst of streams leaves free in the heaps is given back by `give_back_idle_memory`.
fn keep_chunk_buffers_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 * 1024 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 * 1024 * 1024);
    }
}

/// Every few seconds, returns the heaps' free pages to the system (`malloc_trim`), so that
/// memory a burst of streams used does not stay resident once they end. Pages in use are not
/// touched; a stream that keeps going refills what it needs from its own frees in between.
fn give_back_idle_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let spawned = std::thread::Builder::new()
            .name("trim".into())
            .spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                // SAFETY: malloc_trim takes the allocator's locks itself; it frees no memory
                // in use.
                unsafe {
                    libc::malloc_trim(0);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to give idle memory back");
        }
    }
}

pub fn main() -> ExitCode {
    keep_chunk_buffers_in_the_heap();
    let cli = Cli::parse();
    imagefleet_rpc::telemetry::init();
    give_back_idle_memory();
    // Everything a server writes may hold a secret (account keys, the service key): files are
    // created owner-only, by this process and by the children it starts.
    imagefleet_rpc::fsutil::owner_only_umask();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "imaged failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let shutdown = imagefleet_rpc::server::shutdown_signal();
    match cli.command {
        Command::Dev(args) => dev::run(args).await,
        Command::Certs(args) => certs::run(args),
        Command::Health(args) => {
            args.transport.install(imagefleet_rpc::tls::DEFAULT)?;
            let deadline = std::time::Duration::from_secs(args.timeout_secs);
            match tokio::time::timeout(deadline, dev::serving(&args.url)).await {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => anyhow::bail!("{} is not SERVING", args.url),
                Ok(Err(e)) => anyhow::bail!("{}: {e:#}", args.url),
                Err(_) => {
                    anyhow::bail!("{} did not answer within {}s", args.url, args.timeout_secs)
                }
            }
        }
        Command::Catalog(args) => {
            let _lock = lock_data_dir(&args.data_dir)?;
            args.transport.install(imagefleet_rpc::identity::CATALOG)?;
            args.serve.start(imagefleet_rpc::identity::CATALOG).await?;
            let price_book = match &args.price_book {
                Some(path) => imagefleet_billing::PriceBook::load(path)
                    .with_context(|| format!("--price-book {}", path.display()))?,
                None => imagefleet_billing::PriceBook::shipped(),
            };
            let catalog = imagefleet_catalog::Catalog::open(imagefleet_catalog::CatalogConfig {
                data_dir: args.data_dir,
                service_key: args.key.resolve()?,
                price_book,
                clock: args.clock,
            })?;
            if let Some(path) = &args.accounts_file {
                let n = catalog.load_accounts_file(path)?;
                tracing::info!(accounts = n, file = %path.display(), "accounts loaded");
            }
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            imagefleet_catalog::run(catalog, listener, shutdown).await
        }
        Command::Sharing(args) => {
            let mut _lock = None;
            args.transport.install(imagefleet_rpc::identity::SHARING)?;
            args.serve.start(imagefleet_rpc::identity::SHARING).await?;
            let backend = match (args.redis_url, args.redis_cluster_nodes, args.embedded_dir) {
                (Some(url), _, _) => imagefleet_sharing::MapsBackend::Redis {
                    target: imagefleet_sharing::RedisTarget::from_url(&url)?,
                    replica_acks: args.redis_replica_acks,
                },
                (None, Some(nodes), _) => imagefleet_sharing::MapsBackend::Redis {
                    target: imagefleet_sharing::RedisTarget::cluster(&nodes)?,
                    replica_acks: args.redis_replica_acks,
                },
                (None, None, Some(dir)) => {
                    _lock = Some(lock_data_dir(&dir)?);
                    imagefleet_sharing::MapsBackend::Embedded { dir }
                }
                (None, None, None) => anyhow::bail!(
                    "give --redis-url (REDIS_URL), --redis-cluster-nodes (REDIS_CLUSTER_NODES) or --embedded-dir"
                ),
            };
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            let config = imagefleet_sharing::SharingConfig {
                backend,
                service_key: args.key.resolve()?,
                catalog_url: args.catalog_url,
            };
            imagefleet_sharing::run(config, listener, shutdown).await
        }
        Command::Region(args) => {
            let args = *args;
            let _lock = lock_data_dir(&args.data_dir)?;
            let identity = format!("{}{}", imagefleet_rpc::identity::REGION_PREFIX, args.region);
            let tls = args.transport.install(&identity)?;
            args.serve.start(&identity).await?;
            args.links.install()?;
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            let advertise_url = args.advertise_url.unwrap_or_else(|| {
                format!(
                    "{}://{}",
                    if tls { "https" } else { "http" },
                    listener
                        .local_addr()
                        .map(|a| a.to_string())
                        .unwrap_or_default()
                )
            });
            let chunks = imagefleet_chunkstore::ChunkStore::open(
                &args.chunk_store,
                args.data_dir.join("chunks"),
            )?;
            tracing::info!(chunks = %chunks.backend().describe(), "chunk store");
            let region = imagefleet_region::Region::open(imagefleet_region::RegionConfig {
                region: args.region,
                data_dir: args.data_dir,
                advertise_url,
                public_url: args.public_url.unwrap_or_default(),
                catalog_url: args.catalog_url,
                sharing_url: args.sharing_url,
                billing_url: args.billing_url,
                clock: args.clock,
                service_key: args.key.resolve()?,
                image_quota: args.image_quota,
                copy_deadline: args.copy_deadline,
                instance_retention: args.instance_retention,
                chunks: Some(chunks),
                account_rate: args.account_rate,
                fair_share: args.fair_share.limits(),
                storage: args.storage.limits()?,
                imports: args.imports.limits(),
            })?;
            imagefleet_region::run(region, listener, shutdown).await
        }
    }
}

/// How long a server waits for a data directory's lock: long enough for the children of a
/// server that was just killed to die (they get SIGTERM when it does).
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);

/// Locks a server's data directory for as long as the server runs: two servers writing one
/// directory would corrupt each other's stores.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<imagefleet_rpc::fsutil::DirLock> {
    Ok(imagefleet_rpc::fsutil::DirLock::acquire(
        dir,
        LOCK_PATIENCE,
    )?)
}
