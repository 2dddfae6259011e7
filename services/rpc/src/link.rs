//! Emulated network links between regions (docs/links.md).
//!
//! Every connection a region opens to another region goes through the link of that ordered
//! pair of regions: `LinkConnector` makes the TCP connection on the client side and wraps it in
//! a `LinkStream`, which applies the link of (from, to) to what it writes and the link of
//! (to, from) to what it reads. A link delays each piece of data by half its round trip (plus
//! a uniform jitter), paces it through a token bucket at its rate, holds a "lost" segment back
//! by a retransmission timeout, and, when down, refuses new connections and resets open ones.
//! Settings live in a `Links` table shared by every connection, and are looked up live: a
//! change applies to open connections too.
//!
//! Each connection counts what its links do (`LinkMetrics`), in the metrics registry of the
//! region that made it (`region-<from>`), by ordered pair: bytes carried, segments lost, time
//! spent waiting for the rate, and time its calls waited on a partition.

use bytes::{Buf, Bytes};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::{Instant, Sleep};

/// The size of one segment: rates pace data in pieces of at most this, and a lost segment is
/// this much data held back.
pub const SEGMENT: usize = 16 * 1024;
/// How much data a link holds in flight per direction of a connection, at most.
const MAX_QUEUED: usize = 64 * 1024 * 1024;
/// How far behind its rate a link lets a writer get before it stops taking data.
const MAX_BACKLOG: Duration = Duration::from_millis(50);
/// The least extra delay of a lost segment (a retransmission timeout).
const MIN_RETRANSMIT: Duration = Duration::from_millis(200);

/// The settings of one direction of a link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkSpec {
    /// Round-trip time: each direction delays data by half of it.
    pub rtt: Duration,
    /// A uniform extra delay of 0 to this, per segment.
    pub jitter: Duration,
    /// Bits per second; 0: unlimited.
    pub rate_bps: u64,
    /// The share of segments "lost" (delayed by a retransmission), in percent.
    pub loss_percent: f64,
    /// A partition: connections are refused, and open ones reset.
    pub down: bool,
}

/// A spec that does not parse: the message names the bad part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkSpecError(pub String);

impl fmt::Display for LinkSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LinkSpecError {}

fn bad(part: &str, why: &str) -> LinkSpecError {
    LinkSpecError(format!("`{part}`: {why}"))
}

fn parse_duration(part: &str, value: &str) -> Result<Duration, LinkSpecError> {
    if value == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(value)
        .map_err(|_| bad(part, "a duration such as 100ms, 1.5s or 0"))?;
    if d > Duration::from_secs(60) {
        return Err(bad(part, "at most 60s"));
    }
    Ok(d)
}

fn parse_rate(part: &str, value: &str) -> Result<u64, LinkSpecError> {
    let why = "a rate such as 500kbit, 100mbit or 1gbit (bits per second)";
    let lower = value.to_ascii_lowercase();
    let (number, scale) = [("kbit", 1e3), ("mbit", 1e6), ("gbit", 1e9)]
        .iter()
        .find_map(|(unit, scale)| lower.strip_suffix(unit).map(|n| (n, *scale)))
        .ok_or_else(|| bad(part, why))?;
    let n: f64 = number.parse().map_err(|_| bad(part, why))?;
    if !n.is_finite() || n <= 0.0 {
        return Err(bad(part, why));
    }
    let bps = (n * scale).round();
    if !(8_000.0..=1e12).contains(&bps) {
        return Err(bad(part, "a rate from 8kbit to 1000gbit"));
    }
    Ok(bps as u64)
}

fn parse_loss(part: &str, value: &str) -> Result<f64, LinkSpecError> {
    let why = "a percentage from 0% to 100%, such as 0.1%";
    let p: f64 = value
        .strip_suffix('%')
        .ok_or_else(|| bad(part, why))?
        .parse()
        .map_err(|_| bad(part, why))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(bad(part, why));
    }
    Ok(p)
}

impl std::str::FromStr for LinkSpec {
    type Err = LinkSpecError;

    /// Comma-separated items: `rtt:100ms`, `jitter:5ms`, `rate:100mbit` (kbit, mbit, gbit),
    /// `loss:0.1%`, `down`, `up`. `none` (or nothing) is no emulation.
    fn from_str(text: &str) -> Result<LinkSpec, LinkSpecError> {
        let mut spec = LinkSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once(':') {
                Some(("rtt", v)) => spec.rtt = parse_duration(part, v.trim())?,
                Some(("jitter", v)) => spec.jitter = parse_duration(part, v.trim())?,
                Some(("rate", v)) => spec.rate_bps = parse_rate(part, v.trim())?,
                Some(("loss", v)) => spec.loss_percent = parse_loss(part, v.trim())?,
                None if part == "down" => spec.down = true,
                None if part == "up" => spec.down = false,
                None if part == "none" => {}
                _ => {
                    return Err(bad(
                        part,
                        "not one of rtt:, jitter:, rate:, loss:, down, up, none",
                    ))
                }
            }
        }
        Ok(spec)
    }
}

