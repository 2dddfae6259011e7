//! `imagectl regions list`: the regions the catalog knows.

use crate::cli::{OutputFormat, RegionsCommand};
use crate::error::Result;
use crate::output::{self, enum_name, Table};
use crate::session::Session;
use imagefleet_proto::catalog::v1::{Area, Region};

pub async fn run(
    session: &Session,
    command: RegionsCommand,
    format: OutputFormat,
) -> Result<String> {
    match command {
        RegionsCommand::List => {
            let response = session.describe_regions().await?;
            match format {
                OutputFormat::Json => output::json(&response),
                OutputFormat::Id => Ok(output::ids(
                    response.region_set.iter().map(|r| r.region.as_str()),
                )),
                OutputFormat::Table => Ok(region_table(&response.region_set)),
            }
        }
    }
}

/// Regions as a table: one row each.
pub fn region_table(regions: &[Region]) -> String {
    let mut table = Table::new(&["REGION", "NAME", "AREA", "ENDPOINT", "REGISTERED"]);
    for region in regions {
        table.row(vec![
            region.region.clone(),
            region.region_name.clone(),
            enum_name(region.area, Area::as_str_name),
            region.endpoint.clone(),
            region.registered_time.clone(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_tables_show_area_names() {
        let text = region_table(&[Region {
            region: "ap-singapore".into(),
            region_name: "Singapore".into(),
            area: Area::Overseas as i32,
            endpoint: "http://127.0.0.1:7204".into(),
            registered_time: String::new(),
            public_endpoint: String::new(),
        }]);
        let row: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(
            row,
            [
                "ap-singapore",
                "Singapore",
                "OVERSEAS",
                "http://127.0.0.1:7204",
                "-"
            ]
        );
    }
}
