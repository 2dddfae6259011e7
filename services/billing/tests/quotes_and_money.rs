//! Quotes (instances and snapshot data) agree with bills; money is exact and refuses overflow.

mod common;

use common::*;
use imagefleet_billing::{
    bill, quote, snapshot_quote, LineageLink, Money, MoneyError, PriceBook, RateError, RootKind,
};

fn win_chain() -> Vec<LineageLink> {
    vec![
        LineageLink::new("img-c1").at(SG, ME),
        LineageLink::new("img-win").at(SG, "public"),
    ]
}

/// (region, type, vcpu, count, hours, root, instance amount, fee amount or "-", total)
type QuoteRow = (
    &'static str,
    &'static str,
    u32,
    u32,
    u64,
    RootKind,
    &'static str,
    &'static str,
    &'static str,
);

#[test]
fn instance_quotes() {
    let book = book();
    let rows: &[QuoteRow] = &[
        (
            SG,
            "S5.LARGE8",
            4,
            3,
            10,
            RootKind::Windows,
            "7.20",
            "2.70",
            "9.90",
        ),
        (
            GZ,
            "S5.LARGE8",
            4,
            3,
            10,
            RootKind::Windows,
            "6.00",
            "-",
            "6.00",
        ),
        (
            SG,
            "S5.MEDIUM4",
            2,
            1,
            1,
            RootKind::Free,
            "0.12",
            "-",
            "0.12",
        ),
        (
            GZ,
            "S5.4XLARGE32",
            16,
            2,
            5,
            RootKind::Licensed,
            "8.00",
            "5.00",
            "13.00",
        ),
        (
            SG,
            "S5.LARGE8",
            8,
            1,
            2,
            RootKind::Licensed,
            "0.48",
            "0.30",
            "0.78",
        ),
        (
            SG,
            "S5.LARGE8",
            4,
            0,
            10,
            RootKind::Windows,
            "0.00",
            "0.00",
            "0.00",
        ),
    ];
    for &(region, instance_type, vcpu, count, hours, root, instance, fee, total) in rows {
        let what = format!("{region} {count}x{instance_type} {hours}h {root:?}");
        let q = quote(
            &book,
            region,
            instance_type,
            vcpu,
            count,
            hours,
            root,
            &win_chain(),
        )
        .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(q.instance.amount.to_string(), instance, "{what}");
        let got_fee = q
            .image_fee
            .as_ref()
            .map_or("-".to_string(), |f| f.part.amount.to_string());
        assert_eq!(got_fee, fee, "{what}");
        assert_eq!(q.total.to_string(), total, "{what}");
        assert_eq!(q.currency, "USD");
        if let Some(f) = &q.image_fee {
            assert_eq!(f.cause, root);
            assert_eq!(f.root_image_id.as_deref(), Some("img-win"));
            assert_eq!(f.chain, win_chain());
        }
    }
}

#[test]
fn a_quote_agrees_with_the_bill_of_the_same_use() {
    let book = book();
    let q = quote(
        &book,
        SG,
        "S5.LARGE8",
        4,
        1,
        5,
        RootKind::Windows,
        &win_chain(),
    )
    .expect("quote");
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
        .stop(SG, t(15, 0), "ins-1");
    let b = bill(&book, &log.events, ME, t(0, 0), t(23, 59)).expect("bill");
    assert_eq!(b.total, q.total);

    let sq = snapshot_quote(&book, SG, 10 * GIB, 5).expect("quote");
    let log = Log::new().held(SG, t(10, 0), 10 * GIB);
    let b = bill(&book, &log.events, ME, t(10, 0), t(14, 59)).expect("bill");
    assert_eq!(b.total, sq.amount);
}

#[test]
fn snapshot_quotes() {
    let book = book();
    // (region, bytes held, hours, billable bytes, GB-hours, amount)
    let rows: &[(&str, u64, u64, u64, &str, &str)] = &[
        (GZ, 100 * GIB, 10, 20 * GIB, "200.000000", "0.20"),
        (GZ, 80 * GIB, 10, 0, "0.000000", "0.00"),
        (GZ, 10 * GIB, 10, 0, "0.000000", "0.00"),
        (SG, 100 * GIB, 10, 100 * GIB, "1000.000000", "2.00"),
        (SG, GIB + GIB / 2, 1, GIB + GIB / 2, "1.500000", "0.003"),
        // 1 byte for an hour: 0.002 * 2^-30, rounds to nothing.
        (SG, 1, 1, 1, "0.000000", "0.00"),
    ];
    for &(region, bytes, hours, billable, gb_hours, amount) in rows {
        let what = format!("{region} {bytes} bytes {hours}h");
        let q =
            snapshot_quote(&book, region, bytes, hours).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(q.billable_bytes, billable, "{what}");
        assert_eq!(q.quantity.to_string(), gb_hours, "{what}");
        assert_eq!(q.amount.to_string(), amount, "{what}");
    }
}

