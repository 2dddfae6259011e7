//! The command line: global flags, command groups and their arguments (clap derive).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Where `imagectl` looks for the cluster file when neither `--cluster` nor
/// `IMAGEFLEET_CLUSTER` says.
pub const DEFAULT_CLUSTER_FILE: &str = "./imagefleet-data/cluster.json";

#[derive(Debug, Parser)]
#[command(
    name = "imagectl",
    version,
    about = "Command-line client of imagefleet: regions, images and instances"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command accepts, before or after the subcommand.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// The cluster file (endpoints and accounts) of the cluster to talk to.
    #[arg(
        long,
        global = true,
        value_name = "FILE",
        env = "IMAGEFLEET_CLUSTER",
        default_value = DEFAULT_CLUSTER_FILE
    )]
    pub cluster: PathBuf,
    /// The account to act as; default: the first account in the cluster file.
    #[arg(long, global = true, value_name = "ID")]
    pub account: Option<String>,
    /// How to print results: tables for people, one JSON document for programs (shapes in
    /// docs/cli.md), only the ids the command names, one a line, or (billing commands only)
    /// CSV with a header row.
    #[arg(long, global = true, value_enum, default_value_t = OutputFlag::Table)]
    pub output: OutputFlag,
}

/// What `--output` accepts. Each command takes the formats that make sense for it:
/// `OutputFormat` (table, json, id) for the resource commands, `BillingFormat` (table, json,
/// csv) for the billing commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFlag {
    /// Aligned columns, with a total line under lists.
    Table,
    /// One JSON document: proto3 JSON of the resources (docs/cli.md).
    Json,
    /// Only the ids of what the command lists, makes or changes, one a line.
    Id,
    /// Comma-separated values with a header row (billing commands only).
    Csv,
}

/// How a resource command (regions, images, instances, instance types) prints its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Table,
    Json,
    Id,
}

/// How a billing command prints its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingFormat {
    Table,
    Json,
    Csv,
}

impl OutputFlag {
    /// The format of a resource command; `csv` is refused (a usage error naming the commands
    /// that print it).
    pub fn for_resources(self) -> Result<OutputFormat, String> {
        match self {
            OutputFlag::Table => Ok(OutputFormat::Table),
            OutputFlag::Json => Ok(OutputFormat::Json),
            OutputFlag::Id => Ok(OutputFormat::Id),
            OutputFlag::Csv => Err(
                "--output csv is printed by the billing commands only (billing prices, \
                 billing inquire, billing report); use --output table, json or id here"
                    .to_string(),
            ),
        }
    }

    /// The format of a billing command; `id` is refused (a bill or a price names no resource
    /// of its own).
    pub fn for_billing(self) -> Result<BillingFormat, String> {
        match self {
            OutputFlag::Table => Ok(BillingFormat::Table),
            OutputFlag::Json => Ok(BillingFormat::Json),
            OutputFlag::Csv => Ok(BillingFormat::Csv),
            OutputFlag::Id => Err(
                "--output id is not printed by the billing commands; use --output table, json \
                 or csv"
                    .to_string(),
            ),
        }
    }
}

/// The image types `images list --type` accepts.
pub const IMAGE_TYPES: [&str; 3] = ["PUBLIC_IMAGE", "PRIVATE_IMAGE", "SHARED_IMAGE"];
/// The image states `images list --state` accepts.
pub const IMAGE_STATES: [&str; 7] = [
    "CREATING",
    "NORMAL",
    "CREATEFAILED",
    "SYNCING",
    "IMPORTING",
    "IMPORTFAILED",
    "DELETING",
];
/// The instance states `instances list --state` accepts.
pub const INSTANCE_STATES: [&str; 4] = ["PENDING", "RUNNING", "STOPPED", "TERMINATED"];

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Regions of the cluster.
    #[command(subcommand)]
    Regions(RegionsCommand),
    /// Images of a region.
    #[command(subcommand)]
    Images(ImagesCommand),
    /// Instances of a region.
    #[command(subcommand)]
    Instances(InstancesCommand),
    /// Instance types a region offers.
    #[command(subcommand, name = "instance-types")]
    InstanceTypes(InstanceTypesCommand),
    /// Prices, the price of a launch, and the account's bill.
    #[command(subcommand)]
    Billing(BillingCommand),
    /// Emulated network links between regions (operators; docs/links.md).
    #[command(subcommand)]
    Links(LinksCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish or powershell).
    ///
    /// bash: `source <(imagectl completions bash)`; zsh: `imagectl completions zsh >
    /// "${fpath[1]}/_imagectl"`; fish: `imagectl completions fish >
    /// ~/.config/fish/completions/imagectl.fish`.
    Completions(CompletionsArgs),
    /// Print the manual page (roff), generated from the same definitions as `--help`.
    ///
    /// `imagectl man | man -l -` reads it; `imagectl man --out DIR` writes one page per
    /// command (imagectl.1, imagectl-images.1, imagectl-images-list.1, ...).
    Man(ManArgs),
    /// Generate load against the cluster and report throughput, errors and latency.
    ///
    /// SCENARIO is a built-in scenario (describe, launch, copy, share, mixed) or a scenario
    /// file (TOML; format in docs/load.md). Set-up (before the warm-up) makes what the
    /// scenario needs, and the end removes it. Live progress goes to stderr; at the end the
    /// summary per operation and region goes to stdout (`--output json`: one JSON document,
    /// shape in docs/load.md), and `--report` writes an HTML report with charts.
    Load(LoadArgs),
}

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// A built-in scenario (describe, launch, copy, share, mixed) or the path of a scenario
    /// file.
    #[arg(value_name = "SCENARIO")]
    pub scenario: String,
    /// Closed loop: this many workers, each starting its next operation when the last ends
    /// (default 4). With --rps: the most operations in flight at once (default 1000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: Option<u32>,
    /// Open loop: start this many operations per second on a fixed schedule, whatever the
    /// answers; latency is measured from each operation's scheduled start.
    #[arg(long, value_name = "RATE", value_parser = parse_rps)]
    pub rps: Option<f64>,
    /// How long to measure, after the warm-up (e.g. 30s, 10m, 2h).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub duration: std::time::Duration,
    /// How long to run before measuring; calls started in the warm-up are counted apart
    /// (`warmup_count`) and left out of the figures.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub warmup: std::time::Duration,
    /// The regions every operation runs in, separated by commas (instead of the scenario's);
    /// default: the scenario's, else the first region of the cluster file.
    #[arg(long, value_name = "REGION[,REGION...]", value_delimiter = ',')]
    pub region: Vec<String>,
    /// Also write an HTML report (charts of throughput and latency over time per operation
    /// and region, the summary, the link settings in force) to this file.
    #[arg(long, value_name = "PATH")]
    pub report: Option<PathBuf>,
}

