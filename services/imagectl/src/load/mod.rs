//! `imagectl load`: the load generator (docs/load.md).
//!
//! A run has four phases: set-up (what the scenario needs: public images to use, custom
//! images to copy and share, copy destinations), warm-up (calls counted apart), the measured
//! window, and clean-up (what set-up and the operations made is removed). Closed loop:
//! `--concurrency` workers each start an operation when their last one ends. Open loop
//! (`--rps`): operations start on a fixed schedule whatever the answers, and each one's first
//! call is timed from its scheduled start, so a slow service shows in the latencies instead of
//! slowing the schedule (no coordinated omission).
//!
//! - `scenario`: built-in scenarios and the scenario file format.
//! - `ops`: the calls of set-up, of each operation and of clean-up.
//! - `stats`: the recorder: histograms per (operation, region), bounded time series.
//! - `report`: the HTML report with its SVG charts.

pub mod ops;
pub mod report;
pub mod scenario;
pub mod stats;

use crate::cli::{GlobalArgs, LoadArgs, OutputFormat};
use crate::error::{CliError, Result};
use crate::output::Table;
use crate::progress::Progress;
use crate::session::Session;
use imagefleet_rpc::cluster::ClusterFile;
use ops::{Fleet, Planned};
use scenario::{Kind, Scenario};
use serde::Serialize;
use stats::{Figures, OperationSummary, Recorder};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long operations in flight at the end of the window (or at Ctrl-C) may take to finish
/// before they are abandoned (what they made is still removed by clean-up).
pub const FINISH_GRACE: Duration = Duration::from_secs(30);

/// Waits for the tasks of `set` to end, at most `grace`; then abandons the rest.
async fn finish(set: &mut tokio::task::JoinSet<()>, grace: Duration) {
    let drained = async { while set.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        set.abort_all();
        while set.join_next().await.is_some() {}
    }
}

/// Workers of a closed-loop run unless `--concurrency` says.
pub const DEFAULT_CONCURRENCY: u32 = 4;
/// Operations in flight at most in an open-loop run unless `--concurrency` says.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 1000;

/// The fixed schedule of an open-loop run: operation `n` starts at `start + n / rate`,
/// however late the previous ones ran.
#[derive(Clone, Debug)]
pub struct Schedule {
    start: Instant,
    rate: f64,
    next: u64,
}

impl Schedule {
    pub fn new(start: Instant, rate: f64) -> Schedule {
        Schedule {
            start,
            rate,
            next: 0,
        }
    }

    /// When operation `n` is due.
    pub fn at(&self, n: u64) -> Instant {
        self.start + Duration::from_secs_f64(n as f64 / self.rate)
    }

    /// The next operation's due time; each call moves on by one.
    pub fn next_due(&mut self) -> Instant {
        let at = self.at(self.next);
        self.next += 1;
        at
    }

    /// Operations due strictly before `end`.
    pub fn count_before(&self, end: Instant) -> u64 {
        let secs = end.saturating_duration_since(self.start).as_secs_f64();
        (secs * self.rate).ceil() as u64
    }
}

/// Runs `operation(scheduled start)` on `schedule` until `end` (or `stop`), with at most
/// `max_in_flight` running; returns how many were started. An operation that waits for a
/// free slot keeps its scheduled start, so the wait counts in its latency.
pub async fn open_loop<F, Fut>(
    mut schedule: Schedule,
    end: Instant,
    max_in_flight: usize,
    mut stop: tokio::sync::watch::Receiver<bool>,
    operation: F,
) -> u64
where
    F: Fn(Instant) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut running = tokio::task::JoinSet::new();
    let mut started = 0;
    loop {
        let due = schedule.next_due();
        if due >= end || *stop.borrow() {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = stop.changed() => break,
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let fut = operation(due);
        running.spawn(async move {
            fut.await;
            drop(slot);
        });
        started += 1;
        // Reap what has finished: the set holds only what is in flight.
        while running.try_join_next().is_some() {}
    }
    finish(&mut running, FINISH_GRACE).await;
    started
}

/// Picks an operation by weight: `roll` in `0..total weight`.
fn pick(plan: &[Planned], roll: u64) -> &Planned {
    let mut left = roll;
    for p in plan {
        let w = u64::from(p.op.weight);
        if left < w {
            return p;
        }
        left -= w;
    }
    plan.last().expect("a plan has operations")
}

