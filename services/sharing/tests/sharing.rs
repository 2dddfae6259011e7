//! The sharing service served in-process on 127.0.0.1:0 and called over gRPC with signed
//! service clients, over a real redis-server (a child process) and over the embedded backend.

use imagefleet_proto::error;
use imagefleet_proto::sharing::v1::sharing_internal_service_client::SharingInternalServiceClient;
use imagefleet_proto::sharing::v1::*;
use imagefleet_rpc::client::{signed_channel, SignedChannel, SHARING_SCOPE};
use imagefleet_rpc::Credentials;
use imagefleet_sharing::redis_maps::{owner_key, shared_with_key, shares_key};
use imagefleet_sharing::{run, MapsBackend, SharingConfig};
use redis::AsyncCommands;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::sync::oneshot;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SERVICE_KEY: &str = "test-service-key";
/// How long a test waits for something that should happen within a few seconds.
const PATIENCE: Duration = Duration::from_secs(30);

/// A redis-server child process with its own data directory.
struct RedisServer {
    child: Child,
}

impl RedisServer {
    /// Starts redis-server on `port` with durable AOF in `dir`, and waits until it answers.
    async fn start(port: u16, dir: &Path) -> RedisServer {
        let child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--dir"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "this test needs redis-server on PATH and could not start it ({e}); \
                     install it (e.g. apt-get install redis-server)"
                )
            });
        let server = RedisServer { child };
        let client = redis::Client::open(redis_url(port)).unwrap();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return server;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "redis-server on port {port} did not answer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, like a crash.
    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn redis_url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

fn free_port() -> u16 {
    imagefleet_rpc::ports::pick_loopback_port().unwrap()
}

/// The sharing service, served until stopped.
struct Served {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Served {
    async fn start(backend: MapsBackend) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let config = SharingConfig {
            backend,
            service_key: SERVICE_KEY.into(),
            // Never contacted: service credentials are checked locally.
            catalog_url: "http://127.0.0.1:1".into(),
        };
        let task = tokio::spawn(run(config, listener, async {
            let _ = stopped.await;
        }));
        Served { url, stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }

    fn client(&self) -> SharingInternalServiceClient<SignedChannel> {
        client_at(&self.url)
    }

    async fn wait_health(&self, want: ServingStatus) {
        wait_health_at(&self.url, want).await
    }
}

fn client_at(url: &str) -> SharingInternalServiceClient<SignedChannel> {
    let creds = Credentials::service("region-ap-guangzhou", SERVICE_KEY);
    SharingInternalServiceClient::new(signed_channel(url, creds, SHARING_SCOPE).unwrap())
}

/// The health of the server and of the service at `url`; `None` while nothing answers there.
async fn health_at(url: &str) -> Option<(i32, i32)> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .ok()?;
    let mut client = HealthClient::new(channel);
    let mut status = Vec::new();
    for service in ["", "imagefleet.sharing.v1.SharingInternalService"] {
        let request = HealthCheckRequest {
            service: service.into(),
        };
        status.push(client.check(request).await.ok()?.into_inner().status);
    }
    Some((status[0], status[1]))
}

/// Waits until both the server and the service at `url` report `want`.
async fn wait_health_at(url: &str, want: ServingStatus) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let health = health_at(url).await;
        if health == Some((want as i32, want as i32)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "health at {url} stayed {health:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where `serve_embedded_child` keeps its maps, and the address it listens on.
const CHILD_DIR_ENV: &str = "IMAGEFLEET_TEST_SHARING_CHILD_DIR";
const CHILD_LISTEN_ENV: &str = "IMAGEFLEET_TEST_SHARING_CHILD_LISTEN";

/// The sharing service over the embedded backend in a process of its own (this test binary
/// running `serve_embedded_child`), so that a crash is a real SIGKILL: no graceful shutdown,
/// no destructors, nothing flushed on the way out.
struct ServedProcess {
    url: String,
    child: Child,
}

impl ServedProcess {
    /// Starts the service on the maps in `dir` and waits until it is SERVING.
    async fn start(dir: &Path) -> ServedProcess {
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "serve_embedded_child",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_DIR_ENV, dir)
            .env(CHILD_LISTEN_ENV, &listen)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the test binary starts again as the service");
        let served = ServedProcess {
            url: format!("http://{listen}"),
            child,
        };
        wait_health_at(&served.url, ServingStatus::Serving).await;
        served
    }

    fn client(&self) -> SharingInternalServiceClient<SignedChannel> {
        client_at(&self.url)
    }

    /// SIGKILL, like a crash.
    fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServedProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service process of `ServedProcess`: serves the embedded backend in `$CHILD_DIR_ENV` on
/// `$CHILD_LISTEN_ENV` until killed. Does nothing when run as an ordinary test.
#[test]
#[ignore = "the service process of the crash tests, started by them"]
fn serve_embedded_child() {
    let (Some(dir), Some(listen)) = (
        std::env::var_os(CHILD_DIR_ENV),
        std::env::var(CHILD_LISTEN_ENV).ok(),
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await.unwrap();
        let config = SharingConfig {
            backend: embedded(Path::new(&dir)),
            service_key: SERVICE_KEY.into(),
            catalog_url: "http://127.0.0.1:1".into(),
        };
        run(config, listener, std::future::pending()).await.unwrap();
    });
}