fn write_duration(f: &mut fmt::Formatter<'_>, d: Duration) -> fmt::Result {
    if d.subsec_nanos().is_multiple_of(1_000_000) {
        write!(f, "{}ms", d.as_millis())
    } else {
        write!(f, "{}us", d.as_micros())
    }
}

impl fmt::Display for LinkSpec {
    /// The grammar `FromStr` reads; `none` for no emulation.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut items = 0;
        let mut sep = |f: &mut fmt::Formatter<'_>| {
            items += 1;
            if items > 1 {
                f.write_str(",")
            } else {
                Ok(())
            }
        };
        if !self.rtt.is_zero() {
            sep(f)?;
            f.write_str("rtt:")?;
            write_duration(f, self.rtt)?;
        }
        if !self.jitter.is_zero() {
            sep(f)?;
            f.write_str("jitter:")?;
            write_duration(f, self.jitter)?;
        }
        if self.rate_bps > 0 {
            sep(f)?;
            let r = self.rate_bps;
            if r.is_multiple_of(1_000_000_000) {
                write!(f, "rate:{}gbit", r / 1_000_000_000)?;
            } else if r.is_multiple_of(1_000_000) {
                write!(f, "rate:{}mbit", r / 1_000_000)?;
            } else if r.is_multiple_of(1_000) {
                write!(f, "rate:{}kbit", r / 1_000)?;
            } else {
                write!(f, "rate:{}kbit", r as f64 / 1e3)?;
            }
        }
        if self.loss_percent > 0.0 {
            sep(f)?;
            write!(f, "loss:{}%", self.loss_percent)?;
        }
        if self.down {
            sep(f)?;
            f.write_str("down")?;
        }
        if items == 0 {
            f.write_str("none")?;
        }
        Ok(())
    }
}

impl LinkSpec {
    /// Whether the spec changes nothing about a connection.
    pub fn is_none(&self) -> bool {
        *self == LinkSpec::default()
    }

    /// Realistic defaults by geography: 30 ms between two mainland regions, 80 ms between two
    /// overseas regions, 180 ms between a mainland and an overseas region.
    pub fn realistic(from: &str, to: &str) -> LinkSpec {
        let rtt = match (is_mainland(from), is_mainland(to)) {
            (true, true) => 30,
            (false, false) => 80,
            _ => 180,
        };
        LinkSpec {
            rtt: Duration::from_millis(rtt),
            ..LinkSpec::default()
        }
    }

    fn one_way(&self) -> Duration {
        self.rtt / 2
    }
}

/// The mainland regions of `--realistic-links`; every other region is overseas.
pub const MAINLAND: &[&str] = &[
    "ap-guangzhou",
    "ap-shanghai",
    "ap-beijing",
    "ap-chengdu",
    "ap-chongqing",
    "ap-nanjing",
    "ap-shenzhen-fsi",
    "ap-shanghai-fsi",
    "ap-beijing-fsi",
];

pub fn is_mainland(region: &str) -> bool {
    MAINLAND.contains(&region)
}

/// What one `A,B=SPEC` entry does to the pair.
#[derive(Clone, Debug, PartialEq)]
pub enum LinkChange {
    /// Replaces the pair's settings.
    Set(LinkSpec),
    /// `down` alone: partitions the pair, keeping its other settings.
    Down,
    /// `up` alone: ends a partition, keeping the other settings.
    Up,
    /// `none`: removes the pair's settings (realistic defaults apply again, if on).
    Clear,
}

impl fmt::Display for LinkChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkChange::Set(spec) => spec.fmt(f),
            LinkChange::Down => f.write_str("down"),
            LinkChange::Up => f.write_str("up"),
            LinkChange::Clear => f.write_str("none"),
        }
    }
}

/// One `A,B=SPEC` entry: a pair of regions and what to do to the link between them (both
/// directions).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkEntry {
    pub a: String,
    pub b: String,
    pub change: LinkChange,
}

impl std::str::FromStr for LinkEntry {
    type Err = LinkSpecError;