/// The JSON summary (docs/load.md).
#[derive(Debug, Serialize)]
pub struct Summary {
    pub scenario: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    pub concurrency: Option<u32>,
    pub rps: Option<f64>,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// The measured window as it ran (shorter when interrupted).
    pub measured_s: f64,
    pub total: Figures,
    pub operations: BTreeMap<String, OperationSummary>,
    /// Every call the run sent (set-up, warm-up, measured, clean-up), by operation and
    /// region: what the services' `imagefleet_rpc_calls_total` counted of this run.
    pub calls_sent: BTreeMap<String, BTreeMap<String, u64>>,
    /// Operations of the scenario left out because the cluster cannot run them.
    pub skipped: Vec<String>,
    /// What clean-up could not remove.
    pub cleanup_problems: Vec<String>,
}

/// The run's plan: operations resolved against the cluster file.
struct Plan {
    operations: Vec<Planned>,
    receivers: HashMap<String, String>,
    skipped: Vec<String>,
}

fn resolve(
    scenario: &Scenario,
    cluster: &ClusterFile,
    default_account: &str,
    regions_flag: &[String],
) -> Result<Plan> {
    let known_region = |r: &str| cluster.regions.iter().any(|x| x.region == r);
    let known_account = |a: &str| cluster.accounts.iter().any(|x| x.account_id == a);
    let first_region = cluster
        .regions
        .first()
        .map(|r| r.region.clone())
        .ok_or_else(|| CliError::Config("the cluster file lists no regions".into()))?;
    let mut operations = Vec::new();
    let mut receivers = HashMap::new();
    let mut skipped = Vec::new();
    for op in &scenario.operations {
        let regions = if !regions_flag.is_empty() {
            regions_flag.to_vec()
        } else if !op.regions.is_empty() {
            op.regions.clone()
        } else {
            vec![first_region.clone()]
        };
        let accounts = if op.accounts.is_empty() {
            vec![default_account.to_string()]
        } else {
            op.accounts.clone()
        };
        for r in regions.iter().chain(&op.to) {
            if !known_region(r) {
                return Err(CliError::Config(format!(
                    "scenario {}: unknown region {r} (the cluster file has: {})",
                    scenario.name,
                    cluster
                        .regions
                        .iter()
                        .map(|r| r.region.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        for a in &accounts {
            if !known_account(a) {
                return Err(CliError::Config(format!(
                    "scenario {}: unknown account {a}",
                    scenario.name
                )));
            }
        }
        if op.kind == Kind::Share {
            let mut missing = None;
            for a in &accounts {
                let receiver = scenario.share_with.clone().filter(|r| r != a).or_else(|| {
                    cluster
                        .accounts
                        .iter()
                        .map(|x| x.account_id.clone())
                        .find(|x| x != a)
                });
                match receiver {
                    Some(r) if known_account(&r) => {
                        receivers.insert(a.clone(), r);
                    }
                    Some(r) => {
                        return Err(CliError::Config(format!(
                            "scenario {}: share_with names unknown account {r}",
                            scenario.name
                        )))
                    }
                    None => missing = Some(a.clone()),
                }
            }
            if let Some(a) = missing {
                let why = format!(
                    "share needs a second account in the cluster file to share {a}'s images with"
                );
                if scenario.optional_needs {
                    skipped.push(why);
                    continue;
                }
                return Err(CliError::Config(why));
            }
        }
        if op.kind == Kind::Copy && op.to.is_empty() && cluster.regions.len() < 2 {
            let why = "copy needs a second region in the cluster file".to_string();
            if scenario.optional_needs {
                skipped.push(why);
                continue;
            }
            return Err(CliError::Config(why));
        }
        let to = regions.iter().map(|r| (r.clone(), op.to.clone())).collect();
        operations.push(Planned {
            op: op.clone(),
            accounts,
            regions,
            to,
        });
    }
    if operations.is_empty() {
        return Err(CliError::Config(format!(
            "scenario {}: no operation can run here",
            scenario.name
        )));
    }
    Ok(Plan {
        operations,
        receivers,
        skipped,
    })
}

/// `imagectl load`.
pub async fn run(
    global: &GlobalArgs,
    args: LoadArgs,
    format: OutputFormat,
    progress: &Progress,
) -> Result<String> {
    if format == OutputFormat::Id {
        return Err(CliError::Usage(
            "--output id is not printed by load; use --output table or json".into(),
        ));
    }
    if args.duration.is_zero() {
        return Err(CliError::Usage("--duration must be above 0".into()));
    }
    let scenario = scenario::load(&args.scenario).map_err(CliError::Config)?;
    let session = Session::open(&global.cluster, global.account.as_deref())?;
    let default_account = session.account().account_id.clone();
    let cluster = ClusterFile::load(&global.cluster).map_err(|e| {
        CliError::Config(format!(
            "cannot read cluster file {}: {e}",
            global.cluster.display()
        ))
    })?;
    let mut plan = resolve(&scenario, &cluster, &default_account, &args.region)?;
    let status = progress.status("load");
    for why in &plan.skipped {
        status.set(&format!("skipped: {why}"));
    }

    // Clients of every (account, region) the run may use.
    let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
    for p in &plan.operations {
        for a in &p.accounts {
            let regions: Vec<&String> = if p.op.kind == Kind::Copy {
                cluster.regions.iter().map(|r| &r.region).collect()
            } else {
                p.regions.iter().collect()
            };
            for r in regions {
                pairs.insert((a.clone(), r.clone()));
                if let Some(receiver) = plan.receivers.get(a).filter(|_| p.op.kind == Kind::Share) {
                    pairs.insert((receiver.clone(), r.clone()));
                }
            }
        }
    }
    let mut clients = HashMap::new();
    let mut sessions: HashMap<String, Session> = HashMap::new();
    for (a, r) in &pairs {
        if !sessions.contains_key(a) {
            sessions.insert(a.clone(), Session::new(cluster.clone(), Some(a))?);
        }
        clients.insert((a.clone(), r.clone()), sessions[a].region(r).await?);
    }

    let recorder = Arc::new(Recorder::default());
    let mut fleet = Fleet::new(recorder.clone(), clients, plan.receivers.clone());
    let closed = args.rps.is_none();
    let concurrency = args.concurrency.unwrap_or(if closed {
        DEFAULT_CONCURRENCY
    } else {
        DEFAULT_MAX_IN_FLIGHT
    });

    status.set(&format!("set-up of scenario {}", scenario.name));
    // Ctrl-C during set-up stops it; what it made so far is removed.
    let set_up = tokio::select! {
        done = set_up(&mut fleet, &mut plan, &cluster, concurrency, closed) => done,
        _ = tokio::signal::ctrl_c() => Err(CliError::Failed("interrupted during set-up".into())),
    };
    let fleet = Arc::new(fleet);
    if let Err(e) = set_up {
        status.set("set-up failed; cleaning up");
        let _ = fleet.clean_up().await;
        status.finish("set-up failed");
        return Err(e);
    }
    let links = if args.report.is_some() {
        Some(crate::links::list_all(&global.cluster).await)
    } else {
        None
    };

    // The run.
    let start = Instant::now();
    let from = start + args.warmup;
    let end = from + args.duration;
    recorder.measure(from, end);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let interrupted = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop_tx = stop_tx.clone();
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
                let _ = stop_tx.send(true);
            }
        });
    }
    let ticker = {
        let recorder = recorder.clone();
        let every = if progress.is_live() {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(10)
        };
        let mut stop_rx = stop_rx.clone();
        let status = status.clone();
        let line = move |now: Instant, live: &stats::Live, last: Instant| {
            let phase = if now < from {
                format!("warm-up {}/{}", secs(now - start), secs(args.warmup))
            } else {
                format!(
                    "measuring {}/{}",
                    secs(now.min(end) - from),
                    secs(args.duration)
                )
            };
            let window = now.saturating_duration_since(last).as_secs_f64().max(1e-3);
            format!(
                "{phase}  calls {}  errors {}  {:.1}/s  p50 {:.1}ms  p99 {:.1}ms",
                live.count,
                live.errors,
                live.recent_count as f64 / window,
                live.recent.quantile(0.5) / 1000.0,
                live.recent.quantile(0.99) / 1000.0
            )
        };
        tokio::spawn(async move {
            let mut last = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop_rx.changed() => return,
                }
                let now = Instant::now();
                let live = recorder.live();
                status.set(&line(now, &live, last));
                last = now;
            }
        })
    };
    let plan_ops = Arc::new(plan.operations.clone());
    let total_weight: u64 = plan_ops.iter().map(|p| u64::from(p.op.weight)).sum();
    if let Some(rps) = args.rps {
        let fleet = fleet.clone();
        let plan_ops = plan_ops.clone();
        open_loop(
            Schedule::new(start, rps),
            end,
            concurrency as usize,
            stop_rx.clone(),
            move |due| {
                let fleet = fleet.clone();
                let plan_ops = plan_ops.clone();
                async move {
                    let roll = rand::random_range(0..total_weight);
                    fleet.run_once(pick(&plan_ops, roll), Some(due)).await;
                }
            },
        )
        .await;
    } else {
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency {
            let fleet = fleet.clone();
            let plan_ops = plan_ops.clone();
            let stop_rx = stop_rx.clone();
            workers.spawn(async move {
                while Instant::now() < end && !*stop_rx.borrow() {
                    let roll = rand::random_range(0..total_weight);
                    fleet.run_once(pick(&plan_ops, roll), None).await;
                }
            });
        }
        // Workers stop at the end of the window (or at Ctrl-C) once their operation in flight
        // ends; one that does not end within the grace is abandoned.
        let mut stop_wait = stop_rx.clone();
        let ended = tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => true,
            _ = stop_wait.changed() => true,
            _ = async { while workers.join_next().await.is_some() {} } => false,
        };
        if ended {
            finish(&mut workers, FINISH_GRACE).await;
        }
    }
    // An open loop whose last operations ended early still measured until the end.
    if !interrupted.load(std::sync::atomic::Ordering::SeqCst) {
        let mut stop_wait = stop_rx.clone();
        tokio::select! {
            _ = tokio::time::sleep_until(end.into()) => {}
            _ = stop_wait.changed() => {}
        }
    }
    let stopped = Instant::now();
    recorder.close(stopped);
    let _ = stop_tx.send(true);
    let _ = ticker.await;
    let measured = stopped.min(end).saturating_duration_since(from);

    status.set("cleaning up");
    let cleanup_problems = fleet.clean_up().await;
    let snapshot = recorder.snapshot();
    let seconds = measured.as_secs_f64();
    let figures = stats::figures(&snapshot, seconds);
    let mut calls_sent: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for ((op, region), n) in &snapshot.sent {
        calls_sent
            .entry(op.clone())
            .or_default()
            .insert(region.clone(), *n);
    }
    let summary = Summary {
        scenario: scenario.name.clone(),
        mode: if closed { "closed" } else { "open" },
        concurrency: Some(concurrency),
        rps: args.rps,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        measured_s: (seconds * 1000.0).round() / 1000.0,
        total: figures.total,
        operations: figures.operations,
        calls_sent,
        skipped: plan.skipped.clone(),
        cleanup_problems,
    };
    status.finish(&format!(
        "done: {} calls, {} errors in {}{}",
        summary.total.count,
        summary.total.errors,
        secs(measured),
        if interrupted.load(std::sync::atomic::Ordering::SeqCst) {
            " (interrupted)"
        } else {
            ""
        }
    ));
    if let Some(path) = &args.report {
        let html = report::html(&summary, &snapshot.series, links.as_ref());
        std::fs::write(path, html)
            .map_err(|e| CliError::io(format!("cannot write report {}", path.display()), e))?;
    }
    match format {
        OutputFormat::Json => Ok(crate::output::json_document(
            &serde_json::to_value(&summary)
                .map_err(|e| CliError::Failed(format!("summary: {e}")))?,
        )),
        _ => Ok(table(&summary)),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.0}s", d.as_secs_f64())
}

