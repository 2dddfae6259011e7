//! Who `imagectl` talks to and as whom: the cluster file, the account chosen from it, and
//! signed clients of the catalog, of billing (served by the catalog process) and of a region
//! (whose endpoint the catalog tells).

use crate::error::{CliError, Result};
use imagefleet_proto::billing::v1::billing_service_client::BillingServiceClient;
use imagefleet_proto::catalog::v1::catalog_service_client::CatalogServiceClient;
use imagefleet_proto::catalog::v1::{DescribeRegionsRequest, DescribeRegionsResponse};
use imagefleet_proto::region::v1::region_service_client::RegionServiceClient;
use imagefleet_rpc::client::{self, SignedChannel, MAX_MESSAGE_BYTES};
use imagefleet_rpc::cluster::{AccountEntry, ClusterFile};
use imagefleet_rpc::Credentials;
use std::path::Path;
use std::time::Duration;

/// How long the catalog may take to list the regions before the cluster file is used.
const CATALOG_TIMEOUT: Duration = Duration::from_secs(10);

/// The cluster and account every command of one run works with.
#[derive(Debug)]
pub struct Session {
    cluster: ClusterFile,
    account: AccountEntry,
}

impl Session {
    /// Reads the cluster file and picks the account (`None`: the first one).
    pub fn open(cluster_file: &Path, account: Option<&str>) -> Result<Self> {
        let cluster = ClusterFile::load(cluster_file).map_err(|e| {
            CliError::Config(format!(
                "cannot read cluster file {}: {e} (set --cluster or IMAGEFLEET_CLUSTER)",
                cluster_file.display()
            ))
        })?;
        let base = cluster_file.parent().unwrap_or_else(|| Path::new("."));
        match cluster.client_tls(base, false) {
            Ok(Some(tls)) => imagefleet_rpc::tls::install(imagefleet_rpc::tls::DEFAULT, tls),
            Ok(None) => {}
            Err(e) => {
                return Err(CliError::Config(format!(
                    "cannot read the TLS files named in {}: {e}",
                    cluster_file.display()
                )))
            }
        }
        Session::new(cluster, account)
    }

    pub fn new(cluster: ClusterFile, account: Option<&str>) -> Result<Self> {
        let account = select_account(&cluster, account)?.clone();
        Ok(Session { cluster, account })
    }

    pub fn account(&self) -> &AccountEntry {
        &self.account
    }

    fn credentials(&self) -> Credentials {
        Credentials {
            secret_id: self.account.secret_id.clone(),
            secret_key: self.account.secret_key.clone(),
        }
    }

    pub fn catalog(&self) -> Result<CatalogServiceClient<SignedChannel>> {
        let url = &self.cluster.catalog.endpoint;
        let channel = client::signed_channel(url, self.credentials(), client::CATALOG_SCOPE)
            .map_err(|source| CliError::Endpoint {
                url: url.clone(),
                source,
            })?;
        Ok(CatalogServiceClient::new(channel))
    }

    /// A client of the billing service, which the catalog process serves: at the catalog's
    /// endpoint, signed for the catalog's scope.
    pub fn billing(&self) -> Result<BillingServiceClient<SignedChannel>> {
        let url = &self.cluster.catalog.endpoint;
        let channel = client::signed_channel(url, self.credentials(), client::CATALOG_SCOPE)
            .map_err(|source| CliError::Endpoint {
                url: url.clone(),
                source,
            })?;
        Ok(BillingServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }

    /// The regions the catalog knows.
    pub async fn describe_regions(&self) -> Result<DescribeRegionsResponse> {
        let mut catalog = self.catalog()?;
        let call = catalog.describe_regions(DescribeRegionsRequest {});
        match tokio::time::timeout(CATALOG_TIMEOUT, call).await {
            Ok(response) => Ok(response?.into_inner()),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "the catalog at {} did not answer within {CATALOG_TIMEOUT:?}",
                self.cluster.catalog.endpoint
            ))
            .into()),
        }
    }

    /// A client of `region`'s service, signed for that region.
    pub async fn region(&self, region: &str) -> Result<RegionServiceClient<SignedChannel>> {
        let listed = self.describe_regions().await.ok();
        let url = region_endpoint(listed.as_ref(), &self.cluster, region)?;
        let channel =
            client::signed_channel(&url, self.credentials(), &client::region_scope(region))
                .map_err(|source| CliError::Endpoint { url, source })?;
        Ok(RegionServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// The account `id` of the cluster file, or its first account when no id is given.
pub fn select_account<'a>(cluster: &'a ClusterFile, id: Option<&str>) -> Result<&'a AccountEntry> {
    match id {
        None => cluster
            .accounts
            .first()
            .ok_or_else(|| CliError::Config("the cluster file lists no accounts".to_string())),
        Some(id) => cluster
            .accounts
            .iter()
            .find(|a| a.account_id == id)
            .ok_or_else(|| {
                let known: Vec<&str> = cluster
                    .accounts
                    .iter()
                    .map(|a| a.account_id.as_str())
                    .collect();
                CliError::Config(format!(
                    "unknown account {id} (the cluster file has: {})",
                    known.join(", ")
                ))
            }),
    }
}

