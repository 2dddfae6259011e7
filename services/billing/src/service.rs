//! The billing gRPC services, served by the catalog process:
//!
//! - `BillingService` (account credentials): `DescribePriceBook`, and `DescribeBill`, the
//!   caller's own bill for a period rated from the stored usage.
//! - `BillingInternalService` (service credentials; who may call what is in
//!   `imagefleet_rpc::identity::RULES`): `ReportUsage`, a region's usage events, stored once
//!   each by `(region, seq)`; `QuoteRun`, the price of a launch.
//!
//! Store work (SQLite and its fsyncs) and rating run on blocking threads. "Now" (the default
//! end of a bill, and the month its default start is in) is the injected [`Clock`]'s.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use imagefleet_proto::billing::v1 as pb;
use imagefleet_proto::billing::v1::billing_internal_service_server::BillingInternalService;
use imagefleet_proto::billing::v1::billing_service_server::BillingService;
use imagefleet_proto::error::{self, invalid_argument};
use imagefleet_rpc::clock::Clock;
use imagefleet_rpc::Caller;
use tonic::{Code, Request, Response, Status};

use crate::book::PriceBook;
use crate::convert::{self, INVALID, MISSING, OUT_OF_RANGE};
use crate::rating::{bill, image_fee_unit, instance_unit, RateError};
use crate::store::{EventStore, StoreError};
use crate::usage::{Usage, UsageEvent};
use crate::{quote, snapshot_quote};

/// The most events one `ReportUsage` call may carry.
pub const MAX_EVENTS_PER_REPORT: usize = 1000;
/// The longest period one bill may cover: 366 days.
pub const MAX_BILL_PERIOD_SECS: i64 = 366 * 24 * 3600;
/// The most instances one quote may price.
pub const MAX_QUOTE_INSTANCES: u32 = 1000;
/// The most hours one quote may price: ten years of hours.
pub const MAX_QUOTE_HOURS: u64 = 10 * 366 * 24;

/// What the billing services serve from: the usage store, the price book and the clock.
pub struct Billing {
    store: EventStore,
    book: PriceBook,
    clock: Clock,
}

impl Billing {
    /// Opens (creating) the usage store `dir/billing.db`.
    pub fn open(dir: &Path, book: PriceBook, clock: Clock) -> anyhow::Result<Billing> {
        let store = EventStore::open(dir)?;
        Ok(Billing { store, book, clock })
    }

    pub fn book(&self) -> &PriceBook {
        &self.book
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn store(&self) -> &EventStore {
        &self.store
    }
}

/// Both billing services over one [`Billing`].
#[derive(Clone)]
pub struct BillingApi {
    billing: Arc<Billing>,
}

impl BillingApi {
    pub fn new(billing: Arc<Billing>) -> BillingApi {
        BillingApi { billing }
    }

    pub fn billing(&self) -> &Arc<Billing> {
        &self.billing
    }

    /// Runs `f` on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Billing) -> Result<T, Status> + Send + 'static,
    ) -> Result<T, Status> {
        let billing = self.billing.clone();
        match tokio::task::spawn_blocking(move || f(&billing)).await {
            Ok(result) => result,
            Err(e) => {
                tracing::error!(error = %e, "billing task failed");
                Err(error::status(
                    Code::Internal,
                    "InternalError",
                    format!("billing task failed: {e}"),
                ))
            }
        }
    }
}

fn store_error(e: StoreError) -> Status {
    match e {
        StoreError::Seq { .. } => invalid_argument("events.seq", OUT_OF_RANGE, e.to_string()),
        StoreError::Database(ref db) => {
            tracing::error!(error = %db, "billing database error");
            error::status(Code::Internal, "InternalError", e.to_string())
        }
    }
}

/// The region a `ReportUsage` caller speaks for: its service identity must be
/// `region-<region>`.
fn reporting_region(caller: &Caller) -> Result<String, Status> {
    let not_allowed = || {
        error::status(
            Code::PermissionDenied,
            "UnauthorizedOperation.CallerNotAllowed",
            "only a region reports usage, and only its own",
        )
    };
    match caller {
        Caller::Service(name) => name
            .strip_prefix(imagefleet_rpc::identity::REGION_PREFIX)
            .filter(|region| convert::is_region_name(region))
            .map(str::to_string)
            .ok_or_else(not_allowed),
        Caller::Account(_) => Err(not_allowed()),
    }
}

