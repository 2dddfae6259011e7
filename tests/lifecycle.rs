//! The image and instance lifecycle over gRPC, against real processes: public images,
//! launching, writing to a disk, creating an image, launching from it, reading the bytes back,
//! exporting, resetting, deleting with its rules, quota and pagination.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;
use tonic::Code;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_images_are_seeded_identically_in_every_region() {
    let cluster = Cluster::start(&["ap-guangzhou", "ap-singapore"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let mut sg = cluster.region("ap-singapore", 0);
    let list = |images: DescribeImagesResponse| {
        let mut v: Vec<(String, String, String, bool)> = images
            .image_set
            .into_iter()
            .map(|i| {
                let paid = i.lineage.as_ref().is_some_and(|l| l.ultimate_source_paid);
                (i.image_id, i.platform, i.content_digest, paid)
            })
            .collect();
        v.sort();
        v
    };
    let request = || DescribeImagesRequest {
        filters: vec![Filter {
            name: "image-type".into(),
            values: vec!["PUBLIC_IMAGE".into()],
        }],
        limit: 100,
        ..Default::default()
    };
    let gz_images = list(gz.describe_images(request()).await.unwrap().into_inner());
    let sg_images = list(sg.describe_images(request()).await.unwrap().into_inner());
    let platforms: std::collections::BTreeSet<_> = gz_images.iter().map(|i| i.1.as_str()).collect();
    for p in [
        "TencentOS",
        "CentOS",
        "Ubuntu",
        "Debian",
        "Windows",
        "RedHat",
    ] {
        assert!(platforms.contains(p), "missing public {p} image");
    }
    // Same ids and the same bytes everywhere; only billing differs (Windows is paid overseas).
    let strip = |v: &[(String, String, String, bool)]| {
        v.iter()
            .map(|i| (i.0.clone(), i.2.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&gz_images), strip(&sg_images));
    let windows_paid =
        |v: &[(String, String, String, bool)]| v.iter().find(|i| i.1 == "Windows").unwrap().3;
    assert!(!windows_paid(&gz_images));
    assert!(windows_paid(&sg_images));
    let rhel_paid = gz_images.iter().find(|i| i.1 == "RedHat").unwrap().3;
    assert!(rhel_paid);

    // A public disk looks bootable: an MBR signature at the end of sector 0.
    let ubuntu = public_image(&mut gz, "Ubuntu").await;
    let ids = run(&mut gz, &ubuntu.image_id, 1).await;
    let mbr = read(&mut gz, &ids[0], 0, 512).await;
    assert_eq!(&mbr[510..], &[0x55, 0xAA]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_write_create_launch_read_export_reset_delete() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let region_dir = cluster.region_dir("ap-guangzhou");
    let baseline_chunks = chunk_files(&region_dir);
    let mut gz = cluster.region("ap-guangzhou", 0);
    let ubuntu = public_image(&mut gz, "Ubuntu").await;

    // Launch: copy-on-write, so no chunk is written.
    let ids = run(&mut gz, &ubuntu.image_id, 3).await;
    assert_eq!(chunk_files(&region_dir), baseline_chunks);
    let instances = gz
        .describe_instances(DescribeInstancesRequest {
            instance_ids: ids.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(instances.total_count, 3);
    assert!(instances
        .instance_set
        .iter()
        .all(|i| i.system_disk.as_ref().unwrap().disk_size_gib == 50));

    // Write 3 MiB (not chunk-aligned) into the first instance.
    let data = random_bytes(3 * MIB as usize);
    let offset = 20 * MIB + 4097;
    write(&mut gz, &ids[0], offset, &data).await;
    assert_eq!(
        read(&mut gz, &ids[0], offset, data.len() as u64).await,
        data
    );
    // The other instances still see the public image's content.
    assert!(read(&mut gz, &ids[1], offset, 4096)
        .await
        .iter()
        .all(|b| *b == 0));

    // Create an image from it.
    let quota_before = gz
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    let created = gz
        .create_image(CreateImageRequest {
            instance_id: ids[0].clone(),
            image_name: "web-server".into(),
            image_description: "with data".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let image = wait_image_state(&mut gz, &created.image_id, ImageState::Normal).await;
    assert_eq!(image.image_type, ImageType::PrivateImage as i32);
    assert_eq!(image.image_source, ImageSource::CreateImage as i32);
    assert_eq!(image.image_size_gib, 50);
    assert_eq!(image.platform, "Ubuntu");
    let lineage = image.lineage.clone().unwrap();
    assert_eq!(lineage.parent_image_id, ubuntu.image_id);
    assert_eq!(lineage.ultimate_source_image_id, ubuntu.image_id);
    assert!(!lineage.ultimate_source_paid);
    assert!(image.content_digest.starts_with("sha256:"));
    assert_ne!(image.content_digest, ubuntu.content_digest);
    let quota_after = gz
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota_after.image_num_used, quota_before.image_num_used + 1);
    assert_eq!(quota_after.image_num_quota, 500);
    // Shares chunks with its source: only the 4 chunks the write touched are new.
    assert_eq!(chunk_files(&region_dir), baseline_chunks + 4);

    // The name is unique per account and region.
    assert_refused(
        gz.create_image(CreateImageRequest {
            instance_id: ids[1].clone(),
            image_name: "web-server".into(),
            image_description: String::new(),
        })
        .await,
        Code::AlreadyExists,
        "InvalidImageName.Duplicate",
    );

    // ModifyImageAttribute: owner only, names stay unique, public images are not the caller's.
    let other = gz
        .create_image(CreateImageRequest {
            instance_id: ids[1].clone(),
            image_name: "other".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(&mut gz, &other, ImageState::Normal).await;
    assert_refused(
        gz.modify_image_attribute(ModifyImageAttributeRequest {
            image_id: other.clone(),
            image_name: Some("web-server".into()),
            ..Default::default()
        })
        .await,
        Code::AlreadyExists,
        "InvalidImageName.Duplicate",
    );
    gz.modify_image_attribute(ModifyImageAttributeRequest {
        image_id: other.clone(),
        image_name: Some("other-renamed".into()),
        image_description: Some("now described".into()),
        is_deprecated: Some(true),
    })
    .await
    .unwrap();
    let renamed = common::image(&mut gz, &other).await;
    assert_eq!(
        (
            renamed.image_name.as_str(),
            renamed.image_description.as_str(),
            renamed.is_deprecated
        ),
        ("other-renamed", "now described", true)
    );
    assert_refused(
        gz.modify_image_attribute(ModifyImageAttributeRequest {
            image_id: ubuntu.image_id.clone(),
            image_name: Some("mine".into()),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    gz.delete_images(DeleteImagesRequest {
        image_ids: vec![other],
    })
    .await
    .unwrap();

    // Launch from the new image and read the written bytes back.
    let from_image = run(&mut gz, &created.image_id, 2).await;
    assert_eq!(
        read(&mut gz, &from_image[1], offset, data.len() as u64).await,
        data
    );
    assert_eq!(chunk_files(&region_dir), baseline_chunks + 4);

    // Export: the raw stream carries exactly the bytes.
    let (size, pieces) = export(&mut gz, &created.image_id).await;
    assert_eq!(size, 50 * GIB);
    let mut exported = vec![0u8; (24 * MIB) as usize];
    for (at, piece) in &pieces {
        if *at < exported.len() as u64 {
            let end = (*at as usize + piece.len()).min(exported.len());
            exported[*at as usize..end].copy_from_slice(&piece[..end - *at as usize]);
        }
    }
    assert_eq!(
        &exported[offset as usize..offset as usize + data.len()],
        &data[..]
    );
    assert_eq!(&exported[510..512], &[0x55, 0xAA]);
    // Public and Windows images cannot be exported.
    let refused = gz
        .export_image(ExportImageRequest {
            image_id: ubuntu.image_id.clone(),
            format: ExportFormat::Raw as i32,
        })
        .await;
    assert_refused(
        refused.map(|_| ()),
        Code::FailedPrecondition,
        "UnsupportedOperation.PublicImageExportUnsupported",
    );

    // Reset the first instance: its disk is the image's again; its own chunks are reclaimed
    // only where nothing else (the new image) references them.
    gz.reset_instance(ResetInstanceRequest {
        instance_id: ids[0].clone(),
        image_id: String::new(),
    })
    .await
    .unwrap();
    assert!(read(&mut gz, &ids[0], offset, data.len() as u64)
        .await
        .iter()
        .all(|b| *b == 0));
    assert_eq!(chunk_files(&region_dir), baseline_chunks + 4);
    // Reset onto the custom image brings the data back.
    gz.reset_instance(ResetInstanceRequest {
        instance_id: ids[0].clone(),
        image_id: created.image_id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        read(&mut gz, &ids[0], offset, data.len() as u64).await,
        data
    );

    // Delete rules: not public images; own images go, instances launched from them keep working.
    assert_refused(
        gz.delete_images(DeleteImagesRequest {
            image_ids: vec![ubuntu.image_id.clone()],
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    // All or nothing: one bad id keeps the good one.
    assert_refused(
        gz.delete_images(DeleteImagesRequest {
            image_ids: vec![created.image_id.clone(), ubuntu.image_id.clone()],
        })
        .await,
        Code::PermissionDenied,
        "UnauthorizedOperation.ImageNotBelongToAccount",
    );
    assert_eq!(
        image_state_of(&mut gz, &created.image_id).await,
        Some(ImageState::Normal as i32)
    );
    gz.delete_images(DeleteImagesRequest {
        image_ids: vec![created.image_id.clone()],
    })
    .await
    .unwrap();
    assert_eq!(image_state_of(&mut gz, &created.image_id).await, None);
    assert_eq!(
        read(&mut gz, &from_image[0], offset, data.len() as u64).await,
        data
    );
    assert_refused(
        gz.run_instances(RunInstancesRequest {
            image_id: created.image_id.clone(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            ..Default::default()
        })
        .await,
        Code::NotFound,
        "InvalidImageId.NotFound",
    );
    assert_eq!(chunk_files(&region_dir), baseline_chunks + 4);

    // When the last user of the deleted image's snapshot goes, its chunks are reclaimed.
    let mut all = ids.clone();
    all.extend(from_image.clone());
    gz.terminate_instances(TerminateInstancesRequest { instance_ids: all })
        .await
        .unwrap();
    assert_eq!(chunk_files(&region_dir), baseline_chunks);
    let terminated = gz
        .describe_instances(DescribeInstancesRequest {
            instance_ids: vec![ids[0].clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        terminated.instance_set[0].instance_state,
        InstanceState::Terminated as i32
    );
    let quota_end = gz
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota_end.image_num_used, quota_before.image_num_used);
}

async fn image_state_of(region: &mut Region, image_id: &str) -> Option<i32> {
    match region
        .describe_images(DescribeImagesRequest {
            image_ids: vec![image_id.into()],
            ..Default::default()
        })
        .await
    {
        Ok(r) => r.into_inner().image_set.first().map(|i| i.image_state),
        Err(status) => {
            assert_eq!(reason(&status), "InvalidImageId.NotFound");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_filters_and_quota() {
    let cluster = Cluster::start(&["ap-shanghai"]).await;
    let mut sh = cluster.region("ap-shanghai", 0);
    let debian = public_image(&mut sh, "Debian").await;
    let ids = run(&mut sh, &debian.image_id, 1).await;
    for n in 0..3 {
        let created = sh
            .create_image(CreateImageRequest {
                instance_id: ids[0].clone(),
                image_name: format!("img-{n}"),
                image_description: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        wait_image_state(&mut sh, &created.image_id, ImageState::Normal).await;
    }
    // 6 public + 3 private, walked with page tokens 4 at a time.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = sh
            .describe_images(DescribeImagesRequest {
                limit: 4,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(page.total_count, 9);
        seen.extend(page.image_set.into_iter().map(|i| i.image_id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let unique: std::collections::HashSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), 9);
    // Offset/limit agrees with tokens.
    let by_offset = sh
        .describe_images(DescribeImagesRequest {
            offset: 8,
            limit: 4,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_offset.image_set.len(), 1);
    assert_eq!(by_offset.image_set[0].image_id, seen[8]);
    // Filters combine.
    let private = sh
        .describe_images(DescribeImagesRequest {
            filters: vec![
                Filter {
                    name: "image-type".into(),
                    values: vec!["PRIVATE_IMAGE".into()],
                },
                Filter {
                    name: "image-name".into(),
                    values: vec!["img-0".into(), "img-2".into()],
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(private.total_count, 2);
    assert!(private
        .image_set
        .iter()
        .all(|i| i.image_type == ImageType::PrivateImage as i32));
    let quota = sh
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.image_num_used, 3);
    // Bob's quota and listing are his own.
    let mut bob = cluster.region("ap-shanghai", 1);
    let quota = bob
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(quota.image_num_used, 0);
    let bobs = bob
        .describe_images(DescribeImagesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bobs.total_count, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_image_quota_is_enforced() {
    let mut cluster = Cluster::start(&[]).await;
    // A region with a quota of 2, started by hand.
    let port = free_port();
    let dir = cluster.dir.path().join("small");
    let mut child = std::process::Command::new(IMAGED)
        .args([
            "region",
            "--region",
            "ap-beijing",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(&dir)
        .args([
            "--catalog-url",
            &cluster.catalog.url(),
            "--sharing-url",
            &cluster.sharing.url(),
        ])
        .args(["--image-quota", "2"])
        .env("IMAGEFLEET_SERVICE_KEY", &cluster.service_key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    wait_serving(&url).await;
    cluster.regions.clear();
    let account = &cluster.accounts[0];
    let mut bj = imagefleet_proto::region::v1::region_service_client::RegionServiceClient::new(
        imagefleet_rpc::client::signed_channel(
            &url,
            imagefleet_rpc::Credentials {
                secret_id: account.secret_id.clone(),
                secret_key: account.secret_key.clone(),
            },
            &imagefleet_rpc::client::region_scope("ap-beijing"),
        )
        .unwrap(),
    );
    let centos = public_image(&mut bj, "CentOS").await;
    let ids = run(&mut bj, &centos.image_id, 1).await;
    for n in 0..2 {
        bj.create_image(CreateImageRequest {
            instance_id: ids[0].clone(),
            image_name: format!("q{n}"),
            image_description: String::new(),
        })
        .await
        .unwrap();
    }
    assert_refused(
        bj.create_image(CreateImageRequest {
            instance_id: ids[0].clone(),
            image_name: "q2".into(),
            image_description: String::new(),
        })
        .await,
        Code::ResourceExhausted,
        "ImageQuotaLimitExceeded",
    );
    let quota = bj
        .describe_image_quota(DescribeImageQuotaRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((quota.image_num_quota, quota.image_num_used), (2, 2));
    let _ = child.kill();
    let _ = child.wait();
}

/// Old code: refused with `InvalidInstanceState`, after storing every chunk of the data (about
/// 40 MiB of chunk files left behind by the 10 refused calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writing_to_a_terminated_instance_is_refused_and_stores_nothing() {
    let cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let ubuntu = public_image(&mut gz, "Ubuntu").await;
    let instance = run(&mut gz, &ubuntu.image_id, 1).await.remove(0);
    gz.terminate_instances(TerminateInstancesRequest {
        instance_ids: vec![instance.clone()],
    })
    .await
    .unwrap();
    let mut state = 0;
    for _ in 0..600 {
        state = gz
            .describe_instances(DescribeInstancesRequest {
                instance_ids: vec![instance.clone()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .instance_set[0]
            .instance_state;
        if state == InstanceState::Terminated as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(state, InstanceState::Terminated as i32);

    let region_dir = cluster.region_dir("ap-guangzhou");
    let before = chunk_files(&region_dir);
    let mut results = Vec::new();
    for n in 0..10u64 {
        results.push(
            gz.write_instance_disk(WriteInstanceDiskRequest {
                instance_id: instance.clone(),
                offset: n * 4 * MIB,
                data: random_bytes(4 * MIB as usize),
            })
            .await,
        );
    }
    assert_eq!(
        chunk_files(&region_dir),
        before,
        "refused writes left chunk files behind"
    );
    for result in results {
        assert_refused(
            result,
            Code::FailedPrecondition,
            "UnsupportedOperation.InstanceStateTerminated",
        );
    }
}
