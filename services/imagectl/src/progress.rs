//! Progress of long operations on stderr (copies with `images sync --wait`; imports and load
//! runs use the same tasks). Never on stdout: stdout carries only the command's result.
//!
//! A [`Progress`] hands out [`Task`]s: one per transfer, with a total in bytes (known from the
//! start, or set once the server knows it), updated by position and finished with a message.
//!
//! - On a terminal, every task is an `indicatif` bar in one multi-bar: percent, bytes of the
//!   total, rate and ETA, redrawn in place.
//! - Otherwise (a pipe, a log, CI), plain lines: one when the total becomes known, one each
//!   time the percent crosses a 10-point step, and one at the end. Each task's byte figures
//!   are in one unit, chosen from its total, on every line; the rate is measured from the
//!   first position seen, on a clock that tests can replace ([`Clock`]).

use crate::output::escape;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Elapsed time since some fixed start: the real clock, or a fake one in tests.
pub trait Clock: Send + Sync {
    fn now(&self) -> Duration;
}

/// The real clock.
#[derive(Debug)]
pub struct SystemClock(Instant);

impl SystemClock {
    pub fn new() -> Self {
        SystemClock(Instant::now())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Where plain lines go, and the clock their rates are measured on.
struct PlainOut {
    out: Box<dyn Write + Send>,
    clock: Arc<dyn Clock>,
}

impl PlainOut {
    /// Best effort: a closed stderr does not fail the command.
    fn line(&mut self, line: &str) {
        let _ = writeln!(self.out, "{line}").and_then(|_| self.out.flush());
    }
}

enum Mode {
    Bars(MultiProgress),
    Plain(Arc<Mutex<PlainOut>>),
    Hidden,
}

/// The progress display of one command.
pub struct Progress {
    mode: Mode,
}

impl Progress {
    /// Progress on this process's stderr: bars on a terminal, plain lines otherwise.
    pub fn stderr() -> Self {
        if std::io::stderr().is_terminal() {
            Progress::bars(ProgressDrawTarget::stderr())
        } else {
            Progress::plain(Box::new(std::io::stderr()), Arc::new(SystemClock::new()))
        }
    }

    /// Bars drawn on `target` (a terminal, or a recording one in tests).
    pub fn bars(target: ProgressDrawTarget) -> Self {
        Progress {
            mode: Mode::Bars(MultiProgress::with_draw_target(target)),
        }
    }

    /// Plain lines written to `out`, rates measured on `clock`.
    pub fn plain(out: Box<dyn Write + Send>, clock: Arc<dyn Clock>) -> Self {
        Progress {
            mode: Mode::Plain(Arc::new(Mutex::new(PlainOut { out, clock }))),
        }
    }

    /// No progress at all.
    pub fn hidden() -> Self {
        Progress { mode: Mode::Hidden }
    }

    /// A task named `label` (escaped before it is shown) whose total is not known yet.
    pub fn task(&self, label: &str) -> Task {
        let label = escape(label).into_owned();
        let kind = match &self.mode {
            // The bar is drawn once there is something to show (a total or the end), so its
            // first frame already has the total.
            Mode::Bars(multi) => TaskKind::Bar {
                multi: multi.clone(),
                bar: None,
            },
            Mode::Plain(out) => {
                let started = lock(out).clock.now();
                TaskKind::Plain {
                    out: out.clone(),
                    started,
                }
            }
            Mode::Hidden => TaskKind::Hidden,
        };
        Task {
            label,
            kind,
            total: None,
            position: 0,
            first: None,
            printed_step: None,
            done: false,
        }
    }

    /// A task with its total known from the start.
    pub fn task_with_total(&self, label: &str, total_bytes: u64) -> Task {
        let mut task = self.task(label);
        task.set_total(total_bytes);
        task
    }

    /// Whether progress is redrawn in place (a terminal): callers may then update a
    /// [`Status`] often; otherwise every update is a line of its own.
    pub fn is_live(&self) -> bool {
        matches!(self.mode, Mode::Bars(_))
    }

    /// A status line named `label` (escaped): one line of text replaced by each update (a
    /// spinner on a terminal; a plain line per update otherwise). Load runs show their
    /// counters in one.
    pub fn status(&self, label: &str) -> Status {
        let label = escape(label).into_owned();
        let kind = match &self.mode {
            Mode::Bars(multi) => {
                let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                    .with_style(
                        ProgressStyle::with_template("{prefix} {spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    )
                    .with_prefix(label.clone());
                let bar = multi.add(bar);
                bar.enable_steady_tick(Duration::from_millis(200));
                StatusKind::Bar(bar)
            }
            Mode::Plain(out) => StatusKind::Plain(out.clone()),
            Mode::Hidden => StatusKind::Hidden,
        };
        Status { label, kind }
    }
}

#[derive(Clone)]
enum StatusKind {
    Bar(ProgressBar),
    Plain(Arc<Mutex<PlainOut>>),
    Hidden,
}

/// One line of text about a long run, replaced by each update (see [`Progress::status`]).
/// Clones show on the same line.
#[derive(Clone)]
pub struct Status {
    label: String,
    kind: StatusKind,
}

impl Status {
    /// Shows `message` (escaped): in place on a terminal, as a line `LABEL MESSAGE` otherwise.
    pub fn set(&self, message: &str) {
        let message = escape(message);
        match &self.kind {
            StatusKind::Bar(bar) => bar.set_message(message.into_owned()),
            StatusKind::Plain(out) => lock(out).line(&format!("{} {message}", self.label)),
            StatusKind::Hidden => {}
        }
    }

    /// Ends the line with `message`: the spinner stops, the last text stays.
    pub fn finish(&self, message: &str) {
        let message = escape(message);
        match &self.kind {
            StatusKind::Bar(bar) => bar.finish_with_message(message.into_owned()),
            StatusKind::Plain(out) => lock(out).line(&format!("{} {message}", self.label)),
            StatusKind::Hidden => {}
        }
    }
}

fn lock(out: &Mutex<PlainOut>) -> std::sync::MutexGuard<'_, PlainOut> {
    out.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A bar's rate: `--` until something has moved.
fn rate_key(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let rate = state.per_sec();
    let _ = if state.pos() > 0 && rate.is_finite() && rate > 0.0 {
        write!(w, "{}", human_rate(rate))
    } else {
        write!(w, "--")
    };
}

/// A bar's ETA: `ETA --` until there is a rate, nothing once the position is the total.
fn eta_key(state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let rate = state.per_sec();
    let remaining = state.len().unwrap_or(0).saturating_sub(state.pos());
    let _ = if remaining == 0 {
        Ok(())
    } else if state.pos() > 0 && rate.is_finite() && rate > 0.0 {
        let left = eta(state.pos(), state.pos() + remaining, Some(rate)).unwrap_or_default();
        write!(w, "ETA {}", human_duration(left))
    } else {
        write!(w, "ETA --")
    };
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix} [{bar:20}] {percent:>3}%  {binary_bytes}/{binary_total_bytes}  {rate}  {eta_text}",
    )
    .map(|s| {
        s.progress_chars("#>.")
            .with_key("rate", rate_key)
            .with_key("eta_text", eta_key)
    })
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn finished_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix} [{bar:20}] {percent:>3}%  {binary_bytes}/{binary_total_bytes}  in {elapsed}  {msg}",
    )
    .map(|s| s.progress_chars("#>."))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
}

