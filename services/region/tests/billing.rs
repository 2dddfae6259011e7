//! Billing on the region side: usage events written to the outbox with each state change (and
//! the lineage chains they carry), their delivery to a billing service (here a fake served
//! in-process that records what it gets and can be made to fail), and the price of a launch.

mod support;

use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::billing::v1::billing_internal_service_server::{
    BillingInternalService, BillingInternalServiceServer,
};
use imagefleet_proto::billing::v1::usage_event::Usage;
use imagefleet_proto::region::v1::*;
use imagefleet_region::catalogue::PUBLIC_IMAGES;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;
use tonic::{Request, Response, Status};

/// How the fake billing service answers.
#[derive(Default)]
struct FakeState {
    /// Refuse every call (UNAVAILABLE) without storing anything.
    down: AtomicBool,
    /// Store the events, then answer UNAVAILABLE anyway (the acknowledgement is lost).
    lose_acks: AtomicBool,
    /// Events stored, by (region, seq), as first received.
    stored: Mutex<BTreeMap<(String, u64), billing::UsageEvent>>,
    /// Sequence numbers in the order they arrived, duplicates included.
    arrivals: Mutex<Vec<u64>>,
    reports: AtomicUsize,
    quotes: Mutex<Vec<billing::QuoteRunRequest>>,
}

#[derive(Clone, Default)]
struct FakeBilling(Arc<FakeState>);

#[tonic::async_trait]
impl BillingInternalService for FakeBilling {
    async fn report_usage(
        &self,
        request: Request<billing::ReportUsageRequest>,
    ) -> Result<Response<billing::ReportUsageResponse>, Status> {
        let s = &self.0;
        s.reports.fetch_add(1, Ordering::SeqCst);
        if s.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("billing is down"));
        }
        let mut stored = 0;
        for event in request.into_inner().events {
            s.arrivals.lock().unwrap().push(event.seq);
            let key = (event.region.clone(), event.seq);
            if let std::collections::btree_map::Entry::Vacant(v) =
                s.stored.lock().unwrap().entry(key)
            {
                v.insert(event);
                stored += 1;
            }
        }
        if s.lose_acks.load(Ordering::SeqCst) {
            return Err(Status::unavailable("the answer was lost"));
        }
        Ok(Response::new(billing::ReportUsageResponse { stored }))
    }

    async fn quote_run(
        &self,
        request: Request<billing::QuoteRunRequest>,
    ) -> Result<Response<billing::QuoteRunResponse>, Status> {
        if self.0.down.load(Ordering::SeqCst) {
            return Err(Status::unavailable("billing is down"));
        }
        let req = request.into_inner();
        self.0.quotes.lock().unwrap().push(req.clone());
        Ok(Response::new(billing::QuoteRunResponse {
            price: Some(billing::RunPrice {
                currency: "CNY".into(),
                region: req.region,
                instance_type: req.instance_type,
                instance_count: req.instance_count,
                hours: req.hours,
                total: "1.000000".into(),
                ..Default::default()
            }),
        }))
    }
}

impl FakeBilling {
    /// Serves the fake on a loopback port; returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let service = BillingInternalServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        url
    }

    fn stored(&self) -> Vec<billing::UsageEvent> {
        self.0.stored.lock().unwrap().values().cloned().collect()
    }
}

fn spec(name: &'static str, billing_url: &str) -> RegionSpec {
    RegionSpec {
        billing_url: billing_url.to_string(),
        ..RegionSpec::memory(name)
    }
}

fn licensed_image() -> String {
    imagefleet_region::seed::image_id(PUBLIC_IMAGES.iter().find(|d| d.licensed).unwrap())
}

fn free_image() -> String {
    imagefleet_region::seed::image_id(
        PUBLIC_IMAGES
            .iter()
            .find(|d| !d.licensed && !d.is_windows())
            .unwrap(),
    )
}

fn link(image_id: &str, region: &str, owner: &str) -> billing::LineageLink {
    billing::LineageLink {
        image_id: image_id.to_string(),
        region: region.to_string(),
        owner_account_id: owner.to_string(),
    }
}

fn charge(chain: Vec<billing::LineageLink>, kind: &str) -> billing::ImageCharge {
    billing::ImageCharge {
        image_id: chain[0].image_id.clone(),
        root_image_id: chain.last().unwrap().image_id.clone(),
        chain,
        root_kind: kind.to_string(),
    }
}

