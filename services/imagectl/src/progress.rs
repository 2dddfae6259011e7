//! Progress of long waits (`images sync --wait`) on stderr: a progress bar per destination,
//! redrawn in place, when stderr is a terminal; otherwise a plain line whenever a
//! destination's percent moves by 10 points or it finishes (logs and pipes stay short).
//!
//! The formatting is pure (`bar_line`, `plain_line`, `human_bytes`, ...) so it can be tested;
//! `SyncProgressView` keeps each destination's numbers and writes the lines.

use crate::output::escape;
use imagefleet_proto::region::v1::{Image, ImageState};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Where progress is written: stderr for the binary, a buffer in tests. Writing progress is
/// best effort: a closed stderr does not fail the command.
pub struct ProgressSink<'a> {
    out: &'a mut (dyn Write + Send),
    terminal: bool,
}

impl<'a> ProgressSink<'a> {
    /// `terminal`: whether `out` is a terminal (progress bars redrawn in place with ANSI
    /// escapes) or not (plain lines).
    pub fn new(out: &'a mut (dyn Write + Send), terminal: bool) -> Self {
        ProgressSink { out, terminal }
    }

    /// Progress on this process's stderr, as bars if it is a terminal.
    pub fn stderr(stderr: &'a mut std::io::Stderr) -> Self {
        let terminal = stderr.is_terminal();
        ProgressSink::new(stderr, terminal)
    }

    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    fn write(&mut self, text: &str) {
        let _ = self
            .out
            .write_all(text.as_bytes())
            .and_then(|_| self.out.flush());
    }
}

/// Cells of the progress bar.
const BAR_WIDTH: usize = 20;
/// How far a destination's percent must move before plain mode prints it again.
const PLAIN_STEP: u32 = 10;

const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// `bytes` in the largest binary unit it reaches, one decimal: `512 B`, `584.0 MiB`,
/// `1.0 GiB`.
pub fn human_bytes(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    scaled(bytes as f64, "")
}

/// A rate in bytes per second: `42.1 MiB/s`, `300 B/s`.
pub fn human_rate(bytes_per_second: f64) -> String {
    let rate = if bytes_per_second.is_finite() {
        bytes_per_second.max(0.0)
    } else {
        0.0
    };
    if rate < 1024.0 {
        return format!("{rate:.0} B/s");
    }
    scaled(rate, "/s")
}

fn scaled(value: f64, suffix: &str) -> String {
    let mut value = value;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}{suffix}", UNITS[unit])
}

/// A duration to the second, shortest first: `10s`, `1m05s`, `2h03m`.
pub fn human_duration(duration: Duration) -> String {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() >= 500_000_000);
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

/// `done` of `total` as whole numbers of one unit (the largest in which `total` is at least
/// 100, so steps of 1% show): `614 MiB/1024 MiB`.
pub fn plain_bytes(done: u64, total: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && total >> (10 * (unit + 1)) >= 100 {
        unit += 1;
    }
    let shift = 10 * unit;
    format!(
        "{} {}/{} {}",
        done >> shift,
        UNITS[unit],
        total >> shift,
        UNITS[unit]
    )
}

/// Whole percent of `done` in `total` (0 when the total is unknown), at most 100.
pub fn percent(done: u64, total: u64) -> u32 {
    if total == 0 {
        return 0;
    }
    (u128::from(done.min(total)) * 100 / u128::from(total)) as u32
}

/// The rate of a transfer that had `first_done` bytes when first seen and `done` bytes
/// `elapsed` later; `None` until time has passed.
pub fn rate(first_done: u64, done: u64, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| done.saturating_sub(first_done) as f64 / secs)
}

/// How long the rest takes at `rate`; `None` when nothing moves.
pub fn eta(done: u64, total: u64, rate: Option<f64>) -> Option<Duration> {
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let remaining = total.saturating_sub(done) as f64;
    Duration::try_from_secs_f64(remaining / rate).ok()
}

/// One destination as a progress bar line (terminal mode):
/// `ap-shanghai img-xxxx [###########.........]  57%  584.0 MiB/1.0 GiB  42.1 MiB/s  ETA 10s`.
/// An unknown rate or ETA prints as `--`.
pub fn bar_line(
    region: &str,
    image_id: &str,
    done: u64,
    total: u64,
    rate: Option<f64>,
    eta: Option<Duration>,
) -> String {
    let pct = percent(done, total);
    let filled = (pct as usize * BAR_WIDTH / 100).min(BAR_WIDTH);
    format!(
        "{region} {image_id} [{}{}] {pct:>3}%  {}/{}  {}  ETA {}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        human_bytes(done),
        human_bytes(total),
        rate.map_or_else(|| "--".to_string(), human_rate),
        eta.map_or_else(|| "--".to_string(), human_duration),
    )
}

