//! Billing: the price book and the rating engine. Pure logic: the only I/O is reading the
//! price-book file.
//!
//! - [`PriceBook`] (`book`): every price, by region, read from TOML (`docs/billing.md`,
//!   `deploy/price-book.toml`). The library holds rules, never prices.
//! - [`Money`] (`money`): exact fixed-point amounts in micro-units; checked arithmetic.
//! - [`UsageEvent`] (`usage`): what regions report: instances started, reset and terminated,
//!   snapshot bytes held; each with a fleet-unique id for idempotent storage.
//! - [`bill`] (`rating`): an account's bill for a period from its usage events.
//! - [`quote`] and [`snapshot_quote`] (`quote`): prices of a launch or of held snapshot data.
//!
//! Rating is deterministic: the same book and the same set of events (in any order, with any
//! repeats) give the same bill.

pub mod book;
pub mod money;
pub mod quote;
pub mod rating;
pub mod usage;

pub use book::{BookError, LicenceClass, PriceBook, RegionPrices, BYTES_PER_GB};
pub use money::{Money, MoneyError};
pub use quote::{quote, snapshot_quote, ImageFeeQuote, Quote, QuotePart, SnapshotQuote};
pub use rating::{bill, hour_of, Anomaly, Bill, ImageFee, LineItem, LineKind, Quantity, RateError};
pub use usage::{EventId, ImageCharge, LineageLink, RootKind, Usage, UsageEvent};
