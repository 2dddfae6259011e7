//! `imagectl` commands against an in-process fake catalog and region service: region lookup
//! through the catalog, paging with `--all`, `create --wait`, sparse export, chunked disk
//! writes and reads, and how server errors are reported.

use clap::Parser;
use imagefleet_imagectl::cli::Cli;
use imagefleet_proto::catalog::v1 as catalog;
use imagefleet_proto::region::v1 as region;
use imagefleet_rpc::cluster::{AccountEntry, ClusterFile, RegionEndpoint, ServiceEndpoint};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status};

const MIB: usize = 1024 * 1024;
const EXPORT_SIZE: u64 = 3 * MIB as u64 + 10;
const DISK_SIZE: usize = 3 * MIB + 100;

#[derive(Default)]
struct State {
    disk: Vec<u8>,
    write_sizes: Vec<usize>,
    read_sizes: Vec<u64>,
    created_polls: u32,
    fail_create: bool,
}

#[derive(Clone)]
struct Fake {
    endpoint: String,
    state: Arc<Mutex<State>>,
}

fn image(id: &str, state: region::ImageState) -> region::Image {
    region::Image {
        image_id: id.to_string(),
        image_name: format!("name-{id}"),
        image_type: region::ImageType::PrivateImage as i32,
        image_state: state as i32,
        platform: "Ubuntu".into(),
        image_size_gib: 1,
        ..Default::default()
    }
}

fn listed_images() -> Vec<region::Image> {
    (1..=5)
        .map(|i| image(&format!("img-list000{i}"), region::ImageState::Normal))
        .collect()
}

#[tonic::async_trait]
impl catalog::catalog_service_server::CatalogService for Fake {
    async fn describe_regions(
        &self,
        _: Request<catalog::DescribeRegionsRequest>,
    ) -> Result<Response<catalog::DescribeRegionsResponse>, Status> {
        Ok(Response::new(catalog::DescribeRegionsResponse {
            region_set: vec![catalog::Region {
                region: "ap-guangzhou".into(),
                region_name: "Guangzhou".into(),
                area: catalog::Area::Mainland as i32,
                endpoint: self.endpoint.clone(),
                registered_time: "2025-01-01T00:00:00Z".into(),
            }],
            total_count: 1,
        }))
    }

    async fn describe_public_images(
        &self,
        _: Request<catalog::DescribePublicImagesRequest>,
    ) -> Result<Response<catalog::DescribePublicImagesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

type ExportStream =
    tokio_stream::Iter<std::vec::IntoIter<Result<region::ExportImageChunk, Status>>>;

#[tonic::async_trait]
impl region::region_service_server::RegionService for Fake {
    async fn describe_images(
        &self,
        request: Request<region::DescribeImagesRequest>,
    ) -> Result<Response<region::DescribeImagesResponse>, Status> {
        let request = request.into_inner();
        if let Some(id) = request.image_ids.first() {
            let found = match id.as_str() {
                "img-created1" => {
                    let mut state = self.state.lock().unwrap();
                    state.created_polls += 1;
                    let mut img = image(id, region::ImageState::Creating);
                    if state.created_polls >= 3 {
                        if state.fail_create {
                            img.image_state = region::ImageState::Createfailed as i32;
                            img.state_reason = "snapshot could not be frozen".into();
                        } else {
                            img.image_state = region::ImageState::Normal as i32;
                        }
                    }
                    img
                }
                "img-export01" => {
                    let mut img = image(id, region::ImageState::Normal);
                    img.virtual_size_bytes = EXPORT_SIZE;
                    img
                }
                _ => {
                    return Err(imagefleet_proto::error::status(
                        tonic::Code::NotFound,
                        "InvalidImageId.NotFound",
                        format!("image {id} does not exist"),
                    ))
                }
            };
            return Ok(Response::new(region::DescribeImagesResponse {
                image_set: vec![found],
                total_count: 1,
                next_page_token: String::new(),
            }));
        }
        // Pages of two, the token being the index of the next image.
        let all = listed_images();
        let start = if request.page_token.is_empty() {
            request.offset as usize
        } else {
            request
                .page_token
                .parse()
                .map_err(|_| Status::invalid_argument("bad token"))?
        };
        let end = (start + 2).min(all.len());
        Ok(Response::new(region::DescribeImagesResponse {
            image_set: all[start.min(end)..end].to_vec(),
            total_count: all.len() as u32,
            next_page_token: if end < all.len() {
                end.to_string()
            } else {
                String::new()
            },
        }))
    }

