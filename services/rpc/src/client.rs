//! Signed client channels. Every client of an imagefleet service goes through `SignedChannel`,
//! which signs each request for one scope with one set of credentials.

use crate::auth::{Credentials, SigningService};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// A channel that signs every request it sends.
pub type SignedChannel = SigningService<Channel>;

/// The largest message a client or server accepts (disk writes carry up to 4 MiB of data).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// The largest HTTP/2 frame a client or server accepts: a chunk's message (1 MiB and a few
/// bytes) travels in one or two frames instead of 64 of the protocol's default 16 KiB, which
/// saves a frame's handling and a wake-up of the reading task for each.
pub const MAX_FRAME_BYTES: u32 = 2 * 1024 * 1024;

/// An endpoint with the project's transport settings: HTTP/2 windows for chunk streams (the 4
/// streams of a copy keep up to 16 MiB in flight, more than a gigabit link of 100 ms RTT
/// holds), large frames, keep-alive, and a connect timeout. The connection is made on first use. An
/// `https://` URL uses the process's default TLS settings (`crate::tls::install`).
pub fn endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    endpoint_as(url, None, None)
}

/// Like `endpoint`, for a client acting as service `identity` (which presents that identity's
/// certificate) calling the service `server` (whose certificate must be issued for that name).
pub fn endpoint_as(
    url: &str,
    identity: Option<&str>,
    server: Option<&str>,
) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = plain_endpoint(url)?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    match crate::tls::for_client(identity) {
        Some(settings) => endpoint.tls_config(settings.client_config(server)),
        None => Ok(endpoint),
    }
}

fn plain_endpoint(url: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 * 1024 * 1024))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .max_frame_size(Some(MAX_FRAME_BYTES)))
}

/// A lazily connected channel to `url` that signs for `scope` with `credentials`.
pub fn signed_channel(
    url: &str,
    credentials: Credentials,
    scope: &str,
) -> Result<SignedChannel, tonic::transport::Error> {
    let identity = credentials
        .secret_id
        .strip_prefix(crate::auth::SERVICE_SECRET_ID_PREFIX)
        .map(str::to_string);
    let server = crate::identity::identity_of_scope(scope);
    let channel = endpoint_as(url, identity.as_deref(), Some(&server))?.connect_lazy();
    Ok(SigningService::new(channel, credentials, scope))
}

/// Several connections to one server behind one client: each call goes to the next connection
/// in turn. One HTTP/2 connection is driven by one task on each side, so many small concurrent
/// calls (a region's share checks) go faster over a few.
#[derive(Clone)]
pub struct ChannelPool {
    channels: std::sync::Arc<[Channel]>,
    next: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// The connection the next call goes to, once it said it is ready.
    picked: Option<Channel>,
}

impl tower::Service<http::Request<tonic::body::Body>> for ChannelPool {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        let picked = self.picked.get_or_insert_with(|| {
            let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.channels[n % self.channels.len()].clone()
        });
        picked.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        self.picked
            .take()
            .expect("poll_ready before call")
            .call(request)
    }
}

/// A signing client over a `ChannelPool`.
pub type SignedPool = SigningService<ChannelPool>;

/// Like `signed_channel`, over `connections` connections (at least one) used in turn.
pub fn signed_pool(
    url: &str,
    credentials: Credentials,
    scope: &str,
    connections: usize,
) -> Result<SignedPool, tonic::transport::Error> {
    let identity = credentials
        .secret_id
        .strip_prefix(crate::auth::SERVICE_SECRET_ID_PREFIX)
        .map(str::to_string);
    let server = crate::identity::identity_of_scope(scope);
    let endpoint = endpoint_as(url, identity.as_deref(), Some(&server))?;
    let channels: Vec<Channel> = (0..connections.max(1))
        .map(|_| endpoint.connect_lazy())
        .collect();
    let pool = ChannelPool {
        channels: channels.into(),
        next: Default::default(),
        picked: None,
    };
    Ok(SigningService::new(pool, credentials, scope))
}

/// Like `signed_channel`, for region `from` calling region `to`: connections go through the
/// emulated link of that pair in `links` (`crate::link`; no-op while no link is set).
pub fn signed_link_channel(
    url: &str,
    credentials: Credentials,
    scope: &str,
    links: &crate::link::Links,
    (from, to): (&str, &str),
) -> Result<SignedChannel, tonic::transport::Error> {
    let identity = credentials
        .secret_id
        .strip_prefix(crate::auth::SERVICE_SECRET_ID_PREFIX)
        .map(str::to_string);
    let server = crate::identity::identity_of_scope(scope);
    let connector = crate::link::LinkConnector::new(links.clone(), from, to);
    let channel = endpoint_as(url, identity.as_deref(), Some(&server))?
        .connect_with_connector_lazy(connector);
    Ok(SigningService::new(channel, credentials, scope))
}

/// The scope string of a region service.
pub fn region_scope(region: &str) -> String {
    format!("region:{region}")
}

pub const CATALOG_SCOPE: &str = "catalog";
pub const SHARING_SCOPE: &str = "sharing";

/// Account keys looked up in the catalog (with service credentials) and cached briefly, for
/// the verifiers of every service but the catalog itself.
pub struct CatalogAccountKeys {
    client: imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient<SignedChannel>,
    /// A std mutex: held for a map access only.
    cache: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, crate::auth::AccountKey)>>,
}

/// How long a looked-up key is trusted before the catalog is asked again.
const ACCOUNT_KEY_TTL: Duration = Duration::from_secs(60);

impl CatalogAccountKeys {
    pub fn new(catalog_url: &str, service: Credentials) -> Result<Self, tonic::transport::Error> {
        let channel = signed_channel(catalog_url, service, CATALOG_SCOPE)?;
        Ok(CatalogAccountKeys {
            client: imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient::new(channel),
            cache: Default::default(),
        })
    }
}

impl crate::auth::AccountKeys for CatalogAccountKeys {
    fn lookup<'a>(
        &'a self,
        secret_id: &'a str,
    ) -> crate::auth::BoxFuture<'a, Result<Option<crate::auth::AccountKey>, tonic::Status>> {
        Box::pin(async move {
            {
                let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((at, key)) = cache.get(secret_id) {
                    if at.elapsed() < ACCOUNT_KEY_TTL {
                        return Ok(Some(key.clone()));
                    }
                }
            }
            let mut client = self.client.clone();
            let request = imagefleet_proto::catalog::v1::GetAccountCredentialRequest {
                secret_id: secret_id.to_string(),
            };
            match client.get_account_credential(request).await {
                Ok(response) => {
                    let r = response.into_inner();
                    let key = crate::auth::AccountKey {
                        account_id: r.account_id,
                        secret_key: r.secret_key,
                    };
                    let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
                    if cache.len() > 10_000 {
                        cache.clear();
                    }
                    cache.insert(
                        secret_id.to_string(),
                        (std::time::Instant::now(), key.clone()),
                    );
                    Ok(Some(key))
                }
                Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
                Err(status) => Err(crate::unavailable("catalog", status)),
            }
        })
    }
}
