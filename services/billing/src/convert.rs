//! Between the billing API's messages (`imagefleet_proto::billing::v1`) and the crate's types.
//!
//! Requests are untrusted: every conversion from a message checks every field and refuses a
//! missing or malformed one with `INVALID_ARGUMENT`, naming the field (`events[2].seq`) and
//! carrying an `ErrorInfo` reason (`MissingParameter`, `InvalidParameterValue`, ...). The
//! conversions to messages cannot fail, except where amounts are added up.
//!
//! Amounts are written with [`Money`]'s `Display` (`"0.3288"`), quantities with
//! [`Quantity`]'s (`"2"` hours, `"1.500000"` GB-hours).

use imagefleet_proto::billing::v1 as pb;
use imagefleet_proto::error::invalid_argument;
use imagefleet_proto::ids;
use tonic::Status;

use crate::book::{PriceBook, RegionPrices};
use crate::money::{Money, MoneyError};
use crate::quote::{Quote, QuotePart, SnapshotQuote};
use crate::rating::{Bill, LineItem};
use crate::usage::{EventId, ImageCharge, LineageLink, RootKind, Usage, UsageEvent};

/// Reason of a required field left empty.
pub const MISSING: &str = "MissingParameter";
/// Reason of a field whose value is not acceptable.
pub const INVALID: &str = "InvalidParameterValue";
/// Reason of an event reported by a region other than its own.
pub const WRONG_REGION: &str = "InvalidParameterValue.Region";
/// Reason of a number out of its range.
pub const OUT_OF_RANGE: &str = "InvalidParameterValue.OutOfRange";
/// Reason of an instance type the price book does not price (or that is not a type name).
pub const BAD_INSTANCE_TYPE: &str = "InvalidInstanceType.Malformed";

/// The most links a lineage chain may have.
pub const MAX_CHAIN: usize = 64;
/// The longest region name or instance type.
const MAX_NAME: usize = 64;

fn missing(field: &str) -> Status {
    invalid_argument(field, MISSING, "is required")
}

