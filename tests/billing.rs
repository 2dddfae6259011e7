//! Billing against real services: regions meter usage into a durable outbox, deliver it to the
//! billing service in the catalog process, and bills follow the rules of docs/billing.md. Time
//! is the cluster's clock file (`Cluster::set_time`), so hours pass in an instant.
//!
//! Expected amounts are computed here from the shipped price book's prices and the rules
//! (hours touched times unit price), not by the rating code under test.

mod common;

use common::*;
use imagefleet_billing::{Money, PriceBook, BYTES_PER_GB};
use imagefleet_proto::billing::v1::{
    DescribeBillRequest, DescribeBillResponse, DescribePriceBookRequest, LineItem,
};
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::cluster::AccountEntry;
use std::time::Duration;
use tonic::Code;

/// 2025-12-01 00:00:00 UTC: each scenario gets its own day after it.
const DAY0: i64 = 1_764_547_200;
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

fn book() -> PriceBook {
    PriceBook::load(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/price-book.toml"
    ))
    .expect("the shipped price book loads")
}

fn rfc3339(unix: i64) -> String {
    imagefleet_rpc::time::rfc3339(unix)
}

/// What a line of a bill is expected to say.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Line {
    kind: String,
    region: String,
    quantity: String,
    unit_price: String,
    amount: String,
    /// For image fees: the cause, the paid root and the chain.
    fee: Option<(String, String, Vec<String>)>,
}

fn line_of(item: &LineItem) -> Line {
    Line {
        kind: item.kind.clone(),
        region: item.region.clone(),
        quantity: item.quantity.clone(),
        unit_price: item.unit_price.clone(),
        amount: item.amount.clone(),
        fee: item.image_fee.as_ref().map(|f| {
            (
                f.cause.clone(),
                f.root_image_id.clone(),
                f.chain.iter().map(|l| l.image_id.clone()).collect(),
            )
        }),
    }
}

fn instance_line(region: &str, hours: u64, unit: Money) -> Line {
    Line {
        kind: "INSTANCE".into(),
        region: region.into(),
        quantity: hours.to_string(),
        unit_price: unit.to_string(),
        amount: unit.checked_mul(hours).unwrap().to_string(),
        fee: None,
    }
}

fn fee_line(region: &str, hours: u64, unit: Money, cause: &str, chain: &[&str]) -> Line {
    Line {
        kind: "IMAGE_FEE".into(),
        region: region.into(),
        quantity: hours.to_string(),
        unit_price: unit.to_string(),
        amount: unit.checked_mul(hours).unwrap().to_string(),
        fee: Some((
            cause.into(),
            chain.last().unwrap().to_string(),
            chain.iter().map(|s| s.to_string()).collect(),
        )),
    }
}

async fn bill_of(
    cluster: &Cluster,
    who: &AccountEntry,
    from: i64,
    to: i64,
) -> Result<DescribeBillResponse, tonic::Status> {
    let mut client = billing_as(cluster, who);
    client
        .describe_bill(DescribeBillRequest {
            from: rfc3339(from),
            to: rfc3339(to),
        })
        .await
        .map(|r| r.into_inner())
}

fn billing_as(
    cluster: &Cluster,
    who: &AccountEntry,
) -> imagefleet_proto::billing::v1::billing_service_client::BillingServiceClient<
    imagefleet_rpc::client::SignedChannel,
> {
    imagefleet_proto::billing::v1::billing_service_client::BillingServiceClient::new(
        imagefleet_rpc::client::signed_channel(
            &cluster.catalog.url(),
            imagefleet_rpc::Credentials {
                secret_id: who.secret_id.clone(),
                secret_key: who.secret_key.clone(),
            },
            imagefleet_rpc::client::CATALOG_SCOPE,
        )
        .unwrap(),
    )
}

