//! A region service killed with `kill -9` and restarted has lost nothing it acknowledged, and
//! finishes what was under way.

mod common;

use common::*;
use imagefleet_proto::region::v1::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_region_keeps_every_acknowledged_image_instance_and_chunk() {
    let mut cluster = Cluster::start(&["ap-guangzhou"]).await;
    let mut gz = cluster.region("ap-guangzhou", 0);
    let tencentos = public_image(&mut gz, "TencentOS").await;
    let instances = run(&mut gz, &tencentos.image_id, 2).await;
    let data = random_bytes(5 << 20);
    write(&mut gz, &instances[0], 7 << 20, &data).await;
    let first = gz
        .create_image(CreateImageRequest {
            instance_id: instances[0].clone(),
            image_name: "before-crash".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    let first = wait_image_state(&mut gz, &first, ImageState::Normal).await;

    // More acknowledged work right before the crash: a write, a launch, and an image whose
    // creation is still under way when the process dies.
    let tail = random_bytes(1 << 20);
    write(&mut gz, &instances[1], 3 << 20, &tail).await;
    let launched = gz
        .run_instances(RunInstancesRequest {
            image_id: first.image_id.clone(),
            instance_type: "S5.SMALL2".into(),
            instance_count: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .instance_id_set;
    // The sharing service is frozen, so that the creation cannot finish (an image becomes
    // NORMAL only once its owner is recorded there): it is still CREATING at the kill.
    cluster.sharing.signal("STOP");
    let second = gz
        .create_image(CreateImageRequest {
            instance_id: instances[1].clone(),
            image_name: "during-crash".into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    let (first_size, first_bytes) = export(&mut gz, &first.image_id).await;
    // What the kill interrupts, as seen right before it.
    let patience = std::time::Duration::from_secs(10);
    let second_state = tokio::time::timeout(patience, image(&mut gz, &second))
        .await
        .expect("DescribeImages answers")
        .image_state;
    let launched_states: Vec<i32> = tokio::time::timeout(
        patience,
        gz.describe_instances(DescribeInstancesRequest {
            instance_ids: launched.clone(),
            ..Default::default()
        }),
    )
    .await
    .expect("DescribeInstances answers")
    .unwrap()
    .into_inner()
    .instance_set
    .iter()
    .map(|i| i.instance_state)
    .collect();
    let chunks_before = chunk_files(&cluster.region_dir("ap-guangzhou"));
    cluster.kill9_region("ap-guangzhou");
    cluster.sharing.signal("CONT");
    assert_eq!(
        second_state,
        ImageState::Creating as i32,
        "the second image must still be CREATING at the kill"
    );
    // Launches are immediate: the instances may have been RUNNING already. Each observed
    // state is one the restart must carry on from.
    let pending = launched_states
        .iter()
        .filter(|s| **s == InstanceState::Pending as i32)
        .count();
    assert!(launched_states
        .iter()
        .all(|s| *s == InstanceState::Pending as i32 || *s == InstanceState::Running as i32));
    eprintln!(
        "at the kill: image CREATING, {pending} of {} launched instances PENDING",
        launched.len()
    );
    cluster.restart_region("ap-guangzhou").await;

    let mut gz = cluster.region("ap-guangzhou", 0);
    assert_eq!(
        chunk_files(&cluster.region_dir("ap-guangzhou")),
        chunks_before
    );
    let after = image(&mut gz, &first.image_id).await;
    assert_eq!(after.image_state, ImageState::Normal as i32);
    assert_eq!(after.content_digest, first.content_digest);
    // The interrupted creation completes after the restart.
    let second = wait_image_state(&mut gz, &second, ImageState::Normal).await;
    assert_eq!(second.lineage.unwrap().parent_image_id, tencentos.image_id);
    // Every acknowledged instance exists and runs, with its bytes.
    let all = gz
        .describe_instances(DescribeInstancesRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.total_count, 7);
    assert!(all
        .instance_set
        .iter()
        .all(|i| i.instance_state == InstanceState::Running as i32));
    assert_eq!(
        read(&mut gz, &instances[0], 7 << 20, data.len() as u64).await,
        data
    );
    assert_eq!(
        read(&mut gz, &instances[1], 3 << 20, tail.len() as u64).await,
        tail
    );
    assert_eq!(
        read(&mut gz, &launched[4], 7 << 20, data.len() as u64).await,
        data
    );
    // The images' chunks are intact: launching from the second and reading works.
    let from_second = run(&mut gz, &second.image_id, 1).await;
    assert_eq!(
        read(&mut gz, &from_second[0], 3 << 20, tail.len() as u64).await,
        tail
    );
    // The first image exports the same bytes as before the crash, with the data in them.
    let (size, pieces) = export(&mut gz, &first.image_id).await;
    assert_eq!(size, first_size);
    assert!(pieces == first_bytes, "the export changed across the crash");
    let mut disk = vec![0u8; (12 << 20) as usize];
    for (offset, piece) in &pieces {
        let offset = *offset as usize;
        if offset < disk.len() {
            let end = (offset + piece.len()).min(disk.len());
            disk[offset..end].copy_from_slice(&piece[..end - offset]);
        }
    }
    assert!(
        disk[7 << 20..] == data[..],
        "the export holds the data written"
    );
}
