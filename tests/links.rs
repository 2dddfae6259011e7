//! Emulated links between regions (docs/links.md), between region services running as
//! separate processes: a round trip delays a copy by its calls, a rate bounds a copy's
//! throughput, and a partition in the middle of a copy leaves it SYNCING until the link is up
//! again, when it completes with the right content.

mod common;

use common::*;
use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::client::{region_scope, signed_channel, SignedChannel};
use std::time::{Duration, Instant};

const GZ: &str = "ap-guangzhou";
const SH: &str = "ap-shanghai";
const MIB: usize = 1 << 20;

fn admin(cluster: &Cluster, region: &str) -> RegionInternalServiceClient<SignedChannel> {
    RegionInternalServiceClient::new(
        signed_channel(
            &cluster.region_url(region),
            cluster.service_credentials(),
            &region_scope(region),
        )
        .unwrap(),
    )
}

/// Sets links on both regions (each applies them to the connections it makes).
async fn set_links(cluster: &Cluster, links: &[&str]) {
    for region in [GZ, SH] {
        admin(cluster, region)
            .set_links(SetLinksRequest {
                links: links.iter().map(|l| l.to_string()).collect(),
            })
            .await
            .unwrap();
    }
}

/// An image in Guangzhou with `len` bytes of random data at offset 0.
async fn make_image(region: &mut Region, len: usize, name: &str) -> Image {
    let public = public_image(region, "Debian").await;
    let instance = run(region, &public.image_id, 1).await.remove(0);
    write(region, &instance, 0, &random_bytes(len)).await;
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance,
            image_name: name.into(),
            image_description: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .image_id;
    wait_image_state(region, &image_id, ImageState::Normal).await
}

/// Starts copying `image_id` from Guangzhou to Shanghai; the destination image's id.
async fn start_copy(gz: &mut Region, image_id: &str) -> String {
    let synced = gz
        .sync_images(SyncImagesRequest {
            image_ids: vec![image_id.into()],
            destination_regions: vec![SH.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .image_set;
    synced[0].image_id.clone()
}

/// Copies `source` to Shanghai; how long it took, checking the copy's content.
async fn timed_copy(gz: &mut Region, sh: &mut Region, source: &Image) -> Duration {
    let started = Instant::now();
    let copy = start_copy(gz, &source.image_id).await;
    let done = wait_copy_normal(sh, &copy).await;
    let took = started.elapsed();
    assert_eq!(done.content_digest, source.content_digest);
    took
}

#[tokio::test]
async fn a_round_trip_delays_every_call_of_a_copy() {
    let cluster = Cluster::start(&[GZ, SH]).await;
    let (mut gz, mut sh) = (cluster.region(GZ, 0), cluster.region(SH, 0));
    let first = make_image(&mut gz, MIB, "no-link").await;
    let second = make_image(&mut gz, MIB, "linked").await;

    let plain = timed_copy(&mut gz, &mut sh, &first).await;
    // Set while the copy's connections are open: they take the link from now on.
    set_links(&cluster, &["ap-guangzhou,ap-shanghai=rtt:200ms"]).await;
    let listed = admin(&cluster, GZ)
        .list_links(ListLinksRequest {})
        .await
        .unwrap()
        .into_inner()
        .links;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].from_region.as_str(), listed[0].to_region.as_str()),
        (GZ, SH)
    );
    let settings = listed[0].settings.clone().unwrap();
    assert_eq!(
        (settings.spec.as_str(), settings.rtt_ms),
        ("rtt:200ms", 200.0)
    );

    let linked = timed_copy(&mut gz, &mut sh, &second).await;
    // StartSync, GetImageManifest and FetchChunks follow one another, each a round trip at
    // least.
    assert!(
        linked >= Duration::from_millis(600),
        "a copy over a 200 ms link took {linked:?}"
    );
    assert!(
        linked > plain,
        "linked {linked:?}, without a link {plain:?}"
    );
}

#[tokio::test]
async fn a_rate_bounds_a_copy() {
    let cluster = Cluster::start_with(
        &[GZ, SH],
        &[
            (
                GZ,
                RegionOptions::env(&[("IMAGEFLEET_LINKS", "ap-guangzhou,ap-shanghai=rate:16mbit")]),
            ),
            (
                SH,
                RegionOptions::env(&[("IMAGEFLEET_LINKS", "ap-guangzhou,ap-shanghai=rate:16mbit")]),
            ),
        ],
    )
    .await;
    let (mut gz, mut sh) = (cluster.region(GZ, 0), cluster.region(SH, 0));
    let source = make_image(&mut gz, 8 * MIB, "paced").await;
    let took = timed_copy(&mut gz, &mut sh, &source).await;
    // 8 MiB at 16 Mbit/s: 4.2 s.
    assert!(
        took >= Duration::from_millis(3800),
        "8 MiB at 16 mbit took {took:?}"
    );
}

#[tokio::test]
async fn a_partition_mid_copy_waits_and_the_copy_completes_after() {
    let cluster = Cluster::start(&[GZ, SH]).await;
    let (mut gz, mut sh) = (cluster.region(GZ, 0), cluster.region(SH, 0));
    let source = make_image(&mut gz, 8 * MIB, "partitioned").await;
    set_links(&cluster, &["ap-guangzhou,ap-shanghai=rtt:20ms,rate:16mbit"]).await;
    let copy = start_copy(&mut gz, &source.image_id).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        image_of(&mut sh, &copy).await.image_state,
        ImageState::Syncing as i32
    );
    set_links(&cluster, &["ap-guangzhou,ap-shanghai=down"]).await;
    let listed = admin(&cluster, SH)
        .list_links(ListLinksRequest {})
        .await
        .unwrap()
        .into_inner()
        .links;
    assert!(listed[0].settings.as_ref().unwrap().down, "{listed:?}");
    let partitioned = Instant::now();
    while partitioned.elapsed() < Duration::from_secs(5) {
        let seen = image_of(&mut sh, &copy).await;
        assert_eq!(
            seen.image_state,
            ImageState::Syncing as i32,
            "partitioned, the copy is {:?} ({})",
            ImageState::try_from(seen.image_state),
            seen.state_reason
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set_links(&cluster, &["ap-guangzhou,ap-shanghai=up"]).await;
    let done = wait_copy_normal(&mut sh, &copy).await;
    assert_eq!(done.content_digest, source.content_digest);
    let (size, pieces) = export(&mut sh, &copy).await;
    let (source_size, source_pieces) = export(&mut gz, &source.image_id).await;
    assert_eq!(size, source_size);
    assert!(
        pieces == source_pieces,
        "the copy's bytes differ from the source's"
    );
}

async fn image_of(region: &mut Region, image_id: &str) -> Image {
    common::image(region, image_id).await
}
