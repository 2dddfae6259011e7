//! The region directory: the built-in table of regions a cluster may run (with area and display
//! name), and the endpoints region services register for themselves.

use crate::error::CatalogError;
use crate::Catalog;
use imagefleet_proto::catalog::v1::{Area, Region};
use imagefleet_rpc::time::{rfc3339, unix_now};
use rusqlite::params;
use tonic::Status;

/// A region this build knows about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownRegion {
    /// e.g. `ap-guangzhou`
    pub region: &'static str,
    /// e.g. `Guangzhou`
    pub name: &'static str,
    /// Mainland China or overseas: images are copied only within one area.
    pub area: Area,
}

const fn known(region: &'static str, name: &'static str, area: Area) -> KnownRegion {
    KnownRegion { region, name, area }
}

/// Every region a cluster may run.
pub const KNOWN_REGIONS: &[KnownRegion] = &[
    known("ap-guangzhou", "Guangzhou", Area::Mainland),
    known("ap-shanghai", "Shanghai", Area::Mainland),
    known("ap-beijing", "Beijing", Area::Mainland),
    known("ap-nanjing", "Nanjing", Area::Mainland),
    known("ap-chengdu", "Chengdu", Area::Mainland),
    known("ap-chongqing", "Chongqing", Area::Mainland),
    known("ap-singapore", "Singapore", Area::Overseas),
    known("ap-tokyo", "Tokyo", Area::Overseas),
    known("na-siliconvalley", "Silicon Valley", Area::Overseas),
    known("na-ashburn", "Virginia", Area::Overseas),
    known("eu-frankfurt", "Frankfurt", Area::Overseas),
];

/// The known region `region`, if there is one.
pub fn known_region(region: &str) -> Option<&'static KnownRegion> {
    KNOWN_REGIONS.iter().find(|r| r.region == region)
}

/// `INVALID_ARGUMENT` (`InvalidRegion.NotFound`) naming `field` unless `region` is known.
pub fn check_region(
    field: &'static str,
    region: &str,
) -> Result<&'static KnownRegion, CatalogError> {
    known_region(region).ok_or_else(|| {
        CatalogError::invalid(
            field,
            "InvalidRegion.NotFound",
            format!("{region:?} is not a known region"),
        )
    })
}

const MAX_ENDPOINT_LEN: usize = 2048;

/// An endpoint must be an absolute `http://` or `https://` URL with a host.
fn check_endpoint(endpoint: &str) -> Result<(), CatalogError> {
    let invalid = |message: &str| {
        CatalogError::invalid("endpoint", "InvalidParameterValue.Endpoint", message)
    };
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(invalid("must start with http:// or https://"));
    }
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(invalid("is too long"));
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| invalid(&format!("is not a URL: {e}")))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("has no host"));
    }
    Ok(())
}

fn region_message(
    known: &KnownRegion,
    endpoint: String,
    public_endpoint: String,
    registered_at: i64,
) -> Region {
    Region {
        region: known.region.to_string(),
        region_name: known.name.to_string(),
        area: known.area as i32,
        endpoint,
        registered_time: rfc3339(registered_at),
        public_endpoint,
    }
}

/// The region as an account's client should see it: `endpoint` is where the client can
/// reach it.
pub fn for_clients(mut region: Region) -> Region {
    if !region.public_endpoint.is_empty() {
        region.endpoint = region.public_endpoint.clone();
    }
    region
}

impl Catalog {
    /// Records (or replaces) the endpoint of a known region's service.
    pub fn register_region(
        &self,
        region: &str,
        endpoint: &str,
        public_endpoint: &str,
    ) -> Result<Region, Status> {
        let known = check_region("region", region)?;
        check_endpoint(endpoint)?;
        if !public_endpoint.is_empty() {
            check_endpoint(public_endpoint)?;
        }
        let registered_at = unix_now();
        self.store.write(|tx| {
            tx.execute(
                "INSERT INTO regions (region, endpoint, public_endpoint, registered_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (region) DO UPDATE SET
                    endpoint = excluded.endpoint, public_endpoint = excluded.public_endpoint,
                    registered_at = excluded.registered_at",
                params![region, endpoint, public_endpoint, registered_at],
            )?;
            Ok(())
        })?;
        tracing::info!(region, endpoint, public_endpoint, "region registered");
        Ok(region_message(
            known,
            endpoint.to_string(),
            public_endpoint.to_string(),
            registered_at,
        ))
    }

    /// Every registered region, sorted by id.
    pub fn regions(&self) -> Result<Vec<Region>, Status> {
        let rows = self.store.read(|conn| {
            let mut stmt = conn
                .prepare("SELECT region, endpoint, public_endpoint, registered_at FROM regions ORDER BY region")?;
            let rows = stmt.query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                    row.get::<_, i64>(3)?,
                ))
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(region, endpoint, public_endpoint, at)| {
                known_region(&region)
                    .map(|known| region_message(known, endpoint, public_endpoint, at))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert!(check_endpoint("http://127.0.0.1:7201").is_ok());
        assert!(check_endpoint("https://region.example.com").is_ok());
        assert!(check_endpoint("127.0.0.1:7201").is_err());
        assert!(check_endpoint("ftp://x").is_err());
        assert!(check_endpoint("http://").is_err());
        assert!(check_endpoint("http://a b").is_err());
    }

    #[test]
    fn directory() {
        assert_eq!(
            known_region("ap-guangzhou").map(|r| r.area),
            Some(Area::Mainland)
        );
        assert_eq!(
            known_region("eu-frankfurt").map(|r| r.area),
            Some(Area::Overseas)
        );
        assert!(known_region("moon-base").is_none());
    }
}
