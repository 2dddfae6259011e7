//! `ObjectStore`: chunks as objects in an S3-compatible bucket (AWS S3, Ceph RGW, Garage,
//! MinIO, Tencent COS), one object per chunk at `<prefix>/<lowercase hex sha256>`, through the
//! `object_store` crate.
//!
//! # Sync calls over an async client
//!
//! `ChunkBackend` is synchronous and is called from the region's blocking threads (and, at
//! start-up, from async code). The backend owns a small tokio runtime of its own: every call
//! is spawned onto it and the calling thread waits on a channel for the answer. The caller
//! never enters that runtime, so a call works from any thread, inside or outside another
//! runtime, without deadlocking.
//!
//! # Writes and durability
//!
//! A chunk is content-addressed, so storing it is idempotent: a `put` first asks whether the
//! object exists (HEAD), and creates it with a conditional PUT (`If-None-Match: *`) when it
//! does not. `AlreadyExists` from the conditional PUT (a concurrent writer stored the same
//! bytes first) is success. A server that does not support conditional PUTs gets a plain
//! overwrite of the same bytes under the same name, which is just as safe.
//!
//! An S3 PUT is durable once the server acknowledges it (the server replicates or fsyncs
//! before answering), and `put_batch` returns only after every PUT of the batch has been
//! acknowledged. So `sync` has nothing left to wait for (beyond the re-check below).
//!
//! # Sharing one bucket: the grace window
//!
//! Several region service replicas may keep their chunks under one bucket and prefix. Each
//! deletes only what its own metadata no longer references, and reclaiming (`reclaim`) deletes
//! an object only when its last-modified time is older than the grace window (default one
//! hour). A writer that finds a chunk already stored re-puts it (which refreshes its
//! last-modified time) when the stored object is older than half the window. So a chunk that
//! any replica stored or re-stored within the last half window is never reclaimed by
//! another: a replica that has just referenced a chunk has just put it. A chunk re-put for
//! being old is looked up again by the next `sync`, which fails if another replica's reclaim
//! deleted it meanwhile. `delete` itself (used by tools and the conformance suite) deletes at
//! once. See `docs/storage.md`.
//!
//! # Space
//!
//! `used_bytes` counts the chunks under the prefix when the backend opens (one listing) and
//! follows this process's puts and deletes after that. `free_bytes` is the configured quota
//! (`?quota=` on the URL) less the bytes used, or unbounded (`u64::MAX` less used) when no
//! quota is set; a put that would go past the quota is refused with `NoSpace`.

use crate::backend::ChunkBackend;
use crate::error::ChunkError;
use crate::types::{ChunkDigest, Space, CHUNK_SIZE};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore as _, PutMode, PutOptions, PutPayload};
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long a stored chunk is safe from another replica's reclaiming, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);

/// PUTs (or HEADs) of one batch in flight at once.
const CONCURRENCY: usize = 8;

/// Shards of the per-digest locks that serialise "is it there? store it / delete it" of one
/// chunk within this process (so concurrent puts of one chunk count it once).
const LOCK_SHARDS: usize = 64;

/// Where and how an object-store backend keeps its chunks: `s3://bucket/prefix` with optional
/// `?grace=1h&quota=100GiB`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectStoreConfig {
    pub bucket: String,
    /// Object name prefix, without leading or trailing slashes; may be empty.
    pub prefix: String,
    /// Objects last modified more recently than this are never reclaimed.
    pub grace: Duration,
    /// Bytes the backend may hold; `None`: unbounded.
    pub quota: Option<u64>,
}

impl ObjectStoreConfig {
    /// Parses `s3://bucket[/prefix][?grace=DURATION&quota=BYTES]`. `grace` takes `0s`, `90s`,
    /// `15m`, `1h`...; `quota` takes bytes with an optional `KiB`, `MiB`, `GiB`, `TiB` suffix.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| format!("chunk store URL {url:?} does not start with s3://"))?;
        let (location, query) = match rest.split_once('?') {
            Some((location, query)) => (location, Some(query)),
            None => (rest, None),
        };
        let (bucket, prefix) = location.split_once('/').unwrap_or((location, ""));
        if bucket.is_empty() {
            return Err(format!("chunk store URL {url:?} names no bucket"));
        }
        let prefix = prefix.trim_matches('/').to_string();
        if prefix.split('/').any(|part| part == "." || part == "..") || prefix.contains("//") {
            return Err(format!("chunk store URL {url:?} has an invalid prefix"));
        }
        let mut config = ObjectStoreConfig {
            bucket: bucket.to_string(),
            prefix,
            grace: DEFAULT_GRACE,
            quota: None,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "grace" => {
                    config.grace = humantime::parse_duration(value)
                        .map_err(|e| format!("chunk store grace {value:?}: {e}"))?
                }
                "quota" => config.quota = Some(parse_bytes(value)?),
                other => {
                    return Err(format!(
                        "chunk store URL {url:?}: unknown option {other:?} (grace, quota)"
                    ))
                }
            }
        }
        Ok(config)
    }
}

