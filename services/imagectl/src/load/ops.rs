//! The calls of a load run: set-up (public images to use, custom images to copy and share,
//! copy destinations), one operation of each kind, and clean-up. Every call goes through
//! [`Fleet::call`], which records it.

use super::scenario::{Kind, Operation};
use super::stats::Recorder;
use crate::error::{CliError, Result};
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::{
    CreateImageRequest, DeleteImagesRequest, DescribeImagesRequest, DescribeInstancesRequest,
    Filter, ImageState, InstanceState, ModifyImageSharePermissionRequest, RunInstancesRequest,
    SharePermission, SyncImagesRequest, TerminateInstancesRequest, WriteInstanceDiskRequest,
};
use imagefleet_rpc::client::SignedChannel;
use rand::Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Client = RegionServiceClient<SignedChannel>;

/// Custom images an account keeps per region for `share` operations: each is shared with one
/// receiver at a time, so operations take one and give it back.
pub const SHARE_POOL: usize = 8;
/// How often a copy's state is asked while the operation waits for it: first after
/// `COPY_POLL_FIRST`, then twice as long each time up to `COPY_POLL_MAX`.
const COPY_POLL_FIRST: Duration = Duration::from_millis(25);
const COPY_POLL_MAX: Duration = Duration::from_millis(500);
/// How long an operation waits for its copy before deleting it anyway.
const COPY_WAIT: Duration = Duration::from_secs(120);
/// How long set-up waits for an instance to run or an image to be NORMAL.
const SETUP_WAIT: Duration = Duration::from_secs(120);
/// The most bytes one WriteInstanceDisk call carries.
const WRITE_PIECE: u64 = 4 << 20;

/// One operation of the run, resolved: where, as whom, with what.
#[derive(Clone, Debug)]
pub struct Planned {
    pub op: Operation,
    /// (account, region) pairs it runs as and in.
    pub accounts: Vec<String>,
    pub regions: Vec<String>,
    /// Copy destinations per source region (filled in at set-up when not given).
    pub to: BTreeMap<String, Vec<String>>,
}

/// What the run made and must remove at the end.
#[derive(Debug, Default)]
struct Leftovers {
    /// (account, region) -> instances launched and not yet terminated.
    instances: BTreeMap<(String, String), BTreeSet<String>>,
    /// (account, region) -> images made (set-up images, copies) not yet deleted.
    images: BTreeMap<(String, String), BTreeSet<String>>,
}

/// The images of one (account, region) that `share` operations take turns with.
struct Pool {
    /// Images free to take.
    images: Mutex<Vec<String>>,
    free: tokio::sync::Semaphore,
    /// Every image of the pool (clean-up cancels their shares).
    all: Vec<String>,
}

/// Clients, set-up state and the recorder of one run.
pub struct Fleet {
    pub recorder: Arc<Recorder>,
    clients: HashMap<(String, String), Client>,
    /// region -> NORMAL public images.
    public: HashMap<String, Vec<String>>,
    /// (account, region) -> the custom image copies start from.
    copy_sources: HashMap<(String, String), String>,
    pools: HashMap<(String, String), Pool>,
    /// account -> the account its images are shared with.
    receivers: HashMap<String, String>,
    leftovers: Mutex<Leftovers>,
    /// Names made by this run start with `load-<run>-`.
    run: String,
    seq: AtomicU64,
}

/// A page of `limit` public images.
fn public_images(limit: u32) -> DescribeImagesRequest {
    DescribeImagesRequest {
        filters: vec![Filter {
            name: "image-type".into(),
            values: vec!["PUBLIC_IMAGE".into()],
        }],
        limit,
        ..Default::default()
    }
}

fn status_error(what: &str, status: tonic::Status) -> CliError {
    CliError::Failed(format!("load set-up: {what}: {}", CliError::Status(status)))
}

