//! The billing services, served by the catalog in-process on 127.0.0.1:0 and called over gRPC
//! with signed clients: usage reported by regions, bills, quotes and the price book, with the
//! prices of the shipped book (deploy/price-book.toml).

use imagefleet_billing::PriceBook;
use imagefleet_catalog::{run, Catalog, CatalogConfig};
use imagefleet_proto::billing::v1::billing_internal_service_client::BillingInternalServiceClient;
use imagefleet_proto::billing::v1::billing_service_client::BillingServiceClient;
use imagefleet_proto::billing::v1::usage_event::Usage;
use imagefleet_proto::billing::v1::*;
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::{Account, CreateAccountRequest};
use imagefleet_proto::error;
use imagefleet_rpc::client::{signed_channel, SignedChannel, CATALOG_SCOPE};
use imagefleet_rpc::clock::Clock;
use imagefleet_rpc::Credentials;
use std::path::{Path, PathBuf};
use tokio::sync::oneshot;
use tonic::Code;

const SERVICE_KEY: &str = "test-service-key";
/// 2026-11-10T00:00:00Z.
const DAY: i64 = 1_794_268_800;
const GIB: u64 = 1 << 30;

fn t(hh: i64, mm: i64) -> i64 {
    DAY + hh * 3600 + mm * 60
}

/// A catalog served until stopped, its billing clock read from a file.
struct Served {
    url: String,
    clock_file: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    async fn start(dir: &Path) -> Served {
        let clock_file = dir.join("clock");
        let catalog = Catalog::open(CatalogConfig {
            data_dir: dir.join("catalog"),
            service_key: SERVICE_KEY.to_string(),
            price_book: PriceBook::shipped(),
            clock: Clock::file(&clock_file),
        })
        .expect("catalog opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(catalog, listener, async {
            let _ = stopped.await;
        }));
        Served {
            url,
            clock_file,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    fn set_now(&self, now: i64) {
        std::fs::write(&self.clock_file, now.to_string()).unwrap();
    }

    fn channel(&self, creds: Credentials) -> SignedChannel {
        signed_channel(&self.url, creds, CATALOG_SCOPE).unwrap()
    }

    fn internal_as(&self, service: &str) -> BillingInternalServiceClient<SignedChannel> {
        BillingInternalServiceClient::new(self.channel(Credentials::service(service, SERVICE_KEY)))
    }

    fn region(&self, region: &str) -> BillingInternalServiceClient<SignedChannel> {
        self.internal_as(&format!("region-{region}"))
    }

    fn account(&self, account: &Account) -> BillingServiceClient<SignedChannel> {
        BillingServiceClient::new(self.channel(creds(account)))
    }

    async fn create_account(&self, name: &str) -> Account {
        CatalogInternalServiceClient::new(self.channel(Credentials::service("admin", SERVICE_KEY)))
            .create_account(CreateAccountRequest {
                account_id: String::new(),
                name: name.to_string(),
            })
            .await
            .unwrap()
            .into_inner()
            .account
            .unwrap()
    }
}

fn creds(account: &Account) -> Credentials {
    Credentials {
        secret_id: account.secret_id.clone(),
        secret_key: account.secret_key.clone(),
    }
}

fn check_invalid(status: &tonic::Status, field: &str, reason: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(error::field(status).as_deref(), Some(field), "{status:?}");
    assert_eq!(error::reason(status).as_deref(), Some(reason), "{status:?}");
}

fn link(image_id: &str) -> LineageLink {
    LineageLink {
        image_id: image_id.to_string(),
        ..Default::default()
    }
}

/// `img-custom01`, made by `owner` in ap-singapore from an instance of the Windows image
/// `img-winroot1`.
fn custom_windows(owner: &str) -> ImageCharge {
    ImageCharge {
        image_id: "img-custom01".into(),
        chain: vec![
            LineageLink {
                image_id: "img-custom01".into(),
                region: "ap-singapore".into(),
                owner_account_id: owner.into(),
            },
            link("img-winroot1"),
        ],
        root_image_id: "img-winroot1".into(),
        root_kind: "WINDOWS".into(),
    }
}

