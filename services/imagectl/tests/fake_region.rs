//! `imagectl` commands against an in-process fake catalog and region service: region lookup
//! through the catalog, paging with `--all`, `create --wait`, sparse export, chunked disk
//! writes and reads, `sync` (with `--wait` polling each destination region, and its progress
//! on stderr), `share`/`unshare`/`shares`, how server errors are reported, and the billing
//! commands (against a fake billing service and region that verify the signatures).

use clap::Parser;
use imagefleet_imagectl::cli::Cli;
use imagefleet_imagectl::progress::{Progress, SystemClock};
use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::catalog::v1 as catalog;
use imagefleet_proto::region::v1 as region;
use imagefleet_rpc::cluster::{AccountEntry, ClusterFile, RegionEndpoint, ServiceEndpoint};
use std::collections::HashMap;
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
    /// `SyncImages` calls, as received by the region asked.
    sync_requests: Vec<(String, region::SyncImagesRequest)>,
    /// Polls of each destination image (by id).
    sync_polls: HashMap<String, u32>,
    /// `DescribeImages` calls for destination images: region asked, caller's secret id, ids.
    sync_describes: Vec<(String, String, Vec<String>)>,
    /// Whether the ap-beijing copy fails.
    fail_sync: bool,
    /// Each image's shares, in the order they were made.
    shares: HashMap<String, Vec<region::ImageShare>>,
    /// `ModifyImageSharePermission` calls, as received.
    share_requests: Vec<region::ModifyImageSharePermissionRequest>,
    /// `InquiryPriceRunInstances` calls: region asked, caller's secret id, request.
    inquiries: Vec<(String, String, region::InquiryPriceRunInstancesRequest)>,
    /// `DescribePriceBook` calls: the verified account, request.
    price_book_requests: Vec<(String, billing::DescribePriceBookRequest)>,
    /// `DescribeBill` calls: the verified account, request.
    bill_requests: Vec<(String, billing::DescribeBillRequest)>,
}

/// One region's fake service (and, in ap-guangzhou, the catalog). Every region shares the
/// state.
#[derive(Clone)]
struct Fake {
    region: String,
    endpoint: String,
    /// (region, endpoint) of every fake region, as the catalog lists them.
    regions: Arc<Vec<(String, String)>>,
    state: Arc<Mutex<State>>,
}

/// The source image the sync tests copy.
const SYNC_SOURCE: &str = "img-list0001";
/// The destination images `SyncImages` answers with: (region, image id).
const SYNC_DESTINATIONS: [(&str, &str); 2] = [
    ("ap-shanghai", "img-sync0001"),
    ("ap-beijing", "img-sync0002"),
];
/// Bytes of the ap-shanghai copy (reported through `sync_progress`).
const SYNC_BYTES: u64 = 100 * MIB as u64;
/// Virtual size of the ap-beijing copy (reported through `sync_percent` only).
const SYNC_VIRTUAL: u64 = 10 * MIB as u64;
const SYNC_FAILURE: &str = "source image changed during the copy";

/// Destination image `id` at its `poll`th poll. ap-shanghai's copy moves 30 MiB of 100 per
/// poll and is NORMAL at the 5th poll; ap-beijing's has no `sync_progress`, moves 40% per
/// poll and is NORMAL at the 4th (or CREATEFAILED at the 2nd if `fail`).
fn synced_image(id: &str, poll: u32, fail: bool) -> region::Image {
    let mut img = image(id, region::ImageState::Syncing);
    img.image_source = region::ImageSource::Sync as i32;
    if id == SYNC_DESTINATIONS[0].1 {
        let done = (u64::from(poll) * 30 * MIB as u64).min(SYNC_BYTES);
        img.region = SYNC_DESTINATIONS[0].0.into();
        img.virtual_size_bytes = 1 << 30;
        img.sync_percent = (done * 100 / SYNC_BYTES) as u32;
        img.sync_progress = Some(region::SyncProgress {
            source_region: "ap-guangzhou".into(),
            source_image_id: SYNC_SOURCE.into(),
            chunks_total: 100,
            bytes_total: SYNC_BYTES,
            chunks_done: done / MIB as u64,
            bytes_done: done,
            chunks_transferred: done / MIB as u64 + 2,
            bytes_transferred: done + 2 * MIB as u64,
            attempts: 2,
            last_error: "connection reset".into(),
        });
        if poll >= 5 {
            img.image_state = region::ImageState::Normal as i32;
        }
    } else {
        // No region field: imagectl fills it in.
        img.virtual_size_bytes = SYNC_VIRTUAL;
        img.sync_percent = (poll * 40).min(100);
        if fail && poll >= 2 {
            img.image_state = region::ImageState::Createfailed as i32;
            img.state_reason = SYNC_FAILURE.into();
        } else if poll >= 4 {
            img.image_state = region::ImageState::Normal as i32;
        }
    }
    img
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

/// What `DescribeImages` lists with the filter `image-type: SHARED_IMAGE`.
fn shared_images() -> Vec<region::Image> {
    let mut img = image("img-shared01", region::ImageState::Normal);
    img.image_type = region::ImageType::SharedImage as i32;
    img.image_creator = "100000000009".into();
    vec![img]
}

/// When the `n`th share (from 0) was made.
fn share_time(n: usize) -> String {
    format!("2025-03-01T00:00:{n:02}Z")
}

/// `InvalidImageId.NotFound` unless `id` is one of the listed (own) images.
fn own_image(id: &str) -> Result<(), Status> {
    if listed_images().iter().any(|i| i.image_id == id) {
        Ok(())
    } else {
        Err(imagefleet_proto::error::status(
            tonic::Code::NotFound,
            "InvalidImageId.NotFound",
            format!("image {id} does not exist"),
        ))
    }
}

#[tonic::async_trait]
impl catalog::catalog_service_server::CatalogService for Fake {
    async fn describe_regions(
        &self,
        _: Request<catalog::DescribeRegionsRequest>,
    ) -> Result<Response<catalog::DescribeRegionsResponse>, Status> {
        let region_set: Vec<catalog::Region> = self
            .regions
            .iter()
            .map(|(region, endpoint)| catalog::Region {
                region: region.clone(),
                region_name: region.clone(),
                area: catalog::Area::Mainland as i32,
                endpoint: endpoint.clone(),
                registered_time: "2025-01-01T00:00:00Z".into(),
                public_endpoint: String::new(),
            })
            .collect();
        Ok(Response::new(catalog::DescribeRegionsResponse {
            total_count: region_set.len() as u32,
            region_set,
        }))
    }

    async fn describe_public_images(
        &self,
        _: Request<catalog::DescribePublicImagesRequest>,
    ) -> Result<Response<catalog::DescribePublicImagesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }
}

/// The paid root of the lineage every price inquiry and bill of the fakes shows.
const WINDOWS_ROOT: &str = "img-winroot1";

