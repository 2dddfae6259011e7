//! The metadata store on its own: admission of batches (all or none, dry runs keep nothing,
//! request keys make retries idempotent), listings paged in SQL, purging, and migration of a
//! store written before the schema was versioned (with the lineage chains and root kinds it
//! gains, and the snapshot bytes first reported after it).

use imagefleet_proto::billing::v1::usage_event::Usage;
use imagefleet_region::meta::{Limits, NewContent, NewImage, Store};
use imagefleet_region::model::{
    CopyTask, ImageRow, ImageSource, ImageState, InstanceRow, InstanceState, RootKind,
};

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("metadata.db")).expect("store opens");
    (dir, store)
}

const OWNER: &str = "100000000001";

fn limits(quota: u32) -> Limits<'static> {
    Limits {
        image_quota: quota,
        region: "ap-shanghai",
        instance_quota: u32::MAX,
        storage_bytes_quota: u64::MAX,
    }
}

fn copy(name: &str, key: &str) -> NewImage {
    let mut row = ImageRow::new_custom(OWNER, name, ImageSource::Sync, ImageState::Syncing);
    row.virtual_size = 1 << 30;
    NewImage {
        row,
        content: NewContent::Copy {
            task: Box::new(CopyTask::new(
                key,
                "ap-guangzhou",
                "img-aaaaaaaa",
                "snap-aaaaaaaa",
                "sha256:00",
                i64::MAX,
            )),
        },
        refusal_context: Some(("img-aaaaaaaa".into(), "ap-shanghai".into())),
    }
}

#[test]
fn a_batch_is_admitted_whole_or_not_at_all() {
    let (_dir, store) = store();
    store
        .admit(OWNER, &[copy("first", "k1")], limits(3), false)
        .expect("one fits");
    let err = store
        .admit(
            OWNER,
            &[copy("a", "k2"), copy("b", "k3"), copy("c", "k4")],
            limits(3),
            false,
        )
        .expect_err("three more do not fit in a quota of 3 with 1 used");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        imagefleet_proto::error::reason(&status).as_deref(),
        Some("ImageQuotaLimitExceeded")
    );
    let meta = imagefleet_proto::error::metadata(&status);
    assert_eq!(meta.get("region").map(String::as_str), Some("ap-shanghai"));
    assert_eq!(store.custom_image_count(OWNER).expect("count"), 1);

    let err = store
        .admit(
            OWNER,
            &[copy("same", "k5"), copy("same", "k6")],
            limits(10),
            false,
        )
        .expect_err("two new images with one name");
    assert_eq!(
        imagefleet_proto::error::reason(&tonic::Status::from(err)).as_deref(),
        Some("InvalidImageName.Duplicate")
    );
    assert_eq!(store.custom_image_count(OWNER).expect("count"), 1);
}

#[test]
fn a_dry_run_checks_the_same_and_keeps_nothing() {
    let (_dir, store) = store();
    let admitted = store
        .admit(OWNER, &[copy("x", "k1"), copy("y", "k2")], limits(2), true)
        .expect("fits");
    assert_eq!(admitted.len(), 2);
    assert_eq!(store.custom_image_count(OWNER).expect("count"), 0);
    assert!(store
        .copy_task(&admitted[0].image_id)
        .expect("task")
        .is_none());
    let dry = store
        .admit(
            OWNER,
            &[copy("x", "k1"), copy("y", "k2"), copy("z", "k3")],
            limits(2),
            true,
        )
        .expect_err("over quota");
    let real = store
        .admit(
            OWNER,
            &[copy("x", "k1"), copy("y", "k2"), copy("z", "k3")],
            limits(2),
            false,
        )
        .expect_err("over quota");
    assert_eq!(
        tonic::Status::from(dry).code(),
        tonic::Status::from(real).code()
    );
    assert_eq!(store.custom_image_count(OWNER).expect("count"), 0);
}

