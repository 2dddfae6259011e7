//! Reading price books: the shipped default, and one row per way a book can be wrong.

mod common;

use imagefleet_billing::{BookError, MoneyError, PriceBook, BYTES_PER_GB};

fn default_book_path() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/price-book.toml")
}

/// The instance types the region catalogue lists (`services/region/src/catalogue.rs`).
const CATALOGUE_TYPES: &[&str] = &[
    "S5.SMALL1",
    "S5.SMALL2",
    "S5.MEDIUM2",
    "S5.MEDIUM4",
    "S5.LARGE8",
    "S5.2XLARGE16",
    "S5.4XLARGE32",
    "SA2.MEDIUM4",
    "SA2.LARGE8",
    "M5.LARGE32",
    "C5.LARGE8",
];

#[test]
fn the_shipped_book_is_the_default_file() {
    let file = PriceBook::load(default_book_path()).expect("deploy/price-book.toml loads");
    assert_eq!(PriceBook::shipped(), file);
}

#[test]
fn the_default_book_prices_the_fleet() {
    let book = PriceBook::load(default_book_path()).expect("deploy/price-book.toml loads");
    assert_eq!(book.currency(), "USD");
    let regions: Vec<&str> = book.regions().map(|(name, _)| name).collect();
    assert_eq!(regions, ["ap-guangzhou", "ap-shanghai", "ap-singapore"]);

    for (name, prices) in book.regions() {
        for instance_type in ["S5.MEDIUM4", "S5.LARGE8"] {
            let price = prices
                .instance_hour(instance_type)
                .unwrap_or_else(|| panic!("{name} prices {instance_type}"));
            assert!(!price.is_zero(), "{name} {instance_type}");
        }
        assert!(
            prices.licence_hour(16).is_some(),
            "{name}: a licence class for 16 vCPUs"
        );
        assert!(!prices.snapshot_gb_hour().is_zero(), "{name}");
    }
    for mainland in ["ap-guangzhou", "ap-shanghai"] {
        let prices = book.region(mainland).expect("present");
        assert!(prices.is_mainland());
        assert_eq!(prices.free_tier_gb(), 80);
        assert_eq!(prices.free_tier_bytes(), 80 * BYTES_PER_GB);
        assert!(prices
            .windows_hour("S5.MEDIUM4")
            .expect("offered")
            .is_zero());
    }
    let singapore = book.region("ap-singapore").expect("present");
    assert!(!singapore.is_mainland());
    assert_eq!(singapore.free_tier_gb(), 0);
    for instance_type in ["S5.MEDIUM4", "S5.LARGE8"] {
        let windows = singapore
            .windows_hour(instance_type)
            .unwrap_or_else(|| panic!("Windows on {instance_type}"));
        assert!(!windows.is_zero(), "Windows on {instance_type}");
    }
    book.check_covers(
        &["ap-guangzhou", "ap-shanghai", "ap-singapore"],
        CATALOGUE_TYPES,
    )
    .expect("every catalogue type is priced in every region");
}

/// A valid book of one overseas and one mainland region, with `{..}` markers to edit.
const BASE: &str = r#"
currency = "USD"
{TOP}

[regions.ap-singapore]
mainland = false
snapshot_gb_hour = "0.002"
{SG}

[regions.ap-singapore.instance_hour]
"S5.MEDIUM4" = "0.12"
"S5.LARGE8" = "0.24"

[regions.ap-singapore.windows_hour]
"S5.MEDIUM4" = "0.05"
{SG_WINDOWS}

[[regions.ap-singapore.licence_hour]]
max_vcpu = 4
price = "0.07"
{SG_CLASS}

[regions.ap-guangzhou]
{GZ_MAINLAND}
snapshot_gb_hour = "0.001"
free_tier_gb = 80

[regions.ap-guangzhou.instance_hour]
"S5.MEDIUM4" = "{GZ_PRICE}"

{GZ_WINDOWS}

[[regions.ap-guangzhou.licence_hour]]
max_vcpu = 4
price = "0.06"
"#;

