//! Rating: usage events and a price book in, an account's bill for a period out.
//!
//! The rules (docs/billing.md):
//! - Hourly cycles: any use within a clock hour (UTC, aligned to the hour) bills that whole
//!   hour. A run is the half-open interval `[start, end)`; it bills every hour from the hour of
//!   `start` to the hour of its last second, and at least the hour it started in.
//! - An instance bills its type's instance-hour price once per hour it ran, however many runs
//!   or resets fall in the hour.
//! - The image fee is the root's fee in the region the instance runs in: a Windows root bills
//!   by instance type overseas and nothing on the mainland, a licensed root bills by vCPU class
//!   everywhere, a free root never bills. Each image an instance ran bills its fee once per
//!   hour it was used, so a reset within an hour bills both images for that hour.
//! - Snapshot storage: per region, each hour bills the most bytes held at any time in it, less
//!   the region's free tier (never below zero), as byte-hours priced per GB-hour.
//! - The period: the clock hours from the hour of `from` to the hour of `to`, both included.
//!   Usage still running at `to` is billed up to and including `to`'s hour; events after `to`
//!   are not yet known and are ignored; events before `from` set the state the period starts
//!   in. Bill adjacent periods with `to` at the last second of the first (`11:59:59`) and `from`
//!   at the first second of the next (`12:00:00`), so that no hour is billed twice.
//! - Events are deduplicated by id and applied in `(time, id)` order, so that the bill does not
//!   depend on the order or repetition in which they arrived.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::book::{PriceBook, RegionPrices, BYTES_PER_GB};
use crate::money::{Money, MoneyError};
use crate::usage::{EventId, ImageCharge, LineageLink, RootKind, Usage, UsageEvent};

const SECONDS_PER_HOUR: i64 = 3600;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("the price book has no region {0}")]
    UnknownRegion(String),
    #[error("region {region}: the price book has no price for instance type {instance_type}")]
    NoInstancePrice {
        region: String,
        instance_type: String,
    },
    #[error(
        "region {region}: the price book has no Windows price for instance type {instance_type}"
    )]
    NoWindowsPrice {
        region: String,
        instance_type: String,
    },
    #[error("region {region}: the price book has no licence class for {vcpu} vCPUs")]
    NoLicenceClass { region: String, vcpu: u32 },
    #[error("the period ends ({to}) before it starts ({from})")]
    Period { from: i64, to: i64 },
    #[error("amount overflow")]
    Overflow,
}

impl From<MoneyError> for RateError {
    fn from(_: MoneyError) -> RateError {
        RateError::Overflow
    }
}

/// What a line bills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LineKind {
    /// Instance-hours by instance type.
    Instance,
    /// The image fee of a paid root (Windows overseas, or a licence), per instance-hour.
    ImageFee,
    /// Snapshot data held, per GB-hour.
    SnapshotStorage,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::Instance => "INSTANCE",
            LineKind::ImageFee => "IMAGE_FEE",
            LineKind::SnapshotStorage => "SNAPSHOT_STORAGE",
        }
    }
}

/// How much of a thing a line bills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Quantity {
    /// Whole hours (instance-hours when quoting several instances).
    Hours(u64),
    /// Snapshot byte-hours; divided by [`BYTES_PER_GB`] they are the GB-hours the unit price
    /// is per.
    ByteHours(u128),
}

impl Quantity {
    pub fn unit(self) -> &'static str {
        match self {
            Quantity::Hours(_) => "HOUR",
            Quantity::ByteHours(_) => "GB_HOUR",
        }
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Quantity::Hours(0) | Quantity::ByteHours(0))
    }
}

