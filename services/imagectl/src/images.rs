//! `imagectl images ...`: list, describe, create, delete, modify, export, quota, sync, share,
//! unshare, shares.

use crate::cli::{
    ImagesCommand, ImagesCreate, ImagesDelete, ImagesDescribe, ImagesExport, ImagesList,
    ImagesModify, ImagesShare, ImagesShares, ImagesSync, OutputFormat, RegionArg,
};
use crate::error::{CliError, Result};
use crate::output::{self, enum_name, Table};
use crate::paging;
use crate::progress::{self, Progress, Task};
use crate::session::Session;
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::{
    CreateImageRequest, DeleteImagesRequest, DescribeImageQuotaRequest,
    DescribeImageSharePermissionRequest, DescribeImagesRequest, DescribeImagesResponse,
    ExportFormat, ExportImageChunk, ExportImageRequest, ExportImagesRequest, Filter, Image,
    ImageShare, ImageSource, ImageState, ImageType, ModifyImageAttributeRequest,
    ModifyImageSharePermissionRequest, SharePermission, SyncImagesRequest, SyncedImage,
};
use imagefleet_rpc::client::SignedChannel;
use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) type RegionClient = RegionServiceClient<SignedChannel>;

/// How often `images create --wait` asks for the image's state.
const WAIT_POLL: Duration = Duration::from_millis(200);
/// How long `images create --wait` waits for the image to leave `CREATING`.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How often `images sync --wait` asks for the destination images' state.
const SYNC_POLL: Duration = Duration::from_millis(250);
/// How long `images sync --wait` waits for every destination to finish.
const SYNC_TIMEOUT: Duration = Duration::from_secs(2 * 60 * 60);
/// How long one poll of a destination region may take.
const SYNC_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a destination region may keep failing with transient errors (unavailable,
/// deadline exceeded, resource exhausted) before `images sync --wait` gives up.
const SYNC_OUTAGE_GRACE: Duration = Duration::from_secs(60);
/// The most image ids one `DescribeImages` call may name.
const MAX_IDS_PER_CALL: usize = 100;

pub async fn run(
    session: &Session,
    command: ImagesCommand,
    format: OutputFormat,
    progress: &Progress,
) -> Result<String> {
    match command {
        ImagesCommand::List(args) => list(session, args, format).await,
        ImagesCommand::Describe(args) => describe(session, args, format).await,
        ImagesCommand::Create(args) => create(session, args, format).await,
        ImagesCommand::Delete(args) => delete(session, args, format).await,
        ImagesCommand::Modify(args) => modify(session, args, format).await,
        ImagesCommand::Export(args) => export(session, args, format).await,
        ImagesCommand::Import(args) => crate::import::import(session, args, format, progress).await,
        ImagesCommand::ImportOs(args) => crate::import::import_os(session, args, format).await,
        ImagesCommand::Quota(args) => quota(session, args, format).await,
        ImagesCommand::Sync(args) => sync(session, args, format, progress).await,
        ImagesCommand::Share(args) => {
            modify_shares(session, args, SharePermission::Share, format).await
        }
        ImagesCommand::Unshare(args) => {
            modify_shares(session, args, SharePermission::Cancel, format).await
        }
        ImagesCommand::Shares(args) => shares(session, args, format).await,
    }
}

/// The `DescribeImages` filters the flags of `images list` ask for.
pub fn list_filters(args: &ImagesList) -> Vec<Filter> {
    [
        ("image-type", &args.image_type),
        ("image-name", &args.name),
        ("platform", &args.platform),
        ("image-state", &args.state),
    ]
    .into_iter()
    .filter_map(|(name, value)| {
        value.as_ref().map(|value| Filter {
            name: name.to_string(),
            values: vec![value.clone()],
        })
    })
    .collect()
}

async fn list(session: &Session, args: ImagesList, format: OutputFormat) -> Result<String> {
    let client = session.region(&args.region.region).await?;
    let request = DescribeImagesRequest {
        filters: list_filters(&args),
        offset: args.page.offset.unwrap_or(0),
        limit: args.page.limit.unwrap_or(0),
        ..Default::default()
    };
    let response = paging::list(request, args.page.all, |request| {
        let mut client = client.clone();
        async move { Ok(client.describe_images(request).await?.into_inner()) }
    })
    .await?;
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(
            response.image_set.iter().map(|i| i.image_id.as_str()),
        )),
        OutputFormat::Table => Ok(output::list_table(
            &image_rows(&response.image_set),
            "images",
            args.page.offset.unwrap_or(0),
            response.total_count,
            !response.next_page_token.is_empty(),
        )),
    }
}

/// Who owns an image as the list shows it: `public` for public images, else the owner's
/// account (for a SHARED_IMAGE, the account that shared it).
pub fn image_owner(image: &Image) -> String {
    if image.image_type == ImageType::PublicImage as i32 && image.image_creator.is_empty() {
        "public".to_string()
    } else {
        image.image_creator.clone()
    }
}

/// Whether launching from the image is paid: its ultimate source is a paid image.
pub fn image_paid(image: &Image) -> &'static str {
    match &image.lineage {
        Some(lineage) if lineage.ultimate_source_paid => "yes",
        _ => "no",
    }
}

/// Images as table rows: one each.
pub fn image_rows(images: &[Image]) -> Table {
    let mut table = Table::new(&[
        "IMAGE_ID", "NAME", "TYPE", "STATE", "OWNER", "PLATFORM", "ARCH", "SIZE_GIB", "PAID",
        "CREATED",
    ]);
    for image in images {
        table.row(vec![
            image.image_id.clone(),
            image.image_name.clone(),
            enum_name(image.image_type, ImageType::as_str_name),
            enum_name(image.image_state, ImageState::as_str_name),
            image_owner(image),
            image.platform.clone(),
            image.architecture.clone(),
            image.image_size_gib.to_string(),
            image_paid(image).to_string(),
            image.created_time.clone(),
        ]);
    }
    table
}