/// Makes an image of the instance and waits until it is NORMAL.
async fn image_of(client: &mut Client, instance_id: &str, name: &str) -> String {
    let id = client
        .create_image(CreateImageRequest {
            instance_id: instance_id.to_string(),
            image_name: name.to_string(),
            ..Default::default()
        })
        .await
        .expect("create image")
        .into_inner()
        .image_id;
    wait_image(
        client,
        &id,
        Duration::from_secs(30),
        state_is(ImageState::Normal),
    )
    .await
    .expect("normal");
    id
}

async fn stored_bytes(client: &mut Client, image_id: &str) -> u64 {
    describe(client, image_id)
        .await
        .expect("describe")
        .snapshot_set[0]
        .stored_bytes
}

/// The outbox's events after `after`.
fn outbox_after(h: &Harness, region: &str, after: u64) -> Vec<billing::UsageEvent> {
    h.region(region)
        .store()
        .usage_outbox()
        .expect("outbox")
        .into_iter()
        .filter(|e| e.seq > after)
        .collect()
}

fn last_seq(h: &Harness, region: &str) -> u64 {
    outbox_after(h, region, 0).last().map_or(0, |e| e.seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_writes_its_usage_event_with_the_lineage_chain() {
    // Billing is down throughout: every event stays in the outbox to be read.
    let fake = FakeBilling::default();
    fake.0.down.store(true, Ordering::SeqCst);
    let url = fake.serve().await;
    let (gz, sh) = ("ap-guangzhou", "ap-shanghai");
    let h = Harness::start(vec![spec(gz, &url), spec(sh, &url)]).await;
    let (alice, bob) = (h.account(0).to_string(), h.account(1).to_string());
    let mut a = h.client(gz, 0);
    let mut b = h.client(gz, 1);
    let rhel = licensed_image();

    // Launching the licensed public image: one InstanceStarted, nothing for the public image.
    let before = last_seq(&h, gz);
    let i1 = launch(&mut a, &rhel).await;
    let events = outbox_after(&h, gz, before);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].region, gz);
    assert_eq!(events[0].account_id, alice);
    assert!(events[0].at > 1_700_000_000);
    let Some(Usage::InstanceStarted(started)) = &events[0].usage else {
        panic!("{events:?}")
    };
    assert_eq!(started.instance_id, i1);
    assert_eq!(started.instance_type, "S5.MEDIUM4");
    assert_eq!(started.vcpu, 2);
    assert_eq!(
        started.image,
        Some(charge(vec![link(&rhel, gz, "")], "LICENSED"))
    );

    // An image made from it: alice's snapshot bytes grow, and its chain leads to the root.
    write(&mut a, &i1, 0, &random_bytes(3 << 20))
        .await
        .expect("write");
    let before = last_seq(&h, gz);
    let img_a = image_of(&mut a, &i1, "from-rhel").await;
    let bytes_a = stored_bytes(&mut a, &img_a).await;
    assert!(bytes_a > 0);
    let events = outbox_after(&h, gz, before);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].account_id, alice);
    assert_eq!(
        events[0].usage,
        Some(Usage::SnapshotBytesHeld(billing::SnapshotBytesHeld {
            bytes: bytes_a
        }))
    );
    let chain_a = vec![link(&img_a, gz, &alice), link(&rhel, gz, "")];

    // An instance of that image, and an image of that instance: three links.
    let before = last_seq(&h, gz);
    let i2 = launch(&mut a, &img_a).await;
    let events = outbox_after(&h, gz, before);
    let Some(Usage::InstanceStarted(started)) = &events[0].usage else {
        panic!("{events:?}")
    };
    assert_eq!(started.image, Some(charge(chain_a.clone(), "LICENSED")));
    write(&mut a, &i2, 0, &random_bytes(1 << 20))
        .await
        .expect("write");
    let before = last_seq(&h, gz);
    let img_b = image_of(&mut a, &i2, "from-a").await;
    let bytes_b = stored_bytes(&mut a, &img_b).await;
    let events = outbox_after(&h, gz, before);
    assert_eq!(
        events.iter().map(|e| e.usage.clone()).collect::<Vec<_>>(),
        vec![Some(Usage::SnapshotBytesHeld(billing::SnapshotBytesHeld {
            bytes: bytes_a + bytes_b
        }))]
    );
    let mut chain_b = vec![link(&img_b, gz, &alice)];
    chain_b.extend(chain_a.clone());
    let stored_b = h.region(gz).store().image(&img_b).expect("read").unwrap();
    assert_eq!(stored_b.root_kind.as_str(), "LICENSED");
    assert_eq!(stored_b.chain.to_proto(gz), chain_b);

    // Shared with bob: his instance carries alice's chain, and his image of it extends it.
    a.modify_image_share_permission(ModifyImageSharePermissionRequest {
        image_id: img_b.clone(),
        account_ids: vec![bob.clone()],
        permission: SharePermission::Share as i32,
    })
    .await
    .expect("share");
    let before = last_seq(&h, gz);
    let i3 = launch(&mut b, &img_b).await;
    let events = outbox_after(&h, gz, before);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].account_id, bob);
    let Some(Usage::InstanceStarted(started)) = &events[0].usage else {
        panic!("{events:?}")
    };
    assert_eq!(started.image, Some(charge(chain_b.clone(), "LICENSED")));
    let img_c = image_of(&mut b, &i3, "bobs").await;
    let mut chain_c = vec![link(&img_c, gz, &bob)];
    chain_c.extend(chain_b.clone());
    let stored_c = h.region(gz).store().image(&img_c).expect("read").unwrap();
    assert_eq!(stored_c.chain.to_proto(gz), chain_c);
    let bob_events = outbox_after(&h, gz, before);
    assert!(matches!(
        bob_events.last().and_then(|e| e.usage.clone()),
        Some(Usage::SnapshotBytesHeld(b)) if b.bytes > 0
    ));

    // Reset to a free public image: the instance's charge changes.
    let ubuntu = free_image();
    let before = last_seq(&h, gz);
    a.reset_instance(ResetInstanceRequest {
        instance_id: i2.clone(),
        image_id: ubuntu.clone(),
    })
    .await
    .expect("reset");
    let events = outbox_after(&h, gz, before);
    assert_eq!(
        events.iter().map(|e| e.usage.clone()).collect::<Vec<_>>(),
        vec![Some(Usage::InstanceImageChanged(
            billing::InstanceImageChanged {
                instance_id: i2.clone(),
                image: Some(charge(vec![link(&ubuntu, gz, "")], "FREE")),
            }
        ))]
    );

    // Terminating: one event per instance, none for one already terminated.
    let before = last_seq(&h, gz);
    a.terminate_instances(TerminateInstancesRequest {
        instance_ids: vec![i1.clone(), i2.clone()],
    })
    .await
    .expect("terminate");
    a.terminate_instances(TerminateInstancesRequest {
        instance_ids: vec![i1.clone()],
    })
    .await
    .expect("terminate again");
    let events = outbox_after(&h, gz, before);
    let terminated: Vec<_> = events
        .iter()
        .map(|e| match &e.usage {
            Some(Usage::InstanceTerminated(t)) => t.instance_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(terminated, vec![i1.clone(), i2.clone()]);

    // Deleting bob's image: his bytes go back to zero.
    let before = last_seq(&h, gz);
    b.delete_images(DeleteImagesRequest {
        image_ids: vec![img_c.clone()],
    })
    .await
    .expect("delete");
    let mut events = Vec::new();
    for _ in 0..200 {
        events = outbox_after(&h, gz, before);
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].account_id, bob);
    assert_eq!(
        events[0].usage,
        Some(Usage::SnapshotBytesHeld(billing::SnapshotBytesHeld {
            bytes: 0
        }))
    );

    // A copy to another region: its chain is itself, then the source's; its bytes are held
    // there once it arrives, and an instance of it is charged for the whole chain.
    let copy = copy_to(&mut a, &img_b, sh).await;
    let mut s = h.client(sh, 0);
    wait_image(
        &mut s,
        &copy,
        Duration::from_secs(30),
        state_is(ImageState::Normal),
    )
    .await
    .expect("copied");
    let mut chain_copy = vec![link(&copy, sh, &alice)];
    chain_copy.extend(chain_b.clone());
    let held: Vec<_> = outbox_after(&h, sh, 0)
        .into_iter()
        .filter(|e| e.account_id == alice)
        .collect();
    assert_eq!(
        held.last().map(|e| e.usage.clone()),
        Some(Some(Usage::SnapshotBytesHeld(billing::SnapshotBytesHeld {
            bytes: stored_bytes(&mut s, &copy).await
        })))
    );
    let before = last_seq(&h, sh);
    launch(&mut s, &copy).await;
    let events = outbox_after(&h, sh, before);
    let Some(Usage::InstanceStarted(started)) = &events[0].usage else {
        panic!("{events:?}")
    };
    assert_eq!(started.image, Some(charge(chain_copy, "LICENSED")));

    // Sequence numbers only grow, and every event names its region and an account.
    for region in [gz, sh] {
        let all = outbox_after(&h, region, 0);
        assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
        assert!(all
            .iter()
            .all(|e| e.region == region && !e.account_id.is_empty() && e.usage.is_some()));
    }
    assert!(fake.stored().is_empty());
}