/// Hours as an integer; GB-hours with six decimals, rounded half up.
impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Quantity::Hours(hours) => write!(f, "{hours}"),
            Quantity::ByteHours(byte_hours) => {
                let per_gb = u128::from(BYTES_PER_GB);
                let micro = 1_000_000u128;
                let whole = byte_hours / per_gb;
                let rest = byte_hours % per_gb;
                // rest * 10^6 < 2^30 * 2^20: no overflow.
                let scaled = rest * micro;
                let mut fraction = scaled / per_gb;
                if scaled % per_gb >= per_gb - scaled % per_gb {
                    fraction += 1;
                }
                let (whole, fraction) = if fraction == micro {
                    (whole + 1, 0)
                } else {
                    (whole, fraction)
                };
                write!(f, "{whole}.{fraction:06}")
            }
        }
    }
}

impl Serialize for Quantity {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("Quantity", 2)?;
        s.serialize_field("unit", self.unit())?;
        s.serialize_field("value", &self.to_string())?;
        s.end()
    }
}

/// Why an image fee is billed: the paid root and the lineage that leads to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageFee {
    /// The root's kind: `Windows` or `Licensed`.
    pub cause: RootKind,
    /// The image the instance ran.
    pub image_id: String,
    /// The paid ultimate source.
    pub root_image_id: String,
    /// From `image_id` back to `root_image_id`.
    pub chain: Vec<LineageLink>,
}

/// One line of a bill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineItem {
    pub kind: LineKind,
    pub region: String,
    /// What the line bills: the instance (instance and image-fee lines; an image-fee line
    /// also names the image), or the account (snapshot storage, which is billed per account
    /// per region).
    pub resource_ids: Vec<String>,
    /// The instance type the price was chosen by (instance lines, Windows fees) or `None`.
    pub instance_type: Option<String>,
    /// The vCPUs a licence class was chosen by (licence fees) or `None`.
    pub vcpu: Option<u32>,
    pub quantity: Quantity,
    /// Per hour, or per GB-hour for snapshot storage.
    pub unit_price: Money,
    pub amount: Money,
    /// For image-fee lines: the cause.
    pub image_fee: Option<ImageFee>,
}

/// An event that could not be applied, and why. The bill is still complete for everything
/// else; these are worth a look.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub event: EventId,
    pub reason: String,
}

/// An account's bill for a period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bill {
    pub account: String,
    pub from: i64,
    pub to: i64,
    pub currency: String,
    /// Ordered by kind, region, resource, then price: the same events give the same bill.
    pub lines: Vec<LineItem>,
    /// The sum of the lines of each kind that has any.
    pub totals: BTreeMap<LineKind, Money>,
    pub total: Money,
    pub anomalies: Vec<Anomaly>,
}

impl Bill {
    /// The total of one kind (zero when the bill has no line of it).
    pub fn total_of(&self, kind: LineKind) -> Money {
        self.totals.get(&kind).copied().unwrap_or(Money::ZERO)
    }

    pub fn lines_of(&self, kind: LineKind) -> impl Iterator<Item = &LineItem> {
        self.lines.iter().filter(move |line| line.kind == kind)
    }
}

/// The clock hour (hours since the epoch) a unix second falls in.
pub fn hour_of(at: i64) -> i64 {
    at.div_euclid(SECONDS_PER_HOUR)
}

/// The hours `[start, end)` touches, at least the hour of `start`, as an inclusive range.
fn hours_touched(start: i64, end: i64) -> (i64, i64) {
    let first = hour_of(start);
    let last = if end > start { hour_of(end - 1) } else { first };
    (first, last.max(first))
}

/// How many distinct hours of `window` (inclusive) the inclusive ranges cover.
fn count_hours(ranges: &[(i64, i64)], window: (i64, i64)) -> u64 {
    let mut clipped: Vec<(i64, i64)> = ranges
        .iter()
        .map(|&(a, b)| (a.max(window.0), b.min(window.1)))
        .filter(|(a, b)| a <= b)
        .collect();
    clipped.sort_unstable();
    let mut total: u64 = 0;
    let mut current: Option<(i64, i64)> = None;
    for (a, b) in clipped {
        current = match current {
            Some((ca, cb)) if a <= cb.saturating_add(1) => Some((ca, cb.max(b))),
            Some((ca, cb)) => {
                total = total.saturating_add(span(ca, cb));
                Some((a, b))
            }
            None => Some((a, b)),
        };
    }
    if let Some((ca, cb)) = current {
        total = total.saturating_add(span(ca, cb));
    }
    total
}

