//! `imagectl instance-types list`: what `instances run --type` accepts in a region.

use crate::cli::{InstanceTypesCommand, OutputFormat};
use crate::error::Result;
use crate::output::{self, Table};
use crate::session::Session;
use imagefleet_proto::region::v1::{
    DescribeInstanceTypeConfigsRequest, Filter, InstanceTypeConfig,
};

pub async fn run(
    session: &Session,
    command: InstanceTypesCommand,
    format: OutputFormat,
) -> Result<String> {
    match command {
        InstanceTypesCommand::List(args) => {
            let mut filters = Vec::new();
            if !args.family.is_empty() {
                filters.push(Filter {
                    name: "instance-family".into(),
                    values: args.family,
                });
            }
            let mut client = session.region(&args.region.region).await?;
            let response = client
                .describe_instance_type_configs(DescribeInstanceTypeConfigsRequest { filters })
                .await?
                .into_inner();
            match format {
                OutputFormat::Json => output::json(&response),
                OutputFormat::Id => Ok(output::ids(
                    response
                        .instance_type_config_set
                        .iter()
                        .map(|t| t.instance_type.as_str()),
                )),
                OutputFormat::Table => Ok(type_table(&response.instance_type_config_set)),
            }
        }
    }
}

/// Instance types as a table: one row each.
pub fn type_table(types: &[InstanceTypeConfig]) -> String {
    let mut table = Table::new(&["INSTANCE_TYPE", "FAMILY", "CPU", "MEMORY_GIB"]);
    for t in types {
        table.row(vec![
            t.instance_type.clone(),
            t.instance_family.clone(),
            t.cpu.to_string(),
            t.memory_gib.to_string(),
        ]);
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_type_is_one_row_with_its_sizes() {
        let text = type_table(&[InstanceTypeConfig {
            instance_type: "S5.MEDIUM4".into(),
            instance_family: "S5".into(),
            cpu: 2,
            memory_gib: 4,
            region: "ap-guangzhou".into(),
        }]);
        let row: Vec<&str> = text
            .lines()
            .nth(1)
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(row, ["S5.MEDIUM4", "S5", "2", "4"]);
    }
}