async fn set_owner(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
    owner: &str,
) -> Result<(), tonic::Status> {
    client
        .set_image_owner(SetImageOwnerRequest {
            image_id: image.into(),
            owner_account_id: owner.into(),
        })
        .await
        .map(|_| ())
}

async fn owner(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
) -> Result<String, tonic::Status> {
    client
        .get_image_owner(GetImageOwnerRequest {
            image_id: image.into(),
        })
        .await
        .map(|r| r.into_inner().owner_account_id)
}

async fn remove(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
) -> Result<(), tonic::Status> {
    client
        .remove_image(RemoveImageRequest {
            image_id: image.into(),
        })
        .await
        .map(|_| ())
}

fn assert_unavailable(result: Result<impl std::fmt::Debug, tonic::Status>) {
    let err = result.expect_err("the call must fail while redis is down");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(error::reason(&err).as_deref(), Some("ServiceUnavailable"));
}

/// Checks set, get, remove and input validation against a serving backend.
async fn exercise_owner_map(client: &mut SharingInternalServiceClient<SignedChannel>) {
    set_owner(client, "img-aaaaaaaa", "100000000001")
        .await
        .unwrap();
    set_owner(client, "img-bbbbbbbb", "100000000001")
        .await
        .unwrap();
    set_owner(client, "img-bbbbbbbb", "100000000002")
        .await
        .unwrap();
    assert_eq!(owner(client, "img-aaaaaaaa").await.unwrap(), "100000000001");
    assert_eq!(owner(client, "img-bbbbbbbb").await.unwrap(), "100000000002");
    assert_eq!(owner(client, "img-cccccccc").await.unwrap(), "");

    remove(client, "img-bbbbbbbb").await.unwrap();
    assert_eq!(owner(client, "img-bbbbbbbb").await.unwrap(), "");
    // Removing an image that is not there succeeds.
    remove(client, "img-bbbbbbbb").await.unwrap();

    let err = set_owner(client, "img-BAD", "100000000001")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(error::field(&err).as_deref(), Some("image_id"));
    let err = set_owner(client, "img-dddddddd", "42").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(error::field(&err).as_deref(), Some("owner_account_id"));
    assert_eq!(owner(client, "img-dddddddd").await.unwrap(), "");
    let err = owner(client, "").await.unwrap_err();
    assert_eq!(error::field(&err).as_deref(), Some("image_id"));
    let err = remove(client, "ins-aaaaaaaa").await.unwrap_err();
    assert_eq!(error::field(&err).as_deref(), Some("image_id"));
}

