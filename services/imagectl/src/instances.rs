//! `imagectl instances ...`: run, list, terminate, reset, and writing and reading a system
//! disk.

use crate::cli::{
    InstancesCommand, InstancesList, InstancesRead, InstancesReset, InstancesRun,
    InstancesTerminate, InstancesWrite, OutputFormat,
};
use crate::error::{CliError, Result};
use crate::output::{self, enum_name, Table};
use crate::paging;
use crate::session::Session;
use imagefleet_proto::region::v1::{
    DescribeInstancesRequest, DescribeInstancesResponse, Filter, Instance, InstanceState,
    ReadInstanceDiskRequest, ResetInstanceRequest, RunInstancesRequest, TerminateInstancesRequest,
    WriteInstanceDiskRequest,
};
use std::io::{Read, Write};

/// How often `instances run --wait` asks for the instances' state.
const RUN_WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);
/// How long `instances run --wait` waits for the instances to leave `PENDING`.
const RUN_WAIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The most bytes one `WriteInstanceDisk` or `ReadInstanceDisk` call carries.
pub const DISK_IO_BYTES: usize = 1024 * 1024;

pub async fn run(
    session: &Session,
    command: InstancesCommand,
    format: OutputFormat,
) -> Result<String> {
    match command {
        InstancesCommand::Run(args) => run_instances(session, args, format).await,
        InstancesCommand::List(args) => list(session, args, format).await,
        InstancesCommand::Terminate(args) => terminate(session, args, format).await,
        InstancesCommand::Reset(args) => reset(session, args, format).await,
        InstancesCommand::Write(args) => write(session, args, format).await,
        InstancesCommand::Read(args) => read(session, args, format).await,
    }
}

async fn run_instances(
    session: &Session,
    args: InstancesRun,
    format: OutputFormat,
) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .run_instances(RunInstancesRequest {
            image_id: args.image,
            instance_type: args.instance_type,
            instance_count: args.count.unwrap_or(0),
            system_disk_size_gib: args.disk_size_gib.unwrap_or(0),
            instance_name: args.name.unwrap_or_default(),
        })
        .await?
        .into_inner();
    let ids = response.instance_id_set;
    if format == OutputFormat::Id && !args.wait {
        return Ok(output::ids(ids.iter().map(String::as_str)));
    }
    // The launched instances as `instances list` shows them, in launch order; with `--wait`,
    // once every one is RUNNING.
    let deadline = tokio::time::Instant::now() + RUN_WAIT_TIMEOUT;
    let described = loop {
        let described = client
            .describe_instances(DescribeInstancesRequest {
                instance_ids: ids.clone(),
                limit: ids.len().min(100) as u32,
                ..Default::default()
            })
            .await?
            .into_inner();
        let pending = described
            .instance_set
            .iter()
            .filter(|i| i.instance_state == InstanceState::Pending as i32)
            .count();
        if !args.wait || pending == 0 {
            break described;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(CliError::Failed(format!(
                "{pending} of {} instances still PENDING after {} seconds",
                ids.len(),
                RUN_WAIT_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(RUN_WAIT_POLL).await;
    };
    if format == OutputFormat::Id {
        return Ok(output::ids(ids.iter().map(String::as_str)));
    }
    let mut instance_set = Vec::with_capacity(ids.len());
    for id in &ids {
        match described.instance_set.iter().find(|i| &i.instance_id == id) {
            Some(instance) => instance_set.push(instance.clone()),
            None => instance_set.push(Instance {
                instance_id: id.clone(),
                ..Default::default()
            }),
        }
    }
    let total_count = instance_set.len() as u32;
    match format {
        OutputFormat::Json => output::json(&DescribeInstancesResponse {
            instance_set,
            total_count,
            next_page_token: String::new(),
        }),
        _ => Ok(instance_table(&instance_set)),
    }
}

/// The `DescribeInstances` filters the flags of `instances list` ask for (ids go in
/// `instance_ids`).
pub fn list_filters(args: &InstancesList) -> Vec<Filter> {
    [("image-id", &args.image), ("instance-state", &args.state)]
        .into_iter()
        .filter_map(|(name, value)| {
            value.as_ref().map(|value| Filter {
                name: name.to_string(),
                values: vec![value.clone()],
            })
        })
        .collect()
}

async fn list(session: &Session, args: InstancesList, format: OutputFormat) -> Result<String> {
    let client = session.region(&args.region.region).await?;
    let request = DescribeInstancesRequest {
        instance_ids: args.instance.clone(),
        filters: list_filters(&args),
        offset: args.page.offset.unwrap_or(0),
        limit: args.page.limit.unwrap_or(0),
        ..Default::default()
    };
    let response = paging::list(request, args.page.all, |request| {
        let mut client = client.clone();
        async move { Ok(client.describe_instances(request).await?.into_inner()) }
    })
    .await?;
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(
            response.instance_set.iter().map(|i| i.instance_id.as_str()),
        )),
        OutputFormat::Table => Ok(output::list_table(
            &instance_rows(&response.instance_set),
            "instances",
            args.page.offset.unwrap_or(0),
            response.total_count,
            !response.next_page_token.is_empty(),
        )),
    }
}

/// Instances as a table: one row each.
pub fn instance_table(instances: &[Instance]) -> String {
    instance_rows(instances).render()
}

/// Instances as table rows.
pub fn instance_rows(instances: &[Instance]) -> Table {
    let mut table = Table::new(&[
        "INSTANCE_ID",
        "NAME",
        "TYPE",
        "STATE",
        "IMAGE_ID",
        "DISK_GIB",
    ]);
    for instance in instances {
        table.row(vec![
            instance.instance_id.clone(),
            instance.instance_name.clone(),
            instance.instance_type.clone(),
            enum_name(instance.instance_state, InstanceState::as_str_name),
            instance.image_id.clone(),
            instance
                .system_disk
                .map(|d| d.disk_size_gib.to_string())
                .unwrap_or_default(),
        ]);
    }
    table
}

async fn terminate(
    session: &Session,
    args: InstancesTerminate,
    format: OutputFormat,
) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .terminate_instances(TerminateInstancesRequest {
            instance_ids: args.instance.clone(),
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids(args.instance.iter().map(String::as_str))),
        OutputFormat::Table => Ok(format!("terminated {}\n", args.instance.join(" "))),
    }
}