    fn from_str(text: &str) -> Result<LinkEntry, LinkSpecError> {
        let text = text.trim();
        let (pair, spec) = text
            .split_once('=')
            .ok_or_else(|| bad(text, "a link is REGION,REGION=SPEC"))?;
        let (a, b) = pair
            .split_once(',')
            .map(|(a, b)| (a.trim(), b.trim()))
            .ok_or_else(|| bad(pair, "a pair of regions is REGION,REGION"))?;
        for region in [a, b] {
            if !crate::identity::well_formed_region(region) {
                return Err(bad(region, "not a region id"));
            }
        }
        if a == b {
            return Err(bad(pair, "a link joins two different regions"));
        }
        let change = match spec.trim() {
            "down" => LinkChange::Down,
            "up" => LinkChange::Up,
            "none" | "" => LinkChange::Clear,
            other => LinkChange::Set(other.parse()?),
        };
        Ok(LinkEntry {
            a: a.to_string(),
            b: b.to_string(),
            change,
        })
    }
}

impl fmt::Display for LinkEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}={}", self.a, self.b, self.change)
    }
}

/// Reads a links file: one `A,B=SPEC` a line; `#` starts a comment; blank lines are skipped.
pub fn parse_links_file(text: &str) -> Result<Vec<LinkEntry>, LinkSpecError> {
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        entries.push(
            line.parse()
                .map_err(|e: LinkSpecError| LinkSpecError(format!("line {}: {e}", n + 1)))?,
        );
    }
    Ok(entries)
}

#[derive(Default)]
struct Table {
    /// Explicit settings by sending region, then receiving region.
    pairs: HashMap<String, HashMap<String, LinkSpec>>,
    realistic: bool,
}

struct Inner {
    table: RwLock<Table>,
    /// False while no pair has settings and realistic defaults are off (the fast path).
    active: AtomicBool,
    /// Bumped at every change.
    generation: AtomicU64,
    changed: watch::Sender<u64>,
    /// Pairs (from, to) whose connections a partition refused or reset, since when they wait
    /// for it to end, with the counter the wait goes to.
    waits: Mutex<DownWaits>,
}

#[derive(Default)]
struct DownWaits {
    waiting: HashMap<(String, String), (std::time::Instant, Arc<crate::metrics::Series>)>,
    /// Pairs whose registry refreshes the wait at each scrape (`Links::note_down`).
    hooked: std::collections::HashSet<(String, String)>,
}

/// What the links of one ordered pair did to the connections of one region.
pub struct LinkMetrics {
    /// Bytes carried (sent by `from` to `to`), emulated or not.
    bytes: Arc<crate::metrics::Series>,
    /// Segments "lost" (delayed by a retransmission timeout).
    dropped: Arc<crate::metrics::Series>,
    /// Time segments waited for the link's rate before leaving, summed over segments.
    throttled: Arc<crate::metrics::Series>,
}

impl LinkMetrics {
    /// The counters of data from `from` to `to` on connections region `owner` made.
    pub fn of(owner: &str, from: &str, to: &str) -> Arc<LinkMetrics> {
        type Known = HashMap<(String, String, String), Arc<LinkMetrics>>;
        static KNOWN: OnceLock<Mutex<Known>> = OnceLock::new();
        let key = (owner.to_string(), from.to_string(), to.to_string());
        let mut known = KNOWN
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        known
            .entry(key)
            .or_insert_with(|| {
                let registry = crate::metrics::registry(&format!("region-{owner}"));
                let labels = [("from", from), ("to", to)];
                Arc::new(LinkMetrics {
                    bytes: registry.counter(
                        "imagefleet_link_bytes_total",
                        "Bytes carried between two regions, by direction (emulated links or not).",
                        &labels,
                    ),
                    dropped: registry.counter(
                        "imagefleet_link_dropped_total",
                        "Segments an emulated link lost (each arrives a retransmission timeout late).",
                        &labels,
                    ),
                    throttled: registry.seconds_counter(
                        "imagefleet_link_throttle_wait_seconds_total",
                        "Time segments waited for an emulated link's rate, summed over segments.",
                        &labels,
                    ),
                })
            })
            .clone()
    }
}

fn down_wait_series(from: &str, to: &str) -> Arc<crate::metrics::Series> {
    crate::metrics::registry(&format!("region-{from}")).seconds_counter(
        "imagefleet_link_down_wait_seconds_total",
        "Time from a connection refused or reset by a partition of the link until the link was up again.",
        &[("from", from), ("to", to)],
    )
}

/// Whether connections of (from, to) are partitioned in `table` (either direction down).
fn table_down(table: &Table, from: &str, to: &str) -> bool {
    let down = |a: &str, b: &str| {
        table
            .pairs
            .get(a)
            .and_then(|m| m.get(b))
            .is_some_and(|s| s.down)
    };
    down(from, to) || down(to, from)
}