/// One destination as a plain line (not a terminal):
/// `ap-shanghai img-xxxx 60% 614 MiB/1024 MiB 40.2 MiB/s ETA 10s`. An unknown rate prints
/// as `--`; an unknown ETA is left out.
pub fn plain_line(
    region: &str,
    image_id: &str,
    done: u64,
    total: u64,
    rate: Option<f64>,
    eta: Option<Duration>,
) -> String {
    let mut line = format!(
        "{region} {image_id} {}% {} {}",
        percent(done, total),
        plain_bytes(done, total),
        rate.map_or_else(|| "--".to_string(), human_rate),
    );
    if let Some(eta) = eta {
        line.push_str(" ETA ");
        line.push_str(&human_duration(eta));
    }
    line
}

/// An image's transfer as (bytes done, bytes total): its `sync_progress` when it has one
/// with a total, else `sync_percent` of its virtual size. A NORMAL image is complete.
pub fn image_bytes(image: &Image) -> (u64, u64) {
    let (done, total) = match &image.sync_progress {
        Some(p) if p.bytes_total > 0 => (p.bytes_done.min(p.bytes_total), p.bytes_total),
        _ => {
            let total = image.virtual_size_bytes;
            let pct = u128::from(image.sync_percent.min(100));
            ((u128::from(total) * pct / 100) as u64, total)
        }
    };
    if image.image_state == ImageState::Normal as i32 {
        (total, total)
    } else {
        (done, total)
    }
}

/// What is known of one destination.
#[derive(Debug)]
struct Destination {
    region: String,
    image_id: String,
    /// The first poll's time and bytes done: the base of the rate.
    first: Option<(Instant, u64)>,
    done: u64,
    total: u64,
    rate: Option<f64>,
    /// The final state's name once NORMAL or CREATEFAILED.
    finished: Option<String>,
    /// The percent last printed in plain mode.
    printed_percent: Option<u32>,
    printed_final: bool,
}

/// Progress of several destination images, written to a `ProgressSink`.
pub struct SyncProgressView<'a> {
    sink: ProgressSink<'a>,
    destinations: Vec<Destination>,
    /// Lines of the last redraw (terminal mode), to move the cursor back over.
    drawn: usize,
}

impl<'a> SyncProgressView<'a> {
    /// One destination per `(region, image id)`, in that order.
    pub fn new(sink: ProgressSink<'a>, destinations: &[(String, String)]) -> Self {
        SyncProgressView {
            sink,
            destinations: destinations
                .iter()
                .map(|(region, image_id)| Destination {
                    region: region.clone(),
                    image_id: image_id.clone(),
                    first: None,
                    done: 0,
                    total: 0,
                    rate: None,
                    finished: None,
                    printed_percent: None,
                    printed_final: false,
                })
                .collect(),
            drawn: 0,
        }
    }

    /// Records destination `index` as polled at `now`.
    pub fn observe(&mut self, index: usize, now: Instant, image: &Image) {
        let Some(d) = self.destinations.get_mut(index) else {
            return;
        };
        let (done, total) = image_bytes(image);
        let (first_at, first_done) = *d.first.get_or_insert((now, done));
        d.done = done;
        d.total = total;
        d.rate = rate(first_done, done, now.saturating_duration_since(first_at)).or(d.rate);
        d.finished = match ImageState::try_from(image.image_state) {
            Ok(state @ (ImageState::Normal | ImageState::Createfailed)) => {
                Some(state.as_str_name().to_string())
            }
            _ => None,
        };
    }

    /// Writes what changed: every bar again (terminal), or the lines due (plain).
    pub fn render(&mut self) {
        let text = if self.sink.is_terminal() {
            self.bars()
        } else {
            self.plain_lines()
        };
        if !text.is_empty() {
            self.sink.write(&text);
        }
    }

    fn bars(&mut self) -> String {
        let region_width = self.width(|d| &d.region);
        let id_width = self.width(|d| &d.image_id);
        let mut text = String::new();
        if self.drawn > 0 {
            text.push_str(&format!("\x1b[{}A", self.drawn));
        }
        for d in &self.destinations {
            let eta = match d.finished {
                Some(_) => Some(Duration::ZERO),
                None => eta(d.done, d.total, d.rate),
            };
            let mut line = bar_line(
                &format!("{:<region_width$}", escape(&d.region)),
                &format!("{:<id_width$}", escape(&d.image_id)),
                d.done,
                d.total,
                d.rate,
                eta,
            );
            if let Some(state) = &d.finished {
                line.push_str("  ");
                line.push_str(state);
            }
            text.push_str("\r\x1b[2K");
            text.push_str(&line);
            text.push('\n');
        }
        self.drawn = self.destinations.len();
        text
    }

