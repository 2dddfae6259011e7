//! The sharing service on a real Redis Cluster: three masters and three replicas, each a
//! `redis-server` process started here (cluster mode, AOF with `appendfsync always`, its own
//! directory and free ports), formed with `redis-cli --cluster create`.
//!
//! - A stream of shares runs while a slot holding several images' keys migrates between
//!   masters key by key, while that slot's master fails over by hand (`CLUSTER FAILOVER` on its
//!   replica), and while the next master of that slot is killed with SIGKILL (its replica is
//!   promoted): afterwards every acknowledged share is there, in the image's keys and in the
//!   reverse index.
//! - While a slot has no master (its master and replica killed), share checks and launches of
//!   images in that slot are refused `UNAVAILABLE`, never allowed, and images in other slots
//!   keep working (but cannot be shared with an account whose reverse index lies in the dead
//!   slot range); once the nodes are back, so are the images.
//! - The sharing rules hold on the cluster as on one Redis: owner only, all accounts or none,
//!   cancel only what is shared, at most 500 accounts per image, removal forgets both ways.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use imagefleet_proto::sharing::v1 as sharing;
use imagefleet_proto::sharing::v1::sharing_internal_service_client::SharingInternalServiceClient;
use imagefleet_rpc::client::{signed_channel, SignedChannel, SHARING_SCOPE};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::Code;

/// How long a test waits for something that should happen within seconds (a failover, a node
/// rejoining) before it gives up.
const PATIENCE: Duration = Duration::from_secs(120);

const SLOTS: u16 = 16384;

/// The hash slot of `key` (CRC16/XMODEM of its hash tag, or of the whole key without one), as
/// Redis Cluster computes it.
fn key_slot(key: &str) -> u16 {
    let mut hashed = key.as_bytes();
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                hashed = &key.as_bytes()[open + 1..open + 1 + len];
            }
        }
    }
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= (byte as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// The slot every key of `image_id` lies in (`imagefleet:{<image id>}:...`).
fn image_slot(image_id: &str) -> u16 {
    key_slot(&format!("imagefleet:{{{image_id}}}:owner"))
}

/// One `redis-server` of the cluster.
struct RedisNode {
    port: u16,
    bus_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisNode {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .expect("log file");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--bind", "127.0.0.1", "--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "2000"])
            // The slots whose masters are up keep serving while another has none.
            .args(["--cluster-require-full-coverage", "no"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("redis-server starts (apt-get install redis-server)");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn running(&self) -> bool {
        self.child.is_some()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this node: its output, trimmed.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A field of `INFO <section>` (`cluster`: of `CLUSTER INFO`).
    fn info(&self, section: &str, field: &str) -> Option<String> {
        let text = match section {
            "cluster" => self.cli(&["CLUSTER", "INFO"]),
            _ => self.cli(&["INFO", section]),
        };
        text.lines().find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
    }

    fn id(&self) -> String {
        self.cli(&["CLUSTER", "MYID"])
    }
}

impl Drop for RedisNode {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug)]
struct NodeLine {
    id: String,
    port: u16,
    master: bool,
    failed: bool,
    master_id: Option<String>,
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            let port = fields[1]
                .split('@')
                .next()?
                .rsplit(':')
                .next()?
                .parse()
                .ok()?;
            let flags: Vec<&str> = fields[2].split(',').collect();
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(NodeLine {
                id: fields[0].to_string(),
                port,
                master: flags.contains(&"master"),
                failed: flags.contains(&"fail") || flags.contains(&"fail?"),
                master_id: (fields[3] != "-").then(|| fields[3].to_string()),
                slots,
            })
        })
        .collect()
}