/// Set-up: public images of every region, custom images for copy and share operations,
/// copy destinations.
async fn set_up(
    fleet: &mut Fleet,
    plan: &mut Plan,
    cluster: &ClusterFile,
    concurrency: u32,
    closed: bool,
) -> Result<()> {
    // Public images of every region an operation runs in, seen as one of its accounts.
    let mut regions: BTreeMap<String, String> = BTreeMap::new();
    for p in &plan.operations {
        for r in &p.regions {
            regions
                .entry(r.clone())
                .or_insert_with(|| p.accounts[0].clone());
        }
    }
    for (region, account) in &regions {
        fleet.find_public_images(account, region).await?;
    }
    // Custom images per (account, region): one copy source, a pool for shares.
    let pool = if closed {
        (concurrency as usize).min(ops::SHARE_POOL)
    } else {
        ops::SHARE_POOL
    };
    let mut needs: BTreeMap<(String, String), (bool, bool, u64, String)> = BTreeMap::new();
    for p in &plan.operations {
        if !matches!(p.op.kind, Kind::Copy | Kind::Share) {
            continue;
        }
        for a in &p.accounts {
            for r in &p.regions {
                let need = needs.entry((a.clone(), r.clone())).or_insert((
                    false,
                    false,
                    0,
                    p.op.instance_type.clone(),
                ));
                need.0 |= p.op.kind == Kind::Copy;
                need.1 |= p.op.kind == Kind::Share;
                need.2 = need.2.max(p.op.image_bytes);
            }
        }
    }
    for ((account, region), (copy, share, bytes, instance_type)) in &needs {
        let count = usize::from(*copy) + if *share { pool } else { 0 };
        let mut images = fleet
            .make_images(account, region, count as u32, *bytes, instance_type)
            .await?;
        if *copy {
            let source = images.pop().expect("an image per need");
            fleet.set_copy_source(account, region, source);
        }
        if *share {
            fleet.set_share_pool(account, region, images);
        }
    }
    // Copy destinations not given: the other regions a dry run accepts.
    let all: Vec<String> = cluster.regions.iter().map(|r| r.region.clone()).collect();
    for p in plan
        .operations
        .iter_mut()
        .filter(|p| p.op.kind == Kind::Copy)
    {
        for r in &p.regions {
            if !p.to[r].is_empty() {
                continue;
            }
            let to = fleet.copy_destinations(&p.accounts[0], r, &all).await;
            if to.is_empty() {
                return Err(CliError::Config(format!(
                    "copy: no region of the cluster file takes copies from {r} (a dry-run \
                     SyncImages refused every one)"
                )));
            }
            p.to.insert(r.clone(), to);
        }
    }
    Ok(())
}

