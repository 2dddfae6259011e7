//! `imagectl images ...`: list, describe, create, delete, modify, export, quota.

use crate::cli::{
    ImagesCommand, ImagesCreate, ImagesDelete, ImagesDescribe, ImagesExport, ImagesList,
    ImagesModify, OutputFormat, RegionArg,
};
use crate::error::{CliError, Result};
use crate::output::{self, enum_name, Table};
use crate::paging::{self, Page};
use crate::session::Session;
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::{
    CreateImageRequest, DeleteImagesRequest, DescribeImageQuotaRequest, DescribeImagesRequest,
    DescribeImagesResponse, ExportFormat, ExportImageRequest, Filter, Image, ImageSource,
    ImageState, ImageType, ModifyImageAttributeRequest,
};
use imagefleet_rpc::client::SignedChannel;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Duration;

type RegionClient = RegionServiceClient<SignedChannel>;

/// How often `images create --wait` asks for the image's state.
const WAIT_POLL: Duration = Duration::from_millis(200);
/// How long `images create --wait` waits for the image to leave `CREATING`.
const WAIT_TIMEOUT: Duration = Duration::from_secs(10 * 60);

pub async fn run(
    session: &Session,
    command: ImagesCommand,
    format: OutputFormat,
) -> Result<String> {
    match command {
        ImagesCommand::List(args) => list(session, args, format).await,
        ImagesCommand::Describe(args) => describe(session, args, format).await,
        ImagesCommand::Create(args) => create(session, args, format).await,
        ImagesCommand::Delete(args) => delete(session, args, format).await,
        ImagesCommand::Modify(args) => modify(session, args, format).await,
        ImagesCommand::Export(args) => export(session, args, format).await,
        ImagesCommand::Quota(args) => quota(session, args, format).await,
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
    let mut client = session.region(&args.region.region).await?;
    let request = DescribeImagesRequest {
        filters: list_filters(&args),
        offset: args.page.offset.unwrap_or(0),
        limit: args.page.limit.unwrap_or(0),
        ..Default::default()
    };
    let response = if args.page.all {
        let (image_set, total_count) = paging::collect_all(|page_token: String| {
            let mut client = client.clone();
            let mut request = request.clone();
            if !page_token.is_empty() {
                request.offset = 0;
                request.page_token = page_token;
            }
            async move {
                let page = client.describe_images(request).await?.into_inner();
                Ok(Page {
                    items: page.image_set,
                    total_count: page.total_count,
                    next_page_token: page.next_page_token,
                })
            }
        })
        .await?;
        DescribeImagesResponse {
            image_set,
            total_count,
            next_page_token: String::new(),
        }
    } else {
        client.describe_images(request).await?.into_inner()
    };
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Table => Ok(image_table(&response.image_set)),
    }
}

/// Images as a table: one row each.
pub fn image_table(images: &[Image]) -> String {
    let mut table = Table::new(&[
        "IMAGE_ID", "NAME", "TYPE", "STATE", "PLATFORM", "SIZE_GIB", "CREATED",
    ]);
    for image in images {
        table.row(vec![
            image.image_id.clone(),
            image.image_name.clone(),
            enum_name(image.image_type, ImageType::as_str_name),
            enum_name(image.image_state, ImageState::as_str_name),
            image.platform.clone(),
            image.image_size_gib.to_string(),
            image.created_time.clone(),
        ]);
    }
    table.render()
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
    output::fields(&[
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
        ("PARENT_IMAGE_ID", lineage.parent_image_id),
        ("PARENT_REGION", lineage.parent_region),
        ("ULTIMATE_SOURCE_IMAGE_ID", lineage.ultimate_source_image_id),
        (
            "ULTIMATE_SOURCE_PAID",
            lineage.ultimate_source_paid.to_string(),
        ),
        ("CONTENT_DIGEST", image.content_digest.clone()),
        ("DEPRECATED", image.is_deprecated.to_string()),
    ])
}

/// The image `image_id` of the region, by id.
async fn describe_one(
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
    let (response, image) = describe_one(&mut client, &args.image).await?;
    match format {
        OutputFormat::Json => output::json(&response),
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
            OutputFormat::Table => Ok(output::fields(&[("IMAGE_ID", response.image_id)])),
        };
    }
    let image = wait_until_built(&mut client, &response.image_id).await?;
    match format {
        OutputFormat::Json => output::json(&image),
        OutputFormat::Table => Ok(image_fields(&image)),
    }
}

/// Polls an image until it is `NORMAL` (returned) or `CREATEFAILED` (an error with the
/// reason), for at most `WAIT_TIMEOUT`.
async fn wait_until_built(client: &mut RegionClient, image_id: &str) -> Result<Image> {
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    loop {
        let (_, image) = describe_one(client, image_id).await?;
        match ImageState::try_from(image.image_state) {
            Ok(ImageState::Normal) => return Ok(image),
            Ok(ImageState::Createfailed) => {
                return Err(CliError::Failed(format!(
                    "image {image_id} is CREATEFAILED: {}",
                    if image.state_reason.is_empty() {
                        "no reason given"
                    } else {
                        &image.state_reason
                    }
                )))
            }
            _ => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "image {image_id} is still {} after {} minutes",
                enum_name(image.image_state, ImageState::as_str_name),
                WAIT_TIMEOUT.as_secs() / 60
            )));
        }
        tokio::time::sleep(WAIT_POLL).await;
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
        OutputFormat::Table => Ok(format!("modified {}\n", args.image)),
    }
}

