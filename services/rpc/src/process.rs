//! Metrics of the process a service runs in, refreshed at each scrape: resident memory (the
//! figure a soak watches for growth) and open file descriptors, under the names Prometheus
//! client libraries give them.

/// Adds the process's gauges to `identity`'s registry. Under `imaged dev` every service
/// reports the one process they share.
pub fn watch(identity: &str) {
    crate::metrics::registry(identity).on_render(|r| {
        if let Some(bytes) = resident_bytes() {
            r.gauge(
                "process_resident_memory_bytes",
                "Resident memory of the process, in bytes.",
                &[],
            )
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            r.gauge(
                "process_open_fds",
                "File descriptors the process has open.",
                &[],
            )
            .set(i64::try_from(entries.count()).unwrap_or(i64::MAX));
        }
    });
}

/// `VmRSS` of this process, from `/proc/self/status` (Linux); `None` elsewhere.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_process_gauges_are_rendered() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
        watch("process-test");
        let text = crate::metrics::registry("process-test").render();
        let rss: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .and_then(|v| v.parse().ok())
            .expect("a resident memory sample");
        assert!(rss > 1 << 20, "{text}");
        assert!(text.contains("# TYPE process_open_fds gauge"), "{text}");
    }
}