enum TaskKind {
    Bar {
        multi: MultiProgress,
        bar: Option<ProgressBar>,
    },
    Plain {
        out: Arc<Mutex<PlainOut>>,
        /// When the task was made.
        started: Duration,
    },
    Hidden,
}

/// One transfer: a total in bytes, a position, and an end.
pub struct Task {
    label: String,
    kind: TaskKind,
    total: Option<u64>,
    position: u64,
    /// The first position seen once the total was known, and when: the base of the rate.
    first: Option<(Duration, u64)>,
    /// The 10-point step of the last plain line.
    printed_step: Option<u32>,
    done: bool,
}

/// How far the percent must move before plain mode prints again.
const PLAIN_STEP: u32 = 10;

impl Task {
    /// Sets the total. Progress is shown against it from here on.
    pub fn set_total(&mut self, total_bytes: u64) {
        if self.total == Some(total_bytes) {
            return;
        }
        self.total = Some(total_bytes);
        self.position = self.position.min(total_bytes);
        if let TaskKind::Bar { multi, bar } = &mut self.kind {
            let label = &self.label;
            let position = self.position;
            let bar = bar.get_or_insert_with(|| {
                // Styled before it joins the multi-bar: its first frame is the real one.
                let bar =
                    ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::hidden())
                        .with_style(bar_style())
                        .with_prefix(label.clone())
                        .with_position(position);
                multi.add(bar)
            });
            bar.set_length(total_bytes);
            bar.set_position(position);
            bar.reset_eta();
        }
        self.set_position(self.position);
    }

    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// Sets how many bytes of the total are done.
    pub fn set_position(&mut self, bytes: u64) {
        if self.done {
            return;
        }
        let Some(total) = self.total else {
            self.position = bytes;
            return;
        };
        let bytes = bytes.min(total);
        self.position = bytes;
        match &self.kind {
            TaskKind::Bar { bar, .. } => {
                if let Some(bar) = bar {
                    bar.set_position(bytes);
                }
            }
            TaskKind::Plain { out, .. } => {
                let mut out = lock(out);
                let now = out.clock.now();
                let (first_at, first_done) = *self.first.get_or_insert((now, bytes));
                let step = percent(bytes, total) / PLAIN_STEP;
                if self.printed_step.is_some_and(|printed| printed >= step) {
                    return;
                }
                self.printed_step = Some(step);
                let rate = rate(first_done, bytes, now.saturating_sub(first_at));
                let mut line = format!(
                    "{} {}% {}",
                    self.label,
                    percent(bytes, total),
                    bytes_of(bytes, total)
                );
                if let Some(rate) = rate.filter(|r| *r > 0.0) {
                    line.push_str(&format!(" {}", human_rate(rate)));
                    if let Some(eta) = eta(bytes, total, Some(rate)) {
                        line.push_str(&format!(" ETA {}", human_duration(eta)));
                    }
                }
                out.line(&line);
            }
            TaskKind::Hidden => {}
        }
    }

    /// The task is complete: the position goes to the total, and `message` (e.g. the final
    /// state) ends its line.
    pub fn finish(&mut self, message: &str) {
        if let Some(total) = self.total {
            self.position = total;
            if let TaskKind::Bar { bar: Some(bar), .. } = &self.kind {
                bar.set_position(total);
            }
        }
        self.end(message, true);
    }

    /// The task ended without completing: `message` says why.
    pub fn fail(&mut self, message: &str) {
        self.end(message, false);
    }

    fn end(&mut self, message: &str, complete: bool) {
        if self.done {
            return;
        }
        self.done = true;
        let message = escape(message).into_owned();
        match &mut self.kind {
            TaskKind::Bar { multi, bar } => {
                let label = &self.label;
                let bar = bar.get_or_insert_with(|| {
                    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
                        .with_prefix(label.clone());
                    multi.add(bar)
                });
                if self.total.is_some() {
                    bar.set_style(finished_style());
                } else {
                    bar.set_style(
                        ProgressStyle::with_template("{prefix} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    );
                }
                if complete {
                    bar.finish_with_message(message);
                } else {
                    bar.abandon_with_message(message);
                }
            }
            TaskKind::Plain { out, started } => {
                let mut out = lock(out);
                let now = out.clock.now();
                let line = match self.total {
                    None => format!("{} {message}", self.label),
                    Some(total) => {
                        let mut line = format!(
                            "{} {}% {}",
                            self.label,
                            percent(self.position, total),
                            bytes_of(self.position, total)
                        );
                        if complete {
                            line.push_str(&format!(
                                " in {}",
                                human_duration(now.saturating_sub(*started))
                            ));
                            let average = self.first.and_then(|(at, first)| {
                                rate(first, self.position, now.saturating_sub(at))
                            });
                            if let Some(average) = average.filter(|r| *r > 0.0) {
                                line.push_str(&format!(" ({})", human_rate(average)));
                            }
                        }
                        line.push(' ');
                        line.push_str(&message);
                        line
                    }
                };
                out.line(&line);
            }
            TaskKind::Hidden => {}
        }
    }
}

const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

/// The unit a total is shown in: the largest it reaches at least once.
fn unit_of(total: u64) -> usize {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && total >> (10 * (unit + 1)) >= 1 {
        unit += 1;
    }
    unit
}

fn in_unit(bytes: u64, unit: usize) -> String {
    if unit == 0 {
        return bytes.to_string();
    }
    format!("{:.1}", bytes as f64 / (1u64 << (10 * unit)) as f64)
}

/// `done` of `total` in the total's unit, one decimal: `60.0/200.0 MiB`, `512/900 B`.
pub fn bytes_of(done: u64, total: u64) -> String {
    let unit = unit_of(total);
    format!(
        "{}/{} {}",
        in_unit(done, unit),
        in_unit(total, unit),
        UNITS[unit]
    )
}

/// `bytes` in the largest binary unit it reaches, one decimal: `512 B`, `584.0 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    let unit = unit_of(bytes);
    format!("{} {}", in_unit(bytes, unit), UNITS[unit])
}

