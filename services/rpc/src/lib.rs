//! What every imagefleet service shares on the wire.
//!
//! - `auth`: the request-signing scheme (`docs/auth.md`), its verification as a tower layer in
//!   front of every server, and the principal (`Caller`) it hands to handlers.
//! - `clock`: the clock billable usage is dated by (real, scaled or set from a file).
//! - `client`: channels that sign every request they send.
//! - `server`: serving a set of gRPC services with health, reflection, request spans, signing
//!   checks and graceful shutdown.
//! - `identity`: service identities and the table of who may call which internal method.
//! - `link`: emulated network links between regions (delay, rate, loss, partitions).
//! - `tls`: TLS settings of servers and clients, and the identity a client certificate proves.
//! - `metrics`: Prometheus metrics of calls and services, load shedding, the /metrics endpoint.
//! - `otlp`: export of call spans over OTLP/HTTP when an endpoint is configured.
//! - `ports`: loopback ports for child processes to listen on, without races.
//! - `process`: the process's resident memory and open files as metrics.
//! - `trace`: W3C trace context, taken from clients and carried across service calls.
//! - `telemetry`: logging through `tracing` (`RUST_LOG`).

pub mod auth;
pub mod client;
pub mod clock;
pub mod identity;
pub mod link;
pub mod metrics;
pub mod otlp;
pub mod ports;
pub mod process;
pub mod server;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod trace;

pub use auth::{Caller, Credentials};
pub mod cluster;
pub mod fsutil;

/// Maps a failed call to a peer service to `UNAVAILABLE` (never `INTERNAL`): the caller can
/// retry. Statuses that carry a reason of their own pass through unchanged.
pub fn unavailable(peer: &str, status: tonic::Status) -> tonic::Status {
    match status.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::DeadlineExceeded
        | tonic::Code::Cancelled
        | tonic::Code::Internal => imagefleet_proto::error::status(
            tonic::Code::Unavailable,
            "ServiceUnavailable",
            format!("{peer} did not answer: {}", status.message()),
        ),
        _ => status,
    }
}