/// The events of a `ReportUsage` request, checked whole: every event well-formed and of
/// `region`, at most [`MAX_EVENTS_PER_REPORT`] of them.
pub fn checked_report(region: &str, events: &[pb::UsageEvent]) -> Result<Vec<UsageEvent>, Status> {
    if events.len() > MAX_EVENTS_PER_REPORT {
        return Err(invalid_argument(
            "events",
            "InvalidParameterValue.LimitExceeded",
            format!(
                "{} events; at most {MAX_EVENTS_PER_REPORT} per call",
                events.len()
            ),
        ));
    }
    events
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let field = format!("events[{i}]");
            let event = convert::usage_event(&field, message)?;
            if event.id.region != region {
                return Err(invalid_argument(
                    &format!("{field}.region"),
                    convert::WRONG_REGION,
                    format!(
                        "region-{region} reports usage of its own region only, not of {}",
                        event.id.region
                    ),
                ));
            }
            Ok(event)
        })
        .collect()
}

/// Unix seconds of an RFC 3339 UTC time (`2026-12-01T00:00:00Z`; fractions of a second are
/// dropped).
fn parse_time(field: &str, text: &str) -> Result<i64, Status> {
    let bad = || {
        let shown: String = text.chars().take(64).collect();
        invalid_argument(
            field,
            INVALID,
            format!("{shown:?} is not an RFC 3339 UTC time such as 2026-12-01T00:00:00Z"),
        )
    };
    let time = humantime::parse_rfc3339(text).map_err(|_| bad())?;
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad())?
        .as_secs();
    i64::try_from(secs).map_err(|_| bad())
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let month = i64::from(month);
    let doy = (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil year and month of a day since 1970-01-01.
fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // 1 to 12.
    (year, month as u32)
}

/// The first second of the UTC month `at` falls in.
pub fn month_start(at: i64) -> i64 {
    let (year, month) = year_month(at.div_euclid(86_400));
    days_from_civil(year, month, 1) * 86_400
}

/// The bill period of a request: `(from, to)` in unix seconds, defaults filled in from `now`.
pub fn period(request: &pb::DescribeBillRequest, now: i64) -> Result<(i64, i64), Status> {
    let to = match request.to.as_str() {
        "" => now,
        text => parse_time("to", text)?,
    };
    let from = match request.from.as_str() {
        "" => month_start(now),
        text => parse_time("from", text)?,
    };
    if to < from {
        return Err(invalid_argument(
            "to",
            INVALID,
            format!(
                "the period ends ({}) before it starts ({})",
                imagefleet_rpc::time::rfc3339(to),
                imagefleet_rpc::time::rfc3339(from)
            ),
        ));
    }
    if to - from > MAX_BILL_PERIOD_SECS {
        return Err(invalid_argument(
            "from",
            INVALID,
            "a bill covers at most 366 days",
        ));
    }
    Ok((from, to))
}

/// Splits `events` into those the book can price and anomalies (`region/seq: why`) for the
/// rest: usage in a region the book lacks, a start of a type it does not price, or of an image
/// whose fee it cannot price (a licence for more vCPUs than any class). Rating the rest bills
/// everything the book prices instead of failing the whole bill.
fn priceable(book: &PriceBook, events: Vec<UsageEvent>) -> (Vec<UsageEvent>, Vec<String>) {
    // The type and vCPUs of each instance, for the resets of it.
    let mut shapes: HashMap<(String, String), (String, u32)> = HashMap::new();
    for event in &events {
        if let Usage::InstanceStarted {
            instance_id,
            instance_type,
            vcpu,
            ..
        } = &event.usage
        {
            shapes.insert(
                (event.id.region.clone(), instance_id.clone()),
                (instance_type.clone(), *vcpu),
            );
        }
    }
    let mut kept = Vec::with_capacity(events.len());
    let mut anomalies = Vec::new();
    for event in events {
        let region = event.id.region.as_str();
        let problem: Option<String> = match book.region(region) {
            None => Some(RateError::UnknownRegion(region.to_string()).to_string()),
            Some(prices) => match &event.usage {
                Usage::InstanceStarted {
                    instance_type,
                    vcpu,
                    image,
                    ..
                } => instance_unit(prices, region, instance_type)
                    .and_then(|_| {
                        image_fee_unit(prices, region, image.root_kind, instance_type, *vcpu)
                    })
                    .err()
                    .map(|e| e.to_string()),
                Usage::InstanceImageChanged { instance_id, image } => shapes
                    .get(&(region.to_string(), instance_id.clone()))
                    .and_then(|(instance_type, vcpu)| {
                        image_fee_unit(prices, region, image.root_kind, instance_type, *vcpu).err()
                    })
                    .map(|e| e.to_string()),
                Usage::InstanceTerminated { .. } | Usage::SnapshotBytesHeld { .. } => None,
            },
        };
        match problem {
            Some(why) => anomalies.push(format!(
                "{}/{}: not billed: {why}",
                event.id.region, event.id.seq
            )),
            None => kept.push(event),
        }
    }
    (kept, anomalies)
}

