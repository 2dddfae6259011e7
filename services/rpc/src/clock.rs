//! The clock that dates billable usage and bills.
//!
//! Request signing, timeouts and logs always use the real clock. Usage events and bills use a
//! `Clock`, which is the real clock in production and can run faster, or be set by hand, for
//! trying billing out and for tests (`--clock`, `docs/billing.md`):
//!
//! - `system`: the real clock (the default).
//! - `scale:N` or `scale:N@T0`: simulated time that runs N times faster than real time from
//!   the unix second T0 on (`T0 + (now - T0) * N`); without `@T0`, from the moment the clock is
//!   made. Services of one cluster given the same T0 agree on the time.
//! - `file:PATH`: the time is the unix second written in PATH (decimal digits), read at each
//!   use; whoever writes the file sets the time of every service that reads it. While the file
//!   is missing or unreadable, the real clock is used.
//!
//! Simulated time is for testing only: it never affects what is checked against real time.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    System,
    Scaled { origin_ms: i128, scale: u32 },
    File(PathBuf),
}

/// A clock, cheap to clone and to share between services of one process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Clock {
    source: Arc<Source>,
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

fn real_ms() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i128)
        .unwrap_or(0)
}

/// The largest speed-up a scaled clock takes (a year per second is 31 536 000).
pub const MAX_SCALE: u32 = 100_000_000;

impl Clock {
    pub fn system() -> Clock {
        Clock {
            source: Arc::new(Source::System),
        }
    }

    /// Time running `scale` times faster than real time from `origin` (unix seconds) on;
    /// `None` for the moment of the call.
    pub fn scaled(scale: u32, origin: Option<i64>) -> Clock {
        let origin_ms = origin.map(|s| i128::from(s) * 1000).unwrap_or_else(real_ms);
        Clock {
            source: Arc::new(Source::Scaled {
                origin_ms,
                scale: scale.max(1),
            }),
        }
    }

    /// Time read from `path` at each use.
    pub fn file(path: impl Into<PathBuf>) -> Clock {
        Clock {
            source: Arc::new(Source::File(path.into())),
        }
    }

    /// Parses a `--clock` value (see the module documentation).
    pub fn parse(spec: &str) -> Result<Clock, String> {
        let spec = spec.trim();
        if spec == "system" || spec.is_empty() {
            return Ok(Clock::system());
        }
        if let Some(path) = spec.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: needs a path".into());
            }
            return Ok(Clock::file(path));
        }
        if let Some(rest) = spec.strip_prefix("scale:") {
            let (scale, origin) = match rest.split_once('@') {
                Some((scale, origin)) => (scale, Some(origin)),
                None => (rest, None),
            };
            let scale: u32 = scale
                .parse()
                .ok()
                .filter(|s| (1..=MAX_SCALE).contains(s))
                .ok_or_else(|| format!("the scale must be a whole number from 1 to {MAX_SCALE}"))?;
            let origin = match origin {
                None => None,
                Some(o) => Some(
                    o.parse::<i64>()
                        .ok()
                        .filter(|o| *o >= 0)
                        .ok_or("the origin after @ must be a unix time in seconds")?,
                ),
            };
            return Ok(Clock::scaled(scale, origin));
        }
        Err(format!(
            "unknown clock {spec:?}: expected system, scale:N[@T0] or file:PATH"
        ))
    }

    /// The `--clock` text that makes another process's clock agree with this one.
    pub fn spec(&self) -> String {
        match &*self.source {
            Source::System => "system".into(),
            Source::Scaled { origin_ms, scale } => {
                format!("scale:{scale}@{}", origin_ms.div_euclid(1000))
            }
            Source::File(path) => format!("file:{}", path.display()),
        }
    }

    /// Whether this is the real clock.
    pub fn is_system(&self) -> bool {
        *self.source == Source::System
    }

    /// The current time in unix seconds.
    pub fn now(&self) -> i64 {
        match &*self.source {
            Source::System => (real_ms() / 1000) as i64,
            Source::Scaled { origin_ms, scale } => {
                let elapsed = (real_ms() - origin_ms).max(0);
                ((origin_ms + elapsed * i128::from(*scale)) / 1000) as i64
            }
            Source::File(path) => std::fs::read_to_string(path)
                .ok()
                .and_then(|text| crate::auth::parse_timestamp(text.trim()))
                .unwrap_or_else(|| (real_ms() / 1000) as i64),
        }
    }

    /// How long to wait in real time for `simulated` to pass on this clock (at least 1 ms; a
    /// file clock passes time as its file says, so the real duration is returned).
    pub fn real_duration(&self, simulated: Duration) -> Duration {
        let d = match &*self.source {
            Source::Scaled { scale, .. } => simulated / *scale,
            _ => simulated,
        };
        d.max(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print_back() {
        assert!(Clock::parse("system").unwrap().is_system());
        let c = Clock::parse("scale:60@1000").unwrap();
        assert_eq!(c.spec(), "scale:60@1000");
        assert_eq!(Clock::parse(&c.spec()).unwrap(), c);
        assert!(Clock::parse("scale:0").is_err());
        assert!(Clock::parse("scale:abc").is_err());
        assert!(Clock::parse("scale:2@-5").is_err());
        assert!(Clock::parse("file:").is_err());
        assert!(Clock::parse("sundial").is_err());
    }

    #[test]
    fn a_scaled_clock_runs_faster_from_its_origin() {
        let real = (real_ms() / 1000) as i64;
        let origin = real - 10;
        let now = Clock::scaled(3600, Some(origin)).now();
        // Ten real seconds since the origin are ten simulated hours.
        assert!(now >= origin + 10 * 3600, "{now} vs {origin}");
        assert!(now <= origin + 12 * 3600, "{now} vs {origin}");
    }

    #[test]
    fn a_file_clock_reads_its_file_and_falls_back_to_real_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("now");
        let clock = Clock::file(&path);
        let real = (real_ms() / 1000) as i64;
        assert!((clock.now() - real).abs() <= 2);
        std::fs::write(&path, "1764585600\n").unwrap();
        assert_eq!(clock.now(), 1_764_585_600);
        std::fs::write(&path, "1764589260").unwrap();
        assert_eq!(clock.now(), 1_764_589_260);
    }
}
