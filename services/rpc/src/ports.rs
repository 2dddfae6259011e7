//! Picking a loopback port for a child process to listen on.
//!
//! Binding port 0 and handing the port number to a child is racy: between the probe closing
//! and the child binding, the kernel may give the same port to another probe (the next service
//! of the same cluster, or a cluster started by another process) or use it as the source port
//! of an outgoing connection. The child then fails to bind and its address leads to some other
//! server. `pick_loopback_port` avoids both: it picks below the kernel's ephemeral range (so no
//! outgoing connection takes the port) and reserves each port it hands out with a marker file
//! that every picker on the machine honours for `RESERVATION`, long enough for a child to
//! start and bind.

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

/// Ports handed out come from this range: below Linux's default ephemeral range
/// (32768-60999), above the well-known and most registered service ports.
const RANGE: std::ops::Range<u16> = 20_000..32_000;

/// How long a handed-out port stays reserved for its child to bind it.
const RESERVATION: Duration = Duration::from_secs(120);

/// Ports this process handed out (never handed out twice by one process).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

fn reservations_dir() -> PathBuf {
    std::env::temp_dir().join("imagefleet-ports")
}

/// Reserves `port` machine-wide unless another picker reserved it within `RESERVATION`.
fn reserve(port: u16) -> bool {
    let dir = reservations_dir();
    if std::fs::create_dir_all(&dir).is_err() {
        // No shared directory: the probe bind below is all there is.
        return true;
    }
    let marker = dir.join(port.to_string());
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_ok()
    };
    if create() {
        return true;
    }
    let stale = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| SystemTime::now().duration_since(at).ok())
        .is_some_and(|age| age > RESERVATION);
    // Of two pickers finding the same stale marker, only the one whose create succeeds wins.
    stale && std::fs::remove_file(&marker).is_ok() && create()
}

/// A loopback TCP port that is free now and that no other picker on this machine hands out
/// for the next two minutes.
pub fn pick_loopback_port() -> std::io::Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = RANGE.start + rand::random::<u16>() % (RANGE.end - RANGE.start);
        if handed_out.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        if reserve(port) {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free loopback port found",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_free_in_range_and_never_handed_out_twice() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let port = pick_loopback_port().unwrap();
            assert!(RANGE.contains(&port));
            assert!(seen.insert(port), "port {port} handed out twice");
        }
    }

    #[test]
    fn a_port_reserved_by_another_picker_is_skipped() {
        let port = pick_loopback_port().unwrap();
        // The marker now exists: a second reservation (as another process would try) fails.
        assert!(!reserve(port));
    }
}
