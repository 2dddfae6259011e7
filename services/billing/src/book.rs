//! The price book: every price the rating engine uses, read from a TOML file.
//!
//! The library holds no prices; it holds the rules (what is billed, when, and which price
//! applies). The book is validated as a whole when it is read, so a book that loads prices
//! everything it names: an overseas region prices Windows for each of its instance types, the
//! licence classes of a region are ordered ranges, no price is negative. The file format is
//! documented key by key in `docs/billing.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::money::{Money, MoneyError};

/// The text of the shipped book, `deploy/price-book.toml`.
pub const SHIPPED_BOOK: &str = include_str!("../../../deploy/price-book.toml");

/// Bytes in the GB of "GB-hour" and of the free tier: a GiB, 2^30 bytes, the unit the
/// project uses for every disk and image size.
pub const BYTES_PER_GB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum BookError {
    /// Not TOML, a key the format does not have, or a value of the wrong type (a price must
    /// be a string: prices never pass through a float).
    #[error("price book: {0}")]
    Toml(String),
    #[error("price book {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A required key is absent; `region` names the region section it is missing from.
    #[error("price book: {}missing key `{key}`", region_prefix(.region))]
    MissingKey {
        region: Option<String>,
        key: &'static str,
    },
    #[error("price book: currency {0:?} is not a three-letter upper-case code")]
    Currency(String),
    #[error("price book: no region is priced")]
    NoRegions,
    #[error("price book: {0:?} is not a region name")]
    RegionName(String),
    #[error("price book: region {region}: `{key}`: {source}")]
    Price {
        region: String,
        key: String,
        source: MoneyError,
    },
    #[error("price book: region {region}: `{key}` is negative ({amount})")]
    NegativePrice {
        region: String,
        key: String,
        amount: Money,
    },
    #[error("price book: region {region}: `{key}`: {message}")]
    Invalid {
        region: String,
        key: String,
        message: String,
    },
    /// The book lacks a region that the caller needs priced.
    #[error("price book: no section for region {0}")]
    MissingRegion(String),
    /// A region of the book lacks an instance type that the caller needs priced.
    #[error("price book: region {region}: no price for instance type {instance_type}")]
    MissingInstanceType {
        region: String,
        instance_type: String,
    },
}

fn region_prefix(region: &Option<String>) -> String {
    match region {
        Some(r) => format!("region {r}: "),
        None => String::new(),
    }
}

/// A licence price band: instances with `min_vcpu..=max_vcpu` vCPUs pay `price` per hour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LicenceClass {
    pub min_vcpu: u32,
    pub max_vcpu: u32,
    pub price: Money,
}

/// The prices of one region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionPrices {
    mainland: bool,
    instance_hour: BTreeMap<String, Money>,
    windows_hour: BTreeMap<String, Money>,
    licence_classes: Vec<LicenceClass>,
    snapshot_gb_hour: Money,
    free_tier_gb: u64,
}

impl RegionPrices {
    /// Whether the region is in mainland China (Windows free, snapshot free tier).
    pub fn is_mainland(&self) -> bool {
        self.mainland
    }

    /// The price of one instance-hour of a type, if the region offers the type.
    pub fn instance_hour(&self, instance_type: &str) -> Option<Money> {
        self.instance_hour.get(instance_type).copied()
    }

    /// Every instance type the region prices, with its hourly price, by name.
    pub fn instance_prices(&self) -> &BTreeMap<String, Money> {
        &self.instance_hour
    }

    /// The Windows fee per instance-hour of a type: `Some(0)` on the mainland, where Windows
    /// is free; `None` for a type the region does not price.
    pub fn windows_hour(&self, instance_type: &str) -> Option<Money> {
        if self.mainland {
            return self.instance_hour.get(instance_type).map(|_| Money::ZERO);
        }
        self.windows_hour.get(instance_type).copied()
    }

    /// The Windows prices the book lists (empty on the mainland).
    pub fn windows_prices(&self) -> &BTreeMap<String, Money> {
        &self.windows_hour
    }

    /// The licence class an instance with `vcpu` vCPUs falls in, if any.
    pub fn licence_class(&self, vcpu: u32) -> Option<&LicenceClass> {
        self.licence_classes.iter().find(|c| vcpu <= c.max_vcpu)
    }

    /// The licence fee per instance-hour for `vcpu` vCPUs.
    pub fn licence_hour(&self, vcpu: u32) -> Option<Money> {
        self.licence_class(vcpu).map(|c| c.price)
    }