/// The summary as a table per (operation, region), and the errors by reason.
pub fn table(summary: &Summary) -> String {
    let mut out = format!(
        "scenario {}: {} loop, {}, {:.0}s measured after {:.0}s warm-up\n",
        summary.scenario,
        summary.mode,
        match summary.rps {
            Some(rps) => format!("{rps}/s"),
            None => format!("{} workers", summary.concurrency.unwrap_or(0)),
        },
        summary.measured_s,
        summary.warmup_s
    );
    let mut t = Table::new(&[
        "OPERATION",
        "REGION",
        "COUNT",
        "ERRORS",
        "RATE/S",
        "P50_MS",
        "P90_MS",
        "P99_MS",
        "P999_MS",
        "MAX_MS",
    ]);
    let row = |t: &mut Table, op: &str, region: &str, f: &Figures| {
        t.row(vec![
            op.to_string(),
            region.to_string(),
            f.count.to_string(),
            f.errors.to_string(),
            format!("{:.1}", f.throughput_per_s),
            format!("{:.2}", f.p50_ms),
            format!("{:.2}", f.p90_ms),
            format!("{:.2}", f.p99_ms),
            format!("{:.2}", f.p999_ms),
            format!("{:.2}", f.max_ms),
        ]);
    };
    for (op, s) in &summary.operations {
        // Per region; with more than one region, the operation over all of them first.
        if s.regions.len() > 1 {
            row(&mut t, op, "(all)", &s.figures);
        }
        for (region, f) in &s.regions {
            row(&mut t, op, region, f);
        }
    }
    row(&mut t, "TOTAL", "(all)", &summary.total);
    out.push_str(&t.render());
    let mut errors = Table::new(&["OPERATION", "REGION", "CODE", "REASON", "COUNT"]);
    let mut any = false;
    for (op, s) in &summary.operations {
        for (region, f) in &s.regions {
            for e in &f.errors_by_reason {
                any = true;
                errors.row(vec![
                    op.clone(),
                    region.clone(),
                    e.code.clone(),
                    if e.reason.is_empty() {
                        "-".into()
                    } else {
                        e.reason.clone()
                    },
                    e.count.to_string(),
                ]);
            }
        }
    }
    if any {
        out.push_str("\nerrors:\n");
        out.push_str(&errors.render());
    }
    for s in &summary.skipped {
        out.push_str(&format!("skipped: {s}\n"));
    }
    for p in &summary.cleanup_problems {
        out.push_str(&format!("not cleaned up: {p}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_does_not_drift_or_wait_for_late_operations() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, 200.0);
        let first: Vec<Instant> = (0..3).map(|_| s.next_due()).collect();
        assert_eq!(first[0], t0);
        assert_eq!(first[2] - first[0], Duration::from_millis(10));
        // However late the caller comes back, the next start is where the schedule put it.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(s.next_due(), t0 + Duration::from_millis(15));
        assert_eq!(s.at(1000), t0 + Duration::from_secs(5));
        assert_eq!(s.count_before(t0 + Duration::from_secs(1)), 200);
        assert_eq!(s.count_before(t0 + Duration::from_millis(1001)), 201);
    }

    #[tokio::test]
    async fn the_open_loop_keeps_its_schedule_while_operations_are_slow() {
        let t0 = Instant::now() + Duration::from_millis(20);
        let rate = 200.0;
        let end = t0 + Duration::from_millis(250);
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorder = Arc::new(Recorder::default());
        recorder.measure(t0, end + Duration::from_secs(5));
        let started = {
            let seen = seen.clone();
            let recorder = recorder.clone();
            // Each operation takes 100 ms, and at most 4 run at once: far below the rate.
            open_loop(Schedule::new(t0, rate), end, 4, rx, move |due| {
                let seen = seen.clone();
                let recorder = recorder.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    recorder.record("Op", "r", due, Instant::now(), None);
                    seen.lock().unwrap().push(due);
                }
            })
            .await
        };
        // Every scheduled operation ran, late, with its scheduled start.
        assert_eq!(started, 50);
        let mut seen = seen.lock().unwrap().clone();
        seen.sort();
        let expected: Vec<Instant> = (0..50).map(|n| Schedule::new(t0, rate).at(n)).collect();
        assert_eq!(seen, expected);
        // Latency from the scheduled start: the last ones waited about a second for a slot.
        let f = stats::figures(&recorder.snapshot(), 1.0);
        let op = &f.operations["Op"];
        assert_eq!(op.figures.count, 50);
        assert!(op.figures.p50_ms >= 100.0, "{:?}", op.figures);
        assert!(op.figures.max_ms >= 900.0, "{:?}", op.figures);
    }

    #[test]
    fn operations_are_picked_by_weight() {
        let scenario = scenario::builtin("mixed").unwrap();
        let plan: Vec<Planned> = scenario
            .operations
            .iter()
            .map(|op| Planned {
                op: op.clone(),
                accounts: vec!["a".into()],
                regions: vec!["r".into()],
                to: BTreeMap::new(),
            })
            .collect();
        let kinds: Vec<Kind> = (0..10).map(|roll| pick(&plan, roll).op.kind).collect();
        use Kind::*;
        assert_eq!(
            kinds,
            [
                Describe, Describe, Describe, Describe, Describe, Describe, Launch, Launch, Copy,
                Share
            ]
        );
    }

    fn cluster(regions: &[&str], accounts: &[&str]) -> ClusterFile {
        ClusterFile {
            regions: regions
                .iter()
                .map(|r| imagefleet_rpc::cluster::RegionEndpoint {
                    region: r.to_string(),
                    endpoint: "http://127.0.0.1:1".into(),
                    metrics: String::new(),
                })
                .collect(),
            accounts: accounts
                .iter()
                .map(|a| imagefleet_rpc::cluster::AccountEntry {
                    account_id: a.to_string(),
                    name: a.to_string(),
                    secret_id: format!("AKID{a}"),
                    secret_key: "k".into(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn plans_resolve_regions_accounts_and_receivers() {
        let c = cluster(&["g", "s"], &["1", "2"]);
        let mixed = scenario::builtin("mixed").unwrap();
        let plan = resolve(&mixed, &c, "1", &[]).expect("resolves");
        assert_eq!(plan.operations.len(), 4);
        assert!(plan.operations.iter().all(|p| p.regions == ["g"]));
        assert_eq!(plan.receivers["1"], "2");
        let plan = resolve(&mixed, &c, "2", &["s".into()]).expect("resolves");
        assert!(plan.operations.iter().all(|p| p.regions == ["s"]));
        assert_eq!(plan.receivers["2"], "1");
        // One account, one region: mixed leaves out share and copy; share alone fails.
        let small = cluster(&["g"], &["1"]);
        let plan = resolve(&mixed, &small, "1", &[]).expect("resolves");
        assert_eq!(plan.operations.len(), 2);
        assert_eq!(plan.skipped.len(), 2);
        let share = scenario::builtin("share").unwrap();
        let err = resolve(&share, &small, "1", &[]).err().expect("refused");
        assert!(err.to_string().contains("second account"), "{err}");
        let err = resolve(&mixed, &c, "1", &["eu".into()])
            .err()
            .expect("refused");
        assert!(err.to_string().contains("unknown region eu"), "{err}");
    }
}
