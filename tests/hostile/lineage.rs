//! Shared images, one rule: an instance launched from a shared image is the launcher's, and an
//! image made from it is the launcher's own image whose lineage names the shared parent, its
//! owner and the paid root, so the image fee follows it, and a cancelled share takes nothing
//! back.

use crate::common::*;
use imagefleet_proto::region::v1::*;

async fn share(region: &mut Region, image_id: &str, account: &str, permission: SharePermission) {
    region
        .modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: image_id.into(),
            account_ids: vec![account.into()],
            permission: permission as i32,
        })
        .await
        .expect("share permission changed");
}

async fn create_image(region: &mut Region, instance_id: &str, name: &str) -> String {
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance_id.into(),
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .expect("image created")
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await;
    image_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_made_from_a_shared_image_is_the_launchers_and_names_its_lineage() {
    // Red Hat carries a commercial licence: the fee must follow every derivation.
    let cluster = Cluster::start(&["ap-singapore", "eu-frankfurt"]).await;
    let alice_id = cluster.accounts[0].account_id.clone();
    let bob_id = cluster.accounts[1].account_id.clone();
    let mut alice = cluster.region("ap-singapore", 0);
    let mut bob = cluster.region("ap-singapore", 1);

    let rhel = public_image(&mut alice, "RedHat").await;
    let root = rhel.lineage.clone().expect("public images have a lineage");
    assert!(root.ultimate_source_paid, "Red Hat is a paid image");

    let alice_vm = run(&mut alice, &rhel.image_id, 1).await.remove(0);
    let golden = create_image(&mut alice, &alice_vm, "golden").await;
    let golden_lineage = image(&mut alice, &golden).await.lineage.unwrap();
    assert_eq!(golden_lineage.parent_image_id, rhel.image_id);
    assert_eq!(
        golden_lineage.parent_owner_account_id, "",
        "a public parent has no owner account"
    );
    assert!(golden_lineage.ultimate_source_paid);

    share(&mut alice, &golden, &bob_id, SharePermission::Share).await;
    let bob_vm = run(&mut bob, &golden, 1).await.remove(0);
    let derived = create_image(&mut bob, &bob_vm, "from-golden").await;

    // Alice takes the share back: Bob keeps his instance and his image.
    share(&mut alice, &golden, &bob_id, SharePermission::Cancel).await;
    let refused = bob
        .run_instances(RunInstancesRequest {
            image_id: golden.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await
        .expect_err("the share is cancelled");
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");

    let mine = image(&mut bob, &derived).await;
    assert_eq!(mine.image_creator, bob_id, "the derived image is Bob's");
    assert_eq!(mine.image_type, ImageType::PrivateImage as i32);
    let lineage = mine.lineage.expect("lineage");
    assert_eq!(lineage.parent_image_id, golden, "names the shared parent");
    assert_eq!(
        lineage.parent_owner_account_id, alice_id,
        "names the parent's owner"
    );
    assert_eq!(lineage.ultimate_source_image_id, rhel.image_id);
    assert!(lineage.ultimate_source_paid, "the image fee follows it");
    assert_ne!(alice_id, bob_id);

    // Bob's own image is his to export and copy, like any image of his.
    let (size, _) = export(&mut bob, &derived).await;
    assert_eq!(size, mine.virtual_size_bytes);
    let copied = bob
        .sync_images(SyncImagesRequest {
            image_ids: vec![derived.clone()],
            destination_regions: vec!["eu-frankfurt".into()],
            ..Default::default()
        })
        .await
        .expect("Bob copies his own image")
        .into_inner()
        .image_set
        .remove(0)
        .image_id;
    let mut bob_fra = cluster.region("eu-frankfurt", 1);
    let copy = wait_copy_normal(&mut bob_fra, &copied).await;
    let copy_lineage = copy.lineage.expect("lineage");
    assert_eq!(copy_lineage.parent_image_id, derived);
    assert_eq!(copy_lineage.parent_owner_account_id, bob_id);
    assert_eq!(copy_lineage.ultimate_source_image_id, rhel.image_id);
    assert!(copy_lineage.ultimate_source_paid);

    // The shared image itself stays Alice's: Bob can neither export nor copy it.
    let export_refused = bob
        .export_image(ExportImageRequest {
            image_id: golden.clone(),
            format: ExportFormat::Raw as i32,
        })
        .await
        .expect_err("not Bob's image");
    assert_eq!(export_refused.code(), tonic::Code::NotFound);
    // And his instance is still his.
    let instances = bob
        .describe_instances(DescribeInstancesRequest {
            instance_ids: vec![bob_vm.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instance_set;
    assert_eq!(
        instances.len(),
        1,
        "Bob's instance survives the cancelled share"
    );
}
