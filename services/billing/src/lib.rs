//! Billing: the price book, the rating engine, the usage store and the billing services.
//!
//! The rules are pure logic (their only I/O is reading the price-book file):
//!
//! - [`PriceBook`] (`book`): every price, by region, read from TOML (`docs/billing.md`,
//!   `deploy/price-book.toml`). The library holds rules, never prices.
//! - [`Money`] (`money`): exact fixed-point amounts in micro-units; checked arithmetic.
//! - [`UsageEvent`] (`usage`): what regions report: instances started, reset and terminated,
//!   snapshot bytes held; each with a fleet-unique id for idempotent storage.
//! - [`bill`] (`rating`): an account's bill for a period from its usage events.
//! - [`quote`] and [`snapshot_quote`] (`quote`): prices of a launch or of held snapshot data.
//!
//! Around them, what the catalog process serves (`docs/billing.md`, "The service"):
//!
//! - `convert`: the billing API's messages to and from these types, refusing malformed input.
//! - `store` ([`EventStore`]): the reported usage events in SQLite, each once by
//!   `(region, seq)`.
//! - `service` ([`Billing`], [`BillingApi`]): `BillingService` and `BillingInternalService`.
//!
//! Rating is deterministic: the same book and the same set of events (in any order, with any
//! repeats) give the same bill.
//!
//! ```
//! use imagefleet_billing::{bill, quote, EventId, ImageCharge, PriceBook, RootKind, Usage, UsageEvent};
//!
//! let book = PriceBook::from_toml(r#"
//!     currency = "USD"
//!     [regions.ap-singapore]
//!     mainland = false
//!     snapshot_gb_hour = "0.000075"
//!     [regions.ap-singapore.instance_hour]
//!     "S5.LARGE8" = "0.0728"
//!     [regions.ap-singapore.windows_hour]
//!     "S5.LARGE8" = "0.0368"
//!     [[regions.ap-singapore.licence_hour]]
//!     max_vcpu = 128
//!     price = "0.30"
//! "#)?;
//! let event = |seq, at, usage| UsageEvent {
//!     id: EventId { region: "ap-singapore".into(), seq },
//!     at,
//!     account: "acct-1".into(),
//!     usage,
//! };
//! let ten = 1_764_583_200; // 2025-12-01 10:00 UTC
//! let events = [
//!     event(1, ten + 40 * 60, Usage::InstanceStarted {
//!         instance_id: "ins-1".into(),
//!         instance_type: "S5.LARGE8".into(),
//!         vcpu: 4,
//!         image: ImageCharge::root("img-windows", RootKind::Windows),
//!     }),
//!     event(2, ten + 130 * 60, Usage::InstanceTerminated { instance_id: "ins-1".into() }),
//! ];
//! // 10:40 to 12:10: three clock hours of the instance and of the Windows fee.
//! let b = bill(&book, &events, "acct-1", ten, ten + 24 * 3600 - 1)?;
//! assert_eq!(b.total.to_string(), "0.3288");
//! let q = quote(&book, "ap-singapore", "S5.LARGE8", 4, 1, 3, RootKind::Windows, &[])?;
//! assert_eq!(q.total, b.total);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod book;
pub mod convert;
pub mod money;
pub mod quote;
pub mod rating;
pub mod service;
pub mod store;
pub mod usage;

pub use book::{BookError, LicenceClass, PriceBook, RegionPrices, BYTES_PER_GB, SHIPPED_BOOK};
pub use money::{Money, MoneyError};
pub use quote::{quote, snapshot_quote, ImageFeeQuote, Quote, QuotePart, SnapshotQuote};
pub use rating::{bill, hour_of, Anomaly, Bill, ImageFee, LineItem, LineKind, Quantity, RateError};
pub use service::{Billing, BillingApi};
pub use store::EventStore;
pub use usage::{EventId, ImageCharge, LineageLink, RootKind, Usage, UsageEvent};