/// Hours in the inclusive range `a..=b` (`a <= b`).
fn span(a: i64, b: i64) -> u64 {
    (i128::from(b) - i128::from(a) + 1)
        .try_into()
        .unwrap_or(u64::MAX)
}

/// The image fee per instance-hour of a root in a region, or `None` when it is free there.
pub(crate) fn image_fee_unit(
    prices: &RegionPrices,
    region: &str,
    root_kind: RootKind,
    instance_type: &str,
    vcpu: u32,
) -> Result<Option<Money>, RateError> {
    match root_kind {
        RootKind::Free => Ok(None),
        RootKind::Windows if prices.is_mainland() => Ok(None),
        RootKind::Windows => {
            prices
                .windows_hour(instance_type)
                .map(Some)
                .ok_or_else(|| RateError::NoWindowsPrice {
                    region: region.to_string(),
                    instance_type: instance_type.to_string(),
                })
        }
        RootKind::Licensed => {
            prices
                .licence_hour(vcpu)
                .map(Some)
                .ok_or_else(|| RateError::NoLicenceClass {
                    region: region.to_string(),
                    vcpu,
                })
        }
    }
}

pub(crate) fn region_prices<'b>(
    book: &'b PriceBook,
    region: &str,
) -> Result<&'b RegionPrices, RateError> {
    book.region(region)
        .ok_or_else(|| RateError::UnknownRegion(region.to_string()))
}

pub(crate) fn instance_unit(
    prices: &RegionPrices,
    region: &str,
    instance_type: &str,
) -> Result<Money, RateError> {
    prices
        .instance_hour(instance_type)
        .ok_or_else(|| RateError::NoInstancePrice {
            region: region.to_string(),
            instance_type: instance_type.to_string(),
        })
}

/// A running instance.
struct Run {
    instance_type: String,
    vcpu: u32,
    since: i64,
    image: ImageCharge,
    image_since: i64,
}

type InstanceKey = (String, String, String); // region, instance, type
type ImageKey = (String, String, String, String, u32); // region, instance, image, type, vcpu

#[derive(Default)]
struct Usages {
    instances: BTreeMap<InstanceKey, Vec<(i64, i64)>>,
    images: BTreeMap<ImageKey, (ImageCharge, Vec<(i64, i64)>)>,
    /// Per region: `(time, bytes held from then on)`, in time order.
    snapshots: BTreeMap<String, Vec<(i64, u64)>>,
}

impl Usages {
    fn instance_hours(&mut self, region: &str, instance_id: &str, run: &Run, hours: (i64, i64)) {
        self.instances
            .entry((
                region.to_string(),
                instance_id.to_string(),
                run.instance_type.clone(),
            ))
            .or_default()
            .push(hours);
    }

    fn image_hours(&mut self, region: &str, instance_id: &str, run: &Run, hours: (i64, i64)) {
        if run.image.root_kind == RootKind::Free {
            return;
        }
        self.images
            .entry((
                region.to_string(),
                instance_id.to_string(),
                run.image.image_id.clone(),
                run.instance_type.clone(),
                run.vcpu,
            ))
            .or_insert_with(|| (run.image.clone(), Vec::new()))
            .1
            .push(hours);
    }

