//! Service identities and who may call which internal method.
//!
//! A service signs its calls as `svc-<identity>`: `catalog`, `sharing`, `admin` (operators and
//! their tools) or `region-<region id>`. Under mutual TLS the identity is also the name its
//! certificate is issued for (a DNS name in the subject alternative names), and the two must
//! agree. `RULES` below is the one table of which identities may call each method of the
//! `*InternalService` services; a method missing from it can be called by nobody.

use std::collections::BTreeSet;
use std::sync::RwLock;

/// The operator identity: creates accounts, looks things up.
pub const ADMIN: &str = "admin";
pub const CATALOG: &str = "catalog";
pub const SHARING: &str = "sharing";
/// Region identities are `region-<region id>`.
pub const REGION_PREFIX: &str = "region-";

/// What kind of service an identity is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Admin,
    Catalog,
    Sharing,
    /// Any region of the cluster.
    Region,
}

use Role::{Admin, Region, Sharing};

/// Which identities may call each internal method (by gRPC path). Everything not listed here is
/// refused to every service identity.
pub const RULES: &[(&str, &[Role])] = &[
    // The catalog's internal service.
    // A region registers itself (the catalog checks it registers its own id); an operator may
    // register or move one.
    (
        "/imagefleet.catalog.v1.CatalogInternalService/RegisterRegion",
        &[Region, Admin],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/ListRegions",
        &[Region, Admin],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/CreateAccount",
        &[Admin],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/GetAccount",
        &[Region, Admin],
    ),
    // Account keys: only the services that verify account signatures.
    (
        "/imagefleet.catalog.v1.CatalogInternalService/GetAccountCredential",
        &[Region, Sharing],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/RegisterImage",
        &[Region],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/UnregisterImage",
        &[Region],
    ),
    (
        "/imagefleet.catalog.v1.CatalogInternalService/LookupImage",
        &[Region, Admin],
    ),
    // The sharing service's maps: changed by regions only; an operator may read them.
    (
        "/imagefleet.sharing.v1.SharingInternalService/SetImageOwner",
        &[Region],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/RemoveImage",
        &[Region],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/GetImageOwner",
        &[Region, Admin],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/ModifyShares",
        &[Region],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/DescribeShares",
        &[Region, Admin],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/CheckShare",
        &[Region, Admin],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/ListSharedWith",
        &[Region, Admin],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/CheckShares",
        &[Region, Admin],
    ),
    (
        "/imagefleet.sharing.v1.SharingInternalService/ListSharedWithAccounts",
        &[Region, Admin],
    ),
    // Billing (in the catalog process): regions report their usage (each its own, checked by
    // the billing service) and ask for prices; an operator may ask for prices too.
    (
        "/imagefleet.billing.v1.BillingInternalService/ReportUsage",
        &[Region],
    ),
    (
        "/imagefleet.billing.v1.BillingInternalService/QuoteRun",
        &[Region, Admin],
    ),
    // Region to region: copies, their chunks and manifests. Regions only.
    (
        "/imagefleet.region.v1.RegionInternalService/StartSync",
        &[Region],
    ),
    (
        "/imagefleet.region.v1.RegionInternalService/GetImageManifest",
        &[Region],
    ),
    (
        "/imagefleet.region.v1.RegionInternalService/FetchChunks",
        &[Region],
    ),
    (
        "/imagefleet.region.v1.RegionInternalService/CancelSync",
        &[Region],
    ),
    (
        "/imagefleet.region.v1.RegionInternalService/ReleaseCopySource",
        &[Region],
    ),
    // Emulated links between regions (load tests): operators only.
    (
        "/imagefleet.region.v1.RegionInternalService/SetLinks",
        &[Admin],
    ),
    (
        "/imagefleet.region.v1.RegionInternalService/ListLinks",
        &[Admin],
    ),
];

/// The roles allowed to call `path` (empty for an unknown path).
pub fn allowed_roles(path: &str) -> &'static [Role] {
    RULES
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, roles)| *roles)
        .unwrap_or(&[])
}

