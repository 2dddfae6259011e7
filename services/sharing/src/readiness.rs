//! Keeps `grpc.health.v1` in step with the maps backend: `NOT_SERVING` while it does not answer
//! a ping, `SERVING` again as soon as it does, checked every second.

use crate::maps::OwnershipMaps;
use imagefleet_proto::sharing::v1::sharing_internal_service_server::SharingInternalServiceServer;
use std::time::Duration;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// How often the backend is pinged.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

type Served = SharingInternalServiceServer<crate::service::SharingApi>;

/// Reports `status` for the whole server and for `SharingInternalService`.
pub async fn report(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    match status {
        ServingStatus::Serving => health.set_serving::<Served>().await,
        _ => health.set_not_serving::<Served>().await,
    }
}

/// Pings the backend forever (until the task is aborted), reporting changes. Starts from
/// `NOT_SERVING`, which the caller reports before serving.
pub async fn watch(maps: OwnershipMaps, health: HealthReporter) {
    let mut serving = false;
    let mut ticks = tokio::time::interval(CHECK_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let answered = maps.ping().await;
        match (&answered, serving) {
            (Ok(()), false) => {
                tracing::info!("sharing maps backend answers: serving");
                report(&health, ServingStatus::Serving).await;
            }
            (Err(e), true) => {
                tracing::warn!(error = %e, "sharing maps backend does not answer: not serving");
                report(&health, ServingStatus::NotServing).await;
            }
            _ => {}
        }
        serving = answered.is_ok();
    }
}
