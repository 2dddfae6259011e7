//! `imagectl images import` and `imagectl images import-os`: disk files into custom images.
//!
//! A local file (or stdin) is streamed to the region with `UploadImage`, which answers once the
//! whole file is read; a URL is handed to `ImportImage`, which answers once the file's headers
//! are checked and goes on in the background (`--wait` follows it to the end). Progress (bytes
//! of the file) goes to stderr; stdout carries only the result.

use crate::cli::{ImagesImport, ImportOs, OutputFormat};
use crate::error::{CliError, Result};
use crate::images::{describe_one, image_fields, image_set, wait_for_image};
use crate::output::{self, Table};
use crate::progress::{Progress, Task};
use crate::session::Session;
use imagefleet_proto::region::v1::{
    DescribeImportImageOsRequest, Image, ImportImageParameters, ImportImageRequest,
    UploadImageRequest,
};
use std::io::Read;
use std::time::Duration;

/// The most file bytes one `UploadImage` message carries (the server takes up to 4 MiB).
const PIECE: usize = 1 << 20;
/// Pieces read ahead of the network: memory stays at a few MiB whatever the file's size.
const READ_AHEAD: usize = 4;
/// How often `import --url --wait` asks for the image's state.
const POLL: Duration = Duration::from_millis(250);
/// How long `import --url --wait` waits for the import to end.
const WAIT_TIMEOUT: Duration = Duration::from_secs(6 * 60 * 60);

pub async fn import(
    session: &Session,
    args: ImagesImport,
    format: OutputFormat,
    progress: &Progress,
) -> Result<String> {
    let parameters = ImportImageParameters {
        image_name: args.name.clone(),
        image_description: args.description.clone().unwrap_or_default(),
        format: args.format.clone().unwrap_or_default(),
        // Without --platform: `Other`, version `-` (no particular OS).
        platform: args.platform.clone().unwrap_or_else(|| "Other".to_string()),
        os_version: match (&args.platform, &args.os_version) {
            (_, Some(version)) => version.clone(),
            (None, None) => "-".to_string(),
            (Some(_), None) => String::new(),
        },
        architecture: args.architecture.clone().unwrap_or_default(),
        force: args.force,
    };
    let mut client = session.region(&args.region.region).await?;
    let image = match (&args.file, &args.url) {
        (Some(path), None) => {
            let (reader, size) = open_source(path, args.size)?;
            let mut task = progress.task_with_total(&args.name, size);
            let result = upload(&mut client, parameters, reader, size, &mut task).await;
            match result {
                Ok(image_id) => {
                    task.finish("NORMAL");
                    describe_one(&mut client, &image_id).await?.1
                }
                Err(e) => {
                    task.fail("refused");
                    return Err(e);
                }
            }
        }
        (None, Some(url)) => {
            let image_id = client
                .import_image(ImportImageRequest {
                    parameters: Some(parameters),
                    image_url: url.clone(),
                })
                .await?
                .into_inner()
                .image_id;
            if !args.wait {
                let image = describe_one(&mut client, &image_id).await?.1;
                return render(image, format);
            }
            let mut task = progress.task(&args.name);
            follow(&mut client, &image_id, &mut task).await?
        }
        _ => {
            return Err(CliError::Failed(
                "give exactly one of --file and --url".to_string(),
            ))
        }
    };
    render(image, format)
}

fn render(image: Image, format: OutputFormat) -> Result<String> {
    match format {
        OutputFormat::Json => output::json(&image_set(image)),
        OutputFormat::Id => Ok(output::ids([image.image_id.as_str()])),
        OutputFormat::Table => Ok(image_fields(&image)),
    }
}