/// Waits until the region's outbox is empty.
async fn drained(h: &Harness, region: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while !outbox_after(h, region, 0).is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox of {region} never emptied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stored events are exactly seqs 1..=n of `region`, each once.
fn assert_complete(fake: &FakeBilling, region: &str) -> u64 {
    let stored = fake.stored();
    let seqs: Vec<u64> = stored.iter().map(|e| e.seq).collect();
    let n = seqs.len() as u64;
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "no gaps, no losses");
    assert!(stored.iter().all(|e| e.region == region));
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_delivered_in_order_and_survive_outages_and_restarts() {
    let fake = FakeBilling::default();
    let url = fake.serve().await;
    let gz = "ap-guangzhou";
    let mut h = Harness::start(vec![spec(gz, &url)]).await;
    let mut a = h.client(gz, 0);
    let base = licensed_image();

    // Delivered as they happen, in order; the outbox empties.
    let i1 = launch(&mut a, &base).await;
    write(&mut a, &i1, 0, &random_bytes(1 << 20))
        .await
        .expect("write");
    image_of(&mut a, &i1, "one").await;
    drained(&h, gz, Duration::from_secs(10)).await;
    let n = assert_complete(&fake, gz);
    assert_eq!(n, 2, "{:?}", fake.stored());
    let arrivals = fake.0.arrivals.lock().unwrap().clone();
    assert!(arrivals.windows(2).all(|w| w[0] < w[1]), "{arrivals:?}");

    // Billing down: calls still answer, events wait.
    fake.0.down.store(true, Ordering::SeqCst);
    let reports_before = fake.0.reports.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let more = a
        .run_instances(RunInstancesRequest {
            image_id: base.clone(),
            instance_type: "S5.LARGE8".into(),
            instance_count: 3,
            ..Default::default()
        })
        .await
        .expect("launch while billing is down")
        .into_inner()
        .instance_id_set;
    assert!(started.elapsed() < Duration::from_secs(2));
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(outbox_after(&h, gz, 0).len(), 3);
    let tries = fake.0.reports.load(Ordering::SeqCst) - reports_before;
    assert!(tries >= 2, "the delivery retries ({tries})");

    // Back, but acknowledgements lost for a while: delivered again, stored once.
    fake.0.lose_acks.store(true, Ordering::SeqCst);
    fake.0.down.store(false, Ordering::SeqCst);
    for _ in 0..500 {
        if fake.0.arrivals.lock().unwrap().len() >= 2 + 3 * 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outbox_after(&h, gz, 0).len(), 3, "not acknowledged yet");
    fake.0.lose_acks.store(false, Ordering::SeqCst);
    drained(&h, gz, Duration::from_secs(15)).await;
    let n = assert_complete(&fake, gz);
    assert_eq!(n, 5);
    let arrivals = fake.0.arrivals.lock().unwrap().clone();
    assert!(
        arrivals.len() > 5,
        "some were delivered twice: {arrivals:?}"
    );

    // Undelivered events survive a restart and go once billing answers.
    fake.0.down.store(true, Ordering::SeqCst);
    a.terminate_instances(TerminateInstancesRequest {
        instance_ids: more.clone(),
    })
    .await
    .expect("terminate");
    h.stop_region(gz).await;
    assert_eq!(outbox_after(&h, gz, 0).len(), 3);
    h.restart_region(gz).await;
    fake.0.down.store(false, Ordering::SeqCst);
    drained(&h, gz, Duration::from_secs(15)).await;
    let n = assert_complete(&fake, gz);
    assert_eq!(n, 8);
    let terminated: Vec<String> = fake
        .stored()
        .into_iter()
        .filter_map(|e| match e.usage {
            Some(Usage::InstanceTerminated(t)) => Some(t.instance_id),
            _ => None,
        })
        .collect();
    assert_eq!(terminated, more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_price_of_a_launch_comes_from_billing_with_the_images_lineage() {
    let fake = FakeBilling::default();
    let url = fake.serve().await;
    let gz = "ap-guangzhou";
    let h = Harness::start(vec![spec(gz, &url)]).await;
    let (alice, bob) = (h.account(0).to_string(), h.account(1).to_string());
    let mut a = h.client(gz, 0);
    let mut b = h.client(gz, 1);
    let rhel = licensed_image();
    let i1 = launch(&mut a, &rhel).await;
    write(&mut a, &i1, 0, &random_bytes(2 << 20))
        .await
        .expect("write");
    let img = image_of(&mut a, &i1, "priced").await;
    let held = h.region(gz).store().snapshot_bytes(&alice).expect("bytes");
    assert!(held > 0);

    let ask = |image_id: &str, instance_type: &str, count: u32, hours: u64| {
        InquiryPriceRunInstancesRequest {
            image_id: image_id.to_string(),
            instance_type: instance_type.to_string(),
            instance_count: count,
            hours,
        }
    };
    // The owner: 0 instances and 0 hours mean 1; snapshot storage priced on its total.
    let price = a
        .inquiry_price_run_instances(ask(&img, "S5.LARGE8", 0, 0))
        .await
        .expect("price")
        .into_inner()
        .price
        .expect("a price");
    assert_eq!(price.total, "1.000000");
    let quote = fake.0.quotes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(quote.region, gz);
    assert_eq!(quote.instance_type, "S5.LARGE8");
    assert_eq!(quote.vcpu, 4);
    assert_eq!((quote.instance_count, quote.hours), (1, 1));
    assert_eq!(
        quote.image,
        Some(charge(
            vec![link(&img, gz, &alice), link(&rhel, gz, "")],
            "LICENSED"
        ))
    );
    assert!(quote.include_snapshot);
    assert_eq!(quote.owner_snapshot_bytes, held);

    // Not visible to bob until shared; then priced without the owner's storage.
    let err = b
        .inquiry_price_run_instances(ask(&img, "S5.LARGE8", 1, 1))
        .await
        .expect_err("not shared");
    assert_eq!(err.code(), tonic::Code::NotFound);
    a.modify_image_share_permission(ModifyImageSharePermissionRequest {
        image_id: img.clone(),
        account_ids: vec![bob.clone()],
        permission: SharePermission::Share as i32,
    })
    .await
    .expect("share");
    b.inquiry_price_run_instances(ask(&img, "S5.MEDIUM4", 100, 8784))
        .await
        .expect("price for bob");
    let quote = fake.0.quotes.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        (quote.vcpu, quote.instance_count, quote.hours),
        (2, 100, 8784)
    );
    assert!(!quote.include_snapshot);
    assert_eq!(quote.owner_snapshot_bytes, 0);
    assert_eq!(quote.image.unwrap().chain.len(), 2);

    // A public image: nobody's storage.
    b.inquiry_price_run_instances(ask(&rhel, "S5.SMALL1", 1, 1))
        .await
        .expect("public");
    let quote = fake.0.quotes.lock().unwrap().last().cloned().unwrap();
    assert!(!quote.include_snapshot);
    assert_eq!(
        quote.image,
        Some(charge(vec![link(&rhel, gz, "")], "LICENSED"))
    );

    // Bad input is refused as RunInstances refuses it, before billing is asked.
    let asked = fake.0.quotes.lock().unwrap().len();
    for (req, field_reason) in [
        (ask("ximg-1", "S5.LARGE8", 1, 1), "InvalidImageId.Malformed"),
        (ask(&img, "Z9.HUGE", 1, 1), "InvalidInstanceType.Malformed"),
        (
            ask(&img, "S5.LARGE8", 101, 1),
            "InvalidParameterValue.LimitExceeded",
        ),
        (
            ask(&img, "S5.LARGE8", 1, 8785),
            "InvalidParameterValue.LimitExceeded",
        ),
    ] {
        let err = a
            .inquiry_price_run_instances(req.clone())
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{req:?}");
        assert_eq!(reason(&err), field_reason, "{req:?}");
    }
    let err = a
        .inquiry_price_run_instances(ask(&img, "S5.LARGE8", 1, 8785))
        .await
        .expect_err("refused");
    assert!(err.message().contains("hours"), "{err:?}");
    assert_eq!(fake.0.quotes.lock().unwrap().len(), asked);

    // Billing down: UNAVAILABLE.
    fake.0.down.store(true, Ordering::SeqCst);
    let err = a
        .inquiry_price_run_instances(ask(&img, "S5.LARGE8", 1, 1))
        .await
        .expect_err("billing down");
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(reason(&err), "ServiceUnavailable");
}