#[test]
fn a_request_key_admits_its_copy_once() {
    let (_dir, store) = store();
    let first = store
        .admit(OWNER, &[copy("once", "same-key")], limits(5), false)
        .expect("admitted");
    let again = store
        .admit(OWNER, &[copy("once", "same-key")], limits(5), false)
        .expect("a retry is not a duplicate");
    assert_eq!(first[0].image_id, again[0].image_id);
    assert_eq!(store.custom_image_count(OWNER).expect("count"), 1);
    let image = store
        .image(&first[0].image_id)
        .expect("read")
        .expect("there");
    assert_eq!(image.state, ImageState::Syncing);
    assert_eq!(
        image.content_digest, "",
        "a copy's digest is its own, computed at the end"
    );
}

fn instance(owner: &str, n: usize, image_id: &str) -> InstanceRow {
    InstanceRow {
        instance_id: format!("ins-{n:08}"),
        owner: owner.to_string(),
        name: format!("vm-{n}"),
        instance_type: "S5.MEDIUM4".into(),
        cpu: 2,
        memory_gib: 4,
        image_id: image_id.to_string(),
        base_snapshot_id: None,
        disk_size: 50 << 30,
        state: InstanceState::Pending,
        created_at: 0,
        root_image_id: image_id.to_string(),
        root_paid: false,
        image_owner: String::new(),
        chain: Default::default(),
        root_kind: imagefleet_region::model::RootKind::Free,
    }
}

fn public_image(store: &Store) -> String {
    let mut row = ImageRow::new_custom("", "public", ImageSource::Official, ImageState::Normal);
    row.kind = imagefleet_region::model::ImageKind::Public;
    store
        .insert_public_image(&row, &Vec::new())
        .expect("insert");
    row.image_id
}

#[test]
fn listings_page_in_sql_and_terminated_instances_are_purged() {
    let (_dir, store) = store();
    let image = public_image(&store);
    let a: Vec<InstanceRow> = (0..30).map(|n| instance(OWNER, n, &image)).collect();
    let b: Vec<InstanceRow> = (100..1100)
        .map(|n| instance("100000000002", n, &image))
        .collect();
    store
        .insert_instances(&image, &a, limits(0))
        .expect("insert");
    store
        .insert_instances(&image, &b, limits(0))
        .expect("insert");
    let page = store
        .list_instances(&imagefleet_region::meta::InstanceQuery {
            owner: OWNER.into(),
            offset: 20,
            limit: 20,
            ..Default::default()
        })
        .expect("list");
    assert_eq!(page.total, 30);
    assert_eq!(page.instances.len(), 10);
    assert!(page.instances.iter().all(|i| i.owner == OWNER));
    assert_eq!(page.instances[0].instance_id, "ins-00000020");

    let ids: Vec<String> = a[..5].iter().map(|i| i.instance_id.clone()).collect();
    store.terminate(&ids, OWNER, 1_000).expect("terminate");
    let terminated = store
        .list_instances(&imagefleet_region::meta::InstanceQuery {
            owner: OWNER.into(),
            states: vec![InstanceState::Terminated],
            limit: 100,
            ..Default::default()
        })
        .expect("list");
    assert_eq!(terminated.total, 5);
    // Kept while within the retention, purged after.
    assert_eq!(store.purge_terminated(1_000, 1000).expect("purge"), 0);
    assert_eq!(store.purge_terminated(1_001, 2).expect("purge"), 2);
    assert_eq!(store.purge_terminated(1_001, 1000).expect("purge"), 3);
    let left = store
        .list_instances(&imagefleet_region::meta::InstanceQuery {
            owner: OWNER.into(),
            limit: 100,
            ..Default::default()
        })
        .expect("list");
    assert_eq!(left.total, 25);
}