fn root(image_id: &str, kind: &str) -> ImageCharge {
    ImageCharge {
        image_id: image_id.into(),
        chain: vec![link(image_id)],
        root_image_id: image_id.into(),
        root_kind: kind.into(),
    }
}

fn event(region: &str, seq: u64, at: i64, account: &str, usage: Usage) -> UsageEvent {
    UsageEvent {
        region: region.into(),
        seq,
        at,
        account_id: account.into(),
        usage: Some(usage),
    }
}

fn start(instance_id: &str, instance_type: &str, vcpu: u32, image: ImageCharge) -> Usage {
    Usage::InstanceStarted(InstanceStarted {
        instance_id: instance_id.into(),
        instance_type: instance_type.into(),
        vcpu,
        image: Some(image),
    })
}

fn stop(instance_id: &str) -> Usage {
    Usage::InstanceTerminated(InstanceTerminated {
        instance_id: instance_id.into(),
    })
}

async fn report(
    client: &mut BillingInternalServiceClient<SignedChannel>,
    events: Vec<UsageEvent>,
) -> Result<u32, tonic::Status> {
    Ok(client
        .report_usage(ReportUsageRequest { events })
        .await?
        .into_inner()
        .stored)
}

async fn bill(
    client: &mut BillingServiceClient<SignedChannel>,
    from: &str,
    to: &str,
) -> Result<DescribeBillResponse, tonic::Status> {
    Ok(client
        .describe_bill(DescribeBillRequest {
            from: from.into(),
            to: to.into(),
        })
        .await?
        .into_inner())
}

/// Each line as `kind region resource,ids type unit quantity unit_price amount` (`-` for an
/// empty instance type).
fn rows(response: &DescribeBillResponse) -> Vec<String> {
    response
        .line_items
        .iter()
        .map(|l| {
            let instance_type = if l.instance_type.is_empty() {
                "-"
            } else {
                l.instance_type.as_str()
            };
            format!(
                "{} {} {} {instance_type} {} {} {} {}",
                l.kind,
                l.region,
                l.resource_ids.join(","),
                l.unit,
                l.quantity,
                l.unit_price,
                l.amount
            )
        })
        .collect()
}

/// Alice's and Bob's usage on 2026-11-10, as the regions report it.
fn singapore_events(alice: &str, bob: &str) -> Vec<UsageEvent> {
    let sg = "ap-singapore";
    vec![
        // 10:00 to 11:01: 61 minutes, two clock hours.
        event(
            sg,
            1,
            t(10, 0),
            alice,
            start(
                "ins-aaaaaaa1",
                "S5.MEDIUM4",
                4,
                root("img-ubuntu01", "FREE"),
            ),
        ),
        event(sg, 2, t(11, 1), alice, stop("ins-aaaaaaa1")),
        // A custom image whose root is Windows, overseas: the fee is billed, with the chain.
        event(
            sg,
            3,
            t(10, 0),
            alice,
            start("ins-aaaaaaa2", "S5.LARGE8", 8, custom_windows(alice)),
        ),
        event(sg, 4, t(12, 30), alice, stop("ins-aaaaaaa2")),
        // Bob's own instance: never on Alice's bill.
        event(
            sg,
            5,
            t(10, 0),
            bob,
            start(
                "ins-bbbbbbb1",
                "S5.MEDIUM4",
                4,
                root("img-winroot1", "WINDOWS"),
            ),
        ),
        event(sg, 6, t(10, 30), bob, stop("ins-bbbbbbb1")),
        // A type the book does not price: an anomaly, the rest is still billed.
        event(
            sg,
            7,
            t(10, 0),
            alice,
            start("ins-aaaaaaa3", "X9.HUGE", 4, root("img-ubuntu01", "FREE")),
        ),
    ]
}

