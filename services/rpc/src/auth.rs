//! Request signing (the scheme is specified in `docs/auth.md`).
//!
//! Every call but health checks and reflection carries five headers: the SecretId, a unix
//! timestamp, a nonce, the sha256 of the request message and an HMAC-SHA256 signature over a
//! canonical string of the method path, the scope (which service it is meant for), those three
//! values and the message digest. The server side is a tower layer (`AuthLayer`) that checks the
//! signature, the timestamp window and that the nonce is new, recomputes the message digest
//! from the body, and hands the handler the authenticated `Caller` in the request extensions.

use bytes::{Bytes, BytesMut};
use hmac::{Hmac, Mac};
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use imagefleet_proto::error;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tonic::body::Body;
use tonic::{Code, Status};

pub const HEADER_SECRET_ID: &str = "x-imagefleet-secret-id";
pub const HEADER_TIMESTAMP: &str = "x-imagefleet-timestamp";
pub const HEADER_NONCE: &str = "x-imagefleet-nonce";
pub const HEADER_CONTENT_SHA256: &str = "x-imagefleet-content-sha256";
pub const HEADER_SIGNATURE: &str = "x-imagefleet-signature";
/// Set on a refusal of a request signed no later than the second the server started in (its
/// replay floor): the reference client then signs the request again and sends it once more.
pub const HEADER_SIGN_AGAIN: &str = "x-imagefleet-sign-again";

/// First line of the canonical string; names the scheme and its version.
pub const ALGORITHM: &str = "IMAGEFLEET1-HMAC-SHA256";
/// The content digest of client-streaming calls, whose body cannot be hashed up front.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// How far a request's timestamp may be from the server's clock, either way.
pub const TIMESTAMP_WINDOW_SECS: i64 = 300;
/// SecretIds of service credentials start with this; account SecretIds never do.
pub const SERVICE_SECRET_ID_PREFIX: &str = "svc-";
/// The largest unary request body the verifier buffers.
pub const MAX_SIGNED_BODY: usize = 16 * 1024 * 1024;

/// A SecretId and its SecretKey.
#[derive(Clone)]
pub struct Credentials {
    pub secret_id: String,
    pub secret_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("secret_id", &self.secret_id)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Service credentials for service `name`, keyed with the cluster's service key.
    pub fn service(name: &str, service_key: &str) -> Self {
        Credentials {
            secret_id: format!("{SERVICE_SECRET_ID_PREFIX}{name}"),
            secret_key: service_key.to_string(),
        }
    }
}

/// Who made a call, as proven by its signature. Handlers find it in the request extensions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// An account, by its numeric id.
    Account(String),
    /// Another imagefleet service, by the name in its SecretId.
    Service(String),
}

/// Which credentials a method accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// Health checks and reflection: no credentials.
    Open,
    /// Methods of services whose name ends in `InternalService`: service credentials only.
    Service,
    /// Every other method: account credentials only.
    Account,
}

/// The audience of a gRPC method path (`/package.Service/Method`).
pub fn audience(path: &str) -> Audience {
    let service = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if service == "grpc.health.v1.Health" || service.starts_with("grpc.reflection.") {
        Audience::Open
    } else if service.ends_with("InternalService") {
        Audience::Service
    } else {
        Audience::Account
    }
}

/// The paths of client-streaming methods: their body is not hashed (`UNSIGNED-PAYLOAD`).
pub fn client_streaming_paths() -> &'static HashSet<String> {
    static PATHS: std::sync::OnceLock<HashSet<String>> = std::sync::OnceLock::new();
    PATHS.get_or_init(|| {
        let pool = imagefleet_proto::descriptor_pool();
        pool.services()
            .flat_map(|service| {
                let name = service.full_name().to_string();
                service
                    .methods()
                    .filter(|m| m.is_client_streaming())
                    .map(|m| format!("/{name}/{}", m.name()))
                    .collect::<Vec<_>>()
            })
            .collect()
    })
}