struct RedisCluster {
    nodes: Vec<RedisNode>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Six nodes, formed into three masters with a replica each; returns once every node
    /// agrees the cluster is whole.
    async fn start() -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ports = BTreeSet::new();
        while ports.len() < 12 {
            ports.insert(free_port());
        }
        let ports: Vec<u16> = ports.into_iter().collect();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut node = RedisNode {
                port: ports[2 * i],
                bus_port: ports[2 * i + 1],
                dir: node_dir,
                child: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let cluster = RedisCluster { nodes, _dir: dir };
        cluster
            .wait_until("every node answers", |c| {
                c.nodes.iter().all(|n| n.cli(&["PING"]) == "PONG")
            })
            .await;
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(cluster.nodes.iter().map(RedisNode::addr))
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_whole().await;
        cluster
    }

    /// `host:port` of every node, comma-separated.
    fn node_list(&self) -> String {
        self.nodes
            .iter()
            .map(RedisNode::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The cluster as a running node sees it.
    fn view_from(&self, node: usize) -> Vec<NodeLine> {
        parse_nodes(&self.nodes[node].cli(&["CLUSTER", "NODES"]))
    }

    /// The cluster as the first running node sees it.
    fn view(&self) -> Vec<NodeLine> {
        let first = (0..self.nodes.len())
            .find(|&i| self.nodes[i].running())
            .expect("a running node");
        self.view_from(first)
    }

    fn index_of_port(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of this cluster")
    }

    /// The node that is master of `slot`, as the first running node sees it.
    fn master_of_slot(&self, slot: u16) -> usize {
        let view = self.view();
        let line = view
            .iter()
            .find(|l| l.master && l.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .unwrap_or_else(|| panic!("no master for slot {slot}: {view:?}"));
        self.index_of_port(line.port)
    }

    /// The replica of the master `master`.
    fn replica_of(&self, master: usize) -> usize {
        let view = self.view();
        let id = self.nodes[master].id();
        let line = view
            .iter()
            .find(|l| l.master_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("node {master} has no replica: {view:?}"));
        self.index_of_port(line.port)
    }

    /// Every node runs and agrees: the cluster is `ok`, three masters without failure flags
    /// hold all the slots, and each has a replica whose link to it is up.
    fn whole(&self) -> bool {
        if !self.nodes.iter().all(RedisNode::running) {
            return false;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            if node.info("cluster", "cluster_state").as_deref() != Some("ok") {
                return false;
            }
            let view = self.view_from(i);
            if view.len() != 6 || view.iter().any(|l| l.failed) {
                return false;
            }
            let masters: Vec<&NodeLine> = view.iter().filter(|l| l.master).collect();
            let covered: u32 = masters
                .iter()
                .flat_map(|m| m.slots.iter())
                .map(|&(a, b)| (b - a) as u32 + 1)
                .sum();
            if masters.len() != 3 || covered != SLOTS as u32 {
                return false;
            }
            for replica in view.iter().filter(|l| !l.master) {
                if !masters
                    .iter()
                    .any(|m| replica.master_id.as_deref() == Some(m.id.as_str()))
                {
                    return false;
                }
                let replica = &self.nodes[self.index_of_port(replica.port)];
                if replica.info("replication", "master_link_status").as_deref() != Some("up") {
                    return false;
                }
            }
        }
        true
    }

    async fn wait_whole(&self) {
        self.wait_until("the cluster is whole", RedisCluster::whole)
            .await;
    }

    async fn wait_until(&self, what: &str, done: impl Fn(&RedisCluster) -> bool) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !done(self) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not so after {PATIENCE:?}: {what}; the cluster: {:?}",
                self.view()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Moves `slot` from master `from` to master `to` by hand, one key at a time
    /// (`CLUSTER SETSLOT ... IMPORTING/MIGRATING`, `MIGRATE`, `CLUSTER SETSLOT ... NODE`),
    /// letting `stream` make calls between keys. Returns how many keys moved.
    async fn migrate_slot(&self, slot: u16, from: usize, to: usize, stream: &ShareStream) -> usize {
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let (source_id, target_id) = (source.id(), target.id());
        let slot_arg = slot.to_string();
        assert_eq!(
            target.cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &source_id]),
            "OK"
        );
        assert_eq!(
            source.cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &target_id]),
            "OK"
        );
        let target_port = target.port.to_string();
        let mut moved = 0;
        loop {
            let key = source.cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1"]);
            if key.is_empty() {
                break;
            }
            let out = source.cli(&[
                "MIGRATE",
                "127.0.0.1",
                &target_port,
                "",
                "0",
                "5000",
                "KEYS",
                &key,
            ]);
            assert_eq!(out, "OK", "MIGRATE {key}");
            moved += 1;
            stream.wait_more_calls(2).await;
        }
        for node in [to, from]
            .into_iter()
            .chain((0..self.nodes.len()).filter(|&i| i != to && i != from))
        {
            if self
                .view()
                .iter()
                .any(|l| l.port == self.nodes[node].port && l.master)
            {
                assert_eq!(
                    self.nodes[node].cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target_id]),
                    "OK"
                );
            }
        }
        moved
    }
}

