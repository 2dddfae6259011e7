//! Fair share of a region between accounts: how many streams, exports and copies one account
//! may have under way at once (`RESOURCE_EXHAUSTED` `LimitExceeded.*` past them), and streams
//! that hold nothing for a reader that stopped reading (cut off with `DEADLINE_EXCEEDED`
//! `RequestTimeout.SlowReader`).
//!
//! A stream reads its next chunk only when the transport asks for it (the HTTP/2 window of the
//! reader has room), one chunk ahead, each read a short blocking task: a stream never parks a
//! thread, and holds at most about three chunks (the one being sent, the one queued in the
//! transport, the one read ahead) whatever its reader does.

use crate::error::{RegionError, Result};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio::time::Instant;
use tokio_stream::Stream;

/// The limits of one region.
#[derive(Clone, Debug)]
pub struct FairShare {
    /// A stream whose reader takes nothing for this long is cut off (`DEADLINE_EXCEEDED`).
    pub stream_stall_timeout: Duration,
    /// Server-streaming calls an account may have open at once in the region: its exports,
    /// and the chunk and manifest streams the region serves to regions copying its images.
    pub max_streams: u32,
    /// `ExportImage` streams an account may have open at once.
    pub max_exports: u32,
    /// Copies into the region an account may have in flight (`SYNCING` images).
    pub max_copies: u32,
}

impl FairShare {
    pub const DEFAULT_STREAM_STALL_TIMEOUT: Duration = Duration::from_secs(30);
    pub const DEFAULT_MAX_STREAMS: u32 = 32;
    pub const DEFAULT_MAX_EXPORTS: u32 = 8;
    pub const DEFAULT_MAX_COPIES: u32 = 16;
}

impl Default for FairShare {
    fn default() -> Self {
        FairShare {
            stream_stall_timeout: Self::DEFAULT_STREAM_STALL_TIMEOUT,
            max_streams: Self::DEFAULT_MAX_STREAMS,
            max_exports: Self::DEFAULT_MAX_EXPORTS,
            max_copies: Self::DEFAULT_MAX_COPIES,
        }
    }
}

/// What an account holds a permit for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Stream,
    Export,
    /// An import under way (`UploadImage`, `ImportImage`).
    Import,
}

impl Kind {
    fn reason(self) -> &'static str {
        match self {
            Kind::Stream => "LimitExceeded.ConcurrentStreams",
            Kind::Export => "LimitExceeded.ConcurrentExports",
            Kind::Import => "LimitExceeded.ConcurrentImports",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Kind::Stream => "streams",
            Kind::Export => "exports",
            Kind::Import => "imports",
        }
    }
}

/// Counts what each account holds.
#[derive(Default)]
pub struct Gate {
    held: Mutex<HashMap<(Kind, String), u32>>,
}

/// One unit of a limit, given back when dropped.
pub struct Permit {
    gate: Arc<Gate>,
    key: (Kind, String),
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

impl Gate {
    /// A permit of `kind` for `account`, or `LimitExceeded.*` when it holds `limit` already
    /// (0: no limit).
    pub fn acquire(self: &Arc<Self>, kind: Kind, account: &str, limit: u32) -> Result<Permit> {
        let key = (kind, account.to_string());
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let n = held.entry(key.clone()).or_insert(0);
        if limit > 0 && *n >= limit {
            return Err(RegionError::Limit {
                reason: kind.reason(),
                limit,
                message: format!(
                    "at most {limit} concurrent {} per account in this region",
                    kind.what()
                ),
            });
        }
        *n += 1;
        Ok(Permit {
            gate: self.clone(),
            key,
        })
    }
}

/// The status a stalled stream ends with.
fn stalled(timeout: Duration) -> tonic::Status {
    imagefleet_proto::error::status_with_metadata(
        tonic::Code::DeadlineExceeded,
        "RequestTimeout.SlowReader",
        format!(
            "the stream was cut off: its reader took nothing for {}",
            humantime::format_duration(timeout)
        ),
        [(
            "stall_timeout".to_string(),
            humantime::format_duration(timeout).to_string(),
        )],
    )
}

type Item<T> = std::result::Result<T, tonic::Status>;
type Inner<T> = Pin<Box<dyn Stream<Item = Item<T>> + Send>>;

struct State<T> {
    /// The stream itself; dropped (with what it has read ahead) when it ends or is cut off.
    inner: Option<Inner<T>>,
    permits: Vec<Permit>,
    /// Since when the stream has waited for its reader to ask for the next message (`None`:
    /// the reader asked, and the stream is producing it).
    waiting_since: Option<Instant>,
    cut: bool,
    waker: Option<Waker>,
}

/// A stream that holds `permits` while it is open, and is cut off when its reader does not
/// ask for a message for `timeout`.
pub struct Guarded<T> {
    state: Arc<Mutex<State<T>>>,
    timeout: Duration,
    done: bool,
}

impl<T: Send + 'static> Guarded<T> {
    pub fn new(inner: Inner<T>, permits: Vec<Permit>, timeout: Duration) -> Self {
        let state = Arc::new(Mutex::new(State {
            inner: Some(inner),
            permits,
            waiting_since: Some(Instant::now()),
            cut: false,
            waker: None,
        }));
        tokio::spawn(watch(Arc::downgrade(&state), timeout));
        Guarded {
            state,
            timeout,
            done: false,
        }
    }
}