/// The string that is signed. `timestamp` is the text of the timestamp header exactly as it is
/// sent (the verifier passes the header's own text; the signer formats its `i64` once and sends
/// that same text).
pub fn canonical_string(
    path: &str,
    scope: &str,
    timestamp: impl std::fmt::Display,
    nonce: &str,
    content_sha256: &str,
) -> String {
    format!("{ALGORITHM}\n{path}\n{scope}\n{timestamp}\n{nonce}\n{content_sha256}")
}

/// Lowercase hex HMAC-SHA256 of `message` under `secret_key`.
pub fn signature(secret_key: &str, message: &str) -> String {
    signature_with(&keyed(secret_key), message)
}

/// HMAC-SHA256 keyed with `secret_key`, to sign many messages with (`signature_with`).
fn keyed(secret_key: &str) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(secret_key.as_bytes()).expect("HMAC accepts keys of any length")
}

/// Lowercase hex HMAC-SHA256 of `message` under the key of `mac` (which is left as it was).
fn signature_with(mac: &Hmac<Sha256>, message: &str) -> String {
    let mut mac = mac.clone();
    mac.update(message.as_bytes());
    lower_hex(&mac.finalize().into_bytes())
}

/// Lowercase hex of `bytes` (what `hex::encode` gives, without going through `char`s).
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Lowercase hex sha256 of the messages in a gRPC request body (the bytes after each 5-byte
/// length prefix, concatenated). `None` if the body is not well-formed gRPC framing or uses
/// compression.
pub fn body_sha256(body: &[u8]) -> Option<String> {
    let mut hasher = Sha256::new();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 5 || rest[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        let end = 5usize.checked_add(len)?;
        if rest.len() < end {
            return None;
        }
        hasher.update(&rest[5..end]);
        rest = &rest[end..];
    }
    Some(lower_hex(&hasher.finalize()))
}

/// A fresh random nonce (128 bits, hex).
pub fn new_nonce() -> String {
    lower_hex(&rand::random::<[u8; 16]>())
}

/// Adds the five signing headers for a call of `path` to `scope` with the given content digest.
pub fn sign_headers(
    headers: &mut HeaderMap,
    credentials: &Credentials,
    path: &str,
    scope: &str,
    content_sha256: &str,
    timestamp: i64,
    nonce: &str,
) {
    sign_headers_with(
        headers,
        &credentials.secret_id,
        &keyed(&credentials.secret_key),
        (path, scope, content_sha256),
        timestamp,
        nonce,
    )
}

/// `sign_headers` with the HMAC already keyed.
fn sign_headers_with(
    headers: &mut HeaderMap,
    secret_id: &str,
    mac: &Hmac<Sha256>,
    (path, scope, content_sha256): (&str, &str, &str),
    timestamp: i64,
    nonce: &str,
) {
    let timestamp = timestamp.to_string();
    let canonical = canonical_string(path, scope, &timestamp, nonce, content_sha256);
    let sig = signature_with(mac, &canonical);
    // Every value but the SecretId is new with each call: marked sensitive, HTTP/2 sends them
    // as never-indexed literals instead of churning both sides' header tables with them (which
    // also pushed out the headers that repeat: path, content type, SecretId).
    let mut put = |name: &'static str, value: &str, sensitive: bool| {
        if let Ok(mut v) = http::HeaderValue::from_str(value) {
            v.set_sensitive(sensitive);
            headers.insert(name, v);
        }
    };
    put(HEADER_SECRET_ID, secret_id, false);
    put(HEADER_TIMESTAMP, &timestamp, true);
    put(HEADER_NONCE, nonce, true);
    put(HEADER_CONTENT_SHA256, content_sha256, true);
    put(HEADER_SIGNATURE, &sig, true);
}

/// An account's key, as the verifier needs it.
#[derive(Clone, Debug)]
pub struct AccountKey {
    pub account_id: String,
    pub secret_key: String,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where the verifier finds account keys by SecretId: the catalog's own store in the catalog,
/// a cached catalog lookup elsewhere.
pub trait AccountKeys: Send + Sync + 'static {
    /// `Ok(None)` for an unknown SecretId; `Err` when the store cannot answer.
    fn lookup<'a>(
        &'a self,
        secret_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<AccountKey>, Status>>;
}