fn sharing_client(cluster: &Cluster) -> SharingInternalServiceClient<SignedChannel> {
    SharingInternalServiceClient::new(
        signed_channel(
            &cluster.sharing.url(),
            cluster.service_credentials_as("region-ap-guangzhou"),
            SHARING_SCOPE,
        )
        .unwrap(),
    )
}

/// Starts the cluster's sharing service again (same port) with `redis` as its Redis options.
async fn point_sharing_at(cluster: &mut Cluster, redis: Vec<String>) {
    let port = cluster.sharing.port;
    let mut args = vec![
        "sharing".to_string(),
        "--listen".to_string(),
        format!("127.0.0.1:{port}"),
    ];
    args.extend(redis);
    args.extend(["--catalog-url".to_string(), cluster.catalog.url()]);
    cluster.sharing.restart_with_args(args);
    wait_serving(&cluster.sharing.url()).await;
}

async fn check_share(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
    account: &str,
) -> Result<bool, tonic::Status> {
    client
        .check_share(sharing::CheckShareRequest {
            image_id: image.into(),
            account_id: account.into(),
        })
        .await
        .map(|r| r.into_inner().shared)
}

/// Shares images one account at a time, round robin over `images`, each with a new account,
/// retrying a share the service did not acknowledge until it is (or is reported as already
/// made, by the earlier unacknowledged attempt).
struct ShareStream {
    /// (image, account) of every acknowledged share.
    acknowledged: Arc<Mutex<Vec<(String, String)>>>,
    /// (image, account) of shares answered `ALREADY_EXISTS` after an unacknowledged attempt.
    made_unacknowledged: Arc<Mutex<Vec<(String, String)>>>,
    calls: Arc<AtomicUsize>,
    refusals: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ShareStream {
    fn start(
        mut client: SharingInternalServiceClient<SignedChannel>,
        images: Vec<String>,
        owner: String,
    ) -> ShareStream {
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let made_unacknowledged = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let refusals = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acknowledged, made_unacknowledged) =
                (acknowledged.clone(), made_unacknowledged.clone());
            let (calls, refusals, stop) = (calls.clone(), refusals.clone(), stop.clone());
            async move {
                let mut n: u64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    let image = images[(n as usize) % images.len()].clone();
                    let account = (300_000_000_000 + n).to_string();
                    let mut unacknowledged = false;
                    while !stop.load(Ordering::SeqCst) {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let result = client
                            .modify_shares(sharing::ModifySharesRequest {
                                image_id: image.clone(),
                                owner_account_id: owner.clone(),
                                permission: sharing::SharePermission::Share as i32,
                                account_ids: vec![account.clone()],
                            })
                            .await;
                        match result {
                            Ok(_) => {
                                acknowledged.lock().unwrap().push((image, account));
                                break;
                            }
                            Err(s) if s.code() == Code::AlreadyExists && unacknowledged => {
                                made_unacknowledged.lock().unwrap().push((image, account));
                                break;
                            }
                            Err(s)
                                if matches!(
                                    s.code(),
                                    Code::Unavailable | Code::DeadlineExceeded
                                ) =>
                            {
                                unacknowledged = true;
                                refusals.fetch_add(1, Ordering::SeqCst);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(s) => panic!("share of {image} with {account}: {s:?}"),
                        }
                    }
                    n += 1;
                }
            }
        });
        ShareStream {
            acknowledged,
            made_unacknowledged,
            calls,
            refusals,
            stop,
            task,
        }
    }

    fn acknowledged_count(&self) -> usize {
        self.acknowledged.lock().unwrap().len()
    }

    /// Waits until `more` shares beyond those acknowledged now are acknowledged.
    async fn wait_more_acknowledged(&self, more: usize) {
        let want = self.acknowledged_count() + more;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.acknowledged_count() < want {
            assert!(!self.task.is_finished(), "the share stream stopped");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stream acknowledged {} shares, not {want}, in {PATIENCE:?}",
                self.acknowledged_count()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the stream has made `more` calls (acknowledged or not) beyond those made now.
    async fn wait_more_calls(&self, more: usize) {
        let want = self.calls.load(Ordering::SeqCst) + more;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while self.calls.load(Ordering::SeqCst) < want {
            assert!(!self.task.is_finished(), "the share stream stopped");
            assert!(tokio::time::Instant::now() < deadline, "the stream stalled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the stream; returns the acknowledged shares and those found made after an
    /// unacknowledged attempt.
    async fn stop(self) -> (Vec<(String, String)>, Vec<(String, String)>, usize) {
        self.stop.store(true, Ordering::SeqCst);
        self.task
            .await
            .expect("the share stream ran without panicking");
        let acknowledged = self.acknowledged.lock().unwrap().clone();
        let made = self.made_unacknowledged.lock().unwrap().clone();
        (acknowledged, made, self.refusals.load(Ordering::SeqCst))
    }
}

/// `count` image ids whose keys all lie in one slot, and that slot.
fn crowded_slot(count: usize) -> (u16, Vec<String>) {
    let mut by_slot: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for n in 0u64.. {
        let id = format!("img-{:0>8}", radix36(n));
        let ids = by_slot.entry(image_slot(&id)).or_default();
        ids.push(id);
        if ids.len() == count {
            let slot = image_slot(&ids[0]);
            return (slot, ids.clone());
        }
    }
    unreachable!()
}

fn radix36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_share_is_lost_through_slot_migration_and_failovers() {
    let redis = RedisCluster::start().await;
    let mut redis = redis;
    let mut cluster = Cluster::start(&[]).await;
    point_sharing_at(
        &mut cluster,
        vec!["--redis-cluster-nodes".into(), redis.node_list()],
    )
    .await;
    let mut client = sharing_client(&cluster);

    // Eight images whose keys share one slot (the one that will move and fail over), and
    // sixteen others spread over the cluster.
    let (slot, crowded) = crowded_slot(8);
    assert_eq!(
        redis.nodes[0].cli(&[
            "CLUSTER",
            "KEYSLOT",
            &format!("imagefleet:{{{}}}:shares", crowded[0])
        ]),
        slot.to_string(),
        "the test's slot function agrees with Redis"
    );
    let others: Vec<String> = (0..16).map(|n| format!("img-spread{n:02}")).collect();
    let images: Vec<String> = crowded.iter().chain(&others).cloned().collect();
    let owner = "100000000001".to_string();
    for image in &images {
        client
            .set_image_owner(sharing::SetImageOwnerRequest {
                image_id: image.clone(),
                owner_account_id: owner.clone(),
            })
            .await
            .unwrap();
    }
    let stream = ShareStream::start(client.clone(), images.clone(), owner.clone());
    stream.wait_more_acknowledged(30).await;

    // 1. The slot moves to another master, key by key, while shares keep coming.
    let from = redis.master_of_slot(slot);
    let to = (0..6)
        .find(|&i| {
            i != from
                && redis
                    .view()
                    .iter()
                    .any(|l| l.port == redis.nodes[i].port && l.master)
        })
        .unwrap();
    let moved = redis.migrate_slot(slot, from, to, &stream).await;
    assert!(moved >= crowded.len(), "only {moved} keys moved");
    redis
        .wait_until("the slot is served by its new master", |r| {
            r.master_of_slot(slot) == to && r.whole()
        })
        .await;
    stream.wait_more_acknowledged(30).await;

    // 2. Its new master fails over by hand to its replica.
    let master = redis.master_of_slot(slot);
    let replica = redis.replica_of(master);
    assert_eq!(redis.nodes[replica].cli(&["CLUSTER", "FAILOVER"]), "OK");
    redis
        .wait_until("the replica took the slot over (CLUSTER FAILOVER)", |r| {
            r.master_of_slot(slot) == replica && r.whole()
        })
        .await;
    stream.wait_more_acknowledged(30).await;

    // 3. That master is killed with SIGKILL; its replica is promoted. The killed node comes
    //    back and rejoins as the replica.
    let master = replica;
    let replica = redis.replica_of(master);
    stream.wait_more_acknowledged(10).await;
    redis.nodes[master].kill9();
    redis
        .wait_until("the replica was promoted after kill -9", |r| {
            r.view_from(replica).iter().any(|l| {
                l.port == r.nodes[replica].port
                    && l.master
                    && !l.failed
                    && l.slots.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
        })
        .await;
    redis.nodes[master].spawn();
    redis.wait_whole().await;
    assert_eq!(redis.master_of_slot(slot), replica);
    stream.wait_more_acknowledged(30).await;

    let (acknowledged, made, refusals) = stream.stop().await;
    println!(
        "{} shares acknowledged, {} made without an acknowledgement, {refusals} calls answered UNAVAILABLE and retried, {moved} keys migrated",
        acknowledged.len(),
        made.len()
    );

    // Every acknowledged share is there: in the image's keys (describe, check) and in the
    // reverse index (list).
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (image, account) in acknowledged.iter().chain(&made) {
        expected
            .entry(image.clone())
            .or_default()
            .insert(account.clone());
    }
    for (image, accounts) in &expected {
        let described: BTreeSet<String> = client
            .describe_shares(sharing::DescribeSharesRequest {
                image_id: image.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .shares
            .into_iter()
            .map(|s| s.account_id)
            .collect();
        let lost: Vec<&String> = accounts.difference(&described).collect();
        assert!(
            lost.is_empty(),
            "{image}: acknowledged shares lost: {lost:?}"
        );
    }
    for (image, account) in &acknowledged {
        assert!(
            check_share(&mut client, image, account).await.unwrap(),
            "{image} is not shared with {account}"
        );
        let listed = client
            .list_shared_with(sharing::ListSharedWithRequest {
                account_id: account.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .image_ids;
        assert_eq!(listed, [image.as_str()], "the images listed for {account}");
    }
    assert!(expected.keys().any(|i| crowded.contains(i)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_fail_closed_while_a_slot_has_no_master() {
    let mut redis = RedisCluster::start().await;
    let mut cluster = Cluster::start(&["ap-guangzhou"]).await;
    point_sharing_at(
        &mut cluster,
        vec![
            "--redis-url".into(),
            format!("redis+cluster://{}", redis.node_list()),
        ],
    )
    .await;
    let bob_id = cluster.accounts[1].account_id.clone();
    let mut alice = cluster.region("ap-guangzhou", 0);
    let mut bob = cluster.region("ap-guangzhou", 1);
    let mut checks = sharing_client(&cluster);

    // Alice's images, until one lies on a master other than the one holding Bob's reverse
    // index (that master will go down: Bob's index must stay up to be shared with) and another
    // on a third master.
    let bob_index = redis.master_of_slot(key_slot(&format!(
        "imagefleet:{{account-{bob_id}}}:shared-with"
    )));
    let debian = public_image(&mut alice, "Debian").await;
    let instance = run(&mut alice, &debian.image_id, 1).await.remove(0);
    let mut made: Vec<(String, usize)> = Vec::new();
    let (down, up) = loop {
        let pair = made.iter().find_map(|(down, down_master)| {
            let (up, _) = made
                .iter()
                .find(|(_, m)| *down_master != bob_index && m != down_master)?;
            Some((down.clone(), up.clone()))
        });
        if let Some(pair) = pair {
            break pair;
        }
        assert!(
            made.len() < 24,
            "no two images on suitable masters: {made:?}"
        );
        let image_id = alice
            .create_image(CreateImageRequest {
                instance_id: instance.clone(),
                image_name: format!("slot-probe-{}", made.len()),
                image_description: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .image_id;
        wait_image_state(&mut alice, &image_id, ImageState::Normal).await;
        let master = redis.master_of_slot(image_slot(&image_id));
        made.push((image_id, master));
    };
    for image in [&down, &up] {
        share(&mut alice, image, &[&bob_id], SharePermission::Share)
            .await
            .unwrap();
        launch(&mut bob, image).await.unwrap();
    }

    // The master of the first image's slot and its replica go down: that slot has no master.
    let master = redis.master_of_slot(image_slot(&down));
    // An account whose reverse index lies on that master too.
    let mut dora = None;
    for n in 0..48 {
        let account = cluster.create_account(&format!("dora-{n}")).await;
        let index = format!("imagefleet:{{account-{}}}:shared-with", account.account_id);
        if redis.master_of_slot(key_slot(&index)) == master {
            dora = Some(account.account_id);
            break;
        }
    }
    let dora = dora.expect("an account whose reverse index lies on the master going down");
    let replica = redis.replica_of(master);
    redis.nodes[replica].kill9();
    redis.nodes[master].kill9();
    let (master_port, replica_port) = (redis.nodes[master].port, redis.nodes[replica].port);
    for round in ["at once", "once the cluster marked both nodes failed"] {
        if round != "at once" {
            redis
                .wait_until("the live nodes mark both nodes failed", |r| {
                    let view = r.view();
                    [master_port, replica_port]
                        .iter()
                        .all(|port| view.iter().any(|l| l.port == *port && l.failed))
                })
                .await;
        }
        // Refused, never allowed: the launch, the share check, the owner's share changes.
        assert_refused(
            launch(&mut bob, &down).await,
            Code::Unavailable,
            "ServiceUnavailable",
        );
        let refused = check_share(&mut checks, &down, &bob_id).await;
        assert_eq!(
            refused.as_ref().map_err(|s| s.code()),
            Err(Code::Unavailable),
            "{round}: {refused:?}"
        );
        assert_refused(
            share(&mut alice, &down, &[&bob_id], SharePermission::Cancel).await,
            Code::Unavailable,
            "ServiceUnavailable",
        );
        // The image in another slot keeps working: launched, checked, unshared and shared
        // again (writes acknowledged by its master's replica).
        launch(&mut bob, &up)
            .await
            .unwrap_or_else(|s| panic!("{round}: launch of {up}: {s:?}"));
        assert!(check_share(&mut checks, &up, &bob_id).await.unwrap());
        share(&mut alice, &up, &[&bob_id], SharePermission::Cancel)
            .await
            .unwrap();
        assert_refused(
            launch(&mut bob, &up).await,
            Code::NotFound,
            "InvalidImageId.NotFound",
        );
        share(&mut alice, &up, &[&bob_id], SharePermission::Share)
            .await
            .unwrap();
        launch(&mut bob, &up).await.unwrap();
        // Sharing it with an account whose reverse index lies in a slot without a master is
        // refused too (the index entry comes first), and changes nothing.
        assert_refused(
            share(&mut alice, &up, &[&dora], SharePermission::Share).await,
            Code::Unavailable,
            "ServiceUnavailable",
        );
        assert!(!check_share(&mut checks, &up, &dora).await.unwrap());
    }

    // Both nodes come back: the slot is served again, with its shares.
    redis.nodes[master].spawn();
    redis.nodes[replica].spawn();
    redis.wait_whole().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match launch(&mut bob, &down).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::Unavailable => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{down} still unavailable: {s:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => panic!("launch of {down} after the slot came back: {s:?}"),
        }
    }
    assert!(check_share(&mut checks, &down, &bob_id).await.unwrap());
}

async fn modify(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    image: &str,
    owner: &str,
    permission: sharing::SharePermission,
    accounts: &[&str],
) -> Result<(), tonic::Status> {
    client
        .modify_shares(sharing::ModifySharesRequest {
            image_id: image.into(),
            owner_account_id: owner.into(),
            permission: permission as i32,
            account_ids: accounts.iter().map(|a| a.to_string()).collect(),
        })
        .await
        .map(|_| ())
}

async fn listed_for(
    client: &mut SharingInternalServiceClient<SignedChannel>,
    account: &str,
) -> Vec<String> {
    client
        .list_shared_with(sharing::ListSharedWithRequest {
            account_id: account.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_rules_hold_on_a_redis_cluster() {
    use sharing::SharePermission::{Cancel, Share};
    let redis = RedisCluster::start().await;
    let mut cluster = Cluster::start(&[]).await;
    point_sharing_at(
        &mut cluster,
        vec!["--redis-cluster-nodes".into(), redis.node_list()],
    )
    .await;
    let mut client = sharing_client(&cluster);
    let (alice, bob, carol) = ("100000000001", "100000000002", "100000000003");
    let image = "img-rules001";
    client
        .set_image_owner(sharing::SetImageOwnerRequest {
            image_id: image.into(),
            owner_account_id: alice.into(),
        })
        .await
        .unwrap();

    // Only the owner shares; all accounts or none; cancel only what is shared.
    assert_refused(
        modify(&mut client, image, bob, Share, &[carol]).await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    modify(&mut client, image, alice, Share, &[bob])
        .await
        .unwrap();
    assert_refused(
        modify(&mut client, image, alice, Share, &[carol, bob]).await,
        Code::AlreadyExists,
        "FailedOperation.AccountAlreadyExists",
    );
    assert!(!check_share(&mut client, image, carol).await.unwrap());
    assert!(listed_for(&mut client, carol).await.is_empty());
    assert_refused(
        modify(&mut client, image, alice, Cancel, &[carol]).await,
        Code::FailedPrecondition,
        "FailedOperation.AccountNotShared",
    );

    // At most 500 accounts: 499 more in one call (each account's index in its own slot), then
    // one too many.
    let many: Vec<String> = (0..499)
        .map(|n| (400_000_000_000u64 + n).to_string())
        .collect();
    let many_refs: Vec<&str> = many.iter().map(String::as_str).collect();
    modify(&mut client, image, alice, Share, &many_refs)
        .await
        .unwrap();
    assert_refused(
        modify(&mut client, image, alice, Share, &[carol]).await,
        Code::ResourceExhausted,
        "OverQuota",
    );
    let described = client
        .describe_shares(sharing::DescribeSharesRequest {
            image_id: image.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .shares;
    assert_eq!(described.len(), 500);
    for account in [bob, &many[0], &many[498]] {
        assert!(check_share(&mut client, image, account).await.unwrap());
        assert_eq!(listed_for(&mut client, account).await, [image]);
    }

    // A cancel takes effect at once, in both directions.
    modify(&mut client, image, alice, Cancel, &[bob])
        .await
        .unwrap();
    assert!(!check_share(&mut client, image, bob).await.unwrap());
    assert!(listed_for(&mut client, bob).await.is_empty());

    // Removing the image forgets its owner and every share, in both directions.
    client
        .remove_image(sharing::RemoveImageRequest {
            image_id: image.into(),
        })
        .await
        .unwrap();
    for account in [&many[0], &many[498]] {
        assert!(!check_share(&mut client, image, account).await.unwrap());
        assert!(listed_for(&mut client, account).await.is_empty());
    }
    let owner = client
        .get_image_owner(sharing::GetImageOwnerRequest {
            image_id: image.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .owner_account_id;
    assert_eq!(owner, "");
    // Only the owner can share it again: nobody is, now.
    assert_refused(
        modify(&mut client, image, alice, Share, &[bob]).await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
}
