//! An in-process cluster for the region's core tests: a catalog, a sharing service on its
//! embedded maps (no Redis), and region services whose chunks live in the backends a test hands
//! in (in memory, recording), each served on `127.0.0.1:0` and called over signed gRPC.

#![allow(dead_code)]

use imagefleet_chunkstore::ChunkStore;
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::*;
use imagefleet_region::{Region, RegionConfig};
use imagefleet_rpc::auth::Credentials;
use imagefleet_rpc::client::{region_scope, signed_channel, SignedChannel};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub type Client = RegionServiceClient<SignedChannel>;

pub struct Account {
    pub account_id: String,
    pub secret_id: String,
    pub secret_key: String,
}

/// How one region of the harness is set up.
pub struct RegionSpec {
    pub name: &'static str,
    pub chunks: ChunkStore,
    pub image_quota: u32,
    pub copy_deadline: Duration,
    /// The billing service; empty: the catalog's URL (which serves none here).
    pub billing_url: String,
}

impl RegionSpec {
    pub fn memory(name: &'static str) -> Self {
        RegionSpec {
            name,
            chunks: ChunkStore::memory(),
            image_quota: 500,
            copy_deadline: Duration::from_secs(3600),
            billing_url: String::new(),
        }
    }
}

struct Running {
    region: Arc<Region>,
    url: String,
    port: u16,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    spec_chunks: ChunkStore,
    quota: u32,
    deadline: Duration,
    billing_url: String,
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub accounts: Vec<Account>,
    catalog_url: String,
    sharing_url: String,
    key: String,
    stop: watch::Sender<bool>,
    regions: HashMap<String, Running>,
}

async fn listener() -> (TcpListener, String, u16) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let port = l.local_addr().expect("local addr").port();
    (l, format!("http://127.0.0.1:{port}"), port)
}

