//! Wall-clock helpers: unix seconds and RFC 3339 UTC timestamps, as the API reports them.

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the unix epoch.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `secs` since the epoch as RFC 3339 UTC (`2026-11-27T04:32:37Z`).
pub fn rfc3339(secs: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}