/// A region id: 1 to 64 lower-case letters, digits and dashes.
pub fn is_region_name(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// An instance type: 1 to 64 ASCII letters, digits, dots, dashes and underscores.
pub fn is_instance_type(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= MAX_NAME
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// A required region id.
pub fn region(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    if !is_region_name(value) {
        return Err(invalid_argument(
            field,
            INVALID,
            format!("{value:?} is not a region id (lower-case letters, digits and dashes)"),
        ));
    }
    Ok(value.to_string())
}

/// A required instance type.
pub fn instance_type(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    if !is_instance_type(value) {
        return Err(invalid_argument(
            field,
            BAD_INSTANCE_TYPE,
            format!("{value:?} is not an instance type"),
        ));
    }
    Ok(value.to_string())
}

fn image_id(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    ids::check_image_id(field, value)?;
    Ok(value.to_string())
}

fn instance_id(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    ids::check_instance_id(field, value)?;
    Ok(value.to_string())
}

fn account_id(field: &str, value: &str) -> Result<String, Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    ids::check_account_id(field, value)?;
    Ok(value.to_string())
}

/// `FREE`, `WINDOWS` or `LICENSED`.
pub fn root_kind(field: &str, value: &str) -> Result<RootKind, Status> {
    match value {
        "" => Err(missing(field)),
        "FREE" => Ok(RootKind::Free),
        "WINDOWS" => Ok(RootKind::Windows),
        "LICENSED" => Ok(RootKind::Licensed),
        other => Err(invalid_argument(
            field,
            INVALID,
            format!("{other:?} is not a root kind (FREE, WINDOWS or LICENSED)"),
        )),
    }
}

/// A link of a lineage chain: the image id is required, region and owner are optional (empty
/// when unknown) but must be well-formed when given.
pub fn lineage_link(field: &str, link: &pb::LineageLink) -> Result<LineageLink, Status> {
    let image_id = image_id(&format!("{field}.image_id"), &link.image_id)?;
    let region = match link.region.as_str() {
        "" => None,
        r => Some(region(&format!("{field}.region"), r)?),
    };
    let owner = match link.owner_account_id.as_str() {
        "" => None,
        o => Some(account_id(&format!("{field}.owner_account_id"), o)?),
    };
    Ok(LineageLink {
        image_id,
        region,
        owner,
    })
}

pub fn lineage_link_to_proto(link: &LineageLink) -> pb::LineageLink {
    pb::LineageLink {
        image_id: link.image_id.clone(),
        region: link.region.clone().unwrap_or_default(),
        owner_account_id: link.owner.clone().unwrap_or_default(),
    }
}

fn chain_to_proto(chain: &[LineageLink]) -> Vec<pb::LineageLink> {
    chain.iter().map(lineage_link_to_proto).collect()
}

/// A required image charge. A chain, when given, must lead from `image_id` (first) to
/// `root_image_id` (last) in at most [`MAX_CHAIN`] links.
pub fn image_charge(field: &str, charge: Option<&pb::ImageCharge>) -> Result<ImageCharge, Status> {
    let charge = charge.ok_or_else(|| missing(field))?;
    let image = image_id(&format!("{field}.image_id"), &charge.image_id)?;
    let root_image_id = image_id(&format!("{field}.root_image_id"), &charge.root_image_id)?;
    let kind = root_kind(&format!("{field}.root_kind"), &charge.root_kind)?;
    let chain_field = format!("{field}.chain");
    if charge.chain.len() > MAX_CHAIN {
        return Err(invalid_argument(
            &chain_field,
            OUT_OF_RANGE,
            format!(
                "has {} links; at most {MAX_CHAIN} are accepted",
                charge.chain.len()
            ),
        ));
    }
    let chain = charge
        .chain
        .iter()
        .enumerate()
        .map(|(i, link)| lineage_link(&format!("{chain_field}[{i}]"), link))
        .collect::<Result<Vec<_>, _>>()?;
    let converted = ImageCharge {
        image_id: image,
        chain,
        root_image_id,
        root_kind: kind,
    };
    if !converted.is_consistent() {
        return Err(invalid_argument(
            &chain_field,
            INVALID,
            "must lead from image_id (first link) to root_image_id (last link)",
        ));
    }
    Ok(converted)
}

pub fn image_charge_to_proto(charge: &ImageCharge) -> pb::ImageCharge {
    pb::ImageCharge {
        image_id: charge.image_id.clone(),
        chain: chain_to_proto(&charge.chain),
        root_image_id: charge.root_image_id.clone(),
        root_kind: charge.root_kind.as_str().to_string(),
    }
}

/// A reported usage event; `field` names it in errors (`events[3]`). `seq` must be from 1 to
/// `i64::MAX` and `at` after the epoch; the region must be well-formed (whose region it may
/// be is the service's check).
pub fn usage_event(field: &str, event: &pb::UsageEvent) -> Result<UsageEvent, Status> {
    let region = region(&format!("{field}.region"), &event.region)?;
    let seq_field = format!("{field}.seq");
    if event.seq == 0 {
        return Err(invalid_argument(
            &seq_field,
            MISSING,
            "is required (sequence numbers start at 1)",
        ));
    }
    if i64::try_from(event.seq).is_err() {
        return Err(invalid_argument(
            &seq_field,
            OUT_OF_RANGE,
            format!("{} is above {}", event.seq, i64::MAX),
        ));
    }
    if event.at <= 0 {
        return Err(invalid_argument(
            &format!("{field}.at"),
            if event.at == 0 { MISSING } else { INVALID },
            "must be a unix time in seconds after the epoch",
        ));
    }
    let account = account_id(&format!("{field}.account_id"), &event.account_id)?;
    let usage = match &event.usage {
        None => return Err(missing(&format!("{field}.usage"))),
        Some(pb::usage_event::Usage::InstanceStarted(started)) => {
            let f = format!("{field}.instance_started");
            let vcpu_field = format!("{f}.vcpu");
            if started.vcpu == 0 {
                return Err(invalid_argument(&vcpu_field, MISSING, "is required"));
            }
            Usage::InstanceStarted {
                instance_id: instance_id(&format!("{f}.instance_id"), &started.instance_id)?,
                instance_type: instance_type(
                    &format!("{f}.instance_type"),
                    &started.instance_type,
                )?,
                vcpu: started.vcpu,
                image: image_charge(&format!("{f}.image"), started.image.as_ref())?,
            }
        }
        Some(pb::usage_event::Usage::InstanceImageChanged(changed)) => {
            let f = format!("{field}.instance_image_changed");
            Usage::InstanceImageChanged {
                instance_id: instance_id(&format!("{f}.instance_id"), &changed.instance_id)?,
                image: image_charge(&format!("{f}.image"), changed.image.as_ref())?,
            }
        }
        Some(pb::usage_event::Usage::InstanceTerminated(terminated)) => Usage::InstanceTerminated {
            instance_id: instance_id(
                &format!("{field}.instance_terminated.instance_id"),
                &terminated.instance_id,
            )?,
        },
        Some(pb::usage_event::Usage::SnapshotBytesHeld(held)) => {
            Usage::SnapshotBytesHeld { bytes: held.bytes }
        }
    };
    Ok(UsageEvent {
        id: EventId {
            region,
            seq: event.seq,
        },
        at: event.at,
        account,
        usage,
    })
}

pub fn usage_event_to_proto(event: &UsageEvent) -> pb::UsageEvent {
    use pb::usage_event::Usage as P;
    let usage = match &event.usage {
        Usage::InstanceStarted {
            instance_id,
            instance_type,
            vcpu,
            image,
        } => P::InstanceStarted(pb::InstanceStarted {
            instance_id: instance_id.clone(),
            instance_type: instance_type.clone(),
            vcpu: *vcpu,
            image: Some(image_charge_to_proto(image)),
        }),
        Usage::InstanceImageChanged { instance_id, image } => {
            P::InstanceImageChanged(pb::InstanceImageChanged {
                instance_id: instance_id.clone(),
                image: Some(image_charge_to_proto(image)),
            })
        }
        Usage::InstanceTerminated { instance_id } => {
            P::InstanceTerminated(pb::InstanceTerminated {
                instance_id: instance_id.clone(),
            })
        }
        Usage::SnapshotBytesHeld { bytes } => {
            P::SnapshotBytesHeld(pb::SnapshotBytesHeld { bytes: *bytes })
        }
    };
    pb::UsageEvent {
        region: event.id.region.clone(),
        seq: event.id.seq,
        at: event.at,
        account_id: event.account.clone(),
        usage: Some(usage),
    }
}

fn line_to_proto(line: &LineItem) -> pb::LineItem {
    pb::LineItem {
        kind: line.kind.as_str().to_string(),
        region: line.region.clone(),
        resource_ids: line.resource_ids.clone(),
        instance_type: line.instance_type.clone().unwrap_or_default(),
        vcpu: line.vcpu.unwrap_or(0),
        unit: line.quantity.unit().to_string(),
        quantity: line.quantity.to_string(),
        unit_price: line.unit_price.to_string(),
        amount: line.amount.to_string(),
        image_fee: line.image_fee.as_ref().map(|fee| pb::ImageFee {
            cause: fee.cause.as_str().to_string(),
            image_id: fee.image_id.clone(),
            root_image_id: fee.root_image_id.clone(),
            chain: chain_to_proto(&fee.chain),
        }),
    }
}

/// A bill as `DescribeBillResponse`; `from` and `to` are written as RFC 3339 UTC, and each
/// anomaly as `region/seq: reason`. `extra_anomalies` (events the book cannot price, say) come
/// first.
pub fn bill_to_proto(bill: &Bill, extra_anomalies: Vec<String>) -> pb::DescribeBillResponse {
    let mut anomalies = extra_anomalies;
    anomalies.extend(
        bill.anomalies
            .iter()
            .map(|a| format!("{}/{}: {}", a.event.region, a.event.seq, a.reason)),
    );
    pb::DescribeBillResponse {
        account_id: bill.account.clone(),
        from: imagefleet_rpc::time::rfc3339(bill.from),
        to: imagefleet_rpc::time::rfc3339(bill.to),
        currency: bill.currency.clone(),
        line_items: bill.lines.iter().map(line_to_proto).collect(),
        totals: bill
            .totals
            .iter()
            .map(|(kind, amount)| pb::KindTotal {
                kind: kind.as_str().to_string(),
                amount: amount.to_string(),
            })
            .collect(),
        total: bill.total.to_string(),
        anomalies,
    }
}

fn part_to_proto(part: &QuotePart) -> pb::PricePart {
    pb::PricePart {
        unit_price: part.unit_price.to_string(),
        unit: part.quantity.unit().to_string(),
        quantity: part.quantity.to_string(),
        amount: part.amount.to_string(),
    }
}

/// A quote (and the owner's snapshot storage for the same hours, when asked) as `RunPrice`.
/// `root_image_id` names the paid root when the quote's chain is empty. The total is the sum of
/// every part given: instances, image fee and snapshot storage.
pub fn run_price(
    quote: &Quote,
    instance_count: u32,
    hours: u64,
    root_image_id: &str,
    snapshot: Option<&SnapshotQuote>,
) -> Result<pb::RunPrice, MoneyError> {
    let mut total = quote.total;
    if let Some(s) = snapshot {
        total = total.checked_add(s.amount)?;
    }
    Ok(pb::RunPrice {
        currency: quote.currency.clone(),
        region: quote.region.clone(),
        instance_type: quote.instance_type.clone(),
        instance_count,
        hours,
        instance: Some(part_to_proto(&quote.instance)),
        image_fee: quote.image_fee.as_ref().map(|fee| pb::ImageFeePrice {
            cause: fee.cause.as_str().to_string(),
            root_image_id: fee
                .root_image_id
                .clone()
                .unwrap_or_else(|| root_image_id.to_string()),
            chain: chain_to_proto(&fee.chain),
            price: Some(part_to_proto(&fee.part)),
        }),
        snapshot: snapshot.map(|s| pb::SnapshotPrice {
            bytes_held: s.bytes_held,
            free_tier_bytes: s.free_tier_bytes,
            billable_bytes: s.billable_bytes,
            price: Some(pb::PricePart {
                unit_price: s.unit_price.to_string(),
                unit: s.quantity.unit().to_string(),
                quantity: s.quantity.to_string(),
                amount: s.amount.to_string(),
            }),
        }),
        total: total.to_string(),
    })
}

fn prices_to_proto(prices: &std::collections::BTreeMap<String, Money>) -> Vec<pb::InstancePrice> {
    prices
        .iter()
        .map(|(instance_type, hourly)| pb::InstancePrice {
            instance_type: instance_type.clone(),
            hourly: hourly.to_string(),
        })
        .collect()
}

pub fn region_prices_to_proto(name: &str, prices: &RegionPrices) -> pb::RegionPrices {
    pb::RegionPrices {
        region: name.to_string(),
        mainland: prices.is_mainland(),
        instance_hour: prices_to_proto(prices.instance_prices()),
        windows_hour: prices_to_proto(prices.windows_prices()),
        licence_hour: prices
            .licence_classes()
            .iter()
            .map(|class| pb::LicenceClass {
                min_vcpu: class.min_vcpu,
                max_vcpu: class.max_vcpu,
                hourly: class.price.to_string(),
            })
            .collect(),
        snapshot_gb_hour: prices.snapshot_gb_hour().to_string(),
        free_tier_gb: prices.free_tier_gb(),
    }
}

/// The book, or one region of it (`region` not empty), as `DescribePriceBookResponse`. A
/// region the book lacks is `INVALID_ARGUMENT` on `field`.
pub fn price_book_to_proto(
    book: &PriceBook,
    field: &str,
    region: &str,
) -> Result<pb::DescribePriceBookResponse, Status> {
    let region_set = if region.is_empty() {
        book.regions()
            .map(|(name, prices)| region_prices_to_proto(name, prices))
            .collect()
    } else {
        let prices = book
            .region(region)
            .ok_or_else(|| unpriced_region(field, region))?;
        vec![region_prices_to_proto(region, prices)]
    };
    Ok(pb::DescribePriceBookResponse {
        currency: book.currency().to_string(),
        region_set,
    })
}

/// `INVALID_ARGUMENT` for a region the price book does not price.
pub fn unpriced_region(field: &str, region: &str) -> Status {
    let shown: String = region.chars().take(MAX_NAME).collect();
    invalid_argument(
        field,
        INVALID,
        format!("the price book has no region {shown:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagefleet_proto::error;

    fn charge() -> pb::ImageCharge {
        pb::ImageCharge {
            image_id: "img-custom01".into(),
            chain: vec![
                pb::LineageLink {
                    image_id: "img-custom01".into(),
                    region: "ap-singapore".into(),
                    owner_account_id: "100000000001".into(),
                },
                pb::LineageLink {
                    image_id: "img-windows1".into(),
                    ..Default::default()
                },
            ],
            root_image_id: "img-windows1".into(),
            root_kind: "WINDOWS".into(),
        }
    }

    fn started() -> pb::UsageEvent {
        pb::UsageEvent {
            region: "ap-singapore".into(),
            seq: 7,
            at: 1_764_583_200,
            account_id: "100000000001".into(),
            usage: Some(pb::usage_event::Usage::InstanceStarted(
                pb::InstanceStarted {
                    instance_id: "ins-abcdefgh".into(),
                    instance_type: "S5.LARGE8".into(),
                    vcpu: 8,
                    image: Some(charge()),
                },
            )),
        }
    }

    #[test]
    fn events_round_trip() {
        let others = [
            pb::usage_event::Usage::InstanceImageChanged(pb::InstanceImageChanged {
                instance_id: "ins-abcdefgh".into(),
                image: Some(charge()),
            }),
            pb::usage_event::Usage::InstanceTerminated(pb::InstanceTerminated {
                instance_id: "ins-abcdefgh".into(),
            }),
            pb::usage_event::Usage::SnapshotBytesHeld(pb::SnapshotBytesHeld { bytes: 12345 }),
        ];
        let mut messages = vec![started()];
        for usage in others {
            messages.push(pb::UsageEvent {
                usage: Some(usage),
                ..started()
            });
        }
        for message in messages {
            let event = usage_event("e", &message).expect("valid");
            assert_eq!(usage_event_to_proto(&event), message);
        }
        let event = usage_event("e", &started()).unwrap();
        let Usage::InstanceStarted { image, .. } = &event.usage else {
            panic!("a start");
        };
        assert_eq!(image.root_kind, RootKind::Windows);
        assert_eq!(image.chain[0].owner.as_deref(), Some("100000000001"));
        assert_eq!(image.chain[1].region, None);
    }

    #[test]
    fn hostile_events_are_refused_naming_the_field() {
        type Edit = fn(&mut pb::UsageEvent);
        fn image(e: &mut pb::UsageEvent) -> &mut pb::ImageCharge {
            match e.usage.as_mut() {
                Some(pb::usage_event::Usage::InstanceStarted(s)) => s.image.as_mut().unwrap(),
                _ => unreachable!(),
            }
        }
        fn start(e: &mut pb::UsageEvent) -> &mut pb::InstanceStarted {
            match e.usage.as_mut() {
                Some(pb::usage_event::Usage::InstanceStarted(s)) => s,
                _ => unreachable!(),
            }
        }
        let cases: &[(Edit, &str, &str)] = &[
            (|e| e.region.clear(), "e.region", MISSING),
            (|e| e.region = "AP_X".into(), "e.region", INVALID),
            (|e| e.seq = 0, "e.seq", MISSING),
            (|e| e.seq = u64::MAX, "e.seq", OUT_OF_RANGE),
            (|e| e.at = 0, "e.at", MISSING),
            (|e| e.at = -5, "e.at", INVALID),
            (|e| e.account_id.clear(), "e.account_id", MISSING),
            (
                |e| e.account_id = "42".into(),
                "e.account_id",
                "InvalidAccountId.Malformed",
            ),
            (|e| e.usage = None, "e.usage", MISSING),
            (
                |e| start(e).instance_id = "i-1".into(),
                "e.instance_started.instance_id",
                "InvalidInstanceId.Malformed",
            ),
            (
                |e| start(e).instance_type = "S5 LARGE".into(),
                "e.instance_started.instance_type",
                BAD_INSTANCE_TYPE,
            ),
            (|e| start(e).vcpu = 0, "e.instance_started.vcpu", MISSING),
            (
                |e| start(e).image = None,
                "e.instance_started.image",
                MISSING,
            ),
            (
                |e| image(e).root_kind = "PAID".into(),
                "e.instance_started.image.root_kind",
                INVALID,
            ),
            (
                |e| image(e).root_kind.clear(),
                "e.instance_started.image.root_kind",
                MISSING,
            ),
            (
                |e| image(e).root_image_id = "img-other001".into(),
                "e.instance_started.image.chain",
                INVALID,
            ),
            (
                |e| image(e).chain[1].image_id = "windows".into(),
                "e.instance_started.image.chain[1].image_id",
                "InvalidImageId.Malformed",
            ),
            (
                |e| image(e).chain[0].owner_account_id = "x".into(),
                "e.instance_started.image.chain[0].owner_account_id",
                "InvalidAccountId.Malformed",
            ),
            (
                |e| {
                    let link = image(e).chain[0].clone();
                    image(e).chain = vec![link; MAX_CHAIN + 1];
                },
                "e.instance_started.image.chain",
                OUT_OF_RANGE,
            ),
        ];
        for (edit, field, reason) in cases {
            let mut message = started();
            edit(&mut message);
            let status = usage_event("e", &message).expect_err(field);
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{field}");
            assert_eq!(error::field(&status).as_deref(), Some(*field));
            assert_eq!(error::reason(&status).as_deref(), Some(*reason), "{field}");
        }
    }

    #[test]
    fn an_empty_chain_is_accepted() {
        let mut message = started();
        if let Some(pb::usage_event::Usage::InstanceStarted(s)) = message.usage.as_mut() {
            s.image.as_mut().unwrap().chain.clear();
        }
        let event = usage_event("e", &message).unwrap();
        assert_eq!(usage_event_to_proto(&event), message);
    }
}