async fn wait_serving(url: &str) {
    for _ in 0..400 {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
        {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            if let Ok(r) = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                if r.into_inner().status == 1 {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{url} did not become healthy");
}

impl Harness {
    pub async fn start(specs: Vec<RegionSpec>) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = "test-service-key-0123456789abcdef".to_string();
        let (stop, _) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let catalog = imagefleet_catalog::Catalog::open(imagefleet_catalog::CatalogConfig {
            data_dir: dir.path().join("catalog"),
            service_key: key.clone(),
            price_book: imagefleet_billing::PriceBook::shipped(),
            clock: imagefleet_rpc::clock::Clock::system(),
        })
        .expect("catalog opens");
        for name in ["alice", "bob"] {
            catalog.create_account(None, name).expect("account");
        }
        let accounts = catalog
            .accounts()
            .expect("accounts")
            .into_iter()
            .map(|a| Account {
                account_id: a.account_id,
                secret_id: a.secret_id,
                secret_key: a.secret_key,
            })
            .collect();
        let (catalog_listener, catalog_url, _) = listener().await;
        tokio::spawn(imagefleet_catalog::run(
            catalog,
            catalog_listener,
            stopped(stop.subscribe()),
        ));
        let (sharing_listener, sharing_url, _) = listener().await;
        tokio::spawn(imagefleet_sharing::run(
            imagefleet_sharing::SharingConfig {
                backend: imagefleet_sharing::MapsBackend::Embedded {
                    dir: dir.path().join("maps"),
                },
                service_key: key.clone(),
                catalog_url: catalog_url.clone(),
            },
            sharing_listener,
            stopped(stop.subscribe()),
        ));
        wait_serving(&catalog_url).await;
        wait_serving(&sharing_url).await;
        let mut harness = Harness {
            dir,
            accounts,
            catalog_url,
            sharing_url,
            key,
            stop,
            regions: HashMap::new(),
        };
        for spec in specs {
            let (l, url, port) = listener().await;
            harness
                .start_region(
                    spec.name,
                    l,
                    url,
                    port,
                    spec.chunks,
                    spec.image_quota,
                    spec.copy_deadline,
                    spec.billing_url,
                )
                .await;
        }
        harness
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_region(
        &mut self,
        name: &str,
        listener: TcpListener,
        url: String,
        port: u16,
        chunks: ChunkStore,
        quota: u32,
        deadline: Duration,
        billing_url: String,
    ) {
        let region = Region::open(RegionConfig {
            region: name.to_string(),
            data_dir: self.dir.path().join("regions").join(name),
            advertise_url: url.clone(),
            public_url: String::new(),
            catalog_url: self.catalog_url.clone(),
            sharing_url: self.sharing_url.clone(),
            billing_url: billing_url.clone(),
            clock: imagefleet_rpc::clock::Clock::system(),
            service_key: self.key.clone(),
            image_quota: quota,
            copy_deadline: deadline,
            instance_retention: Duration::from_secs(3600),
            chunks: Some(chunks.clone()),
            account_rate: RegionConfig::DEFAULT_ACCOUNT_RATE,
            fair_share: Default::default(),
            imports: Default::default(),
            // Chunks live in memory here: tests that want a full store give a backend with a
            // capacity, and the region's free-space reserve does not get in their way.
            storage: imagefleet_region::StorageLimits {
                free_space_reserve_bytes: 0,
                ..Default::default()
            },
        })
        .expect("region opens");
        let (stop, rx) = watch::channel(false);
        let served = region.clone();
        let task = tokio::spawn(async move {
            let mut rx = rx;
            let _ = imagefleet_region::run(served, listener, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await;
        });
        wait_serving(&url).await;
        self.regions.insert(
            name.to_string(),
            Running {
                region,
                url,
                port,
                stop,
                task,
                spec_chunks: chunks,
                quota,
                deadline,
                billing_url,
            },
        );
    }

    /// Stops a region's server (its chunks and metadata stay).
    pub async fn stop_region(&mut self, name: &str) {
        let running = self.regions.get_mut(name).expect("region");
        let _ = running.stop.send(true);
        let task = std::mem::replace(&mut running.task, tokio::spawn(async {}));
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }

    /// Starts a stopped region again on the same port, data and chunk backend.
    pub async fn restart_region(&mut self, name: &str) {
        let running = self.regions.remove(name).expect("region");
        drop(running.region);
        let mut listener = None;
        for _ in 0..100 {
            match TcpListener::bind(("127.0.0.1", running.port)).await {
                Ok(l) => {
                    listener = Some(l);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let l = listener.expect("the region's port is free again");
        self.start_region(
            name,
            l,
            running.url,
            running.port,
            running.spec_chunks,
            running.quota,
            running.deadline,
            running.billing_url,
        )
        .await;
    }

    pub fn region(&self, name: &str) -> &Arc<Region> {
        &self.regions[name].region
    }

    /// A client of `region` signing as account `who` (0 = alice, 1 = bob).
    pub fn client(&self, region: &str, who: usize) -> Client {
        let account = &self.accounts[who];
        let credentials = Credentials {
            secret_id: account.secret_id.clone(),
            secret_key: account.secret_key.clone(),
        };
        RegionServiceClient::new(
            signed_channel(
                &self.regions[region].url,
                credentials,
                &region_scope(region),
            )
            .expect("channel"),
        )
        .max_decoding_message_size(imagefleet_rpc::client::MAX_MESSAGE_BYTES)
    }

    pub fn account(&self, who: usize) -> &str {
        &self.accounts[who].account_id
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for running in self.regions.values() {
            let _ = running.stop.send(true);
        }
    }
}

pub fn reason(status: &tonic::Status) -> String {
    imagefleet_proto::error::reason(status).unwrap_or_default()
}

/// A public image's id on `region`.
pub async fn public_image(client: &mut Client) -> String {
    let images = client
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "image-type".into(),
                values: vec!["PUBLIC_IMAGE".into()],
            }],
            limit: 1,
            ..Default::default()
        })
        .await
        .expect("public images")
        .into_inner();
    images.image_set[0].image_id.clone()
}

pub async fn describe(client: &mut Client, image_id: &str) -> Result<Image, tonic::Status> {
    let mut set = client
        .describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.to_string()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .image_set;
    Ok(set.remove(0))
}

/// Polls until `check` holds for the image, or panics after `within`.
pub async fn wait_image(
    client: &mut Client,
    image_id: &str,
    within: Duration,
    check: impl Fn(&Result<Image, tonic::Status>) -> bool,
) -> Result<Image, tonic::Status> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = describe(client, image_id).await;
        if check(&got) {
            return got;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("image {image_id} never reached the expected condition; last: {got:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn state_is(state: ImageState) -> impl Fn(&Result<Image, tonic::Status>) -> bool {
    move |r| matches!(r, Ok(i) if i.image_state == state as i32)
}

/// Launches one instance of `image_id` and waits until it runs.
pub async fn launch(client: &mut Client, image_id: &str) -> String {
    let id = client
        .run_instances(RunInstancesRequest {
            image_id: image_id.to_string(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await
        .expect("launch")
        .into_inner()
        .instance_id_set
        .remove(0);
    for _ in 0..200 {
        let set = client
            .describe_instances(DescribeInstancesRequest {
                instance_ids: vec![id.clone()],
                ..Default::default()
            })
            .await
            .expect("describe")
            .into_inner()
            .instance_set;
        if set[0].instance_state == InstanceState::Running as i32 {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{id} never ran");
}

pub async fn write(
    client: &mut Client,
    instance_id: &str,
    offset: u64,
    data: &[u8],
) -> Result<(), tonic::Status> {
    client
        .write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance_id.to_string(),
            offset,
            data: data.to_vec(),
        })
        .await
        .map(|_| ())
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|_| rand::random::<u8>()).collect()
}

/// An own NORMAL image of `client`'s account holding `data` at offset 0 (written in 4 MiB
/// calls), named `name`.
pub async fn image_with(client: &mut Client, base: &str, name: &str, data: &[u8]) -> String {
    let instance = launch(client, base).await;
    for (i, piece) in data.chunks(4 << 20).enumerate() {
        write(client, &instance, (i as u64) * (4 << 20), piece)
            .await
            .expect("write");
    }
    let id = client
        .create_image(CreateImageRequest {
            instance_id: instance,
            image_name: name.to_string(),
            ..Default::default()
        })
        .await
        .expect("create image")
        .into_inner()
        .image_id;
    wait_image(
        client,
        &id,
        Duration::from_secs(30),
        state_is(ImageState::Normal),
    )
    .await
    .expect("normal");
    id
}

/// The image's bytes as exported: (virtual size, non-zero ranges).
pub async fn export(client: &mut Client, image_id: &str) -> Vec<(u64, Vec<u8>)> {
    let mut stream = client
        .export_image(ExportImageRequest {
            image_id: image_id.to_string(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut out = Vec::new();
    while let Some(piece) = stream.message().await.expect("export stream") {
        if !piece.data.is_empty() {
            out.push((piece.offset, piece.data));
        }
    }
    out
}

/// Copies `image_id` from `client`'s region to `dest`; returns the copy's id.
pub async fn copy_to(client: &mut Client, image_id: &str, dest: &str) -> String {
    client
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.to_string()],
            destination_regions: vec![dest.to_string()],
            ..Default::default()
        })
        .await
        .expect("sync")
        .into_inner()
        .image_set
        .remove(0)
        .image_id
}

/// Terminates every instance of `client`'s account in its region.
pub async fn terminate_all(client: &mut Client) {
    let instances = client
        .describe_instances(DescribeInstancesRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("instances")
        .into_inner()
        .instance_set;
    client
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: instances.into_iter().map(|i| i.instance_id).collect(),
        })
        .await
        .expect("terminate");
}