impl Fleet {
    pub fn new(
        recorder: Arc<Recorder>,
        clients: HashMap<(String, String), Client>,
        receivers: HashMap<String, String>,
    ) -> Fleet {
        let run: String = {
            let mut rng = rand::rng();
            (0..6)
                .map(|_| {
                    char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)])
                })
                .collect()
        };
        Fleet {
            recorder,
            clients,
            public: HashMap::new(),
            copy_sources: HashMap::new(),
            pools: HashMap::new(),
            receivers,
            leftovers: Mutex::new(Leftovers::default()),
            run,
            seq: AtomicU64::new(0),
        }
    }

    fn client(&self, account: &str, region: &str) -> Client {
        self.clients
            .get(&(account.to_string(), region.to_string()))
            .cloned()
            .expect("a client for every (account, region) of the plan")
    }

    fn name(&self, what: &str) -> String {
        format!(
            "load-{}-{what}-{}",
            self.run,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn leftovers(&self) -> std::sync::MutexGuard<'_, Leftovers> {
        self.leftovers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends one call and records it: started at `start` (an open-loop operation's scheduled
    /// start) or now.
    pub async fn call<T, F>(
        &self,
        operation: &str,
        region: &str,
        start: Option<Instant>,
        call: F,
    ) -> std::result::Result<T, tonic::Status>
    where
        F: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        let start = start.unwrap_or_else(Instant::now);
        let result = call.await;
        self.recorder.record(
            operation,
            region,
            start,
            Instant::now(),
            result.as_ref().err(),
        );
        result.map(tonic::Response::into_inner)
    }

    // ----- set-up -----

    /// Finds the NORMAL public images of `region` (as `account`).
    pub async fn find_public_images(&mut self, account: &str, region: &str) -> Result<()> {
        let mut client = self.client(account, region);
        let response = self
            .call(
                "DescribeImages",
                region,
                None,
                client.describe_images(public_images(100)),
            )
            .await
            .map_err(|e| status_error(&format!("public images of {region}"), e))?;
        let ids: Vec<String> = response
            .image_set
            .iter()
            .filter(|i| i.image_state() == ImageState::Normal)
            .map(|i| i.image_id.clone())
            .collect();
        if ids.is_empty() {
            return Err(CliError::Failed(format!(
                "load set-up: {region} has no NORMAL public image to use"
            )));
        }
        self.public.insert(region.to_string(), ids);
        Ok(())
    }

    /// Makes `count` custom images of `account` in `region`, each holding `bytes` written
    /// into its instance before CreateImage; the instances are terminated.
    pub async fn make_images(
        &self,
        account: &str,
        region: &str,
        count: u32,
        bytes: u64,
        instance_type: &str,
    ) -> Result<Vec<String>> {
        let mut client = self.client(account, region);
        let public = self.public[region][0].clone();
        let launched = self
            .call(
                "RunInstances",
                region,
                None,
                client.run_instances(RunInstancesRequest {
                    image_id: public,
                    instance_type: instance_type.to_string(),
                    instance_count: count,
                    instance_name: self.name("src"),
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| status_error(&format!("instances in {region}"), e))?
            .instance_id_set;
        self.leftovers()
            .instances
            .entry((account.to_string(), region.to_string()))
            .or_default()
            .extend(launched.iter().cloned());
        let made = self
            .images_from(&mut client, account, region, &launched, bytes)
            .await;
        // The instances are no longer needed, whatever happened.
        if self
            .call(
                "TerminateInstances",
                region,
                None,
                client.terminate_instances(TerminateInstancesRequest {
                    instance_ids: launched.clone(),
                }),
            )
            .await
            .is_ok()
        {
            if let Some(set) = self
                .leftovers()
                .instances
                .get_mut(&(account.to_string(), region.to_string()))
            {
                for id in &launched {
                    set.remove(id);
                }
            }
        }
        made
    }

    async fn images_from(
        &self,
        client: &mut Client,
        account: &str,
        region: &str,
        instances: &[String],
        bytes: u64,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + SETUP_WAIT;
        loop {
            let listed = self
                .call(
                    "DescribeInstances",
                    region,
                    None,
                    client.describe_instances(DescribeInstancesRequest {
                        instance_ids: instances.to_vec(),
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| status_error("instances' state", e))?;
            if listed
                .instance_set
                .iter()
                .all(|i| i.instance_state() == InstanceState::Running)
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(CliError::Failed(format!(
                    "load set-up: instances in {region} not RUNNING after {SETUP_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut images = Vec::new();
        for instance in instances {
            let mut offset = 1 << 20;
            let mut left = bytes;
            while left > 0 {
                let n = left.min(WRITE_PIECE);
                let mut data = vec![0u8; n as usize];
                rand::rng().fill(&mut data[..]);
                self.call(
                    "WriteInstanceDisk",
                    region,
                    None,
                    client.write_instance_disk(WriteInstanceDiskRequest {
                        instance_id: instance.clone(),
                        offset,
                        data,
                    }),
                )
                .await
                .map_err(|e| status_error(&format!("writing to {instance}"), e))?;
                offset += n;
                left -= n;
            }
            let image = self
                .call(
                    "CreateImage",
                    region,
                    None,
                    client.create_image(CreateImageRequest {
                        instance_id: instance.clone(),
                        image_name: self.name("img"),
                        image_description: "made by imagectl load; deleted at its end".into(),
                    }),
                )
                .await
                .map_err(|e| status_error(&format!("image of {instance}"), e))?
                .image_id;
            self.leftovers()
                .images
                .entry((account.to_string(), region.to_string()))
                .or_default()
                .insert(image.clone());
            images.push(image);
        }
        loop {
            let listed = self
                .call(
                    "DescribeImages",
                    region,
                    None,
                    client.describe_images(DescribeImagesRequest {
                        image_ids: images.clone(),
                        ..Default::default()
                    }),
                )
                .await
                .map_err(|e| status_error("images' state", e))?;
            if let Some(failed) = listed
                .image_set
                .iter()
                .find(|i| i.image_state() == ImageState::Createfailed)
            {
                return Err(CliError::Failed(format!(
                    "load set-up: image {} failed: {}",
                    failed.image_id, failed.state_reason
                )));
            }
            if listed
                .image_set
                .iter()
                .all(|i| i.image_state() == ImageState::Normal)
            {
                return Ok(images);
            }
            if Instant::now() > deadline {
                return Err(CliError::Failed(format!(
                    "load set-up: images in {region} not NORMAL after {SETUP_WAIT:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sets the images `copy` operations of `account` in `region` start from.
    pub fn set_copy_source(&mut self, account: &str, region: &str, image: String) {
        self.copy_sources
            .insert((account.to_string(), region.to_string()), image);
    }

    /// Sets the images `share` operations of `account` in `region` take turns with.
    pub fn set_share_pool(&mut self, account: &str, region: &str, images: Vec<String>) {
        let pool = Pool {
            free: tokio::sync::Semaphore::new(images.len()),
            all: images.clone(),
            images: Mutex::new(images),
        };
        self.pools
            .insert((account.to_string(), region.to_string()), pool);
    }

    /// The regions of `candidates` a copy of `account`'s image in `region` may go to: each
    /// checked with a dry-run SyncImages.
    pub async fn copy_destinations(
        &self,
        account: &str,
        region: &str,
        candidates: &[String],
    ) -> Vec<String> {
        let image = self.copy_sources[&(account.to_string(), region.to_string())].clone();
        let mut client = self.client(account, region);
        let mut ok = Vec::new();
        for dest in candidates.iter().filter(|d| *d != region) {
            let checked = self
                .call(
                    "SyncImages",
                    region,
                    None,
                    client.sync_images(SyncImagesRequest {
                        image_ids: vec![image.clone()],
                        destination_regions: vec![dest.clone()],
                        image_name: self.name("copy"),
                        dry_run: true,
                        ..Default::default()
                    }),
                )
                .await;
            if checked.is_ok() {
                ok.push(dest.clone());
            }
        }
        ok
    }

    // ----- operations -----

    /// Runs one operation of `planned`; `scheduled` is its start on the open-loop schedule.
    pub async fn run_once(&self, planned: &Planned, scheduled: Option<Instant>) {
        let (account, region) = {
            let mut rng = rand::rng();
            (
                planned.accounts[rng.random_range(0..planned.accounts.len())].clone(),
                planned.regions[rng.random_range(0..planned.regions.len())].clone(),
            )
        };
        match planned.op.kind {
            Kind::Describe => self.describe(&account, &region, scheduled).await,
            Kind::Launch => self.launch(&planned.op, &account, &region, scheduled).await,
            Kind::Copy => {
                let to = &planned.to[&region];
                let dest = to[rand::rng().random_range(0..to.len())].clone();
                self.copy(&account, &region, &dest, scheduled).await
            }
            Kind::Share => self.share(&planned.op, &account, &region, scheduled).await,
        }
    }

    fn random_public(&self, region: &str) -> String {
        let ids = &self.public[region];
        ids[rand::rng().random_range(0..ids.len())].clone()
    }

    async fn describe(&self, account: &str, region: &str, scheduled: Option<Instant>) {
        let mut client = self.client(account, region);
        let id = self.random_public(region);
        let _ = self
            .call(
                "DescribeImages",
                region,
                scheduled,
                client.describe_images(DescribeImagesRequest {
                    image_ids: vec![id],
                    ..Default::default()
                }),
            )
            .await;
        let _ = self
            .call(
                "DescribeImages",
                region,
                None,
                client.describe_images(public_images(20)),
            )
            .await;
    }

    /// Launches one instance as `account` from `image` and terminates it; what cannot be
    /// terminated is left for clean-up.
    async fn launch_and_terminate(
        &self,
        op: &Operation,
        account: &str,
        region: &str,
        image: String,
        scheduled: Option<Instant>,
    ) -> bool {
        let mut client = self.client(account, region);
        let Ok(launched) = self
            .call(
                "RunInstances",
                region,
                scheduled,
                client.run_instances(RunInstancesRequest {
                    image_id: image,
                    instance_type: op.instance_type.clone(),
                    instance_count: 1,
                    system_disk_size_gib: op.disk_size_gib,
                    instance_name: format!("load-{}", self.run),
                }),
            )
            .await
        else {
            return false;
        };
        let ids = launched.instance_id_set;
        let key = (account.to_string(), region.to_string());
        // Known to clean-up until it is terminated (an operation abandoned at the end of the
        // run leaves nothing behind).
        self.leftovers()
            .instances
            .entry(key.clone())
            .or_default()
            .extend(ids.iter().cloned());
        let terminated = self
            .call(
                "TerminateInstances",
                region,
                None,
                client.terminate_instances(TerminateInstancesRequest {
                    instance_ids: ids.clone(),
                }),
            )
            .await;
        if terminated.is_err() {
            return false;
        }
        if let Some(set) = self.leftovers().instances.get_mut(&key) {
            for id in &ids {
                set.remove(id);
            }
        }
        true
    }

    async fn launch(
        &self,
        op: &Operation,
        account: &str,
        region: &str,
        scheduled: Option<Instant>,
    ) {
        let image = self.random_public(region);
        self.launch_and_terminate(op, account, region, image, scheduled)
            .await;
    }

    async fn copy(&self, account: &str, region: &str, dest: &str, scheduled: Option<Instant>) {
        let source = self.copy_sources[&(account.to_string(), region.to_string())].clone();
        let mut client = self.client(account, region);
        let Ok(started) = self
            .call(
                "SyncImages",
                region,
                scheduled,
                client.sync_images(SyncImagesRequest {
                    image_ids: vec![source],
                    destination_regions: vec![dest.to_string()],
                    image_name: self.name("copy"),
                    ..Default::default()
                }),
            )
            .await
        else {
            return;
        };
        let copies: Vec<String> = started.image_set.into_iter().map(|c| c.image_id).collect();
        let key = (account.to_string(), dest.to_string());
        self.leftovers()
            .images
            .entry(key.clone())
            .or_default()
            .extend(copies.iter().cloned());
        let mut dest_client = self.client(account, dest);
        let deadline = Instant::now() + COPY_WAIT;
        let mut poll = COPY_POLL_FIRST;
        loop {
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(COPY_POLL_MAX);
            let Ok(listed) = self
                .call(
                    "DescribeImages",
                    dest,
                    None,
                    dest_client.describe_images(DescribeImagesRequest {
                        image_ids: copies.clone(),
                        ..Default::default()
                    }),
                )
                .await
            else {
                break;
            };
            let done = listed
                .image_set
                .iter()
                .all(|i| !matches!(i.image_state(), ImageState::Syncing | ImageState::Creating));
            if done || Instant::now() > deadline {
                break;
            }
        }
        let deleted = self
            .call(
                "DeleteImages",
                dest,
                None,
                dest_client.delete_images(DeleteImagesRequest {
                    image_ids: copies.clone(),
                }),
            )
            .await;
        if deleted.is_ok() {
            if let Some(set) = self.leftovers().images.get_mut(&key) {
                for id in &copies {
                    set.remove(id);
                }
            }
        }
    }

    async fn share(&self, op: &Operation, account: &str, region: &str, scheduled: Option<Instant>) {
        let pool = &self.pools[&(account.to_string(), region.to_string())];
        let Ok(permit) = pool.free.acquire().await else {
            return;
        };
        let image = {
            let mut images = pool.images.lock().unwrap_or_else(|e| e.into_inner());
            images.pop().expect("a permit per pooled image")
        };
        let receiver = self.receivers[account].clone();
        let mut client = self.client(account, region);
        let shared = self
            .call(
                "ModifyImageSharePermission",
                region,
                scheduled,
                client.modify_image_share_permission(ModifyImageSharePermissionRequest {
                    image_id: image.clone(),
                    account_ids: vec![receiver.clone()],
                    permission: SharePermission::Share as i32,
                }),
            )
            .await;
        if shared.is_ok() {
            let mut theirs = self.client(&receiver, region);
            let seen = self
                .call(
                    "DescribeImages",
                    region,
                    None,
                    theirs.describe_images(DescribeImagesRequest {
                        image_ids: vec![image.clone()],
                        ..Default::default()
                    }),
                )
                .await;
            if seen.is_ok() {
                self.launch_and_terminate(op, &receiver, region, image.clone(), None)
                    .await;
            }
        }
        // Cancelled even when the share was refused: an image left shared by an earlier
        // failure is put right here.
        let _ = self
            .call(
                "ModifyImageSharePermission",
                region,
                None,
                client.modify_image_share_permission(ModifyImageSharePermissionRequest {
                    image_id: image.clone(),
                    account_ids: vec![receiver],
                    permission: SharePermission::Cancel as i32,
                }),
            )
            .await;
        pool.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(image);
        drop(permit);
    }

    // ----- clean-up -----

    /// Removes what the run made, best effort: instances left running, shares, images.
    /// Returns what could not be removed, one line each.
    pub async fn clean_up(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let leftovers = std::mem::take(&mut *self.leftovers());
        for ((account, region), ids) in leftovers.instances {
            if ids.is_empty() {
                continue;
            }
            let mut client = self.client(&account, &region);
            let ids: Vec<String> = ids.into_iter().collect();
            for chunk in ids.chunks(100) {
                if let Err(e) = self
                    .call(
                        "TerminateInstances",
                        &region,
                        None,
                        client.terminate_instances(TerminateInstancesRequest {
                            instance_ids: chunk.to_vec(),
                        }),
                    )
                    .await
                {
                    problems.push(format!(
                        "instances {} in {region}: {}",
                        chunk.join(","),
                        CliError::Status(e)
                    ));
                }
            }
        }
        for ((account, region), pool) in &self.pools {
            let receiver = self.receivers[account].clone();
            let mut client = self.client(account, region);
            for image in pool.all.clone() {
                // Refused when not shared: the usual case.
                let _ = self
                    .call(
                        "ModifyImageSharePermission",
                        region,
                        None,
                        client.modify_image_share_permission(ModifyImageSharePermissionRequest {
                            image_id: image,
                            account_ids: vec![receiver.clone()],
                            permission: SharePermission::Cancel as i32,
                        }),
                    )
                    .await;
            }
        }
        // One at a time: a delete is all or none, and one image already gone must not keep
        // the others.
        for ((account, region), ids) in leftovers.images {
            let mut client = self.client(&account, &region);
            for id in ids {
                match self
                    .call(
                        "DeleteImages",
                        &region,
                        None,
                        client.delete_images(DeleteImagesRequest {
                            image_ids: vec![id.clone()],
                        }),
                    )
                    .await
                {
                    Ok(_) => {}
                    Err(e) if e.code() == tonic::Code::NotFound => {}
                    Err(e) => {
                        problems.push(format!("image {id} in {region}: {}", CliError::Status(e)))
                    }
                }
            }
        }
        problems
    }
}