/// Images as a table: one row each.
pub fn image_table(images: &[Image]) -> String {
    image_rows(images).render()
}

/// One image with every field, one per line.
pub fn image_fields(image: &Image) -> String {
    let lineage = image.lineage.clone().unwrap_or_default();
    let snapshots = image
        .snapshot_set
        .iter()
        .map(|s| {
            format!(
                "{} (disk {} bytes, stored {} bytes)",
                s.snapshot_id, s.disk_size_bytes, s.stored_bytes
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let mut fields = vec![
        ("IMAGE_ID", image.image_id.clone()),
        ("NAME", image.image_name.clone()),
        ("DESCRIPTION", image.image_description.clone()),
        ("REGION", image.region.clone()),
        ("TYPE", enum_name(image.image_type, ImageType::as_str_name)),
        (
            "SOURCE",
            enum_name(image.image_source, ImageSource::as_str_name),
        ),
        (
            "STATE",
            enum_name(image.image_state, ImageState::as_str_name),
        ),
        ("STATE_REASON", image.state_reason.clone()),
        ("OS_NAME", image.os_name.clone()),
        ("PLATFORM", image.platform.clone()),
        ("ARCHITECTURE", image.architecture.clone()),
        ("SIZE_GIB", image.image_size_gib.to_string()),
        ("VIRTUAL_SIZE_BYTES", image.virtual_size_bytes.to_string()),
        ("CREATED", image.created_time.clone()),
        ("CREATOR", image.image_creator.clone()),
        ("SNAPSHOTS", snapshots),
        ("LICENSE_TYPE", image.license_type.clone()),
        ("SYNC_PERCENT", image.sync_percent.to_string()),
    ];
    if let Some(sync) = &image.sync_progress {
        fields.extend([
            (
                "SYNC_SOURCE",
                format!("{}/{}", sync.source_region, sync.source_image_id),
            ),
            (
                "SYNC_BYTES",
                format!(
                    "{}/{} ({}%)",
                    sync.bytes_done,
                    sync.bytes_total,
                    progress::percent(sync.bytes_done, sync.bytes_total)
                ),
            ),
            (
                "SYNC_CHUNKS",
                format!("{}/{}", sync.chunks_done, sync.chunks_total),
            ),
            (
                "SYNC_TRANSFERRED",
                format!(
                    "{} chunks, {} bytes",
                    sync.chunks_transferred, sync.bytes_transferred
                ),
            ),
            ("SYNC_ATTEMPTS", sync.attempts.to_string()),
            ("SYNC_LAST_ERROR", sync.last_error.clone()),
        ]);
    }
    fields.extend([
        ("PARENT_IMAGE_ID", lineage.parent_image_id),
        ("PARENT_REGION", lineage.parent_region),
        ("PARENT_OWNER", lineage.parent_owner_account_id),
        ("ULTIMATE_SOURCE_IMAGE_ID", lineage.ultimate_source_image_id),
        (
            "ULTIMATE_SOURCE_PAID",
            lineage.ultimate_source_paid.to_string(),
        ),
        ("CONTENT_DIGEST", image.content_digest.clone()),
        ("DEPRECATED", image.is_deprecated.to_string()),
    ]);
    output::fields(&fields)
}

/// One image in the JSON shape of every image result: `{"imageSet": [Image], "totalCount": 1,
/// "nextPageToken": ""}`.
pub fn image_set(image: Image) -> DescribeImagesResponse {
    DescribeImagesResponse {
        image_set: vec![image],
        total_count: 1,
        next_page_token: String::new(),
    }
}

/// The image `image_id` of the region, by id.
pub(crate) async fn describe_one(
    client: &mut RegionClient,
    image_id: &str,
) -> Result<(DescribeImagesResponse, Image)> {
    let response = client
        .describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.to_string()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let image = response
        .image_set
        .iter()
        .find(|i| i.image_id == image_id)
        .cloned()
        .ok_or_else(|| CliError::Failed(format!("image {image_id} not found")))?;
    Ok((response, image))
}

async fn describe(session: &Session, args: ImagesDescribe, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let (_, image) = describe_one(&mut client, &args.image).await?;
    match format {
        OutputFormat::Json => output::json(&image_set(image.clone())),
        OutputFormat::Id => Ok(output::ids([image.image_id.as_str()])),
        OutputFormat::Table => Ok(image_fields(&image)),
    }
}

async fn create(session: &Session, args: ImagesCreate, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .create_image(CreateImageRequest {
            instance_id: args.instance,
            image_name: args.name,
            image_description: args.description.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if !args.wait {
        return match format {
            OutputFormat::Json => output::json(&response),
            OutputFormat::Id => Ok(output::ids([response.image_id.as_str()])),
            OutputFormat::Table => Ok(output::fields(&[("IMAGE_ID", response.image_id)])),
        };
    }
    let image = wait_until_built(&mut client, &response.image_id).await?;
    match format {
        OutputFormat::Json => output::json(&image_set(image.clone())),
        OutputFormat::Id => Ok(output::ids([image.image_id.as_str()])),
        OutputFormat::Table => Ok(image_fields(&image)),
    }
}

/// Polls an image until it is `NORMAL` (returned) or `CREATEFAILED` (an error with the
/// reason), for at most `WAIT_TIMEOUT`.
async fn wait_until_built(client: &mut RegionClient, image_id: &str) -> Result<Image> {
    wait_for_image(client, image_id, WAIT_POLL, WAIT_TIMEOUT, |_| {}).await
}

/// Polls an image every `poll` until it is `NORMAL` (returned) or has failed (`CREATEFAILED`,
/// `IMPORTFAILED`: an error with the reason), for at most `timeout`; `seen` gets every poll.
pub(crate) async fn wait_for_image(
    client: &mut RegionClient,
    image_id: &str,
    poll: Duration,
    timeout: Duration,
    mut seen: impl FnMut(&Image),
) -> Result<Image> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let (_, image) = describe_one(client, image_id).await?;
        seen(&image);
        match ImageState::try_from(image.image_state) {
            Ok(ImageState::Normal) => return Ok(image),
            Ok(state @ (ImageState::Createfailed | ImageState::Importfailed)) => {
                let reason = image
                    .import_progress
                    .as_ref()
                    .map(|p| p.error_reason.as_str())
                    .filter(|r| !r.is_empty())
                    .map(|r| format!("{r}: "))
                    .unwrap_or_default();
                return Err(CliError::Failed(format!(
                    "image {image_id} is {}: {reason}{}",
                    state.as_str_name(),
                    if image.state_reason.is_empty() {
                        "no reason given"
                    } else {
                        &image.state_reason
                    }
                )));
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "image {image_id} is still {} after {} minutes",
                enum_name(image.image_state, ImageState::as_str_name),
                timeout.as_secs() / 60
            )));
        }
        tokio::time::sleep(poll).await;
    }
}

async fn delete(session: &Session, args: ImagesDelete, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .delete_images(DeleteImagesRequest {
            image_ids: args.image.clone(),
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(args.image.iter().map(String::as_str))),
        OutputFormat::Table => Ok(format!("deleted {}\n", args.image.join(" "))),
    }
}

async fn modify(session: &Session, args: ImagesModify, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .modify_image_attribute(ModifyImageAttributeRequest {
            image_id: args.image.clone(),
            image_name: args.name,
            image_description: args.description,
            is_deprecated: args.deprecated,
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids([args.image.as_str()])),
        OutputFormat::Table => Ok(format!("modified {}\n", args.image)),
    }
}

/// What an export wrote.
#[derive(Debug, Default)]
struct Exported {
    /// The disk's size.
    virtual_size_bytes: u64,
    /// The file's length (the virtual size for raw).
    file_bytes: u64,
    /// Bytes of data received (zero ranges are not sent).
    bytes_received: u64,
    content_digest: String,
}

async fn export(session: &Session, args: ImagesExport, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let (out, single) = match (&args.out, args.image.as_slice()) {
        (Some(out), [image]) => (out.clone(), image.clone()),
        (Some(_), _) => {
            return Err(CliError::Usage(
                "--out takes one image; export several with --dir".into(),
            ))
        }
        (None, _) => return export_into_dir(&mut client, &args, format).await,
    };
    let to_stdout = crate::is_stdio(&out);
    let wanted = export_format(&args.format);
    let messages = open_export(&mut client, &single, wanted).await?;
    let exported = if to_stdout {
        let stdout = std::io::stdout();
        let mut sink = ExportSink::Stream {
            out: Box::new(stdout.lock()),
            written: 0,
        };
        write_export(&mut client, &single, wanted, messages, &mut sink, &out).await?
    } else {
        write_to_file(&mut client, &single, wanted, messages, &out).await?
    };
    let summary = match format {
        OutputFormat::Json => {
            output::json_document(&export_json(&single, &out, &args.format, &exported))
        }
        OutputFormat::Id => output::ids([single.as_str()]),
        OutputFormat::Table => output::fields(&[
            ("IMAGE_ID", single),
            ("FILE", out.display().to_string()),
            ("FORMAT", args.format),
            ("BYTES", exported.virtual_size_bytes.to_string()),
            ("FILE_BYTES", exported.file_bytes.to_string()),
            ("BYTES_RECEIVED", exported.bytes_received.to_string()),
            ("CONTENT_DIGEST", exported.content_digest),
        ]),
    };
    if to_stdout {
        // stdout holds the image: the summary goes to stderr.
        eprint!("{summary}");
        return Ok(String::new());
    }
    Ok(summary)
}

/// One export's summary as JSON.
fn export_json(image_id: &str, out: &Path, format: &str, exported: &Exported) -> serde_json::Value {
    serde_json::json!({
        "imageId": image_id,
        "out": out.display().to_string(),
        "format": format,
        "bytes": exported.virtual_size_bytes,
        "fileBytes": exported.file_bytes,
        "bytesReceived": exported.bytes_received,
        "contentDigest": exported.content_digest,
    })
}

fn export_format(format: &str) -> ExportFormat {
    match format {
        "qcow2" => ExportFormat::Qcow2,
        "vhd" => ExportFormat::Vhd,
        "vmdk" => ExportFormat::Vmdk,
        _ => ExportFormat::Raw,
    }
}

/// Exports every image of `args` in one `ExportImages` call, each into `<dir>/<id>.<format>`.
/// The region checks every image before it sends anything; a failure midway removes the file
/// being written and keeps the ones finished before it.
async fn export_into_dir(
    client: &mut RegionClient,
    args: &ImagesExport,
    format: OutputFormat,
) -> Result<String> {
    use futures::{Stream, StreamExt};
    let dir = args.dir.clone().unwrap_or_default();
    let wanted = export_format(&args.format);
    let mut messages = client
        .export_images(ExportImagesRequest {
            image_ids: args.image.clone(),
            format: wanted as i32,
        })
        .await?
        .into_inner()
        .peekable();
    let mut done = Vec::with_capacity(args.image.len());
    for image_id in &args.image {
        let path = dir.join(format!("{image_id}.{}", args.format));
        // This image's messages: those that follow, up to the first of another image.
        let messages = futures::stream::poll_fn(|cx| {
            let mut next = std::pin::Pin::new(&mut messages);
            match std::task::ready!(next.as_mut().poll_peek(cx)) {
                Some(Ok(m)) if m.image_id != *image_id => std::task::Poll::Ready(None),
                Some(_) => next
                    .poll_next(cx)
                    .map(|m| m.map(|m| m.map(|m| m.chunk.unwrap_or_default()))),
                None => std::task::Poll::Ready(None),
            }
        });
        let exported = write_to_file(client, image_id, wanted, messages, &path).await?;
        done.push((image_id.clone(), path, exported));
    }
    match std::pin::Pin::new(&mut messages).peek().await {
        None => {}
        Some(Ok(stray)) => {
            return Err(CliError::Failed(format!(
                "the server sent pieces of {} out of the order asked",
                stray.image_id
            )))
        }
        Some(Err(status)) => return Err(status.clone().into()),
    }
    Ok(match format {
        OutputFormat::Json => output::json_document(&serde_json::json!({
            "exports": done
                .iter()
                .map(|(id, path, exported)| export_json(id, path, &args.format, exported))
                .collect::<Vec<_>>(),
        })),
        OutputFormat::Id => output::ids(done.iter().map(|(id, _, _)| id.as_str())),
        OutputFormat::Table => {
            let mut table =
                Table::new(&["IMAGE_ID", "FILE", "FORMAT", "FILE_BYTES", "CONTENT_DIGEST"]);
            for (id, path, exported) in &done {
                table.row(vec![
                    id.clone(),
                    path.display().to_string(),
                    args.format.clone(),
                    exported.file_bytes.to_string(),
                    exported.content_digest.clone(),
                ]);
            }
            table.render()
        }
    })
}

/// The messages of one image's `ExportImage` call.
async fn open_export(
    client: &mut RegionClient,
    image_id: &str,
    wanted: ExportFormat,
) -> Result<tonic::Streaming<ExportImageChunk>> {
    Ok(client
        .export_image(ExportImageRequest {
            image_id: image_id.to_string(),
            format: wanted as i32,
        })
        .await?
        .into_inner())
}

/// Writes `messages` into the file at `path` (created or truncated); a failure leaves no file.
async fn write_to_file(
    client: &mut RegionClient,
    image_id: &str,
    wanted: ExportFormat,
    messages: impl futures::Stream<Item = std::result::Result<ExportImageChunk, tonic::Status>>,
    path: &Path,
) -> Result<Exported> {
    let what = || format!("cannot write {}", path.display());
    let file = std::fs::File::create(path).map_err(|e| CliError::io(what(), e))?;
    let mut sink = ExportSink::File(file);
    let result = write_export(client, image_id, wanted, messages, &mut sink, path).await;
    if result.is_err() {
        // A half-written file is not the image: leave none behind.
        drop(sink);
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Where an export goes: a file written sparsely at each chunk's offset, or a stream
/// (stdout) written in order with the zero ranges in between.
enum ExportSink {
    File(std::fs::File),
    Stream { out: Box<dyn Write>, written: u64 },
}

impl ExportSink {
    fn set_len(&mut self, len: u64) -> std::io::Result<()> {
        match self {
            ExportSink::File(file) => file.set_len(len),
            ExportSink::Stream { .. } => Ok(()),
        }
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        match self {
            ExportSink::File(file) => {
                file.seek(SeekFrom::Start(offset))?;
                file.write_all(data)
            }
            ExportSink::Stream { out, written } => {
                if offset < *written {
                    return Err(std::io::Error::other(format!(
                        "the server sent offset {offset} after {written} bytes: stdout can only be written in order"
                    )));
                }
                zeros(out, offset - *written)?;
                out.write_all(data)?;
                *written = offset + data.len() as u64;
                Ok(())
            }
        }
    }

    /// Completes the output at `len` bytes and makes it durable (a file) or flushed.
    fn finish(&mut self, len: u64) -> std::io::Result<()> {
        match self {
            ExportSink::File(file) => {
                file.set_len(len)?;
                file.sync_all()
            }
            ExportSink::Stream { out, written } => {
                zeros(out, len.saturating_sub(*written))?;
                *written = len.max(*written);
                out.flush()
            }
        }
    }
}

fn zeros(out: &mut Box<dyn Write>, mut count: u64) -> std::io::Result<()> {
    let block = [0u8; 64 * 1024];
    while count > 0 {
        let n = count.min(block.len() as u64) as usize;
        out.write_all(&block[..n])?;
        count -= n as u64;
    }
    Ok(())
}

/// Writes an export's messages into `file`: a sparse file of the image's virtual size with each
/// chunk written at its offset, fsynced at the end (or stdout, in order).
async fn write_export(
    client: &mut RegionClient,
    image_id: &str,
    wanted: ExportFormat,
    messages: impl futures::Stream<Item = std::result::Result<ExportImageChunk, tonic::Status>>,
    file: &mut ExportSink,
    path: &Path,
) -> Result<Exported> {
    use futures::StreamExt;
    let what = || format!("cannot write {}", path.display());
    let mut stream = std::pin::pin!(messages);
    let mut exported: Option<Exported> = None;
    // Where the file ends: the server's last message carries no data and says it by its
    // offset (for raw, the virtual size).
    let mut end_of_file = 0u64;
    while let Some(chunk) = stream.next().await.transpose()? {
        let state = match exported.as_mut() {
            Some(state) => state,
            None => {
                // The file's length, when the server knows it up front (every format but
                // vmdk): a bound for every offset that follows.
                let known = if wanted == ExportFormat::Raw {
                    chunk.virtual_size_bytes
                } else {
                    chunk.file_size_bytes
                };
                if known > 0 {
                    file.set_len(known).map_err(|e| CliError::io(what(), e))?;
                }
                exported.insert(Exported {
                    virtual_size_bytes: chunk.virtual_size_bytes,
                    file_bytes: known,
                    bytes_received: 0,
                    content_digest: chunk.content_digest.clone(),
                })
            }
        };
        let len = chunk.data.len() as u64;
        let end = chunk.offset.checked_add(len);
        if end.is_none_or(|end| state.file_bytes > 0 && end > state.file_bytes) {
            return Err(CliError::Failed(format!(
                "the server sent {len} bytes at offset {}, past the file's end ({} bytes)",
                chunk.offset, state.file_bytes
            )));
        }
        if len > 0 {
            file.write_at(chunk.offset, &chunk.data)
                .map_err(|e| CliError::io(what(), e))?;
        }
        end_of_file = end_of_file.max(end.unwrap_or(0));
        state.bytes_received += len;
    }
    let mut exported = match exported {
        Some(exported) => exported,
        None => {
            // No message at all: an image of zeros, from a server that sends none for it. Its
            // size and digest come from its metadata.
            let (_, image) = describe_one(client, image_id).await?;
            Exported {
                virtual_size_bytes: image.virtual_size_bytes,
                file_bytes: image.virtual_size_bytes,
                bytes_received: 0,
                content_digest: image.content_digest,
            }
        }
    };
    exported.file_bytes = exported.file_bytes.max(end_of_file);
    file.finish(exported.file_bytes)
        .map_err(|e| CliError::io(what(), e))?;
    Ok(exported)
}

/// Destination images as a table: SOURCE_IMAGE_ID REGION IMAGE_ID.
pub fn synced_table(image_set: &[SyncedImage]) -> String {
    let mut table = Table::new(&["SOURCE_IMAGE_ID", "REGION", "IMAGE_ID"]);
    for synced in image_set {
        table.row(vec![
            synced.source_image_id.clone(),
            synced.region.clone(),
            synced.image_id.clone(),
        ]);
    }
    table.render()
}

/// Finished destination images as a table: SOURCE_IMAGE_ID REGION IMAGE_ID STATE.
pub fn synced_images_table(finished: &[(SyncedImage, Image)]) -> String {
    let mut table = Table::new(&["SOURCE_IMAGE_ID", "REGION", "IMAGE_ID", "STATE"]);
    for (synced, image) in finished {
        table.row(vec![
            synced.source_image_id.clone(),
            synced.region.clone(),
            image.image_id.clone(),
            enum_name(image.image_state, ImageState::as_str_name),
        ]);
    }
    table.render()
}

/// The `--wait --output json` document: `{"imageSet": [...], "totalCount": N}` (the shape of
/// every image list), each destination's final Image as proto3 JSON with `sourceImageId`
/// added.
pub fn synced_images_json(finished: &[(SyncedImage, Image)]) -> Result<serde_json::Value> {
    let mut image_set = Vec::with_capacity(finished.len());
    for (synced, image) in finished {
        let mut value = output::json_value(image)?;
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "sourceImageId".to_string(),
                serde_json::Value::String(synced.source_image_id.clone()),
            );
        }
        image_set.push(value);
    }
    let total = image_set.len();
    Ok(serde_json::json!({ "imageSet": image_set, "totalCount": total, "nextPageToken": "" }))
}

async fn sync(
    session: &Session,
    args: ImagesSync,
    format: OutputFormat,
    progress: &Progress,
) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .sync_images(SyncImagesRequest {
            image_ids: args.image,
            destination_regions: args.to,
            image_name: args.name.unwrap_or_default(),
            dry_run: args.dry_run,
            client_token: args.client_token.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if args.dry_run {
        return match format {
            OutputFormat::Json => output::json(&response),
            OutputFormat::Id => Ok(output::ids(
                response.image_set.iter().map(|s| s.image_id.as_str()),
            )),
            OutputFormat::Table => Ok(synced_table(&response.image_set)),
        };
    }
    if format == OutputFormat::Id && !args.wait {
        return Ok(output::ids(
            response.image_set.iter().map(|s| s.image_id.as_str()),
        ));
    }
    let finished = wait_until_synced(session, &response.image_set, progress, args.wait).await?;
    match format {
        OutputFormat::Json => Ok(output::json_document(&synced_images_json(&finished)?)),
        OutputFormat::Id => Ok(output::ids(
            finished.iter().map(|(_, image)| image.image_id.as_str()),
        )),
        OutputFormat::Table => Ok(synced_images_table(&finished)),
    }
}

/// Whether a failed poll may be retried: the region may be back in a moment.
fn transient(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted
    )
}

/// Polls every destination image in its region (one `DescribeImages` per region and round)
/// until each is `NORMAL` or `CREATEFAILED`, for at most `SYNC_TIMEOUT`, showing progress.
/// Returns each destination with its final image, in the order given; an error naming every
/// `CREATEFAILED` destination with its reason if any failed.
///
/// With `wait` false, each destination is described once (no progress shown) and returned
/// in whatever state it is.
async fn wait_until_synced(
    session: &Session,
    image_set: &[SyncedImage],
    progress: &Progress,
    wait: bool,
) -> Result<Vec<(SyncedImage, Image)>> {
    let hidden = Progress::hidden();
    let progress = if wait { progress } else { &hidden };
    if let Some(missing) = image_set.iter().find(|s| s.image_id.is_empty()) {
        return Err(CliError::Failed(format!(
            "the server named no destination image for {} in {}",
            missing.source_image_id, missing.region
        )));
    }
    // A client per destination region, and the destinations of each region.
    let mut clients: HashMap<&str, RegionClient> = HashMap::new();
    let mut by_region: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, synced) in image_set.iter().enumerate() {
        let region = synced.region.as_str();
        if !clients.contains_key(region) {
            clients.insert(region, session.region(region).await?);
        }
        match by_region.iter_mut().find(|(r, _)| *r == region) {
            Some((_, indices)) => indices.push(index),
            None => by_region.push((region, vec![index])),
        }
    }
    let mut tasks: Vec<Task> = image_set
        .iter()
        .map(|s| progress.task(&format!("{} {}", s.region, s.image_id)))
        .collect();
    let mut last: Vec<Option<Image>> = vec![None; image_set.len()];
    let mut outage_since: HashMap<&str, Instant> = HashMap::new();
    let deadline = Instant::now() + SYNC_TIMEOUT;
    loop {
        let now = Instant::now();
        for (region, indices) in &by_region {
            let pending: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|&i| !last[i].as_ref().is_some_and(finished))
                .collect();
            if pending.is_empty() {
                continue;
            }
            let client = clients.get_mut(region).expect("a client per region");
            let mut found = Vec::with_capacity(pending.len());
            let mut failure = None;
            for batch in pending.chunks(MAX_IDS_PER_CALL) {
                let ids: Vec<String> = batch
                    .iter()
                    .map(|&i| image_set[i].image_id.clone())
                    .collect();
                match describe_many(client, ids).await {
                    Ok(images) => found.extend(images),
                    Err(status) => {
                        failure = Some(status);
                        break;
                    }
                }
            }
            if let Some(status) = failure {
                let since = *outage_since.entry(*region).or_insert(now);
                if transient(&status) && now.duration_since(since) < SYNC_OUTAGE_GRACE {
                    continue;
                }
                return Err(status.into());
            }
            outage_since.remove(region);
            for &i in &pending {
                let synced = &image_set[i];
                let mut image = found
                    .iter()
                    .find(|image| image.image_id == synced.image_id)
                    .cloned()
                    .ok_or_else(|| {
                        CliError::Failed(format!(
                            "image {} not found in {}",
                            synced.image_id, synced.region
                        ))
                    })?;
                if image.region.is_empty() {
                    image.region = synced.region.clone();
                }
                observe(&mut tasks[i], &image);
                last[i] = Some(image);
            }
        }
        if !wait && last.iter().all(Option::is_some) {
            break;
        }
        if last
            .iter()
            .all(|image| image.as_ref().is_some_and(finished))
        {
            break;
        }
        if Instant::now() >= deadline {
            let waiting: Vec<String> = image_set
                .iter()
                .zip(&last)
                .filter(|(_, image)| !image.as_ref().is_some_and(finished))
                .map(|(synced, image)| {
                    let state = image.as_ref().map_or_else(
                        || "not seen".to_string(),
                        |image| {
                            let state = enum_name(image.image_state, ImageState::as_str_name);
                            match copy_bytes(image) {
                                Some((done, total)) => {
                                    format!("{state} {}%", progress::percent(done, total))
                                }
                                None => state,
                            }
                        },
                    );
                    format!("{} in {} ({state})", synced.image_id, synced.region)
                })
                .collect();
            return Err(CliError::Failed(format!(
                "still waiting after {} hours for {}",
                SYNC_TIMEOUT.as_secs() / 3600,
                waiting.join(", ")
            )));
        }
        tokio::time::sleep(SYNC_POLL).await;
    }
    let finished: Vec<(SyncedImage, Image)> = image_set
        .iter()
        .cloned()
        .zip(last.into_iter().flatten())
        .collect();
    let failures: Vec<String> = finished
        .iter()
        .filter(|(_, image)| image.image_state == ImageState::Createfailed as i32)
        .map(|(synced, image)| {
            format!(
                "image {} in {} is CREATEFAILED: {}",
                image.image_id,
                synced.region,
                if image.state_reason.is_empty() {
                    "no reason given"
                } else {
                    &image.state_reason
                }
            )
        })
        .collect();
    if failures.is_empty() || !wait {
        Ok(finished)
    } else {
        Err(CliError::Failed(failures.join("; ")))
    }
}