/// Whether the service `identity` may call the internal method `path`.
pub fn may_call(identity: &str, path: &str) -> bool {
    match role(identity) {
        Some(role) => allowed_roles(path).contains(&role),
        None => false,
    }
}

/// The role of a service identity (by its form only; see `is_known` for membership).
pub fn role(identity: &str) -> Option<Role> {
    match identity {
        ADMIN => Some(Role::Admin),
        CATALOG => Some(Role::Catalog),
        SHARING => Some(Role::Sharing),
        _ => identity
            .strip_prefix(REGION_PREFIX)
            .filter(|id| well_formed_region(id))
            .map(|_| Role::Region),
    }
}

/// A region id: 2 to 64 lowercase letters, digits and hyphens, starting with a letter.
pub fn well_formed_region(id: &str) -> bool {
    (2..=64).contains(&id.len())
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The identity of the service a scope names (`catalog`, `sharing`, `region:<id>`).
pub fn identity_of_scope(scope: &str) -> String {
    match scope.strip_prefix("region:") {
        Some(region) => format!("{REGION_PREFIX}{region}"),
        None => scope.to_string(),
    }
}

/// The regions of this cluster, when the process was told them (`imaged` does:
/// `--cluster-regions`, or the regions of `imaged dev`). `None`: any well-formed region id.
static CLUSTER_REGIONS: RwLock<Option<BTreeSet<String>>> = RwLock::new(None);

/// Sets the regions of the cluster: from now on `region-<id>` is a known identity only for
/// these ids.
pub fn set_cluster_regions<I: IntoIterator<Item = S>, S: Into<String>>(regions: I) {
    let set: BTreeSet<String> = regions.into_iter().map(Into::into).collect();
    *CLUSTER_REGIONS.write().unwrap_or_else(|e| e.into_inner()) = Some(set);
}

/// The regions of the cluster, if the process was told them.
pub fn cluster_regions() -> Option<BTreeSet<String>> {
    CLUSTER_REGIONS
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Whether `identity` names a service of this cluster: `catalog`, `sharing`, `admin`, or
/// `region-<id>` for a region of the cluster.
pub fn is_known(identity: &str) -> bool {
    match role(identity) {
        Some(Role::Region) => {
            let id = &identity[REGION_PREFIX.len()..];
            match &*CLUSTER_REGIONS.read().unwrap_or_else(|e| e.into_inner()) {
                Some(regions) => regions.contains(id),
                None => true,
            }
        }
        Some(_) => true,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_internal_method_has_a_rule_and_every_rule_a_method() {
        let pool = imagefleet_proto::descriptor_pool();
        let mut internal = BTreeSet::new();
        for service in pool.services() {
            if service.name().ends_with("InternalService") {
                for m in service.methods() {
                    internal.insert(format!("/{}/{}", service.full_name(), m.name()));
                }
            }
        }
        let ruled: BTreeSet<String> = RULES.iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(internal, ruled);
    }

    #[test]
    fn roles_and_rules() {
        assert_eq!(role("admin"), Some(Role::Admin));
        assert_eq!(role("region-ap-guangzhou"), Some(Role::Region));
        assert_eq!(role("region-"), None);
        assert_eq!(role("bogus"), None);
        assert_eq!(role("region-AP"), None);
        let create = "/imagefleet.catalog.v1.CatalogInternalService/CreateAccount";
        assert!(may_call("admin", create));
        assert!(!may_call("region-ap-guangzhou", create));
        assert!(!may_call("sharing", create));
        let fetch = "/imagefleet.region.v1.RegionInternalService/FetchChunks";
        assert!(may_call("region-ap-shanghai", fetch));
        assert!(!may_call("admin", fetch));
        assert!(!may_call("catalog", fetch));
        assert!(!may_call(
            "admin",
            "/imagefleet.catalog.v1.CatalogInternalService/Nope"
        ));
        assert_eq!(
            identity_of_scope("region:ap-guangzhou"),
            "region-ap-guangzhou"
        );
        assert_eq!(identity_of_scope("catalog"), "catalog");
    }
}
