//! The authorisation matrix: every RPC of every imagefleet service, generated from the service
//! definitions (the descriptor set), called as every kind of caller. Each cell asserts the exact
//! code and reason, and that a refused call changed nothing. A new RPC fails this test until
//! its row is added.

mod common;

use common::raw::RawCodec;
use common::*;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::{self, Credentials};
use imagefleet_rpc::client::{region_scope, CATALOG_SCOPE, SHARING_SCOPE};
use prost::Message;
use std::collections::BTreeSet;
use tonic::transport::Channel;
use tonic::Code;

/// One method of one service, from the descriptor set.
#[derive(Clone, Debug)]
struct Method {
    service: String,
    name: String,
    path: String,
    server_streaming: bool,
    /// The client sends a stream: signed `UNSIGNED-PAYLOAD` (`docs/auth.md`), its body sent as
    /// one message (none when empty).
    client_streaming: bool,
}

fn methods() -> Vec<Method> {
    let pool = imagefleet_proto::descriptor_pool();
    let mut out = Vec::new();
    for service in pool.services() {
        for m in service.methods() {
            out.push(Method {
                service: service.full_name().to_string(),
                name: m.name().to_string(),
                path: format!("/{}/{}", service.full_name(), m.name()),
                server_streaming: m.is_server_streaming(),
                client_streaming: m.is_client_streaming(),
            });
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Ok,
    Refused(Code, &'static str),
}

use Expect::{Ok as Allowed, Refused};

/// Where a method is served and what it signs for.
struct Target {
    url: String,
    scope: String,
}

fn target(cluster: &Cluster, service: &str) -> Target {
    if service.starts_with("imagefleet.region.") {
        Target {
            url: cluster.region_url("ap-guangzhou"),
            scope: region_scope("ap-guangzhou"),
        }
    } else if service.starts_with("imagefleet.catalog.")
        || service.starts_with("imagefleet.billing.")
    {
        Target {
            url: cluster.catalog.url(),
            scope: CATALOG_SCOPE.into(),
        }
    } else {
        Target {
            url: cluster.sharing.url(),
            scope: SHARING_SCOPE.into(),
        }
    }
}

/// Headers to send with a call.
enum Signing<'a> {
    None,
    /// Signed by `credentials` over `signed_body`, at `timestamp`, with `nonce`.
    With {
        credentials: &'a Credentials,
        signed_body: &'a [u8],
        timestamp: i64,
        nonce: String,
    },
}

async fn call(
    channel: &Channel,
    method: &Method,
    scope: &str,
    body: Vec<u8>,
    signing: Signing<'_>,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(body);
    if let Signing::With {
        credentials,
        signed_body,
        timestamp,
        nonce,
    } = signing
    {
        let digest = if method.client_streaming {
            auth::UNSIGNED_PAYLOAD.to_string()
        } else {
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(signed_body))
        };
        let mut headers = http::HeaderMap::new();
        auth::sign_headers(
            &mut headers,
            credentials,
            &method.path,
            scope,
            &digest,
            timestamp,
            &nonce,
        );
        *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    }
    let mut grpc = tonic::client::Grpc::new(channel.clone()).max_decoding_message_size(64 << 20);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path: http::uri::PathAndQuery = method.path.parse().unwrap();
    if method.client_streaming {
        let messages: Vec<Vec<u8>> = if request.get_ref().is_empty() {
            Vec::new()
        } else {
            vec![request.get_ref().clone()]
        };
        let request = request.map(|_| tokio_stream::iter(messages));
        return grpc
            .client_streaming(request, path, RawCodec)
            .await
            .map(|_| ());
    }
    if method.server_streaming {
        let mut stream = grpc
            .server_streaming(request, path, RawCodec)
            .await?
            .into_inner();
        stream.message().await?;
        Ok(())
    } else {
        grpc.unary(request, path, RawCodec).await.map(|_| ())
    }
}

async fn signed(
    channel: &Channel,
    method: &Method,
    scope: &str,
    body: Vec<u8>,
    credentials: &Credentials,
) -> Result<(), tonic::Status> {
    let signed_body = body.clone();
    call(
        channel,
        method,
        scope,
        body,
        Signing::With {
            credentials,
            signed_body: &signed_body,
            timestamp: imagefleet_rpc::time::unix_now(),
            nonce: auth::new_nonce(),
        },
    )
    .await
}

fn check(cell: &str, result: Result<(), tonic::Status>, expected: Expect) {
    match (result, expected) {
        (Ok(()), Allowed) => {}
        (Err(status), Refused(code, why)) => {
            assert_eq!(
                (status.code(), reason(&status).as_str()),
                (code, why),
                "{cell}: {status:?}"
            );
        }
        (result, expected) => panic!("{cell}: expected {expected:?}, got {result:?}"),
    }
}

/// Everything a refused call could have changed, as the owner, the receiver and the catalog see it.
async fn fingerprint(cluster: &Cluster, image_id: &str) -> String {
    let mut out = String::new();
    for who in 0..2 {
        let mut region = cluster.region("ap-guangzhou", who);
        let images = region
            .describe_images(DescribeImagesRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let instances = region
            .describe_instances(DescribeInstancesRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        out.push_str(&format!(
            "{:?}\n{:?}\n",
            images.image_set, instances.instance_set
        ));
    }
    let mut owner = cluster.region("ap-guangzhou", 0);
    let shares = owner
        .describe_image_share_permission(DescribeImageSharePermissionRequest {
            image_id: image_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    out.push_str(&format!("{:?}\n", shares.share_permission_set));
    out.push_str(&cluster.redis_cli(&["DBSIZE"]));
    out
}

/// Fails with the items that differ between two fingerprints.
fn assert_same(before: &str, after: &str, what: &str) {
    if before != after {
        let split = |s: &str| s.split("}, ").map(str::to_string).collect::<Vec<_>>();
        let (b, a) = (split(before), split(after));
        let gone: Vec<_> = b.iter().filter(|x| !a.contains(x)).collect();
        let new: Vec<_> = a.iter().filter(|x| !b.contains(x)).collect();
        panic!("{what}: before {gone:#?}\nafter {new:#?}");
    }
}

/// Waits until what an allowed call started in the background (an image being created,
/// instances booting) has finished, so it is not mistaken for a change made by a refused call.
async fn settle(cluster: &Cluster) {
    let mut owner = cluster.region("ap-guangzhou", 0);
    for _ in 0..400 {
        let images = owner
            .describe_images(DescribeImagesRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let instances = owner
            .describe_instances(DescribeInstancesRequest {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let busy = images
            .image_set
            .iter()
            .any(|i| i.image_state == ImageState::Creating as i32)
            || instances
                .instance_set
                .iter()
                .any(|i| i.instance_state == InstanceState::Pending as i32);
        if !busy {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the cluster never settled");
}

/// The service identities every internal method is called as: the cluster's services and the
/// operator, then two that name no service of the cluster.
const IDENTITIES: &[&str] = &[
    "admin",
    "catalog",
    "sharing",
    "region-ap-guangzhou",
    "region-ap-shanghai",
    "bogus",
    "region-eu-nowhere",
];

const NOT_ALLOWED: Expect = Refused(
    Code::PermissionDenied,
    "UnauthorizedOperation.CallerNotAllowed",
);
const REGIONS: &[&str] = &["region-ap-guangzhou", "region-ap-shanghai"];
const REGIONS_ADMIN: &[&str] = &["region-ap-guangzhou", "region-ap-shanghai", "admin"];

/// The request each internal method is called with, the identities that may call it
/// (`docs/auth.md`, "Who may call which internal method") and what an allowed caller gets.
/// `None` for a method missing from the table.
fn internal_row(
    method: &str,
    f: &Fixture,
    cluster: &Cluster,
) -> Option<(Vec<u8>, &'static [&'static str], Expect)> {
    use imagefleet_proto::billing::v1 as billing;
    use imagefleet_proto::catalog::v1 as catalog;
    use imagefleet_proto::sharing::v1 as sharing;
    let alice = cluster.accounts[0].account_id.clone();
    let nowhere = "img-0nowhere".to_string();
    Some(match method {
        "imagefleet.catalog.v1.CatalogInternalService/RegisterRegion" => (
            catalog::RegisterRegionRequest {
                region: "ap-guangzhou".into(),
                endpoint: cluster.region_url("ap-guangzhou"),
                public_endpoint: String::new(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.catalog.v1.CatalogInternalService/ListRegions" => {
            (Vec::new(), REGIONS_ADMIN, Allowed)
        }
        "imagefleet.catalog.v1.CatalogInternalService/CreateAccount" => (
            catalog::CreateAccountRequest {
                account_id: String::new(),
                name: "made-by-the-matrix".into(),
            }
            .encode_to_vec(),
            &["admin"],
            Allowed,
        ),
        "imagefleet.catalog.v1.CatalogInternalService/GetAccount" => (
            catalog::GetAccountRequest {
                account_id: alice.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.catalog.v1.CatalogInternalService/GetAccountCredential" => (
            catalog::GetAccountCredentialRequest {
                secret_id: cluster.accounts[0].secret_id.clone(),
            }
            .encode_to_vec(),
            &["region-ap-guangzhou", "region-ap-shanghai", "sharing"],
            Allowed,
        ),
        "imagefleet.catalog.v1.CatalogInternalService/RegisterImage" => (
            catalog::RegisterImageRequest { image: None }.encode_to_vec(),
            REGIONS,
            Refused(Code::InvalidArgument, "MissingParameter"),
        ),
        "imagefleet.catalog.v1.CatalogInternalService/UnregisterImage" => (
            catalog::UnregisterImageRequest {
                image_id: nowhere,
                region: "ap-guangzhou".into(),
            }
            .encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        "imagefleet.catalog.v1.CatalogInternalService/LookupImage" => (
            catalog::LookupImageRequest {
                image_id: f.image.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/SetImageOwner" => (
            sharing::SetImageOwnerRequest {
                image_id: nowhere,
                owner_account_id: alice,
            }
            .encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/RemoveImage" => (
            sharing::RemoveImageRequest { image_id: nowhere }.encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/GetImageOwner" => (
            sharing::GetImageOwnerRequest {
                image_id: f.image.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/ModifyShares" => (
            sharing::ModifySharesRequest {
                image_id: nowhere,
                owner_account_id: alice,
                permission: sharing::SharePermission::Cancel as i32,
                account_ids: vec![f.extra_account.clone()],
            }
            .encode_to_vec(),
            REGIONS,
            Refused(
                Code::PermissionDenied,
                "UnauthorizedOperation.ImageNotBelongToAccount",
            ),
        ),
        "imagefleet.sharing.v1.SharingInternalService/DescribeShares" => (
            sharing::DescribeSharesRequest {
                image_id: f.image.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/CheckShare" => (
            sharing::CheckShareRequest {
                image_id: f.image.clone(),
                account_id: f.extra_account.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/ListSharedWith" => (
            sharing::ListSharedWithRequest {
                account_id: f.extra_account.clone(),
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/CheckShares" => (
            sharing::CheckSharesRequest {
                checks: vec![sharing::CheckShareRequest {
                    image_id: f.image.clone(),
                    account_id: f.extra_account.clone(),
                }],
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.sharing.v1.SharingInternalService/ListSharedWithAccounts" => (
            sharing::ListSharedWithAccountsRequest {
                account_ids: vec![f.extra_account.clone()],
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.region.v1.RegionInternalService/StartSync" => (
            StartSyncRequest {
                copies: Vec::new(),
                dry_run: true,
            }
            .encode_to_vec(),
            REGIONS,
            Refused(Code::InvalidArgument, "InvalidParameterValue.LimitExceeded"),
        ),
        "imagefleet.region.v1.RegionInternalService/GetImageManifest" => (
            GetImageManifestRequest {
                image_id: nowhere,
                snapshot_id: String::new(),
            }
            .encode_to_vec(),
            REGIONS,
            Refused(Code::NotFound, "InvalidImageId.NotFound"),
        ),
        "imagefleet.region.v1.RegionInternalService/FetchChunks" => (
            FetchChunksRequest {
                image_id: nowhere,
                digests: Vec::new(),
                snapshot_id: String::new(),
            }
            .encode_to_vec(),
            REGIONS,
            Refused(Code::NotFound, "InvalidImageId.NotFound"),
        ),
        // Billing, in the catalog process: an empty report stores nothing; a quote changes
        // nothing.
        "imagefleet.billing.v1.BillingInternalService/ReportUsage" => (
            billing::ReportUsageRequest { events: Vec::new() }.encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        "imagefleet.billing.v1.BillingInternalService/QuoteRun" => (
            billing::QuoteRunRequest {
                region: "ap-guangzhou".into(),
                instance_type: "S5.SMALL1".into(),
                vcpu: 1,
                instance_count: 1,
                hours: 1,
                image: Some(billing::ImageCharge {
                    image_id: nowhere.clone(),
                    chain: vec![billing::LineageLink {
                        image_id: nowhere.clone(),
                        ..Default::default()
                    }],
                    root_image_id: nowhere.clone(),
                    root_kind: "FREE".into(),
                }),
                include_snapshot: false,
                owner_snapshot_bytes: 0,
            }
            .encode_to_vec(),
            REGIONS_ADMIN,
            Allowed,
        ),
        "imagefleet.region.v1.RegionInternalService/CancelSync" => (
            CancelSyncRequest {
                image_ids: Vec::new(),
            }
            .encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        "imagefleet.region.v1.RegionInternalService/ReleaseCopySource" => (
            ReleaseCopySourceRequest {
                request_keys: Vec::new(),
            }
            .encode_to_vec(),
            REGIONS,
            Allowed,
        ),
        // Emulated links: an empty change changes nothing; a listing neither.
        "imagefleet.region.v1.RegionInternalService/SetLinks" => (
            SetLinksRequest { links: Vec::new() }.encode_to_vec(),
            &["admin"],
            Allowed,
        ),
        "imagefleet.region.v1.RegionInternalService/ListLinks" => {
            (ListLinksRequest {}.encode_to_vec(), &["admin"], Allowed)
        }
        _ => return None,
    })
}

/// What `identity` gets calling the internal `method` with its row's request.
fn internal_cell(method: &str, identity: &str, allowed: &[&str], outcome: Expect) -> Expect {
    if identity == "bogus" || identity == "region-eu-nowhere" {
        return Refused(Code::Unauthenticated, "AuthFailure.SecretIdNotFound");
    }
    // A region registers only itself.
    if method == "imagefleet.catalog.v1.CatalogInternalService/RegisterRegion"
        && identity == "region-ap-shanghai"
    {
        return NOT_ALLOWED;
    }
    if allowed.contains(&identity) {
        outcome
    } else {
        NOT_ALLOWED
    }
}

/// The resources the role cells act on.
struct Fixture {
    image: String,
    owner_instance: String,
    doomed_instance: String,
    extra_account: String,
}

/// The request each account-facing method is called with, and what each role gets:
/// (owner, receiver of a share, unrelated account). `None` for a method missing from the table.
fn row(method: &str, f: &Fixture) -> Option<(Vec<u8>, [Expect; 3])> {
    let not_found_image = Refused(Code::NotFound, "InvalidImageId.NotFound");
    let not_found_instance = Refused(Code::NotFound, "InvalidInstanceId.NotFound");
    let not_yours = Refused(
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    let image = f.image.clone();
    Some(match method {
        "imagefleet.region.v1.RegionService/DescribeImages" => (
            DescribeImagesRequest {
                image_ids: vec![image],
                ..Default::default()
            }
            .encode_to_vec(),
            [Allowed, Allowed, not_found_image],
        ),
        "imagefleet.region.v1.RegionService/DescribeImageQuota" => (
            DescribeImageQuotaRequest {}.encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        // The region's catalogue of types: the same for every account.
        "imagefleet.region.v1.RegionService/DescribeInstanceTypeConfigs" => (
            DescribeInstanceTypeConfigsRequest::default().encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        "imagefleet.region.v1.RegionService/ModifyImageAttribute" => (
            ModifyImageAttributeRequest {
                image_id: image,
                image_description: Some("matrix".into()),
                ..Default::default()
            }
            .encode_to_vec(),
            [
                Allowed,
                Refused(
                    Code::FailedPrecondition,
                    "UnsupportedOperation.SharedImageModifyUnsupported",
                ),
                not_found_image,
            ],
        ),
        "imagefleet.region.v1.RegionService/DeleteImages" => (
            DeleteImagesRequest {
                image_ids: vec![image],
            }
            .encode_to_vec(),
            [
                Refused(Code::FailedPrecondition, "InvalidImageId.InShared"),
                not_yours,
                not_found_image,
            ],
        ),
        "imagefleet.region.v1.RegionService/CreateImage" => (
            CreateImageRequest {
                instance_id: f.owner_instance.clone(),
                image_name: "matrix-made".into(),
                image_description: String::new(),
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/ExportImage" => (
            ExportImageRequest {
                image_id: image,
                format: ExportFormat::Raw as i32,
            }
            .encode_to_vec(),
            [
                Allowed,
                Refused(
                    Code::FailedPrecondition,
                    "UnsupportedOperation.SharedImageExportUnsupported",
                ),
                not_found_image,
            ],
        ),
        "imagefleet.region.v1.RegionService/ExportImages" => (
            ExportImagesRequest {
                image_ids: vec![image],
                format: ExportFormat::Qcow2 as i32,
            }
            .encode_to_vec(),
            [
                Allowed,
                Refused(
                    Code::FailedPrecondition,
                    "UnsupportedOperation.SharedImageExportUnsupported",
                ),
                not_found_image,
            ],
        ),
        // Every account imports its own image: a 4 KiB raw file in the first message.
        "imagefleet.region.v1.RegionService/UploadImage" => (
            UploadImageRequest {
                parameters: Some(ImportImageParameters {
                    image_name: "matrix-upload".into(),
                    platform: "Other".into(),
                    os_version: "-".into(),
                    ..Default::default()
                }),
                size_bytes: 4096,
                data: vec![0x5a; 4096],
            }
            .encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        // A loopback URL: refused for every account before anything exists.
        "imagefleet.region.v1.RegionService/ImportImage" => (
            ImportImageRequest {
                parameters: Some(ImportImageParameters {
                    image_name: "matrix-url".into(),
                    platform: "Other".into(),
                    os_version: "-".into(),
                    ..Default::default()
                }),
                image_url: "http://127.0.0.1:9/disk.qcow2".into(),
            }
            .encode_to_vec(),
            [
                Refused(
                    Code::InvalidArgument,
                    "InvalidParameterValue.ImageUrlForbidden",
                ),
                Refused(
                    Code::InvalidArgument,
                    "InvalidParameterValue.ImageUrlForbidden",
                ),
                Refused(
                    Code::InvalidArgument,
                    "InvalidParameterValue.ImageUrlForbidden",
                ),
            ],
        ),
        "imagefleet.region.v1.RegionService/DescribeImportImageOs" => (
            DescribeImportImageOsRequest {}.encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        "imagefleet.region.v1.RegionService/RunInstances" => (
            RunInstancesRequest {
                image_id: image,
                instance_type: "S5.SMALL1".into(),
                instance_count: 1,
                ..Default::default()
            }
            .encode_to_vec(),
            [Allowed, Allowed, not_found_image],
        ),
        // The price of a launch: for whoever may launch the image.
        "imagefleet.region.v1.RegionService/InquiryPriceRunInstances" => (
            InquiryPriceRunInstancesRequest {
                image_id: image,
                instance_type: "S5.SMALL1".into(),
                instance_count: 1,
                hours: 1,
            }
            .encode_to_vec(),
            [Allowed, Allowed, not_found_image],
        ),
        // Prices are public; each account gets its own bill.
        "imagefleet.billing.v1.BillingService/DescribePriceBook" => (
            imagefleet_proto::billing::v1::DescribePriceBookRequest::default().encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        "imagefleet.billing.v1.BillingService/DescribeBill" => (
            imagefleet_proto::billing::v1::DescribeBillRequest::default().encode_to_vec(),
            [Allowed, Allowed, Allowed],
        ),
        "imagefleet.region.v1.RegionService/DescribeInstances" => (
            DescribeInstancesRequest {
                instance_ids: vec![f.owner_instance.clone()],
                ..Default::default()
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/TerminateInstances" => (
            TerminateInstancesRequest {
                instance_ids: vec![f.doomed_instance.clone()],
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/ResetInstance" => (
            ResetInstanceRequest {
                instance_id: f.owner_instance.clone(),
                image_id: image,
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/WriteInstanceDisk" => (
            WriteInstanceDiskRequest {
                instance_id: f.owner_instance.clone(),
                offset: 4096,
                data: b"matrix".to_vec(),
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/ReadInstanceDisk" => (
            ReadInstanceDiskRequest {
                instance_id: f.owner_instance.clone(),
                offset: 0,
                length: 512,
            }
            .encode_to_vec(),
            [Allowed, not_found_instance, not_found_instance],
        ),
        "imagefleet.region.v1.RegionService/SyncImages" => (
            SyncImagesRequest {
                image_ids: vec![image],
                destination_regions: vec!["ap-shanghai".into()],
                dry_run: true,
                ..Default::default()
            }
            .encode_to_vec(),
            [Allowed, not_yours, not_found_image],
        ),
        "imagefleet.region.v1.RegionService/ModifyImageSharePermission" => (
            ModifyImageSharePermissionRequest {
                image_id: image,
                account_ids: vec![f.extra_account.clone()],
                permission: SharePermission::Share as i32,
            }
            .encode_to_vec(),
            [Allowed, not_yours, not_found_image],
        ),
        "imagefleet.region.v1.RegionService/DescribeImageSharePermission" => (
            DescribeImageSharePermissionRequest { image_id: image }.encode_to_vec(),
            [Allowed, not_yours, not_found_image],
        ),
        "imagefleet.catalog.v1.CatalogService/DescribeRegions" => {
            (Vec::new(), [Allowed, Allowed, Allowed])
        }
        "imagefleet.catalog.v1.CatalogService/DescribePublicImages" => {
            (Vec::new(), [Allowed, Allowed, Allowed])
        }
        _ => return None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_as_every_caller() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let carol = cluster.create_account("carol").await;
    let dave = cluster.create_account("dave").await;
    let creds = |a: &imagefleet_rpc::cluster::AccountEntry| Credentials {
        secret_id: a.secret_id.clone(),
        secret_key: a.secret_key.clone(),
    };
    let (owner, receiver, other) = (
        creds(&cluster.accounts[0]),
        creds(&cluster.accounts[1]),
        creds(&carol),
    );
    let service = cluster.service_credentials();
    let identities: Vec<(&str, Credentials)> = IDENTITIES
        .iter()
        .map(|id| (*id, cluster.service_credentials_as(id)))
        .collect();

    // Alice's image, shared with Bob; Carol is unrelated.
    let mut alice = cluster.region("ap-guangzhou", 0);
    let debian = public_image(&mut alice, "Debian").await;
    let instances = run(&mut alice, &debian.image_id, 2).await;
    let image = alice
        .create_image(CreateImageRequest {
            instance_id: instances[0].clone(),
            image_name: "matrix".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut alice, &image, ImageState::Normal).await;
    alice
        .modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: image.clone(),
            account_ids: vec![cluster.accounts[1].account_id.clone()],
            permission: SharePermission::Share as i32,
        })
        .await
        .unwrap();
    let fixture = Fixture {
        image: image.clone(),
        owner_instance: instances[0].clone(),
        doomed_instance: instances[1].clone(),
        extra_account: dave.account_id.clone(),
    };

    let all = methods();
    let services: BTreeSet<&str> = all.iter().map(|m| m.service.as_str()).collect();
    for expected in [
        "imagefleet.region.v1.RegionService",
        "imagefleet.region.v1.RegionInternalService",
        "imagefleet.catalog.v1.CatalogService",
        "imagefleet.catalog.v1.CatalogInternalService",
        "imagefleet.sharing.v1.SharingInternalService",
    ] {
        assert!(
            services.contains(expected),
            "{expected} is missing from the descriptor set"
        );
    }

    let mut cells = 0;
    for method in &all {
        let t = target(&cluster, &method.service);
        let channel = imagefleet_rpc::client::endpoint(&t.url)
            .unwrap()
            .connect_lazy();
        let internal = method.service.ends_with("InternalService");
        let id = format!("{}.{}", method.service, method.name);
        let now = imagefleet_rpc::time::unix_now();
        let internal_row = internal.then(|| {
            internal_row(
                &format!("{}/{}", method.service, method.name),
                &fixture,
                &cluster,
            )
            .unwrap_or_else(|| {
                panic!("{id} has no row in the internal authorisation table: add one")
            })
        });
        let right = match &internal_row {
            Some((_, allowed, _)) => {
                &identities
                    .iter()
                    .find(|(i, _)| *i == allowed[0])
                    .expect("a tested identity")
                    .1
            }
            None => &owner,
        };
        let wrong_key = Credentials {
            secret_id: right.secret_id.clone(),
            secret_key: "wrong".into(),
        };
        let before = fingerprint(&cluster, &image).await;

        // Callers the auth layer turns away, for every method.
        let unauth = Refused(Code::Unauthenticated, "AuthFailure.InvalidAuthorization");
        check(
            &format!("{id} unauthenticated"),
            call(&channel, method, &t.scope, Vec::new(), Signing::None).await,
            unauth,
        );
        let bad = Signing::With {
            credentials: &wrong_key,
            signed_body: &[],
            timestamp: now,
            nonce: auth::new_nonce(),
        };
        check(
            &format!("{id} bad signature"),
            call(&channel, method, &t.scope, Vec::new(), bad).await,
            Refused(Code::Unauthenticated, "AuthFailure.SignatureFailure"),
        );
        let expired = Signing::With {
            credentials: right,
            signed_body: &[],
            timestamp: now - 3600,
            nonce: auth::new_nonce(),
        };
        check(
            &format!("{id} expired"),
            call(&channel, method, &t.scope, Vec::new(), expired).await,
            Refused(Code::Unauthenticated, "AuthFailure.SignatureExpire"),
        );
        // A captured request: its first use (with a tampered body) is refused, and so is the replay.
        let nonce = auth::new_nonce();
        let first = Signing::With {
            credentials: right,
            signed_body: &[],
            timestamp: now,
            nonce: nonce.clone(),
        };
        if method.client_streaming {
            // The body of a client stream is not signed: the first use of the captured request
            // is taken (and refused for carrying no message); its replay is not.
            check(
                &format!("{id} first use"),
                call(&channel, method, &t.scope, Vec::new(), first).await,
                Refused(Code::InvalidArgument, "MissingParameter"),
            );
        } else {
            check(
                &format!("{id} tampered"),
                call(&channel, method, &t.scope, vec![0x42, 0x00], first).await,
                Refused(Code::Unauthenticated, "AuthFailure.SignatureFailure"),
            );
        }
        let replay = Signing::With {
            credentials: right,
            signed_body: &[],
            timestamp: now,
            nonce,
        };
        check(
            &format!("{id} replayed"),
            call(&channel, method, &t.scope, Vec::new(), replay).await,
            Refused(Code::Unauthenticated, "AuthFailure.RequestReplayed"),
        );
        // The other kind of credentials.
        let (wrong_kind, why) = if internal {
            (&owner, "UnauthorizedOperation.ServiceCredentialRequired")
        } else {
            (&service, "UnauthorizedOperation.AccountCredentialRequired")
        };
        check(
            &format!("{id} wrong credential kind"),
            signed(&channel, method, &t.scope, Vec::new(), wrong_kind).await,
            Refused(Code::PermissionDenied, why),
        );
        assert_same(
            &before,
            &fingerprint(&cluster, &image).await,
            &format!("{id}: a refused call changed something"),
        );
        cells += 6;

        if let Some((body, allowed, outcome)) = &internal_row {
            // Every identity: refusals first (each must change nothing), then the allowed.
            let path = format!("{}/{}", method.service, method.name);
            let mut order: Vec<&(&str, Credentials)> = identities.iter().collect();
            order.sort_by_key(|(i, _)| {
                internal_cell(&path, i, allowed, *outcome) != NOT_ALLOWED
                    && !IDENTITIES[5..].contains(i)
            });
            for (identity, credentials) in order {
                let expect = internal_cell(&path, identity, allowed, *outcome);
                let before = fingerprint(&cluster, &image).await;
                check(
                    &format!("{id} as svc-{identity}"),
                    signed(&channel, method, &t.scope, body.clone(), credentials).await,
                    expect,
                );
                let refused_by_auth = matches!(
                    expect,
                    Refused(Code::PermissionDenied | Code::Unauthenticated, _)
                );
                if refused_by_auth {
                    assert_same(
                        &before,
                        &fingerprint(&cluster, &image).await,
                        &format!("{id} as svc-{identity}: a refused call changed something"),
                    );
                } else {
                    settle(&cluster).await;
                }
                cells += 1;
            }
            continue;
        }
        // Account-facing: the owner, the receiver of a share, an unrelated account.
        let (body, expected) = row(&format!("{}/{}", method.service, method.name), &fixture)
            .unwrap_or_else(|| panic!("{id} has no row in the authorisation matrix: add one"));
        // Refusals first (each must change nothing), then the owner.
        for (who, credentials, expect) in [
            ("receiver", &receiver, expected[1]),
            ("other account", &other, expected[2]),
            ("owner", &owner, expected[0]),
        ] {
            let before = fingerprint(&cluster, &image).await;
            check(
                &format!("{id} as {who}"),
                signed(&channel, method, &t.scope, body.clone(), credentials).await,
                expect,
            );
            if expect == Allowed {
                settle(&cluster).await;
            } else {
                assert_same(
                    &before,
                    &fingerprint(&cluster, &image).await,
                    &format!("{id} as {who}: a refused call changed something"),
                );
            }
            cells += 1;
        }
    }
    println!("{cells} cells over {} methods", all.len());
    assert!(cells > 100);
}
