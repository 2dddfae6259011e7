//! Usage events and bills as JSON: what an outbox stores and a service returns.

mod common;

use common::*;
use imagefleet_billing::{bill, RootKind, UsageEvent};

#[test]
fn events_round_trip_through_json() {
    let log = Log::new()
        .start(
            SG,
            t(10, 0),
            "ins-1",
            "S5.LARGE8",
            4,
            lineage(
                &[("img-c1", SG, ME), ("img-win", SG, "public")],
                RootKind::Windows,
            ),
        )
        .reset(
            SG,
            t(10, 30),
            "ins-1",
            public("img-rhel", RootKind::Licensed),
        )
        .stop(SG, t(11, 0), "ins-1")
        .held(SG, t(10, 0), 5 * GIB);
    for event in &log.events {
        let text = serde_json::to_string(event).expect("serialises");
        let back: UsageEvent = serde_json::from_str(&text).expect("parses");
        assert_eq!(&back, event, "{text}");
    }
    let text = serde_json::to_value(&log.events[2]).expect("serialises");
    assert_eq!(
        text,
        serde_json::json!({
            "id": { "region": "ap-singapore", "seq": 3 },
            "at": t(11, 0),
            "account": "acct-a",
            "usage": { "type": "INSTANCE_TERMINATED", "instance_id": "ins-1" }
        })
    );
    let started = serde_json::to_value(&log.events[0]).expect("serialises");
    assert_eq!(started["usage"]["type"], "INSTANCE_STARTED");
    assert_eq!(started["usage"]["image"]["root_kind"], "WINDOWS");
    assert_eq!(started["usage"]["image"]["chain"][1]["owner"], "public");
}

#[test]
fn a_bill_serialises_with_amounts_as_strings() {
    let log = Log::new()
        .start(
            SG,
            t(10, 0),
            "ins-1",
            "S5.LARGE8",
            4,
            public("img-win", RootKind::Windows),
        )
        .stop(SG, t(11, 0), "ins-1")
        .held(SG, t(10, 0), GIB / 2);
    let b = bill(&book(), &log.events, ME, t(10, 0), t(10, 59)).expect("bills");
    let json = serde_json::to_value(&b).expect("serialises");
    assert_eq!(json["total"], "0.331");
    assert_eq!(json["totals"]["IMAGE_FEE"], "0.09");
    assert_eq!(json["lines"][1]["kind"], "IMAGE_FEE");
    assert_eq!(json["lines"][1]["image_fee"]["cause"], "WINDOWS");
    assert_eq!(json["lines"][2]["quantity"]["unit"], "GB_HOUR");
    assert_eq!(json["lines"][2]["quantity"]["value"], "0.500000");
}

#[test]
fn a_chain_that_does_not_lead_to_its_root_is_reported() {
    let mut image = lineage(
        &[("img-c1", SG, ME), ("img-win", SG, "public")],
        RootKind::Windows,
    );
    image.root_image_id = "img-other".to_string();
    let log = Log::new()
        .start(SG, t(10, 0), "ins-1", "S5.LARGE8", 4, image)
        .stop(SG, t(11, 0), "ins-1");
    let b = bill(&book(), &log.events, ME, t(0, 0), t(23, 59)).expect("bills");
    assert_eq!(b.anomalies.len(), 1);
    // Still billed by the root's kind.
    assert_eq!(b.total.to_string(), "0.33");
}