fn guangzhou_events(alice: &str) -> Vec<UsageEvent> {
    let gz = "ap-guangzhou";
    vec![
        // Windows on the mainland: the instance only, no fee.
        event(
            gz,
            1,
            t(10, 0),
            alice,
            start(
                "ins-ggggggg1",
                "S5.LARGE8",
                8,
                root("img-winroot1", "WINDOWS"),
            ),
        ),
        event(gz, 2, t(11, 0), alice, stop("ins-ggggggg1")),
        // 100 GiB of snapshots held from 10:00, 80 free: 20 GiB per hour.
        event(
            gz,
            3,
            t(10, 0),
            alice,
            Usage::SnapshotBytesHeld(SnapshotBytesHeld { bytes: 100 * GIB }),
        ),
    ]
}

/// Alice's bill for the whole day, line by line, from the shipped prices.
fn check_alice_day(response: &DescribeBillResponse, alice: &str) {
    assert_eq!(response.account_id, alice);
    assert_eq!(response.currency, "USD");
    assert_eq!(response.from, "2026-11-10T00:00:00Z");
    assert_eq!(response.to, "2026-11-10T23:59:59Z");
    let expected = [
        // S5.LARGE8 in ap-guangzhou is 0.056 an hour; one hour.
        "INSTANCE ap-guangzhou ins-ggggggg1 S5.LARGE8 HOUR 1 0.056 0.056".to_string(),
        // S5.MEDIUM4 in ap-singapore is 0.0364; 61 minutes bill two hours.
        "INSTANCE ap-singapore ins-aaaaaaa1 S5.MEDIUM4 HOUR 2 0.0364 0.0728".to_string(),
        // S5.LARGE8 in ap-singapore is 0.0728; 10:00 to 12:30 is three hours.
        "INSTANCE ap-singapore ins-aaaaaaa2 S5.LARGE8 HOUR 3 0.0728 0.2184".to_string(),
        // Windows on S5.LARGE8 in ap-singapore is 0.0368 an hour.
        "IMAGE_FEE ap-singapore ins-aaaaaaa2,img-custom01 S5.LARGE8 HOUR 3 0.0368 0.1104"
            .to_string(),
        // 20 GiB over the free tier for 14 hours (10:00 to 23:59) at 0.000069.
        format!("SNAPSHOT_STORAGE ap-guangzhou {alice} - GB_HOUR 280.000000 0.000069 0.01932"),
    ];
    assert_eq!(rows(response), expected);
    let fee = response.line_items[3]
        .image_fee
        .as_ref()
        .expect("the fee's cause");
    assert_eq!(fee.cause, "WINDOWS");
    assert_eq!(fee.image_id, "img-custom01");
    assert_eq!(fee.root_image_id, "img-winroot1");
    assert_eq!(fee.chain, custom_windows(alice).chain);
    assert!(response.line_items[0].image_fee.is_none());
    let totals: Vec<(&str, &str)> = response
        .totals
        .iter()
        .map(|k| (k.kind.as_str(), k.amount.as_str()))
        .collect();
    assert_eq!(
        totals,
        [
            ("INSTANCE", "0.3472"),
            ("IMAGE_FEE", "0.1104"),
            ("SNAPSHOT_STORAGE", "0.01932")
        ]
    );
    assert_eq!(response.total, "0.47692");
    assert_eq!(response.anomalies.len(), 1, "{:?}", response.anomalies);
    assert!(
        response.anomalies[0].starts_with("ap-singapore/7: ")
            && response.anomalies[0].contains("X9.HUGE"),
        "{:?}",
        response.anomalies
    );
}

