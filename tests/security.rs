//! Authentication, isolation between accounts, and bad input, against real processes.

mod common;

use common::*;
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::CreateAccountRequest;
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::{self, Credentials};
use imagefleet_rpc::client::{region_scope, signed_channel, CATALOG_SCOPE};
use prost::Message;
use tonic::Code;

const DESCRIBE: &str = "/imagefleet.region.v1.RegionService/DescribeImages";

/// A request carrying hand-made signing headers, sent over an unsigned channel.
fn hand_signed(
    message: DescribeImagesRequest,
    credentials: &Credentials,
    scope: &str,
    timestamp: i64,
    nonce: &str,
) -> tonic::Request<DescribeImagesRequest> {
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        message.encode_to_vec(),
    ));
    let mut headers = http::HeaderMap::new();
    auth::sign_headers(
        &mut headers,
        credentials,
        DESCRIBE,
        scope,
        &digest,
        timestamp,
        nonce,
    );
    let mut request = tonic::Request::new(message);
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_forged_replayed_and_expired_requests_are_refused() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let url = cluster.region_url("ap-guangzhou");
    let scope = region_scope("ap-guangzhou");
    let alice = Credentials {
        secret_id: cluster.accounts[0].secret_id.clone(),
        secret_key: cluster.accounts[0].secret_key.clone(),
    };
    let plain = imagefleet_rpc::client::endpoint(&url)
        .unwrap()
        .connect_lazy();
    let mut raw = RegionServiceClient::new(plain.clone());

    // No credentials at all.
    assert_refused(
        raw.describe_images(DescribeImagesRequest::default()).await,
        Code::Unauthenticated,
        "AuthFailure.InvalidAuthorization",
    );
    // Health and reflection stay open.
    wait_serving(&url).await;

    let now = imagefleet_rpc::time::unix_now();
    // A correct hand-made signature works once...
    let ok = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &scope,
        now,
        "a1b2c3d4e5f60718",
    );
    let ok_copy = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &scope,
        now,
        "a1b2c3d4e5f60718",
    );
    assert!(raw.describe_images(ok).await.is_ok());
    // ...and a replay of it is refused.
    assert_refused(
        raw.describe_images(ok_copy).await,
        Code::Unauthenticated,
        "AuthFailure.RequestReplayed",
    );

    // Expired (and future) timestamps.
    let old = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &scope,
        now - 3600,
        "0000000000000001",
    );
    assert_refused(
        raw.describe_images(old).await,
        Code::Unauthenticated,
        "AuthFailure.SignatureExpire",
    );
    let future = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &scope,
        now + 3600,
        "0000000000000002",
    );
    assert_refused(
        raw.describe_images(future).await,
        Code::Unauthenticated,
        "AuthFailure.SignatureExpire",
    );

    // Wrong key, unknown SecretId, wrong scope (signed for another region).
    let forged = Credentials {
        secret_id: alice.secret_id.clone(),
        secret_key: "not-the-key".into(),
    };
    let bad = hand_signed(
        DescribeImagesRequest::default(),
        &forged,
        &scope,
        now,
        "0000000000000003",
    );
    assert_refused(
        raw.describe_images(bad).await,
        Code::Unauthenticated,
        "AuthFailure.SignatureFailure",
    );
    let unknown = Credentials {
        secret_id: "AKIDdoesnotexist".into(),
        secret_key: "x".into(),
    };
    let bad = hand_signed(
        DescribeImagesRequest::default(),
        &unknown,
        &scope,
        now,
        "0000000000000004",
    );
    assert_refused(
        raw.describe_images(bad).await,
        Code::Unauthenticated,
        "AuthFailure.SecretIdNotFound",
    );
    let other = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &region_scope("ap-shanghai"),
        now,
        "0000000000000005",
    );
    assert_refused(
        raw.describe_images(other).await,
        Code::Unauthenticated,
        "AuthFailure.SignatureFailure",
    );

    // The body is signed: a message swapped after signing is refused.
    let mut swapped = hand_signed(
        DescribeImagesRequest::default(),
        &alice,
        &scope,
        now,
        "0000000000000006",
    );
    *swapped.get_mut() = DescribeImagesRequest {
        limit: 5,
        ..Default::default()
    };
    assert_refused(
        raw.describe_images(swapped).await,
        Code::Unauthenticated,
        "AuthFailure.SignatureFailure",
    );

    // Account credentials never satisfy a service-only method, and the reverse.
    let mut as_account = CatalogInternalServiceClient::new(
        signed_channel(&cluster.catalog.url(), alice.clone(), CATALOG_SCOPE).unwrap(),
    );
    let before = cluster
        .catalog_internal()
        .create_account(CreateAccountRequest {
            account_id: String::new(),
            name: "probe".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_refused(
        as_account
            .create_account(CreateAccountRequest {
                account_id: String::new(),
                name: "mallory".into(),
            })
            .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ServiceCredentialRequired",
    );
    // Nothing was created: the next id follows the probe's directly.
    let after = cluster
        .catalog_internal()
        .create_account(CreateAccountRequest {
            account_id: String::new(),
            name: "probe2".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(
        after.account_id.parse::<u64>().unwrap(),
        before.account_id.parse::<u64>().unwrap() + 1
    );
    let mut as_service = RegionServiceClient::new(
        signed_channel(&url, cluster.service_credentials(), &scope).unwrap(),
    );
    assert_refused(
        as_service
            .describe_images(DescribeImagesRequest::default())
            .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.AccountCredentialRequired",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_cannot_see_or_touch_each_others_resources() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut alice = cluster.region("ap-guangzhou", 0);
    let mut bob = cluster.region("ap-guangzhou", 1);
    let centos = public_image(&mut alice, "CentOS").await;
    let instance = run(&mut alice, &centos.image_id, 1).await.remove(0);
    write(&mut alice, &instance, 0, b"alice's secret").await;
    let image_id = alice
        .create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: "private".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut alice, &image_id, ImageState::Normal).await;

    // Bob sees neither in lists nor by id.
    let listed = bob
        .describe_images(DescribeImagesRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.image_set.iter().all(|i| i.image_id != image_id));
    assert_refused(
        bob.describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.clone()],
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    let instances = bob
        .describe_instances(DescribeInstancesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(instances.total_count, 0);
    assert_refused(
        bob.describe_instances(DescribeInstancesRequest {
            instance_ids: vec![instance.clone()],
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );
    // ...and can do nothing with them.
    assert_refused(
        bob.run_instances(RunInstancesRequest {
            image_id: image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert_refused(
        bob.modify_image_attribute(ModifyImageAttributeRequest {
            image_id: image_id.clone(),
            image_name: Some("mine".into()),
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert_refused(
        bob.delete_images(DeleteImagesRequest {
            image_ids: vec![image_id.clone()],
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    let exported = bob
        .export_image(ExportImageRequest {
            image_id: image_id.clone(),
            format: 0,
        })
        .await;
    assert_refused(
        exported.map(|_| ()),
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert_refused(
        bob.read_instance_disk(ReadInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: 0,
            length: 14,
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );
    assert_refused(
        bob.write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: 0,
            data: b"bob".to_vec(),
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );
    assert_refused(
        bob.create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: "stolen".into(),
            image_description: String::new(),
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );
    assert_refused(
        bob.reset_instance(ResetInstanceRequest {
            instance_id: instance.clone(),
            image_id: String::new(),
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );
    assert_refused(
        bob.terminate_instances(TerminateInstancesRequest {
            instance_ids: vec![instance.clone()],
        })
        .await,
        Code::NotFound,
        "InvalidInstanceId.NotFound",
    );

    // Alice's things are untouched.
    assert_eq!(read(&mut alice, &instance, 0, 14).await, b"alice's secret");
    let image = image(&mut alice, &image_id).await;
    assert_eq!(image.image_name, "private");
    assert_eq!(image.image_state, ImageState::Normal as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_invalid_argument_and_changes_nothing() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let debian = public_image(&mut gz, "Debian").await;
    let instance = run(&mut gz, &debian.image_id, 1).await.remove(0);
    let chunks_before = chunk_files(&cluster.region_dir("ap-guangzhou"));

    let check = |result: Result<(), tonic::Status>, field: &str, expected: &str| {
        let status = result.expect_err("bad input must be refused");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(reason(&status), expected, "{status:?}");
        assert_eq!(
            imagefleet_proto::error::field(&status).as_deref(),
            Some(field),
            "{status:?}"
        );
    };
    check(
        gz.describe_images(DescribeImagesRequest {
            image_ids: vec!["img-BAD!".into()],
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "image_ids",
        "InvalidImageId.Malformed",
    );
    check(
        gz.describe_images(DescribeImagesRequest {
            image_ids: vec![debian.image_id.clone()],
            filters: vec![Filter {
                name: "platform".into(),
                values: vec!["Debian".into()],
            }],
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "image_ids",
        "InvalidParameter.InvalidParameterCoexistImageIdsFilters",
    );
    check(
        gz.describe_images(DescribeImagesRequest {
            limit: 101,
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "limit",
        "InvalidParameterValue.LimitExceeded",
    );
    check(
        gz.describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "color".into(),
                values: vec!["red".into()],
            }],
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "filters",
        "InvalidFilter",
    );
    check(
        gz.describe_images(DescribeImagesRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "page_token",
        "InvalidParameterValue.PageToken",
    );
    check(
        gz.create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: "x".repeat(61),
            image_description: String::new(),
        })
        .await
        .map(|_| ()),
        "image_name",
        "InvalidImageName.Malformed",
    );
    check(
        gz.create_image(CreateImageRequest {
            instance_id: "ins-nope".into(),
            image_name: "ok".into(),
            image_description: String::new(),
        })
        .await
        .map(|_| ()),
        "instance_id",
        "InvalidInstanceId.Malformed",
    );
    check(
        gz.run_instances(RunInstancesRequest {
            image_id: debian.image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 101,
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "instance_count",
        "InvalidParameterValue.LimitExceeded",
    );
    check(
        gz.run_instances(RunInstancesRequest {
            image_id: debian.image_id.clone(),
            instance_type: "HUGE.ONE".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "instance_type",
        "InvalidInstanceType.Malformed",
    );
    check(
        gz.modify_image_attribute(ModifyImageAttributeRequest {
            image_id: debian.image_id.clone(),
            image_description: Some("d".repeat(257)),
            ..Default::default()
        })
        .await
        .map(|_| ()),
        "image_description",
        "InvalidParameterValue.TooLong",
    );
    check(
        gz.write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: 50 << 30,
            data: vec![1],
        })
        .await
        .map(|_| ()),
        "offset",
        "InvalidParameterValue.OutOfRange",
    );
    check(
        gz.write_instance_disk(WriteInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: u64::MAX,
            data: vec![1],
        })
        .await
        .map(|_| ()),
        "offset",
        "InvalidParameterValue.OutOfRange",
    );
    check(
        gz.read_instance_disk(ReadInstanceDiskRequest {
            instance_id: instance.clone(),
            offset: 0,
            length: 5 << 20,
        })
        .await
        .map(|_| ()),
        "length",
        "InvalidParameterValue.TooLarge",
    );
    check(
        gz.delete_images(DeleteImagesRequest { image_ids: vec![] })
            .await
            .map(|_| ()),
        "image_ids",
        "MissingParameter",
    );

    // Nothing changed.
    let quota = gz
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.image_num_used, 0);
    let instances = gz
        .describe_instances(DescribeInstancesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(instances.total_count, 1);
    assert_eq!(
        chunk_files(&cluster.region_dir("ap-guangzhou")),
        chunks_before
    );
    assert_eq!(
        image(&mut gz, &debian.image_id).await.image_description,
        debian.image_description
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_clients_of_other_accounts_work_end_to_end() {
    // A third account created through the admin call can use the API at once.
    let cluster = Cluster::start(&["ap-singapore"]).await;
    let carol = cluster.create_account("carol").await;
    let mut sg = RegionServiceClient::new(
        signed_channel(
            &cluster.region_url("ap-singapore"),
            Credentials {
                secret_id: carol.secret_id,
                secret_key: carol.secret_key,
            },
            &region_scope("ap-singapore"),
        )
        .unwrap(),
    );
    let listed = sg
        .describe_images(DescribeImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_count, 6);
}
