//! A small price book with round prices, and a builder of usage logs, for the rule tables.

#![allow(dead_code)]

use std::collections::BTreeMap;

use imagefleet_billing::{
    Bill, EventId, ImageCharge, LineageLink, PriceBook, RootKind, Usage, UsageEvent,
};

/// 2025-12-01 00:00:00 UTC, on an hour boundary.
pub const DAY: i64 = 1_764_547_200;
pub const GIB: u64 = 1 << 30;

/// Unix seconds at `hh:mm` of the test day.
pub fn t(hh: i64, mm: i64) -> i64 {
    DAY + hh * 3600 + mm * 60
}

pub const BOOK: &str = r#"
currency = "USD"

[regions.ap-guangzhou]
mainland = true
snapshot_gb_hour = "0.001"
free_tier_gb = 80

[regions.ap-guangzhou.instance_hour]
"S5.MEDIUM4" = "0.10"
"S5.LARGE8" = "0.20"
"S5.4XLARGE32" = "0.80"

[[regions.ap-guangzhou.licence_hour]]
max_vcpu = 4
price = "0.06"

[[regions.ap-guangzhou.licence_hour]]
max_vcpu = 8
price = "0.13"

[[regions.ap-guangzhou.licence_hour]]
max_vcpu = 64
price = "0.50"

[regions.ap-shanghai]
mainland = true
snapshot_gb_hour = "0.001"
free_tier_gb = 80

[regions.ap-shanghai.instance_hour]
"S5.MEDIUM4" = "0.11"
"S5.LARGE8" = "0.22"

[[regions.ap-shanghai.licence_hour]]
max_vcpu = 4
price = "0.06"

[[regions.ap-shanghai.licence_hour]]
max_vcpu = 64
price = "0.50"

[regions.ap-singapore]
mainland = false
snapshot_gb_hour = "0.002"

[regions.ap-singapore.instance_hour]
"S5.MEDIUM4" = "0.12"
"S5.LARGE8" = "0.24"
"S5.4XLARGE32" = "0.96"

[regions.ap-singapore.windows_hour]
"S5.MEDIUM4" = "0.05"
"S5.LARGE8" = "0.09"
"S5.4XLARGE32" = "0.40"

[[regions.ap-singapore.licence_hour]]
max_vcpu = 4
price = "0.07"

[[regions.ap-singapore.licence_hour]]
max_vcpu = 8
price = "0.15"

[[regions.ap-singapore.licence_hour]]
max_vcpu = 64
price = "0.60"
"#;

pub fn book() -> PriceBook {
    PriceBook::from_toml(BOOK).expect("the test book is valid")
}

pub const GZ: &str = "ap-guangzhou";
pub const SH: &str = "ap-shanghai";
pub const SG: &str = "ap-singapore";
pub const ME: &str = "acct-a";
pub const OTHER: &str = "acct-b";

pub fn public(image_id: &str, kind: RootKind) -> ImageCharge {
    ImageCharge::root(image_id, kind)
}

/// A lineage from the launched image back to the root: `(image, region, owner)` links.
pub fn lineage(links: &[(&str, &str, &str)], kind: RootKind) -> ImageCharge {
    let chain = links
        .iter()
        .map(|(image, region, owner)| LineageLink::new(*image).at(*region, *owner))
        .collect();
    ImageCharge::from_chain(chain, kind).expect("a chain is not empty")
}

/// A usage log, numbering each region's events in order.
#[derive(Default, Clone)]
pub struct Log {
    pub events: Vec<UsageEvent>,
    seq: BTreeMap<String, u64>,
}

impl Log {
    pub fn new() -> Log {
        Log::default()
    }

    pub fn push(mut self, region: &str, at: i64, account: &str, usage: Usage) -> Log {
        let seq = self.seq.entry(region.to_string()).or_insert(0);
        *seq += 1;
        self.events.push(UsageEvent {
            id: EventId {
                region: region.to_string(),
                seq: *seq,
            },
            at,
            account: account.to_string(),
            usage,
        });
        self
    }

    pub fn start(
        self,
        region: &str,
        at: i64,
        instance: &str,
        instance_type: &str,
        vcpu: u32,
        image: ImageCharge,
    ) -> Log {
        self.start_as(ME, region, at, instance, instance_type, vcpu, image)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn start_as(
        self,
        account: &str,
        region: &str,
        at: i64,
        instance: &str,
        instance_type: &str,
        vcpu: u32,
        image: ImageCharge,
    ) -> Log {
        self.push(
            region,
            at,
            account,
            Usage::InstanceStarted {
                instance_id: instance.to_string(),
                instance_type: instance_type.to_string(),
                vcpu,
                image,
            },
        )
    }

    pub fn reset(self, region: &str, at: i64, instance: &str, image: ImageCharge) -> Log {
        self.push(
            region,
            at,
            ME,
            Usage::InstanceImageChanged {
                instance_id: instance.to_string(),
                image,
            },
        )
    }

    pub fn stop(self, region: &str, at: i64, instance: &str) -> Log {
        self.stop_as(ME, region, at, instance)
    }

    pub fn stop_as(self, account: &str, region: &str, at: i64, instance: &str) -> Log {
        self.push(
            region,
            at,
            account,
            Usage::InstanceTerminated {
                instance_id: instance.to_string(),
            },
        )
    }

    pub fn held(self, region: &str, at: i64, bytes: u64) -> Log {
        self.push(region, at, ME, Usage::SnapshotBytesHeld { bytes })
    }
}

/// A bill as comparable text: one `KIND region ids qty x unit = amount [cause root<-chain]`
/// line per item, then the totals.
pub fn render(bill: &Bill) -> Vec<String> {
    let mut out: Vec<String> = bill
        .lines
        .iter()
        .map(|line| {
            let mut text = format!(
                "{} {} {} {} x {} = {}",
                line.kind.as_str(),
                line.region,
                line.resource_ids.join(","),
                line.quantity,
                line.unit_price,
                line.amount
            );
            if let Some(fee) = &line.image_fee {
                let chain: Vec<&str> = fee.chain.iter().map(|l| l.image_id.as_str()).collect();
                text.push_str(&format!(
                    " {} root {} via {}",
                    fee.cause.as_str(),
                    fee.root_image_id,
                    chain.join("<-")
                ));
            }
            text
        })
        .collect();
    out.push(format!("total {}", bill.total));
    out
}