#[tokio::test]
async fn usage_becomes_each_accounts_own_bill_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    served.set_now(t(24 + 12, 0));
    let alice = served.create_account("alice").await;
    let bob = served.create_account("bob").await;
    let (a, b) = (alice.account_id.as_str(), bob.account_id.as_str());

    let mut singapore = served.region("ap-singapore");
    let mut guangzhou = served.region("ap-guangzhou");
    assert_eq!(
        report(&mut singapore, singapore_events(a, b))
            .await
            .unwrap(),
        7
    );
    assert_eq!(
        report(&mut guangzhou, guangzhou_events(a)).await.unwrap(),
        3
    );

    let day = ("2026-11-10T00:00:00Z", "2026-11-10T23:59:59Z");
    let mut as_alice = served.account(&alice);
    let first = bill(&mut as_alice, day.0, day.1).await.unwrap();
    check_alice_day(&first, a);

    // Delivered again (a region retrying), in another order: nothing new, the same bill.
    let mut again = singapore_events(a, b);
    again.reverse();
    assert_eq!(report(&mut singapore, again).await.unwrap(), 0);
    assert_eq!(
        report(&mut guangzhou, guangzhou_events(a)).await.unwrap(),
        0
    );
    // Part old, part new: only the new one counts.
    let mut mixed = guangzhou_events(a);
    mixed.push(event(
        "ap-guangzhou",
        4,
        t(25, 0),
        a,
        Usage::SnapshotBytesHeld(SnapshotBytesHeld { bytes: 0 }),
    ));
    assert_eq!(report(&mut guangzhou, mixed).await.unwrap(), 1);
    assert_eq!(bill(&mut as_alice, day.0, day.1).await.unwrap(), first);

    // Bob sees only his own: one hour of S5.MEDIUM4 and its Windows fee, overseas.
    let bobs = bill(&mut served.account(&bob), day.0, day.1).await.unwrap();
    assert_eq!(bobs.account_id, b);
    assert_eq!(
        rows(&bobs),
        [
            "INSTANCE ap-singapore ins-bbbbbbb1 S5.MEDIUM4 HOUR 1 0.0364 0.0364",
            "IMAGE_FEE ap-singapore ins-bbbbbbb1,img-winroot1 S5.MEDIUM4 HOUR 1 0.0184 0.0184",
        ]
    );
    assert_eq!(bobs.total, "0.0548");
    assert!(bobs.anomalies.is_empty());

    // The default period: from the start of the clock's month to the clock's now (the next
    // day at 12:00). The snapshots are held until 01:00 that day: 15 hours at 20 GiB.
    let month = bill(&mut as_alice, "", "").await.unwrap();
    assert_eq!(month.from, "2026-11-01T00:00:00Z");
    assert_eq!(month.to, "2026-11-11T12:00:00Z");
    let snapshot = month
        .line_items
        .iter()
        .find(|l| l.kind == "SNAPSHOT_STORAGE")
        .unwrap();
    assert_eq!(snapshot.quantity, "300.000000");
    assert_eq!(snapshot.amount, "0.0207");
    assert_eq!(month.total, "0.4783");

    // Before anything was used: an empty bill.
    let empty = bill(
        &mut as_alice,
        "2026-11-09T00:00:00Z",
        "2026-11-09T23:59:59Z",
    )
    .await
    .unwrap();
    assert!(empty.line_items.is_empty() && empty.totals.is_empty());
    assert_eq!(empty.total, "0.00");

    served.stop().await;
    let served = Served::start(dir.path()).await;
    served.set_now(t(24 + 12, 0));
    let mut as_alice = served.account(&alice);
    assert_eq!(bill(&mut as_alice, day.0, day.1).await.unwrap(), first);
    // The ids stay known across the restart.
    assert_eq!(
        report(&mut served.region("ap-singapore"), singapore_events(a, b))
            .await
            .unwrap(),
        0
    );
    served.stop().await;
}