/// The bill's lines once delivery has caught up: polls until they equal `expected` (delivery
/// is asynchronous), then asserts equality, so a mismatch shows both.
async fn assert_bill(
    cluster: &Cluster,
    who: &AccountEntry,
    (from, to): (i64, i64),
    expected: &[Line],
) -> DescribeBillResponse {
    let mut expected = expected.to_vec();
    expected.sort();
    let mut last = None;
    for _ in 0..300 {
        let bill = bill_of(cluster, who, from, to).await.expect("DescribeBill");
        let mut lines: Vec<Line> = bill.line_items.iter().map(line_of).collect();
        lines.sort();
        if lines == expected {
            return bill;
        }
        last = Some(lines);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last.unwrap(), expected, "the bill of {}", who.account_id);
    unreachable!()
}

async fn launch(region: &mut Region, image_id: &str, instance_type: &str) -> String {
    region
        .run_instances(RunInstancesRequest {
            image_id: image_id.into(),
            instance_type: instance_type.into(),
            instance_count: 1,
            ..Default::default()
        })
        .await
        .expect("RunInstances")
        .into_inner()
        .instance_id_set
        .remove(0)
}

async fn terminate(region: &mut Region, instance_id: &str) {
    region
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: vec![instance_id.into()],
        })
        .await
        .expect("TerminateInstances");
}

