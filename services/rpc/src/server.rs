//! Serving a set of gRPC services: every server gets `grpc.health.v1`, server reflection, a
//! span per request, the signing checks of `auth`, and stops accepting on shutdown, then
//! drains the calls in flight.

use crate::auth::{AuthLayer, Verifier};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::Routes;
use tonic_health::server::HealthReporter;

/// The reason of a call to a service this server does not serve.
pub const UNKNOWN_SERVICE: &str = "UnsupportedOperation.UnknownService";

/// The service names every server answers besides its own.
const ALWAYS_SERVED: &[&str] = &[
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

/// The routes of one server before its own services are added: health and reflection.
/// Reflection lists (and describes) only the services the server says it serves, and a call to
/// any other service is `UNIMPLEMENTED` with reason `UnsupportedOperation.UnknownService`.
pub struct ServerRoutes {
    pub routes: Routes,
    pub health: HealthReporter,
}

impl ServerRoutes {
    /// Routes for a server of `served` (full names, e.g. `imagefleet.region.v1.RegionService`;
    /// every one must be in the imagefleet descriptor set).
    pub fn new(served: &[&str]) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_file_descriptor_set(served_files(served))
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for name in served.iter().chain(ALWAYS_SERVED) {
            reflection = reflection.with_service_name(*name);
        }
        let reflection = reflection
            .build_v1()
            .expect("the embedded descriptor sets are valid");
        let mut routes = Routes::new(health_service).add_service(reflection);
        let router = std::mem::take(routes.axum_router_mut());
        *routes.axum_router_mut() = router.fallback_service(UnknownService);
        ServerRoutes { routes, health }
    }
}

/// The files of the imagefleet descriptor set that define `served`, with the files they import.
fn served_files(served: &[&str]) -> prost_types::FileDescriptorSet {
    let pool = imagefleet_proto::descriptor_pool();
    let mut names = Vec::new();
    let mut file = Vec::new();
    let mut pending: Vec<prost_reflect::FileDescriptor> = served
        .iter()
        .map(|name| {
            pool.get_service_by_name(name)
                .unwrap_or_else(|| panic!("{name} is not an imagefleet service"))
                .parent_file()
        })
        .collect();
    while let Some(next) = pending.pop() {
        if names.contains(&next.name().to_string()) {
            continue;
        }
        names.push(next.name().to_string());
        pending.extend(next.dependencies());
        file.push(next.file_descriptor_proto().clone());
    }
    prost_types::FileDescriptorSet { file }
}

/// Answers every call to a service the server does not serve.
#[derive(Clone, Copy, Debug)]
struct UnknownService;

impl<B> tower::Service<http::Request<B>> for UnknownService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path();
        let service = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let status = imagefleet_proto::error::status_with_metadata(
            tonic::Code::Unimplemented,
            UNKNOWN_SERVICE,
            format!("this server does not serve {service:?}"),
            [("service".to_string(), service)],
        );
        std::future::ready(Ok(status.into_http()))
    }
}

/// How a server's sockets send their writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Every write leaves at once (TCP_NODELAY): for services whose replies often span several
    /// segments, which Nagle's algorithm would hold back for the peer's delayed ACK (~40 ms).
    Immediate,
    /// Small writes are coalesced (Nagle): for services answering many concurrent callers with
    /// replies of one segment each, where coalescing saves a packet per reply (measured: the
    /// sharing service's checks at 50 callers, 14.4 k/s coalesced against 11.4 k/s immediate).
    Coalesced,
}

/// Serves `routes` on `listener` until `shutdown` completes, then drains calls in flight.
///
/// With TLS settings installed for the verifier's identity (`crate::tls::install`), the server
/// speaks TLS only (and demands client certificates when the settings name a client CA);
/// otherwise plaintext. Connections are accepted only from the second after the verifier was
/// made, so that requests signed before the start (refused by the replay floor) are not ones a
/// client signed after it.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    verifier: Arc<Verifier>,
    delivery: Delivery,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // The builder's `tcp_nodelay` does not reach connections from an incoming stream: it is
    // set on each accepted socket.
    let nodelay = delivery == Delivery::Immediate;
    let incoming = TcpListenerStream::new(listener).map(move |conn| {
        if let Ok(socket) = &conn {
            if let Err(e) = socket.set_nodelay(nodelay) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        }
        conn
    });
    let identity = verifier.identity();
    let remembered = Arc::downgrade(&verifier);
    crate::metrics::registry(&identity).on_render(move |r| {
        if let Some(verifier) = remembered.upgrade() {
            r.gauge(
                "imagefleet_replay_cache_entries",
                "Accepted requests the replay protection remembers (each for the timestamp window).",
                &[],
            )
            .set(i64::try_from(verifier.remembered_requests()).unwrap_or(i64::MAX));
        }
    });
    let tls = crate::tls::installed(&identity).and_then(|settings| settings.server_config());
    let started = verifier.started();
    while crate::time::unix_now() <= started {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        tracing::info!(%identity, mutual = crate::tls::mutual(&identity), "serving TLS");
        builder = builder.tls_config(tls)?;
    }
    builder
        .initial_stream_window_size(Some(8 * 1024 * 1024))
        .initial_connection_window_size(Some(32 * 1024 * 1024))
        .max_frame_size(Some(crate::client::MAX_FRAME_BYTES))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .layer(crate::metrics::CallLayer::new(
            &identity,
            crate::metrics::call_limit(&identity),
        ))
        .layer(AuthLayer::new(verifier))
        .serve_with_incoming_shutdown(routes, incoming, shutdown)
        .await
}

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
