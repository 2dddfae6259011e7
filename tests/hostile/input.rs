//! Hostile input and output: text that would drive the receiver's terminal, names that show
//! nothing or display reversed, filter values that silently match nothing, bodies that are not
//! protobuf, page tokens that are edited or wrap around, and calls to services a server does
//! not serve. Every refusal is `INVALID_ARGUMENT` (or `UNIMPLEMENTED`) with an `ErrorInfo`.

use crate::common::raw::RawCodec;
use crate::common::*;
use imagefleet_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use imagefleet_proto::catalog::v1::{CreateAccountRequest, DescribeRegionsRequest};
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::auth::{self, Credentials};
use imagefleet_rpc::client::{region_scope, signed_channel, CATALOG_SCOPE, SHARING_SCOPE};
use imagefleet_rpc::cluster::{AccountEntry, ClusterFile, RegionEndpoint, ServiceEndpoint};
use prost::Message;
use std::path::{Path, PathBuf};
use std::process::Command;
use tonic::transport::Channel;
use tonic::Code;

const GZ: &str = "ap-guangzhou";

/// What an image's owner would write to take over a receiver's terminal: set the window title
/// (OSC 0 ... BEL), clear the screen (CSI 2J), then a right-to-left override.
const TERMINAL_ATTACK: &str = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\u{202e}txt.exe";

/// The same text as SQL (for writing it into a store as data from before the checks).
const TERMINAL_ATTACK_SQL: &str =
    "'ok' || char(27) || ']0;pwned' || char(7) || char(27) || '[2J' || char(8238) || 'txt.exe'";

/// Byte sequences that must never reach a terminal from `imagectl`: ESC, BEL, DEL, the UTF-8
/// of the C1 CSI (U+009B) and of the bidi controls U+202A..U+202E and U+2066..U+2069.
fn raw_controls(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}')
        })
        .map(|c| format!("U+{:04X}", c as u32))
        .collect()
}

#[track_caller]
fn assert_no_raw_controls(what: &str, bytes: &[u8]) {
    let found = raw_controls(bytes);
    assert!(
        found.is_empty(),
        "{what} printed raw {found:?}: {:?}",
        String::from_utf8_lossy(bytes)
    );
}

/// A cluster file for `imagectl`, naming the cluster's services and accounts.
fn cluster_file(cluster: &Cluster) -> PathBuf {
    let file = ClusterFile {
        catalog: ServiceEndpoint {
            endpoint: cluster.catalog.url(),
            metrics: String::new(),
        },
        sharing: ServiceEndpoint {
            endpoint: cluster.sharing.url(),
            metrics: String::new(),
        },
        regions: cluster
            .regions
            .keys()
            .map(|region| RegionEndpoint {
                region: region.clone(),
                endpoint: cluster.region_url(region),
                metrics: String::new(),
            })
            .collect(),
        accounts: cluster.accounts.clone(),
        redis_url: String::new(),
        service_key_file: String::new(),
        ..Default::default()
    };
    let path = cluster.dir.path().join("cluster.json");
    file.store(&path).expect("cluster file written");
    path
}

fn imagectl(cluster_file: &Path, account: &AccountEntry, args: &[&str]) -> std::process::Output {
    Command::new(IMAGECTL)
        .arg("--cluster")
        .arg(cluster_file)
        .args(["--account", &account.account_id])
        .args(args)
        .output()
        .expect("imagectl runs")
}