fn book_with(edits: &[(&str, &str)]) -> String {
    let mut text = BASE.to_string();
    for (marker, value) in edits {
        text = text.replace(marker, value);
    }
    let defaults = [
        ("{TOP}", ""),
        ("{SG}", ""),
        ("{SG_WINDOWS}", "\"S5.LARGE8\" = \"0.09\""),
        ("{SG_CLASS}", ""),
        ("{GZ_MAINLAND}", "mainland = true"),
        ("{GZ_PRICE}", "0.10"),
        ("{GZ_WINDOWS}", ""),
    ];
    for (marker, value) in defaults {
        text = text.replace(marker, value);
    }
    text
}

#[test]
fn the_base_book_is_valid() {
    let book = PriceBook::from_toml(&book_with(&[])).expect("valid");
    assert_eq!(
        book.region("ap-singapore")
            .and_then(|r| r.windows_hour("S5.LARGE8"))
            .map(|m| m.to_string()),
        Some("0.09".to_string())
    );
    let classes = book
        .region("ap-singapore")
        .expect("present")
        .licence_classes();
    assert_eq!((classes[0].min_vcpu, classes[0].max_vcpu), (1, 4));
}

#[test]
fn wrong_books_are_refused_with_a_clear_error() {
    type Check = fn(&BookError) -> bool;
    let rows: Vec<(&str, String, Check, &str)> = vec![
        (
            "an unknown top-level key",
            book_with(&[("{TOP}", "colour = \"blue\"")]),
            |e| matches!(e, BookError::Toml(_)),
            "unknown field `colour`",
        ),
        (
            "an unknown key in a region",
            book_with(&[("{SG}", "snapshot_price = \"0.1\"")]),
            |e| matches!(e, BookError::Toml(_)),
            "unknown field `snapshot_price`",
        ),
        (
            "an unknown key in a licence class",
            book_with(&[(
                "{SG_CLASS}",
                "[[regions.ap-singapore.licence_hour]]\nmax_vcpu = 8\nprice = \"0.1\"\nmin_vcpu = 5",
            )]),
            |e| matches!(e, BookError::Toml(_)),
            "unknown field `min_vcpu`",
        ),
        (
            "a negative price",
            book_with(&[("{GZ_PRICE}", "-0.10")]),
            |e| {
                matches!(e, BookError::NegativePrice { region, key, .. }
                    if region == "ap-guangzhou" && key == "instance_hour.S5.MEDIUM4")
            },
            "region ap-guangzhou: `instance_hour.S5.MEDIUM4` is negative (-0.10)",
        ),
        (
            "a price written as a float",
            book_with(&[("\"{GZ_PRICE}\"", "0.10")]),
            |e| matches!(e, BookError::Toml(_)),
            "invalid type",
        ),
        (
            "a price with more than six decimals",
            book_with(&[("{GZ_PRICE}", "0.0000001")]),
            |e| {
                matches!(e, BookError::Price { source: MoneyError::TooPrecise(_), region, .. }
                    if region == "ap-guangzhou")
            },
            "more than 6 decimal places",
        ),
        (
            "a price that is not a number",
            book_with(&[("{GZ_PRICE}", "ten cents")]),
            |e| matches!(e, BookError::Price { source: MoneyError::Malformed(_), .. }),
            "not a decimal amount",
        ),
        (
            "a region without `mainland`",
            book_with(&[("{GZ_MAINLAND}", "")]),
            |e| {
                matches!(e, BookError::MissingKey { region: Some(r), key: "mainland" }
                    if r == "ap-guangzhou")
            },
            "region ap-guangzhou: missing key `mainland`",
        ),
        (
            "no currency",
            book_with(&[("currency = \"USD\"", "")]),
            |e| {
                matches!(
                    e,
                    BookError::MissingKey {
                        region: None,
                        key: "currency"
                    }
                )
            },
            "missing key `currency`",
        ),
        (
            "a currency that is not a code",
            book_with(&[("currency = \"USD\"", "currency = \"usd\"")]),
            |e| matches!(e, BookError::Currency(_)),
            "three-letter",
        ),
        (
            "Windows prices in a mainland region",
            book_with(&[(
                "{GZ_WINDOWS}",
                "[regions.ap-guangzhou.windows_hour]\n\"S5.MEDIUM4\" = \"0.05\"",
            )]),
            |e| matches!(e, BookError::Invalid { region, .. } if region == "ap-guangzhou"),
            "Windows is free there",
        ),
        (
            "an overseas region without a Windows price for one of its types",
            book_with(&[("{SG_WINDOWS}", "")]),
            |e| {
                matches!(e, BookError::Invalid { region, key, .. }
                    if region == "ap-singapore" && key == "windows_hour.S5.LARGE8")
            },
            "region ap-singapore: `windows_hour.S5.LARGE8`",
        ),
        (
            "a Windows price for a type the region does not offer",
            book_with(&[(
                "{SG_WINDOWS}",
                "\"S5.LARGE8\" = \"0.09\"\n\"S5.HUGE\" = \"1\"",
            )]),
            |e| matches!(e, BookError::Invalid { key, .. } if key == "windows_hour.S5.HUGE"),
            "does not price",
        ),
        (
            "licence classes that do not go up",
            book_with(&[(
                "{SG_CLASS}",
                "[[regions.ap-singapore.licence_hour]]\nmax_vcpu = 4\nprice = \"0.1\"",
            )]),
            |e| matches!(e, BookError::Invalid { key, .. } if key == "licence_hour[1].max_vcpu"),
            "classes go up",
        ),
        (
            "a licence class without a price",
            book_with(&[(
                "{SG_CLASS}",
                "[[regions.ap-singapore.licence_hour]]\nmax_vcpu = 8",
            )]),
            |e| {
                matches!(e, BookError::MissingKey { region: Some(r), key: "licence_hour.price" }
                    if r == "ap-singapore")
            },
            "region ap-singapore: missing key `licence_hour.price`",
        ),
        (
            "a free tier overseas",
            book_with(&[("{SG}", "free_tier_gb = 80")]),
            |e| matches!(e, BookError::Invalid { key, .. } if key == "free_tier_gb"),
            "no snapshot free tier",
        ),
        (
            "no regions",
            "currency = \"USD\"\n[regions]\n".to_string(),
            |e| matches!(e, BookError::NoRegions),
            "no region",
        ),
        (
            "not TOML",
            "currency = \n".to_string(),
            |e| matches!(e, BookError::Toml(_)),
            "price book",
        ),
    ];
    for (what, text, check, message) in rows {
        match PriceBook::from_toml(&text) {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => {
                assert!(check(&e), "{what}: {e:?}");
                assert!(
                    e.to_string().contains(message),
                    "{what}: {e} does not say {message:?}"
                );
            }
        }
    }
}