#[tokio::test]
async fn redis_backend_serves_and_recovers_from_redis_restarts() {
    let port = free_port();
    let redis_dir = tempfile::tempdir().unwrap();

    // Redis is not up yet: the service starts anyway, NOT_SERVING, and refuses calls.
    let served = Served::start(MapsBackend::redis(&redis_url(port)).unwrap()).await;
    let mut client = served.client();
    served.wait_health(ServingStatus::NotServing).await;
    assert_unavailable(owner(&mut client, "img-aaaaaaaa").await);

    let redis = RedisServer::start(port, redis_dir.path()).await;
    served.wait_health(ServingStatus::Serving).await;
    exercise_owner_map(&mut client).await;

    // Removing an image clears its shares in both directions, and nothing else.
    let raw = redis::Client::open(redis_url(port)).unwrap();
    let mut raw = raw.get_multiplexed_async_connection().await.unwrap();
    set_owner(&mut client, "img-shared01", "100000000001")
        .await
        .unwrap();
    let _: () = raw
        .hset(
            shares_key("img-shared01"),
            "100000000002",
            "1700000000:1700000000000-00000000000000aa",
        )
        .await
        .unwrap();
    let _: () = raw
        .hset(
            shared_with_key("100000000002"),
            "img-shared01",
            "1700000000000-00000000000000aa",
        )
        .await
        .unwrap();
    let _: () = raw
        .hset(
            shared_with_key("100000000002"),
            "img-other001",
            "1700000000000-00000000000000bb",
        )
        .await
        .unwrap();
    let stored: Option<String> = raw.get(owner_key("img-shared01")).await.unwrap();
    assert_eq!(stored.as_deref(), Some("100000000001"));
    remove(&mut client, "img-shared01").await.unwrap();
    let shares: i64 = raw.exists(shares_key("img-shared01")).await.unwrap();
    assert_eq!(shares, 0);
    let received: Vec<String> = raw.hkeys(shared_with_key("100000000002")).await.unwrap();
    assert_eq!(received, ["img-other001"]);
    assert_eq!(owner(&mut client, "img-shared01").await.unwrap(), "");

    // Redis dies: calls fail UNAVAILABLE (never "no owner"), health goes NOT_SERVING.
    redis.kill();
    assert_unavailable(owner(&mut client, "img-aaaaaaaa").await);
    assert_unavailable(set_owner(&mut client, "img-eeeeeeee", "100000000003").await);
    served.wait_health(ServingStatus::NotServing).await;
    assert_unavailable(remove(&mut client, "img-aaaaaaaa").await);

    // Redis comes back on the same port: the service recovers by itself, with the data that
    // Redis made durable.
    let redis = RedisServer::start(port, redis_dir.path()).await;
    served.wait_health(ServingStatus::Serving).await;
    assert_eq!(
        owner(&mut client, "img-aaaaaaaa").await.unwrap(),
        "100000000001"
    );
    set_owner(&mut client, "img-eeeeeeee", "100000000003")
        .await
        .unwrap();
    assert_eq!(
        owner(&mut client, "img-eeeeeeee").await.unwrap(),
        "100000000003"
    );

    served.stop().await;
    drop(redis);
}

async fn modify(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
    owner: &str,
    permission: SharePermission,
    accounts: &[&str],
) -> Result<(), tonic::Status> {
    client
        .modify_shares(ModifySharesRequest {
            image_id: image.into(),
            owner_account_id: owner.into(),
            permission: permission as i32,
            account_ids: accounts.iter().map(|a| a.to_string()).collect(),
        })
        .await
        .map(|_| ())
}

