//! Per-account pacing: each account's calls to the region are metered (GCRA: a token bucket
//! kept as one "next free slot" time per account). A call within the account's rate and burst
//! goes at once; a call over it waits for its slot, so a client hammering in a closed loop is
//! slowed to its rate instead of taking the region's cores from other accounts; a call that
//! would wait longer than `MAX_WAIT` is refused with `RequestLimitExceeded`.

use crate::error::{RegionError, Result};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest a call waits for its slot before it is refused.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// Accounts remembered before idle ones are forgotten.
const PRUNE_ABOVE: usize = 10_000;

pub(crate) struct Pacer {
    /// Time between two calls at the account's rate; `None`: unpaced.
    interval: Option<Duration>,
    /// How far ahead of its rate an account may run (the burst).
    tolerance: Duration,
    /// Per account: the time its next call would be exactly on rate.
    next: Mutex<HashMap<String, Instant>>,
}

impl Pacer {
    /// `rate` calls per second per account (0: unpaced), bursts of up to `burst` calls.
    pub fn new(rate: u32, burst: u32) -> Pacer {
        let interval = (rate > 0).then(|| Duration::from_secs(1) / rate);
        Pacer {
            interval,
            tolerance: interval.unwrap_or_default() * burst.max(1),
            next: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for the account's next slot, or refuses when that is too far away.
    pub async fn turn(&self, account: &str) -> Result<()> {
        let Some(interval) = self.interval else {
            return Ok(());
        };
        let now = Instant::now();
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            if next.len() > PRUNE_ABOVE {
                next.retain(|_, at| *at > now);
            }
            let at = next.entry(account.to_string()).or_insert(now);
            let due = (*at).max(now);
            let wait = due
                .saturating_duration_since(now)
                .saturating_sub(self.tolerance);
            if wait > MAX_WAIT {
                return Err(RegionError::unsupported_limit(format!(
                    "account {account} is over its call rate in this region; retry later"
                )));
            }
            *at = due + interval;
            wait
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn calls_over_the_rate_wait_and_far_over_it_are_refused() {
        let pacer = Pacer::new(10, 5);
        let start = tokio::time::Instant::now();
        // The burst goes at once.
        for _ in 0..5 {
            pacer.turn("a").await.expect("within the burst");
        }
        assert!(start.elapsed() < Duration::from_millis(1));
        // Then calls go at the rate: 10 more take about a second.
        for _ in 0..10 {
            pacer.turn("a").await.expect("paced");
        }
        assert!(
            start.elapsed() >= Duration::from_millis(900),
            "{:?}",
            start.elapsed()
        );
        // Another account is not slowed by the first.
        let other = tokio::time::Instant::now();
        pacer.turn("b").await.expect("b");
        assert!(other.elapsed() < Duration::from_millis(1));
        // Reservations far beyond the rate are refused.
        let mut refused = 0;
        for _ in 0..40 {
            let reserve = Pacer::turn(&pacer, "c");
            if tokio::time::timeout(Duration::ZERO, reserve)
                .await
                .is_ok_and(|r| r.is_err())
            {
                refused += 1;
            }
        }
        assert!(refused > 0, "a flood was never refused");
    }
}