/// Micro-units as a decimal amount (`36400` is `0.0364`).
fn micros(m: u64) -> String {
    let text = format!("{}.{:06}", m / 1_000_000, m % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn link(id: &str) -> billing::LineageLink {
    billing::LineageLink {
        image_id: id.to_string(),
        region: "ap-singapore".into(),
        owner_account_id: "100000000001".into(),
    }
}

fn price_book() -> Vec<billing::RegionPrices> {
    let price = |t: &str, p: &str| billing::InstancePrice {
        instance_type: t.into(),
        hourly: p.into(),
    };
    vec![
        billing::RegionPrices {
            region: "ap-guangzhou".into(),
            mainland: true,
            instance_hour: vec![price("S5.MEDIUM4", "0.03")],
            windows_hour: vec![],
            licence_hour: vec![billing::LicenceClass {
                min_vcpu: 1,
                max_vcpu: 2,
                hourly: "0.02".into(),
            }],
            snapshot_gb_hour: "0.00005".into(),
            free_tier_gb: 80,
        },
        billing::RegionPrices {
            region: "ap-singapore".into(),
            mainland: false,
            instance_hour: vec![price("S5.MEDIUM4", "0.0364"), price("S5.LARGE8", "0.0728")],
            windows_hour: vec![price("S5.MEDIUM4", "0.0184"), price("S5.LARGE8", "0.0368")],
            licence_hour: vec![
                billing::LicenceClass {
                    min_vcpu: 1,
                    max_vcpu: 4,
                    hourly: "0.07".into(),
                },
                billing::LicenceClass {
                    min_vcpu: 5,
                    max_vcpu: 128,
                    hourly: "0.3".into(),
                },
            ],
            snapshot_gb_hour: "0.000075".into(),
            free_tier_gb: 0,
        },
    ]
}

/// The bill the fake billing service answers, for the period asked.
fn fake_bill(account_id: String, from: String, to: String) -> billing::DescribeBillResponse {
    let line =
        |kind: &str, ids: &[&str], unit: &str, quantity: &str, unit_price: &str, amount: &str| {
            billing::LineItem {
                kind: kind.into(),
                region: "ap-singapore".into(),
                resource_ids: ids.iter().map(|id| id.to_string()).collect(),
                unit: unit.into(),
                quantity: quantity.into(),
                unit_price: unit_price.into(),
                amount: amount.into(),
                ..Default::default()
            }
        };
    let mut instance = line(
        "INSTANCE",
        &["ins-aaaaaaaa"],
        "HOUR",
        "3",
        "0.0364",
        "0.1092",
    );
    instance.instance_type = "S5.MEDIUM4".into();
    let mut fee = line(
        "IMAGE_FEE",
        &["ins-aaaaaaaa", "img-list0001"],
        "HOUR",
        "3",
        "0.0184",
        "0.0552",
    );
    fee.instance_type = "S5.MEDIUM4".into();
    fee.image_fee = Some(billing::ImageFee {
        cause: "WINDOWS".into(),
        image_id: "img-list0001".into(),
        root_image_id: WINDOWS_ROOT.into(),
        chain: ["img-list0001", "img-derived1", WINDOWS_ROOT]
            .into_iter()
            .map(link)
            .collect(),
    });
    let snapshot = line(
        "SNAPSHOT_STORAGE",
        &["100000000001"],
        "GB_HOUR",
        "60",
        "0.000075",
        "0.0045",
    );
    let total = |kind: &str, amount: &str| billing::KindTotal {
        kind: kind.into(),
        amount: amount.into(),
    };
    billing::DescribeBillResponse {
        account_id,
        from: if from.is_empty() {
            "2026-12-01T00:00:00Z".into()
        } else {
            from
        },
        to: if to.is_empty() {
            "2026-12-02T11:00:00Z".into()
        } else {
            to
        },
        currency: "USD".into(),
        line_items: vec![instance, fee, snapshot],
        totals: vec![
            total("INSTANCE", "0.1092"),
            total("IMAGE_FEE", "0.0552"),
            total("SNAPSHOT_STORAGE", "0.0045"),
        ],
        total: "0.1689".into(),
        anomalies: vec![],
    }
}

#[tonic::async_trait]
impl billing::billing_service_server::BillingService for Fake {
    async fn describe_price_book(
        &self,
        request: Request<billing::DescribePriceBookRequest>,
    ) -> Result<Response<billing::DescribePriceBookResponse>, Status> {
        // Set only by the verifier in front of this service.
        let account = imagefleet_rpc::auth::account_id(&request)?;
        let request = request.into_inner();
        self.state
            .lock()
            .unwrap()
            .price_book_requests
            .push((account, request.clone()));
        let region_set: Vec<billing::RegionPrices> = price_book()
            .into_iter()
            .filter(|r| request.region.is_empty() || r.region == request.region)
            .collect();
        if region_set.is_empty() {
            return Err(imagefleet_proto::error::status(
                tonic::Code::InvalidArgument,
                "InvalidParameterValue",
                format!("the price book does not price region {}", request.region),
            ));
        }
        Ok(Response::new(billing::DescribePriceBookResponse {
            currency: "USD".into(),
            region_set,
        }))
    }

    async fn describe_bill(
        &self,
        request: Request<billing::DescribeBillRequest>,
    ) -> Result<Response<billing::DescribeBillResponse>, Status> {
        let account = imagefleet_rpc::auth::account_id(&request)?;
        let request = request.into_inner();
        self.state
            .lock()
            .unwrap()
            .bill_requests
            .push((account.clone(), request.clone()));
        Ok(Response::new(fake_bill(account, request.from, request.to)))
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
        let secret_id = request
            .metadata()
            .get("x-imagefleet-secret-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let request = request.into_inner();
        if request
            .image_ids
            .iter()
            .any(|id| SYNC_DESTINATIONS.iter().any(|(_, d)| d == id))
        {
            let mut state = self.state.lock().unwrap();
            state
                .sync_describes
                .push((self.region.clone(), secret_id, request.image_ids.clone()));
            let mut found = Vec::new();
            for id in &request.image_ids {
                // Each destination image exists in its own region only.
                if !SYNC_DESTINATIONS.contains(&(self.region.as_str(), id.as_str())) {
                    return Err(imagefleet_proto::error::status(
                        tonic::Code::NotFound,
                        "InvalidImageId.NotFound",
                        format!("image {id} does not exist in {}", self.region),
                    ));
                }
                let polls = state.sync_polls.entry(id.clone()).or_default();
                *polls += 1;
                let poll = *polls;
                found.push(synced_image(id, poll, state.fail_sync));
            }
            return Ok(Response::new(region::DescribeImagesResponse {
                total_count: found.len() as u32,
                image_set: found,
                next_page_token: String::new(),
            }));
        }
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
        let shared_only = request
            .filters
            .iter()
            .any(|f| f.name == "image-type" && f.values == ["SHARED_IMAGE"]);
        let all = if shared_only {
            shared_images()
        } else {
            listed_images()
        };
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
            instance_quota: 200,
            instance_count: 2,
            storage_bytes_quota: 1 << 40,
            storage_bytes_used: 5 << 20,
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
                format: region::ExportFormat::Raw as i32,
                file_size_bytes: EXPORT_SIZE,
            })
        };
        // The second MiB is zeros and not sent.
        let chunks = vec![
            chunk(0, vec![0xab; MIB]),
            chunk(2 * MIB as u64, vec![0xcd; MIB + 10]),
        ];
        Ok(Response::new(tokio_stream::iter(chunks)))
    }

    async fn inquiry_price_run_instances(
        &self,
        request: Request<region::InquiryPriceRunInstancesRequest>,
    ) -> Result<Response<region::InquiryPriceRunInstancesResponse>, Status> {
        let secret_id = request
            .metadata()
            .get("x-imagefleet-secret-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let request = request.into_inner();
        own_image(&request.image_id)?;
        self.state.lock().unwrap().inquiries.push((
            self.region.clone(),
            secret_id,
            request.clone(),
        ));
        let hours = request.hours.max(1);
        let instance_hours = u64::from(request.instance_count.max(1)) * hours;
        let part = |unit_micros: u64, quantity: u64, unit: &str| billing::PricePart {
            unit_price: micros(unit_micros),
            unit: unit.into(),
            quantity: quantity.to_string(),
            amount: micros(unit_micros * quantity),
        };
        let instance = part(36_400, instance_hours, "HOUR");
        let fee = part(18_400, instance_hours, "HOUR");
        // 100 GB held, 80 free: 20 billable GB for every hour.
        let snapshot = part(75, 20 * hours, "GB_HOUR");
        let total = micros(36_400 * instance_hours + 18_400 * instance_hours + 75 * 20 * hours);
        Ok(Response::new(region::InquiryPriceRunInstancesResponse {
            price: Some(billing::RunPrice {
                currency: "USD".into(),
                region: self.region.clone(),
                instance_type: request.instance_type,
                instance_count: request.instance_count.max(1),
                hours,
                instance: Some(instance),
                image_fee: Some(billing::ImageFeePrice {
                    cause: "WINDOWS".into(),
                    root_image_id: WINDOWS_ROOT.into(),
                    chain: [request.image_id.as_str(), "img-derived1", WINDOWS_ROOT]
                        .into_iter()
                        .map(link)
                        .collect(),
                    price: Some(fee),
                }),
                snapshot: Some(billing::SnapshotPrice {
                    bytes_held: 100 << 30,
                    free_tier_bytes: 80 << 30,
                    billable_bytes: 20 << 30,
                    price: Some(snapshot),
                }),
                total,
            }),
        }))
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

    /// Shares or cancels for every account or none, refusing (as the region does) accounts
    /// already shared with (SHARE) or not shared with (CANCEL).
    async fn modify_image_share_permission(
        &self,
        request: Request<region::ModifyImageSharePermissionRequest>,
    ) -> Result<Response<region::ModifyImageSharePermissionResponse>, Status> {
        let request = request.into_inner();
        own_image(&request.image_id)?;
        let mut state = self.state.lock().unwrap();
        state.share_requests.push(request.clone());
        let made = state.shares.values().map(Vec::len).sum::<usize>();
        let shares = state.shares.entry(request.image_id.clone()).or_default();
        let shared = |account: &str| shares.iter().any(|s| s.account_id == account);
        match region::SharePermission::try_from(request.permission) {
            Ok(region::SharePermission::Share) => {
                if let Some(account) = request.account_ids.iter().find(|a| shared(a)) {
                    return Err(imagefleet_proto::error::status(
                        tonic::Code::AlreadyExists,
                        "FailedOperation.AccountAlreadyExists",
                        format!("the image is already shared with {account}"),
                    ));
                }
                for (i, account) in request.account_ids.iter().enumerate() {
                    shares.push(region::ImageShare {
                        account_id: account.clone(),
                        created_time: share_time(made + i),
                    });
                }
            }
            Ok(region::SharePermission::Cancel) => {
                if let Some(account) = request.account_ids.iter().find(|a| !shared(a)) {
                    return Err(imagefleet_proto::error::status(
                        tonic::Code::FailedPrecondition,
                        "FailedOperation.AccountNotShared",
                        format!("the image is not shared with {account}"),
                    ));
                }
                shares.retain(|s| !request.account_ids.contains(&s.account_id));
            }
            _ => return Err(Status::invalid_argument("bad permission")),
        }
        Ok(Response::new(region::ModifyImageSharePermissionResponse {}))
    }

    async fn describe_instance_type_configs(
        &self,
        _request: Request<region::DescribeInstanceTypeConfigsRequest>,
    ) -> Result<Response<region::DescribeInstanceTypeConfigsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    type ExportImagesStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<region::ExportImagesChunk, Status>> + Send>,
    >;

    async fn export_images(
        &self,
        _request: Request<region::ExportImagesRequest>,
    ) -> Result<Response<Self::ExportImagesStream>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn upload_image(
        &self,
        _request: Request<tonic::Streaming<region::UploadImageRequest>>,
    ) -> Result<Response<region::UploadImageResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn import_image(
        &self,
        _request: Request<region::ImportImageRequest>,
    ) -> Result<Response<region::ImportImageResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn describe_import_image_os(
        &self,
        _request: Request<region::DescribeImportImageOsRequest>,
    ) -> Result<Response<region::DescribeImportImageOsResponse>, Status> {
        Err(Status::unimplemented("not faked"))
    }

    async fn describe_image_share_permission(
        &self,
        request: Request<region::DescribeImageSharePermissionRequest>,
    ) -> Result<Response<region::DescribeImageSharePermissionResponse>, Status> {
        let image_id = request.into_inner().image_id;
        own_image(&image_id)?;
        let state = self.state.lock().unwrap();
        Ok(Response::new(
            region::DescribeImageSharePermissionResponse {
                share_permission_set: state.shares.get(&image_id).cloned().unwrap_or_default(),
            },
        ))
    }

    async fn sync_images(
        &self,
        request: Request<region::SyncImagesRequest>,
    ) -> Result<Response<region::SyncImagesResponse>, Status> {
        let request = request.into_inner();
        let dry_run = request.dry_run;
        self.state
            .lock()
            .unwrap()
            .sync_requests
            .push((self.region.clone(), request));
        Ok(Response::new(region::SyncImagesResponse {
            image_set: SYNC_DESTINATIONS
                .iter()
                .map(|(region, id)| region::SyncedImage {
                    source_image_id: SYNC_SOURCE.into(),
                    region: region.to_string(),
                    image_id: if dry_run {
                        String::new()
                    } else {
                        id.to_string()
                    },
                })
                .collect(),
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

/// Starts a fake region (ap-guangzhou, which also serves the catalog) and the two sync
/// destinations (ap-shanghai, ap-beijing), each on a free port, and writes a cluster file
/// whose catalog is the fake and whose region list is empty (so region endpoints must come
/// from the catalog).
async fn start() -> Harness {
    let mut listeners = Vec::new();
    for region in ["ap-guangzhou", "ap-shanghai", "ap-beijing"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        listeners.push((region.to_string(), endpoint, listener));
    }
    let regions: Arc<Vec<(String, String)>> = Arc::new(
        listeners
            .iter()
            .map(|(region, endpoint, _)| (region.clone(), endpoint.clone()))
            .collect(),
    );
    let state = Arc::new(Mutex::new(State {
        disk: vec![0; DISK_SIZE],
        ..Default::default()
    }));
    let mut fakes = Vec::new();
    for (region, endpoint, listener) in listeners {
        let fake = Fake {
            region,
            endpoint,
            regions: regions.clone(),
            state: state.clone(),
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
        fakes.push(fake);
    }
    let fake = fakes.swap_remove(0);
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.json");
    write_cluster(&cluster, &fake.endpoint, vec![]);
    Harness { fake, dir, cluster }
}

fn write_cluster(path: &Path, catalog: &str, regions: Vec<RegionEndpoint>) {
    ClusterFile {
        catalog: ServiceEndpoint {
            endpoint: catalog.to_string(),
            metrics: String::new(),
        },
        sharing: ServiceEndpoint {
            endpoint: "http://127.0.0.1:1".into(),
            metrics: String::new(),
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
        ..Default::default()
    }
    .store(path)
    .unwrap();
}

/// What progress wrote, shared with the `Progress` writing it.
#[derive(Clone, Default)]
struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Harness {
    async fn run(&self, args: &[&str]) -> Result<String, String> {
        self.run_with_stderr(args).await.0
    }

    /// Runs a command with stderr (not a terminal) captured: (stdout or error, stderr).
    async fn run_with_stderr(&self, args: &[&str]) -> (Result<String, String>, String) {
        let cluster = self.cluster.display().to_string();
        let argv = ["imagectl"]
            .into_iter()
            .chain(args.iter().copied())
            .chain(["--cluster", cluster.as_str()]);
        let cli = match Cli::try_parse_from(argv) {
            Ok(cli) => cli,
            Err(e) => return (Err(e.to_string()), String::new()),
        };
        let stderr = SharedBuffer::default();
        let progress = Progress::plain(Box::new(stderr.clone()), Arc::new(SystemClock::new()));
        let result = imagefleet_imagectl::run_with_progress(cli, &progress)
            .await
            .map_err(|e| e.to_string());
        let text = stderr.0.lock().unwrap().clone();
        (result, String::from_utf8(text).expect("UTF-8 stderr"))
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
    assert_eq!(quota["instanceQuota"], 200);
    assert_eq!(quota["instanceCount"], 2);
    assert_eq!(quota["storageBytesQuota"], "1099511627776");
    assert_eq!(quota["storageBytesUsed"], "5242880");
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
            metrics: String::new(),
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
    // Header, four rows and the total line.
    assert_eq!(table.lines().count(), 1 + 4 + 1, "{table}");
    assert_eq!(
        table.lines().last(),
        Some("4 of 5 shown (from offset 1)"),
        "{table}"
    );
    let first_page = h
        .run(&["images", "list", "--region", "ap-guangzhou"])
        .await
        .unwrap();
    assert!(
        first_page.ends_with("2 of 5 shown; --all or --limit N --offset 2 for more\n"),
        "{first_page}"
    );
    let ids = h
        .run(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--all",
            "--output",
            "id",
        ])
        .await
        .unwrap();
    assert_eq!(
        ids,
        "img-list0001\nimg-list0002\nimg-list0003\nimg-list0004\nimg-list0005\n"
    );
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
    // The shape of every image result: {"imageSet": [Image], "totalCount": 1, ...}.
    assert_eq!(image["totalCount"], 1, "{image}");
    assert_eq!(image["imageSet"][0]["imageId"], "img-created1");
    assert_eq!(image["imageSet"][0]["imageState"], "NORMAL");
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
    // The launched instances, in the shape of `instances list`.
    assert!(!run["instanceSet"].as_array().unwrap().is_empty(), "{run}");
    assert_eq!(run["instanceSet"][0]["instanceId"], "ins-00000000");
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

const SYNC_ARGS: [&str; 12] = [
    "images",
    "sync",
    "--region",
    "ap-guangzhou",
    "--image",
    SYNC_SOURCE,
    "--to",
    "ap-shanghai,ap-beijing",
    "--name",
    "copy",
    "--client-token",
    "tok-1",
];

fn sync_args(extra: &[&'static str]) -> Vec<&'static str> {
    SYNC_ARGS.iter().chain(extra).copied().collect()
}

/// The percents of `destination`'s plain progress lines (`<region> <id> <pct>% ...`).
fn percents(stderr: &str, region: &str, id: &str) -> Vec<u32> {
    let prefix = format!("{region} {id} ");
    stderr
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .map(|rest| {
            let pct = rest.split_whitespace().next().unwrap();
            pct.strip_suffix('%').unwrap().parse().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn sync_wait_prints_the_final_images_and_plain_progress() {
    let h = start().await;
    let (result, stderr) = h
        .run_with_stderr(&sync_args(&["--wait", "--output", "json"]))
        .await;
    let stdout = result.expect("sync succeeds");
    let value: serde_json::Value = serde_json::from_str(&stdout).expect("one JSON document");

    // stdout: {"imageSet": [final Image + sourceImageId, ...]}, in SyncImages' order.
    let object = value.as_object().unwrap();
    assert_eq!(
        object.keys().collect::<Vec<_>>(),
        ["imageSet", "nextPageToken", "totalCount"],
        "{value}"
    );
    assert_eq!(value["totalCount"], 2);
    let images = value["imageSet"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{value}");
    let shanghai = &images[0];
    assert_eq!(shanghai["sourceImageId"], SYNC_SOURCE);
    assert_eq!(shanghai["imageId"], "img-sync0001");
    assert_eq!(shanghai["region"], "ap-shanghai");
    assert_eq!(shanghai["imageState"], "NORMAL");
    assert_eq!(shanghai["imageSource"], "SYNC");
    assert_eq!(shanghai["syncPercent"], 100);
    assert_eq!(
        shanghai["syncProgress"]["bytesDone"],
        SYNC_BYTES.to_string()
    );
    assert_eq!(shanghai["syncProgress"]["sourceRegion"], "ap-guangzhou");
    assert_eq!(shanghai["syncProgress"]["attempts"], 2);
    let beijing = &images[1];
    assert_eq!(beijing["sourceImageId"], SYNC_SOURCE);
    assert_eq!(beijing["imageId"], "img-sync0002");
    assert_eq!(beijing["region"], "ap-beijing");
    assert_eq!(beijing["imageState"], "NORMAL");
    assert_eq!(beijing["virtualSizeBytes"], SYNC_VIRTUAL.to_string());

    // The call went to the source region with every flag; each destination was polled in
    // its own region, by id, as the same account, until it finished.
    {
        let state = h.fake.state.lock().unwrap();
        assert_eq!(state.sync_requests.len(), 1);
        let (asked, request) = &state.sync_requests[0];
        assert_eq!(asked, "ap-guangzhou");
        assert_eq!(request.image_ids, [SYNC_SOURCE]);
        assert_eq!(request.destination_regions, ["ap-shanghai", "ap-beijing"]);
        assert_eq!(request.image_name, "copy");
        assert_eq!(request.client_token, "tok-1");
        assert!(!request.dry_run);
        let mut polled: Vec<&str> = state
            .sync_describes
            .iter()
            .map(|(region, _, _)| region.as_str())
            .collect();
        polled.sort();
        polled.dedup();
        assert_eq!(polled, ["ap-beijing", "ap-shanghai"]);
        for (region, secret_id, ids) in &state.sync_describes {
            assert_eq!(secret_id, "AKIDdev");
            let expected = SYNC_DESTINATIONS
                .iter()
                .find(|(r, _)| r == region)
                .unwrap()
                .1;
            assert_eq!(ids, &[expected], "{region}");
        }
        assert_eq!(state.sync_polls["img-sync0001"], 5);
        assert_eq!(state.sync_polls["img-sync0002"], 4);
    }

    // stderr: plain lines (no terminal), one per 10 points and one at the end.
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    assert_eq!(
        percents(&stderr, "ap-shanghai", "img-sync0001"),
        [30, 60, 90, 100, 100],
        "{stderr}"
    );
    assert_eq!(
        percents(&stderr, "ap-beijing", "img-sync0002"),
        [40, 80, 100, 100],
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 9, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines[0] == "ap-shanghai img-sync0001 30% 30.0/100.0 MiB",
        "{stderr}"
    );
    assert!(
        lines[1] == "ap-beijing img-sync0002 40% 4.0/10.0 MiB",
        "{stderr}"
    );
    // From the second poll on: a rate (since the first poll) and an ETA.
    let second = lines
        .iter()
        .find(|l| l.starts_with("ap-shanghai img-sync0001 60% 60.0/100.0 MiB "))
        .unwrap();
    assert!(second.contains("B/s ETA "), "{second}");
    for (region, id) in SYNC_DESTINATIONS {
        let last = stderr
            .lines()
            .rfind(|l| l.starts_with(&format!("{region} {id} ")))
            .unwrap();
        assert!(last.ends_with(" NORMAL"), "{last}");
        assert!(!last.contains("ETA"), "{last}");
    }

    // The table of the same wait.
    let h = start().await;
    let table = h.run(&sync_args(&["--wait"])).await.unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["SOURCE_IMAGE_ID", "REGION", "IMAGE_ID", "STATE"],
            vec![SYNC_SOURCE, "ap-shanghai", "img-sync0001", "NORMAL"],
            vec![SYNC_SOURCE, "ap-beijing", "img-sync0002", "NORMAL"],
        ]
    );
}

#[tokio::test]
async fn sync_wait_fails_when_a_destination_fails() {
    let h = start().await;
    h.fake.state.lock().unwrap().fail_sync = true;
    let (result, stderr) = h
        .run_with_stderr(&sync_args(&["--wait", "--output", "json"]))
        .await;
    let err = result.expect_err("a destination failed");
    assert_eq!(
        err,
        format!("image img-sync0002 in ap-beijing is CREATEFAILED: {SYNC_FAILURE}")
    );
    // The other destination was still waited for.
    assert_eq!(h.fake.state.lock().unwrap().sync_polls["img-sync0001"], 5);
    let failed = stderr
        .lines()
        .rfind(|l| l.starts_with("ap-beijing img-sync0002 "))
        .unwrap();
    assert!(
        failed.ends_with(&format!(" CREATEFAILED: {SYNC_FAILURE}")),
        "{stderr}"
    );
    assert!(stderr
        .lines()
        .any(|l| l.starts_with("ap-shanghai img-sync0001 100%") && l.ends_with(" NORMAL")));
}

#[tokio::test]
async fn sync_without_wait_prints_the_response() {
    let h = start().await;
    let (result, stderr) = h.run_with_stderr(&sync_args(&["--output", "json"])).await;
    let value: serde_json::Value = serde_json::from_str(&result.unwrap()).unwrap();
    // The image list shape, each destination as it is right after the call.
    assert_eq!(value["totalCount"], 2, "{value}");
    let images = value["imageSet"].as_array().unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = images
        .iter()
        .map(|i| {
            (
                i["sourceImageId"].as_str().unwrap(),
                i["region"].as_str().unwrap(),
                i["imageId"].as_str().unwrap(),
                i["imageState"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (SYNC_SOURCE, "ap-shanghai", "img-sync0001", "SYNCING"),
            (SYNC_SOURCE, "ap-beijing", "img-sync0002", "SYNCING"),
        ]
    );
    assert_eq!(stderr, "");
    assert_eq!(h.fake.state.lock().unwrap().sync_polls["img-sync0001"], 1);

    let ids = h.run(&sync_args(&["--output", "id"])).await.unwrap();
    assert_eq!(ids, "img-sync0001\nimg-sync0002\n");

    let dry = h.json(&sync_args(&["--dry-run"])).await;
    assert_eq!(dry["imageSet"][0]["imageId"], "");
    let table = h.run(&sync_args(&["--dry-run"])).await.unwrap();
    assert!(
        table.starts_with("SOURCE_IMAGE_ID  REGION       IMAGE_ID\n"),
        "{table}"
    );
    let state = h.fake.state.lock().unwrap();
    assert_eq!(state.sync_requests.len(), 4);
    assert!(state.sync_requests[2].1.dry_run);
    // Only the first call described its destinations (once each).
    assert_eq!(state.sync_polls["img-sync0001"], 1);
}

#[tokio::test]
async fn describe_shows_the_sync_progress() {
    let h = start().await;
    let text = h
        .run(&[
            "images",
            "describe",
            "--region",
            "ap-shanghai",
            "--image",
            "img-sync0001",
        ])
        .await
        .unwrap();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| {
                let (key, value) = l.split_once(' ')?;
                (key == name).then(|| value.trim().to_string())
            })
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    assert_eq!(field("STATE"), "SYNCING");
    assert_eq!(field("SYNC_PERCENT"), "30");
    assert_eq!(field("SYNC_SOURCE"), "ap-guangzhou/img-list0001");
    assert_eq!(field("SYNC_BYTES"), "31457280/104857600 (30%)");
    assert_eq!(field("SYNC_CHUNKS"), "30/100");
    assert_eq!(field("SYNC_TRANSFERRED"), "32 chunks, 33554432 bytes");
    assert_eq!(field("SYNC_ATTEMPTS"), "2");
    assert_eq!(field("SYNC_LAST_ERROR"), "connection reset");
    // Images without a sync progress have no such rows.
    let created = h
        .run(&[
            "images",
            "describe",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-export01",
        ])
        .await
        .unwrap();
    assert!(created.contains("SYNC_PERCENT"), "{created}");
    assert!(!created.contains("SYNC_SOURCE"), "{created}");
}

/// `images share|unshare|shares` for img-list0001 with `extra` arguments.
fn share_args<'a>(verb: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    [
        "images",
        verb,
        "--region",
        "ap-guangzhou",
        "--image",
        "img-list0001",
    ]
    .into_iter()
    .chain(extra.iter().copied())
    .collect()
}

#[tokio::test]
async fn share_then_shares_lists_the_accounts() {
    let h = start().await;
    let text = h
        .run(&share_args(
            "share",
            &["--accounts", "100000000002,100000000003"],
        ))
        .await
        .unwrap();
    assert_eq!(
        text,
        "shared img-list0001 with 100000000002, 100000000003\n"
    );
    {
        let state = h.fake.state.lock().unwrap();
        assert_eq!(state.share_requests.len(), 1);
        let request = &state.share_requests[0];
        assert_eq!(request.image_id, "img-list0001");
        assert_eq!(request.account_ids, ["100000000002", "100000000003"]);
        assert_eq!(request.permission, region::SharePermission::Share as i32);
    }
    let empty = h
        .json(&share_args("share", &["--accounts", "100000000004"]))
        .await;
    assert_eq!(empty, serde_json::json!({}));

    let table = h.run(&share_args("shares", &[])).await.unwrap();
    assert_eq!(
        table,
        "ACCOUNT_ID    SHARED_TIME\n\
         100000000002  2025-03-01T00:00:00Z\n\
         100000000003  2025-03-01T00:00:01Z\n\
         100000000004  2025-03-01T00:00:02Z\n"
    );
    let value = h.json(&share_args("shares", &[])).await;
    assert_eq!(
        value,
        serde_json::json!({
            "sharePermissionSet": [
                {"accountId": "100000000002", "createdTime": "2025-03-01T00:00:00Z"},
                {"accountId": "100000000003", "createdTime": "2025-03-01T00:00:01Z"},
                {"accountId": "100000000004", "createdTime": "2025-03-01T00:00:02Z"},
            ]
        })
    );
}

#[tokio::test]
async fn unshare_cancels_shares() {
    let h = start().await;
    h.run(&share_args(
        "share",
        &["--accounts", "100000000002,100000000003,100000000004"],
    ))
    .await
    .unwrap();
    let text = h
        .run(&share_args(
            "unshare",
            &["--accounts", "100000000002,100000000004"],
        ))
        .await
        .unwrap();
    assert_eq!(
        text,
        "unshared img-list0001 from 100000000002, 100000000004\n"
    );
    let last = h.fake.state.lock().unwrap().share_requests.last().cloned();
    assert_eq!(
        last.unwrap().permission,
        region::SharePermission::Cancel as i32
    );
    let value = h.json(&share_args("shares", &[])).await;
    assert_eq!(value["sharePermissionSet"].as_array().unwrap().len(), 1);
    assert_eq!(value["sharePermissionSet"][0]["accountId"], "100000000003");

    let empty = h
        .json(&share_args("unshare", &["--accounts", "100000000003"]))
        .await;
    assert_eq!(empty, serde_json::json!({}));
    let table = h.run(&share_args("shares", &[])).await.unwrap();
    assert_eq!(table, "ACCOUNT_ID  SHARED_TIME\n");
    let value = h.json(&share_args("shares", &[])).await;
    assert_eq!(value, serde_json::json!({"sharePermissionSet": []}));
}

#[tokio::test]
async fn share_errors_name_code_and_reason() {
    let h = start().await;
    h.run(&share_args("share", &["--accounts", "100000000002"]))
        .await
        .unwrap();
    let err = h
        .run(&share_args(
            "share",
            &["--accounts", "100000000003,100000000002"],
        ))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "AlreadyExists FailedOperation.AccountAlreadyExists: \
         the image is already shared with 100000000002"
    );
    // All or nothing: 100000000003 was not shared either.
    let value = h.json(&share_args("shares", &[])).await;
    assert_eq!(value["sharePermissionSet"].as_array().unwrap().len(), 1);

    let err = h
        .run(&share_args("unshare", &["--accounts", "100000000009"]))
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "FailedPrecondition FailedOperation.AccountNotShared: \
         the image is not shared with 100000000009"
    );
    let err = h
        .run(&[
            "images",
            "shares",
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
async fn shared_images_list_with_their_type() {
    let h = start().await;
    let table = h
        .run(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "SHARED_IMAGE",
        ])
        .await
        .unwrap();
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    // Header, the row and the total line.
    assert_eq!(rows.len(), 3, "{table}");
    assert_eq!(rows[2], ["1", "of", "1", "shown"], "{table}");
    assert_eq!(rows[0][2], "TYPE");
    assert_eq!(rows[1][0], "img-shared01");
    assert_eq!(rows[1][2], "SHARED_IMAGE");
    // Who shared it.
    assert_eq!(rows[0][4], "OWNER");
    assert_eq!(rows[1][4], "100000000009");
    let value = h
        .json(&[
            "images",
            "list",
            "--region",
            "ap-guangzhou",
            "--type",
            "SHARED_IMAGE",
        ])
        .await;
    assert_eq!(value["imageSet"][0]["imageType"], "SHARED_IMAGE");
}

/// The one account the verifiers of the billing harness know.
struct DevKeys;

impl imagefleet_rpc::auth::AccountKeys for DevKeys {
    fn lookup<'a>(
        &'a self,
        secret_id: &'a str,
    ) -> imagefleet_rpc::auth::BoxFuture<'a, Result<Option<imagefleet_rpc::auth::AccountKey>, Status>>
    {
        Box::pin(async move {
            Ok(
                (secret_id == "AKIDdev").then(|| imagefleet_rpc::auth::AccountKey {
                    account_id: "100000000001".into(),
                    secret_key: "secret".into(),
                }),
            )
        })
    }
}

fn auth_layer(scope: &str) -> imagefleet_rpc::auth::AuthLayer {
    imagefleet_rpc::auth::AuthLayer::new(Arc::new(imagefleet_rpc::auth::Verifier::new(
        scope,
        "service-key",
        Arc::new(DevKeys),
    )))
}

/// Starts, behind verifiers of the real signature scheme, a catalog process (the catalog
/// and billing services, scope `catalog`) and the ap-guangzhou region (scope
/// `region:ap-guangzhou`), and writes a cluster file naming the catalog. Returns the harness
/// and the region's endpoint.
async fn start_billing() -> (Harness, String) {
    let catalog_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let region_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let catalog_endpoint = format!("http://{}", catalog_listener.local_addr().unwrap());
    let region_endpoint = format!("http://{}", region_listener.local_addr().unwrap());
    let fake = Fake {
        region: "ap-guangzhou".into(),
        endpoint: region_endpoint.clone(),
        regions: Arc::new(vec![("ap-guangzhou".into(), region_endpoint.clone())]),
        state: Arc::new(Mutex::new(State::default())),
    };
    let catalog_server = tonic::transport::Server::builder()
        .layer(auth_layer(imagefleet_rpc::client::CATALOG_SCOPE))
        .add_service(catalog::catalog_service_server::CatalogServiceServer::new(
            fake.clone(),
        ))
        .add_service(billing::billing_service_server::BillingServiceServer::new(
            fake.clone(),
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
            catalog_listener,
        ));
    tokio::spawn(catalog_server);
    let region_server = tonic::transport::Server::builder()
        .layer(auth_layer(&imagefleet_rpc::client::region_scope(
            "ap-guangzhou",
        )))
        .add_service(region::region_service_server::RegionServiceServer::new(
            fake.clone(),
        ))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(
            region_listener,
        ));
    tokio::spawn(region_server);
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster.json");
    write_cluster(&cluster, &catalog_endpoint, vec![]);
    (Harness { fake, dir, cluster }, region_endpoint)
}

fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

#[tokio::test]
async fn billing_prices_print_tables_json_and_csv() {
    let (h, _) = start_billing().await;
    let text = h
        .run(&["billing", "prices", "--region", "ap-singapore"])
        .await
        .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        words(lines[0]),
        ["REGION", "INSTANCE_TYPE", "HOURLY", "WINDOWS_FEE"],
        "{text}"
    );
    assert_eq!(
        words(lines[1]),
        ["ap-singapore", "S5.MEDIUM4", "0.0364", "0.0184"]
    );
    assert_eq!(
        words(lines[2]),
        ["ap-singapore", "S5.LARGE8", "0.0728", "0.0368"]
    );
    assert_eq!(
        words(lines[4]),
        ["REGION", "LICENCE_VCPU", "LICENCE_FEE"],
        "{text}"
    );
    assert_eq!(words(lines[5]), ["ap-singapore", "1-4", "0.07"]);
    assert_eq!(words(lines[6]), ["ap-singapore", "5-128", "0.3"]);
    assert_eq!(
        words(lines[8]),
        ["REGION", "SNAPSHOT_GB_HOUR", "FREE_TIER_GB"],
        "{text}"
    );
    assert_eq!(words(lines[9]), ["ap-singapore", "0.000075", "0"]);
    assert!(lines[11].starts_with("prices in USD"), "{text}");
    assert_eq!(
        h.fake.state.lock().unwrap().price_book_requests,
        [(
            "100000000001".to_string(),
            billing::DescribePriceBookRequest {
                region: "ap-singapore".into()
            }
        )]
    );

    // Every region: the mainland one's Windows fee is free.
    let text = h.run(&["billing", "prices"]).await.unwrap();
    assert_eq!(
        words(text.lines().nth(1).unwrap()),
        ["ap-guangzhou", "S5.MEDIUM4", "0.03", "free"],
        "{text}"
    );

    let value = h
        .json(&["billing", "prices", "--region", "ap-singapore"])
        .await;
    assert_eq!(value["currency"], "USD");
    let region = &value["regionSet"][0];
    assert_eq!(region["region"], "ap-singapore");
    assert_eq!(region["mainland"], false);
    assert_eq!(region["instanceHour"][0]["instanceType"], "S5.MEDIUM4");
    assert_eq!(region["instanceHour"][0]["hourly"], "0.0364");
    assert_eq!(region["windowsHour"][1]["hourly"], "0.0368");
    assert_eq!(region["licenceHour"][1]["minVcpu"], 5);
    assert_eq!(region["licenceHour"][1]["hourly"], "0.3");
    assert_eq!(region["snapshotGbHour"], "0.000075");
    assert_eq!(region["freeTierGb"], "0");

    let csv = h
        .run(&[
            "billing",
            "prices",
            "--region",
            "ap-guangzhou",
            "--output",
            "csv",
        ])
        .await
        .unwrap();
    assert_eq!(
        csv,
        "region,kind,instance_type,min_vcpu,max_vcpu,unit,price,currency,free_tier_gb\n\
         ap-guangzhou,INSTANCE,S5.MEDIUM4,,,HOUR,0.03,USD,\n\
         ap-guangzhou,WINDOWS_FEE,S5.MEDIUM4,,,HOUR,0,USD,\n\
         ap-guangzhou,LICENCE_FEE,,1,2,HOUR,0.02,USD,\n\
         ap-guangzhou,SNAPSHOT_STORAGE,,,,GB_HOUR,0.00005,USD,80\n"
    );

    let err = h
        .run(&["billing", "prices", "--region", "eu-frankfurt"])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "InvalidArgument InvalidParameterValue: the price book does not price region eu-frankfurt"
    );
}

const INQUIRE: [&str; 8] = [
    "billing",
    "inquire",
    "--region",
    "ap-guangzhou",
    "--image",
    "img-list0001",
    "--type",
    "S5.MEDIUM4",
];

fn inquire_args(extra: &[&'static str]) -> Vec<&'static str> {
    INQUIRE.iter().chain(extra).copied().collect()
}

#[tokio::test]
async fn billing_inquire_prints_the_parts_the_lineage_and_the_total() {
    let (h, _) = start_billing().await;
    let text = h
        .run(&inquire_args(&["--count", "2", "--hours", "10"]))
        .await
        .unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 5, "{text}");
    assert_eq!(
        words(lines[0]),
        ["ITEM", "UNIT_PRICE", "QUANTITY", "UNIT", "AMOUNT", "DETAIL"]
    );
    assert_eq!(
        words(lines[1]),
        [
            "INSTANCE",
            "0.0364",
            "20",
            "HOUR",
            "0.728",
            "2",
            "x",
            "S5.MEDIUM4",
            "for",
            "10",
            "hours",
            "in",
            "ap-guangzhou"
        ],
        "{text}"
    );
    assert_eq!(
        words(lines[2])[..5],
        ["IMAGE_FEE", "0.0184", "20", "HOUR", "0.368"],
        "{text}"
    );
    assert!(
        lines[2].ends_with(
            "WINDOWS, paid root img-winroot1: img-list0001 <- img-derived1 <- img-winroot1"
        ),
        "{text}"
    );
    assert_eq!(
        words(lines[3]),
        [
            "SNAPSHOT_STORAGE",
            "0.000075",
            "200",
            "GB_HOUR",
            "0.015",
            "100.00",
            "GB",
            "held,",
            "80.00",
            "GB",
            "free,",
            "20.00",
            "GB",
            "billable"
        ],
        "{text}"
    );
    assert_eq!(words(lines[4]), ["TOTAL", "-", "-", "-", "1.111", "USD"]);
    {
        let state = h.fake.state.lock().unwrap();
        let (region, secret_id, request) = &state.inquiries[0];
        assert_eq!(
            (region.as_str(), secret_id.as_str()),
            ("ap-guangzhou", "AKIDdev")
        );
        assert_eq!(
            request,
            &region::InquiryPriceRunInstancesRequest {
                image_id: "img-list0001".into(),
                instance_type: "S5.MEDIUM4".into(),
                instance_count: 2,
                hours: 10,
            }
        );
    }

    // Without --count and --hours the region's defaults (0: one of each) apply.
    let value = h.json(&inquire_args(&[])).await;
    let sent = h.fake.state.lock().unwrap().inquiries[1].2.clone();
    assert_eq!((sent.instance_count, sent.hours), (0, 0));
    let price = &value["price"];
    assert_eq!(price["currency"], "USD");
    assert_eq!(price["instanceCount"], 1);
    assert_eq!(price["hours"], "1");
    assert_eq!(price["instance"]["amount"], "0.0364");
    assert_eq!(price["imageFee"]["cause"], "WINDOWS");
    assert_eq!(price["imageFee"]["rootImageId"], WINDOWS_ROOT);
    let chain: Vec<&str> = price["imageFee"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["imageId"].as_str().unwrap())
        .collect();
    assert_eq!(chain, ["img-list0001", "img-derived1", WINDOWS_ROOT]);
    assert_eq!(price["imageFee"]["price"]["unitPrice"], "0.0184");
    assert_eq!(price["snapshot"]["bytesHeld"], "107374182400");
    assert_eq!(price["snapshot"]["price"]["unit"], "GB_HOUR");
    assert_eq!(price["total"], "0.0563");

    let csv = h
        .run(&inquire_args(&["--hours", "10", "--output", "csv"]))
        .await
        .unwrap();
    assert_eq!(
        csv,
        "item,unit_price,quantity,unit,amount,currency,cause,root_image_id,chain\n\
         INSTANCE,0.0364,10,HOUR,0.364,USD,,,\n\
         IMAGE_FEE,0.0184,10,HOUR,0.184,USD,WINDOWS,img-winroot1,img-list0001;img-derived1;img-winroot1\n\
         SNAPSHOT_STORAGE,0.000075,200,GB_HOUR,0.015,USD,,,\n\
         TOTAL,,,,0.563,USD,,,\n"
    );

    let err = h
        .run(&[
            "billing",
            "inquire",
            "--region",
            "ap-guangzhou",
            "--image",
            "img-nothere1",
            "--type",
            "S5.MEDIUM4",
        ])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        "NotFound InvalidImageId.NotFound: image img-nothere1 does not exist"
    );
}

#[tokio::test]
async fn billing_report_prints_lines_totals_json_and_csv() {
    let (h, _) = start_billing().await;
    let text = h.run(&["billing", "report"]).await.unwrap();
    // No period given: empty strings, the service's defaults.
    assert_eq!(
        h.fake.state.lock().unwrap().bill_requests,
        [(
            "100000000001".to_string(),
            billing::DescribeBillRequest::default()
        )]
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        words(lines[0]),
        [
            "KIND",
            "REGION",
            "RESOURCES",
            "QUANTITY",
            "UNIT",
            "UNIT_PRICE",
            "AMOUNT",
            "DETAIL"
        ],
        "{text}"
    );
    assert_eq!(
        words(lines[1]),
        [
            "INSTANCE",
            "ap-singapore",
            "ins-aaaaaaaa",
            "3",
            "HOUR",
            "0.0364",
            "0.1092",
            "S5.MEDIUM4"
        ]
    );
    assert_eq!(
        words(lines[2])[..7],
        [
            "IMAGE_FEE",
            "ap-singapore",
            "ins-aaaaaaaa,img-list0001",
            "3",
            "HOUR",
            "0.0184",
            "0.0552"
        ]
    );
    assert!(
        lines[2].ends_with(
            "WINDOWS (S5.MEDIUM4), paid root img-winroot1: img-list0001 <- img-derived1 <- img-winroot1"
        ),
        "{text}"
    );
    assert_eq!(
        words(lines[3]),
        [
            "SNAPSHOT_STORAGE",
            "ap-singapore",
            "100000000001",
            "60",
            "GB_HOUR",
            "0.000075",
            "0.0045",
            "-"
        ]
    );
    assert_eq!(lines[4], "");
    assert_eq!(words(lines[5]), ["TOTAL_OF", "AMOUNT", "CURRENCY"]);
    assert_eq!(words(lines[6]), ["INSTANCE", "0.1092", "USD"]);
    assert_eq!(words(lines[7]), ["IMAGE_FEE", "0.0552", "USD"]);
    assert_eq!(words(lines[8]), ["SNAPSHOT_STORAGE", "0.0045", "USD"]);
    assert_eq!(words(lines[9]), ["TOTAL", "0.1689", "USD"]);
    assert_eq!(
        lines[11],
        "account 100000000001, from 2026-12-01T00:00:00Z to 2026-12-02T11:00:00Z"
    );

    // A period with an offset is sent in UTC.
    let value = h
        .json(&[
            "billing",
            "report",
            "--from",
            "2026-12-01T08:00:00+08:00",
            "--to",
            "2026-12-01T23:59:59Z",
        ])
        .await;
    assert_eq!(
        h.fake.state.lock().unwrap().bill_requests[1].1,
        billing::DescribeBillRequest {
            from: "2026-12-01T00:00:00Z".into(),
            to: "2026-12-01T23:59:59Z".into(),
        }
    );
    assert_eq!(value["accountId"], "100000000001");
    assert_eq!(value["from"], "2026-12-01T00:00:00Z");
    assert_eq!(value["to"], "2026-12-01T23:59:59Z");
    assert_eq!(value["currency"], "USD");
    assert_eq!(value["total"], "0.1689");
    assert_eq!(value["totals"][1]["kind"], "IMAGE_FEE");
    assert_eq!(value["totals"][1]["amount"], "0.0552");
    let items = value["lineItems"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0]["kind"], "INSTANCE");
    assert_eq!(items[0]["resourceIds"], serde_json::json!(["ins-aaaaaaaa"]));
    assert_eq!(items[0]["quantity"], "3");
    assert_eq!(items[0]["unitPrice"], "0.0364");
    assert!(items[0].get("imageFee").is_none(), "{}", items[0]);
    let fee = &items[1]["imageFee"];
    assert_eq!(fee["cause"], "WINDOWS");
    assert_eq!(fee["imageId"], "img-list0001");
    assert_eq!(fee["rootImageId"], WINDOWS_ROOT);
    assert_eq!(fee["chain"][2]["imageId"], WINDOWS_ROOT);
    assert_eq!(items[2]["unit"], "GB_HOUR");

    let csv = h
        .run(&["billing", "report", "--output", "csv"])
        .await
        .unwrap();
    assert_eq!(
        csv,
        "kind,region,resource_ids,instance_type,vcpu,quantity,unit,unit_price,amount,currency,cause,image_id,root_image_id,chain\n\
         INSTANCE,ap-singapore,ins-aaaaaaaa,S5.MEDIUM4,,3,HOUR,0.0364,0.1092,USD,,,,\n\
         IMAGE_FEE,ap-singapore,ins-aaaaaaaa;img-list0001,S5.MEDIUM4,,3,HOUR,0.0184,0.0552,USD,WINDOWS,img-list0001,img-winroot1,img-list0001;img-derived1;img-winroot1\n\
         SNAPSHOT_STORAGE,ap-singapore,100000000001,,,60,GB_HOUR,0.000075,0.0045,USD,,,,\n"
    );
}

#[tokio::test]
async fn billing_report_refuses_a_bad_period_before_calling() {
    let (h, _) = start_billing().await;
    for flag in ["--from", "--to"] {
        let args = ["imagectl", "billing", "report", flag, "2026-12-01 00:00"];
        let err = Cli::try_parse_from(args).expect_err("refused");
        assert_eq!(err.exit_code(), 2);
        let message = err.to_string();
        assert!(
            message.contains(flag) && message.contains("not an RFC 3339 time"),
            "{message}"
        );
        assert!(message.contains("2026-12-01T00:00:00Z"), "{message}");
    }
    let cluster = h.cluster.display().to_string();
    let cli = Cli::try_parse_from([
        "imagectl",
        "billing",
        "report",
        "--from",
        "2026-12-02T00:00:00Z",
        "--to",
        "2026-12-02T07:59:59+08:00",
        "--cluster",
        &cluster,
    ])
    .expect("parses");
    let err = imagefleet_imagectl::run(cli).await.expect_err("refused");
    assert_eq!(err.exit_code(), 2);
    assert_eq!(
        err.to_string(),
        "--to 2026-12-02T07:59:59+08:00 is before --from 2026-12-02T00:00:00Z: the period must not end before it starts"
    );
    assert!(h.fake.state.lock().unwrap().bill_requests.is_empty());
}

#[tokio::test]
async fn csv_is_refused_outside_billing_and_id_inside() {
    let (h, _) = start_billing().await;
    let cluster = h.cluster.display().to_string();
    for (args, expected) in [
        (
            &["regions", "list", "--output", "csv"][..],
            "--output csv is printed by the billing commands only",
        ),
        (
            &[
                "images",
                "list",
                "--region",
                "ap-guangzhou",
                "--output",
                "csv",
            ][..],
            "--output csv is printed by the billing commands only",
        ),
        (
            &["billing", "report", "--output", "id"][..],
            "--output id is not printed by the billing commands",
        ),
    ] {
        let argv = ["imagectl"]
            .iter()
            .chain(args)
            .copied()
            .chain(["--cluster", cluster.as_str()]);
        let cli = Cli::try_parse_from(argv).expect("parses");
        let err = imagefleet_imagectl::run(cli).await.expect_err("refused");
        assert_eq!(err.exit_code(), 2, "{args:?}");
        assert!(err.to_string().starts_with(expected), "{args:?}: {err}");
    }
    assert!(h.fake.state.lock().unwrap().bill_requests.is_empty());
}

#[tokio::test]
async fn billing_calls_are_signed_for_the_catalog() {
    let (h, region_endpoint) = start_billing().await;
    // A cluster file whose catalog is the region: the region's verifier (scope
    // region:ap-guangzhou) refuses a call signed for the catalog.
    write_cluster(&h.cluster, &region_endpoint, vec![]);
    let err = h.run(&["billing", "prices"]).await.unwrap_err();
    assert!(
        err.starts_with("Unauthenticated AuthFailure.SignatureFailure"),
        "{err}"
    );
    assert!(h.fake.state.lock().unwrap().price_book_requests.is_empty());
}
