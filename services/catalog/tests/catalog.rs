//! The catalog served in-process on 127.0.0.1:0 and called over gRPC with signed clients.

use imagefleet_catalog::{run, Catalog, CatalogConfig};
use imagefleet_proto::catalog::v1::catalog_internal_service_client::CatalogInternalServiceClient;
use imagefleet_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use imagefleet_proto::catalog::v1::*;
use imagefleet_proto::error;
use imagefleet_rpc::client::{signed_channel, SignedChannel, CATALOG_SCOPE};
use imagefleet_rpc::Credentials;
use std::path::Path;
use std::sync::Arc;
use tokio::sync::oneshot;
use tonic::Code;

const SERVICE_KEY: &str = "test-service-key";

/// A catalog served until dropped or stopped.
struct Served {
    url: String,
    catalog: Arc<Catalog>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Served {
    async fn start(dir: &Path) -> Served {
        let catalog = Catalog::open(CatalogConfig {
            data_dir: dir.to_path_buf(),
            service_key: SERVICE_KEY.to_string(),
            price_book: imagefleet_billing::PriceBook::shipped(),
            clock: imagefleet_rpc::clock::Clock::system(),
        })
        .expect("catalog opens");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(run(catalog.clone(), listener, async {
            let _ = stopped.await;
        }));
        Served {
            url,
            catalog,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// The operator (`svc-admin`).
    fn internal(&self) -> CatalogInternalServiceClient<SignedChannel> {
        self.internal_as(Credentials::service("admin", SERVICE_KEY))
    }

    /// A region (`svc-region-ap-guangzhou`): registers images, reads account keys.
    fn as_region(&self) -> CatalogInternalServiceClient<SignedChannel> {
        self.internal_as(Credentials::service("region-ap-guangzhou", SERVICE_KEY))
    }

    fn internal_as(&self, creds: Credentials) -> CatalogInternalServiceClient<SignedChannel> {
        CatalogInternalServiceClient::new(signed_channel(&self.url, creds, CATALOG_SCOPE).unwrap())
    }

    fn public_as(&self, creds: Credentials) -> CatalogServiceClient<SignedChannel> {
        CatalogServiceClient::new(signed_channel(&self.url, creds, CATALOG_SCOPE).unwrap())
    }
}

fn creds(account: &Account) -> Credentials {
    Credentials {
        secret_id: account.secret_id.clone(),
        secret_key: account.secret_key.clone(),
    }
}

fn reason(status: &tonic::Status) -> String {
    error::reason(status).unwrap_or_default()
}

fn field(status: &tonic::Status) -> String {
    error::field(status).unwrap_or_default()
}

async fn create(
    client: &mut CatalogInternalServiceClient<SignedChannel>,
    id: &str,
    name: &str,
) -> Result<Account, tonic::Status> {
    let response = client
        .create_account(CreateAccountRequest {
            account_id: id.to_string(),
            name: name.to_string(),
        })
        .await?;
    Ok(response.into_inner().account.expect("an account"))
}

fn record(image_id: &str, region: &str, owner: &str, image_type: &str) -> ImageRecord {
    ImageRecord {
        image_id: image_id.to_string(),
        region: region.to_string(),
        owner_account_id: owner.to_string(),
        image_type: image_type.to_string(),
        image_name: format!("name of {image_id}"),
        platform: "Ubuntu".to_string(),
        os_name: "Ubuntu Server 22.04 LTS 64bit".to_string(),
        image_source: "OFFICIAL".to_string(),
        ..Default::default()
    }
}

#[tokio::test]
async fn accounts_are_created_and_looked_up() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let mut internal = served.internal();

    let first = create(&mut internal, "", "alice").await.unwrap();
    assert_eq!(first.account_id, "100000000001");
    assert!(first.secret_id.starts_with("AKID"));
    assert_eq!(first.secret_id.len(), 36);
    assert!(first.secret_id[4..]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(first.secret_key.len(), 40);
    assert!(first.secret_key.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert!(first.created_time.ends_with('Z'));

    let chosen = create(&mut internal, "100000000005", "bob").await.unwrap();
    assert_eq!(chosen.account_id, "100000000005");
    assert_ne!(chosen.secret_id, first.secret_id);
    let next = create(&mut internal, "", "carol").await.unwrap();
    assert_eq!(next.account_id, "100000000006");

    let err = create(&mut internal, "100000000005", "again")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason(&err), "FailedOperation.AccountAlreadyExists");

    let err = create(&mut internal, "12345", "short").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field(&err), "account_id");

    let got = internal
        .get_account(GetAccountRequest {
            account_id: "100000000005".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .account
        .unwrap();
    assert_eq!(got.name, "bob");
    assert_eq!(got.secret_id, chosen.secret_id);
    assert!(
        got.secret_key.is_empty(),
        "GetAccount never returns the key"
    );

    let err = internal
        .get_account(GetAccountRequest {
            account_id: "100000000099".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "InvalidAccountId.NotFound");

    let mut region = served.as_region();
    let credential = region
        .get_account_credential(GetAccountCredentialRequest {
            secret_id: chosen.secret_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(credential.account_id, "100000000005");
    assert_eq!(credential.secret_key, chosen.secret_key);

    let err = region
        .get_account_credential(GetAccountCredentialRequest {
            secret_id: "AKIDnobodyhasthisone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "AuthFailure.SecretIdNotFound");

    let all = served.catalog.accounts().unwrap();
    let ids: Vec<_> = all.iter().map(|a| a.account_id.as_str()).collect();
    assert_eq!(ids, ["100000000001", "100000000005", "100000000006"]);
    assert_eq!(all[1].secret_key, chosen.secret_key);
    served.stop().await;
}

#[tokio::test]
async fn credential_kinds_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let account = create(&mut served.internal(), "", "alice").await.unwrap();

    // An account may call the account-facing service...
    let regions = served
        .public_as(creds(&account))
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(regions.total_count, 0);

    // ...but never the internal one.
    let err = served
        .internal_as(creds(&account))
        .get_account(GetAccountRequest {
            account_id: account.account_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Service credentials are refused on the account-facing service.
    let err = served
        .public_as(Credentials::service("admin", SERVICE_KEY))
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A wrong service key or a wrong account key does not authenticate.
    let err = served
        .internal_as(Credentials::service("admin", "not-the-key"))
        .list_regions(DescribeRegionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut forged = creds(&account);
    forged.secret_key = "x".repeat(40);
    let err = served
        .public_as(forged)
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    // Health is open and serving.
    let channel = tonic::transport::Endpoint::from_shared(served.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "imagefleet.catalog.v1.CatalogInternalService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    served.stop().await;
}

#[tokio::test]
async fn regions_register_and_are_described() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let mut internal = served.internal();
    let account = create(&mut internal, "", "alice").await.unwrap();

    for (region, endpoint) in [
        ("eu-frankfurt", "http://127.0.0.1:7203"),
        ("ap-guangzhou", "http://127.0.0.1:7299"),
        ("ap-guangzhou", "http://127.0.0.1:7201"),
    ] {
        let registered = internal
            .register_region(RegisterRegionRequest {
                region: region.into(),
                endpoint: endpoint.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .region
            .unwrap();
        assert_eq!(registered.endpoint, endpoint);
    }

    let described = served
        .public_as(creds(&account))
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.total_count, 2);
    let guangzhou = &described.region_set[0];
    assert_eq!(guangzhou.region, "ap-guangzhou");
    assert_eq!(guangzhou.region_name, "Guangzhou");
    assert_eq!(guangzhou.area, Area::Mainland as i32);
    assert_eq!(guangzhou.endpoint, "http://127.0.0.1:7201");
    let frankfurt = &described.region_set[1];
    assert_eq!(frankfurt.region, "eu-frankfurt");
    assert_eq!(frankfurt.area, Area::Overseas as i32);

    let listed = internal
        .list_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed, described);

    // Behind published ports: services get the endpoint on their network, clients the public one.
    internal
        .register_region(RegisterRegionRequest {
            region: "ap-guangzhou".into(),
            endpoint: "http://region-guangzhou:7110".into(),
            public_endpoint: "http://127.0.0.1:7110".into(),
        })
        .await
        .unwrap();
    let for_clients = served
        .public_as(creds(&account))
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(for_clients.region_set[0].endpoint, "http://127.0.0.1:7110");
    let for_services = internal
        .list_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        for_services.region_set[0].endpoint,
        "http://region-guangzhou:7110"
    );
    assert_eq!(
        for_services.region_set[0].public_endpoint,
        "http://127.0.0.1:7110"
    );

    let err = internal
        .register_region(RegisterRegionRequest {
            region: "moon-base".into(),
            endpoint: "http://127.0.0.1:1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "InvalidRegion.NotFound");
    assert_eq!(field(&err), "region");

    let err = internal
        .register_region(RegisterRegionRequest {
            region: "ap-shanghai".into(),
            endpoint: "127.0.0.1:7202".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(field(&err), "endpoint");
    assert_eq!(served.catalog.regions().unwrap().len(), 2);
    served.stop().await;
}

#[tokio::test]
async fn image_index_registers_looks_up_and_unregisters() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let mut internal = served.internal();
    let account = create(&mut internal, "", "alice").await.unwrap();
    // Images are registered by regions.
    let mut internal = served.as_region();

    let private = ImageRecord {
        parent_image_id: "img-pub00001".into(),
        parent_region: "ap-guangzhou".into(),
        ultimate_source_image_id: "img-pub00001".into(),
        ultimate_source_paid: true,
        image_source: "CREATE_IMAGE".into(),
        content_digest: "sha256:00ff".into(),
        ..record(
            "img-priv0001",
            "ap-guangzhou",
            &account.account_id,
            "PRIVATE_IMAGE",
        )
    };
    let mut records = vec![
        private.clone(),
        record("img-pub00001", "ap-shanghai", "", "PUBLIC_IMAGE"),
        record("img-pub00001", "ap-guangzhou", "", "PUBLIC_IMAGE"),
        record("img-pub00002", "ap-tokyo", "", "PUBLIC_IMAGE"),
    ];
    for r in &records {
        internal
            .register_image(RegisterImageRequest {
                image: Some(r.clone()),
            })
            .await
            .unwrap();
    }
    // Registering again replaces the record.
    records[0].image_name = "renamed".into();
    internal
        .register_image(RegisterImageRequest {
            image: Some(records[0].clone()),
        })
        .await
        .unwrap();

    let found = internal
        .lookup_image(LookupImageRequest {
            image_id: "img-priv0001".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(found, vec![records[0].clone()]);

    let found = internal
        .lookup_image(LookupImageRequest {
            image_id: "img-pub00001".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let regions: Vec<_> = found.iter().map(|r| r.region.as_str()).collect();
    assert_eq!(regions, ["ap-guangzhou", "ap-shanghai"]);

    let public = served
        .public_as(creds(&account))
        .describe_public_images(DescribePublicImagesRequest {})
        .await
        .unwrap()
        .into_inner()
        .image_set;
    assert_eq!(public.len(), 2);
    assert_eq!(public[0].image_id, "img-pub00001");
    assert_eq!(public[0].regions, ["ap-guangzhou", "ap-shanghai"]);
    assert_eq!(public[0].platform, "Ubuntu");
    assert_eq!(public[1].image_id, "img-pub00002");
    assert_eq!(public[1].regions, ["ap-tokyo"]);

    internal
        .unregister_image(UnregisterImageRequest {
            image_id: "img-priv0001".into(),
            region: "ap-guangzhou".into(),
        })
        .await
        .unwrap();
    let err = internal
        .lookup_image(LookupImageRequest {
            image_id: "img-priv0001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(reason(&err), "InvalidImageId.NotFound");
    // Unregistering what is gone is not an error (retries must succeed).
    internal
        .unregister_image(UnregisterImageRequest {
            image_id: "img-priv0001".into(),
            region: "ap-guangzhou".into(),
        })
        .await
        .unwrap();

    // Bad input names the field and changes nothing.
    let cases = [
        (
            record("img-BAD00001", "ap-guangzhou", "", "PUBLIC_IMAGE"),
            "image.image_id",
        ),
        (
            record("img-good0001", "moon-base", "", "PUBLIC_IMAGE"),
            "image.region",
        ),
        (
            record("img-good0001", "ap-guangzhou", "", "PRIVATE_IMAGE"),
            "image.owner_account_id",
        ),
        (
            record("img-good0001", "ap-guangzhou", "", "SHARED_IMAGE"),
            "image.image_type",
        ),
    ];
    for (bad, expected_field) in cases {
        let err = internal
            .register_image(RegisterImageRequest { image: Some(bad) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(field(&err), expected_field);
    }
    let err = internal
        .register_image(RegisterImageRequest { image: None })
        .await
        .unwrap_err();
    assert_eq!(field(&err), "image");
    let err = internal
        .lookup_image(LookupImageRequest {
            image_id: "img-good0001".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = internal
        .lookup_image(LookupImageRequest {
            image_id: "nonsense".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(reason(&err), "InvalidImageId.Malformed");
    served.stop().await;
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let mut internal = served.internal();
    let account = create(&mut internal, "", "alice").await.unwrap();
    internal
        .register_region(RegisterRegionRequest {
            region: "ap-singapore".into(),
            endpoint: "http://127.0.0.1:7205".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Images are registered by regions.
    let mut internal = served.as_region();
    internal
        .register_image(RegisterImageRequest {
            image: Some(record(
                "img-keep0001",
                "ap-singapore",
                &account.account_id,
                "PRIVATE_IMAGE",
            )),
        })
        .await
        .unwrap();
    served.stop().await;

    let served = Served::start(dir.path()).await;
    let mut internal = served.internal();
    // The account's credentials still authenticate, against the reopened store.
    let regions = served
        .public_as(creds(&account))
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(regions.region_set.len(), 1);
    assert_eq!(regions.region_set[0].endpoint, "http://127.0.0.1:7205");
    let records = internal
        .lookup_image(LookupImageRequest {
            image_id: "img-keep0001".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    assert_eq!(records[0].owner_account_id, account.account_id);
    // Ids keep counting from where they were.
    let next = create(&mut internal, "", "bob").await.unwrap();
    assert_eq!(next.account_id, "100000000002");
    served.stop().await;
}

#[tokio::test]
async fn accounts_file_is_imported_with_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path()).await;
    let existing = create(&mut served.internal(), "100000000007", "old name")
        .await
        .unwrap();
    let file = dir.path().join("accounts.json");
    let entries = serde_json::json!([
        {"account_id": "200000000001", "name": "dev", "secret_id": "AKIDdevdevdevdev",
         "secret_key": "devsecretkeydevsecretkey"},
        {"account_id": "100000000007", "name": "new name", "secret_id": existing.secret_id,
         "secret_key": "rotatedkeyrotatedkey"}
    ]);
    std::fs::write(&file, entries.to_string()).unwrap();
    assert_eq!(served.catalog.load_accounts_file(&file).unwrap(), 2);
    // Loading again is an upsert, not a conflict.
    assert_eq!(served.catalog.load_accounts_file(&file).unwrap(), 2);

    let all = served.catalog.accounts().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].account_id, "100000000007");
    assert_eq!(all[0].name, "new name");
    assert_eq!(all[0].secret_key, "rotatedkeyrotatedkey");
    assert_eq!(all[1].secret_id, "AKIDdevdevdevdev");

    let dev = Credentials {
        secret_id: "AKIDdevdevdevdev".into(),
        secret_key: "devsecretkeydevsecretkey".into(),
    };
    served
        .public_as(dev)
        .describe_regions(DescribeRegionsRequest {})
        .await
        .unwrap();

    // A SecretId that belongs to another account is refused, and nothing is imported.
    let clash = dir.path().join("clash.json");
    let entries = serde_json::json!([
        {"account_id": "300000000001", "name": "x", "secret_id": "AKIDfreshfresh",
         "secret_key": "k1"},
        {"account_id": "300000000002", "name": "y", "secret_id": "AKIDdevdevdevdev",
         "secret_key": "k2"}
    ]);
    std::fs::write(&clash, entries.to_string()).unwrap();
    assert!(served.catalog.load_accounts_file(&clash).is_err());
    assert_eq!(served.catalog.accounts().unwrap().len(), 2);

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"account_id": "1", "name": "", "secret_id": "a", "secret_key": "b"}]"#,
    )
    .unwrap();
    assert!(served.catalog.load_accounts_file(&bad).is_err());
    served.stop().await;
}