/// A rate in bytes per second: `42.1 MiB/s`, `300 B/s`.
pub fn human_rate(bytes_per_second: f64) -> String {
    let mut value = if bytes_per_second.is_finite() {
        bytes_per_second.max(0.0)
    } else {
        0.0
    };
    if value < 1024.0 {
        return format!("{value:.0} B/s");
    }
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}/s", UNITS[unit])
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

/// Whole percent of `done` in `total` (0 when the total is 0), at most 100.
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

/// How long the rest takes at `rate`, in whole seconds rounded up; `None` when nothing
/// moves or nothing is left.
pub fn eta(done: u64, total: u64, rate: Option<f64>) -> Option<Duration> {
    let rate = rate.filter(|r| r.is_finite() && *r > 0.0)?;
    let remaining = total.saturating_sub(done);
    if remaining == 0 {
        return None;
    }
    Duration::try_from_secs_f64((remaining as f64 / rate).ceil()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A clock moved by hand, in milliseconds.
    #[derive(Default)]
    struct FakeClock(AtomicU64);

    impl FakeClock {
        fn set_secs(&self, secs: u64) {
            self.0.store(secs * 1000, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_millis(self.0.load(Ordering::SeqCst))
        }
    }

    /// A buffer shared with the `Progress` writing into it.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn byte_figures_keep_the_totals_unit() {
        assert_eq!(bytes_of(0, 200 * MIB), "0.0/200.0 MiB");
        assert_eq!(bytes_of(7 * MIB, 7 * MIB), "7.0/7.0 MiB");
        assert_eq!(bytes_of(512, 900), "512/900 B");
        assert_eq!(bytes_of(MIB / 2, 50 << 30), "0.0/50.0 GiB");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_rate(300.0), "300 B/s");
        assert_eq!(human_rate(42.1 * MIB as f64), "42.1 MiB/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_duration(Duration::from_secs(65)), "1m05s");
        assert_eq!(human_duration(Duration::from_secs(7380)), "2h03m");
    }

    #[test]
    fn percent_rate_and_eta() {
        assert_eq!(percent(0, 0), 0);
        assert_eq!(percent(5, 10), 50);
        assert_eq!(percent(20, 10), 100);
        assert_eq!(rate(0, 100, Duration::ZERO), None);
        assert_eq!(rate(10, 110, Duration::from_secs(2)), Some(50.0));
        assert_eq!(eta(50, 150, Some(50.0)), Some(Duration::from_secs(2)));
        assert_eq!(eta(50, 150, Some(0.0)), None);
        assert_eq!(eta(150, 150, Some(50.0)), None);
        assert_eq!(eta(0, 10, Some(4.0)), Some(Duration::from_secs(3)));
    }

    #[test]
    fn plain_lines_are_stable_snapshots() {
        let out = Shared::default();
        let clock = Arc::new(FakeClock::default());
        let progress = Progress::plain(Box::new(out.clone()), clock.clone());
        let mut copy = progress.task("ap-shanghai img-aaaaaaaa");
        // Nothing is printed before the total is known.
        copy.set_position(0);
        clock.set_secs(1);
        copy.set_total(200 * MIB);
        for (secs, mib) in [(2, 10), (3, 30), (4, 35), (5, 70), (6, 190)] {
            clock.set_secs(secs);
            copy.set_position(mib * MIB);
        }
        clock.set_secs(7);
        copy.finish("NORMAL");
        let mut failed = progress.task_with_total("ap-beijing img-bbbbbbbb", 10 * MIB);
        clock.set_secs(9);
        failed.set_position(4 * MIB);
        failed.fail("CREATEFAILED: source image changed");
        let mut unknown = progress.task("ap-tokyo img-cccccccc");
        unknown.finish("NORMAL");
        assert_eq!(
            out.text(),
            "ap-shanghai img-aaaaaaaa 0% 0.0/200.0 MiB\n\
             ap-shanghai img-aaaaaaaa 15% 30.0/200.0 MiB 15.0 MiB/s ETA 12s\n\
             ap-shanghai img-aaaaaaaa 35% 70.0/200.0 MiB 17.5 MiB/s ETA 8s\n\
             ap-shanghai img-aaaaaaaa 95% 190.0/200.0 MiB 38.0 MiB/s ETA 1s\n\
             ap-shanghai img-aaaaaaaa 100% 200.0/200.0 MiB in 7s (33.3 MiB/s) NORMAL\n\
             ap-beijing img-bbbbbbbb 0% 0.0/10.0 MiB\n\
             ap-beijing img-bbbbbbbb 40% 4.0/10.0 MiB 2.0 MiB/s ETA 3s\n\
             ap-beijing img-bbbbbbbb 40% 4.0/10.0 MiB CREATEFAILED: source image changed\n\
             ap-tokyo img-cccccccc NORMAL\n"
        );
    }

    /// A terminal that records what indicatif draws.
    #[derive(Debug, Default, Clone)]
    struct RecordingTerm(Arc<Mutex<Vec<String>>>);

    impl indicatif::TermLike for RecordingTerm {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().unwrap().push(s.to_string());
            Ok(())
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            if !s.is_empty() {
                self.0.lock().unwrap().push(s.to_string());
            }
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn terminal_bars_show_the_total_from_the_first_frame_and_end_without_an_eta() {
        let term = RecordingTerm::default();
        let progress = Progress::bars(ProgressDrawTarget::term_like_with_hz(
            Box::new(term.clone()),
            255,
        ));
        let mut copy = progress.task_with_total("ap-shanghai img-aaaaaaaa", 200 * MIB);
        copy.set_position(0);
        copy.set_position(50 * MIB);
        copy.finish("NORMAL");
        let frames = term.0.lock().unwrap().clone();
        let bars: Vec<&String> = frames
            .iter()
            .filter(|f| f.contains("ap-shanghai img-aaaaaaaa ["))
            .collect();
        // The first frame drawn is the bar with its total; before anything moved there is no
        // rate and no ETA to show.
        let first = frames.first().expect("a frame was drawn");
        assert!(
            first.contains("ap-shanghai img-aaaaaaaa [") && first.contains("0 B/200.00 MiB"),
            "{frames:?}"
        );
        assert!(first.contains("  --  ETA --"), "{first}");
        let last = bars.last().expect("a bar was drawn");
        assert!(
            last.contains("100%") && last.contains("200.00 MiB/200.00 MiB"),
            "{frames:?}"
        );
        assert!(last.ends_with("NORMAL") && !last.contains("ETA"), "{last}");
        // Every frame measures against the same total.
        for bar in &bars {
            assert!(bar.contains("/200.00 MiB"), "{bar}");
        }
    }

    #[test]
    fn status_lines_are_plain_lines_off_a_terminal() {
        let out = Shared::default();
        let progress = Progress::plain(Box::new(out.clone()), Arc::new(FakeClock::default()));
        assert!(!progress.is_live());
        let status = progress.status("load");
        status.set("measuring 10s/60s  calls 5");
        // A clone writes to the same place.
        status.clone().set("cleaning up\u{1b}[2J");
        status.finish("done: 5 calls");
        assert_eq!(
            out.text(),
            "load measuring 10s/60s  calls 5\nload cleaning up\\u{1b}[2J\nload done: 5 calls\n"
        );
        Progress::hidden().status("x").set("nothing");
    }

    #[test]
    fn hidden_progress_draws_nothing() {
        let progress = Progress::hidden();
        let mut task = progress.task_with_total("x", 10);
        task.set_position(5);
        task.finish("done");
        assert_eq!(task.total(), Some(10));
    }
}