/// The file to send and its size: a regular file's length, or `--size` for a pipe.
fn open_source(path: &std::path::Path, size: Option<u64>) -> Result<(Box<dyn Read + Send>, u64)> {
    let what = || format!("cannot read {}", path.display());
    if crate::is_stdio(path) {
        let stdin = std::io::stdin();
        // `< file` makes stdin a regular file whose length is known; a pipe needs --size.
        let known = stdin_len();
        let size = match (size, known) {
            (Some(size), _) => size,
            (None, Some(len)) => len,
            (None, None) => {
                return Err(CliError::Failed(
                    "reading a disk file from a pipe needs its size: --size BYTES".to_string(),
                ))
            }
        };
        return Ok((Box::new(stdin), size));
    }
    let file = std::fs::File::open(path).map_err(|e| CliError::io(what(), e))?;
    let len = file.metadata().map_err(|e| CliError::io(what(), e))?.len();
    if let Some(size) = size {
        if size != len {
            return Err(CliError::Failed(format!(
                "--size {size} differs from the length of {} ({len} bytes)",
                path.display()
            )));
        }
    }
    Ok((Box::new(file), len))
}

/// The length of stdin when it is a regular file.
fn stdin_len() -> Option<u64> {
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    let fd = stdin.as_fd().try_clone_to_owned().ok()?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    meta.is_file().then_some(meta.len())
}

/// Streams `size` bytes of `reader` in `UploadImage`; returns the new image's id.
async fn upload(
    client: &mut crate::images::RegionClient,
    parameters: ImportImageParameters,
    mut reader: Box<dyn Read + Send>,
    size: u64,
    task: &mut Task,
) -> Result<String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadImageRequest>(READ_AHEAD);
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0u64);
    // Reads on a blocking thread: a slow disk or pipe does not hold the runtime.
    let reader_task = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let first = UploadImageRequest {
            parameters: Some(parameters),
            size_bytes: size,
            data: Vec::new(),
        };
        if tx.blocking_send(first).is_err() {
            return Ok(());
        }
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; PIECE];
            let mut filled = 0;
            while filled < PIECE {
                match reader.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            sent += filled as u64;
            let message = UploadImageRequest {
                parameters: None,
                size_bytes: 0,
                data: buf,
            };
            if tx.blocking_send(message).is_err() {
                // The call ended (refused): its error says why.
                return Ok(());
            }
            let _ = sent_tx.send(sent);
            if filled < PIECE {
                break;
            }
        }
        Ok(())
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let call = client.upload_image(stream);
    tokio::pin!(call);
    let response = loop {
        tokio::select! {
            response = &mut call => break response,
            changed = sent_rx.changed() => {
                if changed.is_ok() {
                    task.set_position(*sent_rx.borrow());
                }
            }
        }
    };
    let read = reader_task
        .await
        .map_err(|e| CliError::Failed(format!("reading the file stopped: {e}")))?;
    let response = response?.into_inner();
    read.map_err(|e| CliError::io("cannot read the disk file", e))?;
    task.set_position(size);
    Ok(response.image_id)
}

/// Polls an importing image until it is `NORMAL` (returned) or `IMPORTFAILED` (an error with
/// the reason), showing the bytes read of the file.
async fn follow(
    client: &mut crate::images::RegionClient,
    image_id: &str,
    task: &mut Task,
) -> Result<Image> {
    let result = wait_for_image(client, image_id, POLL, WAIT_TIMEOUT, |image| {
        if let Some(p) = &image.import_progress {
            if p.size_bytes > 0 && task.total().is_none() {
                task.set_total(p.size_bytes);
            }
            task.set_position(p.bytes_read);
        }
    })
    .await;
    match &result {
        Ok(_) => task.finish("NORMAL"),
        Err(_) => task.fail("IMPORTFAILED"),
    }
    result
}

/// `imagectl images import-os`: the platforms, versions, architectures and formats an import
/// may declare.
pub async fn import_os(session: &Session, args: ImportOs, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .describe_import_image_os(DescribeImportImageOsRequest {})
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(
            response
                .import_os_list_support
                .iter()
                .map(|os| os.platform.as_str()),
        )),
        OutputFormat::Table => {
            let mut table = Table::new(&["PLATFORM", "OS_VERSIONS"]);
            for os in &response.import_os_list_support {
                table.row(vec![os.platform.clone(), os.os_versions.join(", ")]);
            }
            let mut text = table.render();
            text.push_str(&format!(
                "architectures: {}\nformats: {}\n",
                response.architectures.join(", "),
                response.image_formats.join(", ")
            ));
            Ok(text)
        }
    }
}