/// Remembers the requests accepted inside the timestamp window, so that a captured request
/// cannot be sent again. A request is known by its signature (which covers the SecretId, the
/// nonce and the timestamp, and which nobody without the key can produce for another nonce);
/// 128 bits of it are kept, in buckets of `BUCKET_SECS` by the request's own timestamp. A
/// replay carries the same timestamp, so one bucket is looked at; buckets older than the window
/// are dropped whole, since their requests now fail the timestamp check anyway. Each remembered
/// request costs about 24 bytes for the length of the window.
#[derive(Default)]
struct NonceCache {
    /// A std mutex: held only for a set insert, never across an await.
    buckets: Mutex<HashMap<i64, HashSet<u128>>>,
}

const BUCKET_SECS: i64 = 10;

impl NonceCache {
    /// True if the request signed `signature` at `timestamp` is new (and is now remembered).
    fn insert(&self, signature: &str, timestamp: i64, now: i64) -> bool {
        let key = signature
            .get(..32)
            .and_then(|prefix| u128::from_str_radix(prefix, 16).ok())
            .unwrap_or_default();
        let bucket = timestamp.div_euclid(BUCKET_SECS);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if !buckets.contains_key(&bucket) {
            let oldest = (now - TIMESTAMP_WINDOW_SECS).div_euclid(BUCKET_SECS) - 1;
            buckets.retain(|b, _| *b >= oldest);
        }
        buckets.entry(bucket).or_default().insert(key)
    }

    /// How many requests are remembered now.
    fn len(&self) -> usize {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        buckets.values().map(HashSet::len).sum()
    }
}

/// Where a server records the largest future-dated timestamp it accepted, so that it refuses
/// requests up to it after a restart too (see `Verifier::with_replay_floor`).
pub trait FloorStore: Send + Sync + 'static {
    /// The timestamp recorded last (0 when none).
    fn load(&self) -> BoxFuture<'_, Result<i64, String>>;
    /// Records `timestamp` durably before returning.
    fn raise(&self, timestamp: i64) -> BoxFuture<'_, Result<(), String>>;
}

/// A `FloorStore` in a small file (written durably: temp file, fsync, rename).
pub struct FileFloor {
    path: std::path::PathBuf,
}

impl FileFloor {
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        FileFloor { path: path.into() }
    }
}

impl FloorStore for FileFloor {
    fn load(&self) -> BoxFuture<'_, Result<i64, String>> {
        Box::pin(async move {
            match std::fs::read_to_string(&self.path) {
                Ok(text) => text
                    .trim()
                    .parse()
                    .map_err(|e| format!("{}: {e}", self.path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(format!("{}: {e}", self.path.display())),
            }
        })
    }

    fn raise(&self, timestamp: i64) -> BoxFuture<'_, Result<(), String>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                crate::fsutil::write_durably(&path, timestamp.to_string().as_bytes())
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

/// The replay floor of a server that survives restarts: requests whose timestamp is not later
/// than the floor are refused.
struct ReplayFloor {
    store: Arc<dyn FloorStore>,
    /// The largest timestamp recorded in the store, once read (read at the first request, so
    /// that a store that is not up yet, such as Redis, delays requests, not the start).
    recorded: tokio::sync::OnceCell<tokio::sync::Mutex<i64>>,
    /// The second the server started in, or the largest future-dated timestamp accepted before
    /// the restart, whichever is later; set with `recorded`.
    floor: std::sync::OnceLock<i64>,
}

impl ReplayFloor {
    async fn recorded(&self) -> Result<&tokio::sync::Mutex<i64>, Status> {
        self.recorded
            .get_or_try_init(|| async { self.store.load().await.map(tokio::sync::Mutex::new) })
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "cannot read the replay floor");
                error::status(
                    Code::Unavailable,
                    "ServiceUnavailable",
                    "the server cannot check for replays yet; try again",
                )
            })
    }

    /// The floor (reading the store the first time).
    async fn floor(&self, started: i64) -> Result<i64, Status> {
        let recorded = self.recorded().await?;
        if let Some(floor) = self.floor.get() {
            return Ok(*floor);
        }
        let value = *recorded.lock().await;
        Ok(*self.floor.get_or_init(|| started.max(value)))
    }
}