/// What a destination image tells of its copy, as (bytes done, bytes total): the bytes the
/// copy moves when the server reports them (`sync_progress`); from a server that reports only
/// `sync_percent`, that percent of the virtual size; `None` while no total is known.
pub fn copy_bytes(image: &Image) -> Option<(u64, u64)> {
    match &image.sync_progress {
        Some(p) if p.bytes_total > 0 => Some((p.bytes_done.min(p.bytes_total), p.bytes_total)),
        Some(_) => None,
        None if image.virtual_size_bytes == 0 => None,
        None => {
            let total = image.virtual_size_bytes;
            let pct = u128::from(image.sync_percent.min(100));
            Some(((u128::from(total) * pct / 100) as u64, total))
        }
    }
}

/// Shows one poll of a destination image on its progress task, and ends the task when the
/// image is NORMAL or CREATEFAILED.
pub fn observe(task: &mut Task, image: &Image) {
    if let Some((done, total)) = copy_bytes(image) {
        // The total comes from the first poll that knows it and stays: a later poll that
        // reports on another basis does not make the bar jump.
        if task.total().is_none() {
            task.set_position(done);
            task.set_total(total);
        } else if task.total() == Some(total) {
            task.set_position(done);
        }
    }
    match ImageState::try_from(image.image_state) {
        Ok(ImageState::Normal) => task.finish("NORMAL"),
        Ok(ImageState::Createfailed) => task.fail(&if image.state_reason.is_empty() {
            "CREATEFAILED".to_string()
        } else {
            format!("CREATEFAILED: {}", image.state_reason)
        }),
        _ => {}
    }
}