    async fn describe_image_quota(
        &self,
        _: Request<region::DescribeImageQuotaRequest>,
    ) -> Result<Response<region::DescribeImageQuotaResponse>, Status> {
        Ok(Response::new(region::DescribeImageQuotaResponse {
            image_num_quota: 500,
            image_num_used: 3,
        }))
    }

    async fn modify_image_attribute(
        &self,
        _: Request<region::ModifyImageAttributeRequest>,
    ) -> Result<Response<region::ModifyImageAttributeResponse>, Status> {
        Ok(Response::new(region::ModifyImageAttributeResponse {}))
    }

    async fn delete_images(
        &self,
        request: Request<region::DeleteImagesRequest>,
    ) -> Result<Response<region::DeleteImagesResponse>, Status> {
        let id = request.into_inner().image_ids.join(",");
        Err(imagefleet_proto::error::status(
            tonic::Code::NotFound,
            "InvalidImageId.NotFound",
            format!("image {id} does not exist"),
        ))
    }

    async fn create_image(
        &self,
        _: Request<region::CreateImageRequest>,
    ) -> Result<Response<region::CreateImageResponse>, Status> {
        Ok(Response::new(region::CreateImageResponse {
            image_id: "img-created1".into(),
        }))
    }

    type ExportImageStream = ExportStream;

    async fn export_image(
        &self,
        _: Request<region::ExportImageRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let chunk = |offset: u64, data: Vec<u8>| {
            Ok(region::ExportImageChunk {
                offset,
                data,
                virtual_size_bytes: EXPORT_SIZE,
                content_digest: "sha256:feed".into(),
            })
        };
        // The second MiB is zeros and not sent.
        let chunks = vec![
            chunk(0, vec![0xab; MIB]),
            chunk(2 * MIB as u64, vec![0xcd; MIB + 10]),
        ];
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn run_instances(
        &self,
        request: Request<region::RunInstancesRequest>,
    ) -> Result<Response<region::RunInstancesResponse>, Status> {
        let count = request.into_inner().instance_count.max(1);
        Ok(Response::new(region::RunInstancesResponse {
            instance_id_set: (0..count).map(|i| format!("ins-0000000{i}")).collect(),
        }))
    }

    async fn describe_instances(
        &self,
        _: Request<region::DescribeInstancesRequest>,
    ) -> Result<Response<region::DescribeInstancesResponse>, Status> {
        Ok(Response::new(region::DescribeInstancesResponse {
            instance_set: vec![region::Instance {
                instance_id: "ins-00000000".into(),
                instance_type: "S5.MEDIUM4".into(),
                instance_state: region::InstanceState::Running as i32,
                image_id: "img-list0001".into(),
                system_disk: Some(region::SystemDisk { disk_size_gib: 50 }),
                ..Default::default()
            }],
            total_count: 1,
            next_page_token: String::new(),
        }))
    }

    async fn terminate_instances(
        &self,
        _: Request<region::TerminateInstancesRequest>,
    ) -> Result<Response<region::TerminateInstancesResponse>, Status> {
        Ok(Response::new(region::TerminateInstancesResponse {}))
    }

    async fn reset_instance(
        &self,
        _: Request<region::ResetInstanceRequest>,
    ) -> Result<Response<region::ResetInstanceResponse>, Status> {
        Ok(Response::new(region::ResetInstanceResponse {}))
    }

    async fn write_instance_disk(
        &self,
        request: Request<region::WriteInstanceDiskRequest>,
    ) -> Result<Response<region::WriteInstanceDiskResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        let start = request.offset as usize;
        let end = start + request.data.len();
        if request.data.len() > MIB || end > state.disk.len() {
            return Err(Status::invalid_argument("too much"));
        }
        state.disk[start..end].copy_from_slice(&request.data);
        state.write_sizes.push(request.data.len());
        Ok(Response::new(region::WriteInstanceDiskResponse {
            bytes_written: request.data.len() as u64,
        }))
    }