async fn create_image(region: &mut Region, instance_id: &str, name: &str) -> String {
    let id = region
        .create_image(CreateImageRequest {
            instance_id: instance_id.into(),
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .expect("CreateImage")
        .into_inner()
        .image_id;
    wait_image_state(region, &id, ImageState::Normal).await;
    id
}

/// One rule, one row: an instance of `instance_type` from the public `platform` image in
/// `region`, run from `start` to `end` minutes after the day's 10:00.
struct Row {
    rule: &'static str,
    region: &'static str,
    platform: &'static str,
    instance_type: &'static str,
    minutes: (i64, i64),
    /// The instance-hours expected.
    hours: u64,
    /// The image fee expected: WINDOWS or LICENSED.
    fee: Option<&'static str>,
}

const ROWS: &[Row] = &[
    Row {
        rule: "public images are free",
        region: "ap-singapore",
        platform: "Debian",
        instance_type: "S5.MEDIUM4",
        minutes: (40, 130),
        hours: 3,
        fee: None,
    },
    Row {
        rule: "a run from 10:40 to 12:10 bills hours 10, 11 and 12",
        region: "ap-guangzhou",
        platform: "Ubuntu",
        instance_type: "S5.LARGE8",
        minutes: (40, 130),
        hours: 3,
        fee: None,
    },
    Row {
        rule: "an instance used for 61 minutes bills 2 hours",
        region: "ap-guangzhou",
        platform: "Debian",
        instance_type: "S5.MEDIUM4",
        minutes: (0, 61),
        hours: 2,
        fee: None,
    },
    Row {
        rule: "Windows overseas bills its fee by instance type (S5.MEDIUM4)",
        region: "ap-singapore",
        platform: "Windows",
        instance_type: "S5.MEDIUM4",
        minutes: (0, 61),
        hours: 2,
        fee: Some("WINDOWS"),
    },
    Row {
        rule: "Windows overseas bills its fee by instance type (S5.LARGE8)",
        region: "ap-singapore",
        platform: "Windows",
        instance_type: "S5.LARGE8",
        minutes: (0, 61),
        hours: 2,
        fee: Some("WINDOWS"),
    },
    Row {
        rule: "Windows on the mainland is free",
        region: "ap-guangzhou",
        platform: "Windows",
        instance_type: "S5.LARGE8",
        minutes: (0, 61),
        hours: 2,
        fee: None,
    },
    Row {
        rule: "a commercial licence bills by vCPU class (2 vCPU)",
        region: "ap-guangzhou",
        platform: "RedHat",
        instance_type: "S5.MEDIUM4",
        minutes: (10, 20),
        hours: 1,
        fee: Some("LICENSED"),
    },
    Row {
        rule: "a commercial licence bills by vCPU class (4 vCPU), overseas too",
        region: "ap-singapore",
        platform: "RedHat",
        instance_type: "S5.LARGE8",
        minutes: (10, 20),
        hours: 1,
        fee: Some("LICENSED"),
    },
];

/// Byte-hours as GB-hours with six decimals, rounded half up (docs/billing.md).
fn gb_hours(byte_hours: u128) -> String {
    let gb = u128::from(BYTES_PER_GB);
    let micro = (byte_hours * 2_000_000 + gb) / (2 * gb);
    format!("{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

fn vcpu(instance_type: &str) -> u32 {
    match instance_type {
        "S5.MEDIUM4" => 2,
        "S5.LARGE8" => 4,
        other => panic!("no vCPU count for {other} in this test"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_pricing_rule_on_real_services() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-singapore"]).await;
    let book = book();
    for (n, row) in ROWS.iter().enumerate() {
        let day = DAY0 + n as i64 * DAY;
        let ten = day + 10 * HOUR;
        let who = cluster.create_account(&format!("row-{n}")).await;
        let mut region = cluster.region_as(row.region, &who);
        let image = public_image(&mut region, row.platform).await;

        cluster.set_time(ten + row.minutes.0 * 60);
        let instance = launch(&mut region, &image.image_id, row.instance_type).await;
        cluster.set_time(ten + row.minutes.1 * 60);
        terminate(&mut region, &instance).await;

        let prices = book.region(row.region).unwrap();
        let mut expected = vec![instance_line(
            row.region,
            row.hours,
            prices.instance_hour(row.instance_type).unwrap(),
        )];
        match row.fee {
            Some("WINDOWS") => expected.push(fee_line(
                row.region,
                row.hours,
                prices.windows_hour(row.instance_type).unwrap(),
                "WINDOWS",
                &[&image.image_id],
            )),
            Some(_) => expected.push(fee_line(
                row.region,
                row.hours,
                prices.licence_hour(vcpu(row.instance_type)).unwrap(),
                "LICENSED",
                &[&image.image_id],
            )),
            None => {}
        }
        eprintln!("rule: {}", row.rule);
        let bill = assert_bill(&cluster, &who, (day, day + DAY - 1), &expected).await;
        // The instance line names the instance; the total is the sum of the lines.
        let instance_line = bill
            .line_items
            .iter()
            .find(|l| l.kind == "INSTANCE")
            .unwrap();
        assert!(
            instance_line.resource_ids.contains(&instance),
            "{}",
            row.rule
        );
        assert_eq!(bill.currency, book.currency());
        let sum = Money::sum(expected.iter().map(|l| Money::parse(&l.amount).unwrap())).unwrap();
        assert_eq!(bill.total, sum.to_string(), "{}", row.rule);
    }
    // An account sees only its own bill: the first account used nothing.
    let alice = cluster.accounts[0].clone();
    let own = bill_of(&cluster, &alice, DAY0, DAY0 + 30 * DAY)
        .await
        .unwrap();
    assert!(own.line_items.is_empty(), "{:?}", own.line_items);
    assert_eq!(own.total, Money::ZERO.to_string());
}

/// A paid root bills every account that launches from any image derived from it, through
/// CreateImage, copies to other regions, shares and images made from instances of shared
/// images; a free lineage never bills an image fee.
#[tokio::test(flavor = "multi_thread")]
async fn image_fees_follow_every_derivation() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let book = book();
    let gz_prices = book.region("ap-guangzhou").unwrap();
    let sh_prices = book.region("ap-shanghai").unwrap();
    let owner = cluster.create_account("owner").await;
    let receiver = cluster.create_account("receiver").await;
    let mut gz = cluster.region_as("ap-guangzhou", &owner);
    let mut sh = cluster.region_as("ap-shanghai", &owner);
    let mut gz_receiver = cluster.region_as("ap-guangzhou", &receiver);
    let rhel = public_image(&mut gz, "RedHat").await.image_id;
    let debian = public_image(&mut gz, "Debian").await.image_id;

    // Day 1 builds the images (their own launches are billed that day, not checked here).
    cluster.set_time(DAY0 + 10 * HOUR);
    let base = launch(&mut gz, &rhel, "S5.MEDIUM4").await;
    let app = create_image(&mut gz, &base, "app").await;
    terminate(&mut gz, &base).await;
    let free_base = launch(&mut gz, &debian, "S5.MEDIUM4").await;
    let free_app = create_image(&mut gz, &free_base, "free-app").await;
    terminate(&mut gz, &free_base).await;
    // Copies to Shanghai (copies stay on one side of the mainland line).
    let copies = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![app.clone(), free_app.clone()],
            destination_regions: vec!["ap-shanghai".into()],
            ..Default::default()
        })
        .await
        .expect("SyncImages")
        .into_inner()
        .image_set;
    let copy_of = |source: &str| {
        copies
            .iter()
            .find(|c| c.source_image_id == source)
            .unwrap()
            .image_id
            .clone()
    };
    let (app_sh, free_app_sh) = (copy_of(&app), copy_of(&free_app));
    wait_copy_normal(&mut sh, &app_sh).await;
    wait_copy_normal(&mut sh, &free_app_sh).await;
    // Shared with the receiver, who makes an image of their own from an instance of it.
    for image in [&app, &free_app] {
        gz.modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: image.to_string(),
            account_ids: vec![receiver.account_id.clone()],
            permission: SharePermission::Share as i32,
        })
        .await
        .expect("share");
    }
    let from_shared = launch(&mut gz_receiver, &app, "S5.MEDIUM4").await;
    let receivers_app = create_image(&mut gz_receiver, &from_shared, "receivers-app").await;
    terminate(&mut gz_receiver, &from_shared).await;
    let free_shared = launch(&mut gz_receiver, &free_app, "S5.MEDIUM4").await;
    let receivers_free = create_image(&mut gz_receiver, &free_shared, "receivers-free").await;
    terminate(&mut gz_receiver, &free_shared).await;

    // Day 2: one hour on each image, by each account.
    let day = DAY0 + DAY;
    cluster.set_time(day + 10 * HOUR + 5 * 60);
    let mut runs = Vec::new();
    for image in [&app, &free_app] {
        runs.push(("ap-guangzhou", launch(&mut gz, image, "S5.MEDIUM4").await));
    }
    for image in [&app_sh, &free_app_sh] {
        runs.push(("ap-shanghai", launch(&mut sh, image, "S5.MEDIUM4").await));
    }
    let shared_run = launch(&mut gz_receiver, &app, "S5.MEDIUM4").await;
    let derived_run = launch(&mut gz_receiver, &receivers_app, "S5.MEDIUM4").await;
    let free_shared_run = launch(&mut gz_receiver, &free_app, "S5.MEDIUM4").await;
    let free_derived_run = launch(&mut gz_receiver, &receivers_free, "S5.MEDIUM4").await;
    cluster.set_time(day + 10 * HOUR + 50 * 60);
    for (region, instance) in &runs {
        let client = if *region == "ap-guangzhou" {
            &mut gz
        } else {
            &mut sh
        };
        terminate(client, instance).await;
    }
    for instance in [
        &shared_run,
        &derived_run,
        &free_shared_run,
        &free_derived_run,
    ] {
        terminate(&mut gz_receiver, instance).await;
    }

    let period = (day, day + DAY - 1);
    let gz_hour = gz_prices.instance_hour("S5.MEDIUM4").unwrap();
    let sh_hour = sh_prices.instance_hour("S5.MEDIUM4").unwrap();
    let gz_licence = gz_prices.licence_hour(2).unwrap();
    let sh_licence = sh_prices.licence_hour(2).unwrap();
    // The owner: four instance-hours; licence fees only on the paid lineage (the image made
    // from a RHEL instance, and its copy), each naming the chain back to the RHEL root.
    assert_bill(
        &cluster,
        &owner,
        period,
        &[
            instance_line("ap-guangzhou", 1, gz_hour),
            instance_line("ap-guangzhou", 1, gz_hour),
            instance_line("ap-shanghai", 1, sh_hour),
            instance_line("ap-shanghai", 1, sh_hour),
            fee_line("ap-guangzhou", 1, gz_licence, "LICENSED", &[&app, &rhel]),
            fee_line(
                "ap-shanghai",
                1,
                sh_licence,
                "LICENSED",
                &[&app_sh, &app, &rhel],
            ),
        ],
    )
    .await;
    // The receiver pays the fee for launching the shared image and the image made from an
    // instance of it; nothing for the free lineage.
    assert_bill(
        &cluster,
        &receiver,
        period,
        &[
            instance_line("ap-guangzhou", 1, gz_hour),
            instance_line("ap-guangzhou", 1, gz_hour),
            instance_line("ap-guangzhou", 1, gz_hour),
            instance_line("ap-guangzhou", 1, gz_hour),
            fee_line("ap-guangzhou", 1, gz_licence, "LICENSED", &[&app, &rhel]),
            fee_line(
                "ap-guangzhou",
                1,
                gz_licence,
                "LICENSED",
                &[&receivers_app, &app, &rhel],
            ),
        ],
    )
    .await;
}

/// Snapshot data is billed per GB-hour overseas; on the mainland each account holds 80 GB
/// free.
#[tokio::test(flavor = "multi_thread")]
async fn snapshot_storage_with_and_without_the_free_tier() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-singapore"]).await;
    let book = book();
    let who = cluster.create_account("keeper").await;
    let day = DAY0 + 3 * DAY;
    let mut held = Vec::new();
    for region_name in ["ap-guangzhou", "ap-singapore"] {
        let mut region = cluster.region_as(region_name, &who);
        let debian = public_image(&mut region, "Debian").await.image_id;
        cluster.set_time(day + 9 * HOUR);
        let instance = launch(&mut region, &debian, "S5.MEDIUM4").await;
        write(&mut region, &instance, 0, &random_bytes(6 << 20)).await;
        // Held from 10:30 to 12:30: hours 10, 11 and 12.
        cluster.set_time(day + 10 * HOUR + 30 * 60);
        let image = create_image(&mut region, &instance, "kept").await;
        cluster.set_time(day + 10 * HOUR + 40 * 60);
        terminate(&mut region, &instance).await;
        let stored: u64 = common::image(&mut region, &image)
            .await
            .snapshot_set
            .iter()
            .map(|s| s.stored_bytes)
            .sum();
        assert!(stored >= 6 << 20, "{stored}");
        cluster.set_time(day + 12 * HOUR + 30 * 60);
        region
            .delete_images(DeleteImagesRequest {
                image_ids: vec![image.clone()],
            })
            .await
            .expect("DeleteImages");
        held.push((region_name, stored));
    }
    let gz = book.region("ap-guangzhou").unwrap();
    let sg = book.region("ap-singapore").unwrap();
    assert!(gz.free_tier_bytes() >= 80 * BYTES_PER_GB);
    assert_eq!(sg.free_tier_bytes(), 0);
    let (_, sg_bytes) = held[1];
    let byte_hours = u128::from(sg_bytes) * 3;
    let sg_snapshot = Line {
        kind: "SNAPSHOT_STORAGE".into(),
        region: "ap-singapore".into(),
        quantity: gb_hours(byte_hours),
        unit_price: sg.snapshot_gb_hour().to_string(),
        amount: sg
            .snapshot_gb_hour()
            .mul_ratio(byte_hours, u128::from(BYTES_PER_GB))
            .unwrap()
            .to_string(),
        fee: None,
    };
    let instance = |region: &str, hours| {
        instance_line(
            region,
            hours,
            book.region(region)
                .unwrap()
                .instance_hour("S5.MEDIUM4")
                .unwrap(),
        )
    };
    // Instances ran 09:00-10:40 (two hours each); the mainland snapshot is inside the free
    // tier and bills nothing.
    assert_bill(
        &cluster,
        &who,
        (day, day + DAY - 1),
        &[
            instance("ap-guangzhou", 2),
            instance("ap-singapore", 2),
            sg_snapshot,
        ],
    )
    .await;
}