    /// Ends a run at `end` (exclusive), or, with `None`, at the end of the period.
    fn close(
        &mut self,
        region: &str,
        instance_id: &str,
        run: &Run,
        end: Option<i64>,
        last_hour: i64,
    ) {
        let (instance, image) = match end {
            Some(end) => (
                hours_touched(run.since, end),
                hours_touched(run.image_since, end),
            ),
            None => (
                (hour_of(run.since), last_hour),
                (hour_of(run.image_since), last_hour),
            ),
        };
        self.instance_hours(region, instance_id, run, instance);
        self.image_hours(region, instance_id, run, image);
    }
}

/// Byte-hours billable in `window` (inclusive hours) from a region's `(time, bytes)` changes
/// in time order, each hour billing its largest holding less `free` bytes.
fn snapshot_byte_hours(
    changes: &[(i64, u64)],
    window: (i64, i64),
    free: u64,
) -> Result<u128, RateError> {
    let billable = |bytes: u64| u128::from(bytes.saturating_sub(free));
    let window_start = window.0.saturating_mul(SECONDS_PER_HOUR);
    let mut level: u64 = 0;
    let mut index = 0;
    while index < changes.len() && changes[index].0 < window_start {
        level = changes[index].1;
        index += 1;
    }
    let mut total: u128 = 0;
    let mut add = |hours: u64, bytes: u64| -> Result<(), RateError> {
        let amount = u128::from(hours)
            .checked_mul(billable(bytes))
            .ok_or(RateError::Overflow)?;
        total = total.checked_add(amount).ok_or(RateError::Overflow)?;
        Ok(())
    };
    let mut next_hour = window.0;
    while index < changes.len() {
        let hour = hour_of(changes[index].0);
        if hour > window.1 {
            break;
        }
        if hour > next_hour {
            add(span(next_hour, hour - 1), level)?;
        }
        // The level carried in is held in this hour unless a change replaces it at the
        // hour's first second.
        let mut peak = if changes[index].0 > hour.saturating_mul(SECONDS_PER_HOUR) {
            level
        } else {
            0
        };
        while index < changes.len() && hour_of(changes[index].0) == hour {
            level = changes[index].1;
            peak = peak.max(level);
            index += 1;
        }
        add(1, peak)?;
        next_hour = hour + 1;
    }
    if next_hour <= window.1 {
        add(span(next_hour, window.1), level)?;
    }
    Ok(total)
}

/// Deduplicates by id (of two events with one id, the one that sorts first is kept and the
/// other reported) and sorts by `(time, id)`.
fn ordered(events: &[UsageEvent]) -> (Vec<&UsageEvent>, Vec<Anomaly>) {
    let mut by_id: Vec<&UsageEvent> = events.iter().collect();
    by_id.sort_by(|a, b| a.id.cmp(&b.id).then_with(|| a.cmp(b)));
    let mut kept: Vec<&UsageEvent> = Vec::with_capacity(by_id.len());
    let mut anomalies = Vec::new();
    for event in by_id {
        match kept.last() {
            Some(previous) if previous.id == event.id => {
                if *previous != event {
                    anomalies.push(Anomaly {
                        event: event.id.clone(),
                        reason: "a second event with this id differs from the first; ignored"
                            .to_string(),
                    });
                }
            }
            _ => kept.push(event),
        }
    }
    kept.sort_by(|a, b| a.at.cmp(&b.at).then_with(|| a.id.cmp(&b.id)));
    (kept, anomalies)
}

