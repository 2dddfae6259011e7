//! `imagectl links set|list`: the emulated links between regions (docs/links.md), changed and
//! read with the operator's service credentials (`svc-admin`, the cluster file's
//! `service_key_file`).

use crate::cli::{LinksCommand, OutputFormat};
use crate::error::{CliError, Result};
use crate::output::Table;
use imagefleet_proto::region::v1::region_internal_service_client::RegionInternalServiceClient;
use imagefleet_proto::region::v1::{Link, ListLinksRequest, SetLinksRequest};
use imagefleet_rpc::client::{self, SignedChannel};
use imagefleet_rpc::cluster::ClusterFile;
use imagefleet_rpc::link::LinkEntry;
use imagefleet_rpc::Credentials;
use std::path::Path;

/// The operator's clients of every region of the cluster file.
struct Admin {
    cluster: ClusterFile,
    credentials: Credentials,
}

impl Admin {
    fn open(cluster_file: &Path) -> Result<Admin> {
        let what = |e: std::io::Error| {
            CliError::Config(format!(
                "cannot read cluster file {}: {e}",
                cluster_file.display()
            ))
        };
        let cluster = ClusterFile::load(cluster_file).map_err(what)?;
        let base = cluster_file.parent().unwrap_or_else(|| Path::new("."));
        if cluster.service_key_file.is_empty() {
            return Err(CliError::Config(format!(
                "{} names no service_key_file: links need the operator's service credentials",
                cluster_file.display()
            )));
        }
        let key_path = base.join(&cluster.service_key_file);
        let key = std::fs::read_to_string(&key_path)
            .map_err(|e| CliError::io(key_path.display().to_string(), e))?;
        if let Some(tls) = cluster.client_tls(base, true).map_err(what)? {
            imagefleet_rpc::tls::install(imagefleet_rpc::identity::ADMIN, tls);
        }
        Ok(Admin {
            credentials: Credentials::service(imagefleet_rpc::identity::ADMIN, key.trim()),
            cluster,
        })
    }

    fn region(&self, region: &str) -> Result<RegionInternalServiceClient<SignedChannel>> {
        let url = self
            .cluster
            .region_endpoint(region)
            .ok_or_else(|| CliError::Config(format!("the cluster file has no region {region}")))?
            .to_string();
        let channel = client::signed_channel(
            &url,
            self.credentials.clone(),
            &client::region_scope(region),
        )
        .map_err(|source| CliError::Endpoint { url, source })?;
        Ok(RegionInternalServiceClient::new(channel))
    }
}

pub async fn run(
    cluster_file: &Path,
    command: LinksCommand,
    format: OutputFormat,
) -> Result<String> {
    let admin = Admin::open(cluster_file)?;
    match command {
        LinksCommand::Set { links } => {
            let mut entries = Vec::new();
            for text in &links {
                let entry: LinkEntry = text
                    .parse()
                    .map_err(|e| CliError::Config(format!("{text}: {e}")))?;
                entries.push(entry);
            }
            let mut regions: Vec<&str> = entries
                .iter()
                .flat_map(|e| [e.a.as_str(), e.b.as_str()])
                .collect();
            regions.sort();
            regions.dedup();
            let mut set = Vec::new();
            for region in regions {
                let mine: Vec<String> = entries
                    .iter()
                    .filter(|e| e.a == region || e.b == region)
                    .map(|e| e.to_string())
                    .collect();
                let response = admin
                    .region(region)?
                    .set_links(SetLinksRequest { links: mine })
                    .await?;
                set.extend(response.into_inner().links);
            }
            render(&set, format)
        }
        LinksCommand::List => render(&every_link(&admin).await?, format),
    }
}

/// Every region's outgoing links (as `links list` shows them), or why they cannot be read
/// (no service credentials in the cluster file, a region that does not answer).
pub async fn list_all(cluster_file: &Path) -> std::result::Result<Vec<Link>, String> {
    let admin = Admin::open(cluster_file).map_err(|e| e.to_string())?;
    every_link(&admin).await.map_err(|e| e.to_string())
}

async fn every_link(admin: &Admin) -> Result<Vec<Link>> {
    let mut all = Vec::new();
    for region in &admin.cluster.regions {
        let response = admin
            .region(&region.region)?
            .list_links(ListLinksRequest {})
            .await?;
        all.extend(response.into_inner().links);
    }
    Ok(all)
}

fn render(links: &[Link], format: OutputFormat) -> Result<String> {
    match format {
        OutputFormat::Json => {
            let rows: Vec<serde_json::Value> = links
                .iter()
                .map(|l| {
                    let s = l.settings.clone().unwrap_or_default();
                    serde_json::json!({
                        "from": l.from_region,
                        "to": l.to_region,
                        "rtt_ms": s.rtt_ms,
                        "jitter_ms": s.jitter_ms,
                        "rate_bps": s.rate_bps,
                        "loss_percent": s.loss_percent,
                        "down": s.down,
                    })
                })
                .collect();
            Ok(crate::output::json_document(&serde_json::Value::Array(
                rows,
            )))
        }
        OutputFormat::Id => Ok(crate::output::ids(
            links.iter().map(|l| l.to_region.as_str()),
        )),
        OutputFormat::Table => Ok(table(links)),
    }
}

fn ms(v: f64) -> String {
    if v == 0.0 {
        "-".into()
    } else {
        format!("{v}ms")
    }
}

/// One row per ordered pair.
pub fn table(links: &[Link]) -> String {
    let mut table = Table::new(&["FROM", "TO", "RTT", "JITTER", "RATE", "LOSS", "STATE"]);
    for l in links {
        let s = l.settings.clone().unwrap_or_default();
        table.row(vec![
            l.from_region.clone(),
            l.to_region.clone(),
            ms(s.rtt_ms),
            ms(s.jitter_ms),
            if s.rate_bps == 0 {
                "-".into()
            } else {
                format!("{}bit/s", s.rate_bps)
            },
            if s.loss_percent == 0.0 {
                "-".into()
            } else {
                format!("{}%", s.loss_percent)
            },
            if s.down { "DOWN" } else { "UP" }.into(),
        ]);
    }
    table.render()
}
