//! `SetLinks` and `ListLinks`: the emulated links of this region's connections to other
//! regions (docs/links.md), in the process's table.

use crate::error::{RegionError, Result};
use crate::region::Region;
use imagefleet_proto::region::v1::{Link, LinkSettings};
use imagefleet_rpc::link::{LinkEntry, LinkSpec, Links};

/// Entries one `SetLinks` call may carry.
const MAX_ENTRIES: usize = 100;

fn settings(spec: &LinkSpec) -> LinkSettings {
    LinkSettings {
        spec: spec.to_string(),
        rtt_ms: spec.rtt.as_micros() as f64 / 1e3,
        jitter_ms: spec.jitter.as_micros() as f64 / 1e3,
        rate_bps: spec.rate_bps,
        loss_percent: spec.loss_percent,
        down: spec.down,
    }
}

impl Region {
    /// Applies the entries that involve this region, all of them or (one does not parse)
    /// none.
    pub(crate) async fn set_links(&self, entries: &[String]) -> Result<Vec<Link>> {
        if entries.len() > MAX_ENTRIES {
            return Err(RegionError::invalid(
                "links",
                "InvalidParameterValue.LimitExceeded",
                format!("at most {MAX_ENTRIES} links per call"),
            ));
        }
        let parsed = entries
            .iter()
            .map(|e| {
                e.parse::<LinkEntry>().map_err(|err| {
                    RegionError::invalid("links", "InvalidParameterValue", err.to_string())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let me = &self.config.region;
        for entry in parsed.iter().filter(|e| &e.a == me || &e.b == me) {
            Links::global().apply(entry);
            tracing::info!(region = %me, link = %entry, "link changed");
        }
        self.list_links().await
    }

    /// This region's outgoing links: explicit ones, and realistic defaults towards the
    /// registered regions.
    pub(crate) async fn list_links(&self) -> Result<Vec<Link>> {
        let peers: Vec<String> = self
            .region_directory()
            .await
            .map(|regions| regions.into_iter().map(|r| r.region).collect())
            .unwrap_or_default();
        let me = &self.config.region;
        Ok(Links::global()
            .outgoing(me, &peers)
            .into_iter()
            .map(|(to, spec)| Link {
                from_region: me.clone(),
                to_region: to,
                settings: Some(settings(&spec)),
            })
            .collect())
    }
}