async fn shared_with(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    account: &str,
) -> Vec<String> {
    client
        .list_shared_with(ListSharedWithRequest {
            account_id: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_ids
}

#[tokio::test]
async fn the_reverse_index_is_checked_against_each_image_and_repaired() {
    let port = free_port();
    let redis_dir = tempfile::tempdir().unwrap();
    let _redis = RedisServer::start(port, redis_dir.path()).await;
    let served = Served::start(MapsBackend::redis(&redis_url(port)).unwrap()).await;
    served.wait_health(ServingStatus::Serving).await;
    let mut client = served.client();
    let raw = redis::Client::open(redis_url(port)).unwrap();
    let mut raw = raw.get_multiplexed_async_connection().await.unwrap();
    let (alice, bob) = ("100000000001", "100000000002");
    let index = shared_with_key(bob);

    set_owner(&mut client, "img-rev00001", alice).await.unwrap();
    modify(
        &mut client,
        "img-rev00001",
        alice,
        SharePermission::Share,
        &[bob],
    )
    .await
    .unwrap();
    assert_eq!(shared_with(&mut client, bob).await, ["img-rev00001"]);
    // The index entry carries the token the share holds.
    let share: String = raw.hget(shares_key("img-rev00001"), bob).await.unwrap();
    let entry: String = raw.hget(&index, "img-rev00001").await.unwrap();
    assert_eq!(share.split_once(':').unwrap().1, entry);

    // Entries the images' keys do not back are never listed. One from long ago is deleted on
    // the read; a recent one (its share may be on its way) is left for now.
    let recent = format!(
        "{}-00000000000000cc",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let _: () = raw
        .hset(&index, "img-rev00002", "1000-00000000000000aa")
        .await
        .unwrap();
    let _: () = raw.hset(&index, "img-rev00003", &recent).await.unwrap();
    // An entry of a real share with another token (a later request rewrote it) is listed and
    // given the share's token.
    let _: () = raw
        .hset(&index, "img-rev00001", "1000-00000000000000bb")
        .await
        .unwrap();
    assert_eq!(shared_with(&mut client, bob).await, ["img-rev00001"]);
    let mut left: Vec<String> = raw.hkeys(&index).await.unwrap();
    left.sort();
    assert_eq!(left, ["img-rev00001", "img-rev00003"]);
    let entry: String = raw.hget(&index, "img-rev00001").await.unwrap();
    assert_eq!(share.split_once(':').unwrap().1, entry);

    // A cancel deletes the entry of the share it removed; the image's keys alone decide a
    // check.
    modify(
        &mut client,
        "img-rev00001",
        alice,
        SharePermission::Cancel,
        &[bob],
    )
    .await
    .unwrap();
    let left: Vec<String> = raw.hkeys(&index).await.unwrap();
    assert_eq!(left, ["img-rev00003"]);
    assert!(shared_with(&mut client, bob).await.is_empty());
    let check = client
        .check_share(CheckShareRequest {
            image_id: "img-rev00003".into(),
            account_id: bob.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!check.shared);

    // Sharing again after the cancel lists the image again; removing the image drops it.
    modify(
        &mut client,
        "img-rev00001",
        alice,
        SharePermission::Share,
        &[bob],
    )
    .await
    .unwrap();
    assert_eq!(shared_with(&mut client, bob).await, ["img-rev00001"]);
    remove(&mut client, "img-rev00001").await.unwrap();
    assert!(shared_with(&mut client, bob).await.is_empty());
    let left: Vec<String> = raw.hkeys(&index).await.unwrap();
    assert_eq!(left, ["img-rev00003"]);
    served.stop().await;
}

fn embedded(dir: &Path) -> MapsBackend {
    MapsBackend::Embedded {
        dir: PathBuf::from(dir),
    }
}

#[tokio::test]
async fn embedded_backend_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(embedded(dir.path())).await;
    served.wait_health(ServingStatus::Serving).await;
    let mut client = served.client();
    exercise_owner_map(&mut client).await;
    set_owner(&mut client, "img-ffffffff", "100000000004")
        .await
        .unwrap();
    served.stop().await;

    let served = Served::start(embedded(dir.path())).await;
    served.wait_health(ServingStatus::Serving).await;
    let mut client = served.client();
    assert_eq!(
        owner(&mut client, "img-aaaaaaaa").await.unwrap(),
        "100000000001"
    );
    assert_eq!(
        owner(&mut client, "img-ffffffff").await.unwrap(),
        "100000000004"
    );
    assert_eq!(owner(&mut client, "img-bbbbbbbb").await.unwrap(), "");
    remove(&mut client, "img-aaaaaaaa").await.unwrap();
    served.stop().await;

    // A change acknowledged just before a crash (SIGKILL of the serving process) survives.
    let served = ServedProcess::start(dir.path()).await;
    let mut client = served.client();
    assert_eq!(owner(&mut client, "img-aaaaaaaa").await.unwrap(), "");
    set_owner(&mut client, "img-iiiiiiii", "100000000006")
        .await
        .unwrap();
    remove(&mut client, "img-ffffffff").await.unwrap();
    served.kill9();
    let served = ServedProcess::start(dir.path()).await;
    let mut client = served.client();
    assert_eq!(
        owner(&mut client, "img-iiiiiiii").await.unwrap(),
        "100000000006"
    );
    assert_eq!(owner(&mut client, "img-ffffffff").await.unwrap(), "");
    set_owner(&mut client, "img-ffffffff", "100000000004")
        .await
        .unwrap();
    served.kill9();

    // A torn last line (a crash in the middle of an unacknowledged append) is dropped, not
    // fatal, and what comes after it is kept.
    let log = dir.path().join(imagefleet_sharing::embedded::LOG_FILE);
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str("{\"op\":\"set_owner\",\"image_id\":\"img-gggg");
    std::fs::write(&log, text).unwrap();
    let served = ServedProcess::start(dir.path()).await;
    let mut client = served.client();
    assert_eq!(owner(&mut client, "img-aaaaaaaa").await.unwrap(), "");
    assert_eq!(
        owner(&mut client, "img-ffffffff").await.unwrap(),
        "100000000004"
    );
    assert_eq!(owner(&mut client, "img-gggggggg").await.unwrap(), "");
    set_owner(&mut client, "img-hhhhhhhh", "100000000005")
        .await
        .unwrap();
    served.kill9();
    let served = ServedProcess::start(dir.path()).await;
    let mut client = served.client();
    assert_eq!(
        owner(&mut client, "img-hhhhhhhh").await.unwrap(),
        "100000000005"
    );
    assert_eq!(
        owner(&mut client, "img-iiiiiiii").await.unwrap(),
        "100000000006"
    );
    served.kill9();
}