#[test]
fn a_missing_region_or_type_is_named() {
    let book = PriceBook::from_toml(&book_with(&[])).expect("valid");
    let err = book
        .check_covers(&["ap-singapore", "ap-tokyo"], &["S5.MEDIUM4"])
        .expect_err("tokyo is not priced");
    assert!(matches!(&err, BookError::MissingRegion(r) if r == "ap-tokyo"));
    assert_eq!(
        err.to_string(),
        "price book: no section for region ap-tokyo"
    );
    let err = book
        .check_covers(&["ap-singapore", "ap-guangzhou"], &["S5.LARGE8"])
        .expect_err("guangzhou does not price S5.LARGE8");
    assert_eq!(
        err.to_string(),
        "price book: region ap-guangzhou: no price for instance type S5.LARGE8"
    );
    book.check_covers(&["ap-singapore", "ap-guangzhou"], &["S5.MEDIUM4"])
        .expect("covered");
}

#[test]
fn a_missing_file_names_it() {
    let err = PriceBook::load("/nonexistent/price-book.toml").expect_err("no file");
    assert!(matches!(err, BookError::Io { .. }));
    assert!(err.to_string().contains("/nonexistent/price-book.toml"));
}

#[test]
fn the_test_book_is_valid() {
    common::book();
}