#[test]
fn quotes_refuse_what_the_book_does_not_price() {
    let book = book();
    assert_eq!(
        quote(&book, "ap-tokyo", "S5.LARGE8", 4, 1, 1, RootKind::Free, &[]),
        Err(RateError::UnknownRegion("ap-tokyo".into()))
    );
    assert_eq!(
        quote(&book, SG, "S5.HUGE", 4, 1, 1, RootKind::Free, &[]),
        Err(RateError::NoInstancePrice {
            region: SG.into(),
            instance_type: "S5.HUGE".into()
        })
    );
    assert_eq!(
        quote(&book, GZ, "S5.LARGE8", 65, 1, 1, RootKind::Licensed, &[]),
        Err(RateError::NoLicenceClass {
            region: GZ.into(),
            vcpu: 65
        })
    );
    assert_eq!(
        quote(
            &book,
            SG,
            "S5.LARGE8",
            4,
            u32::MAX,
            u64::MAX,
            RootKind::Free,
            &[]
        ),
        Err(RateError::Overflow)
    );
    assert_eq!(
        snapshot_quote(&book, "ap-tokyo", 1, 1),
        Err(RateError::UnknownRegion("ap-tokyo".into()))
    );
}

#[test]
fn money_is_exact() {
    let cent = Money::parse("0.01").expect("parses");
    let micro = Money::parse("0.000001").expect("parses");
    // A million micro-units are exactly one unit; a hundred cents too.
    assert_eq!(
        Money::sum(std::iter::repeat_n(micro, 1_000_000))
            .expect("sums")
            .to_string(),
        "1.00"
    );
    assert_eq!(
        Money::sum(std::iter::repeat_n(cent, 100))
            .expect("sums")
            .to_string(),
        "1.00"
    );
    // The float classic: 0.1 + 0.2 is 0.3.
    let sum = Money::parse("0.1")
        .and_then(|a| a.checked_add(Money::parse("0.2")?))
        .expect("adds");
    assert_eq!(sum, Money::parse("0.3").expect("parses"));
    // 0.0095 an hour for 8760 hours.
    assert_eq!(
        Money::parse("0.0095")
            .and_then(|m| m.checked_mul(8760))
            .expect("multiplies")
            .to_string(),
        "83.22"
    );
}

#[test]
fn money_refuses_overflow() {
    let max = Money::from_micros(i64::MAX);
    assert_eq!(
        max.checked_add(Money::from_micros(1)),
        Err(MoneyError::Overflow)
    );
    assert_eq!(
        Money::from_micros(i64::MIN).checked_sub(Money::from_micros(1)),
        Err(MoneyError::Overflow)
    );
    assert_eq!(max.checked_mul(2), Err(MoneyError::Overflow));
    assert_eq!(
        Money::from_micros(1).checked_mul(u64::MAX),
        Err(MoneyError::Overflow)
    );
    assert_eq!(
        Money::sum([max, Money::from_micros(1)]),
        Err(MoneyError::Overflow)
    );

    // A bill whose amounts overflow is an error, not a wrapped total.
    let text = BOOK.replace(
        "\"S5.MEDIUM4\" = \"0.12\"",
        "\"S5.MEDIUM4\" = \"9000000000000\"",
    );
    let book = PriceBook::from_toml(&text).expect("valid");
    let log = Log::new().start(
        SG,
        t(0, 0),
        "ins-1",
        "S5.MEDIUM4",
        2,
        public("img", RootKind::Free),
    );
    assert_eq!(
        bill(&book, &log.events, ME, t(0, 0), t(23, 0)),
        Err(RateError::Overflow)
    );
    // Two lines that fit alone but not together.
    let text = BOOK.replace(
        "\"S5.MEDIUM4\" = \"0.12\"",
        "\"S5.MEDIUM4\" = \"5000000000000\"",
    );
    let book = PriceBook::from_toml(&text).expect("valid");
    let log = Log::new()
        .start(
            SG,
            t(0, 0),
            "ins-1",
            "S5.MEDIUM4",
            2,
            public("img", RootKind::Free),
        )
        .stop(SG, t(0, 30), "ins-1")
        .start(
            SG,
            t(0, 0),
            "ins-2",
            "S5.MEDIUM4",
            2,
            public("img", RootKind::Free),
        )
        .stop(SG, t(0, 30), "ins-2");
    assert_eq!(
        bill(&book, &log.events, ME, t(0, 0), t(0, 59)),
        Err(RateError::Overflow)
    );
}
