//! `cluster.json`: what a running cluster tells its clients. `imaged dev` (and the compose
//! set-up) write it; `imagectl`, the tests and the benchmarks read it.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceEndpoint {
    /// `http://host:port`
    pub endpoint: String,
    /// The service's Prometheus metrics (`http://host:port/metrics`), when it serves them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegionEndpoint {
    pub region: String,
    pub endpoint: String,
    /// The region's Prometheus metrics (`http://host:port/metrics`), when it serves them.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub metrics: String,
}

#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct AccountEntry {
    pub account_id: String,
    pub name: String,
    pub secret_id: String,
    pub secret_key: String,
}

impl std::fmt::Debug for AccountEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccountEntry")
            .field("account_id", &self.account_id)
            .field("name", &self.name)
            .field("secret_id", &self.secret_id)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterFile {
    pub catalog: ServiceEndpoint,
    pub sharing: ServiceEndpoint,
    pub regions: Vec<RegionEndpoint>,
    pub accounts: Vec<AccountEntry>,
    /// The Redis the sharing service uses (`embedded` for the in-process fallback).
    #[serde(default)]
    pub redis_url: String,
    /// File holding the cluster's service key (for operators and tests; never an account's).
    #[serde(default)]
    pub service_key_file: String,
    /// The cluster CA (a PEM file, or the PEM text itself) when the endpoints are `https://`:
    /// clients trust only it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_ca_file: String,
    /// The client certificate and key (PEM files) to present where the services demand mutual
    /// TLS; any certificate of the cluster CA may make account calls.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_client_cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tls_client_key_file: String,
    /// The `admin` identity's certificate and key (for operators and tests, like the service
    /// key: with them, `svc-admin` may create accounts).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_cert_file: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub admin_key_file: String,
}

impl ClusterFile {
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = std::fs::read_to_string(path)?;
        serde_json::from_str(&text).map_err(std::io::Error::other)
    }

    /// Writes the file atomically (temp file, fsync, rename).
    pub fn store(&self, path: &Path) -> std::io::Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_durably(path, text.as_bytes())
    }

    /// The client TLS settings the file names (`None` for a plaintext cluster). Relative paths
    /// are taken from `base` (the file's directory); `tls_ca_file` may hold the PEM itself.
    pub fn client_tls(
        &self,
        base: &Path,
        admin: bool,
    ) -> std::io::Result<Option<crate::tls::TlsSettings>> {
        if self.tls_ca_file.is_empty() {
            return Ok(None);
        }
        let read = |p: &str| std::fs::read_to_string(base.join(p));
        let ca_pem = if self.tls_ca_file.contains("-----BEGIN") {
            self.tls_ca_file.clone()
        } else {
            read(&self.tls_ca_file)?
        };
        let (cert, key) = if admin {
            (&self.admin_cert_file, &self.admin_key_file)
        } else {
            (&self.tls_client_cert_file, &self.tls_client_key_file)
        };
        let (cert_pem, key_pem) = if cert.is_empty() || key.is_empty() {
            (None, None)
        } else {
            (Some(read(cert)?), Some(read(key)?))
        };
        Ok(Some(crate::tls::TlsSettings {
            ca_pem,
            cert_pem,
            key_pem,
            client_ca_pem: None,
        }))
    }

    pub fn region_endpoint(&self, region: &str) -> Option<&str> {
        self.regions
            .iter()
            .find(|r| r.region == region)
            .map(|r| r.endpoint.as_str())
    }
}