/// Asserts `result` is `INVALID_ARGUMENT` naming `field` with a reason among `reasons`.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    field: &str,
    reasons: &[&str],
) {
    let status = match result {
        Ok(v) => panic!("{what}: expected INVALID_ARGUMENT naming {field}, got Ok({v:?})"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
    assert_eq!(
        imagefleet_proto::error::field(&status).as_deref(),
        Some(field),
        "{what}: {status:?}"
    );
    let why = reason(&status);
    assert!(
        reasons.contains(&why.as_str()),
        "{what}: reason {why:?} is not one of {reasons:?}: {status:?}"
    );
}

const TEXT_REASONS: &[&str] = &[
    "InvalidParameterValue.InvalidCharacters",
    "InvalidParameterValue.Blank",
];

/// An own NORMAL image of `who`, made from an instance of a public image.
async fn own_image(cluster: &Cluster, who: usize, name: &str) -> (String, String) {
    let mut region = cluster.region(GZ, who);
    let public = public_image(&mut region, "Ubuntu").await;
    let instance = run(&mut region, &public.image_id, 1).await.remove(0);
    let image_id = region
        .create_image(CreateImageRequest {
            instance_id: instance.clone(),
            image_name: name.into(),
            image_description: "plain".into(),
        })
        .await
        .expect("create image")
        .into_inner()
        .image_id;
    wait_image_state(&mut region, &image_id, ImageState::Normal).await;
    (image_id, instance)
}

/// An owner's image description holding terminal escape sequences is shared with another
/// account; the receiver's `imagectl images describe` and `images list` (table and JSON) print
/// it inert. The text is put in the store directly while the region is stopped, as data kept
/// from before descriptions were checked (the store is the region process's own while it
/// runs); setting it through the API is refused with the field named.
#[tokio::test]
async fn escape_sequences_in_a_shared_image_never_reach_the_receivers_terminal() {
    let mut cluster = Cluster::start(&[GZ]).await;
    let (owner, receiver) = (cluster.accounts[0].clone(), cluster.accounts[1].clone());
    let (image_id, instance) = own_image(&cluster, 0, "shared-with-bob").await;
    let mut alice = cluster.region(GZ, 0);
    alice
        .modify_image_share_permission(ModifyImageSharePermissionRequest {
            image_id: image_id.clone(),
            account_ids: vec![receiver.account_id.clone()],
            permission: SharePermission::Share as i32,
        })
        .await
        .expect("share");

    // The hostile text, stored as if from before the checks, and the region started on it.
    cluster.kill9_region(GZ);
    let db = cluster.region_dir(GZ).join("metadata.db");
    let sql = format!(
        "UPDATE images SET description = {TERMINAL_ATTACK_SQL}, \
         name = 'x' || char(27) || '[2J' || char(10) || 'img-fake0001' WHERE image_id = '{image_id}';"
    );
    let updated = Command::new("sqlite3")
        .args(["-cmd", ".timeout 10000"])
        .arg(&db)
        .arg(&sql)
        .output()
        .expect("sqlite3 runs (apt-get install sqlite3)");
    assert!(
        updated.status.success(),
        "{}",
        String::from_utf8_lossy(&updated.stderr)
    );
    cluster.restart_region(GZ).await;
    let seen = image(&mut cluster.region(GZ, 1), &image_id).await;
    assert_eq!(
        seen.image_description, TERMINAL_ATTACK,
        "the store holds it"
    );

    let file = cluster_file(&cluster);
    for args in [
        vec!["images", "describe", "--region", GZ, "--image", &image_id],
        vec!["images", "list", "--region", GZ, "--all"],
        vec![
            "images", "describe", "--region", GZ, "--image", &image_id, "--output", "json",
        ],
        vec![
            "images", "list", "--region", GZ, "--all", "--output", "json",
        ],
    ] {
        let out = imagectl(&file, &receiver, &args);
        assert!(
            out.status.success(),
            "imagectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_no_raw_controls(&format!("imagectl {args:?} (stdout)"), &out.stdout);
        assert_no_raw_controls(&format!("imagectl {args:?} (stderr)"), &out.stderr);
        let printed = String::from_utf8_lossy(&out.stdout);
        if args.contains(&"json") {
            // Still the same text to a program reading the JSON.
            let value: serde_json::Value = serde_json::from_str(&printed).expect("one document");
            let images = value["imageSet"].as_array().expect("imageSet");
            let shown = images
                .iter()
                .find(|i| i["imageId"] == image_id.as_str())
                .expect("the shared image is listed");
            assert_eq!(shown["imageDescription"], TERMINAL_ATTACK);
        } else {
            assert!(
                printed.contains("\\u{1b}"),
                "escaped, not dropped: {printed}"
            );
            // The new line in the name did not start a fake row.
            assert!(
                !printed.lines().any(|l| l.starts_with("img-fake0001")),
                "{printed}"
            );
        }
    }

    // Through the API, such text is refused, naming the field, whoever asks.
    assert_invalid(
        "ModifyImageAttribute description",
        alice
            .modify_image_attribute(ModifyImageAttributeRequest {
                image_id: image_id.clone(),
                image_description: Some(TERMINAL_ATTACK.into()),
                ..Default::default()
            })
            .await,
        "image_description",
        TEXT_REASONS,
    );
    assert_invalid(
        "CreateImage description",
        alice
            .create_image(CreateImageRequest {
                instance_id: instance,
                image_name: "another".into(),
                image_description: TERMINAL_ATTACK.into(),
            })
            .await,
        "image_description",
        TEXT_REASONS,
    );

    // imagectl's own errors echo what they were given; they print it inert too.
    let hostile_account = AccountEntry {
        account_id: "\u{1b}]0;pwned\u{7}\u{1b}[2J".into(),
        ..owner.clone()
    };
    let out = imagectl(&file, &hostile_account, &["images", "list", "--region", GZ]);
    assert!(!out.status.success());
    assert_no_raw_controls("imagectl with a hostile --account (stderr)", &out.stderr);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("\\u{1b}"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Names of only spaces, a zero-width space, or holding a bidi override or a control character
/// are refused, naming the field, in every call that takes free text: image names and
/// descriptions, instance names, the names of copies, and account names at the catalog.
#[tokio::test]
async fn blank_invisible_and_bidi_names_are_refused_with_the_field() {
    let cluster = Cluster::start(&[GZ]).await;
    let (image_id, instance) = own_image(&cluster, 0, "named").await;
    let mut alice = cluster.region(GZ, 0);
    let public = public_image(&mut alice, "Ubuntu").await;
    let hostile = [
        "   ",
        "\u{200B}",
        "\u{3000}\u{FEFF}",
        "evil\u{202E}gpj.exe",
        "\u{2066}isolated\u{2069}",
        "tab\there",
        "del\u{7f}",
        "c1\u{9b}2J",
    ];
    for text in hostile {
        assert_invalid(
            &format!("CreateImage name {text:?}"),
            alice
                .create_image(CreateImageRequest {
                    instance_id: instance.clone(),
                    image_name: text.into(),
                    image_description: String::new(),
                })
                .await,
            "image_name",
            TEXT_REASONS,
        );
        assert_invalid(
            &format!("ModifyImageAttribute name {text:?}"),
            alice
                .modify_image_attribute(ModifyImageAttributeRequest {
                    image_id: image_id.clone(),
                    image_name: Some(text.into()),
                    ..Default::default()
                })
                .await,
            "image_name",
            TEXT_REASONS,
        );
        assert_invalid(
            &format!("ModifyImageAttribute description {text:?}"),
            alice
                .modify_image_attribute(ModifyImageAttributeRequest {
                    image_id: image_id.clone(),
                    image_description: Some(text.into()),
                    ..Default::default()
                })
                .await,
            "image_description",
            TEXT_REASONS,
        );
        assert_invalid(
            &format!("RunInstances name {text:?}"),
            alice
                .run_instances(RunInstancesRequest {
                    image_id: public.image_id.clone(),
                    instance_type: "S5.MEDIUM4".into(),
                    instance_name: text.into(),
                    ..Default::default()
                })
                .await,
            "instance_name",
            TEXT_REASONS,
        );
        assert_invalid(
            &format!("SyncImages name {text:?}"),
            alice
                .sync_images(SyncImagesRequest {
                    image_ids: vec![image_id.clone()],
                    destination_regions: vec!["ap-shanghai".into()],
                    image_name: text.into(),
                    dry_run: true,
                    ..Default::default()
                })
                .await,
            "image_name",
            TEXT_REASONS,
        );
        assert_invalid(
            &format!("CreateAccount name {text:?}"),
            cluster
                .catalog_internal()
                .create_account(CreateAccountRequest {
                    account_id: String::new(),
                    name: text.into(),
                })
                .await,
            "name",
            TEXT_REASONS,
        );
    }
    // Nothing was changed or made by the refused calls.
    let after = image(&mut alice, &image_id).await;
    assert_eq!(
        (after.image_name.as_str(), after.image_description.as_str()),
        ("named", "plain")
    );
    let instances = alice
        .describe_instances(DescribeInstancesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(instances.total_count, 1, "{:?}", instances.instance_set);
    // Ordinary text, including non-Latin scripts, emoji and inner spaces, still passes.
    alice
        .modify_image_attribute(ModifyImageAttributeRequest {
            image_id: image_id.clone(),
            image_name: Some("镜像 web-01 ☕".into()),
            image_description: Some("  Ubuntu 22.04 with nginx  ".into()),
            ..Default::default()
        })
        .await
        .expect("ordinary text is accepted");
}

fn filter(name: &str, value: &str) -> Filter {
    Filter {
        name: name.into(),
        values: vec![value.into()],
    }
}

/// A filter value no image or instance can have is a mistake, not an empty result.
#[tokio::test]
async fn unknown_filter_values_are_refused() {
    let cluster = Cluster::start(&[GZ]).await;
    let mut alice = cluster.region(GZ, 0);
    for (name, value) in [
        ("image-state", "BOGUS"),
        ("image-state", "normal"),
        ("image-type", "NOPE"),
        ("image-id", "not-an-id"),
        ("image-name", "\u{1b}[2J"),
        ("platform", "\u{202E}utnubU"),
    ] {
        let refused = alice
            .describe_images(DescribeImagesRequest {
                filters: vec![filter(name, value)],
                ..Default::default()
            })
            .await;
        let status = refused.expect_err(&format!("{name}={value:?} refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            reason(&status).starts_with("InvalidFilterValue"),
            "{name}={value:?}: {status:?}"
        );
        assert_eq!(
            imagefleet_proto::error::field(&status).as_deref(),
            Some("filters")
        );
    }
    for (name, value) in [
        ("instance-state", "BOGUS"),
        ("instance-id", "ins-"),
        ("image-id", "img-TOOLONG123"),
        ("instance-name", "\u{200F}"),
    ] {
        let status = alice
            .describe_instances(DescribeInstancesRequest {
                filters: vec![filter(name, value)],
                ..Default::default()
            })
            .await
            .expect_err(&format!("{name}={value:?} refused"));
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            reason(&status).starts_with("InvalidFilterValue"),
            "{name}={value:?}: {status:?}"
        );
    }
    // Unknown filter names stay refused; known values still filter.
    assert_refused(
        alice
            .describe_images(DescribeImagesRequest {
                filters: vec![filter("image-colour", "blue")],
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "InvalidFilter",
    );
    let public = alice
        .describe_images(DescribeImagesRequest {
            filters: vec![
                filter("image-type", "PUBLIC_IMAGE"),
                filter("image-state", "NORMAL"),
            ],
            ..Default::default()
        })
        .await
        .expect("known values filter")
        .into_inner();
    assert!(public.total_count > 0);
}

/// A unary call of `path` with `body` as the message bytes, signed by `credentials` for `scope`.
async fn raw_unary(
    url: &str,
    path: &str,
    scope: &str,
    credentials: &Credentials,
    body: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body));
    let mut headers = http::HeaderMap::new();
    auth::sign_headers(
        &mut headers,
        credentials,
        path,
        scope,
        &digest,
        imagefleet_rpc::time::unix_now(),
        &auth::new_nonce(),
    );
    let mut request = tonic::Request::new(body);
    *request.metadata_mut() = tonic::metadata::MetadataMap::from_headers(headers);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    grpc.unary(request, path.parse().unwrap(), RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

fn account_credentials(account: &AccountEntry) -> Credentials {
    Credentials {
        secret_id: account.secret_id.clone(),
        secret_key: account.secret_key.clone(),
    }
}

/// A body that is not protobuf (a varint that never ends, a string field that is not UTF-8, a
/// field cut short) is the caller's mistake: `INVALID_ARGUMENT` with a reason, on every service.
#[tokio::test]
async fn malformed_bodies_are_invalid_argument_with_a_reason() {
    let cluster = Cluster::start(&[GZ]).await;
    let alice = account_credentials(&cluster.accounts[0]);
    let service = cluster.service_credentials();
    let bodies: [(&str, Vec<u8>); 3] = [
        // Field 1, length-delimited, whose length varint never ends.
        (
            "bad varint",
            vec![
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
        ),
        // Field 1 (a string) holding bytes that are not UTF-8.
        ("non-UTF-8 string", vec![0x0a, 0x04, 0xff, 0xfe, 0xc0, 0x80]),
        // Field 1 announcing 100 bytes, carrying 2.
        ("truncated field", vec![0x0a, 0x64, b'i', b'm']),
    ];
    let region_url = cluster.region_url(GZ);
    let catalog_url = cluster.catalog.url();
    let sharing_url = cluster.sharing.url();
    let targets = [
        (
            region_url.as_str(),
            "/imagefleet.region.v1.RegionService/DescribeImages",
            region_scope(GZ),
            &alice,
        ),
        (
            region_url.as_str(),
            "/imagefleet.region.v1.RegionService/CreateImage",
            region_scope(GZ),
            &alice,
        ),
        (
            catalog_url.as_str(),
            "/imagefleet.catalog.v1.CatalogInternalService/GetAccount",
            CATALOG_SCOPE.to_string(),
            &service,
        ),
        (
            sharing_url.as_str(),
            "/imagefleet.sharing.v1.SharingInternalService/GetImageOwner",
            SHARING_SCOPE.to_string(),
            &service,
        ),
    ];
    for (url, path, scope, credentials) in &targets {
        for (what, body) in &bodies {
            let status = raw_unary(url, path, scope, credentials, body.clone())
                .await
                .expect_err(&format!("{path} with a {what} body is refused"));
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{path} {what}: {status:?}"
            );
            assert!(
                !reason(&status).is_empty(),
                "{path} {what}: no ErrorInfo reason: {status:?}"
            );
        }
    }
    // A well-formed body still works through the same raw path.
    let ok = DescribeImagesRequest::default().encode_to_vec();
    raw_unary(
        &region_url,
        "/imagefleet.region.v1.RegionService/DescribeImages",
        &region_scope(GZ),
        &alice,
        ok,
    )
    .await
    .expect("a well-formed body is answered");
}

/// Page tokens are the service's own: an edited token, a token of another list and the old
/// plain `offset:N` form with an offset that would wrap are refused; real tokens still page.
#[tokio::test]
async fn edited_and_huge_page_tokens_are_refused() {
    let cluster = Cluster::start(&[GZ]).await;
    let mut alice = cluster.region(GZ, 0);
    let public = public_image(&mut alice, "Ubuntu").await;
    run(&mut alice, &public.image_id, 3).await;
    let first = alice
        .describe_instances(DescribeInstancesRequest {
            limit: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.total_count, 3);
    let token = first.next_page_token.clone();
    assert!(!token.is_empty());

    // Following the tokens gives every instance once.
    let mut seen = vec![first.instance_set[0].instance_id.clone()];
    let mut next = token.clone();
    while !next.is_empty() {
        let page = alice
            .describe_instances(DescribeInstancesRequest {
                limit: 1,
                page_token: next.clone(),
                ..Default::default()
            })
            .await
            .expect("a token the service issued")
            .into_inner();
        seen.extend(page.instance_set.into_iter().map(|i| i.instance_id));
        next = page.next_page_token;
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);

    let edited = {
        // Change one character, keeping the token hex.
        let mut chars: Vec<char> = token.chars().collect();
        let i = chars.len() / 2;
        chars[i] = if chars[i] == '0' { '1' } else { '0' };
        chars.into_iter().collect::<String>()
    };
    let wraps = hex::encode("offset:18446744073709551610");
    let near_max = hex::encode(format!("offset:{}", u64::MAX - 1));
    let huge = "f".repeat(4096);
    for (what, bad) in [
        ("an edited token", edited.as_str()),
        ("an offset that wraps", wraps.as_str()),
        ("an offset near u64::MAX", near_max.as_str()),
        ("4 KiB of hex", huge.as_str()),
        ("not hex", "\u{1b}[2J"),
    ] {
        for (list, result) in [
            (
                "DescribeInstances",
                alice
                    .describe_instances(DescribeInstancesRequest {
                        limit: 1,
                        page_token: bad.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
            (
                "DescribeImages",
                alice
                    .describe_images(DescribeImagesRequest {
                        page_token: bad.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|_| ()),
            ),
        ] {
            let status = result.expect_err(&format!("{list} with {what} is refused"));
            assert_eq!(
                (status.code(), reason(&status).as_str()),
                (Code::InvalidArgument, "InvalidParameterValue.PageToken"),
                "{list} with {what}: {status:?}"
            );
        }
    }
    // A token of the instance list is not one of the image list.
    assert_refused(
        alice
            .describe_images(DescribeImagesRequest {
                page_token: token,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "InvalidParameterValue.PageToken",
    );
    // The region is unharmed.
    alice
        .describe_instances(DescribeInstancesRequest::default())
        .await
        .expect("still answering");
}

/// `grpc.reflection.v1` messages, enough to list services.
#[derive(Clone, PartialEq, Message)]
struct ReflectionRequest {
    #[prost(string, tag = "1")]
    host: String,
    /// `list_services` (a member of the request oneof).
    #[prost(string, tag = "7")]
    list_services: String,
}

#[derive(Clone, PartialEq, Message)]
struct ReflectionResponse {
    #[prost(message, optional, tag = "6")]
    list_services_response: Option<ListServiceResponse>,
}

#[derive(Clone, PartialEq, Message)]
struct ListServiceResponse {
    #[prost(message, repeated, tag = "1")]
    service: Vec<ServiceResponse>,
}

#[derive(Clone, PartialEq, Message)]
struct ServiceResponse {
    #[prost(string, tag = "1")]
    name: String,
}

/// The services a server's reflection lists.
async fn reflected_services(url: &str) -> Vec<String> {
    let channel = Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .expect("connects");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let request = ReflectionRequest {
        host: String::new(),
        list_services: "*".into(),
    }
    .encode_to_vec();
    let mut responses = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(vec![request])),
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
                .parse()
                .unwrap(),
            RawCodec,
        )
        .await
        .expect("reflection answers")
        .into_inner();
    let bytes = responses
        .message()
        .await
        .expect("a response")
        .expect("one message");
    let mut names: Vec<String> = ReflectionResponse::decode(bytes.as_slice())
        .expect("a reflection response")
        .list_services_response
        .expect("a service list")
        .service
        .into_iter()
        .map(|s| s.name)
        .filter(|name| !name.starts_with("grpc."))
        .collect();
    names.sort();
    names
}

/// Each server's reflection lists what it serves, and only that; a call to a service it does
/// not serve is `UNIMPLEMENTED` with a reason naming the service.
#[tokio::test]
async fn reflection_lists_only_what_a_server_serves() {
    let cluster = Cluster::start(&[GZ]).await;
    assert_eq!(
        reflected_services(&cluster.region_url(GZ)).await,
        [
            "imagefleet.region.v1.RegionInternalService",
            "imagefleet.region.v1.RegionService"
        ]
    );
    assert_eq!(
        reflected_services(&cluster.catalog.url()).await,
        [
            "imagefleet.billing.v1.BillingInternalService",
            "imagefleet.billing.v1.BillingService",
            "imagefleet.catalog.v1.CatalogInternalService",
            "imagefleet.catalog.v1.CatalogService"
        ]
    );
    assert_eq!(
        reflected_services(&cluster.sharing.url()).await,
        ["imagefleet.sharing.v1.SharingInternalService"]
    );

    // The catalog's account-facing service, asked of a region, signed for the region.
    let account = &cluster.accounts[0];
    let mut misdirected = CatalogServiceClient::new(
        signed_channel(
            &cluster.region_url(GZ),
            account_credentials(account),
            &region_scope(GZ),
        )
        .unwrap(),
    );
    let status = misdirected
        .describe_regions(DescribeRegionsRequest {})
        .await
        .expect_err("a region does not serve the catalog");
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    assert_eq!(
        reason(&status),
        "UnsupportedOperation.UnknownService",
        "{status:?}"
    );
    assert_eq!(
        error_metadata(&status).get("service").map(String::as_str),
        Some("imagefleet.catalog.v1.CatalogService")
    );
}