#[tokio::test]
async fn reports_are_checked_whole_and_by_who_sends_them() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let alice = served.create_account("alice").await;
    let a = alice.account_id.as_str();
    let mut singapore = served.region("ap-singapore");
    let good = event("ap-singapore", 10, t(10, 0), a, stop("ins-aaaaaaa1"));

    // An event of another region refuses the whole batch.
    let err = report(
        &mut singapore,
        vec![
            good.clone(),
            event("ap-guangzhou", 11, t(10, 0), a, stop("ins-aaaaaaa1")),
        ],
    )
    .await
    .unwrap_err();
    check_invalid(&err, "events[1].region", "InvalidParameterValue.Region");

    // An event without usage, or with a bad field.
    let mut no_usage = good.clone();
    no_usage.usage = None;
    let err = report(&mut singapore, vec![good.clone(), no_usage])
        .await
        .unwrap_err();
    check_invalid(&err, "events[1].usage", "MissingParameter");
    let mut no_seq = good.clone();
    no_seq.seq = 0;
    let err = report(&mut singapore, vec![no_seq]).await.unwrap_err();
    check_invalid(&err, "events[0].seq", "MissingParameter");
    let mut bad_kind = event(
        "ap-singapore",
        12,
        t(10, 0),
        a,
        start(
            "ins-aaaaaaa1",
            "S5.LARGE8",
            8,
            root("img-winroot1", "windows"),
        ),
    );
    let err = report(&mut singapore, vec![bad_kind.clone()])
        .await
        .unwrap_err();
    check_invalid(
        &err,
        "events[0].instance_started.image.root_kind",
        "InvalidParameterValue",
    );
    bad_kind.account_id = "alice".into();
    let err = report(&mut singapore, vec![bad_kind]).await.unwrap_err();
    check_invalid(&err, "events[0].account_id", "InvalidAccountId.Malformed");

    // Over 1000 events.
    let many: Vec<UsageEvent> = (1..=1001)
        .map(|seq| event("ap-singapore", seq, t(10, 0), a, stop("ins-aaaaaaa1")))
        .collect();
    let err = report(&mut singapore, many).await.unwrap_err();
    check_invalid(&err, "events", "InvalidParameterValue.LimitExceeded");
    // 1000 are fine, in one go.
    let thousand: Vec<UsageEvent> = (1001..=2000)
        .map(|seq| {
            event(
                "ap-singapore",
                seq,
                t(10, 0),
                a,
                Usage::SnapshotBytesHeld(SnapshotBytesHeld { bytes: seq }),
            )
        })
        .collect();
    assert_eq!(report(&mut singapore, thousand).await.unwrap(), 1000);

    // None of the refused batches stored anything.
    assert_eq!(report(&mut singapore, vec![good.clone()]).await.unwrap(), 1);
    assert_eq!(report(&mut singapore, vec![]).await.unwrap(), 0);

    // Account credentials are refused on the internal service; an operator may quote but not
    // report; a region may not read a bill.
    let mut as_account = BillingInternalServiceClient::new(served.channel(creds(&alice)));
    let err = report(&mut as_account, vec![good.clone()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        error::reason(&err).as_deref(),
        Some("UnauthorizedOperation.ServiceCredentialRequired")
    );
    let err = report(&mut served.internal_as("admin"), vec![good.clone()])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        error::reason(&err).as_deref(),
        Some("UnauthorizedOperation.CallerNotAllowed")
    );
    let err = BillingServiceClient::new(
        served.channel(Credentials::service("region-ap-singapore", SERVICE_KEY)),
    )
    .describe_bill(DescribeBillRequest::default())
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    served.stop().await;
}