    async fn read_instance_disk(
        &self,
        request: Request<region::ReadInstanceDiskRequest>,
    ) -> Result<Response<region::ReadInstanceDiskResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state.lock().unwrap();
        let start = request.offset as usize;
        let end = start + request.length as usize;
        if request.length as usize > MIB || end > state.disk.len() {
            return Err(Status::out_of_range("past the disk"));
        }
        state.read_sizes.push(request.length);
        Ok(Response::new(region::ReadInstanceDiskResponse {
            data: state.disk[start..end].to_vec(),
        }))
    }
}

struct Harness {
    fake: Fake,
    dir: tempfile::TempDir,
    cluster: PathBuf,
}

/// Starts the fake on a free port and writes a cluster file whose catalog is the fake and
/// whose region list is empty (so region endpoints must come from the catalog).
async fn start() -> Harness {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let fake = Fake {
        endpoint: endpoint.clone(),
        state: Arc::new(Mutex::new(State {
            disk: vec![0; DISK_SIZE],
            ..Default::default()
        })),
    };
    let server = tonic::transport::Server::builder()
        .add_service(catalog::catalog_service_server::CatalogServiceServer::new(
            fake.clone(),
        ))
        .add_service(region::region_service_server::RegionServiceServer::new(
            fake.clone(),
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.json");
    write_cluster(&cluster, &endpoint, vec![]);
    Harness { fake, dir, cluster }
}

fn write_cluster(path: &Path, catalog: &str, regions: Vec<RegionEndpoint>) {
    ClusterFile {
        catalog: ServiceEndpoint {
            endpoint: catalog.to_string(),
        },
        sharing: ServiceEndpoint {
            endpoint: "http://127.0.0.1:1".into(),
        },
        regions,
        accounts: vec![AccountEntry {
            account_id: "100000000001".into(),
            name: "dev".into(),
            secret_id: "AKIDdev".into(),
            secret_key: "secret".into(),
        }],
        redis_url: String::new(),
        service_key_file: String::new(),
    }
    .store(path)
    .unwrap();
}

impl Harness {
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        let cluster = self.cluster.display().to_string();
        let argv = ["imagectl"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(["--cluster", cluster.as_str()]);
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        imagefleet_imagectl::run(cli)
            .await
            .map_err(|e| e.to_string())
    }

    async fn json(&self, args: &[&str]) -> serde_json::Value {
        let args: Vec<&str> = args.iter().copied().chain(["--output", "json"]).collect();
        let text = self.run(&args).await.expect("command succeeds");
        serde_json::from_str(&text).expect("one JSON document")
    }
}

#[tokio::test]
async fn regions_come_from_the_catalog() {
    let h = start().await;
    let text = h.run(&["regions", "list"]).await.unwrap();
    assert!(
        text.contains("ap-guangzhou") && text.contains("MAINLAND"),
        "{text}"
    );
    let quota = h
        .json(&["images", "quota", "--region", "ap-guangzhou"])
        .await;
    assert_eq!(quota["imageNumQuota"], 500);
    let err = h
        .run(&["images", "quota", "--region", "eu-frankfurt"])
        .await;
    assert_eq!(err.unwrap_err(), "unknown region eu-frankfurt");
}

#[tokio::test]
async fn the_cluster_file_is_used_when_the_catalog_is_down() {
    let h = start().await;
    write_cluster(
        &h.cluster,
        "http://127.0.0.1:1",
        vec![RegionEndpoint {
            region: "ap-guangzhou".into(),
            endpoint: h.fake.endpoint.clone(),
        }],
    );
    let quota = h
        .json(&["images", "quota", "--region", "ap-guangzhou"])
        .await;
    assert_eq!(quota["imageNumUsed"], 3);
}

#[tokio::test]
async fn list_all_follows_the_page_tokens() {
    let h = start().await;
    let one = h
        .json(&["images", "list", "--region", "ap-guangzhou"])
        .await;
    assert_eq!(one["imageSet"].as_array().unwrap().len(), 2);
    assert_eq!(one["nextPageToken"], "2");
    let all = h
        .json(&["images", "list", "--region", "ap-guangzhou", "--all"])
        .await;
    let ids: Vec<&str> = all["imageSet"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["imageId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 5, "{all}");
    assert_eq!(all["totalCount"], 5);
    assert_eq!(all["imageSet"][0]["imageState"], "NORMAL");
    let table = h
        .run(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--all",
            "--offset",
            "1",
        ])
        .await
        .unwrap();
    assert_eq!(table.lines().count(), 1 + 4, "{table}");
}

#[tokio::test]
async fn create_wait_polls_until_normal() {
    let h = start().await;
    let image = h
        .json(&[
            "images",
            "create",
            "--region",
            "ap-guangzhou",
            "--instance",
            "ins-00000000",
            "--name",
            "x",
            "--wait",
        ])
        .await;
    assert_eq!(image["imageId"], "img-created1");
    assert_eq!(image["imageState"], "NORMAL");
}

#[tokio::test]
async fn create_wait_reports_a_failed_build() {
    let h = start().await;
    h.fake.state.lock().unwrap().fail_create = true;
    let err = h
        .run(&[
            "images",
            "create",
            "--region",
            "ap-guangzhou",
            "--instance",
            "ins-00000000",
            "--name",
            "x",
            "--wait",
        ])
        .await
        .unwrap_err();
    assert!(
        err.contains("CREATEFAILED") && err.contains("snapshot could not be frozen"),
        "{err}"
    );
}

#[tokio::test]
async fn export_writes_a_sparse_file() {
    let h = start().await;
    let out = h.dir.path().join("image.raw");
    let summary = h
        .json(&[
            "images",
            "export",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-export01",
            "--format",
            "raw",
            "--out",
            out.to_str().unwrap(),
        ])
        .await;
    assert_eq!(summary["imageId"], "img-export01");
    assert_eq!(summary["bytes"], EXPORT_SIZE);
    assert_eq!(summary["contentDigest"], "sha256:feed");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len() as u64, EXPORT_SIZE);
    assert!(bytes[..MIB].iter().all(|&b| b == 0xab));
    assert!(bytes[MIB..2 * MIB].iter().all(|&b| b == 0));
    assert!(bytes[2 * MIB..].iter().all(|&b| b == 0xcd));
}

#[tokio::test]
async fn disk_writes_and_reads_go_in_mebibytes() {
    let h = start().await;
    let input = h.dir.path().join("input.bin");
    let data: Vec<u8> = (0..2 * MIB + 7).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    let written = h
        .json(&[
            "instances",
            "write",
            "--region",
            "ap-guangzhou",
            "--instance",
            "ins-00000000",
            "--offset",
            "50",
            "--file",
            input.to_str().unwrap(),
        ])
        .await;
    assert_eq!(written["bytesWritten"], data.len());
    assert_eq!(h.fake.state.lock().unwrap().write_sizes, [MIB, MIB, 7]);

    let out = h.dir.path().join("output.bin");
    let length = data.len().to_string();
    let read = h
        .json(&[
            "instances",
            "read",
            "--region",
            "ap-guangzhou",
            "--instance",
            "ins-00000000",
            "--offset",
            "50",
            "--length",
            &length,
            "--out",
            out.to_str().unwrap(),
        ])
        .await;
    assert_eq!(read["bytesRead"], data.len());
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert_eq!(
        h.fake.state.lock().unwrap().read_sizes,
        [MIB as u64, MIB as u64, 7]
    );
}

#[tokio::test]
async fn server_errors_name_code_and_reason() {
    let h = start().await;
    let err = h
        .run(&[
            "images",
            "delete",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-nothere1",
        ])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "NotFound InvalidImageId.NotFound: image img-nothere1 does not exist"
    );
}

#[tokio::test]
async fn instance_commands_print_tables_and_json() {
    let h = start().await;
    let run = h
        .json(&[
            "instances",
            "run",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-list0001",
            "--type",
            "S5.MEDIUM4",
            "--count",
            "2",
        ])
        .await;
    assert_eq!(run["instanceIdSet"].as_array().unwrap().len(), 2);
    let table = h
        .run(&["instances", "list", "--region", "ap-guangzhou"])
        .await
        .unwrap();
    assert!(table.starts_with("INSTANCE_ID"), "{table}");
    assert!(table.contains("RUNNING"), "{table}");
    let empty = h
        .json(&[
            "instances",
            "terminate",
            "--region",
            "ap-guangzhou",
            "--instance",
            "ins-00000000",
        ])
        .await;
    assert_eq!(empty, serde_json::json!({}));
}