/// Whether a destination image is done: `NORMAL` or `CREATEFAILED`.
fn finished(image: &Image) -> bool {
    image.image_state == ImageState::Normal as i32
        || image.image_state == ImageState::Createfailed as i32
}

/// The images `ids` of a region (at most `MAX_IDS_PER_CALL`), within `SYNC_CALL_TIMEOUT`.
async fn describe_many(
    client: &mut RegionClient,
    ids: Vec<String>,
) -> Result<Vec<Image>, tonic::Status> {
    let limit = ids.len() as u32;
    let call = client.describe_images(DescribeImagesRequest {
        image_ids: ids,
        limit,
        ..Default::default()
    });
    match tokio::time::timeout(SYNC_CALL_TIMEOUT, call).await {
        Ok(response) => Ok(response?.into_inner().image_set),
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer within {SYNC_CALL_TIMEOUT:?}"
        ))),
    }
}

async fn quota(session: &Session, args: RegionArg, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region).await?;
    let response = client
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids([session.account().account_id.as_str()])),
        OutputFormat::Table => {
            let mut table = Table::new(&[
                "REGION",
                "ACCOUNT",
                "IMAGE_NUM_QUOTA",
                "IMAGE_NUM_USED",
                "INSTANCE_QUOTA",
                "INSTANCE_COUNT",
                "STORAGE_BYTES_QUOTA",
                "STORAGE_BYTES_USED",
            ]);
            table.row(vec![
                args.region,
                session.account().account_id.clone(),
                response.image_num_quota.to_string(),
                response.image_num_used.to_string(),
                response.instance_quota.to_string(),
                response.instance_count.to_string(),
                response.storage_bytes_quota.to_string(),
                response.storage_bytes_used.to_string(),
            ]);
            Ok(table.render())
        }
    }
}