#[tokio::test]
async fn bad_periods_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    served.set_now(t(12, 0));
    let alice = served.create_account("alice").await;
    let mut client = served.account(&alice);
    for (from, to, field) in [
        ("last week", "", "from"),
        ("2026-11-10", "", "from"),
        ("", "2026-11-10T25:00:00Z", "to"),
        ("2026-11-10T12:00:00Z", "2026-11-10T11:59:59Z", "to"),
        // From after the clock's now, to defaulting to now.
        ("2026-11-11T00:00:00Z", "", "to"),
        ("2025-11-01T00:00:00Z", "2026-11-10T00:00:00Z", "from"),
    ] {
        let err = bill(&mut client, from, to).await.unwrap_err();
        check_invalid(&err, field, "InvalidParameterValue");
    }
    // 366 days are accepted.
    let ok = bill(&mut client, "2025-11-09T00:00:00Z", "2026-11-10T00:00:00Z")
        .await
        .unwrap();
    assert_eq!(ok.total, "0.00");
    served.stop().await;
}

#[tokio::test]
async fn quotes_price_a_launch_by_the_book() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let owner = "100000000001";
    let request = QuoteRunRequest {
        region: "ap-singapore".into(),
        instance_type: "S5.LARGE8".into(),
        vcpu: 8,
        instance_count: 2,
        hours: 3,
        image: Some(custom_windows(owner)),
        include_snapshot: true,
        owner_snapshot_bytes: 10 * GIB,
    };
    let part = |unit_price: &str, unit: &str, quantity: &str, amount: &str| {
        Some(PricePart {
            unit_price: unit_price.into(),
            unit: unit.into(),
            quantity: quantity.into(),
            amount: amount.into(),
        })
    };
    for caller in ["region-ap-singapore", "admin"] {
        let price = served
            .internal_as(caller)
            .quote_run(request.clone())
            .await
            .unwrap()
            .into_inner()
            .price
            .unwrap();
        assert_eq!(price.currency, "USD");
        assert_eq!(price.region, "ap-singapore");
        assert_eq!((price.instance_count, price.hours), (2, 3));
        // Six instance-hours of S5.LARGE8 at 0.0728, and of Windows at 0.0368.
        assert_eq!(price.instance, part("0.0728", "HOUR", "6", "0.4368"));
        let fee = price.image_fee.expect("Windows is paid overseas");
        assert_eq!(fee.cause, "WINDOWS");
        assert_eq!(fee.root_image_id, "img-winroot1");
        assert_eq!(fee.chain, custom_windows(owner).chain);
        assert_eq!(fee.price, part("0.0368", "HOUR", "6", "0.2208"));
        // 10 GiB for three hours at 0.000075, no free tier overseas.
        let snapshot = price.snapshot.expect("asked for");
        assert_eq!(
            (
                snapshot.bytes_held,
                snapshot.free_tier_bytes,
                snapshot.billable_bytes
            ),
            (10 * GIB, 0, 10 * GIB)
        );
        assert_eq!(
            snapshot.price,
            part("0.000075", "GB_HOUR", "30.000000", "0.00225")
        );
        assert_eq!(price.total, "0.65985");
    }

    let mut client = served.region("ap-guangzhou");
    // Windows on the mainland: no fee; a licence: by vCPU class (up to 8 is 0.13).
    let mainland = QuoteRunRequest {
        region: "ap-guangzhou".into(),
        include_snapshot: false,
        ..request.clone()
    };
    let price = client
        .quote_run(mainland.clone())
        .await
        .unwrap()
        .into_inner()
        .price
        .unwrap();
    assert!(price.image_fee.is_none() && price.snapshot.is_none());
    assert_eq!(price.total, "0.336");
    let licensed = QuoteRunRequest {
        image: Some(root("img-rhel0001", "LICENSED")),
        ..mainland.clone()
    };
    let price = client
        .quote_run(licensed.clone())
        .await
        .unwrap()
        .into_inner()
        .price
        .unwrap();
    let fee = price.image_fee.unwrap();
    assert_eq!(fee.cause, "LICENSED");
    assert_eq!(fee.price, part("0.13", "HOUR", "6", "0.78"));
    assert_eq!(price.total, "1.116");

    for (edit, field, reason) in [
        (
            QuoteRunRequest {
                instance_type: "X9.HUGE".into(),
                ..licensed.clone()
            },
            "instance_type",
            "InvalidInstanceType.Malformed",
        ),
        (
            QuoteRunRequest {
                region: "eu-nowhere".into(),
                ..licensed.clone()
            },
            "region",
            "InvalidParameterValue",
        ),
        (
            QuoteRunRequest {
                vcpu: 500,
                ..licensed.clone()
            },
            "vcpu",
            "InvalidParameterValue",
        ),
        (
            QuoteRunRequest {
                hours: 0,
                ..licensed.clone()
            },
            "hours",
            "MissingParameter",
        ),
        (
            QuoteRunRequest {
                image: None,
                ..licensed.clone()
            },
            "image",
            "MissingParameter",
        ),
    ] {
        let err = client.quote_run(edit).await.unwrap_err();
        check_invalid(&err, field, reason);
    }
    served.stop().await;
}