    fn width(&self, field: impl Fn(&Destination) -> &String) -> usize {
        self.destinations
            .iter()
            .map(|d| escape(field(d)).chars().count())
            .max()
            .unwrap_or(0)
    }

    fn plain_lines(&mut self) -> String {
        let mut text = String::new();
        for d in &mut self.destinations {
            if d.first.is_none() || d.printed_final {
                continue;
            }
            let pct = percent(d.done, d.total);
            let due = match (&d.finished, d.printed_percent) {
                (Some(_), _) | (None, None) => true,
                (None, Some(printed)) => pct.abs_diff(printed) >= PLAIN_STEP,
            };
            if !due {
                continue;
            }
            let eta = match d.finished {
                Some(_) => None,
                None => eta(d.done, d.total, d.rate),
            };
            text.push_str(&plain_line(
                &escape(&d.region),
                &escape(&d.image_id),
                d.done,
                d.total,
                d.rate,
                eta,
            ));
            if let Some(state) = &d.finished {
                text.push(' ');
                text.push_str(state);
                d.printed_final = true;
            }
            text.push('\n');
            d.printed_percent = Some(pct);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagefleet_proto::region::v1::SyncProgress;

    const MIB: u64 = 1024 * 1024;
    const GIB: u64 = 1024 * MIB;

    #[test]
    fn bytes_are_humanised_in_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(584 * MIB), "584.0 MiB");
        assert_eq!(human_bytes(GIB), "1.0 GiB");
        assert_eq!(human_bytes(1024 * 1024 * GIB), "1.0 PiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
    }

    #[test]
    fn rates_are_humanised_per_second() {
        assert_eq!(human_rate(0.0), "0 B/s");
        assert_eq!(human_rate(300.4), "300 B/s");
        assert_eq!(human_rate(42.1 * MIB as f64), "42.1 MiB/s");
        assert_eq!(human_rate(2.5 * GIB as f64), "2.5 GiB/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_rate(-5.0), "0 B/s");
    }

    #[test]
    fn durations_are_short() {
        assert_eq!(human_duration(Duration::ZERO), "0s");
        assert_eq!(human_duration(Duration::from_millis(9_600)), "10s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(3599)), "59m59s");
        assert_eq!(
            human_duration(Duration::from_secs(2 * 3600 + 3 * 60 + 9)),
            "2h03m"
        );
    }

    #[test]
    fn plain_bytes_keep_percent_precision() {
        assert_eq!(plain_bytes(614 * MIB, GIB), "614 MiB/1024 MiB");
        assert_eq!(plain_bytes(30 * GIB, 200 * GIB), "30 GiB/200 GiB");
        assert_eq!(plain_bytes(5 * MIB, 50 * GIB), "5 MiB/51200 MiB");
        assert_eq!(plain_bytes(10, 99), "10 B/99 B");
        assert_eq!(plain_bytes(0, 0), "0 B/0 B");
    }

    #[test]
    fn percent_rate_and_eta() {
        assert_eq!(percent(1, 3), 33);
        assert_eq!(percent(5, 0), 0);
        assert_eq!(percent(7, 5), 100);
        assert_eq!(percent(u64::MAX - 1, u64::MAX), 99);
        assert_eq!(rate(0, 100, Duration::ZERO), None);
        assert_eq!(rate(100, 600, Duration::from_secs(2)), Some(250.0));
        assert_eq!(rate(600, 100, Duration::from_secs(2)), Some(0.0));
        assert_eq!(eta(400, 1400, Some(250.0)), Some(Duration::from_secs(4)));
        assert_eq!(eta(400, 1400, Some(0.0)), None);
        assert_eq!(eta(400, 1400, None), None);
        assert_eq!(eta(1400, 1400, Some(10.0)), Some(Duration::ZERO));
    }

    #[test]
    fn bar_lines_show_bar_percent_bytes_rate_and_eta() {
        assert_eq!(
            bar_line(
                "ap-shanghai",
                "img-aaaaaaaa",
                584 * MIB,
                GIB,
                Some(42.1 * MIB as f64),
                Some(Duration::from_secs(10)),
            ),
            "ap-shanghai img-aaaaaaaa [###########.........]  57%  584.0 MiB/1.0 GiB  \
             42.1 MiB/s  ETA 10s"
        );
        assert_eq!(
            bar_line("r", "img-b", 0, 0, None, None),
            "r img-b [....................]   0%  0 B/0 B  --  ETA --"
        );
        assert_eq!(
            bar_line("r", "img-b", GIB, GIB, Some(1024.0), Some(Duration::ZERO)),
            "r img-b [####################] 100%  1.0 GiB/1.0 GiB  1.0 KiB/s  ETA 0s"
        );
    }

    #[test]
    fn plain_lines_show_percent_bytes_rate_and_eta() {
        assert_eq!(
            plain_line(
                "ap-shanghai",
                "img-aaaaaaaa",
                614 * MIB,
                GIB,
                Some(40.2 * MIB as f64),
                None,
            ),
            "ap-shanghai img-aaaaaaaa 59% 614 MiB/1024 MiB 40.2 MiB/s"
        );
        assert_eq!(
            plain_line(
                "ap-shanghai",
                "img-aaaaaaaa",
                GIB / 2,
                GIB,
                Some(MIB as f64),
                Some(Duration::from_secs(512)),
            ),
            "ap-shanghai img-aaaaaaaa 50% 512 MiB/1024 MiB 1.0 MiB/s ETA 8m32s"
        );
        assert_eq!(
            plain_line("r", "img-b", 0, 0, None, None),
            "r img-b 0% 0 B/0 B --"
        );
    }

    fn syncing(done: u64, total: u64) -> Image {
        Image {
            image_id: "img-dest0001".into(),
            image_state: ImageState::Syncing as i32,
            virtual_size_bytes: 4 * GIB,
            sync_percent: 10,
            sync_progress: Some(SyncProgress {
                bytes_done: done,
                bytes_total: total,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn image_bytes_prefer_sync_progress() {
        assert_eq!(image_bytes(&syncing(MIB, GIB)), (MIB, GIB));
        // No total in the progress: the percent of the virtual size.
        assert_eq!(image_bytes(&syncing(MIB, 0)), (4 * GIB / 10, 4 * GIB));
        let mut bare = syncing(0, 0);
        bare.sync_progress = None;
        bare.sync_percent = 50;
        assert_eq!(image_bytes(&bare), (2 * GIB, 4 * GIB));
        let mut normal = syncing(MIB, GIB);
        normal.image_state = ImageState::Normal as i32;
        assert_eq!(image_bytes(&normal), (GIB, GIB));
    }

    fn view_output(terminal: bool, polls: &[(usize, u64, ImageState)]) -> String {
        let mut out: Vec<u8> = Vec::new();
        {
            let mut view = SyncProgressView::new(
                ProgressSink::new(&mut out, terminal),
                &[
                    ("ap-shanghai".to_string(), "img-dest0001".to_string()),
                    ("ap-beijing".to_string(), "img-dest0002".to_string()),
                ],
            );
            let start = Instant::now();
            for (round, (index, done, state)) in polls.iter().enumerate() {
                let mut image = syncing(*done, 100 * MIB);
                image.image_state = *state as i32;
                view.observe(*index, start + Duration::from_secs(round as u64), &image);
                view.render();
            }
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn plain_mode_prints_every_ten_points_and_the_end() {
        use ImageState::{Createfailed, Normal, Syncing};
        let text = view_output(
            false,
            &[
                (0, 0, Syncing),
                (1, 50 * MIB, Syncing),
                (0, 5 * MIB, Syncing),
                (0, 10 * MIB, Syncing),
                (0, 12 * MIB, Syncing),
                (1, 50 * MIB, Createfailed),
                (0, 100 * MIB, Normal),
                (0, 100 * MIB, Normal),
            ],
        );
        assert_eq!(
            text,
            "ap-shanghai img-dest0001 0% 0 MiB/100 MiB --\n\
             ap-beijing img-dest0002 50% 50 MiB/100 MiB --\n\
             ap-shanghai img-dest0001 10% 10 MiB/100 MiB 3.3 MiB/s ETA 27s\n\
             ap-beijing img-dest0002 50% 50 MiB/100 MiB 0 B/s CREATEFAILED\n\
             ap-shanghai img-dest0001 100% 100 MiB/100 MiB 16.7 MiB/s NORMAL\n"
        );
    }

    #[test]
    fn terminal_mode_redraws_every_bar_in_place() {
        let text = view_output(
            true,
            &[
                (0, 0, ImageState::Syncing),
                (1, 50 * MIB, ImageState::Normal),
            ],
        );
        let frames: Vec<&str> = text.split("\x1b[2A").collect();
        assert_eq!(frames.len(), 2, "{text:?}");
        assert!(frames[0].starts_with("\r\x1b[2Kap-shanghai img-dest0001 [...."));
        assert_eq!(frames[0].matches('\n').count(), 2);
        assert!(frames[1].contains("ap-beijing  img-dest0002 [####################] 100%"));
        assert!(frames[1].trim_end().ends_with("ETA 0s  NORMAL"), "{text:?}");
    }
}