    pub fn licence_classes(&self) -> &[LicenceClass] {
        &self.licence_classes
    }

    /// The price of holding one GB ([`BYTES_PER_GB`]) of snapshot data for one hour.
    pub fn snapshot_gb_hour(&self) -> Money {
        self.snapshot_gb_hour
    }

    /// GB of snapshot data an account holds free in this region (0 overseas).
    pub fn free_tier_gb(&self) -> u64 {
        self.free_tier_gb
    }

    /// The free tier in bytes.
    pub fn free_tier_bytes(&self) -> u64 {
        // Checked when the book was read.
        self.free_tier_gb.saturating_mul(BYTES_PER_GB)
    }
}

/// Every price, by region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PriceBook {
    currency: String,
    regions: BTreeMap<String, RegionPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBook {
    currency: Option<String>,
    regions: Option<BTreeMap<String, RawRegion>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    mainland: Option<bool>,
    instance_hour: Option<BTreeMap<String, String>>,
    windows_hour: Option<BTreeMap<String, String>>,
    licence_hour: Option<Vec<RawLicenceClass>>,
    snapshot_gb_hour: Option<String>,
    free_tier_gb: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLicenceClass {
    max_vcpu: Option<u32>,
    price: Option<String>,
}

fn price(region: &str, key: String, text: &str) -> Result<Money, BookError> {
    let amount = Money::parse(text).map_err(|source| BookError::Price {
        region: region.to_string(),
        key: key.clone(),
        source,
    })?;
    if amount.is_negative() {
        return Err(BookError::NegativePrice {
            region: region.to_string(),
            key,
            amount,
        });
    }
    Ok(amount)
}

fn missing(region: &str, key: &'static str) -> BookError {
    BookError::MissingKey {
        region: Some(region.to_string()),
        key,
    }
}

fn invalid(region: &str, key: impl Into<String>, message: impl Into<String>) -> BookError {
    BookError::Invalid {
        region: region.to_string(),
        key: key.into(),
        message: message.into(),
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
}

fn region_prices(name: &str, raw: RawRegion) -> Result<RegionPrices, BookError> {
    let mainland = raw.mainland.ok_or_else(|| missing(name, "mainland"))?;

    let raw_instances = raw
        .instance_hour
        .ok_or_else(|| missing(name, "instance_hour"))?;
    if raw_instances.is_empty() {
        return Err(invalid(name, "instance_hour", "prices no instance type"));
    }
    let mut instance_hour = BTreeMap::new();
    for (instance_type, text) in &raw_instances {
        if !valid_name(instance_type) {
            return Err(invalid(
                name,
                format!("instance_hour.{instance_type}"),
                "not an instance type name",
            ));
        }
        let amount = price(name, format!("instance_hour.{instance_type}"), text)?;
        instance_hour.insert(instance_type.clone(), amount);
    }

    let mut windows_hour = BTreeMap::new();
    match raw.windows_hour {
        Some(raw_windows) if mainland => {
            if !raw_windows.is_empty() {
                return Err(invalid(
                    name,
                    "windows_hour",
                    "a mainland region prices no Windows: Windows is free there",
                ));
            }
        }
        Some(raw_windows) => {
            for (instance_type, text) in &raw_windows {
                let key = format!("windows_hour.{instance_type}");
                if !instance_hour.contains_key(instance_type) {
                    return Err(invalid(
                        name,
                        key,
                        "names an instance type that `instance_hour` does not price",
                    ));
                }
                let amount = price(name, key, text)?;
                windows_hour.insert(instance_type.clone(), amount);
            }
        }
        None if mainland => {}
        None => return Err(missing(name, "windows_hour")),
    }
    if !mainland {
        if let Some(unpriced) = instance_hour
            .keys()
            .find(|t| !windows_hour.contains_key(*t))
        {
            return Err(invalid(
                name,
                format!("windows_hour.{unpriced}"),
                "missing: an overseas region prices Windows for every instance type it offers",
            ));
        }
    }

    let raw_classes = raw
        .licence_hour
        .ok_or_else(|| missing(name, "licence_hour"))?;
    if raw_classes.is_empty() {
        return Err(invalid(name, "licence_hour", "defines no licence class"));
    }
    let mut licence_classes: Vec<LicenceClass> = Vec::with_capacity(raw_classes.len());
    for (index, class) in raw_classes.into_iter().enumerate() {
        let key = format!("licence_hour[{index}]");
        let max_vcpu = class
            .max_vcpu
            .ok_or_else(|| missing(name, "licence_hour.max_vcpu"))?;
        let text = class
            .price
            .ok_or_else(|| missing(name, "licence_hour.price"))?;
        let amount = price(name, format!("{key}.price"), &text)?;
        let min_vcpu = match licence_classes.last() {
            Some(previous) if max_vcpu <= previous.max_vcpu => {
                return Err(invalid(
                    name,
                    format!("{key}.max_vcpu"),
                    format!(
                        "{max_vcpu} does not exceed the previous class's {}: classes go up in vCPUs",
                        previous.max_vcpu
                    ),
                ));
            }
            Some(previous) => previous.max_vcpu + 1,
            None if max_vcpu == 0 => {
                return Err(invalid(
                    name,
                    format!("{key}.max_vcpu"),
                    "must be at least 1",
                ));
            }
            None => 1,
        };
        licence_classes.push(LicenceClass {
            min_vcpu,
            max_vcpu,
            price: amount,
        });
    }

    let snapshot_text = raw
        .snapshot_gb_hour
        .ok_or_else(|| missing(name, "snapshot_gb_hour"))?;
    let snapshot_gb_hour = price(name, "snapshot_gb_hour".to_string(), &snapshot_text)?;

    let free_tier_gb = raw.free_tier_gb.unwrap_or(0);
    if !mainland && free_tier_gb != 0 {
        return Err(invalid(
            name,
            "free_tier_gb",
            "overseas regions have no snapshot free tier",
        ));
    }
    if free_tier_gb.checked_mul(BYTES_PER_GB).is_none() {
        return Err(invalid(name, "free_tier_gb", "too large"));
    }

    Ok(RegionPrices {
        mainland,
        instance_hour,
        windows_hour,
        licence_classes,
        snapshot_gb_hour,
        free_tier_gb,
    })
}

impl PriceBook {
    /// Reads and validates a book (format: `docs/billing.md`).
    pub fn from_toml(text: &str) -> Result<PriceBook, BookError> {
        let raw: RawBook = toml::from_str(text).map_err(|e| BookError::Toml(e.to_string()))?;
        let currency = raw.currency.ok_or(BookError::MissingKey {
            region: None,
            key: "currency",
        })?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(BookError::Currency(currency));
        }
        let raw_regions = raw.regions.ok_or(BookError::MissingKey {
            region: None,
            key: "regions",
        })?;
        if raw_regions.is_empty() {
            return Err(BookError::NoRegions);
        }
        let mut regions = BTreeMap::new();
        for (name, raw_region) in raw_regions {
            if !valid_name(&name) {
                return Err(BookError::RegionName(name));
            }
            let prices = region_prices(&name, raw_region)?;
            regions.insert(name, prices);
        }
        Ok(PriceBook { currency, regions })
    }

    /// The book shipped with imagefleet, `deploy/price-book.toml`, built into the binary: the
    /// default when no book file is given. Its prices stay in that file.
    pub fn shipped() -> PriceBook {
        PriceBook::from_toml(SHIPPED_BOOK)
            .expect("deploy/price-book.toml is valid (checked by the crate's tests)")
    }

    /// Reads a book from a file.
    pub fn load(path: impl AsRef<Path>) -> Result<PriceBook, BookError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| BookError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        PriceBook::from_toml(&text)
    }

    /// The ISO 4217 code every amount of the book is in.
    pub fn currency(&self) -> &str {
        &self.currency
    }

    pub fn region(&self, name: &str) -> Option<&RegionPrices> {
        self.regions.get(name)
    }

    /// Every region, by name.
    pub fn regions(&self) -> impl Iterator<Item = (&str, &RegionPrices)> {
        self.regions
            .iter()
            .map(|(name, prices)| (name.as_str(), prices))
    }

    /// Checks that the book prices every one of `regions` and, in each, every one of
    /// `instance_types`: what a service calls at start-up with the regions and types it
    /// serves, so that a gap in the book is found before a bill is.
    pub fn check_covers(&self, regions: &[&str], instance_types: &[&str]) -> Result<(), BookError> {
        for &region in regions {
            let prices = self
                .regions
                .get(region)
                .ok_or_else(|| BookError::MissingRegion(region.to_string()))?;
            for &instance_type in instance_types {
                if prices.instance_hour(instance_type).is_none()
                    || prices.windows_hour(instance_type).is_none()
                {
                    return Err(BookError::MissingInstanceType {
                        region: region.to_string(),
                        instance_type: instance_type.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}