/// Checks signed requests for one server.
pub struct Verifier {
    /// What this server is, as clients name it in the canonical string
    /// (`catalog`, `sharing`, `region:ap-guangzhou`).
    scope: String,
    /// HMAC keyed with the service key (service credentials' signatures).
    service_mac: Hmac<Sha256>,
    /// This server's identity (`identity_of_scope` of `scope`).
    identity: String,
    accounts: Arc<dyn AccountKeys>,
    nonces: NonceCache,
    replay_floor: Option<ReplayFloor>,
    /// The second this verifier was made in (the server starts accepting after it).
    started: i64,
}

fn unauthenticated(reason: &str, message: &str) -> Status {
    error::status(Code::Unauthenticated, reason, message)
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Result<&'h str, Status> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            unauthenticated(
                "AuthFailure.InvalidAuthorization",
                &format!("missing or unreadable header {name}"),
            )
        })
}

/// A timestamp header's value: decimal digits of a non-negative unix time, with no sign, no
/// spaces and no leading zeros (so that one time has exactly one text, the one that is signed).
pub fn parse_timestamp(text: &str) -> Option<i64> {
    let canonical = !text.is_empty()
        && text.len() <= 18
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'));
    canonical.then(|| text.parse().ok()).flatten()
}

impl Verifier {
    pub fn new(
        scope: impl Into<String>,
        service_key: impl Into<String>,
        accounts: Arc<dyn AccountKeys>,
    ) -> Self {
        let scope = scope.into();
        Verifier {
            identity: crate::identity::identity_of_scope(&scope),
            scope,
            service_mac: keyed(&service_key.into()),
            accounts,
            nonces: NonceCache::default(),
            replay_floor: None,
            started: crate::time::unix_now(),
        }
    }

    /// How many accepted requests the replay protection remembers: it grows with the call rate
    /// for the first `TIMESTAMP_WINDOW_SECS` of a server's life, then stays level.
    pub fn remembered_requests(&self) -> usize {
        self.nonces.len()
    }

    /// Makes replay protection hold across restarts. The nonce cache is in memory, so after a
    /// restart it is empty; instead, the verifier refuses every request whose timestamp is not
    /// later than the second it was made in (every request accepted before the restart has an
    /// earlier or equal timestamp, unless it was dated in the future), and, before accepting a
    /// request dated in the future, records its timestamp in `store`; after a restart requests
    /// up to the recorded timestamp are refused as well. `serve` starts accepting only in the
    /// next whole second, so requests signed after the start are not refused.
    pub fn with_replay_floor(mut self, store: Arc<dyn FloorStore>) -> Self {
        self.started = crate::time::unix_now();
        self.replay_floor = Some(ReplayFloor {
            store,
            recorded: tokio::sync::OnceCell::new(),
            floor: std::sync::OnceLock::new(),
        });
        self
    }

    pub fn scope(&self) -> &str {
        &self.scope
    }

    /// The second this verifier was made in: requests dated in it or before are refused when
    /// the replay floor is on.
    pub fn started(&self) -> i64 {
        self.started
    }

    /// The identity of this server (`catalog`, `sharing`, `region-<id>`).
    pub fn identity(&self) -> String {
        self.identity.clone()
    }

    /// Checks the headers of a call to `path` made without a client certificate.
    pub async fn verify_headers(
        &self,
        path: &str,
        headers: &HeaderMap,
        now: i64,
    ) -> Result<(Caller, String), Status> {
        self.verify(path, headers, &crate::tls::Peer::NoCertificate, now)
            .await
    }