/// Cuts the stream off once its reader has not asked for a message for `timeout`; ends when
/// the stream does.
async fn watch<T>(state: Weak<Mutex<State<T>>>, timeout: Duration) {
    let mut check_at = Instant::now() + timeout;
    loop {
        tokio::time::sleep_until(check_at).await;
        let Some(state) = state.upgrade() else { return };
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.inner.is_none() {
            return;
        }
        match s.waiting_since {
            Some(since) if since.elapsed() >= timeout => {
                s.cut = true;
                s.inner = None;
                s.permits.clear();
                if let Some(waker) = s.waker.take() {
                    waker.wake();
                }
                tracing::info!(
                    timeout = %humantime::format_duration(timeout),
                    "stream cut off: its reader stopped reading"
                );
                return;
            }
            Some(since) => check_at = since + timeout,
            None => check_at = Instant::now() + timeout,
        }
    }
}

impl<T> Stream for Guarded<T> {
    type Item = Item<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item<T>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let timeout = self.timeout;
        let state = self.state.clone();
        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
        if s.cut {
            self.done = true;
            return Poll::Ready(Some(Err(stalled(timeout))));
        }
        let Some(inner) = s.inner.as_mut() else {
            self.done = true;
            return Poll::Ready(None);
        };
        // The reader asked: until a message is ready, any wait is the stream's, not the
        // reader's.
        let polled = inner.as_mut().poll_next(cx);
        match polled {
            Poll::Pending => {
                s.waiting_since = None;
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Poll::Ready(Some(Ok(item))) => {
                s.waiting_since = Some(Instant::now());
                s.waker = Some(cx.waker().clone());
                Poll::Ready(Some(Ok(item)))
            }
            Poll::Ready(end) => {
                // Ended, or failed: the permits go back now.
                s.inner = None;
                s.permits.clear();
                drop(s);
                self.done = end.is_none();
                Poll::Ready(end)
            }
        }
    }
}

impl crate::region::Region {
    /// The permits one stream served on `account`'s behalf holds: a stream, and an export
    /// when it is one; or the refusal naming the limit reached.
    pub(crate) fn stream_permits(&self, account: &str, export: bool) -> Result<Vec<Permit>> {
        let limits = &self.config.fair_share;
        let mut permits = vec![self
            .gate
            .acquire(Kind::Stream, account, limits.max_streams)?];
        if export {
            permits.push(
                self.gate
                    .acquire(Kind::Export, account, limits.max_exports)?,
            );
        }
        Ok(permits)
    }

    /// The permit an import of `account` holds while it runs.
    pub(crate) fn import_permit(&self, account: &str) -> Result<Permit> {
        self.gate
            .acquire(Kind::Import, account, self.config.imports.max_imports)
    }

    /// `inner`, holding `permits` while it is open and cut off when its reader stalls.
    pub(crate) fn guarded<T: Send + 'static>(
        &self,
        inner: Inner<T>,
        permits: Vec<Permit>,
    ) -> Inner<T> {
        Box::pin(Guarded::new(
            inner,
            permits,
            self.config.fair_share.stream_stall_timeout,
        ))
    }
}