/// What an export wrote.
#[derive(Debug, Default)]
struct Exported {
    /// The file's length: the image's virtual size.
    virtual_size_bytes: u64,
    /// Bytes of data received (zero ranges are not sent).
    bytes_received: u64,
    content_digest: String,
}

async fn export(session: &Session, args: ImagesExport, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let what = || format!("cannot write {}", args.out.display());
    let mut file = std::fs::File::create(&args.out).map_err(|e| CliError::io(what(), e))?;
    let result = export_into(&mut client, &args.image, &mut file, &args.out).await;
    let exported = match result {
        Ok(exported) => exported,
        Err(e) => {
            // A half-written file is not the image: leave none behind.
            drop(file);
            let _ = std::fs::remove_file(&args.out);
            return Err(e);
        }
    };
    match format {
        OutputFormat::Json => Ok(output::json_document(&serde_json::json!({
            "imageId": args.image,
            "out": args.out.display().to_string(),
            "format": args.format,
            "bytes": exported.virtual_size_bytes,
            "bytesReceived": exported.bytes_received,
            "contentDigest": exported.content_digest,
        }))),
        OutputFormat::Table => Ok(output::fields(&[
            ("IMAGE_ID", args.image),
            ("FILE", args.out.display().to_string()),
            ("FORMAT", args.format),
            ("BYTES", exported.virtual_size_bytes.to_string()),
            ("BYTES_RECEIVED", exported.bytes_received.to_string()),
            ("CONTENT_DIGEST", exported.content_digest),
        ])),
    }
}

/// Streams the image into `file`: a sparse file of the image's virtual size with each chunk
/// written at its offset, fsynced at the end.
async fn export_into(
    client: &mut RegionClient,
    image_id: &str,
    file: &mut std::fs::File,
    path: &Path,
) -> Result<Exported> {
    let what = || format!("cannot write {}", path.display());
    let mut stream = client
        .export_image(ExportImageRequest {
            image_id: image_id.to_string(),
            format: ExportFormat::Raw as i32,
        })
        .await?
        .into_inner();
    let mut exported: Option<Exported> = None;
    while let Some(chunk) = stream.message().await? {
        let state = match exported.as_mut() {
            Some(state) => state,
            None => {
                file.set_len(chunk.virtual_size_bytes)
                    .map_err(|e| CliError::io(what(), e))?;
                exported.insert(Exported {
                    virtual_size_bytes: chunk.virtual_size_bytes,
                    bytes_received: 0,
                    content_digest: chunk.content_digest.clone(),
                })
            }
        };
        let len = chunk.data.len() as u64;
        let end = chunk.offset.checked_add(len);
        if end.is_none_or(|end| end > state.virtual_size_bytes) {
            return Err(CliError::Failed(format!(
                "the server sent {len} bytes at offset {}, past the image's end ({} bytes)",
                chunk.offset, state.virtual_size_bytes
            )));
        }
        file.seek(SeekFrom::Start(chunk.offset))
            .and_then(|_| file.write_all(&chunk.data))
            .map_err(|e| CliError::io(what(), e))?;
        state.bytes_received += len;
    }
    let exported = match exported {
        Some(exported) => exported,
        None => {
            // No data at all: an image of zeros. Its size and digest come from its metadata.
            let (_, image) = describe_one(client, image_id).await?;
            file.set_len(image.virtual_size_bytes)
                .map_err(|e| CliError::io(what(), e))?;
            Exported {
                virtual_size_bytes: image.virtual_size_bytes,
                bytes_received: 0,
                content_digest: image.content_digest,
            }
        }
    };
    file.sync_all().map_err(|e| CliError::io(what(), e))?;
    Ok(exported)
}

async fn quota(session: &Session, args: RegionArg, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region).await?;
    let response = client
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Table => {
            let mut table = Table::new(&["REGION", "ACCOUNT", "IMAGE_NUM_QUOTA", "IMAGE_NUM_USED"]);
            table.row(vec![
                args.region,
                session.account().account_id.clone(),
                response.image_num_quota.to_string(),
                response.image_num_used.to_string(),
            ]);
            Ok(table.render())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::PageArgs;
    use imagefleet_proto::region::v1::{Lineage, Snapshot};

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
            image_size_gib: 50,
            created_time: "2025-01-02T03:04:05Z".into(),
            sync_percent: 40,
            content_digest: "sha256:abc".into(),
            lineage: Some(Lineage {
                parent_image_id: "img-parent01".into(),
                parent_region: "ap-guangzhou".into(),
                ultimate_source_image_id: "img-root0001".into(),
                ultimate_source_paid: true,
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
            ["IMAGE_ID", "NAME", "TYPE", "STATE", "PLATFORM", "SIZE_GIB", "CREATED"]
        );
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            [
                "img-aaaaaaaa",
                "web-server",
                "PRIVATE_IMAGE",
                "SYNCING",
                "Ubuntu",
                "50",
                "2025-01-02T03:04:05Z"
            ]
        );
        assert_eq!(lines[0].find("NAME"), lines[1].find("web-server"));
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
