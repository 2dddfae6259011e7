//! Quotes: what launching instances, or holding snapshot data, would cost for some hours, by
//! the same rules and prices as a bill (`InquiryPriceRunInstances` and friends).

use serde::Serialize;

use crate::book::{PriceBook, BYTES_PER_GB};
use crate::money::Money;
use crate::rating::{image_fee_unit, instance_unit, region_prices, Quantity, RateError};
use crate::usage::{LineageLink, RootKind};

/// A priced part of a quote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QuotePart {
    /// Per instance-hour.
    pub unit_price: Money,
    /// Instance-hours: instances times hours.
    pub quantity: Quantity,
    pub amount: Money,
}

/// The image fee of a quote and the lineage that causes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ImageFeeQuote {
    /// The root's kind: `Windows` or `Licensed`.
    pub cause: RootKind,
    /// The paid root: the last image of `chain`, when the chain names one.
    pub root_image_id: Option<String>,
    pub chain: Vec<LineageLink>,
    pub part: QuotePart,
}

/// The price of running `count` instances for `hours` hours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub currency: String,
    pub region: String,
    pub instance_type: String,
    pub instance: QuotePart,
    /// `None` when the image is free to launch from in this region.
    pub image_fee: Option<ImageFeeQuote>,
    pub total: Money,
}

/// The price of holding snapshot data for some hours.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotQuote {
    pub currency: String,
    pub region: String,
    /// The account's total snapshot bytes in the region.
    pub bytes_held: u64,
    /// The region's free tier, in bytes.
    pub free_tier_bytes: u64,
    /// What is billed each hour: `bytes_held` less the free tier, never below zero.
    pub billable_bytes: u64,
    /// Per GB-hour.
    pub unit_price: Money,
    pub quantity: Quantity,
    pub amount: Money,
}

/// What `count` instances of `instance_type` (with `vcpu` vCPUs) launched in `region` from an
/// image whose ultimate source is of `root_kind` cost for `hours` hours. `chain` is the image's
/// lineage, launched image first and root last; it is only carried into the quote to say why
/// an image fee applies.
#[allow(clippy::too_many_arguments)]
pub fn quote(
    book: &PriceBook,
    region: &str,
    instance_type: &str,
    vcpu: u32,
    count: u32,
    hours: u64,
    root_kind: RootKind,
    chain: &[LineageLink],
) -> Result<Quote, RateError> {
    let prices = region_prices(book, region)?;
    let instance_hours = u64::from(count)
        .checked_mul(hours)
        .ok_or(RateError::Overflow)?;
    let unit_price = instance_unit(prices, region, instance_type)?;
    let instance = QuotePart {
        unit_price,
        quantity: Quantity::Hours(instance_hours),
        amount: unit_price.checked_mul(instance_hours)?,
    };
    let image_fee = match image_fee_unit(prices, region, root_kind, instance_type, vcpu)? {
        None => None,
        Some(unit_price) => Some(ImageFeeQuote {
            cause: root_kind,
            root_image_id: chain.last().map(|link| link.image_id.clone()),
            chain: chain.to_vec(),
            part: QuotePart {
                unit_price,
                quantity: Quantity::Hours(instance_hours),
                amount: unit_price.checked_mul(instance_hours)?,
            },
        }),
    };
    let total = match &image_fee {
        Some(fee) => instance.amount.checked_add(fee.part.amount)?,
        None => instance.amount,
    };
    Ok(Quote {
        currency: book.currency().to_string(),
        region: region.to_string(),
        instance_type: instance_type.to_string(),
        instance,
        image_fee,
        total,
    })
}

/// What holding `bytes_held` bytes of snapshot data (an account's total in `region`) costs for
/// `hours` hours, after the region's free tier.
pub fn snapshot_quote(
    book: &PriceBook,
    region: &str,
    bytes_held: u64,
    hours: u64,
) -> Result<SnapshotQuote, RateError> {
    let prices = region_prices(book, region)?;
    let free_tier_bytes = prices.free_tier_bytes();
    let billable_bytes = bytes_held.saturating_sub(free_tier_bytes);
    let byte_hours = u128::from(billable_bytes)
        .checked_mul(u128::from(hours))
        .ok_or(RateError::Overflow)?;
    let unit_price = prices.snapshot_gb_hour();
    Ok(SnapshotQuote {
        currency: book.currency().to_string(),
        region: region.to_string(),
        bytes_held,
        free_tier_bytes,
        billable_bytes,
        unit_price,
        quantity: Quantity::ByteHours(byte_hours),
        amount: unit_price.mul_ratio(byte_hours, u128::from(BYTES_PER_GB))?,
    })
}
