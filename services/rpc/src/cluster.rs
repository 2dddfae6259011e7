//! `cluster.json`: what a running cluster tells its clients. `imaged dev` (and the compose
//! set-up) write it; `imagectl`, the tests and the benchmarks read it.

use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceEndpoint {
    /// `http://host:port`
    pub endpoint: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RegionEndpoint {
    pub region: String,
    pub endpoint: String,
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
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

    pub fn region_endpoint(&self, region: &str) -> Option<&str> {
        self.regions
            .iter()
            .find(|r| r.region == region)
            .map(|r| r.endpoint.as_str())
    }
}
