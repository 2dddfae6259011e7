//! Delivery of usage events to the billing service, and the prices of launches.
//!
//! Events wait in the store's outbox (written in the transaction of the change they report)
//! until `BillingInternalService.ReportUsage` acknowledges them; only then are they deleted.
//! A crash at any point loses nothing, and an event delivered twice is stored once (billing
//! keys events by region and sequence number). The delivery runs beside the region's calls and
//! never holds them up: billing being down only delays the reports.

use crate::error::{RegionError, Result};
use crate::model::{Chain, ImageRow};
use crate::region::{blocking, Region};
use imagefleet_proto::billing::v1::{QuoteRunRequest, ReportUsageRequest, RunPrice, UsageEvent};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;

/// Events per report.
const BATCH: usize = 500;
/// How often the delivery looks at the outbox when nothing wakes it.
const IDLE_WAKE: Duration = Duration::from_secs(5);
/// The first wait after a failed report; it doubles up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long one billing call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Delivers the outbox until the task is aborted: oldest events first, a batch at a time.
pub(crate) async fn deliver(region: Arc<Region>) {
    let written = region.store.usage_written();
    let mut delay = FIRST_RETRY;
    let mut failing = false;
    loop {
        match deliver_batch(&region).await {
            Ok(delivered) => {
                if failing {
                    tracing::info!(region = %region.config.region, "billing reachable again: delivering usage");
                    failing = false;
                }
                delay = FIRST_RETRY;
                if delivered == 0 {
                    let _ = tokio::time::timeout(IDLE_WAKE, written.notified()).await;
                }
            }
            Err(e) => {
                // Once per outage, not per try.
                if !failing {
                    tracing::warn!(region = %region.config.region, error = %e, "usage not delivered to billing; retrying");
                    failing = true;
                } else {
                    tracing::debug!(region = %region.config.region, error = %e, "usage delivery retry failed");
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_RETRY);
            }
        }
    }
}

/// Reports the oldest batch of waiting events and deletes them once acknowledged; returns how
/// many went.
async fn deliver_batch(region: &Arc<Region>) -> std::result::Result<usize, String> {
    let store = region.store.clone();
    let pending = blocking(move || store.pending_usage(BATCH))
        .await
        .map_err(|e| e.to_string())?;
    let Some(last) = pending.last().map(|p| p.seq) else {
        return Ok(0);
    };
    let mut events = Vec::with_capacity(pending.len());
    for p in &pending {
        match UsageEvent::decode(p.event.as_slice()) {
            Ok(event) => events.push(event),
            // Not written by this code: kept out of the reports (and dropped with the batch),
            // so it cannot hold up every event after it.
            Err(e) => {
                tracing::error!(region = %region.config.region, seq = p.seq, error = %e, "undecodable usage event dropped")
            }
        }
    }
    if !events.is_empty() {
        let mut request = tonic::Request::new(ReportUsageRequest { events });
        request.set_timeout(CALL_TIMEOUT);
        let mut billing = region.billing.clone();
        tokio::time::timeout(CALL_TIMEOUT, billing.report_usage(request))
            .await
            .map_err(|_| "billing did not answer in time".to_string())?
            .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    }
    let store = region.store.clone();
    blocking(move || store.delivered_usage(last))
        .await
        .map_err(|e| e.to_string())?;
    Ok(pending.len())
}

/// What pricing a launch asks of billing.
pub(crate) struct Quote<'a> {
    pub image: &'a ImageRow,
    pub instance_type: &'a str,
    pub vcpu: u32,
    pub instance_count: u32,
    pub hours: u64,
    /// The caller owns the image: its snapshot storage is priced too, on the caller's total.
    pub owner_snapshot_bytes: Option<u64>,
}

impl Region {
    /// The price of a launch, from billing (`UNAVAILABLE` when it does not answer).
    pub(crate) async fn quote_run(&self, quote: Quote<'_>) -> Result<RunPrice> {
        let chain: &Chain = &quote.image.chain;
        let mut request = tonic::Request::new(QuoteRunRequest {
            region: self.config.region.clone(),
            instance_type: quote.instance_type.to_string(),
            vcpu: quote.vcpu,
            instance_count: quote.instance_count,
            hours: quote.hours,
            image: Some(chain.charge(quote.image.root_kind, &self.config.region)),
            include_snapshot: quote.owner_snapshot_bytes.is_some(),
            owner_snapshot_bytes: quote.owner_snapshot_bytes.unwrap_or(0),
        });
        request.set_timeout(CALL_TIMEOUT);
        let response = tokio::time::timeout(CALL_TIMEOUT, self.billing.clone().quote_run(request))
            .await
            .map_err(|_| {
                imagefleet_rpc::unavailable(
                    "billing",
                    tonic::Status::deadline_exceeded("no answer in time"),
                )
            })?
            .map_err(|s| imagefleet_rpc::unavailable("billing", s))?;
        response.into_inner().price.ok_or_else(|| {
            RegionError::from(imagefleet_rpc::unavailable(
                "billing",
                tonic::Status::internal("the quote had no price"),
            ))
        })
    }
}