/// Usage is metered exactly once although the billing side is down for a while and a region is
/// killed with SIGKILL in the middle: the outbox keeps events until billing acknowledges them,
/// and billing stores each (region, seq) once.
#[tokio::test(flavor = "multi_thread")]
async fn metering_survives_billing_down_and_kill9_exactly_once() {
    let mut cluster = Cluster::start(&["ap-guangzhou", "ap-singapore"]).await;
    let book = book();
    let who = cluster.create_account("steady").await;
    let mut sg = cluster.region_as("ap-singapore", &who);
    let windows = public_image(&mut sg, "Windows").await.image_id;
    let day = DAY0 + 4 * DAY;

    // 10:00: two instances; billing goes down (the catalog process serves it).
    cluster.set_time(day + 10 * HOUR);
    let first = launch(&mut sg, &windows, "S5.LARGE8").await;
    let second = launch(&mut sg, &windows, "S5.LARGE8").await;
    cluster.catalog.kill9();
    // 11:30: the first ends while billing is down (account keys are cached by the region).
    cluster.set_time(day + 11 * HOUR + 30 * 60);
    terminate(&mut sg, &first).await;
    // The region dies with undelivered events and comes back while billing is still down.
    cluster.kill9_region("ap-singapore");
    cluster.respawn_region("ap-singapore");
    // Billing comes back; the region delivers what it kept.
    cluster.catalog.restart();
    wait_serving(&cluster.catalog.url()).await;
    wait_serving(&cluster.region_url("ap-singapore")).await;
    let mut sg = cluster.region_as("ap-singapore", &who);
    // 13:10: the second ends.
    cluster.set_time(day + 13 * HOUR + 10 * 60);
    terminate(&mut sg, &second).await;

    let prices = book.region("ap-singapore").unwrap();
    let hour = prices.instance_hour("S5.LARGE8").unwrap();
    let fee = prices.windows_hour("S5.LARGE8").unwrap();
    // First: hours 10-11 (2); second: hours 10-13 (4). A lost event would bill the first until
    // the period's end (or not at all); a duplicate start would not change the hours, so the
    // stored events are counted too.
    assert_bill(
        &cluster,
        &who,
        (day, day + DAY - 1),
        &[
            instance_line("ap-singapore", 2, hour),
            instance_line("ap-singapore", 4, hour),
            fee_line("ap-singapore", 2, fee, "WINDOWS", &[&windows]),
            fee_line("ap-singapore", 4, fee, "WINDOWS", &[&windows]),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn price_book_inquiry_and_bad_input() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-singapore"]).await;
    let book = book();
    let alice = cluster.accounts[0].clone();
    let mut billing = billing_as(&cluster, &alice);

    // The book in force, per region.
    let all = billing
        .describe_price_book(DescribePriceBookRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.currency, book.currency());
    for region in ["ap-guangzhou", "ap-shanghai", "ap-singapore"] {
        let prices = all
            .region_set
            .iter()
            .find(|r| r.region == region)
            .unwrap_or_else(|| panic!("{region} priced"));
        for t in ["S5.MEDIUM4", "S5.LARGE8"] {
            let p = prices.instance_hour.iter().find(|p| p.instance_type == t);
            assert_eq!(
                p.map(|p| p.hourly.clone()),
                book.region(region)
                    .unwrap()
                    .instance_hour(t)
                    .map(|m| m.to_string()),
                "{region} {t}"
            );
            if !prices.mainland {
                assert!(prices.windows_hour.iter().any(|p| p.instance_type == t));
            }
        }
    }
    assert_refused(
        billing
            .describe_price_book(DescribePriceBookRequest {
                region: "ap-atlantis".into(),
            })
            .await,
        Code::InvalidArgument,
        "InvalidParameterValue",
    );
    for (from, to) in [
        ("yesterday", ""),
        ("2025-12-02T00:00:00Z", "2025-12-01T00:00:00Z"),
    ] {
        assert_refused(
            billing
                .describe_bill(DescribeBillRequest {
                    from: from.into(),
                    to: to.into(),
                })
                .await,
            Code::InvalidArgument,
            "InvalidParameterValue",
        );
    }

    // The price of a launch: instance-hours and the image fee with its chain; the snapshot
    // fee only for the image's owner.
    let mut sg = cluster.region("ap-singapore", 0);
    let windows = public_image(&mut sg, "Windows").await.image_id;
    let price = sg
        .inquiry_price_run_instances(InquiryPriceRunInstancesRequest {
            image_id: windows.clone(),
            instance_type: "S5.LARGE8".into(),
            instance_count: 3,
            hours: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .price
        .unwrap();
    let prices = book.region("ap-singapore").unwrap();
    let instance = price.instance.unwrap();
    assert_eq!(instance.quantity, "15");
    assert_eq!(
        instance.amount,
        prices
            .instance_hour("S5.LARGE8")
            .unwrap()
            .checked_mul(15)
            .unwrap()
            .to_string()
    );
    let fee = price.image_fee.unwrap();
    assert_eq!(fee.cause, "WINDOWS");
    assert_eq!(fee.root_image_id, windows);
    assert_eq!(
        fee.price.unwrap().amount,
        prices
            .windows_hour("S5.LARGE8")
            .unwrap()
            .checked_mul(15)
            .unwrap()
            .to_string()
    );
    assert!(price.snapshot.is_none(), "nobody owns a public image");
    // On the mainland the same launch has no image fee.
    let mut gz = cluster.region("ap-guangzhou", 0);
    let windows_gz = public_image(&mut gz, "Windows").await.image_id;
    let price = gz
        .inquiry_price_run_instances(InquiryPriceRunInstancesRequest {
            image_id: windows_gz,
            instance_type: "S5.LARGE8".into(),
            instance_count: 0,
            hours: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .price
        .unwrap();
    assert!(price.image_fee.is_none());
    assert_eq!(price.instance.unwrap().quantity, "1");
    assert_refused(
        gz.inquiry_price_run_instances(InquiryPriceRunInstancesRequest {
            image_id: "img-0nowhere".into(),
            instance_type: "S5.LARGE8".into(),
            instance_count: 1,
            hours: 1,
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert_refused(
        gz.inquiry_price_run_instances(InquiryPriceRunInstancesRequest {
            image_id: windows.clone(),
            instance_type: "S5.LARGE8".into(),
            instance_count: 1,
            hours: 100_000,
        })
        .await,
        Code::InvalidArgument,
        "InvalidParameterValue.LimitExceeded",
    );
}

/// `imaged dev --time-scale 3600`: an hour of billing time passes every real second, so an
/// instance run for a few seconds from outside bills several hours.
#[test]
fn imaged_dev_time_scale_bills_simulated_hours() {
    let dir = tempfile::tempdir().unwrap();
    let dev = dev::start_dev_with(dir.path(), "ap-guangzhou", &["--time-scale", "3600"], &[]);
    let cluster_file = dir.path().join("cluster.json");
    let ctl = |args: &[&str]| {
        let out = dev::imagectl(&cluster_file, args);
        assert!(
            out.status.success(),
            "imagectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let debian = ctl(&[
        "images",
        "list",
        "--region",
        "ap-guangzhou",
        "--type",
        "PUBLIC_IMAGE",
        "--platform",
        "Debian",
        "--limit",
        "1",
        "--output",
        "id",
    ]);
    let instance = ctl(&[
        "instances",
        "run",
        "--region",
        "ap-guangzhou",
        "--image",
        &debian,
        "--type",
        "S5.MEDIUM4",
        "--wait",
        "--output",
        "id",
    ]);
    std::thread::sleep(Duration::from_secs(4));
    ctl(&[
        "instances",
        "terminate",
        "--region",
        "ap-guangzhou",
        "--instance",
        &instance,
    ]);
    // Four real seconds are four simulated hours: at least four clock hours are billed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let hours = loop {
        let bill = dev::json(&dev::imagectl(
            &cluster_file,
            &["billing", "report", "--output", "json"],
        ));
        let hours: u64 = bill["lineItems"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["kind"] == "INSTANCE")
            .filter(|l| {
                l["resourceIds"]
                    .as_array()
                    .is_some_and(|ids| ids.iter().any(|id| id == instance.as_str()))
            })
            .filter_map(|l| l["quantity"].as_str()?.parse::<u64>().ok())
            .sum();
        if hours >= 4 || std::time::Instant::now() > deadline {
            break hours;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!((4..=12).contains(&hours), "{hours} hours billed");
    dev::stop(dev);
}