/// A region's endpoint: as the catalog lists it (`listed`, when the catalog answered), else
/// as the cluster file lists it.
pub fn region_endpoint(
    listed: Option<&DescribeRegionsResponse>,
    cluster: &ClusterFile,
    region: &str,
) -> Result<String> {
    let from_catalog = listed
        .into_iter()
        .flat_map(|r| r.region_set.iter())
        .find(|r| r.region == region && !r.endpoint.is_empty())
        .map(|r| r.endpoint.clone());
    from_catalog
        .or_else(|| cluster.region_endpoint(region).map(str::to_string))
        .ok_or_else(|| CliError::Config(format!("unknown region {region}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagefleet_proto::catalog::v1::Region;
    use imagefleet_rpc::cluster::{RegionEndpoint, ServiceEndpoint};

    fn account(id: &str) -> AccountEntry {
        AccountEntry {
            account_id: id.to_string(),
            name: format!("account {id}"),
            secret_id: format!("AKID{id}"),
            secret_key: "secret".to_string(),
        }
    }

    fn cluster() -> ClusterFile {
        ClusterFile {
            catalog: ServiceEndpoint {
                endpoint: "http://127.0.0.1:7100".into(),
                metrics: String::new(),
            },
            sharing: ServiceEndpoint {
                endpoint: "http://127.0.0.1:7150".into(),
                metrics: String::new(),
            },
            regions: vec![
                RegionEndpoint {
                    region: "ap-guangzhou".into(),
                    endpoint: "http://127.0.0.1:7201".into(),
                    metrics: String::new(),
                },
                RegionEndpoint {
                    region: "ap-shanghai".into(),
                    endpoint: "http://127.0.0.1:7202".into(),
                    metrics: String::new(),
                },
            ],
            accounts: vec![account("100000000001"), account("100000000002")],
            redis_url: String::new(),
            service_key_file: String::new(),
            ..Default::default()
        }
    }

    #[test]
    fn the_first_account_is_the_default() {
        let cluster = cluster();
        let chosen = select_account(&cluster, None).expect("an account");
        assert_eq!(chosen.account_id, "100000000001");
    }

    #[test]
    fn an_account_is_chosen_by_id() {
        let cluster = cluster();
        let chosen = select_account(&cluster, Some("100000000002")).expect("an account");
        assert_eq!(chosen.secret_id, "AKID100000000002");
    }

    #[test]
    fn an_unknown_account_is_an_error() {
        let cluster = cluster();
        let err = select_account(&cluster, Some("199999999999")).expect_err("unknown");
        assert!(
            err.to_string().contains("unknown account 199999999999"),
            "{err}"
        );
    }

    #[test]
    fn a_cluster_without_accounts_has_no_default() {
        let mut cluster = cluster();
        cluster.accounts.clear();
        assert!(select_account(&cluster, None).is_err());
    }

    #[test]
    fn the_catalog_decides_region_endpoints() {
        let listed = DescribeRegionsResponse {
            region_set: vec![Region {
                region: "ap-guangzhou".into(),
                endpoint: "http://10.0.0.5:7201".into(),
                ..Default::default()
            }],
            total_count: 1,
        };
        let url = region_endpoint(Some(&listed), &cluster(), "ap-guangzhou").expect("known");
        assert_eq!(url, "http://10.0.0.5:7201");
    }

    #[test]
    fn the_cluster_file_answers_when_the_catalog_cannot() {
        let url = region_endpoint(None, &cluster(), "ap-shanghai").expect("known");
        assert_eq!(url, "http://127.0.0.1:7202");
        let listed = DescribeRegionsResponse::default();
        let url = region_endpoint(Some(&listed), &cluster(), "ap-shanghai").expect("known");
        assert_eq!(url, "http://127.0.0.1:7202");
    }

    #[test]
    fn an_unknown_region_is_an_error() {
        let err = region_endpoint(None, &cluster(), "eu-frankfurt").expect_err("unknown");
        assert_eq!(err.to_string(), "unknown region eu-frankfurt");
    }

    #[test]
    fn sessions_open_cluster_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cluster.json");
        cluster().store(&path).expect("written");
        let session = Session::open(&path, Some("100000000002")).expect("opens");
        assert_eq!(session.account().account_id, "100000000002");
        let missing = Session::open(&dir.path().join("nope.json"), None).expect_err("missing");
        assert!(
            missing.to_string().contains("cannot read cluster file"),
            "{missing}"
        );
    }
}