/// A duration such as `500ms`, `30s`, `10m` or `2h` (humantime).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("not a duration such as 30s, 10m or 2h ({e})"))
}

/// A rate in operations per second: a positive number up to 1,000,000.
pub fn parse_rps(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 && rate <= 1_000_000.0 => Ok(rate),
        _ => Err("not a rate: a number of operations per second above 0, up to 1000000".into()),
    }
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell the script is for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write one page per command into this directory instead of the top page to stdout.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum InstanceTypesCommand {
    /// List the instance types of a region (for `instances run --type`).
    List(InstanceTypesList),
}

#[derive(Debug, Args)]
pub struct InstanceTypesList {
    #[command(flatten)]
    pub region: RegionArg,
    /// Only this family (e.g. S5); repeat for several.
    #[arg(long, value_name = "FAMILY")]
    pub family: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum BillingCommand {
    /// Show the price book in force: instance-hours by type, the Windows and licence fees,
    /// snapshot storage and its free tier (DescribePriceBook).
    Prices(BillingPrices),
    /// Price a launch before making it: instance-hours, the image fee with the lineage that
    /// causes it, and (for an own image) its snapshot storage (InquiryPriceRunInstances).
    Inquire(BillingInquire),
    /// Show the account's bill for a period: one line per item billed, the totals of each
    /// kind and the grand total (DescribeBill).
    Report(BillingReport),
}

#[derive(Debug, Args)]
pub struct BillingPrices {
    /// Only this region, e.g. ap-singapore; default: every region the book prices.
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
}

#[derive(Debug, Args)]
pub struct BillingInquire {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image to launch from.
    #[arg(long, value_name = "ID")]
    pub image: String,
    /// The instance type, e.g. S5.MEDIUM4 (`imagectl instance-types list` shows them all).
    #[arg(long = "type", value_name = "TYPE")]
    pub instance_type: String,
    /// How many instances (1 to 100; default 1).
    #[arg(long, value_name = "N")]
    pub count: Option<u32>,
    /// For how many hours (1 to 8784; default 1).
    #[arg(long, value_name = "H")]
    pub hours: Option<u64>,
}

#[derive(Debug, Args)]
pub struct BillingReport {
    /// Start of the period, RFC 3339 (2026-12-01T00:00:00Z or with an offset, +08:00);
    /// default: the start of the current month.
    #[arg(long, value_name = "TIME", value_parser = parse_rfc3339)]
    pub from: Option<Rfc3339>,
    /// End of the period, RFC 3339; default: now. Clock hours are billed whole: the period
    /// covers every hour it touches.
    #[arg(long, value_name = "TIME", value_parser = parse_rfc3339)]
    pub to: Option<Rfc3339>,
}

/// A time given on the command line in RFC 3339: as typed, and as unix seconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rfc3339 {
    pub text: String,
    pub unix: i64,
}

/// Parses an RFC 3339 date-time (`2026-12-01T00:00:00Z`, `2026-12-01T08:00:00.5+08:00`; `t`
/// and `z` in lower case too). Times before 1970 are refused.
pub fn parse_rfc3339(text: &str) -> Result<Rfc3339, String> {
    let unix = rfc3339_seconds(text).map_err(|why| {
        format!("not an RFC 3339 time such as 2026-12-01T00:00:00Z or 2026-12-01T08:00:00+08:00 ({why})")
    })?;
    Ok(Rfc3339 {
        text: text.to_string(),
        unix,
    })
}