/// `INVALID_ARGUMENT` for a quote the book cannot price.
fn quote_error(e: RateError) -> Status {
    let message = e.to_string();
    match e {
        RateError::UnknownRegion(_) => invalid_argument("region", INVALID, message),
        RateError::NoInstancePrice { .. } | RateError::NoWindowsPrice { .. } => {
            invalid_argument("instance_type", convert::BAD_INSTANCE_TYPE, message)
        }
        RateError::NoLicenceClass { .. } => invalid_argument("vcpu", INVALID, message),
        RateError::Period { .. } | RateError::Overflow => {
            invalid_argument("hours", OUT_OF_RANGE, message)
        }
    }
}

/// The price of a `QuoteRun` request.
pub fn quote_run(book: &PriceBook, r: &pb::QuoteRunRequest) -> Result<pb::RunPrice, Status> {
    let region = convert::region("region", &r.region)?;
    let prices = book
        .region(&region)
        .ok_or_else(|| convert::unpriced_region("region", &region))?;
    let instance_type = convert::instance_type("instance_type", &r.instance_type)?;
    if prices.instance_hour(&instance_type).is_none() {
        return Err(invalid_argument(
            "instance_type",
            convert::BAD_INSTANCE_TYPE,
            format!("the price book has no price for {instance_type} in {region}"),
        ));
    }
    if r.vcpu == 0 {
        return Err(invalid_argument("vcpu", MISSING, "is required"));
    }
    match r.instance_count {
        0 => return Err(invalid_argument("instance_count", MISSING, "is required")),
        n if n > MAX_QUOTE_INSTANCES => {
            return Err(invalid_argument(
                "instance_count",
                OUT_OF_RANGE,
                format!("at most {MAX_QUOTE_INSTANCES}"),
            ))
        }
        _ => {}
    }
    match r.hours {
        0 => return Err(invalid_argument("hours", MISSING, "is required")),
        h if h > MAX_QUOTE_HOURS => {
            return Err(invalid_argument(
                "hours",
                OUT_OF_RANGE,
                format!("at most {MAX_QUOTE_HOURS}"),
            ))
        }
        _ => {}
    }
    let image = convert::image_charge("image", r.image.as_ref())?;
    let priced = quote(
        book,
        &region,
        &instance_type,
        r.vcpu,
        r.instance_count,
        r.hours,
        image.root_kind,
        &image.chain,
    )
    .map_err(quote_error)?;
    let snapshot = if r.include_snapshot {
        Some(snapshot_quote(book, &region, r.owner_snapshot_bytes, r.hours).map_err(quote_error)?)
    } else {
        None
    };
    convert::run_price(
        &priced,
        r.instance_count,
        r.hours,
        &image.root_image_id,
        snapshot.as_ref(),
    )
    .map_err(|e| invalid_argument("hours", OUT_OF_RANGE, e.to_string()))
}

/// The bill of `account` for `from..=to` from the store.
fn describe_bill(
    billing: &Billing,
    account: &str,
    from: i64,
    to: i64,
) -> Result<pb::DescribeBillResponse, Status> {
    let loaded = billing.store.events_of(account, to).map_err(store_error)?;
    let mut anomalies: Vec<String> = loaded
        .unreadable
        .iter()
        .map(|(id, why)| format!("{}/{}: not billed: {why}", id.region, id.seq))
        .collect();
    let (events, unpriced) = priceable(&billing.book, loaded.events);
    anomalies.extend(unpriced);
    let rated = bill(&billing.book, &events, account, from, to).map_err(|e| {
        tracing::error!(error = %e, account, "a bill could not be rated");
        error::status(
            Code::FailedPrecondition,
            "FailedOperation.BillUnrated",
            format!("the bill cannot be rated: {e}"),
        )
    })?;
    Ok(convert::bill_to_proto(&rated, anomalies))
}

