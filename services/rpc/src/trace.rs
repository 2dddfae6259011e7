//! W3C trace context (`traceparent`) across every service-to-service call.
//!
//! A server takes the trace of each call from its `traceparent` header, or starts one when the
//! client sent none; the call's handler runs with it as the task's current trace, inside a span
//! (`rpc{service, method, trace_id}`) that every log line of the call carries. Calls the handler
//! makes to other services carry the same trace id with a new parent id, so a copy is one
//! trace across both regions and the catalog. Work a call hands to a task of its own keeps the
//! trace with [`current`] and [`scope`].

use std::future::Future;

/// A trace and the span a call was made from (`parent_id`: the caller's span, as received;
/// a call's own span gets an id of its own, [`TraceContext::child`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: u128,
    pub parent_id: u64,
    pub sampled: bool,
}

/// The span of a call being served: its context, and the id calls made from it name as their
/// parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallSpan {
    pub context: TraceContext,
    pub span_id: u64,
}

tokio::task_local! {
    static CURRENT: CallSpan;
}

impl TraceContext {
    /// A new trace (a random id, sampled), with no parent (`parent_id` 0).
    pub fn new_root() -> TraceContext {
        TraceContext {
            trace_id: rand::random::<u128>().max(1),
            parent_id: 0,
            sampled: true,
        }
    }

    /// Parses a `traceparent` header of version 00 (`00-<32 hex>-<16 hex>-<2 hex>`); `None`
    /// for anything else, as the specification asks (the server then starts a new trace).
    pub fn parse(header: &str) -> Option<TraceContext> {
        let mut parts = header.trim().split('-');
        let (version, trace, parent, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        if version != "00" || parts.next().is_some() {
            return None;
        }
        if !hex(trace, 32) || !hex(parent, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let parent_id = u64::from_str_radix(parent, 16).ok()?;
        if trace_id == 0 || parent_id == 0 {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(TraceContext {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// A span of this trace, made by a call with this context.
    pub fn child(&self) -> CallSpan {
        CallSpan {
            context: *self,
            span_id: rand::random::<u64>().max(1),
        }
    }
}

impl CallSpan {
    /// The `traceparent` of a call made from this span.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.context.trace_id,
            self.span_id,
            u8::from(self.context.sampled)
        )
    }
}

/// The span of the call (or task) running now, if any.
pub fn current() -> Option<CallSpan> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `future` with `context` as its current span (`None`: as it is).
pub async fn scope<F: Future>(context: Option<CallSpan>, future: F) -> F::Output {
    match context {
        Some(context) => CURRENT.scope(context, future).await,
        None => future.await,
    }
}

/// Spawns `future` on a task of its own that keeps the current trace and span: what a call
/// starts in the background (a copy, an image being finished) logs with the call's trace id
/// and passes the trace on in the calls it makes.
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let context = current();
    let span = tracing::Span::current();
    tokio::spawn(scope(
        context,
        tracing::Instrument::instrument(future, span),
    ))
}

/// The name of the header.
pub const TRACEPARENT: &str = "traceparent";

/// Adds the current trace to an outgoing call's headers (a header the caller set is kept).
pub fn inject(headers: &mut http::HeaderMap) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    if let Some(span) = current() {
        if let Ok(mut value) = http::HeaderValue::from_str(&span.header()) {
            // New with each call: not worth a place in HTTP/2's header tables.
            value.set_sensitive(true);
            headers.insert(TRACEPARENT, value);
        }
    }
}

/// The trace of an incoming call: its `traceparent`, or a new trace.
pub fn extract(headers: &http::HeaderMap) -> TraceContext {
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .unwrap_or_else(TraceContext::new_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_headers_are_ignored() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(header).unwrap();
        assert_eq!(c.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.parent_id, 0x00f067aa0ba902b7);
        assert!(c.sampled);
        let span = c.child();
        let child = TraceContext::parse(&span.header()).unwrap();
        assert_eq!(child.trace_id, c.trace_id);
        assert_eq!(child.parent_id, span.span_id);
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn the_current_trace_follows_scopes_and_reaches_outgoing_headers() {
        assert_eq!(current(), None);
        let root = TraceContext::new_root().child();
        scope(Some(root), async {
            assert_eq!(current(), Some(root));
            let mut headers = http::HeaderMap::new();
            inject(&mut headers);
            let sent = extract(&headers);
            assert_eq!(sent.trace_id, root.context.trace_id);
            assert_eq!(sent.parent_id, root.span_id);
            // A task of its own keeps the trace when handed it.
            let handed = current();
            let seen = tokio::spawn(scope(handed, async { current() }))
                .await
                .unwrap();
            assert_eq!(seen, Some(root));
        })
        .await;
        let mut headers = http::HeaderMap::new();
        inject(&mut headers);
        assert!(headers.is_empty());
    }
}