    /// Checks the headers of a call to `path` from `peer`; returns the caller and the content
    /// digest the signature covers (which the body must then match).
    pub async fn verify(
        &self,
        path: &str,
        headers: &HeaderMap,
        peer: &crate::tls::Peer,
        now: i64,
    ) -> Result<(Caller, String), Status> {
        let secret_id = header(headers, HEADER_SECRET_ID)?;
        let timestamp = header(headers, HEADER_TIMESTAMP)?;
        let nonce = header(headers, HEADER_NONCE)?;
        let content = header(headers, HEADER_CONTENT_SHA256)?;
        let sig = header(headers, HEADER_SIGNATURE)?;
        let timestamp_text = timestamp;
        let timestamp = parse_timestamp(timestamp_text).ok_or_else(|| {
            unauthenticated(
                "AuthFailure.InvalidAuthorization",
                "timestamp must be the unix time in decimal digits, without sign or leading zeros",
            )
        })?;
        if nonce.len() < 16 || nonce.len() > 64 {
            return Err(unauthenticated(
                "AuthFailure.InvalidAuthorization",
                "nonce must be 16 to 64 characters",
            ));
        }
        if (now - timestamp).abs() > TIMESTAMP_WINDOW_SECS {
            return Err(unauthenticated(
                "AuthFailure.SignatureExpire",
                "timestamp is outside the allowed window",
            ));
        }
        let (caller, key) = if let Some(name) = secret_id.strip_prefix(SERVICE_SECRET_ID_PREFIX) {
            if !crate::identity::is_known(name) {
                return Err(unauthenticated(
                    "AuthFailure.SecretIdNotFound",
                    "the SecretId names no service of this cluster",
                ));
            }
            (Caller::Service(name.to_string()), None)
        } else {
            match self.accounts.lookup(secret_id).await? {
                Some(k) => (Caller::Account(k.account_id), Some(keyed(&k.secret_key))),
                None => {
                    return Err(unauthenticated(
                        "AuthFailure.SecretIdNotFound",
                        "unknown SecretId",
                    ))
                }
            }
        };
        let expected = signature_with(
            key.as_ref().unwrap_or(&self.service_mac),
            &canonical_string(path, &self.scope, timestamp_text, nonce, content),
        );
        if !constant_time_eq(expected.as_bytes(), sig.as_bytes()) {
            return Err(unauthenticated(
                "AuthFailure.SignatureFailure",
                "signature does not match",
            ));
        }
        if let (Caller::Service(name), crate::tls::Peer::Certificate(der)) = (&caller, peer) {
            if !crate::tls::certificate_names(der, name) {
                return Err(unauthenticated(
                    "AuthFailure.CertificateMismatch",
                    "the client certificate is not issued for the service the SecretId names",
                ));
            }
        }
        if let (Caller::Service(_), crate::tls::Peer::NoCertificate) = (&caller, peer) {
            if crate::tls::mutual(&self.identity) {
                return Err(unauthenticated(
                    "AuthFailure.CertificateMismatch",
                    "service credentials need the service's client certificate",
                ));
            }
        }
        match (audience(path), &caller) {
            (Audience::Service, Caller::Account(_)) => {
                return Err(error::status(
                    Code::PermissionDenied,
                    "UnauthorizedOperation.ServiceCredentialRequired",
                    "this method accepts service credentials only",
                ))
            }
            (Audience::Account, Caller::Service(_)) => {
                return Err(error::status(
                    Code::PermissionDenied,
                    "UnauthorizedOperation.AccountCredentialRequired",
                    "this method accepts account credentials only",
                ))
            }
            (Audience::Service, Caller::Service(name))
                if !crate::identity::may_call(name, path) =>
            {
                return Err(error::status(
                    Code::PermissionDenied,
                    "UnauthorizedOperation.CallerNotAllowed",
                    format!("service {name} may not call {path}"),
                ))
            }
            _ => {}
        }
        if let Some(replay) = &self.replay_floor {
            if timestamp <= replay.floor(self.started).await? {
                let mut status = unauthenticated(
                    "AuthFailure.SignatureExpire",
                    "the request is dated no later than this server's start (or a request it accepted before): sign it again",
                );
                status.metadata_mut().insert(
                    HEADER_SIGN_AGAIN,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                return Err(status);
            }
        }
        if !self.nonces.insert(sig, timestamp, now) {
            return Err(unauthenticated(
                "AuthFailure.RequestReplayed",
                "this nonce was already used",
            ));
        }
        if let Some(replay) = &self.replay_floor {
            if timestamp > now {
                let mut recorded = replay.recorded().await?.lock().await;
                if timestamp > *recorded {
                    if let Err(e) = replay.store.raise(timestamp).await {
                        tracing::warn!(error = %e, "cannot record the replay floor");
                        return Err(error::status(
                            Code::Unavailable,
                            "ServiceUnavailable",
                            "cannot record the request's timestamp; try again",
                        ));
                    }
                    *recorded = timestamp;
                }
            }
        }
        Ok((caller, content.to_string()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The authenticated caller of a request (set by `AuthLayer`).
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Caller, Status> {
    request.extensions().get::<Caller>().ok_or_else(|| {
        unauthenticated(
            "AuthFailure.InvalidAuthorization",
            "request is not authenticated",
        )
    })
}

/// The account id of an account caller.
pub fn account_id<T>(request: &tonic::Request<T>) -> Result<String, Status> {
    match caller(request)? {
        Caller::Account(id) => Ok(id.clone()),
        Caller::Service(_) => Err(error::status(
            Code::PermissionDenied,
            "UnauthorizedOperation.AccountCredentialRequired",
            "this method accepts account credentials only",
        )),
    }
}

/// Tower layer that verifies signed requests in front of a server's routes.
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
}

impl AuthLayer {
    pub fn new(verifier: Arc<Verifier>) -> Self {
        AuthLayer { verifier }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<Verifier>,
}

async fn read_body(body: Body) -> Result<Bytes, Status> {
    let limited = http_body_util::Limited::new(body, MAX_SIGNED_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) => Err(error::status(
            Code::InvalidArgument,
            "InvalidParameter.RequestTooLarge",
            format!("request body could not be read: {e}"),
        )),
    }
}

impl<S> tower::Service<Request<Body>> for AuthService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            if audience(&path) == Audience::Open {
                return inner.call(request).await;
            }
            let (mut parts, body) = request.into_parts();
            let now = crate::time::unix_now();
            let peer = crate::tls::peer_of(&parts.extensions);
            let (caller, content) = match verifier.verify(&path, &parts.headers, &peer, now).await {
                Ok(v) => v,
                Err(status) => {
                    tracing::debug!(%path, code = ?status.code(), "request refused");
                    return Ok(status.into_http());
                }
            };
            let body = if client_streaming_paths().contains(&path) {
                if content != UNSIGNED_PAYLOAD {
                    return Ok(unauthenticated(
                        "AuthFailure.SignatureFailure",
                        "client-streaming calls sign UNSIGNED-PAYLOAD",
                    )
                    .into_http());
                }
                body
            } else {
                let bytes = match read_body(body).await {
                    Ok(b) => b,
                    Err(status) => return Ok(status.into_http()),
                };
                if body_sha256(&bytes).as_deref() != Some(content.as_str()) {
                    return Ok(unauthenticated(
                        "AuthFailure.SignatureFailure",
                        "request message does not match its signed digest",
                    )
                    .into_http());
                }
                Body::new(http_body_util::Full::new(bytes))
            };
            parts.extensions.insert(caller);
            inner.call(Request::from_parts(parts, body)).await
        })
    }
}