async fn reset(session: &Session, args: InstancesReset, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .reset_instance(ResetInstanceRequest {
            instance_id: args.instance.clone(),
            image_id: args.image.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    match format {
        OutputFormat::Json => output::json(&response),
        OutputFormat::Id => Ok(output::ids([args.instance.as_str()])),
        OutputFormat::Table => Ok(match args.image {
            Some(image) => format!("reset {} from {image}\n", args.instance),
            None => format!("reset {}\n", args.instance),
        }),
    }
}

/// Reads until `buf` is full or the reader is exhausted; returns the bytes read.
fn fill(reader: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

async fn write(session: &Session, args: InstancesWrite, format: OutputFormat) -> Result<String> {
    let mut file: Box<dyn Read> = if crate::is_stdio(&args.file) {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(
            std::fs::File::open(&args.file)
                .map_err(|e| CliError::io(format!("cannot read {}", args.file.display()), e))?,
        )
    };
    let mut client = session.region(&args.region.region).await?;
    let mut buf = vec![0u8; DISK_IO_BYTES];
    let mut written: u64 = 0;
    loop {
        let n = fill(&mut file, &mut buf)
            .map_err(|e| CliError::io(format!("cannot read {}", args.file.display()), e))?;
        if n == 0 {
            break;
        }
        let offset = args.offset.checked_add(written).ok_or_else(|| {
            CliError::Failed(format!("offset {} plus {written} overflows", args.offset))
        })?;
        let response = client
            .write_instance_disk(WriteInstanceDiskRequest {
                instance_id: args.instance.clone(),
                offset,
                data: buf[..n].to_vec(),
            })
            .await?
            .into_inner();
        if response.bytes_written != n as u64 {
            return Err(CliError::Failed(format!(
                "the server wrote {} of {n} bytes at offset {offset}",
                response.bytes_written
            )));
        }
        written += n as u64;
    }
    match format {
        OutputFormat::Json => Ok(output::json_document(&serde_json::json!({
            "instanceId": args.instance,
            "offset": args.offset,
            "bytesWritten": written,
        }))),
        OutputFormat::Id => Ok(output::ids([args.instance.as_str()])),
        OutputFormat::Table => Ok(format!(
            "wrote {written} bytes to {} at offset {}\n",
            args.instance, args.offset
        )),
    }
}

async fn read(session: &Session, args: InstancesRead, format: OutputFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let to_stdout = crate::is_stdio(&args.out);
    let what = || format!("cannot write {}", args.out.display());
    let mut disk_file = None;
    let mut file: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        let created = std::fs::File::create(&args.out).map_err(|e| CliError::io(what(), e))?;
        disk_file = Some(created.try_clone().map_err(|e| CliError::io(what(), e))?);
        Box::new(created)
    };
    let mut done: u64 = 0;
    while done < args.length {
        let offset = args.offset.checked_add(done).ok_or_else(|| {
            CliError::Failed(format!("offset {} plus {done} overflows", args.offset))
        })?;
        let length = (args.length - done).min(DISK_IO_BYTES as u64);
        let data = client
            .read_instance_disk(ReadInstanceDiskRequest {
                instance_id: args.instance.clone(),
                offset,
                length,
            })
            .await?
            .into_inner()
            .data;
        if data.is_empty() || data.len() as u64 > length {
            return Err(CliError::Failed(format!(
                "asked for {length} bytes at offset {offset}, the server sent {}",
                data.len()
            )));
        }
        file.write_all(&data).map_err(|e| CliError::io(what(), e))?;
        done += data.len() as u64;
    }
    file.flush().map_err(|e| CliError::io(what(), e))?;
    drop(file);
    if let Some(disk_file) = disk_file {
        disk_file.sync_all().map_err(|e| CliError::io(what(), e))?;
    }
    let summary = match format {
        OutputFormat::Json => output::json_document(&serde_json::json!({
            "instanceId": args.instance,
            "offset": args.offset,
            "bytesRead": done,
            "out": args.out.display().to_string(),
        })),
        OutputFormat::Id => output::ids([args.instance.as_str()]),
        OutputFormat::Table => format!(
            "read {done} bytes from {} at offset {} into {}\n",
            args.instance,
            args.offset,
            if to_stdout {
                "stdout".to_string()
            } else {
                args.out.display().to_string()
            }
        ),
    };
    if to_stdout {
        // stdout holds the bytes read: the summary goes to stderr.
        eprint!("{summary}");
        return Ok(String::new());
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagefleet_proto::region::v1::SystemDisk;

    #[test]
    fn fill_reads_until_full_or_exhausted() {
        let mut reader: &[u8] = &[1, 2, 3, 4, 5];
        let mut buf = [0u8; 3];
        assert_eq!(fill(&mut reader, &mut buf).expect("reads"), 3);
        assert_eq!(buf, [1, 2, 3]);
        assert_eq!(fill(&mut reader, &mut buf).expect("reads"), 2);
        assert_eq!(fill(&mut reader, &mut buf).expect("reads"), 0);
    }

    #[test]
    fn instance_tables_have_the_list_columns() {
        let text = instance_table(&[Instance {
            instance_id: "ins-aaaaaaaa".into(),
            instance_name: "web".into(),
            instance_type: "S5.MEDIUM4".into(),
            instance_state: InstanceState::Running as i32,
            image_id: "img-aaaaaaaa".into(),
            system_disk: Some(SystemDisk { disk_size_gib: 50 }),
            ..Default::default()
        }]);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows,
            [
                vec![
                    "INSTANCE_ID",
                    "NAME",
                    "TYPE",
                    "STATE",
                    "IMAGE_ID",
                    "DISK_GIB"
                ],
                vec![
                    "ins-aaaaaaaa",
                    "web",
                    "S5.MEDIUM4",
                    "RUNNING",
                    "img-aaaaaaaa",
                    "50"
                ],
            ]
        );
    }
}