/// A store written before the schema was versioned (`fixtures/v0`, see its README) opens,
/// migrates to the current version, and keeps every image, instance, copy task and chunk
/// reference.
#[test]
fn a_store_from_before_versioning_migrates_with_everything_intact() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v0");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures.join("expected.json")).expect("expected.json"),
    )
    .expect("json");
    for db in ["ap-guangzhou.db", "ap-shanghai.db"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("metadata.db");
        std::fs::copy(fixtures.join(db), &path).expect("copy fixture");
        let store = Store::open(&path).expect("the old store opens");
        assert_eq!(
            store.schema_version().expect("version"),
            imagefleet_region::meta::SCHEMA_VERSION,
            "{db}"
        );
        // Opening again is a no-op.
        drop(store);
        let store = Store::open(&path).expect("reopens");
        let want = &expected[db];
        let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_string();
        // Owners of the images in this store, for the lineage the migration fills in.
        let owner_of = |image_id: &str| {
            want["images"]
                .as_array()
                .expect("images")
                .iter()
                .find(|i| text(i, "image_id") == image_id)
                .map(|i| text(i, "owner"))
                .unwrap_or_default()
        };

        for image in want["images"].as_array().expect("images") {
            let id = text(image, "image_id");
            let got = store
                .image(&id)
                .expect("read")
                .unwrap_or_else(|| panic!("{db}: {id} lost"));
            assert_eq!(got.owner, text(image, "owner"), "{id}");
            assert_eq!(got.name, text(image, "name"), "{id}");
            assert_eq!(got.state.as_str(), text(image, "state"), "{id}");
            assert_eq!(got.source.as_str(), text(image, "source"), "{id}");
            assert_eq!(
                got.snapshot_id.unwrap_or_default(),
                text(image, "snapshot_id"),
                "{id}"
            );
            assert_eq!(got.content_digest, text(image, "content_digest"), "{id}");
            assert_eq!(got.parent_image_id, text(image, "parent_image_id"), "{id}");
            assert_eq!(got.root_image_id, text(image, "root_image_id"), "{id}");
            assert_eq!(
                got.root_paid,
                image["root_paid"].as_i64() == Some(1),
                "{id}"
            );
            let parent_owner = if got.source.as_str() == "SYNC" {
                got.owner.clone()
            } else {
                owner_of(&got.parent_image_id)
            };
            assert_eq!(got.parent_owner, parent_owner, "{id}");
            // The lineage chain: the image first, its root last, its parents between.
            let chain = &got.chain.0;
            assert_eq!(chain[0].image_id, id, "{db}: {id} {chain:?}");
            assert_eq!(chain[0].owner, got.owner, "{id}");
            assert_eq!(got.chain.root_image_id(), got.root_image_id, "{id}");
            if !got.parent_image_id.is_empty() {
                assert_eq!(chain[1].image_id, got.parent_image_id, "{id}");
                assert_eq!(chain[1].owner, got.parent_owner, "{id}");
            }
            if got.source.as_str() == "SYNC" {
                assert_eq!(chain[1].region, got.parent_region, "{id}");
            }
            let public = imagefleet_region::catalogue::PUBLIC_IMAGES
                .iter()
                .find(|d| imagefleet_region::seed::image_id(d) == got.root_image_id);
            match public {
                // Whatever the region: Windows is WINDOWS on the mainland too.
                Some(def) => assert_eq!(got.root_kind, def.root_kind(), "{id}"),
                None => assert_eq!(
                    got.root_kind,
                    RootKind::from_paid(got.root_paid, &got.platform),
                    "{id}"
                ),
            }
        }
        let windows = imagefleet_region::catalogue::PUBLIC_IMAGES
            .iter()
            .find(|d| d.is_windows())
            .expect("a Windows image");
        let windows = store
            .image(&imagefleet_region::seed::image_id(windows))
            .expect("read")
            .expect("seeded");
        assert_eq!(windows.root_kind, RootKind::Windows, "{db}");
        for instance in want["instances"].as_array().expect("instances") {
            let id = text(instance, "instance_id");
            let got = store
                .instance(&id)
                .expect("read")
                .unwrap_or_else(|| panic!("{db}: {id} lost"));
            assert_eq!(got.owner, text(instance, "owner"), "{id}");
            assert_eq!(got.state.as_str(), text(instance, "state"), "{id}");
            assert_eq!(got.image_id, text(instance, "image_id"), "{id}");
            assert_eq!(got.image_owner, owner_of(&got.image_id), "{id}");
            assert_eq!(got.chain.0[0].image_id, got.image_id, "{id}");
            let image = store.image(&got.image_id).expect("read").expect("image");
            assert_eq!(got.chain, image.chain, "{id}");
            assert_eq!(got.root_kind, image.root_kind, "{id}");
            assert_eq!(
                got.base_snapshot_id.unwrap_or_default(),
                text(instance, "base_snapshot_id"),
                "{id}"
            );
            assert_eq!(
                Some(got.disk_size as i64),
                instance["disk_size"].as_i64(),
                "{id}"
            );
        }
        // Each owner's instance count (kept beside the rows from this version on) is right.
        let mut per_owner: std::collections::BTreeMap<String, usize> = Default::default();
        for instance in want["instances"].as_array().expect("instances") {
            *per_owner.entry(text(instance, "owner")).or_default() += 1;
        }
        for (owner, count) in per_owner {
            let page = store
                .list_instances(&imagefleet_region::meta::InstanceQuery {
                    owner: owner.clone(),
                    limit: 100,
                    ..Default::default()
                })
                .expect("list");
            assert_eq!(page.total, count, "{db}: {owner}");
            assert_eq!(page.instances.len(), count, "{db}: {owner}");
        }
        for task in want["sync_tasks"].as_array().expect("tasks") {
            let id = text(task, "image_id");
            let got = store
                .copy_task(&id)
                .expect("read")
                .unwrap_or_else(|| panic!("{db}: task {id} lost"));
            assert_eq!(got.state.as_str(), text(task, "state"));
            assert_eq!(got.source_region, text(task, "source_region"));
            assert_eq!(got.source_image_id, text(task, "source_image_id"));
            assert_eq!(Some(got.chunks_total as i64), task["chunks_total"].as_i64());
            let image = store.image(&id).expect("read").expect("copy image");
            assert_eq!(
                got.expected_digest, image.content_digest,
                "a finished copy keeps its digest"
            );
        }
        // Snapshot manifests, entry for entry.
        let mut by_snapshot: std::collections::BTreeMap<String, Vec<(u64, String)>> =
            Default::default();
        for entry in want["snapshot_chunks"].as_array().expect("snapshot chunks") {
            by_snapshot
                .entry(entry[0].as_str().expect("key").to_string())
                .or_default()
                .push((
                    entry[1].as_u64().expect("idx"),
                    entry[2].as_str().expect("digest").to_string(),
                ));
        }
        assert!(!by_snapshot.is_empty());
        for (snapshot, mut entries) in by_snapshot {
            entries.sort();
            let got: Vec<(u64, String)> = store
                .snapshot_manifest(&snapshot)
                .expect("manifest")
                .into_iter()
                .map(|(i, d)| (i, d.to_hex()))
                .collect();
            assert_eq!(got, entries, "{db}: snapshot {snapshot}");
        }
        // Instance overrides, zeroed chunks included.
        for entry in want["instance_chunks"].as_array().expect("instance chunks") {
            let id = entry[0].as_str().expect("key");
            let instance = store.instance(id).expect("read").expect("instance");
            let got = store
                .instance_chunk(&instance, entry[1].as_u64().expect("idx"))
                .expect("chunk")
                .map(|d| d.to_hex());
            assert_eq!(
                got.as_deref(),
                entry[2].as_str(),
                "{db}: {id} chunk {}",
                entry[1]
            );
        }
        // Nothing is reported by the migration itself; the first reconciliation reports what
        // each account already holds, once.
        assert!(store.usage_outbox().expect("outbox").is_empty());
        store.reconcile_snapshot_bytes().expect("reconcile");
        let reported = store.usage_outbox().expect("outbox");
        let owners: std::collections::BTreeSet<String> = want["images"]
            .as_array()
            .expect("images")
            .iter()
            .map(|i| text(i, "owner"))
            .filter(|o| !o.is_empty())
            .collect();
        assert_eq!(reported.len(), owners.len(), "{db}: {reported:?}");
        for event in &reported {
            let held = store.snapshot_bytes(&event.account_id).expect("bytes");
            assert!(held > 0);
            assert_eq!(
                event.usage,
                Some(Usage::SnapshotBytesHeld(
                    imagefleet_proto::billing::v1::SnapshotBytesHeld { bytes: held }
                ))
            );
        }
        store.reconcile_snapshot_bytes().expect("reconcile");
        assert_eq!(store.usage_outbox().expect("outbox").len(), reported.len());
        let referenced = store.referenced().expect("referenced");
        let named: usize = want["snapshot_chunks"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        assert!(named > 0 && !referenced.is_empty());
    }
}