#[tokio::test]
async fn the_price_book_is_described_by_region() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let alice = served.create_account("alice").await;
    let mut client = served.account(&alice);
    let book = PriceBook::shipped();

    let all = client
        .describe_price_book(DescribePriceBookRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.currency, "USD");
    let names: Vec<&str> = all.region_set.iter().map(|r| r.region.as_str()).collect();
    let expected: Vec<&str> = book.regions().map(|(name, _)| name).collect();
    assert_eq!(names, expected);
    assert!(!names.is_empty());
    for described in &all.region_set {
        let prices = book.region(&described.region).unwrap();
        assert_eq!(described.mainland, prices.is_mainland());
        let price_of = |list: &[InstancePrice], instance_type: &str| {
            list.iter()
                .find(|p| p.instance_type == instance_type)
                .map(|p| p.hourly.clone())
        };
        for instance_type in ["S5.MEDIUM4", "S5.LARGE8"] {
            assert_eq!(
                price_of(&described.instance_hour, instance_type),
                prices.instance_hour(instance_type).map(|m| m.to_string()),
                "{} {instance_type}",
                described.region
            );
            assert!(price_of(&described.instance_hour, instance_type).is_some());
            if described.mainland {
                assert!(described.windows_hour.is_empty());
            } else {
                let windows = price_of(&described.windows_hour, instance_type)
                    .unwrap_or_else(|| panic!("{} Windows {instance_type}", described.region));
                assert_eq!(
                    Some(windows),
                    prices.windows_hour(instance_type).map(|m| m.to_string())
                );
            }
        }
        assert_eq!(described.free_tier_gb, prices.free_tier_gb());
        assert_eq!(
            described.snapshot_gb_hour,
            prices.snapshot_gb_hour().to_string()
        );
        let classes: Vec<(u32, u32, String)> = described
            .licence_hour
            .iter()
            .map(|c| (c.min_vcpu, c.max_vcpu, c.hourly.clone()))
            .collect();
        let expected: Vec<(u32, u32, String)> = prices
            .licence_classes()
            .iter()
            .map(|c| (c.min_vcpu, c.max_vcpu, c.price.to_string()))
            .collect();
        assert_eq!(classes, expected);
        assert_eq!(classes[0].0, 1);
    }
    let singapore = all
        .region_set
        .iter()
        .find(|r| r.region == "ap-singapore")
        .unwrap();
    assert!(!singapore.mainland);
    assert_eq!(singapore.snapshot_gb_hour, "0.000075");

    let one = client
        .describe_price_book(DescribePriceBookRequest {
            region: "ap-guangzhou".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.region_set.len(), 1);
    assert_eq!(one.region_set[0].region, "ap-guangzhou");
    assert_eq!(one.region_set[0].free_tier_gb, 80);

    let err = client
        .describe_price_book(DescribePriceBookRequest {
            region: "eu-nowhere".into(),
        })
        .await
        .unwrap_err();
    check_invalid(&err, "region", "InvalidParameterValue");
    served.stop().await;
}
