//! Sharing images between accounts, on the Redis ownership maps: every rule with its reason,
//! what a receiver may and may not do, immediate cancellation, and Redis failures (fail closed,
//! recover by themselves, acknowledged shares survive `kill -9`).

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use tonic::Code;

async fn shared_accounts(region: &mut Region, image_id: &str) -> Vec<String> {
    region
        .describe_image_share_permission(DescribeImageSharePermissionRequest {
            image_id: image_id.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .share_permission_set
        .into_iter()
        .map(|s| s.account_id)
        .collect()
}

/// Alice's image with some data, in ap-guangzhou.
async fn alices_image(cluster: &Cluster) -> (String, Vec<u8>) {
    let mut alice = cluster.region("ap-guangzhou", 0);
    let debian = public_image(&mut alice, "Debian").await;
    let instance = run(&mut alice, &debian.image_id, 1).await.remove(0);
    let data = random_bytes(2 << 20);
    write(&mut alice, &instance, 9 << 20, &data).await;
    let image_id = alice
        .create_image(CreateImageRequest {
            instance_id: instance,
            image_name: "team-base".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut alice, &image_id, ImageState::Normal).await;
    (image_id, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_rules_and_what_a_receiver_may_do() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-shanghai"]).await;
    let carol = cluster.create_account("carol").await;
    let (alice_id, bob_id, carol_id) = (
        cluster.accounts[0].account_id.clone(),
        cluster.accounts[1].account_id.clone(),
        carol.account_id.clone(),
    );
    let (image_id, data) = alices_image(&cluster).await;
    let mut alice = cluster.region("ap-guangzhou", 0);
    let mut bob = cluster.region("ap-guangzhou", 1);
    let mut carol_gz = cluster.region_as("ap-guangzhou", &carol);
    assert!(shared_accounts(&mut alice, &image_id).await.is_empty());

    // Bob cannot see it yet.
    assert_refused(
        launch(&mut bob, &image_id).await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );

    // Refusals, each changing nothing.
    assert_refused(
        share(&mut alice, &image_id, &[&alice_id], SharePermission::Share).await,
        Code::InvalidArgument,
        "FailedOperation.AccountIsYourSelf",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &["999999999999"],
            SharePermission::Share,
        )
        .await,
        Code::NotFound,
        "InvalidAccountId.NotFound",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&bob_id, "999999999999"],
            SharePermission::Share,
        )
        .await,
        Code::NotFound,
        "InvalidAccountId.NotFound",
    );
    assert_refused(
        share(&mut alice, &image_id, &["12345"], SharePermission::Share).await,
        Code::InvalidArgument,
        "InvalidAccountId.Malformed",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&bob_id, &bob_id],
            SharePermission::Share,
        )
        .await,
        Code::InvalidArgument,
        "InvalidParameterValue.Duplicate",
    );
    assert_refused(
        share(&mut alice, &image_id, &[], SharePermission::Share).await,
        Code::InvalidArgument,
        "InvalidParameterValue.LimitExceeded",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&bob_id],
            SharePermission::Unspecified,
        )
        .await,
        Code::InvalidArgument,
        "InvalidParameterValue.Permission",
    );
    let debian = public_image(&mut alice, "Debian").await;
    assert_refused(
        share(
            &mut alice,
            &debian.image_id,
            &[&bob_id],
            SharePermission::Share,
        )
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert!(shared_accounts(&mut alice, &image_id).await.is_empty());

    // Share with Bob.
    share(&mut alice, &image_id, &[&bob_id], SharePermission::Share)
        .await
        .unwrap();
    let shares = alice
        .describe_image_share_permission(DescribeImageSharePermissionRequest {
            image_id: image_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .share_permission_set;
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].account_id, bob_id);
    assert!(shares[0].created_time.ends_with('Z'));
    // No duplicate shares; a list with one duplicate applies to nobody.
    assert_refused(
        share(&mut alice, &image_id, &[&bob_id], SharePermission::Share).await,
        Code::AlreadyExists,
        "FailedOperation.AccountAlreadyExists",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&carol_id, &bob_id],
            SharePermission::Share,
        )
        .await,
        Code::AlreadyExists,
        "FailedOperation.AccountAlreadyExists",
    );
    assert_eq!(
        shared_accounts(&mut alice, &image_id).await,
        vec![bob_id.clone()]
    );
    // Cancelling a share that does not exist is refused, and cancels nothing.
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&bob_id, &carol_id],
            SharePermission::Cancel,
        )
        .await,
        Code::FailedPrecondition,
        "FailedOperation.AccountNotShared",
    );
    assert_eq!(
        shared_accounts(&mut alice, &image_id).await,
        vec![bob_id.clone()]
    );

    // Bob sees it as SHARED_IMAGE, in lists, by filter and by id.
    let listed = bob
        .describe_images(DescribeImagesRequest {
            filters: vec![Filter {
                name: "image-type".into(),
                values: vec!["SHARED_IMAGE".into()],
            }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.total_count, 1);
    assert_eq!(listed.image_set[0].image_id, image_id);
    assert_eq!(
        listed.image_set[0].image_type,
        ImageType::SharedImage as i32
    );
    assert_eq!(
        image(&mut bob, &image_id).await.image_type,
        ImageType::SharedImage as i32
    );
    // Carol and other regions do not.
    assert_refused(
        carol_gz
            .describe_images(DescribeImagesRequest {
                image_ids: vec![image_id.clone()],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    let mut bob_sh = cluster.region("ap-shanghai", 1);
    assert_refused(
        bob_sh
            .describe_images(DescribeImagesRequest {
                image_ids: vec![image_id.clone()],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    let sh_list = bob_sh
        .describe_images(DescribeImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(sh_list
        .image_set
        .iter()
        .all(|i| i.image_type != ImageType::SharedImage as i32));

    // Bob can launch and reset from it, with its bytes and its lineage.
    let bobs = run(&mut bob, &image_id, 1).await.remove(0);
    assert_eq!(
        read(&mut bob, &bobs, 9 << 20, data.len() as u64).await,
        data
    );
    write(&mut bob, &bobs, 9 << 20, b"bob was here").await;
    bob.reset_instance(ResetInstanceRequest {
        instance_id: bobs.clone(),
        image_id: image_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        read(&mut bob, &bobs, 9 << 20, data.len() as u64).await,
        data
    );
    // ...and nothing else.
    assert_refused(
        bob.modify_image_attribute(ModifyImageAttributeRequest {
            image_id: image_id.clone(),
            image_name: Some("bobs".into()),
            ..Default::default()
        })
        .await,
        Code::FailedPrecondition,
        "UnsupportedOperation.SharedImageModifyUnsupported",
    );
    assert_refused(
        share(&mut bob, &image_id, &[&carol_id], SharePermission::Share).await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert_refused(
        bob.describe_image_share_permission(DescribeImageSharePermissionRequest {
            image_id: image_id.clone(),
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert_refused(
        bob.sync_images(SyncImagesRequest {
            image_ids: vec![image_id.clone()],
            destination_regions: vec!["ap-shanghai".into()],
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    let exported = bob
        .export_image(ExportImageRequest {
            image_id: image_id.clone(),
            format: 0,
        })
        .await;
    assert_refused(
        exported.map(|_| ()),
        Code::FailedPrecondition,
        "UnsupportedOperation.SharedImageExportUnsupported",
    );
    assert_refused(
        bob.delete_images(DeleteImagesRequest {
            image_ids: vec![image_id.clone()],
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert_eq!(image(&mut alice, &image_id).await.image_name, "team-base");

    // The owner cannot delete a shared image.
    assert_refused(
        alice
            .delete_images(DeleteImagesRequest {
                image_ids: vec![image_id.clone()],
            })
            .await,
        Code::FailedPrecondition,
        "InvalidImageId.InShared",
    );

    // A cancel takes effect at once: a launch that worked a moment ago is refused.
    assert!(launch(&mut bob, &image_id).await.is_ok());
    share(&mut alice, &image_id, &[&bob_id], SharePermission::Cancel)
        .await
        .unwrap();
    assert_refused(
        launch(&mut bob, &image_id).await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert!(shared_accounts(&mut alice, &image_id).await.is_empty());
    // Bob's instances keep working.
    assert_eq!(
        read(&mut bob, &bobs, 9 << 20, data.len() as u64).await,
        data
    );

    // After every share is cancelled the image can be deleted, and the maps are clean.
    alice
        .delete_images(DeleteImagesRequest {
            image_ids: vec![image_id.clone()],
        })
        .await
        .unwrap();
    assert_eq!(
        cluster.redis_cli(&["EXISTS", &format!("imagefleet:{{{image_id}}}:owner")]),
        "0"
    );
    assert_eq!(
        cluster.redis_cli(&["EXISTS", &format!("imagefleet:{{{image_id}}}:shares")]),
        "0"
    );
    assert_eq!(
        cluster.redis_cli(&[
            "HEXISTS",
            &format!("imagefleet:{{account-{bob_id}}}:shared-with"),
            &image_id
        ]),
        "0"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_500_accounts_per_image() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let (image_id, _) = alices_image(&cluster).await;
    let mut alice = cluster.region("ap-guangzhou", 0);
    let mut many = Vec::new();
    for n in 0..501 {
        many.push(
            cluster
                .create_account(&format!("user-{n}"))
                .await
                .account_id,
        );
    }
    let refs: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_refused(
        share(&mut alice, &image_id, &refs, SharePermission::Share).await,
        Code::InvalidArgument,
        "InvalidParameterValue.LimitExceeded",
    );
    share(&mut alice, &image_id, &refs[..499], SharePermission::Share)
        .await
        .unwrap();
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &refs[499..501],
            SharePermission::Share,
        )
        .await,
        Code::ResourceExhausted,
        "OverQuota",
    );
    assert_eq!(shared_accounts(&mut alice, &image_id).await.len(), 499);
    share(
        &mut alice,
        &image_id,
        &refs[499..500],
        SharePermission::Share,
    )
    .await
    .unwrap();
    assert_eq!(shared_accounts(&mut alice, &image_id).await.len(), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failures_fail_closed_recover_by_themselves_and_lose_nothing() {
    let mut cluster = Cluster::start(&["ap-guangzhou"]).await;
    let (image_id, data) = alices_image(&cluster).await;
    let bob_id = cluster.accounts[1].account_id.clone();
    let mut alice = cluster.region("ap-guangzhou", 0);
    let mut bob = cluster.region("ap-guangzhou", 1);
    let carol_id = cluster.create_account("carol").await.account_id;
    share(
        &mut alice,
        &image_id,
        &[&bob_id, &carol_id],
        SharePermission::Share,
    )
    .await
    .unwrap();
    share(&mut alice, &image_id, &[&carol_id], SharePermission::Cancel)
        .await
        .unwrap();

    // Acknowledged changes survive kill -9 of Redis (AOF, appendfsync always): bob's share is
    // there, carol's cancelled one is not.
    cluster.redis.restart();
    let mut shared = Vec::new();
    for _ in 0..200 {
        if let Ok(r) = alice
            .describe_image_share_permission(DescribeImageSharePermissionRequest {
                image_id: image_id.clone(),
            })
            .await
        {
            shared = r.into_inner().share_permission_set;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let accounts: Vec<&str> = shared.iter().map(|s| s.account_id.as_str()).collect();
    assert_eq!(accounts, [bob_id.as_str()], "bob's share survived, alone");

    // Redis down: share checks fail closed, health says NOT_SERVING.
    cluster.redis.kill9();
    assert_refused(
        launch(&mut bob, &image_id).await,
        Code::Unavailable,
        "ServiceUnavailable",
    );
    assert_refused(
        share(
            &mut alice,
            &image_id,
            &[&cluster.accounts[1].account_id],
            SharePermission::Cancel,
        )
        .await,
        Code::Unavailable,
        "ServiceUnavailable",
    );
    let channel = imagefleet_rpc::client::endpoint(&cluster.sharing.url())
        .unwrap()
        .connect_lazy();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut status = 1;
    for _ in 0..100 {
        status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 2, "sharing reports NOT_SERVING while Redis is down");
    // Alice's own image does not depend on the sharing maps.
    assert!(launch(&mut alice, &image_id).await.is_ok());

    // Redis back: everything works again without restarting any service.
    cluster.redis.restart();
    let mut launched = None;
    for _ in 0..200 {
        if let Ok(mut ids) = launch(&mut bob, &image_id).await {
            launched = Some(ids.remove(0));
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let launched = launched.expect("bob can launch again once Redis is back");
    let mut running = false;
    for _ in 0..100 {
        let state = bob
            .describe_instances(DescribeInstancesRequest {
                instance_ids: vec![launched.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .instance_set[0]
            .instance_state;
        if state == InstanceState::Running as i32 {
            running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(running);
    assert_eq!(
        read(&mut bob, &launched, 9 << 20, data.len() as u64).await,
        data
    );
    wait_serving(&cluster.sharing.url()).await;
}

/// The region's share checker under many concurrent launches: checks travel together in
/// `CheckShares` calls and each gets its own answer; listings of what is shared with an
/// account likewise; a malformed check is refused alone, naming its place in the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_travel_together_and_each_gets_its_own_answer() {
    use imagefleet_proto::sharing::v1 as sharing;
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let (image_id, _) = alices_image(&cluster).await;
    let bob_id = cluster.accounts[1].account_id.clone();
    let carol_id = cluster.create_account("carol").await.account_id;
    let mut alice = cluster.region("ap-guangzhou", 0);
    share(&mut alice, &image_id, &[&bob_id], SharePermission::Share)
        .await
        .unwrap();

    let checker = imagefleet_region::ShareChecker::connect(
        &cluster.sharing.url(),
        imagefleet_region::service_credentials("ap-guangzhou", &cluster.service_key),
    )
    .unwrap();
    // 400 checks at once, bob's and carol's interleaved: bob's are shared, carol's are not.
    let checks = (0..400).map(|n| {
        let checker = checker.clone();
        let account = if n % 2 == 0 {
            bob_id.clone()
        } else {
            carol_id.clone()
        };
        let image_id = image_id.clone();
        async move { (n, checker.is_shared(&image_id, &account).await) }
    });
    for (n, answer) in futures::future::join_all(checks).await {
        assert_eq!(answer.unwrap(), n % 2 == 0, "check {n}");
    }
    let listings = (0..100).map(|n| {
        let checker = checker.clone();
        let account = if n % 2 == 0 {
            bob_id.clone()
        } else {
            carol_id.clone()
        };
        async move { (n, checker.shared_with(&account).await) }
    });
    for (n, answer) in futures::future::join_all(listings).await {
        let expected = if n % 2 == 0 {
            vec![image_id.clone()]
        } else {
            Vec::new()
        };
        assert_eq!(answer.unwrap(), expected, "listing {n}");
    }
    // A cancelled share is refused at the next check: nothing was kept.
    share(&mut alice, &image_id, &[&bob_id], SharePermission::Cancel)
        .await
        .unwrap();
    assert!(!checker.is_shared(&image_id, &bob_id).await.unwrap());
    assert!(checker.shared_with(&bob_id).await.unwrap().is_empty());

    // Malformed input: the checker refuses it before it joins a batch; the batched call
    // refuses a batch that holds one, naming the check, and a batch over 1000.
    let refused = checker.is_shared("img-BAD", &bob_id).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let good = sharing::CheckShareRequest {
        image_id: image_id.clone(),
        account_id: bob_id.clone(),
    };
    let bad = sharing::CheckShareRequest {
        image_id: image_id.clone(),
        account_id: "bob".into(),
    };
    let refused = checker
        .client()
        .check_shares(sharing::CheckSharesRequest {
            checks: vec![good.clone(), bad],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(
        imagefleet_proto::error::reason(&refused).as_deref(),
        Some("InvalidAccountId.Malformed")
    );
    assert_eq!(
        imagefleet_proto::error::metadata(&refused)
            .get("field")
            .map(String::as_str),
        Some("checks[1].account_id")
    );
    let refused = checker
        .client()
        .check_shares(sharing::CheckSharesRequest {
            checks: vec![good; 1001],
        })
        .await
        .unwrap_err();
    assert_eq!(
        imagefleet_proto::error::reason(&refused).as_deref(),
        Some("InvalidParameterValue.LimitExceeded")
    );
    let lists = checker
        .client()
        .list_shared_with_accounts(sharing::ListSharedWithAccountsRequest {
            account_ids: vec![carol_id.clone(), bob_id.clone()],
        })
        .await
        .unwrap()
        .into_inner()
        .lists;
    assert_eq!(lists.len(), 2);
}
