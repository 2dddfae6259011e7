//! The HTML report of a load run: one self-contained page (inline CSS and SVG, no script, nothing
//! fetched) with the run's parameters, the summary table, errors by reason, charts of
//! throughput and latency over time per operation and region, and the link settings in force.

use super::stats::{Bucket, Figures, Key, TimeSeries};
use super::Summary;
use imagefleet_proto::region::v1::Link;
use std::collections::BTreeMap;
use std::fmt::Write as _;

const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// Escapes text for HTML and SVG.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// One line of a chart: its name and its points (x seconds, y value).
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A "nice" upper bound and step for an axis from 0 to `max`.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.25);
    }
    let raw = max / 4.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

fn number(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// A line chart as an inline `<svg>`: axes with ticks, one polyline per line, a legend.
pub fn line_chart(title: &str, y_label: &str, lines: &[Line]) -> String {
    const W: f64 = 760.0;
    const H: f64 = 240.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 28.0;
    const BOTTOM: f64 = 36.0;
    let legend_rows = lines.len().div_ceil(3) as f64;
    let total_h = H + legend_rows * 18.0 + 8.0;
    let x_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.0))
        .fold(0.0f64, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|l| l.points.iter().map(|p| p.1))
        .fold(0.0f64, f64::max);
    let (x_top, x_step) = nice_axis(x_max);
    let (y_top, y_step) = nice_axis(y_max);
    let px = |x: f64| LEFT + x / x_top * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - y / y_top) * (H - TOP - BOTTOM);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" viewBox="0 0 {W} {total_h}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = esc(title)
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="18" font-size="14" font-weight="bold">{}</text>"##,
        esc(title)
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= y_top + y_step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            py(y) + 4.0,
            number(y),
            py = py(y)
        );
        y += y_step;
    }
    let mut x = 0.0;
    while x <= x_top + x_step / 2.0 {
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" x2="{px:.1}" y1="{}" y2="{}" stroke="#999"/><text x="{px:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 4.0,
            H - BOTTOM + 16.0,
            number(x),
            px = px(x)
        );
        x += x_step;
    }
    let _ = write!(
        svg,
        r##"<line x1="{LEFT}" x2="{}" y1="{b}" y2="{b}" stroke="#333"/><line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{b}" stroke="#333"/>"##,
        W - RIGHT,
        b = H - BOTTOM
    );
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="middle">seconds into the measured window</text><text x="14" y="{}" font-size="11" transform="rotate(-90 14 {})" text-anchor="middle">{}</text>"##,
        (LEFT + W - RIGHT) / 2.0,
        H - 4.0,
        (TOP + H - BOTTOM) / 2.0,
        (TOP + H - BOTTOM) / 2.0,
        esc(y_label)
    );
    for (i, line) in lines.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let points: Vec<String> = line
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        if line.points.len() == 1 {
            let (x, y) = line.points[0];
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(x),
                py(y)
            );
        }
        let lx = LEFT + (i % 3) as f64 * 230.0;
        let ly = H + 4.0 + (i / 3) as f64 * 18.0;
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{}" width="12" height="4" fill="{colour}"/><text x="{}" y="{}" font-size="11">{}</text>"#,
            ly + 4.0,
            lx + 16.0,
            ly + 10.0,
            esc(&line.name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Points of a series: bucket middles against `value` of each non-empty bucket (throughput
/// counts empty buckets as 0).
fn points(
    buckets: &[Bucket],
    width: f64,
    value: impl Fn(&Bucket) -> Option<f64>,
) -> Vec<(f64, f64)> {
    buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| value(b).map(|v| ((i as f64 + 0.5) * width, v)))
        .collect()
}

fn figures_row(out: &mut String, op: &str, region: &str, f: &Figures) {
    let _ = write!(
        out,
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>",
        esc(op),
        esc(region),
        f.count,
        f.errors,
        f.throughput_per_s,
        f.p50_ms,
        f.p90_ms,
        f.p99_ms,
        f.p999_ms,
        f.max_ms,
        f.warmup_count
    );
}

/// The links section: the settings of every link, or why they are unavailable.
fn links_section(links: Option<&Result<Vec<Link>, String>>) -> String {
    let mut out = String::from("<h2>Link settings in force</h2>\n");
    match links {
        None => out.push_str("<p>unavailable: not asked for</p>\n"),
        Some(Err(why)) => {
            let _ = writeln!(out, "<p>unavailable: {}</p>", esc(why));
        }
        Some(Ok(links)) if links.is_empty() => {
            out.push_str(
                "<p>No emulated link is set: every region reaches the others directly.</p>\n",
            );
        }
        Some(Ok(links)) => {
            out.push_str("<table><tr><th>from</th><th>to</th><th>rtt</th><th>jitter</th><th>rate</th><th>loss</th><th>state</th></tr>\n");
            for l in links {
                let s = l.settings.clone().unwrap_or_default();
                let _ = writeln!(
                    out,
                    "<tr><td>{}</td><td>{}</td><td>{} ms</td><td>{} ms</td><td>{}</td><td>{}%</td><td>{}</td></tr>",
                    esc(&l.from_region),
                    esc(&l.to_region),
                    s.rtt_ms,
                    s.jitter_ms,
                    if s.rate_bps == 0 {
                        "unlimited".to_string()
                    } else {
                        format!("{} bit/s", s.rate_bps)
                    },
                    s.loss_percent,
                    if s.down { "DOWN" } else { "UP" }
                );
            }
            out.push_str("</table>\n");
        }
    }
    out
}

/// The report page.
pub fn html(
    summary: &Summary,
    series: &TimeSeries,
    links: Option<&Result<Vec<Link>, String>>,
) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>imagectl load: {}</title>\n<style>body{{font-family:sans-serif;margin:24px;max-width:980px}}table{{border-collapse:collapse;margin:8px 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child,td:nth-child(2),th{{text-align:left}}svg{{display:block;margin:12px 0}}</style></head><body>\n",
        esc(&summary.scenario)
    );
    let _ = writeln!(
        out,
        "<h1>Load run: {}</h1>\n<p>{} loop, {}; warm-up {:.0} s, measured {:.1} s of {:.0} s. Latencies are of successful calls{}; counts include errors.</p>",
        esc(&summary.scenario),
        summary.mode,
        match summary.rps {
            Some(rps) => format!("{rps} operations/s scheduled, at most {} in flight", summary.concurrency.unwrap_or(0)),
            None => format!("{} workers", summary.concurrency.unwrap_or(0)),
        },
        summary.warmup_s,
        summary.measured_s,
        summary.duration_s,
        if summary.rps.is_some() {
            ", each operation's first call timed from its scheduled start"
        } else {
            ""
        }
    );
    out.push_str("<h2>Summary</h2>\n<table><tr><th>operation</th><th>region</th><th>count</th><th>errors</th><th>calls/s</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>warm-up calls</th></tr>\n");
    for (op, s) in &summary.operations {
        figures_row(&mut out, op, "(all)", &s.figures);
        for (region, f) in &s.regions {
            figures_row(&mut out, op, region, f);
        }
    }
    figures_row(&mut out, "TOTAL", "(all)", &summary.total);
    out.push_str("</table>\n<h2>Errors by code and reason</h2>\n");
    let mut any = false;
    let mut errors = String::from(
        "<table><tr><th>operation</th><th>region</th><th>code</th><th>reason</th><th>count</th></tr>\n",
    );
    for (op, s) in &summary.operations {
        for (region, f) in &s.regions {
            for e in &f.errors_by_reason {
                any = true;
                let _ = writeln!(
                    errors,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(op),
                    esc(region),
                    esc(&e.code),
                    esc(&e.reason),
                    e.count
                );
            }
        }
    }
    errors.push_str("</table>\n");
    if any {
        out.push_str(&errors);
    } else {
        out.push_str("<p>None.</p>\n");
    }

    // Charts.
    let width = series.width().as_secs_f64();
    let name = |(op, region): &Key| format!("{op} {region}");
    let per_s = |b: &Bucket| Some(b.count as f64 / width);
    let quantile =
        |q: f64| move |b: &Bucket| (b.latency.count() > 0).then(|| b.latency.quantile(q) / 1000.0);
    let _ = writeln!(
        out,
        "<h2>Over time</h2>\n<p>Buckets of {} s (at most {} per run; adjacent buckets merge as the run goes on).</p>",
        number(width),
        series.capacity()
    );
    let all: Vec<Line> = series
        .series()
        .iter()
        .map(|(k, b)| Line {
            name: name(k),
            points: points(b, width, per_s),
        })
        .collect();
    out.push_str(&line_chart(
        "Throughput by operation and region",
        "calls/s",
        &all,
    ));
    out.push('\n');
    let mut by_op: BTreeMap<&str, Vec<(&Key, &Vec<Bucket>)>> = BTreeMap::new();
    for (k, b) in series.series() {
        by_op.entry(k.0.as_str()).or_default().push((k, b));
    }
    for (op, keys) in &by_op {
        let _ = writeln!(out, "<h3>{}</h3>", esc(op));
        let throughput: Vec<Line> = keys
            .iter()
            .map(|(k, b)| Line {
                name: k.1.clone(),
                points: points(b, width, per_s),
            })
            .collect();
        out.push_str(&line_chart(
            &format!("{op}: throughput by region"),
            "calls/s",
            &throughput,
        ));
        out.push('\n');
        let mut latency = Vec::new();
        for (k, b) in keys {
            latency.push(Line {
                name: format!("{} p50", k.1),
                points: points(b, width, quantile(0.5)),
            });
            latency.push(Line {
                name: format!("{} p99", k.1),
                points: points(b, width, quantile(0.99)),
            });
        }
        out.push_str(&line_chart(
            &format!("{op}: latency by region (successful calls)"),
            "ms",
            &latency,
        ));
        out.push('\n');
    }
    out.push_str(&links_section(links));
    out.push_str("<h2>Calls sent</h2>\n<p>Every call of the run, set-up and clean-up included, by operation and region.</p>\n<table><tr><th>operation</th><th>region</th><th>calls</th></tr>\n");
    for (op, regions) in &summary.calls_sent {
        for (region, n) in regions {
            let _ = writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{n}</td></tr>",
                esc(op),
                esc(region)
            );
        }
    }
    out.push_str("</table>\n");
    for s in &summary.skipped {
        let _ = writeln!(out, "<p>Skipped: {}</p>", esc(s));
    }
    for p in &summary.cleanup_problems {
        let _ = writeln!(out, "<p>Not cleaned up: {}</p>", esc(p));
    }
    out.push_str("</body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_a_line_and_a_legend_entry_per_series() {
        let svg = line_chart(
            "Throughput <all>",
            "calls/s",
            &[
                Line {
                    name: "DescribeImages ap-guangzhou".into(),
                    points: vec![(0.5, 10.0), (1.5, 12.0), (2.5, 9.0)],
                },
                Line {
                    name: "RunInstances ap-guangzhou".into(),
                    points: vec![(0.5, 1.0)],
                },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("DescribeImages ap-guangzhou"));
        assert!(svg.contains("Throughput &lt;all&gt;"));
        assert!(!svg.contains("NaN"));
        // No data at all still draws axes.
        let empty = line_chart("nothing", "ms", &[]);
        assert!(empty.contains("<line") && !empty.contains("NaN"));
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_axis(9.0), (10.0, 2.5));
        assert_eq!(nice_axis(130.0), (150.0, 50.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.25));
    }
}