/// The links of a process, by ordered pair of regions (from, to). Cheap to clone: clones
/// share the table.
#[derive(Clone)]
pub struct Links {
    inner: Arc<Inner>,
}

impl Default for Links {
    fn default() -> Self {
        Links::new()
    }
}

impl fmt::Debug for Links {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Links")
            .field("active", &self.inner.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Links {
    pub fn new() -> Links {
        Links {
            inner: Arc::new(Inner {
                table: RwLock::new(Table::default()),
                active: AtomicBool::new(false),
                generation: AtomicU64::new(0),
                changed: watch::channel(0).0,
                waits: Mutex::new(DownWaits::default()),
            }),
        }
    }

    /// The process's table (what `imaged` flags and `SetLinks` change, and region-to-region
    /// connections use).
    pub fn global() -> &'static Links {
        static GLOBAL: OnceLock<Links> = OnceLock::new();
        GLOBAL.get_or_init(Links::new)
    }

    /// The settings of data sent from `from` to `to`: the pair's own, else the realistic
    /// default when those are on; `None`: no emulation.
    pub fn get(&self, from: &str, to: &str) -> Option<LinkSpec> {
        if !self.inner.active.load(Ordering::Acquire) {
            return None;
        }
        let table = self.inner.table.read().unwrap_or_else(|e| e.into_inner());
        table
            .pairs
            .get(from)
            .and_then(|m| m.get(to))
            .copied()
            .or_else(|| table.realistic.then(|| LinkSpec::realistic(from, to)))
    }

    fn changed(&self, table: &Table) {
        {
            let mut waits = self.inner.waits.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            waits.waiting.retain(|(from, to), (since, series)| {
                if table_down(table, from, to) {
                    return true;
                }
                series.add_duration(now.saturating_duration_since(*since));
                false
            });
        }
        let active = table.realistic || table.pairs.values().any(|m| !m.is_empty());
        self.inner.active.store(active, Ordering::Release);
        let generation = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.changed.send_replace(generation);
    }

    /// Sets one direction's settings (`None`: removes them).
    pub fn set(&self, from: &str, to: &str, spec: Option<LinkSpec>) {
        let mut table = self.inner.table.write().unwrap_or_else(|e| e.into_inner());
        match spec {
            Some(spec) => {
                table
                    .pairs
                    .entry(from.to_string())
                    .or_default()
                    .insert(to.to_string(), spec);
            }
            None => {
                if let Some(m) = table.pairs.get_mut(from) {
                    m.remove(to);
                }
            }
        }
        self.changed(&table);
    }

    /// Applies an entry to both directions of its pair.
    pub fn apply(&self, entry: &LinkEntry) {
        for (from, to) in [(&entry.a, &entry.b), (&entry.b, &entry.a)] {
            let now = self.get(from, to);
            let next = match &entry.change {
                LinkChange::Set(spec) => Some(*spec),
                LinkChange::Clear => None,
                LinkChange::Down | LinkChange::Up => Some(LinkSpec {
                    down: entry.change == LinkChange::Down,
                    ..now.unwrap_or_default()
                }),
            };
            // A link brought up with nothing else to it is no link (realistic defaults aside).
            let realistic = self
                .inner
                .table
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .realistic;
            let next = next.filter(|spec| realistic || !spec.is_none());
            self.set(from, to, next);
        }
    }

    /// Turns the realistic defaults on or off.
    pub fn set_realistic(&self, on: bool) {
        let mut table = self.inner.table.write().unwrap_or_else(|e| e.into_inner());
        table.realistic = on;
        self.changed(&table);
    }

    /// The links data leaves `from` on: its explicit pairs, and the realistic defaults
    /// towards `peers` (when on), sorted by receiving region.
    pub fn outgoing(&self, from: &str, peers: &[String]) -> Vec<(String, LinkSpec)> {
        let mut out: Vec<(String, LinkSpec)> = {
            let table = self.inner.table.read().unwrap_or_else(|e| e.into_inner());
            table
                .pairs
                .get(from)
                .map(|m| m.iter().map(|(to, s)| (to.clone(), *s)).collect())
                .unwrap_or_default()
        };
        for peer in peers {
            if peer != from && !out.iter().any(|(to, _)| to == peer) {
                if let Some(spec) = self.get(from, peer) {
                    out.push((peer.clone(), spec));
                }
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// A connection of (from, to) was refused or reset by a partition: the pair's calls wait
    /// from now until the link is up (`imagefleet_link_down_wait_seconds_total`, refreshed at
    /// each scrape while the wait lasts).
    fn note_down(&self, from: &str, to: &str) {
        let key = (from.to_string(), to.to_string());
        let mut waits = self.inner.waits.lock().unwrap_or_else(|e| e.into_inner());
        if waits.waiting.contains_key(&key) {
            return;
        }
        waits.waiting.insert(
            key.clone(),
            (std::time::Instant::now(), down_wait_series(from, to)),
        );
        if waits.hooked.insert(key.clone()) {
            let inner = Arc::downgrade(&self.inner);
            crate::metrics::registry(&format!("region-{from}")).on_render(move |_| {
                let Some(inner) = inner.upgrade() else {
                    return;
                };
                let mut waits = inner.waits.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((since, series)) = waits.waiting.get_mut(&key) {
                    let now = std::time::Instant::now();
                    series.add_duration(now.saturating_duration_since(*since));
                    *since = now;
                }
            });
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }
}

/// One direction's pacing state: when the token bucket next has room, and when the last
/// segment was released (release times never go backwards: order is kept).
struct Shaper {
    /// The theoretical arrival time of the token bucket (GCRA).
    tat: Instant,
    last_release: Instant,
}

impl Shaper {
    fn new() -> Self {
        let now = Instant::now();
        Shaper {
            tat: now,
            last_release: now,
        }
    }

    /// The burst of a rate, as time: 1/20 s of traffic, at least one segment.
    fn tolerance(spec: &LinkSpec) -> Duration {
        if spec.rate_bps == 0 {
            return Duration::ZERO;
        }
        let bytes_per_sec = spec.rate_bps as f64 / 8.0;
        let burst = (bytes_per_sec / 20.0).max(SEGMENT as f64);
        Duration::from_secs_f64(burst / bytes_per_sec)
    }

    /// Whether the direction takes more data now (its backlog under the rate is short).
    fn has_room(&self, spec: &LinkSpec, now: Instant) -> bool {
        spec.rate_bps == 0
            || self.tat.saturating_duration_since(now) <= Self::tolerance(spec) + MAX_BACKLOG
    }

    /// When a segment of `len` bytes handed over now comes out at the other end; counts the
    /// time it waits for the rate and its loss in `metrics`.
    fn release(
        &mut self,
        spec: &LinkSpec,
        len: usize,
        now: Instant,
        metrics: &LinkMetrics,
    ) -> Instant {
        let depart = if spec.rate_bps == 0 {
            now
        } else {
            let tau = Self::tolerance(spec);
            let interval = Duration::from_secs_f64(len as f64 * 8.0 / spec.rate_bps as f64);
            let depart = now.max(self.tat.checked_sub(tau).unwrap_or(now));
            self.tat = self.tat.max(depart) + interval;
            if depart > now {
                metrics.throttled.add_duration(depart - now);
            }
            depart
        };
        let mut delay = spec.one_way();
        if !spec.jitter.is_zero() {
            delay += spec.jitter.mul_f64(rand::random::<f64>());
        }
        if spec.loss_percent > 0.0 && rand::random::<f64>() * 100.0 < spec.loss_percent {
            delay += MIN_RETRANSMIT.max(spec.rtt);
            metrics.dropped.inc();
        }
        let release = (depart + delay).max(self.last_release);
        self.last_release = release;
        release
    }
}

/// One direction of a shaped connection: data stamped with its release time.
struct PipeState {
    queue: VecDeque<(Instant, Bytes)>,
    queued: usize,
    shaper: Shaper,
    /// The side waiting for data (reads) or for room (writes).
    waiter: Option<Waker>,
    /// The connection was reset (link down) or failed.
    broken: Option<io::ErrorKind>,
    /// Reads: the peer closed. Writes: the writer shut down.
    finished: bool,
    /// The wrapper is gone.
    dropped: bool,
}

struct Pipe {
    state: Mutex<PipeState>,
    /// Wakes the direction's pump task.
    pump: Notify,
    /// The direction's counters.
    metrics: Arc<LinkMetrics>,
}

impl Pipe {
    fn new(metrics: Arc<LinkMetrics>) -> Arc<Pipe> {
        Arc::new(Pipe {
            metrics,
            state: Mutex::new(PipeState {
                queue: VecDeque::new(),
                queued: 0,
                shaper: Shaper::new(),
                waiter: None,
                broken: None,
                finished: false,
                dropped: false,
            }),
            pump: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PipeState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the direction broken and wakes both its ends.
    fn break_with(&self, kind: io::ErrorKind) {
        let waker = {
            let mut state = self.lock();
            state.broken.get_or_insert(kind);
            state.queue.clear();
            state.queued = 0;
            state.waiter.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        self.pump.notify_one();
    }
}

impl PipeState {
    /// Whether more data may be queued. An empty queue always takes more: the writer waiting
    /// for room is woken as segments leave, so room must come with the last one.
    fn has_room(&self, spec: &LinkSpec, now: Instant) -> bool {
        self.queue.is_empty() || (self.queued < MAX_QUEUED && self.shaper.has_room(spec, now))
    }

    /// Queues `data` in segments, each stamped with its release time.
    fn push(&mut self, spec: &LinkSpec, mut data: Bytes, now: Instant, metrics: &LinkMetrics) {
        metrics.bytes.add(data.len() as u64);
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(SEGMENT));
            let release = self.shaper.release(spec, piece.len(), now, metrics);
            self.queued += piece.len();
            self.queue.push_back((release, piece));
        }
    }
}

/// Both directions' settings of a connection, refreshed when the table changes.
struct Specs {
    links: Links,
    from: String,
    to: String,
    generation: u64,
    out: Option<LinkSpec>,
    back: Option<LinkSpec>,
}

impl Specs {
    fn new(links: Links, from: &str, to: &str) -> Specs {
        let generation = links.generation();
        Specs {
            out: links.get(from, to),
            back: links.get(to, from),
            links,
            from: from.to_string(),
            to: to.to_string(),
            generation,
        }
    }

    /// Looks the settings up again if the table changed; whether they did.
    fn refresh(&mut self) -> bool {
        let generation = self.links.generation();
        if generation == self.generation {
            return false;
        }
        self.generation = generation;
        self.out = self.links.get(&self.from, &self.to);
        self.back = self.links.get(&self.to, &self.from);
        true
    }

    fn down(&self) -> bool {
        self.out.is_some_and(|s| s.down) || self.back.is_some_and(|s| s.down)
    }
}

fn reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "link down: connection reset",
    )
}

type ChangeFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

fn next_change(links: &Links) -> ChangeFuture {
    let mut rx = links.subscribe();
    Box::pin(async move {
        let _ = rx.changed().await;
    })
}

enum Mode {
    /// No link set when the connection was made: bytes pass straight through until one is.
    Direct {
        stream: Option<TcpStream>,
        change: ChangeFuture,
    },
    Shaped {
        out: Arc<Pipe>,
        back: Arc<Pipe>,
        timer: Option<Pin<Box<Sleep>>>,
    },
}

/// A client connection through an emulated link: writes travel the link of (from, to), reads
/// the link of (to, from).
pub struct LinkStream {
    specs: Specs,
    mode: Mode,
    /// Counters of the data written (from, to) and read (to, from).
    sent: Arc<LinkMetrics>,
    received: Arc<LinkMetrics>,
    /// Reset by a partition: every later read or write fails.
    reset: bool,
}

impl fmt::Debug for LinkStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LinkStream")
            .field("from", &self.specs.from)
            .field("to", &self.specs.to)
            .finish_non_exhaustive()
    }
}

impl LinkStream {
    /// Connects to `addr` from region `from` to region `to`: refused at once when the link is
    /// down; the handshake takes one round trip of the link.
    pub async fn connect(
        links: &Links,
        from: &str,
        to: &str,
        addr: impl tokio::net::ToSocketAddrs,
    ) -> io::Result<LinkStream> {
        let specs = Specs::new(links.clone(), from, to);
        if specs.down() {
            links.note_down(from, to);
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("link {from} -> {to} down: connection refused"),
            ));
        }
        let handshake = specs.out.map(|s| s.one_way()).unwrap_or_default()
            + specs.back.map(|s| s.one_way()).unwrap_or_default();
        if !handshake.is_zero() {
            tokio::time::sleep(handshake).await;
        }
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(LinkStream::wrap(links, from, to, stream))
    }

    /// Wraps a connected stream.
    pub fn wrap(links: &Links, from: &str, to: &str, stream: TcpStream) -> LinkStream {
        let specs = Specs::new(links.clone(), from, to);
        let mut link = LinkStream {
            mode: Mode::Direct {
                stream: Some(stream),
                change: next_change(links),
            },
            sent: LinkMetrics::of(from, from, to),
            received: LinkMetrics::of(from, to, from),
            specs,
            reset: false,
        };
        if link.specs.out.is_some() || link.specs.back.is_some() {
            link.shape();
        }
        link
    }

    /// Leaves the fast path: splits the socket between two pump tasks.
    fn shape(&mut self) {
        let Mode::Direct { stream, .. } = &mut self.mode else {
            return;
        };
        let Some(stream) = stream.take() else {
            return;
        };
        let (read, write) = stream.into_split();
        let (out, back) = (
            Pipe::new(self.sent.clone()),
            Pipe::new(self.received.clone()),
        );
        tokio::spawn(pump_out(
            out.clone(),
            back.clone(),
            write,
            self.specs.links.clone(),
        ));
        tokio::spawn(pump_back(
            back.clone(),
            out.clone(),
            read,
            Specs::new(self.specs.links.clone(), &self.specs.from, &self.specs.to),
        ));
        self.mode = Mode::Shaped {
            out,
            back,
            timer: None,
        };
    }

    /// Looks for a change of settings: a partition resets the connection; the first link on a
    /// direct connection shapes it.
    fn check(&mut self) -> io::Result<()> {
        if self.reset {
            return Err(reset());
        }
        if self.specs.refresh() {
            if self.specs.down() {
                self.reset = true;
                self.specs.links.note_down(&self.specs.from, &self.specs.to);
                if let Mode::Shaped { out, back, .. } = &self.mode {
                    out.break_with(io::ErrorKind::ConnectionReset);
                    back.break_with(io::ErrorKind::ConnectionReset);
                }
                return Err(reset());
            }
            if self.specs.out.is_some() || self.specs.back.is_some() {
                self.shape();
            }
        }
        Ok(())
    }
}

/// Sends what the writer queued, each segment at its release time.
async fn pump_out(pipe: Arc<Pipe>, other: Arc<Pipe>, mut socket: OwnedWriteHalf, links: Links) {
    let mut changes = links.subscribe();
    loop {
        enum Next {
            Send(Bytes),
            Wait(Option<Instant>),
            Finish,
            Stop,
        }
        let next = {
            let mut state = pipe.lock();
            if state.broken.is_some() {
                Next::Stop
            } else {
                match state.queue.front() {
                    Some((at, _)) if *at <= Instant::now() => {
                        let (_, data) = state.queue.pop_front().expect("a head");
                        state.queued -= data.len();
                        Next::Send(data)
                    }
                    Some((at, _)) => Next::Wait(Some(*at)),
                    None if state.finished || state.dropped => Next::Finish,
                    None => Next::Wait(None),
                }
            }
        };
        match next {
            Next::Send(data) => {
                if let Some(w) = pipe.lock().waiter.take() {
                    w.wake();
                }
                if let Err(e) = socket.write_all(&data).await {
                    pipe.break_with(e.kind());
                    other.break_with(e.kind());
                    return;
                }
            }
            Next::Wait(until) => {
                let sleep = async {
                    match until {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = sleep => {}
                    _ = pipe.pump.notified() => {}
                    _ = changes.changed() => {}
                }
            }
            Next::Finish => {
                let _ = socket.shutdown().await;
                return;
            }
            Next::Stop => return,
        }
    }
}

/// Reads what the peer sends and queues it, stamped, for the reader; watches for partitions.
async fn pump_back(pipe: Arc<Pipe>, other: Arc<Pipe>, mut socket: OwnedReadHalf, mut specs: Specs) {
    let mut changes = specs.links.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        specs.refresh();
        if specs.down() {
            specs.links.note_down(&specs.from, &specs.to);
            pipe.break_with(io::ErrorKind::ConnectionReset);
            other.break_with(io::ErrorKind::ConnectionReset);
            return;
        }
        let spec = specs.back.unwrap_or_default();
        let room = {
            let state = pipe.lock();
            if state.broken.is_some() || state.dropped {
                return;
            }
            state.has_room(&spec, Instant::now())
        };
        if !room {
            tokio::select! {
                _ = pipe.pump.notified() => {}
                _ = changes.changed() => {}
                // Time alone makes room under a rate.
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
            continue;
        }
        tokio::select! {
            read = socket.read(&mut buf) => {
                let waker = {
                    let mut state = pipe.lock();
                    match read {
                        Ok(0) => state.finished = true,
                        Ok(n) => state.push(
                            &spec,
                            Bytes::copy_from_slice(&buf[..n]),
                            Instant::now(),
                            &pipe.metrics,
                        ),
                        Err(ref e) => {
                            state.broken.get_or_insert(e.kind());
                        }
                    }
                    state.waiter.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
                if !matches!(read, Ok(n) if n > 0) {
                    return;
                }
            }
            _ = pipe.pump.notified() => {}
            _ = changes.changed() => {}
        }
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check() {
            return Poll::Ready(Err(e));
        }
        match &mut this.mode {
            Mode::Direct { stream, change } => {
                let stream = stream.as_mut().expect("a direct stream");
                let before = buf.filled().len();
                let polled = Pin::new(stream).poll_read(cx, buf);
                if let Poll::Ready(Ok(())) = polled {
                    this.received
                        .bytes
                        .add((buf.filled().len() - before) as u64);
                }
                if polled.is_pending() && change.as_mut().poll(cx).is_ready() {
                    // Settings changed: look again (and wait for the next change).
                    *change = next_change(&this.specs.links);
                    cx.waker().wake_by_ref();
                }
                polled
            }
            Mode::Shaped { back, timer, .. } => {
                let now = Instant::now();
                let mut state = back.lock();
                if let Some(kind) = state.broken {
                    return Poll::Ready(Err(io::Error::new(kind, "link: connection failed")));
                }
                let head = state.queue.front().map(|(at, _)| *at);
                match head {
                    Some(at) if at <= now => {
                        let (_, data) = state.queue.front_mut().expect("a head");
                        let n = data.len().min(buf.remaining());
                        buf.put_slice(&data[..n]);
                        data.advance(n);
                        if data.is_empty() {
                            state.queue.pop_front();
                        }
                        state.queued -= n;
                        drop(state);
                        *timer = None;
                        back.pump.notify_one();
                        Poll::Ready(Ok(()))
                    }
                    Some(at) => {
                        state.waiter = Some(cx.waker().clone());
                        drop(state);
                        let sleep =
                            timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                        if sleep.deadline() != at {
                            sleep.as_mut().reset(at);
                        }
                        if sleep.as_mut().poll(cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                        Poll::Pending
                    }
                    None if state.finished => Poll::Ready(Ok(())),
                    None => {
                        state.waiter = Some(cx.waker().clone());
                        Poll::Pending
                    }
                }
            }
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check() {
            return Poll::Ready(Err(e));
        }
        let spec = this.specs.out.unwrap_or_default();
        match &mut this.mode {
            Mode::Direct { stream, .. } => {
                let polled =
                    Pin::new(stream.as_mut().expect("a direct stream")).poll_write(cx, buf);
                if let Poll::Ready(Ok(n)) = polled {
                    this.sent.bytes.add(n as u64);
                }
                polled
            }
            Mode::Shaped { out, .. } => {
                let now = Instant::now();
                let mut state = out.lock();
                if let Some(kind) = state.broken {
                    return Poll::Ready(Err(io::Error::new(kind, "link: connection failed")));
                }
                if state.finished {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
                if !state.has_room(&spec, now) {
                    state.waiter = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                // Take what fits in the backlog, a segment at a time.
                let mut taken = 0;
                while taken < buf.len() && state.has_room(&spec, now) {
                    let n = (buf.len() - taken).min(SEGMENT);
                    state.push(
                        &spec,
                        Bytes::copy_from_slice(&buf[taken..taken + n]),
                        now,
                        &out.metrics,
                    );
                    taken += n;
                }
                drop(state);
                out.pump.notify_one();
                Poll::Ready(Ok(taken))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check() {
            return Poll::Ready(Err(e));
        }
        match &mut this.mode {
            Mode::Direct { stream, .. } => {
                Pin::new(stream.as_mut().expect("a direct stream")).poll_flush(cx)
            }
            // Queued data is on the wire.
            Mode::Shaped { out, .. } => match out.lock().broken {
                Some(kind) => Poll::Ready(Err(io::Error::new(kind, "link: connection failed"))),
                None => Poll::Ready(Ok(())),
            },
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match &mut this.mode {
            Mode::Direct { stream, .. } => {
                Pin::new(stream.as_mut().expect("a direct stream")).poll_shutdown(cx)
            }
            Mode::Shaped { out, .. } => {
                out.lock().finished = true;
                out.pump.notify_one();
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        if let Mode::Shaped { out, back, .. } = &self.mode {
            for pipe in [out, back] {
                pipe.lock().dropped = true;
                pipe.pump.notify_one();
            }
        }
    }
}

/// A connector for `tonic::transport::Endpoint::connect_with_connector_lazy`: connects to the
/// URI's host and port through the link of (from, to). TLS for `https://` URIs is added on top
/// by tonic.
#[derive(Clone, Debug)]
pub struct LinkConnector {
    links: Links,
    from: String,
    to: String,
}

impl LinkConnector {
    pub fn new(links: Links, from: &str, to: &str) -> LinkConnector {
        LinkConnector {
            links,
            from: from.to_string(),
            to: to.to_string(),
        }
    }
}

impl tower::Service<http::Uri> for LinkConnector {
    type Response = hyper_util::rt::TokioIo<LinkStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let (links, from, to) = (self.links.clone(), self.from.clone(), self.to.clone());
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "a URI without a host"))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let stream = LinkStream::connect(&links, &from, &to, (host.as_str(), port)).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

#[cfg(test)]
mod tests;