/// Tower layer for clients: signs every request with `credentials` for `scope`.
#[derive(Clone)]
pub struct SigningService<S> {
    inner: S,
    signer: Arc<Signer>,
}

/// What a client signs with: its SecretId, the HMAC keyed with its SecretKey, the scope.
struct Signer {
    secret_id: String,
    mac: Hmac<Sha256>,
    scope: String,
}

impl Signer {
    /// Signs a call of `path` whose message digest is `content`, now, with a fresh nonce.
    fn sign(&self, headers: &mut HeaderMap, path: &str, content: &str) {
        sign_headers_with(
            headers,
            &self.secret_id,
            &self.mac,
            (path, &self.scope, content),
            crate::time::unix_now(),
            &new_nonce(),
        );
    }
}

impl<S> SigningService<S> {
    pub fn new(inner: S, credentials: Credentials, scope: &str) -> Self {
        SigningService {
            inner,
            signer: Arc::new(Signer {
                mac: keyed(&credentials.secret_key),
                secret_id: credentials.secret_id,
                scope: scope.to_string(),
            }),
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S> tower::Service<Request<Body>> for SigningService<S>
where
    S: tower::Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let signer = self.signer.clone();
        Box::pin(async move {
            let path = request.uri().path().to_string();
            let (mut parts, body) = request.into_parts();
            crate::trace::inject(&mut parts.headers);
            let body = if client_streaming_paths().contains(&path) {
                signer.sign(&mut parts.headers, &path, UNSIGNED_PAYLOAD);
                body
            } else {
                let mut buf = BytesMut::new();
                let mut body = body;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.map_err(Into::<BoxError>::into)?.into_data() {
                        buf.extend_from_slice(&data);
                    }
                }
                let bytes = buf.freeze();
                let digest = body_sha256(&bytes).ok_or("request body is not gRPC-framed")?;
                signer.sign(&mut parts.headers, &path, &digest);
                // Kept to send again, signed anew, if the server started after it was signed.
                let mut again = Request::new(Body::new(http_body_util::Full::new(bytes.clone())));
                *again.method_mut() = parts.method.clone();
                *again.uri_mut() = parts.uri.clone();
                *again.version_mut() = parts.version;
                *again.headers_mut() = parts.headers.clone();
                *again.extensions_mut() = parts.extensions.clone();
                let response = inner
                    .call(Request::from_parts(
                        parts,
                        Body::new(http_body_util::Full::new(bytes)),
                    ))
                    .await
                    .map_err(Into::into)?;
                if response.headers().get(HEADER_SIGN_AGAIN).is_none() {
                    return Ok(response);
                }
                // Signed in (or before) the second the server started in: sign again once the
                // clock has passed it.
                let signed_at = crate::time::unix_now();
                while crate::time::unix_now() <= signed_at {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                signer.sign(again.headers_mut(), &path, &digest);
                use tower::ServiceExt;
                return inner
                    .ready()
                    .await
                    .map_err(Into::into)?
                    .call(again)
                    .await
                    .map_err(Into::into);
            };
            inner
                .call(Request::from_parts(parts, body))
                .await
                .map_err(Into::into)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OneAccount;
    impl AccountKeys for OneAccount {
        fn lookup<'a>(
            &'a self,
            secret_id: &'a str,
        ) -> BoxFuture<'a, Result<Option<AccountKey>, Status>> {
            Box::pin(async move {
                Ok((secret_id == "AKIDtest").then(|| AccountKey {
                    account_id: "100000000001".into(),
                    secret_key: "key".into(),
                }))
            })
        }
    }

    fn signed(path: &str, scope: &str, creds: &Credentials, ts: i64, nonce: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        sign_headers(
            &mut h,
            creds,
            path,
            scope,
            &body_sha256(&[]).unwrap(),
            ts,
            nonce,
        );
        h
    }

    fn account() -> Credentials {
        Credentials {
            secret_id: "AKIDtest".into(),
            secret_key: "key".into(),
        }
    }

    const PATH: &str = "/imagefleet.region.v1.RegionService/DescribeImages";

    #[tokio::test]
    async fn accepts_once_then_refuses_replay() {
        let v = Verifier::new("region:ap-guangzhou", "svc-key", Arc::new(OneAccount));
        let h = signed(
            PATH,
            "region:ap-guangzhou",
            &account(),
            1000,
            "0123456789abcdef",
        );
        let (caller, _) = v.verify_headers(PATH, &h, 1000).await.unwrap();
        assert_eq!(caller, Caller::Account("100000000001".into()));
        let err = v.verify_headers(PATH, &h, 1001).await.unwrap_err();
        assert_eq!(
            error::reason(&err).as_deref(),
            Some("AuthFailure.RequestReplayed")
        );
    }

    #[tokio::test]
    async fn refuses_expired_wrong_scope_and_wrong_key() {
        let v = Verifier::new("region:ap-guangzhou", "svc-key", Arc::new(OneAccount));
        let h = signed(
            PATH,
            "region:ap-guangzhou",
            &account(),
            1000,
            "0123456789abcdef",
        );
        let err = v
            .verify_headers(PATH, &h, 1000 + TIMESTAMP_WINDOW_SECS + 1)
            .await
            .unwrap_err();
        assert_eq!(
            error::reason(&err).as_deref(),
            Some("AuthFailure.SignatureExpire")
        );
        let h = signed(
            PATH,
            "region:ap-shanghai",
            &account(),
            1000,
            "0123456789abcdeg",
        );
        let err = v.verify_headers(PATH, &h, 1000).await.unwrap_err();
        assert_eq!(
            error::reason(&err).as_deref(),
            Some("AuthFailure.SignatureFailure")
        );
        let bad = Credentials {
            secret_id: "AKIDtest".into(),
            secret_key: "nope".into(),
        };
        let h = signed(PATH, "region:ap-guangzhou", &bad, 1000, "0123456789abcdeh");
        let err = v.verify_headers(PATH, &h, 1000).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn credential_kinds_are_not_interchangeable() {
        let v = Verifier::new("catalog", "svc-key", Arc::new(OneAccount));
        let internal = "/imagefleet.catalog.v1.CatalogInternalService/CreateAccount";
        let h = signed(internal, "catalog", &account(), 1000, "0123456789abcdef");
        let err = v.verify_headers(internal, &h, 1000).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let svc = Credentials::service("region-ap-x", "svc-key");
        let public = "/imagefleet.catalog.v1.CatalogService/DescribeRegions";
        let h = signed(public, "catalog", &svc, 1000, "0123456789abcdef");
        let err = v.verify_headers(public, &h, 1000).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        // A region may not create accounts; the operator may.
        let h = signed(internal, "catalog", &svc, 1000, "0123456789abcdee");
        let err = v.verify_headers(internal, &h, 1000).await.unwrap_err();
        assert_eq!(
            error::reason(&err).as_deref(),
            Some("UnauthorizedOperation.CallerNotAllowed")
        );
        let admin = Credentials::service("admin", "svc-key");
        let h = signed(internal, "catalog", &admin, 1000, "0123456789abcded");
        assert!(v.verify_headers(internal, &h, 1000).await.is_ok());
        // A service SecretId naming no service.
        let bogus = Credentials::service("bogus", "svc-key");
        let h = signed(internal, "catalog", &bogus, 1000, "0123456789abcdec");
        let err = v.verify_headers(internal, &h, 1000).await.unwrap_err();
        assert_eq!(
            error::reason(&err).as_deref(),
            Some("AuthFailure.SecretIdNotFound")
        );
    }

    #[test]
    fn the_replay_memory_counts_what_it_holds_and_forgets_past_the_window() {
        let cache = NonceCache::default();
        let now = 1_000_000;
        let sig = |i: u32| format!("{i:032x}{:032x}", 0);
        for i in 0..100 {
            assert!(cache.insert(&sig(i), now, now));
        }
        assert!(!cache.insert(&sig(7), now, now), "a replay is refused");
        assert_eq!(cache.len(), 100);
        // Past the window, the next new bucket drops the old ones.
        let later = now + TIMESTAMP_WINDOW_SECS + 2 * BUCKET_SECS;
        assert!(cache.insert(&sig(1000), later, later));
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn timestamps_have_one_text() {
        assert_eq!(parse_timestamp("1764218000"), Some(1764218000));
        assert_eq!(parse_timestamp("0"), Some(0));
        for bad in ["01764218000", "+1764218000", " 1764218000", "-5", "", "1e9"] {
            assert_eq!(parse_timestamp(bad), None, "{bad:?}");
        }
    }

    /// The worked example of docs/auth.md.
    #[test]
    fn documented_example_signature() {
        let canonical = canonical_string(
            "/imagefleet.region.v1.RegionService/DescribeImages",
            "region:ap-guangzhou",
            1764218000,
            "0123456789abcdef0123456789abcdef",
            &body_sha256(&[]).unwrap(),
        );
        assert_eq!(
            signature("secret", &canonical),
            "b543167e18fe5969775121e2ee08d08481243accb71da7e1d7a8956fb8f94aae"
        );
    }

    #[test]
    fn body_digest_covers_messages_and_rejects_bad_framing() {
        let mut framed = vec![0u8, 0, 0, 0, 3];
        framed.extend_from_slice(b"abc");
        let expected = hex::encode(Sha256::digest(b"abc"));
        assert_eq!(lower_hex(&Sha256::digest(b"abc")), expected);
        assert_eq!(body_sha256(&framed).as_deref(), Some(expected.as_str()));
        assert_eq!(body_sha256(&[0, 0, 0, 0, 9, 1]), None);
        assert_eq!(body_sha256(&[1, 0, 0, 0, 0]), None);
    }
}