/// The bill of `account` for the hours from the hour of `from` to the hour of `to` (unix
/// seconds, both hours included). `events` may hold other accounts' events, repeats and any
/// order; see the module documentation for the rules.
pub fn bill(
    book: &PriceBook,
    events: &[UsageEvent],
    account: &str,
    from: i64,
    to: i64,
) -> Result<Bill, RateError> {
    if to < from {
        return Err(RateError::Period { from, to });
    }
    let window = (hour_of(from), hour_of(to));
    let (events, mut anomalies) = ordered(events);

    let mut runs: BTreeMap<(String, String), Run> = BTreeMap::new();
    let mut usages = Usages::default();
    for event in events {
        if event.account != account || event.at > to {
            continue;
        }
        let region = event.region();
        let anomaly = |reason: &str| Anomaly {
            event: event.id.clone(),
            reason: reason.to_string(),
        };
        if let Usage::InstanceStarted { image, .. } | Usage::InstanceImageChanged { image, .. } =
            &event.usage
        {
            if !image.is_consistent() {
                anomalies.push(anomaly(
                    "the image's chain does not lead from the image to its root; billed by the root's kind",
                ));
            }
        }
        match &event.usage {
            Usage::InstanceStarted {
                instance_id,
                instance_type,
                vcpu,
                image,
            } => {
                let key = (region.to_string(), instance_id.clone());
                if let Some(previous) = runs.remove(&key) {
                    anomalies.push(anomaly(
                        "the instance started while running; its previous run ends here",
                    ));
                    usages.close(region, instance_id, &previous, Some(event.at), window.1);
                }
                runs.insert(
                    key,
                    Run {
                        instance_type: instance_type.clone(),
                        vcpu: *vcpu,
                        since: event.at,
                        image: image.clone(),
                        image_since: event.at,
                    },
                );
            }
            Usage::InstanceImageChanged { instance_id, image } => {
                let key = (region.to_string(), instance_id.clone());
                match runs.get_mut(&key) {
                    Some(run) => {
                        let hours = hours_touched(run.image_since, event.at);
                        usages.image_hours(region, instance_id, run, hours);
                        run.image = image.clone();
                        run.image_since = event.at;
                    }
                    None => anomalies.push(anomaly("a reset of an instance that is not running")),
                }
            }
            Usage::InstanceTerminated { instance_id } => {
                let key = (region.to_string(), instance_id.clone());
                match runs.remove(&key) {
                    Some(run) => usages.close(region, instance_id, &run, Some(event.at), window.1),
                    None => {
                        anomalies.push(anomaly("a termination of an instance that is not running"))
                    }
                }
            }
            Usage::SnapshotBytesHeld { bytes } => usages
                .snapshots
                .entry(region.to_string())
                .or_default()
                .push((event.at, *bytes)),
        }
    }
    for ((region, instance_id), run) in &runs {
        usages.close(region, instance_id, run, None, window.1);
    }

    let mut lines = Vec::new();
    for ((region, instance_id, instance_type), ranges) in &usages.instances {
        let hours = count_hours(ranges, window);
        if hours == 0 {
            continue;
        }
        let prices = region_prices(book, region)?;
        let unit_price = instance_unit(prices, region, instance_type)?;
        lines.push(LineItem {
            kind: LineKind::Instance,
            region: region.clone(),
            resource_ids: vec![instance_id.clone()],
            instance_type: Some(instance_type.clone()),
            vcpu: None,
            quantity: Quantity::Hours(hours),
            unit_price,
            amount: unit_price.checked_mul(hours)?,
            image_fee: None,
        });
    }
    for ((region, instance_id, image_id, instance_type, vcpu), (image, ranges)) in &usages.images {
        let hours = count_hours(ranges, window);
        if hours == 0 {
            continue;
        }
        let prices = region_prices(book, region)?;
        let Some(unit_price) =
            image_fee_unit(prices, region, image.root_kind, instance_type, *vcpu)?
        else {
            continue;
        };
        let licensed = image.root_kind == RootKind::Licensed;
        lines.push(LineItem {
            kind: LineKind::ImageFee,
            region: region.clone(),
            resource_ids: vec![instance_id.clone(), image_id.clone()],
            instance_type: (!licensed).then(|| instance_type.clone()),
            vcpu: licensed.then_some(*vcpu),
            quantity: Quantity::Hours(hours),
            unit_price,
            amount: unit_price.checked_mul(hours)?,
            image_fee: Some(ImageFee {
                cause: image.root_kind,
                image_id: image.image_id.clone(),
                root_image_id: image.root_image_id.clone(),
                chain: image.chain.clone(),
            }),
        });
    }
    for (region, changes) in &usages.snapshots {
        let prices = region_prices(book, region)?;
        let byte_hours = snapshot_byte_hours(changes, window, prices.free_tier_bytes())?;
        if byte_hours == 0 {
            continue;
        }
        let unit_price = prices.snapshot_gb_hour();
        lines.push(LineItem {
            kind: LineKind::SnapshotStorage,
            region: region.clone(),
            resource_ids: vec![account.to_string()],
            instance_type: None,
            vcpu: None,
            quantity: Quantity::ByteHours(byte_hours),
            unit_price,
            amount: unit_price.mul_ratio(byte_hours, u128::from(BYTES_PER_GB))?,
            image_fee: None,
        });
    }

    let mut totals: BTreeMap<LineKind, Money> = BTreeMap::new();
    for line in &lines {
        let total = totals.entry(line.kind).or_default();
        *total = total.checked_add(line.amount)?;
    }
    let total = Money::sum(totals.values().copied())?;
    Ok(Bill {
        account: account.to_string(),
        from,
        to,
        currency: book.currency().to_string(),
        lines,
        totals,
        total,
        anomalies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_touched_by_intervals() {
        let h = |hh: i64, mm: i64| hh * 3600 + mm * 60;
        assert_eq!(hours_touched(h(10, 0), h(11, 1)), (10, 11));
        assert_eq!(hours_touched(h(10, 40), h(12, 10)), (10, 12));
        assert_eq!(hours_touched(h(10, 0), h(11, 0)), (10, 10));
        assert_eq!(hours_touched(h(10, 30), h(10, 30)), (10, 10));
        assert_eq!(hours_touched(-1, 0), (-1, -1));
    }

    #[test]
    fn counts_union_of_ranges() {
        assert_eq!(count_hours(&[(1, 3), (2, 5), (7, 7)], (0, 100)), 6);
        assert_eq!(count_hours(&[(1, 3), (4, 5)], (0, 100)), 5);
        assert_eq!(count_hours(&[(1, 10)], (4, 6)), 3);
        assert_eq!(count_hours(&[(1, 3)], (4, 6)), 0);
        assert_eq!(count_hours(&[], (4, 6)), 0);
    }

    #[test]
    fn snapshot_peaks_per_hour() {
        // 0 free; 10 bytes from 00:30, 40 bytes at 01:10 for a minute, then 5.
        let changes = [(1800, 10), (4200, 40), (4260, 5)];
        // hours 0..=3: 10, 40, 5, 5.
        assert_eq!(snapshot_byte_hours(&changes, (0, 3), 0).unwrap(), 60);
        // Free tier of 8: 2 + 32 + 0 + 0.
        assert_eq!(snapshot_byte_hours(&changes, (0, 3), 8).unwrap(), 34);
        // A window starting later carries the level in: hours 2..=4 at 5.
        assert_eq!(snapshot_byte_hours(&changes, (2, 4), 0).unwrap(), 15);
        // A change at the hour's first second replaces the level for the whole hour.
        let on_the_hour = [(0, 10), (3600, 4)];
        assert_eq!(snapshot_byte_hours(&on_the_hour, (0, 1), 0).unwrap(), 14);
        // A window before any change bills nothing.
        assert_eq!(snapshot_byte_hours(&changes, (-5, -1), 0).unwrap(), 0);
    }

    #[test]
    fn gb_hours_display() {
        let gb = u128::from(BYTES_PER_GB);
        assert_eq!(Quantity::ByteHours(3 * gb).to_string(), "3.000000");
        assert_eq!(Quantity::ByteHours(gb / 2).to_string(), "0.500000");
        assert_eq!(Quantity::ByteHours(gb - 1).to_string(), "1.000000");
        assert_eq!(Quantity::Hours(7).to_string(), "7");
    }
}