#[test]
fn instance_and_storage_quotas_are_checked_in_the_writing_transaction() {
    use imagefleet_chunkstore::{ChunkDigest, CHUNK_SIZE};
    let (_dir, store) = store();
    let image = public_image(&store);
    let chunk = CHUNK_SIZE as u64;
    let tight = Limits {
        instance_quota: 2,
        storage_bytes_quota: 3 * chunk,
        ..limits(10)
    };
    let vms: Vec<InstanceRow> = (0..3).map(|n| instance(OWNER, n, &image)).collect();
    let err = store
        .insert_instances(&image, &vms, tight)
        .expect_err("three instances do not fit in a quota of two");
    let status = tonic::Status::from(err);
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        imagefleet_proto::error::reason(&status).as_deref(),
        Some("LimitExceeded.InstanceQuota")
    );
    assert_eq!(store.usage(OWNER).expect("usage").instances, 0, "none kept");
    store
        .insert_instances(&image, &vms[..2], tight)
        .expect("two fit");
    let ids: Vec<String> = vms[..2].iter().map(|v| v.instance_id.clone()).collect();
    store
        .set_instances_state(&ids, InstanceState::Pending, InstanceState::Running)
        .expect("boot");

    let d = |n: u8| Some(ChunkDigest::of(&[n; 8]));
    let id = vms[0].instance_id.clone();
    store
        .write_instance_chunks(&id, OWNER, &[(0, d(1)), (1, d(2))], tight)
        .expect("two chunks");
    // Overwriting, zeroing and refilling chunks counts only what is added.
    store
        .write_instance_chunks(&id, OWNER, &[(0, d(3)), (1, None), (2, d(4))], tight)
        .expect("still two");
    assert_eq!(store.usage(OWNER).expect("usage").storage_bytes, 2 * chunk);
    let err = store
        .write_instance_chunks(&id, OWNER, &[(5, d(5)), (6, d(6))], tight)
        .expect_err("four chunks do not fit in three");
    assert_eq!(
        imagefleet_proto::error::reason(&tonic::Status::from(err)).as_deref(),
        Some("LimitExceeded.StorageQuota")
    );
    assert_eq!(store.usage(OWNER).expect("usage").storage_bytes, 2 * chunk);
    // Another account's usage is its own; a terminated instance holds nothing.
    assert_eq!(
        store.usage("100000000002").expect("usage"),
        Default::default()
    );
    store
        .terminate(std::slice::from_ref(&id), OWNER, 0)
        .expect("terminate");
    let usage = store.usage(OWNER).expect("usage");
    assert_eq!((usage.instances, usage.storage_bytes), (1, 0));
}

#[test]
fn the_generation_moves_with_every_commit_and_only_then() {
    let (_dir, store) = store();
    let start = store.generation();
    store.visible_images(OWNER).expect("listing");
    store.custom_image_count(OWNER).expect("count");
    assert_eq!(store.generation(), start, "reads leave it");
    store
        .admit(OWNER, &[copy("first", "k1")], limits(10), false)
        .expect("admitted");
    let after_admit = store.generation();
    assert!(after_admit > start, "a commit moves it");
    let id = store.visible_images(OWNER).expect("listing")[0]
        .image_id
        .clone();
    // A refused write (rolled back) leaves it; a rename moves it.
    store
        .admit(OWNER, &[copy("first", "k2")], limits(10), false)
        .expect_err("the name is taken");
    store
        .admit(OWNER, &[copy("second", "k3")], limits(10), true)
        .expect("a dry run");
    assert_eq!(store.generation(), after_admit, "nothing committed");
    store
        .modify_image(
            &id,
            OWNER,
            &imagefleet_region::meta::ImageChanges {
                name: Some("renamed".into()),
                ..Default::default()
            },
        )
        .expect("renamed");
    assert!(store.generation() > after_admit);
}