fn rfc3339_seconds(text: &str) -> Result<i64, &'static str> {
    fn digits(s: &str, what: &'static str) -> Result<i64, &'static str> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(what);
        }
        s.parse().map_err(|_| what)
    }
    let b = text.as_bytes();
    if b.len() < 20 || !b.is_ascii() {
        return Err("too short: a date, T, a time and Z or an offset");
    }
    if b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err("expected YYYY-MM-DDTHH:MM:SS");
    }
    let year = digits(&text[0..4], "bad year")?;
    let month = digits(&text[5..7], "bad month")?;
    let day = digits(&text[8..10], "bad day")?;
    let hour = digits(&text[11..13], "bad hour")?;
    let minute = digits(&text[14..16], "bad minute")?;
    let second = digits(&text[17..19], "bad second")?;
    let mut rest = &text[19..];
    if let Some(fraction) = rest.strip_prefix('.') {
        let end = fraction
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(fraction.len());
        if end == 0 {
            return Err("a decimal point without digits");
        }
        rest = &fraction[end..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let h = digits(&rest[1..3], "bad offset hours")?;
            let m = digits(&rest[4..6], "bad offset minutes")?;
            if h > 23 || m > 59 {
                return Err("offset out of range");
            }
            let secs = h * 3600 + m * 60;
            if rest.starts_with('-') {
                -secs
            } else {
                secs
            }
        }
        "" => return Err("no time zone: end with Z or an offset like +08:00"),
        _ => return Err("bad time zone: end with Z or an offset like +08:00"),
    };
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err("month out of range"),
    };
    if day < 1 || day > days_in_month {
        return Err("day out of range");
    }
    // A leap second (:60) is read as the last second of its minute.
    if hour > 23 || minute > 59 || second > 60 {
        return Err("time of day out of range");
    }
    let unix =
        days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second.min(59)
            - offset;
    if unix < 0 {
        return Err("before 1970");
    }
    Ok(unix)
}

/// Days from 1970-01-01 to the given proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Debug, Subcommand)]
pub enum LinksCommand {
    /// Change links: `A,B=SPEC` each (both directions; SPEC as in docs/links.md, e.g.
    /// `rtt:100ms,rate:100mbit`, `down`, `up`, `none`), sent to both regions of each pair.
    Set {
        /// One or more links, `A,B=SPEC` each: two regions and the settings of the link
        /// between them (e.g. `ap-guangzhou,ap-singapore=rtt:180ms,rate:200mbit`).
        #[arg(required = true, value_name = "A,B=SPEC")]
        links: Vec<String>,
    },
    /// List every region's outgoing links: one row per ordered pair.
    List,
}

#[derive(Debug, Subcommand)]
pub enum RegionsCommand {
    /// List the regions the catalog knows, with their endpoints.
    List,
}

#[derive(Debug, Args)]
pub struct RegionArg {
    /// The region, e.g. ap-guangzhou.
    #[arg(long, value_name = "REGION")]
    pub region: String,
}

/// Offset/limit paging, or every page with `--all`.
#[derive(Debug, Args)]
pub struct PageArgs {
    /// Results per page (default 20, at most 100).
    #[arg(long, value_name = "N")]
    pub limit: Option<u32>,
    /// Results to skip (the table's last line says where the next page starts).
    #[arg(long, value_name = "N")]
    pub offset: Option<u32>,
    /// Follow the page tokens until every result is fetched.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// List the images the account sees in a region.
    List(ImagesList),
    /// Show every field of one image.
    Describe(ImagesDescribe),
    /// Create a custom image from an instance.
    Create(ImagesCreate),
    /// Delete custom images.
    Delete(ImagesDelete),
    /// Change an image's name, description or deprecated flag.
    Modify(ImagesModify),
    /// Export an image as a disk file (raw, qcow2, vhd or vmdk).
    Export(ImagesExport),
    /// Import a disk file (raw, qcow2, vmdk, vhd, vhdx; iso with --force) as a custom image.
    ///
    /// With `--file` the file is streamed to the region, which checks its headers first (a
    /// refusal leaves no image) and reads it as it arrives; the command ends when the image is
    /// NORMAL, or fails with the gRPC code and reason. With `--url` the region pulls the file;
    /// the command ends once its headers are checked (the image is IMPORTING), or with
    /// `--wait` when the import has ended. Prints the image as `images describe` does (with
    /// `--output json`, the image list shape `{"imageSet": [Image]}`); progress goes to
    /// stderr.
    Import(ImagesImport),
    /// List the platforms, OS versions, architectures and formats an import may declare.
    ImportOs(ImportOs),
    /// Show the account's quotas in a region (images, instances, stored bytes) and its usage.
    Quota(RegionArg),
    /// Copy custom images of --region to the --to regions (SyncImages).
    ///
    /// Without `--wait` it prints the destination images it started, as they are right after
    /// the call: a table SOURCE_IMAGE_ID REGION IMAGE_ID STATE, or with `--output json` the
    /// image list shape `{"imageSet": [Image, ...], "totalCount": N}`, each Image with one
    /// field added, `sourceImageId` (the image it copies), in the order SyncImages returned
    /// them. `--dry-run` prints the plan instead: SOURCE_IMAGE_ID REGION IMAGE_ID (no ids), or
    /// the `SyncImagesResponse`.
    ///
    /// With `--wait` it polls every destination image (every 250 ms, for at most 2 hours)
    /// until all are NORMAL or CREATEFAILED, showing each one's progress on stderr: bars on a
    /// terminal, otherwise a plain line when a destination's total is known, each time its
    /// percent crosses a 10-point step, and when it ends. It exits 1 if any destination ended
    /// CREATEFAILED (naming each with its state reason); on success it prints the final images
    /// as above.
    Sync(ImagesSync),
    /// Share an own custom image with other accounts (ModifyImageSharePermission SHARE).
    ///
    /// Prints `shared <ID> with A, B`, or `{}` with `--output json`.
    Share(ImagesShare),
    /// Cancel an image's shares with accounts (ModifyImageSharePermission CANCEL).
    ///
    /// Prints `unshared <ID> from A, B`, or `{}` with `--output json`.
    Unshare(ImagesShare),
    /// List the accounts an image is shared with: a table ACCOUNT_ID SHARED_TIME, or the
    /// `DescribeImageSharePermissionResponse` as proto3 JSON.
    Shares(ImagesShares),
}