/// `123`, `10GiB`, `512MiB`...
fn parse_bytes(text: &str) -> Result<u64, String> {
    let units = [
        ("TiB", 1u64 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    let (number, scale) = units
        .iter()
        .find_map(|(suffix, scale)| text.strip_suffix(suffix).map(|n| (n, *scale)))
        .unwrap_or((text, 1));
    number
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("chunk store quota {text:?} is not a byte count (e.g. 100GiB)"))
}

/// Chunks in an S3-compatible bucket. See the module documentation.
pub struct ObjectStore {
    store: Arc<dyn object_store::ObjectStore>,
    config: ObjectStoreConfig,
    /// The runtime the client's futures run on; taken out (and shut down without waiting)
    /// when the backend is dropped, which may happen inside another runtime.
    runtime: Option<tokio::runtime::Runtime>,
    used_bytes: Mutex<u64>,
    /// Chunks re-put since the last `sync` because they were old (checked again by `sync`).
    touched: Mutex<Vec<ChunkDigest>>,
    locks: Arc<Vec<tokio::sync::Mutex<()>>>,
    describe: String,
}

impl std::fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Drop for ObjectStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl ObjectStore {
    /// Opens `s3://bucket/prefix[?...]` with the endpoint, region and credentials of the
    /// usual AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION` or
    /// `AWS_DEFAULT_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
    /// `AWS_ALLOW_HTTP=true` for a plain-HTTP endpoint), and counts the chunks already there.
    pub fn open(url: &str) -> Result<Self, ChunkError> {
        Self::open_with(url, &[])
    }

    /// [`ObjectStore::open`] with settings that override the environment's, by the
    /// `object_store` crate's S3 option names: `aws_endpoint`, `aws_region`,
    /// `aws_access_key_id`, `aws_secret_access_key`, `aws_allow_http`...
    pub fn open_with(url: &str, options: &[(&str, &str)]) -> Result<Self, ChunkError> {
        let invalid = |e: String| ChunkError::Io(io::Error::new(io::ErrorKind::InvalidInput, e));
        let config = ObjectStoreConfig::parse(url).map_err(invalid)?;
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
        for (key, value) in options {
            let key = key
                .parse::<object_store::aws::AmazonS3ConfigKey>()
                .map_err(|e| invalid(e.to_string()))?;
            builder = builder.with_config(key, *value);
        }
        Self::with_builder(config, builder)
    }

    /// Opens with an explicit builder (endpoint and credentials set by the caller).
    pub fn with_builder(
        config: ObjectStoreConfig,
        builder: AmazonS3Builder,
    ) -> Result<Self, ChunkError> {
        let store = builder.build().map_err(object_error)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("chunkstore-s3")
            .enable_all()
            .build()?;
        let describe = format!("s3://{}/{}", config.bucket, config.prefix);
        let backend = ObjectStore {
            store: Arc::new(store),
            config,
            runtime: Some(runtime),
            used_bytes: Mutex::new(0),
            touched: Mutex::new(Vec::new()),
            locks: Arc::new((0..LOCK_SHARDS).map(|_| Default::default()).collect()),
            describe,
        };
        let chunks = backend.list()?.len() as u64;
        *backend.used() = chunks * CHUNK_SIZE as u64;
        Ok(backend)
    }

    pub fn config(&self) -> &ObjectStoreConfig {
        &self.config
    }

    fn used(&self) -> std::sync::MutexGuard<'_, u64> {
        self.used_bytes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn path(&self, digest: &ChunkDigest) -> ObjectPath {
        object_path(&self.config.prefix, digest)
    }

    /// Runs `future` on the backend's runtime and waits for it on the calling thread.
    fn run<T: Send + 'static>(
        &self,
        future: impl Future<Output = Result<T, ChunkError>> + Send + 'static,
    ) -> Result<T, ChunkError> {
        let runtime = self
            .runtime
            .as_ref()
            .expect("runtime lives as long as the backend");
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(ChunkError::Io(io::Error::other(
                "the object store's runtime stopped",
            )))
        })
    }

    /// The object's metadata, or `None` if it is not there.
    async fn head(
        store: &dyn object_store::ObjectStore,
        path: &ObjectPath,
    ) -> Result<Option<ObjectMeta>, ChunkError> {
        match store.head(path).await {
            Ok(meta) => Ok(Some(meta)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Stores one chunk: created, found (fresh enough), or found old and re-put.
    async fn put_one(
        store: Arc<dyn object_store::ObjectStore>,
        locks: Arc<Vec<tokio::sync::Mutex<()>>>,
        path: ObjectPath,
        digest: ChunkDigest,
        data: bytes::Bytes,
        touch_after: Option<Duration>,
    ) -> Result<Stored, ChunkError> {
        let _lock = locks[shard(&digest)].lock().await;
        if let Some(meta) = Self::head(&*store, &path).await? {
            let intact = meta.size == CHUNK_SIZE as u64;
            let stale = touch_after.is_some_and(|after| age(&meta) >= after);
            if !intact || stale {
                // Refresh (or repair) it: the same bytes under the same name.
                store
                    .put_opts(&path, PutPayload::from(data), PutMode::Overwrite.into())
                    .await
                    .map_err(object_error)?;
                return Ok(if stale {
                    Stored::Touched
                } else {
                    Stored::Present
                });
            }
            return Ok(Stored::Present);
        }
        let create = PutOptions::from(PutMode::Create);
        match store
            .put_opts(&path, PutPayload::from(data.clone()), create)
            .await
        {
            Ok(_) => Ok(Stored::Created),
            // A writer elsewhere stored the same bytes first, a moment ago.
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Stored::Present),
            // No conditional PUTs here (or a transient failure of the non-retried conditional
            // request): the same bytes under the same name, retried by the client.
            Err(_) => {
                store
                    .put_opts(&path, PutPayload::from(data), PutMode::Overwrite.into())
                    .await
                    .map_err(object_error)?;
                Ok(Stored::Created)
            }
        }
    }

    /// Whether an object last modified at `last_modified_ms` (unix milliseconds) may be
    /// reclaimed at `now_ms` with a grace window of `grace`.
    pub fn reclaimable(last_modified_ms: i64, now_ms: i64, grace: Duration) -> bool {
        let grace_ms = i64::try_from(grace.as_millis()).unwrap_or(i64::MAX);
        now_ms.saturating_sub(last_modified_ms) >= grace_ms
    }

    /// The stored chunks, with their metadata.
    fn list_meta(&self) -> Result<Vec<(ChunkDigest, ObjectMeta)>, ChunkError> {
        let store = self.store.clone();
        let prefix = self.config.prefix.clone();
        self.run(async move {
            let base = (!prefix.is_empty()).then(|| ObjectPath::from(prefix.as_str()));
            let depth = base.as_ref().map_or(0, |p| p.parts().count());
            let metas: Vec<ObjectMeta> = store
                .list(base.as_ref())
                .try_collect()
                .await
                .map_err(object_error)?;
            Ok(metas
                .into_iter()
                .filter_map(|meta| {
                    let parts: Vec<_> = meta.location.parts().collect();
                    // Only objects directly under the prefix are chunks.
                    if parts.len() != depth + 1 {
                        return None;
                    }
                    let name = parts[depth].as_ref().to_string();
                    chunk_name(&name).map(|d| (d, meta))
                })
                .collect())
        })
    }
}

impl ChunkBackend for ObjectStore {
    fn put_batch(&self, chunks: &[(ChunkDigest, &[u8])]) -> Result<(), ChunkError> {
        if let Some((digest, _)) = chunks.iter().find(|(_, d)| d.len() != CHUNK_SIZE) {
            return Err(ChunkError::Mismatch(*digest));
        }
        if let Some(quota) = self.config.quota {
            // Refuse before storing when the batch could not fit (chunks already stored count
            // too, so this refuses a little early at worst).
            let needed = (chunks.len() * CHUNK_SIZE) as u64;
            let used = *self.used();
            if used.saturating_add(needed) > quota {
                return Err(ChunkError::NoSpace(format!(
                    "{}: {used} bytes used of a {quota}-byte quota, {needed} more needed",
                    self.describe
                )));
            }
        }
        let touch_after = (!self.config.grace.is_zero()).then(|| self.config.grace / 2);
        let jobs: Vec<_> = chunks
            .iter()
            .map(|(digest, data)| {
                (
                    self.path(digest),
                    *digest,
                    bytes::Bytes::copy_from_slice(data),
                )
            })
            .collect();
        let store = self.store.clone();
        let locks = self.locks.clone();
        let created = self.run(async move {
            let results: Vec<(ChunkDigest, Result<Stored, ChunkError>)> =
                futures::stream::iter(jobs)
                    .map(|(path, digest, data)| {
                        let put = Self::put_one(
                            store.clone(),
                            locks.clone(),
                            path,
                            digest,
                            data,
                            touch_after,
                        );
                        async move { (digest, put.await) }
                    })
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
            let mut created = 0u64;
            let mut touched = Vec::new();
            let mut first_error = None;
            for (digest, result) in results {
                match result {
                    Ok(Stored::Created) => created += 1,
                    Ok(Stored::Present) => {}
                    Ok(Stored::Touched) => touched.push(digest),
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            Ok((created, touched, first_error))
        })?;
        let (created, touched, error) = created;
        *self.used() += created * CHUNK_SIZE as u64;
        self.touched
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(touched);
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Every PUT was acknowledged before `put_batch` returned, and an acknowledged S3 PUT is
    /// durable: nothing to wait for. What is left is the one case where another replica may
    /// have deleted a chunk under us: a chunk found stored and older than half the grace
    /// window, re-put while another replica's reclaim of it was between its look and its
    /// delete. Each such chunk is looked up again; one that is gone fails the sync (`Io`), so
    /// the caller commits nothing that names it and stores it again on retry.
    fn sync(&self) -> Result<(), ChunkError> {
        let mut touched =
            std::mem::take(&mut *self.touched.lock().unwrap_or_else(PoisonError::into_inner));
        if touched.is_empty() {
            return Ok(());
        }
        touched.sort();
        touched.dedup();
        let store = self.store.clone();
        let prefix = self.config.prefix.clone();
        let missing = self.run(async move {
            let looks: Vec<(ChunkDigest, Result<Option<ObjectMeta>, ChunkError>)> =
                futures::stream::iter(touched)
                    .map(|digest| {
                        let store = store.clone();
                        let path = object_path(&prefix, &digest);
                        async move { (digest, Self::head(&*store, &path).await) }
                    })
                    .buffer_unordered(CONCURRENCY)
                    .collect()
                    .await;
            let mut missing = Vec::new();
            for (digest, look) in looks {
                if look?.is_none() {
                    missing.push(digest);
                }
            }
            Ok(missing)
        })?;
        match missing.first() {
            None => Ok(()),
            Some(digest) => Err(ChunkError::Io(io::Error::other(format!(
                "{}: chunk {} was reclaimed by another writer while being stored again; \
                     store it again",
                self.describe,
                digest.to_hex()
            )))),
        }
    }

    fn get(&self, digest: &ChunkDigest) -> Result<Vec<u8>, ChunkError> {
        let store = self.store.clone();
        let path = self.path(digest);
        let digest = *digest;
        self.run(async move {
            let result = match store.get(&path).await {
                Ok(result) => result,
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(ChunkError::NotFound(digest))
                }
                Err(e) => return Err(object_error(e)),
            };
            let data = result.bytes().await.map_err(object_error)?;
            if data.len() != CHUNK_SIZE {
                return Err(ChunkError::Corrupt {
                    digest,
                    detail: format!("{path} holds {} bytes, not {CHUNK_SIZE}", data.len()),
                });
            }
            Ok(data.to_vec())
        })
    }

    fn contains(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        let store = self.store.clone();
        let path = self.path(digest);
        self.run(async move { Ok(Self::head(&*store, &path).await?.is_some()) })
    }

    fn delete(&self, digest: &ChunkDigest) -> Result<(), ChunkError> {
        self.remove(digest, None).map(|_| ())
    }

    fn reclaim(&self, digest: &ChunkDigest) -> Result<bool, ChunkError> {
        self.remove(digest, Some(self.config.grace))
    }

    fn list(&self) -> Result<Vec<ChunkDigest>, ChunkError> {
        Ok(self.list_meta()?.into_iter().map(|(d, _)| d).collect())
    }

    fn space(&self) -> Result<Space, ChunkError> {
        let used_bytes = *self.used();
        let free_bytes = self
            .config
            .quota
            .unwrap_or(u64::MAX)
            .saturating_sub(used_bytes);
        Ok(Space {
            used_bytes,
            free_bytes,
        })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}

impl ObjectStore {
    /// Deletes the chunk's object, unless `grace` is given and the object was modified within
    /// it. Returns false if it was kept.
    fn remove(&self, digest: &ChunkDigest, grace: Option<Duration>) -> Result<bool, ChunkError> {
        let store = self.store.clone();
        let locks = self.locks.clone();
        let path = self.path(digest);
        let digest = *digest;
        let outcome = self.run(async move {
            let _lock = locks[shard(&digest)].lock().await;
            let Some(meta) = Self::head(&*store, &path).await? else {
                return Ok(Removed::Absent);
            };
            if let Some(grace) = grace {
                if !Self::reclaimable(meta.last_modified.timestamp_millis(), now_ms(), grace) {
                    return Ok(Removed::Kept);
                }
            }
            match store.delete(&path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(Removed::Deleted),
                Err(e) => Err(object_error(e)),
            }
        })?;
        match outcome {
            Removed::Deleted => {
                let mut used = self.used();
                *used = used.saturating_sub(CHUNK_SIZE as u64);
                Ok(true)
            }
            Removed::Absent => Ok(true),
            Removed::Kept => Ok(false),
        }
    }
}

/// What storing one chunk did.
enum Stored {
    /// It was not there: this process created it.
    Created,
    /// It was there, recent enough.
    Present,
    /// It was there and older than half the grace window: re-put to refresh it.
    Touched,
}

enum Removed {
    Deleted,
    Absent,
    Kept,
}

fn object_path(prefix: &str, digest: &ChunkDigest) -> ObjectPath {
    if prefix.is_empty() {
        ObjectPath::from(digest.to_hex())
    } else {
        ObjectPath::from(format!("{prefix}/{}", digest.to_hex()))
    }
}

fn shard(digest: &ChunkDigest) -> usize {
    digest.0[0] as usize % LOCK_SHARDS
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// How long ago the object was last modified (zero if its time is ahead of ours).
fn age(meta: &ObjectMeta) -> Duration {
    let ms = now_ms().saturating_sub(meta.last_modified.timestamp_millis());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The digest an object's name stands for: exactly a lowercase hex digest.
fn chunk_name(name: &str) -> Option<ChunkDigest> {
    ChunkDigest::from_hex(name).filter(|d| d.to_hex() == name)
}

/// An object-store error as a `ChunkError`: storage unavailable (`Io`), naming what failed.
fn object_error(e: object_store::Error) -> ChunkError {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        object_store::Error::Unauthenticated { .. }
        | object_store::Error::PermissionDenied { .. } => io::ErrorKind::PermissionDenied,
        object_store::Error::UnknownConfigurationKey { .. } => io::ErrorKind::InvalidInput,
        _ => io::ErrorKind::Other,
    };
    ChunkError::Io(io::Error::new(kind, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_bucket_prefix_and_options() {
        let c = ObjectStoreConfig::parse("s3://images/regions/gz").unwrap();
        assert_eq!(
            c,
            ObjectStoreConfig {
                bucket: "images".into(),
                prefix: "regions/gz".into(),
                grace: DEFAULT_GRACE,
                quota: None
            }
        );
        let c = ObjectStoreConfig::parse("s3://images/?grace=0s&quota=10GiB").unwrap();
        assert_eq!((c.prefix.as_str(), c.grace), ("", Duration::ZERO));
        assert_eq!(c.quota, Some(10 << 30));
        assert_eq!(ObjectStoreConfig::parse("s3://b").unwrap().prefix, "");
        assert_eq!(
            ObjectStoreConfig::parse("s3://b?quota=4096").unwrap().quota,
            Some(4096)
        );
        for bad in [
            "gs://b/p",
            "s3:///p",
            "s3://b/../p",
            "s3://b/a//c",
            "s3://b/p?grace=soon",
            "s3://b/p?quota=lots",
            "s3://b/p?colour=blue",
        ] {
            assert!(ObjectStoreConfig::parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn only_objects_older_than_the_grace_window_are_reclaimable() {
        let hour = Duration::from_secs(3600);
        let now = 1_800_000_000_000;
        assert!(!ObjectStore::reclaimable(now, now, hour));
        assert!(!ObjectStore::reclaimable(now - 3_599_999, now, hour));
        assert!(ObjectStore::reclaimable(now - 3_600_000, now, hour));
        // A last-modified time ahead of our clock is never old enough.
        assert!(!ObjectStore::reclaimable(now + 5_000, now, hour));
        assert!(ObjectStore::reclaimable(now, now, Duration::ZERO));
    }

    #[test]
    fn objects_are_named_under_the_prefix() {
        let d = ChunkDigest([0xab; 32]);
        assert_eq!(object_path("", &d).to_string(), d.to_hex());
        assert_eq!(
            object_path("a/b", &d).to_string(),
            format!("a/b/{}", d.to_hex())
        );
    }
}
