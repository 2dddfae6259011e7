//! The billing rules, one table row per rule: a usage log, a period, and the bill expected.
//! Every row is also billed from its events reversed and delivered twice, which must give the
//! same bill.

mod common;

use common::*;
use imagefleet_billing::{bill, RootKind, Usage};

struct Row {
    rule: &'static str,
    log: Log,
    from: i64,
    to: i64,
    expect: &'static [&'static str],
}

fn day(rule: &'static str, log: Log, expect: &'static [&'static str]) -> Row {
    Row {
        rule,
        log,
        from: t(0, 0),
        to: t(23, 59),
        expect,
    }
}

fn rows() -> Vec<Row> {
    let ubuntu = || public("img-ubuntu", RootKind::Free);
    let windows = || public("img-win", RootKind::Windows);
    let rhel = || public("img-rhel", RootKind::Licensed);
    vec![
        day(
            "public images are free",
            Log::new()
                .start(SG, t(10, 0), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(SG, t(11, 0), "ins-1")
                .start(GZ, t(10, 0), "ins-2", "S5.LARGE8", 4, ubuntu())
                .stop(GZ, t(11, 0), "ins-2"),
            &[
                "INSTANCE ap-guangzhou ins-2 1 x 0.20 = 0.20",
                "INSTANCE ap-singapore ins-1 1 x 0.12 = 0.12",
                "total 0.32",
            ],
        ),
        day(
            "Windows is billed per instance type overseas",
            Log::new()
                .start(SG, t(10, 0), "ins-1", "S5.LARGE8", 4, windows())
                .stop(SG, t(12, 0), "ins-1")
                .start(SG, t(10, 0), "ins-2", "S5.MEDIUM4", 2, windows())
                .stop(SG, t(11, 0), "ins-2"),
            &[
                "INSTANCE ap-singapore ins-1 2 x 0.24 = 0.48",
                "INSTANCE ap-singapore ins-2 1 x 0.12 = 0.12",
                "IMAGE_FEE ap-singapore ins-1,img-win 2 x 0.09 = 0.18 WINDOWS root img-win via img-win",
                "IMAGE_FEE ap-singapore ins-2,img-win 1 x 0.05 = 0.05 WINDOWS root img-win via img-win",
                "total 0.83",
            ],
        ),
        day(
            "Windows is free on the mainland",
            Log::new()
                .start(GZ, t(10, 0), "ins-1", "S5.MEDIUM4", 2, windows())
                .stop(GZ, t(12, 0), "ins-1"),
            &["INSTANCE ap-guangzhou ins-1 2 x 0.10 = 0.20", "total 0.20"],
        ),
        day(
            "a licence is billed by vCPU class, in every region",
            Log::new()
                .start(GZ, t(10, 0), "ins-1", "S5.MEDIUM4", 2, rhel())
                .stop(GZ, t(11, 0), "ins-1")
                .start(GZ, t(10, 0), "ins-2", "S5.4XLARGE32", 16, rhel())
                .stop(GZ, t(11, 0), "ins-2")
                .start(SG, t(10, 0), "ins-3", "S5.LARGE8", 4, rhel())
                .stop(SG, t(11, 0), "ins-3")
                .start(SG, t(10, 0), "ins-4", "S5.LARGE8", 5, rhel())
                .stop(SG, t(11, 0), "ins-4"),
            &[
                "INSTANCE ap-guangzhou ins-1 1 x 0.10 = 0.10",
                "INSTANCE ap-guangzhou ins-2 1 x 0.80 = 0.80",
                "INSTANCE ap-singapore ins-3 1 x 0.24 = 0.24",
                "INSTANCE ap-singapore ins-4 1 x 0.24 = 0.24",
                "IMAGE_FEE ap-guangzhou ins-1,img-rhel 1 x 0.06 = 0.06 LICENSED root img-rhel via img-rhel",
                "IMAGE_FEE ap-guangzhou ins-2,img-rhel 1 x 0.50 = 0.50 LICENSED root img-rhel via img-rhel",
                "IMAGE_FEE ap-singapore ins-3,img-rhel 1 x 0.07 = 0.07 LICENSED root img-rhel via img-rhel",
                "IMAGE_FEE ap-singapore ins-4,img-rhel 1 x 0.15 = 0.15 LICENSED root img-rhel via img-rhel",
                "total 2.16",
            ],
        ),
        Row {
            rule: "snapshot storage on the mainland: 80 GB free per account per region",
            log: Log::new().held(GZ, t(9, 0), 100 * GIB),
            from: t(10, 0),
            to: t(12, 59),
            // 20 GB over the free tier for hours 10, 11 and 12.
            expect: &[
                "SNAPSHOT_STORAGE ap-guangzhou acct-a 60.000000 x 0.001 = 0.06",
                "total 0.06",
            ],
        },
        Row {
            rule: "snapshot storage within the free tier is free",
            log: Log::new().held(GZ, t(9, 0), 80 * GIB),
            from: t(10, 0),
            to: t(12, 59),
            expect: &["total 0.00"],
        },
        Row {
            rule: "the free tier is per region",
            log: Log::new()
                .held(GZ, t(9, 0), 60 * GIB)
                .held(SH, t(9, 0), 60 * GIB),
            from: t(10, 0),
            to: t(12, 59),
            expect: &["total 0.00"],
        },
        Row {
            rule: "snapshot storage overseas has no free tier",
            log: Log::new().held(SG, t(9, 0), 100 * GIB),
            from: t(10, 0),
            to: t(12, 59),
            expect: &[
                "SNAPSHOT_STORAGE ap-singapore acct-a 300.000000 x 0.002 = 0.60",
                "total 0.60",
            ],
        },
        Row {
            rule: "each hour bills the most snapshot data held in it",
            log: Log::new()
                .held(SG, t(10, 0), 10 * GIB)
                .held(SG, t(10, 20), 50 * GIB)
                .held(SG, t(10, 25), 10 * GIB)
                .held(SG, t(13, 0), GIB / 2),
            from: t(10, 0),
            to: t(13, 59),
            // 50 + 10 + 10 + 0.5 GB-hours.
            expect: &[
                "SNAPSHOT_STORAGE ap-singapore acct-a 70.500000 x 0.002 = 0.141",
                "total 0.141",
            ],
        },
        Row {
            rule: "the free tier is taken from each hour's peak",
            log: Log::new()
                .held(GZ, t(10, 0), 70 * GIB)
                .held(GZ, t(10, 30), 90 * GIB)
                .held(GZ, t(10, 31), 70 * GIB),
            from: t(10, 0),
            to: t(11, 59),
            // 10 GB over in hour 10, none in hour 11.
            expect: &[
                "SNAPSHOT_STORAGE ap-guangzhou acct-a 10.000000 x 0.001 = 0.01",
                "total 0.01",
            ],
        },
        day(
            "an image made from an instance of a Windows image bills the Windows fee",
            Log::new()
                .start(
                    SG,
                    t(10, 0),
                    "ins-1",
                    "S5.LARGE8",
                    4,
                    lineage(&[("img-c1", SG, ME), ("img-win", SG, "public")], RootKind::Windows),
                )
                .stop(SG, t(11, 0), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 1 x 0.24 = 0.24",
                "IMAGE_FEE ap-singapore ins-1,img-c1 1 x 0.09 = 0.09 WINDOWS root img-win via img-c1<-img-win",
                "total 0.33",
            ],
        ),
        day(
            "a copy to another region keeps the licence fee of its root",
            Log::new()
                .start(
                    SH,
                    t(10, 0),
                    "ins-1",
                    "S5.LARGE8",
                    4,
                    lineage(
                        &[("img-c2", SH, ME), ("img-c1", GZ, ME), ("img-rhel", GZ, "public")],
                        RootKind::Licensed,
                    ),
                )
                .stop(SH, t(11, 0), "ins-1"),
            &[
                "INSTANCE ap-shanghai ins-1 1 x 0.22 = 0.22",
                "IMAGE_FEE ap-shanghai ins-1,img-c2 1 x 0.06 = 0.06 LICENSED root img-rhel via img-c2<-img-c1<-img-rhel",
                "total 0.28",
            ],
        ),
        day(
            "a Windows lineage launched on the mainland is free there",
            Log::new()
                .start(
                    SH,
                    t(10, 0),
                    "ins-1",
                    "S5.LARGE8",
                    4,
                    lineage(
                        &[("img-c2", SH, ME), ("img-c1", GZ, ME), ("img-win", GZ, "public")],
                        RootKind::Windows,
                    ),
                )
                .stop(SH, t(11, 0), "ins-1"),
            &["INSTANCE ap-shanghai ins-1 1 x 0.22 = 0.22", "total 0.22"],
        ),
        day(
            "a shared image of a paid root bills the launching account",
            Log::new()
                .start(
                    SG,
                    t(10, 0),
                    "ins-1",
                    "S5.MEDIUM4",
                    2,
                    lineage(&[("img-b1", SG, OTHER), ("img-rhel", SG, "public")], RootKind::Licensed),
                )
                .stop(SG, t(11, 0), "ins-1")
                // The owner's own use is the owner's bill, not ours.
                .start_as(OTHER, SG, t(10, 0), "ins-9", "S5.LARGE8", 4, rhel())
                .stop_as(OTHER, SG, t(12, 0), "ins-9"),
            &[
                "INSTANCE ap-singapore ins-1 1 x 0.12 = 0.12",
                "IMAGE_FEE ap-singapore ins-1,img-b1 1 x 0.07 = 0.07 LICENSED root img-rhel via img-b1<-img-rhel",
                "total 0.19",
            ],
        ),
        day(
            "an image made from an instance of a shared image keeps the fee of the root",
            Log::new()
                .start(
                    SG,
                    t(10, 0),
                    "ins-1",
                    "S5.MEDIUM4",
                    2,
                    lineage(
                        &[
                            ("img-a9", SG, ME),
                            ("img-b2", SG, OTHER),
                            ("img-b1", SG, OTHER),
                            ("img-win", SG, "public"),
                        ],
                        RootKind::Windows,
                    ),
                )
                .stop(SG, t(11, 0), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 1 x 0.12 = 0.12",
                "IMAGE_FEE ap-singapore ins-1,img-a9 1 x 0.05 = 0.05 WINDOWS root img-win via img-a9<-img-b2<-img-b1<-img-win",
                "total 0.17",
            ],
        ),
        day(
            "a free lineage is never billed an image fee",
            Log::new()
                .start(
                    SG,
                    t(10, 0),
                    "ins-1",
                    "S5.MEDIUM4",
                    2,
                    lineage(
                        &[
                            ("img-a3", SG, ME),
                            ("img-b2", SG, OTHER),
                            ("img-b1", GZ, OTHER),
                            ("img-ubuntu", GZ, "public"),
                        ],
                        RootKind::Free,
                    ),
                )
                .stop(SG, t(11, 0), "ins-1"),
            &["INSTANCE ap-singapore ins-1 1 x 0.12 = 0.12", "total 0.12"],
        ),
        day(
            "61 minutes from 10:00 bills 2 hours",
            Log::new()
                .start(SG, t(10, 0), "ins-1", "S5.LARGE8", 4, windows())
                .stop(SG, t(11, 1), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 2 x 0.24 = 0.48",
                "IMAGE_FEE ap-singapore ins-1,img-win 2 x 0.09 = 0.18 WINDOWS root img-win via img-win",
                "total 0.66",
            ],
        ),
        day(
            "10:40 to 12:10 bills 3 hours",
            Log::new()
                .start(GZ, t(10, 40), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(12, 10), "ins-1"),
            &["INSTANCE ap-guangzhou ins-1 3 x 0.10 = 0.30", "total 0.30"],
        ),
        day(
            "10:00 to 11:00 bills 1 hour",
            Log::new()
                .start(GZ, t(10, 0), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(11, 0), "ins-1"),
            &["INSTANCE ap-guangzhou ins-1 1 x 0.10 = 0.10", "total 0.10"],
        ),
        day(
            "a launch terminated within its minute bills its hour",
            Log::new()
                .start(SG, t(10, 59), "ins-1", "S5.MEDIUM4", 2, windows())
                .stop(SG, t(10, 59), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 1 x 0.12 = 0.12",
                "IMAGE_FEE ap-singapore ins-1,img-win 1 x 0.05 = 0.05 WINDOWS root img-win via img-win",
                "total 0.17",
            ],
        ),
        Row {
            rule: "usage running at the end of the period bills up to that hour",
            log: Log::new().start(GZ, t(10, 40), "ins-1", "S5.MEDIUM4", 2, rhel()),
            from: t(0, 0),
            to: t(12, 5),
            expect: &[
                "INSTANCE ap-guangzhou ins-1 3 x 0.10 = 0.30",
                "IMAGE_FEE ap-guangzhou ins-1,img-rhel 3 x 0.06 = 0.18 LICENSED root img-rhel via img-rhel",
                "total 0.48",
            ],
        },
        Row {
            rule: "usage begun before the period bills from the period's first hour",
            log: Log::new()
                .start(GZ, t(8, 0), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(12, 30), "ins-1"),
            from: t(10, 0),
            to: t(23, 59),
            expect: &["INSTANCE ap-guangzhou ins-1 3 x 0.10 = 0.30", "total 0.30"],
        },
        Row {
            rule: "events after the end of the period are not yet known",
            log: Log::new()
                .start(GZ, t(10, 0), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(15, 0), "ins-1")
                .start(GZ, t(13, 0), "ins-2", "S5.MEDIUM4", 2, ubuntu()),
            from: t(0, 0),
            to: t(11, 30),
            expect: &["INSTANCE ap-guangzhou ins-1 2 x 0.10 = 0.20", "total 0.20"],
        },
        day(
            "a reset within an hour bills the instance once and each image once",
            Log::new()
                .start(SG, t(10, 0), "ins-1", "S5.LARGE8", 4, windows())
                .reset(SG, t(10, 20), "ins-1", rhel())
                .reset(SG, t(10, 40), "ins-1", windows())
                .reset(SG, t(10, 50), "ins-1", rhel())
                .stop(SG, t(11, 30), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 2 x 0.24 = 0.48",
                "IMAGE_FEE ap-singapore ins-1,img-rhel 2 x 0.07 = 0.14 LICENSED root img-rhel via img-rhel",
                "IMAGE_FEE ap-singapore ins-1,img-win 1 x 0.09 = 0.09 WINDOWS root img-win via img-win",
                "total 0.71",
            ],
        ),
        day(
            "a reset from a paid image to a free one stops the fee",
            Log::new()
                .start(SG, t(10, 0), "ins-1", "S5.MEDIUM4", 2, windows())
                .reset(SG, t(11, 0), "ins-1", ubuntu())
                .stop(SG, t(14, 0), "ins-1"),
            &[
                "INSTANCE ap-singapore ins-1 4 x 0.12 = 0.48",
                "IMAGE_FEE ap-singapore ins-1,img-win 1 x 0.05 = 0.05 WINDOWS root img-win via img-win",
                "total 0.53",
            ],
        ),
        day(
            "an instance started again bills the hours of both runs, each hour once",
            Log::new()
                .start(GZ, t(10, 0), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(10, 20), "ins-1")
                .start(GZ, t(10, 40), "ins-1", "S5.MEDIUM4", 2, ubuntu())
                .stop(GZ, t(11, 10), "ins-1"),
            &["INSTANCE ap-guangzhou ins-1 2 x 0.10 = 0.20", "total 0.20"],
        ),
        day(
            "other accounts' usage is not billed",
            Log::new()
                .start_as(OTHER, SG, t(10, 0), "ins-9", "S5.LARGE8", 4, windows())
                .push(SG, t(10, 0), OTHER, Usage::SnapshotBytesHeld { bytes: 500 * GIB }),
            &["total 0.00"],
        ),
    ]
}

#[test]
fn every_rule() {
    let book = book();
    let mut failures = Vec::new();
    for row in rows() {
        let got = bill(&book, &row.log.events, ME, row.from, row.to)
            .unwrap_or_else(|e| panic!("{}: {e}", row.rule));
        let rendered = render(&got);
        if rendered != row.expect {
            failures.push(format!(
                "{}:\n  expected {:#?}\n  got {:#?}",
                row.rule, row.expect, rendered
            ));
            continue;
        }
        assert!(
            got.anomalies.is_empty(),
            "{}: {:?}",
            row.rule,
            got.anomalies
        );

        // Out of order and twice over: the same bill.
        let mut shuffled = row.log.events.clone();
        shuffled.reverse();
        let mut twice = shuffled.clone();
        twice.extend(row.log.events.iter().cloned());
        let third = twice.len() / 3;
        twice.rotate_left(third);
        let again = bill(&book, &twice, ME, row.from, row.to).expect("bills");
        assert_eq!(again, got, "{}: reordered and repeated", row.rule);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn duplicate_and_out_of_order_events_are_billed_once() {
    let book = book();
    let log = Log::new()
        .start(
            SG,
            t(10, 0),
            "ins-1",
            "S5.LARGE8",
            4,
            public("img-win", RootKind::Windows),
        )
        .stop(SG, t(12, 0), "ins-1")
        .held(SG, t(10, 0), 10 * GIB);
    let mut events = log.events.clone();
    // The termination first, the start twice, the snapshot three times.
    events.reverse();
    events.push(log.events[0].clone());
    events.push(log.events[2].clone());
    events.push(log.events[2].clone());
    let got = bill(&book, &events, ME, t(10, 0), t(11, 59)).expect("bills");
    assert_eq!(
        render(&got),
        [
            "INSTANCE ap-singapore ins-1 2 x 0.24 = 0.48",
            "IMAGE_FEE ap-singapore ins-1,img-win 2 x 0.09 = 0.18 WINDOWS root img-win via img-win",
            "SNAPSHOT_STORAGE ap-singapore acct-a 20.000000 x 0.002 = 0.04",
            "total 0.70",
        ]
    );
    assert!(got.anomalies.is_empty());
}

#[test]
fn a_second_event_with_one_id_but_other_content_is_reported_not_billed() {
    let book = book();
    let log = Log::new()
        .start(
            GZ,
            t(10, 0),
            "ins-1",
            "S5.MEDIUM4",
            2,
            public("img-ubuntu", RootKind::Free),
        )
        .stop(GZ, t(11, 0), "ins-1");
    let mut events = log.events.clone();
    let mut forged = events[1].clone();
    forged.at = t(20, 0);
    events.push(forged);
    let got = bill(&book, &events, ME, t(0, 0), t(23, 59)).expect("bills");
    assert_eq!(got.total.to_string(), "0.10");
    assert_eq!(got.anomalies.len(), 1);
    // Which of the two is kept does not depend on arrival order.
    events.reverse();
    assert_eq!(
        bill(&book, &events, ME, t(0, 0), t(23, 59)).expect("bills"),
        got
    );
}

#[test]
fn events_that_cannot_apply_are_reported() {
    let book = book();
    let log = Log::new().stop(GZ, t(9, 0), "ins-ghost").reset(
        GZ,
        t(9, 0),
        "ins-ghost",
        public("img-rhel", RootKind::Licensed),
    );
    let got = bill(&book, &log.events, ME, t(0, 0), t(23, 59)).expect("bills");
    assert_eq!(got.total.to_string(), "0.00");
    assert_eq!(got.anomalies.len(), 2);
}

#[test]
fn totals_per_kind() {
    let book = book();
    let log = Log::new()
        .start(
            SG,
            t(10, 0),
            "ins-1",
            "S5.LARGE8",
            4,
            public("img-win", RootKind::Windows),
        )
        .stop(SG, t(12, 0), "ins-1")
        .held(SG, t(10, 0), 10 * GIB);
    let got = bill(&book, &log.events, ME, t(10, 0), t(11, 59)).expect("bills");
    use imagefleet_billing::LineKind::*;
    assert_eq!(got.total_of(Instance).to_string(), "0.48");
    assert_eq!(got.total_of(ImageFee).to_string(), "0.18");
    assert_eq!(got.total_of(SnapshotStorage).to_string(), "0.04");
    assert_eq!(got.total.to_string(), "0.70");
    assert_eq!(got.currency, "USD");
    let fee = got.lines_of(ImageFee).next().expect("a fee line");
    assert_eq!(fee.instance_type.as_deref(), Some("S5.LARGE8"));
}

#[test]
fn unpriced_usage_is_an_error_not_a_zero() {
    use imagefleet_billing::RateError;
    let book = book();
    let cases = [
        (
            Log::new().start(
                "ap-tokyo",
                t(10, 0),
                "i",
                "S5.MEDIUM4",
                2,
                public("x", RootKind::Free),
            ),
            RateError::UnknownRegion("ap-tokyo".into()),
        ),
        (
            Log::new().start(
                SH,
                t(10, 0),
                "i",
                "S5.4XLARGE32",
                16,
                public("x", RootKind::Free),
            ),
            RateError::NoInstancePrice {
                region: SH.into(),
                instance_type: "S5.4XLARGE32".into(),
            },
        ),
        (
            Log::new().start(
                SG,
                t(10, 0),
                "i",
                "S5.LARGE8",
                65,
                public("x", RootKind::Licensed),
            ),
            RateError::NoLicenceClass {
                region: SG.into(),
                vcpu: 65,
            },
        ),
    ];
    for (log, expected) in cases {
        assert_eq!(
            bill(&book, &log.events, ME, t(0, 0), t(23, 59)),
            Err(expected)
        );
    }
    assert_eq!(
        bill(&book, &[], ME, t(2, 0), t(1, 0)),
        Err(RateError::Period {
            from: t(2, 0),
            to: t(1, 0)
        })
    );
}