#[derive(Debug, Args)]
pub struct ImagesList {
    #[command(flatten)]
    pub region: RegionArg,
    /// Only images of this type (SHARED_IMAGE: shared with the account by others).
    #[arg(long = "type", value_name = "TYPE", value_parser = IMAGE_TYPES)]
    pub image_type: Option<String>,
    /// Only images with this exact name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Only images of this platform (e.g. Ubuntu, CentOS, Windows).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// Only images in this state.
    #[arg(long, value_name = "STATE", value_parser = IMAGE_STATES)]
    pub state: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct ImagesDescribe {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id.
    #[arg(long, value_name = "ID")]
    pub image: String,
}

#[derive(Debug, Args)]
pub struct ImagesCreate {
    #[command(flatten)]
    pub region: RegionArg,
    /// The instance whose system disk becomes the image.
    #[arg(long, value_name = "ID")]
    pub instance: String,
    /// The new image's name (unique per account and region; at most 60 characters).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The new image's description (at most 256 characters).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Wait until the image is NORMAL (or failed), then print the image.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct ImagesDelete {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image ids, separated by commas.
    #[arg(
        long,
        value_name = "ID[,ID...]",
        value_delimiter = ',',
        required = true
    )]
    pub image: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImagesModify {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id.
    #[arg(long, value_name = "ID")]
    pub image: String,
    /// The image's new name (unique per account and region).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The image's new description.
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Mark the image deprecated (true) or not (false).
    #[arg(long, value_name = "true|false")]
    pub deprecated: Option<bool>,
}

#[derive(Debug, Args)]
pub struct ImagesExport {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id; repeat (up to 10) to export several images in one call, into `--dir`.
    #[arg(long, value_name = "ID", required = true)]
    pub image: Vec<String>,
    /// The file format written: raw (the disk's bytes, sparse), qcow2 (v3), vhd (dynamic) or
    /// vmdk (streamOptimized).
    #[arg(long, value_name = "FORMAT", value_parser = EXPORT_FORMATS, default_value = "raw")]
    pub format: String,
    /// The file to write (created or truncated, sparse); `-` writes the bytes to stdout
    /// (zeros included) and the summary to stderr. One image only.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "dir",
        conflicts_with = "dir"
    )]
    pub out: Option<PathBuf>,
    /// The directory to write each image into, as `<image id>.<format>` (raw: `.raw`).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The formats `images export` writes.
pub const EXPORT_FORMATS: [&str; 4] = ["raw", "qcow2", "vhd", "vmdk"];
/// The formats `images import --format` may declare.
pub const IMPORT_FORMATS: [&str; 6] = ["raw", "qcow2", "vmdk", "vhd", "vhdx", "iso"];

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["file", "url"])))]
pub struct ImagesImport {
    #[command(flatten)]
    pub region: RegionArg,
    /// The disk file to upload; `-` reads stdin (a pipe needs --size).
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// An http:// or https:// URL the region pulls the file from.
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
    /// The file's size in bytes, when --file - is a pipe.
    #[arg(long, value_name = "BYTES", requires = "file")]
    pub size: Option<u64>,
    /// The new image's name (unique per account and region; at most 60 characters).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// The new image's description (at most 256 characters).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// The file's format, if known; it is always detected from the content, and a declared
    /// format the content contradicts is refused.
    #[arg(long, value_name = "FORMAT", value_parser = IMPORT_FORMATS)]
    pub format: Option<String>,
    /// The image's platform (`images import-os` lists them), e.g. Ubuntu; default `Other`
    /// (with version `-`).
    #[arg(long, value_name = "PLATFORM")]
    pub platform: Option<String>,
    /// The platform's version (`images import-os` lists them); needed with --platform.
    #[arg(long, value_name = "VERSION", requires = "platform")]
    pub os_version: Option<String>,
    /// The image's architecture.
    #[arg(long = "arch", value_name = "ARCH", value_parser = ["x86_64", "arm64"])]
    pub architecture: Option<String>,
    /// Accept an ISO 9660 file (imported as its raw bytes).
    #[arg(long)]
    pub force: bool,
    /// With --url: wait until the import has ended (NORMAL, or IMPORTFAILED with the reason).
    #[arg(long, requires = "url")]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct ImportOs {
    #[command(flatten)]
    pub region: RegionArg,
}