/// `images share` (`SHARE`) and `images unshare` (`CANCEL`).
async fn modify_shares(
    session: &Session,
    args: ImagesShare,
    permission: SharePermission,
    format: OutputFormat,
) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: args.image.clone(),
            account_ids: args.accounts.clone(),
            permission: permission as i32,
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids([args.image.as_str()])),
        OutputFormat::Table => Ok(share_line(permission, &args.image, &args.accounts)),
    }
}

/// What `images share` and `images unshare` print in table mode: `shared <ID> with A, B`,
/// `unshared <ID> from A, B`.
pub fn share_line(permission: SharePermission, image_id: &str, accounts: &[String]) -> String {
    let (verb, preposition) = match permission {
        SharePermission::Cancel => ("unshared", "from"),
        _ => ("shared", "with"),
    };
    format!("{verb} {image_id} {preposition} {}\n", accounts.join(", "))
}

/// An image's shares as a table: ACCOUNT_ID SHARED_TIME.
pub fn share_table(shares: &[ImageShare]) -> String {
    let mut table = Table::new(&["ACCOUNT_ID", "SHARED_TIME"]);
    for share in shares {
        table.row(vec![share.account_id.clone(), share.created_time.clone()]);
    }
    table.render()
}

async fn shares(session: &Session, args: ImagesShares, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .describe_image_share_permission(DescribeImageSharePermissionRequest {
            image_id: args.image,
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(
            response
                .share_permission_set
                .iter()
                .map(|s| s.account_id.as_str()),
        )),
        OutputFormat::Table => Ok(share_table(&response.share_permission_set)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::PageArgs;
    use imagefleet_proto::region::v1::{Lineage, Snapshot, SyncProgress};

    #[test]
    fn list_flags_become_filters() {
        let args = ImagesList {
            region: RegionArg {
                region: "ap-guangzhou".into(),
            },
            image_type: Some("PRIVATE_IMAGE".into()),
            name: None,
            platform: Some("Ubuntu".into()),
            state: Some("NORMAL".into()),
            page: PageArgs {
                limit: None,
                offset: None,
                all: false,
            },
        };
        let filters = list_filters(&args);
        let pairs: Vec<(&str, &[String])> = filters
            .iter()
            .map(|f| (f.name.as_str(), f.values.as_slice()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("image-type", &["PRIVATE_IMAGE".to_string()][..]),
                ("platform", &["Ubuntu".to_string()][..]),
                ("image-state", &["NORMAL".to_string()][..]),
            ]
        );
    }

    fn image() -> Image {
        Image {
            image_id: "img-aaaaaaaa".into(),
            image_name: "web-server".into(),
            image_type: ImageType::PrivateImage as i32,
            image_source: ImageSource::CreateImage as i32,
            image_state: ImageState::Syncing as i32,
            platform: "Ubuntu".into(),
            architecture: "x86_64".into(),
            image_creator: "100000000001".into(),
            image_size_gib: 50,
            created_time: "2025-01-02T03:04:05Z".into(),
            sync_percent: 40,
            content_digest: "sha256:abc".into(),
            lineage: Some(Lineage {
                parent_image_id: "img-parent01".into(),
                parent_region: "ap-guangzhou".into(),
                ultimate_source_image_id: "img-root0001".into(),
                ultimate_source_paid: true,
                parent_owner_account_id: "100000000001".into(),
            }),
            snapshot_set: vec![Snapshot {
                snapshot_id: "snap-aaaaaaaa".into(),
                disk_size_bytes: 10,
                stored_bytes: 5,
            }],
            ..Default::default()
        }
    }

    #[test]
    fn image_tables_have_the_list_columns() {
        let text = image_table(&[image()]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0].split_whitespace().collect::<Vec<_>>(),
            [
                "IMAGE_ID", "NAME", "TYPE", "STATE", "OWNER", "PLATFORM", "ARCH", "SIZE_GIB",
                "PAID", "CREATED"
            ]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "img-aaaaaaaa",
                "web-server",
                "PRIVATE_IMAGE",
                "SYNCING",
                "100000000001",
                "Ubuntu",
                "x86_64",
                "50",
                "yes",
                "2025-01-02T03:04:05Z"
            ]
        );
        assert_eq!(lines[0].find("NAME"), lines[1].find("web-server"));
    }

    #[test]
    fn shared_images_show_their_type() {
        let mut shared = image();
        shared.image_type = ImageType::SharedImage as i32;
        let text = image_table(&[shared]);
        let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[2], "SHARED_IMAGE", "{text}");
        // The owner column says who shared it.
        assert_eq!(row[4], "100000000001", "{text}");
        let mut public = image();
        public.image_type = ImageType::PublicImage as i32;
        public.image_creator.clear();
        let text = image_table(&[public]);
        let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[4], "public", "{text}");
    }

    #[test]
    fn share_lines_name_the_image_and_the_accounts() {
        let accounts = ["100000000002".to_string(), "100000000003".to_string()];
        assert_eq!(
            share_line(SharePermission::Share, "img-aaaaaaaa", &accounts),
            "shared img-aaaaaaaa with 100000000002, 100000000003\n"
        );
        assert_eq!(
            share_line(SharePermission::Cancel, "img-aaaaaaaa", &accounts[..1]),
            "unshared img-aaaaaaaa from 100000000002\n"
        );
    }

    #[test]
    fn share_tables_list_accounts_and_times() {
        let shares = [ImageShare {
            account_id: "100000000002".into(),
            created_time: "2025-01-02T03:04:05Z".into(),
        }];
        assert_eq!(
            share_table(&shares),
            "ACCOUNT_ID    SHARED_TIME\n\
             100000000002  2025-01-02T03:04:05Z\n"
        );
        assert_eq!(share_table(&[]), "ACCOUNT_ID  SHARED_TIME\n");
    }

    #[test]
    fn image_fields_show_the_sync_progress_when_present() {
        assert!(!image_fields(&image()).contains("SYNC_SOURCE"));
        let mut copy = image();
        copy.sync_progress = Some(SyncProgress {
            source_region: "ap-guangzhou".into(),
            source_image_id: "img-source01".into(),
            chunks_total: 4,
            bytes_total: 4096,
            chunks_done: 1,
            bytes_done: 1024,
            chunks_transferred: 2,
            bytes_transferred: 2048,
            attempts: 3,
            last_error: "reset by peer".into(),
        });
        let text = image_fields(&copy);
        for expected in [
            "SYNC_SOURCE               ap-guangzhou/img-source01\n",
            "SYNC_BYTES                1024/4096 (25%)\n",
            "SYNC_CHUNKS               1/4\n",
            "SYNC_TRANSFERRED          2 chunks, 2048 bytes\n",
            "SYNC_ATTEMPTS             3\n",
            "SYNC_LAST_ERROR           reset by peer\n",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from\n{text}");
        }
    }

    #[test]
    fn synced_images_are_final_images_with_their_source() {
        let synced = SyncedImage {
            source_image_id: "img-source01".into(),
            region: "ap-shanghai".into(),
            image_id: "img-aaaaaaaa".into(),
        };
        let mut done = image();
        done.image_state = ImageState::Normal as i32;
        let value = synced_images_json(&[(synced.clone(), done.clone())]).expect("renders");
        let images = value["imageSet"].as_array().expect("an array");
        assert_eq!(images.len(), 1);
        assert_eq!(images[0]["sourceImageId"], "img-source01");
        assert_eq!(images[0]["imageId"], "img-aaaaaaaa");
        assert_eq!(images[0]["imageState"], "NORMAL");
        let table = synced_images_table(&[(synced.clone(), done)]);
        assert_eq!(
            table,
            "SOURCE_IMAGE_ID  REGION       IMAGE_ID      STATE\n\
             img-source01     ap-shanghai  img-aaaaaaaa  NORMAL\n"
        );
        assert_eq!(
            synced_table(&[synced]),
            "SOURCE_IMAGE_ID  REGION       IMAGE_ID\n\
             img-source01     ap-shanghai  img-aaaaaaaa\n"
        );
    }

    #[test]
    fn image_fields_show_sync_lineage_digest_and_reason() {
        let mut failed = image();
        failed.image_state = ImageState::Createfailed as i32;
        failed.state_reason = "snapshot failed".into();
        let text = image_fields(&failed);
        for expected in [
            "SYNC_PERCENT",
            "40",
            "img-parent01",
            "PARENT_OWNER",
            "100000000001",
            "img-root0001",
            "ULTIMATE_SOURCE_PAID",
            "sha256:abc",
            "CREATEFAILED",
            "snapshot failed",
            "snap-aaaaaaaa",
        ] {
            assert!(text.contains(expected), "{expected} missing from\n{text}");
        }
    }
}