#[tonic::async_trait]
impl BillingService for BillingApi {
    async fn describe_price_book(
        &self,
        request: Request<pb::DescribePriceBookRequest>,
    ) -> Result<Response<pb::DescribePriceBookResponse>, Status> {
        imagefleet_rpc::auth::account_id(&request)?;
        let r = request.into_inner();
        convert::price_book_to_proto(&self.billing.book, "region", &r.region).map(Response::new)
    }

    async fn describe_bill(
        &self,
        request: Request<pb::DescribeBillRequest>,
    ) -> Result<Response<pb::DescribeBillResponse>, Status> {
        let account = imagefleet_rpc::auth::account_id(&request)?;
        let (from, to) = period(request.get_ref(), self.billing.clock.now())?;
        self.blocking(move |b| describe_bill(b, &account, from, to))
            .await
            .map(Response::new)
    }
}

#[tonic::async_trait]
impl BillingInternalService for BillingApi {
    async fn report_usage(
        &self,
        request: Request<pb::ReportUsageRequest>,
    ) -> Result<Response<pb::ReportUsageResponse>, Status> {
        let region = reporting_region(imagefleet_rpc::auth::caller(&request)?)?;
        let events = checked_report(&region, &request.get_ref().events)?;
        if events.is_empty() {
            return Ok(Response::new(pb::ReportUsageResponse { stored: 0 }));
        }
        let count = events.len();
        let stored = self
            .blocking(move |b| b.store.insert(&events).map_err(store_error))
            .await?;
        tracing::debug!(%region, events = count, stored, "usage reported");
        Ok(Response::new(pb::ReportUsageResponse { stored }))
    }

    async fn quote_run(
        &self,
        request: Request<pb::QuoteRunRequest>,
    ) -> Result<Response<pb::QuoteRunResponse>, Status> {
        let price = quote_run(&self.billing.book, request.get_ref())?;
        Ok(Response::new(pb::QuoteRunResponse { price: Some(price) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_starts() {
        for (now, start) in [
            ("2026-12-02T11:36:30Z", "2026-12-01T00:00:00Z"),
            ("2024-02-29T23:59:59Z", "2024-02-01T00:00:00Z"),
            ("2025-01-01T00:00:00Z", "2025-01-01T00:00:00Z"),
            ("2000-03-31T12:00:00Z", "2000-03-01T00:00:00Z"),
            ("1970-01-15T00:00:00Z", "1970-01-01T00:00:00Z"),
        ] {
            let now = parse_time("t", now).unwrap();
            assert_eq!(imagefleet_rpc::time::rfc3339(month_start(now)), start);
        }
        // Every day of four years, against the formatted date.
        let base = parse_time("t", "2023-01-01T05:00:00Z").unwrap();
        for day in 0..(4 * 366) {
            let now = base + day * 86_400;
            let text = imagefleet_rpc::time::rfc3339(now);
            let expected = parse_time("t", &format!("{}01T00:00:00Z", &text[..8])).unwrap();
            assert_eq!(month_start(now), expected, "{text}");
        }
    }

    #[test]
    fn periods() {
        let now = parse_time("t", "2026-12-02T11:36:30Z").unwrap();
        let req = |from: &str, to: &str| pb::DescribeBillRequest {
            from: from.into(),
            to: to.into(),
        };
        assert_eq!(
            period(&req("", ""), now).unwrap(),
            (parse_time("t", "2026-12-01T00:00:00Z").unwrap(), now)
        );
        let (from, to) = period(&req("2026-11-01T00:00:00Z", "2026-11-30T23:59:59Z"), now).unwrap();
        assert_eq!(to - from, 30 * 86_400 - 1);
        for (from, to, field) in [
            ("yesterday", "", "from"),
            ("", "2026-13-01T00:00:00Z", "to"),
            ("2026-11-02T00:00:00Z", "2026-11-01T00:00:00Z", "to"),
            ("2024-11-01T00:00:00Z", "2026-11-01T00:00:00Z", "from"),
        ] {
            let status = period(&req(from, to), now).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert_eq!(error::field(&status).as_deref(), Some(field));
            assert_eq!(error::reason(&status).as_deref(), Some(INVALID));
        }
    }
}