#[derive(Debug, Args)]
pub struct ImagesSync {
    #[command(flatten)]
    pub region: RegionArg,
    /// The images to copy (own NORMAL custom images, at most 10), separated by commas.
    #[arg(
        long,
        value_name = "ID[,ID...]",
        value_delimiter = ',',
        required = true
    )]
    pub image: Vec<String>,
    /// The destination regions (at most 10), separated by commas.
    #[arg(
        long,
        value_name = "REGION[,REGION...]",
        value_delimiter = ',',
        required = true
    )]
    pub to: Vec<String>,
    /// The copies' name; default: each source image's name.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Makes retries safe: a repeated call with the same token (and the same images and
    /// regions) returns the same destination images instead of starting new copies.
    #[arg(long, value_name = "TOKEN")]
    pub client_token: Option<String>,
    /// Check every rule at every destination, start nothing.
    #[arg(long, conflicts_with = "wait")]
    pub dry_run: bool,
    /// Wait until every copy is NORMAL (or failed), showing progress on stderr.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct ImagesShare {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id.
    #[arg(long, value_name = "ID")]
    pub image: String,
    /// The accounts (12-digit ids, at most 500), separated by commas.
    #[arg(
        long,
        value_name = "ACCOUNT[,ACCOUNT...]",
        value_delimiter = ',',
        required = true
    )]
    pub accounts: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ImagesShares {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id.
    #[arg(long, value_name = "ID")]
    pub image: String,
}

#[derive(Debug, Subcommand)]
pub enum InstancesCommand {
    /// Launch instances from an image.
    Run(InstancesRun),
    /// List the account's instances in a region.
    List(InstancesList),
    /// Terminate instances.
    Terminate(InstancesTerminate),
    /// Reinstall an instance's system disk from an image.
    Reset(InstancesReset),
    /// Write a local file into an instance's system disk.
    Write(InstancesWrite),
    /// Read a range of an instance's system disk into a local file.
    Read(InstancesRead),
}

#[derive(Debug, Args)]
pub struct InstancesRun {
    #[command(flatten)]
    pub region: RegionArg,
    /// The image id.
    #[arg(long, value_name = "ID")]
    pub image: String,
    /// The instance type, e.g. S5.MEDIUM4 (`imagectl instance-types list` shows them all).
    #[arg(long = "type", value_name = "TYPE")]
    pub instance_type: String,
    /// How many instances (1 to 100; default 1).
    #[arg(long, value_name = "N")]
    pub count: Option<u32>,
    /// System disk size in GiB; default 50, at least the image's size.
    #[arg(long, value_name = "GIB")]
    pub disk_size_gib: Option<u64>,
    /// The instances' name: as given for one instance, NAME-1 .. NAME-N when --count is more
    /// than 1; without it, each instance is named by its id.
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// Wait until every instance is RUNNING (instances start PENDING), then print them.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct InstancesList {
    #[command(flatten)]
    pub region: RegionArg,
    /// Only these instances (ids separated by commas).
    #[arg(long, value_name = "ID[,ID...]", value_delimiter = ',')]
    pub instance: Vec<String>,
    /// Only instances launched from this image.
    #[arg(long, value_name = "ID")]
    pub image: Option<String>,
    /// Only instances in this state.
    #[arg(long, value_name = "STATE", value_parser = INSTANCE_STATES)]
    pub state: Option<String>,
    #[command(flatten)]
    pub page: PageArgs,
}

#[derive(Debug, Args)]
pub struct InstancesTerminate {
    #[command(flatten)]
    pub region: RegionArg,
    /// The instance ids, separated by commas.
    #[arg(
        long,
        value_name = "ID[,ID...]",
        value_delimiter = ',',
        required = true
    )]
    pub instance: Vec<String>,
}

#[derive(Debug, Args)]
pub struct InstancesReset {
    #[command(flatten)]
    pub region: RegionArg,
    /// The instance id.
    #[arg(long, value_name = "ID")]
    pub instance: String,
    /// The image to reinstall from; default: the instance's current image.
    #[arg(long, value_name = "ID")]
    pub image: Option<String>,
}

#[derive(Debug, Args)]
pub struct InstancesWrite {
    #[command(flatten)]
    pub region: RegionArg,
    /// The instance id.
    #[arg(long, value_name = "ID")]
    pub instance: String,
    /// Byte offset on the disk where the file's first byte goes.
    #[arg(long, value_name = "N")]
    pub offset: u64,
    /// The local file whose bytes are written; `-` reads them from stdin.
    #[arg(long, value_name = "FILE")]
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct InstancesRead {
    #[command(flatten)]
    pub region: RegionArg,
    /// The instance id.
    #[arg(long, value_name = "ID")]
    pub instance: String,
    /// Byte offset on the disk of the first byte read.
    #[arg(long, value_name = "N")]
    pub offset: u64,
    /// How many bytes to read.
    #[arg(long, value_name = "BYTES")]
    pub length: u64,
    /// Where the bytes go: a local file (created or truncated), or `-` (the default) for
    /// stdout, with the summary line on stderr.
    #[arg(long, value_name = "FILE", default_value = "-")]
    pub out: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("imagectl").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every flag and argument of every command, with the command's path.
    fn every_arg(command: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in command.get_arguments() {
            out.push((path.to_string(), arg.clone()));
        }
        for sub in command.get_subcommands() {
            every_arg(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_and_command_has_help_text() {
        let mut command = Cli::command();
        command.build();
        let mut args = Vec::new();
        every_arg(&command, "imagectl", &mut args);
        assert!(args.len() > 50, "{}", args.len());
        for (path, arg) in &args {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            assert!(
                arg.get_help()
                    .is_some_and(|h| !h.to_string().trim().is_empty()),
                "{path} --{id} has no help text"
            );
        }
        fn commands(command: &clap::Command, path: &str) {
            for sub in command.get_subcommands() {
                let path = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" {
                    assert!(sub.get_about().is_some(), "{path} has no help text");
                }
                commands(sub, &path);
            }
        }
        commands(&command, "imagectl");
    }

    #[test]
    fn enumerations_list_their_valid_values_when_refused() {
        for args in [
            &["images", "list", "--region", "r", "--state", "BAD"][..],
            &["images", "list", "--region", "r", "--type", "BAD"][..],
            &["instances", "list", "--region", "r", "--state", "BAD"][..],
            &["regions", "list", "--output", "yaml"][..],
            &["completions", "tcsh"][..],
        ] {
            let err = parse(args).expect_err("refused").to_string();
            assert!(err.contains("possible values"), "{args:?}: {err}");
        }
        let err = parse(&["images", "list", "--region", "r", "--state", "BAD"])
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("NORMAL") && err.contains("CREATEFAILED"),
            "{err}"
        );
    }

    #[test]
    fn output_takes_table_json_id_or_csv() {
        for (value, expected) in [
            ("table", OutputFlag::Table),
            ("json", OutputFlag::Json),
            ("id", OutputFlag::Id),
            ("csv", OutputFlag::Csv),
        ] {
            let cli = parse(&["regions", "list", "--output", value]).expect("parses");
            assert_eq!(cli.global.output, expected);
        }
    }

    #[test]
    fn csv_is_for_billing_and_id_is_not() {
        assert_eq!(OutputFlag::Id.for_resources(), Ok(OutputFormat::Id));
        assert_eq!(OutputFlag::Table.for_resources(), Ok(OutputFormat::Table));
        let err = OutputFlag::Csv.for_resources().expect_err("refused");
        assert!(err.contains("billing commands only"), "{err}");
        assert_eq!(OutputFlag::Csv.for_billing(), Ok(BillingFormat::Csv));
        assert_eq!(OutputFlag::Json.for_billing(), Ok(BillingFormat::Json));
        let err = OutputFlag::Id.for_billing().expect_err("refused");
        assert!(err.contains("table, json or csv"), "{err}");
    }

    #[test]
    fn rfc3339_times_parse_to_unix_seconds() {
        for (text, unix) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2026-12-01T00:00:00Z", 1_796_083_200),
            ("2026-12-01t08:00:00+08:00", 1_796_083_200),
            ("2026-11-30T19:30:00.999-04:30", 1_796_083_200),
            ("2024-02-29T23:59:59z", 1_709_251_199),
            ("2016-12-31T23:59:60Z", 1_483_228_799),
        ] {
            assert_eq!(parse_rfc3339(text).map(|t| t.unix), Ok(unix), "{text}");
        }
        for bad in [
            "",
            "yesterday",
            "2026-12-01",
            "2026-12-01T00:00:00",
            "2026-12-01 00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T00:00:00.Z",
            "2026-12-01T00:00:00+0800",
            "2026-12-01T00:00:00+08:60",
            "1969-12-31T23:59:59Z",
            "2026-12-01T00:00:00Zjunk",
            "+2026-12-01T00:00:00Z",
        ] {
            let err = parse_rfc3339(bad).expect_err(bad);
            assert!(err.contains("not an RFC 3339 time"), "{bad}: {err}");
        }
    }

    #[test]
    fn billing_commands_take_their_flags() {
        let cli = parse(&[
            "billing",
            "inquire",
            "--region",
            "ap-singapore",
            "--image",
            "img-aaaaaaaa",
            "--type",
            "S5.MEDIUM4",
            "--count",
            "2",
            "--hours",
            "10",
        ])
        .expect("parses");
        let Command::Billing(BillingCommand::Inquire(inquire)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(inquire.region.region, "ap-singapore");
        assert_eq!(inquire.instance_type, "S5.MEDIUM4");
        assert_eq!((inquire.count, inquire.hours), (Some(2), Some(10)));
        let cli = parse(&["billing", "report"]).expect("parses");
        let Command::Billing(BillingCommand::Report(report)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!((report.from, report.to), (None, None));
        let err = parse(&["billing", "report", "--from", "last week"]).expect_err("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--from"), "{err}");
        let cli = parse(&["billing", "prices"]).expect("parses");
        assert!(matches!(
            cli.command,
            Command::Billing(BillingCommand::Prices(BillingPrices { region: None }))
        ));
    }

    #[test]
    fn read_writes_to_stdout_unless_told_otherwise() {
        let cli = parse(&[
            "instances",
            "read",
            "--region",
            "r",
            "--instance",
            "ins-aaaaaaaa",
            "--offset",
            "0",
            "--length",
            "5",
        ])
        .expect("parses");
        let Command::Instances(InstancesCommand::Read(read)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(read.out, PathBuf::from("-"));
        assert!(crate::is_stdio(&read.out));
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let before = parse(&[
            "--cluster",
            "/tmp/c.json",
            "--account",
            "100000000002",
            "--output",
            "json",
            "images",
            "list",
            "--region",
            "ap-guangzhou",
        ])
        .expect("parses");
        let after = parse(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--output",
            "json",
            "--account",
            "100000000002",
            "--cluster",
            "/tmp/c.json",
        ])
        .expect("parses");
        for cli in [before, after] {
            assert_eq!(cli.global.cluster, PathBuf::from("/tmp/c.json"));
            assert_eq!(cli.global.account.as_deref(), Some("100000000002"));
            assert_eq!(cli.global.output, OutputFlag::Json);
        }
    }

    #[test]
    fn output_defaults_to_table() {
        let cli = parse(&["regions", "list"]).expect("parses");
        assert_eq!(cli.global.output, OutputFlag::Table);
        assert_eq!(cli.global.account, None);
    }

    #[test]
    fn images_list_takes_filters_and_paging() {
        let cli = parse(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "PRIVATE_IMAGE",
            "--name",
            "web",
            "--platform",
            "Ubuntu",
            "--state",
            "NORMAL",
            "--limit",
            "5",
            "--offset",
            "10",
            "--all",
        ])
        .expect("parses");
        let Command::Images(ImagesCommand::List(list)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(list.region.region, "ap-guangzhou");
        assert_eq!(list.image_type.as_deref(), Some("PRIVATE_IMAGE"));
        assert_eq!(list.name.as_deref(), Some("web"));
        assert_eq!(list.platform.as_deref(), Some("Ubuntu"));
        assert_eq!(list.state.as_deref(), Some("NORMAL"));
        assert_eq!(list.page.limit, Some(5));
        assert_eq!(list.page.offset, Some(10));
        assert!(list.page.all);
    }

    #[test]
    fn unknown_image_types_are_usage_errors() {
        let err = parse(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "OTHER",
        ])
        .expect_err("rejected");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn id_lists_split_on_commas() {
        let cli = parse(&[
            "images",
            "delete",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-aaaaaaaa,img-bbbbbbbb",
        ])
        .expect("parses");
        let Command::Images(ImagesCommand::Delete(delete)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(delete.image, ["img-aaaaaaaa", "img-bbbbbbbb"]);
    }

    #[test]
    fn delete_needs_an_image() {
        let err = parse(&["images", "delete", "--region", "ap-guangzhou"]).expect_err("rejected");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn deprecated_takes_true_or_false() {
        for (value, expected) in [("true", true), ("false", false)] {
            let cli = parse(&[
                "images",
                "modify",
                "--region",
                "ap-guangzhou",
                "--image",
                "img-aaaaaaaa",
                "--deprecated",
                value,
            ])
            .expect("parses");
            let Command::Images(ImagesCommand::Modify(modify)) = cli.command else {
                panic!("wrong command: {:?}", cli.command);
            };
            assert_eq!(modify.deprecated, Some(expected));
            assert_eq!(modify.name, None);
        }
        assert!(parse(&[
            "images",
            "modify",
            "--region",
            "r",
            "--image",
            "img-aaaaaaaa",
            "--deprecated",
            "maybe",
        ])
        .is_err());
    }

    #[test]
    fn instances_run_takes_its_sizes() {
        let cli = parse(&[
            "instances",
            "run",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-aaaaaaaa",
            "--type",
            "S5.MEDIUM4",
            "--count",
            "3",
            "--disk-size-gib",
            "60",
            "--name",
            "web",
        ])
        .expect("parses");
        let Command::Instances(InstancesCommand::Run(run)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(run.instance_type, "S5.MEDIUM4");
        assert_eq!(run.count, Some(3));
        assert_eq!(run.disk_size_gib, Some(60));
        assert_eq!(run.name.as_deref(), Some("web"));
        assert!(!run.wait);
    }

    #[test]
    fn export_accepts_the_four_formats_only() {
        let args = |format: &'static str| {
            [
                "images",
                "export",
                "--region",
                "ap-guangzhou",
                "--image",
                "img-aaaaaaaa",
                "--format",
                format,
                "--out",
                "/tmp/x.raw",
            ]
        };
        for format in ["raw", "qcow2", "vhd", "vmdk"] {
            assert!(parse(&args(format)).is_ok(), "{format}");
        }
        assert!(parse(&args("vdi")).is_err());
    }

    #[test]
    fn export_writes_to_a_file_or_a_directory() {
        let base = ["images", "export", "--region", "ap-guangzhou"];
        let with = |rest: &[&str]| parse(&[&base[..], rest].concat());
        let Command::Images(ImagesCommand::Export(two)) = with(&[
            "--image",
            "img-aaaaaaaa",
            "--image",
            "img-bbbbbbbb",
            "--dir",
            "/tmp/out",
        ])
        .unwrap()
        .command
        else {
            panic!("not an export");
        };
        assert_eq!(two.image, ["img-aaaaaaaa", "img-bbbbbbbb"]);
        assert_eq!(two.dir.as_deref(), Some(std::path::Path::new("/tmp/out")));
        assert!(two.out.is_none());
        // A destination is required, and only one of the two.
        assert!(with(&["--image", "img-aaaaaaaa"]).is_err());
        assert!(with(&["--image", "img-aaaaaaaa", "--out", "x", "--dir", "d"]).is_err());
        assert!(with(&["--out", "x"]).is_err());
    }

    #[test]
    fn sync_takes_image_and_region_lists() {
        let cli = parse(&[
            "images",
            "sync",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-aaaaaaaa,img-bbbbbbbb",
            "--to",
            "ap-shanghai,ap-beijing",
            "--name",
            "copy",
            "--client-token",
            "tok-1",
            "--wait",
        ])
        .expect("parses");
        let Command::Images(ImagesCommand::Sync(sync)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(sync.region.region, "ap-guangzhou");
        assert_eq!(sync.image, ["img-aaaaaaaa", "img-bbbbbbbb"]);
        assert_eq!(sync.to, ["ap-shanghai", "ap-beijing"]);
        assert_eq!(sync.name.as_deref(), Some("copy"));
        assert_eq!(sync.client_token.as_deref(), Some("tok-1"));
        assert!(sync.wait && !sync.dry_run);
    }

    #[test]
    fn sync_needs_images_and_destinations_and_cannot_wait_for_a_dry_run() {
        let base = ["images", "sync", "--region", "ap-guangzhou"];
        let with = |extra: &[&'static str]| {
            let mut args = base.to_vec();
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert!(with(&["--image", "img-aaaaaaaa", "--to", "ap-shanghai"]).is_ok());
        assert!(with(&[
            "--image",
            "img-aaaaaaaa",
            "--to",
            "ap-shanghai",
            "--dry-run"
        ])
        .is_ok());
        for bad in [
            &["--to", "ap-shanghai"][..],
            &["--image", "img-aaaaaaaa"][..],
            &[
                "--image",
                "img-aaaaaaaa",
                "--to",
                "ap-shanghai",
                "--dry-run",
                "--wait",
            ][..],
        ] {
            assert_eq!(with(bad).expect_err("rejected").exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn share_and_unshare_take_an_image_and_an_account_list() {
        for (verb, unshare) in [("share", false), ("unshare", true)] {
            let cli = parse(&[
                "images",
                verb,
                "--region",
                "ap-guangzhou",
                "--image",
                "img-aaaaaaaa",
                "--accounts",
                "100000000002,100000000003",
            ])
            .expect("parses");
            let share = match cli.command {
                Command::Images(ImagesCommand::Share(share)) if !unshare => share,
                Command::Images(ImagesCommand::Unshare(share)) if unshare => share,
                other => panic!("wrong command: {other:?}"),
            };
            assert_eq!(share.region.region, "ap-guangzhou");
            assert_eq!(share.image, "img-aaaaaaaa");
            assert_eq!(share.accounts, ["100000000002", "100000000003"]);
            let err = parse(&[
                "images",
                verb,
                "--region",
                "ap-guangzhou",
                "--image",
                "img-aaaaaaaa",
            ])
            .expect_err("rejected");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn shares_takes_an_image() {
        let cli = parse(&[
            "images",
            "shares",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-aaaaaaaa",
        ])
        .expect("parses");
        let Command::Images(ImagesCommand::Shares(shares)) = cli.command else {
            panic!("wrong command: {:?}", cli.command);
        };
        assert_eq!(shares.image, "img-aaaaaaaa");
        let err = parse(&["images", "shares", "--region", "ap-guangzhou"]).expect_err("rejected");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn a_missing_region_is_a_usage_error() {
        let err = parse(&["images", "quota"]).expect_err("rejected");
        assert_eq!(err.exit_code(), 2);
    }
}
