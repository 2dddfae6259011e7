//! `imagectl billing ...`: prices (the price book in force), inquire (the price of a launch,
//! asked of the region) and report (the account's bill). The price book and the bill come
//! from the billing service, which the catalog process serves; amounts are the services'
//! decimal strings, printed as they come, never through a float.

use crate::cli::{BillingCommand, BillingFormat, BillingInquire, BillingPrices, BillingReport};
use crate::error::{CliError, Result};
use crate::output::{self, Csv, Table};
use crate::session::Session;
use imagefleet_proto::billing::v1::{
    DescribeBillRequest, DescribeBillResponse, DescribePriceBookRequest, DescribePriceBookResponse,
    LineItem, LineageLink, PricePart, RunPrice,
};
use imagefleet_proto::region::v1::InquiryPriceRunInstancesRequest;

/// Bytes in a GB, as the price book counts them (2^30).
const BYTES_PER_GB: u128 = 1 << 30;

pub async fn run(
    session: &Session,
    command: BillingCommand,
    format: BillingFormat,
) -> Result<String> {
    match command {
        BillingCommand::Prices(args) => prices(session, args, format).await,
        BillingCommand::Inquire(args) => inquire(session, args, format).await,
        BillingCommand::Report(args) => report(session, args, format).await,
    }
}

async fn prices(session: &Session, args: BillingPrices, format: BillingFormat) -> Result<String> {
    let response = session
        .billing()?
        .describe_price_book(DescribePriceBookRequest {
            region: args.region.unwrap_or_default(),
        })
        .await?
        .into_inner();
    match format {
        BillingFormat::Json => output::json(&response),
        BillingFormat::Table => Ok(price_tables(&response)),
        BillingFormat::Csv => Ok(price_csv(&response)),
    }
}

async fn inquire(session: &Session, args: BillingInquire, format: BillingFormat) -> Result<String> {
    let mut client = session.region(&args.region.region).await?;
    let response = client
        .inquiry_price_run_instances(InquiryPriceRunInstancesRequest {
            image_id: args.image,
            instance_type: args.instance_type,
            instance_count: args.count.unwrap_or(0),
            hours: args.hours.unwrap_or(0),
        })
        .await?
        .into_inner();
    let Some(price) = response.price.as_ref() else {
        return Err(CliError::Failed(format!(
            "the region {} answered the price inquiry without a price",
            args.region.region
        )));
    };
    match format {
        BillingFormat::Json => output::json(&response),
        BillingFormat::Table => Ok(run_price_table(price)),
        BillingFormat::Csv => Ok(run_price_csv(price)),
    }
}

async fn report(session: &Session, args: BillingReport, format: BillingFormat) -> Result<String> {
    if let (Some(from), Some(to)) = (&args.from, &args.to) {
        if to.unix < from.unix {
            return Err(CliError::Usage(format!(
                "--to {} is before --from {}: the period must not end before it starts",
                to.text, from.text
            )));
        }
    }
    // Sent in UTC whatever offset was typed; absent ends are empty (the service's defaults:
    // the start of the current month, and now).
    let utc = |t: Option<crate::cli::Rfc3339>| {
        t.map(|t| imagefleet_rpc::time::rfc3339(t.unix))
            .unwrap_or_default()
    };
    let bill = session
        .billing()?
        .describe_bill(DescribeBillRequest {
            from: utc(args.from),
            to: utc(args.to),
        })
        .await?
        .into_inner();
    match format {
        BillingFormat::Json => output::json(&bill),
        BillingFormat::Table => Ok(bill_text(&bill)),
        BillingFormat::Csv => Ok(bill_csv(&bill)),
    }
}

/// A lineage as people read it: the launched image first, the root last
/// (`img-a <- img-b <- img-root`).
pub fn chain_text(chain: &[LineageLink]) -> String {
    chain
        .iter()
        .map(|link| link.image_id.as_str())
        .collect::<Vec<_>>()
        .join(" <- ")
}

/// A lineage as one CSV field: the image ids separated by `;`, launched image first.
fn chain_csv(chain: &[LineageLink]) -> String {
    chain
        .iter()
        .map(|link| link.image_id.as_str())
        .collect::<Vec<_>>()
        .join(";")
}

/// Why an image fee is paid: `WINDOWS, paid root img-root: img-a <- img-b <- img-root`.
fn fee_detail(cause: &str, root: &str, chain: &[LineageLink], by: &str) -> String {
    let mut text = format!("{cause}{by}, paid root {root}");
    if !chain.is_empty() {
        text.push_str(": ");
        text.push_str(&chain_text(chain));
    }
    text
}

/// Bytes as GB (2^30 bytes) with two decimals, rounded half up.
pub fn gb(bytes: u64) -> String {
    let hundredths = (u128::from(bytes) * 100 + BYTES_PER_GB / 2) / BYTES_PER_GB;
    format!("{}.{:02}", hundredths / 100, hundredths % 100)
}

/// The price book as tables: instance types with their hourly price and Windows fee, the
/// licence classes, and snapshot storage with its free tier; then the currency.
pub fn price_tables(book: &DescribePriceBookResponse) -> String {
    if book.region_set.is_empty() {
        return "no prices found\n".to_string();
    }
    let mut types = Table::new(&["REGION", "INSTANCE_TYPE", "HOURLY", "WINDOWS_FEE"]);
    let mut licences = Table::new(&["REGION", "LICENCE_VCPU", "LICENCE_FEE"]);
    let mut snapshots = Table::new(&["REGION", "SNAPSHOT_GB_HOUR", "FREE_TIER_GB"]);
    for region in &book.region_set {
        for price in &region.instance_hour {
            let windows = if region.mainland {
                "free".to_string()
            } else {
                region
                    .windows_hour
                    .iter()
                    .find(|w| w.instance_type == price.instance_type)
                    .map(|w| w.hourly.clone())
                    .unwrap_or_default()
            };
            types.row(vec![
                region.region.clone(),
                price.instance_type.clone(),
                price.hourly.clone(),
                windows,
            ]);
        }
        for class in &region.licence_hour {
            licences.row(vec![
                region.region.clone(),
                format!("{}-{}", class.min_vcpu, class.max_vcpu),
                class.hourly.clone(),
            ]);
        }
        snapshots.row(vec![
            region.region.clone(),
            region.snapshot_gb_hour.clone(),
            region.free_tier_gb.to_string(),
        ]);
    }
    format!(
        "{}\n{}\n{}\nprices in {} per instance-hour (snapshot storage: per GB-hour, a GB is 2^30 bytes); Windows is free on the mainland\n",
        types.render(),
        licences.render(),
        snapshots.render(),
        output::escape(&book.currency)
    )
}

/// The price book as CSV: one row per price. Windows fees on the mainland are rows of price 0
/// (Windows is free there); the free tier is on the snapshot storage row.
pub fn price_csv(book: &DescribePriceBookResponse) -> String {
    let mut csv = Csv::new(&[
        "region",
        "kind",
        "instance_type",
        "min_vcpu",
        "max_vcpu",
        "unit",
        "price",
        "currency",
        "free_tier_gb",
    ]);
    let currency = &book.currency;
    for region in &book.region_set {
        let r = &region.region;
        for price in &region.instance_hour {
            csv.row(vec![
                r.clone(),
                "INSTANCE".into(),
                price.instance_type.clone(),
                String::new(),
                String::new(),
                "HOUR".into(),
                price.hourly.clone(),
                currency.clone(),
                String::new(),
            ]);
        }
        let windows: Vec<(String, String)> = if region.mainland {
            region
                .instance_hour
                .iter()
                .map(|p| (p.instance_type.clone(), "0".to_string()))
                .collect()
        } else {
            region
                .windows_hour
                .iter()
                .map(|p| (p.instance_type.clone(), p.hourly.clone()))
                .collect()
        };
        for (instance_type, hourly) in windows {
            csv.row(vec![
                r.clone(),
                "WINDOWS_FEE".into(),
                instance_type,
                String::new(),
                String::new(),
                "HOUR".into(),
                hourly,
                currency.clone(),
                String::new(),
            ]);
        }
        for class in &region.licence_hour {
            csv.row(vec![
                r.clone(),
                "LICENCE_FEE".into(),
                String::new(),
                class.min_vcpu.to_string(),
                class.max_vcpu.to_string(),
                "HOUR".into(),
                class.hourly.clone(),
                currency.clone(),
                String::new(),
            ]);
        }
        csv.row(vec![
            r.clone(),
            "SNAPSHOT_STORAGE".into(),
            String::new(),
            String::new(),
            String::new(),
            "GB_HOUR".into(),
            region.snapshot_gb_hour.clone(),
            currency.clone(),
            region.free_tier_gb.to_string(),
        ]);
    }
    csv.render()
}

/// One part of a price as a table row (none when the part is absent).
fn part_row(table: &mut Table, item: &str, part: Option<&PricePart>, detail: String) {
    if let Some(part) = part {
        table.row(vec![
            item.to_string(),
            part.unit_price.clone(),
            part.quantity.clone(),
            part.unit.clone(),
            part.amount.clone(),
            detail,
        ]);
    }
}

/// The price of a launch as a table: the instance part, the image fee (or that there is
/// none), the snapshot storage (for an own image), then the total with the currency.
pub fn run_price_table(price: &RunPrice) -> String {
    let mut table = Table::new(&["ITEM", "UNIT_PRICE", "QUANTITY", "UNIT", "AMOUNT", "DETAIL"]);
    part_row(
        &mut table,
        "INSTANCE",
        price.instance.as_ref(),
        format!(
            "{} x {} for {} hours in {}",
            price.instance_count, price.instance_type, price.hours, price.region
        ),
    );
    match &price.image_fee {
        Some(fee) => part_row(
            &mut table,
            "IMAGE_FEE",
            fee.price.as_ref(),
            fee_detail(&fee.cause, &fee.root_image_id, &fee.chain, ""),
        ),
        None => table.row(vec![
            "IMAGE_FEE".into(),
            String::new(),
            String::new(),
            String::new(),
            "0".into(),
            "none: the image's ultimate source is free in this region".into(),
        ]),
    }
    if let Some(snapshot) = &price.snapshot {
        part_row(
            &mut table,
            "SNAPSHOT_STORAGE",
            snapshot.price.as_ref(),
            format!(
                "{} GB held, {} GB free, {} GB billable",
                gb(snapshot.bytes_held),
                gb(snapshot.free_tier_bytes),
                gb(snapshot.billable_bytes)
            ),
        );
    }
    table.row(vec![
        "TOTAL".into(),
        String::new(),
        String::new(),
        String::new(),
        price.total.clone(),
        price.currency.clone(),
    ]);
    table.render()
}

/// The price of a launch as CSV: one row per part, then the total.
pub fn run_price_csv(price: &RunPrice) -> String {
    let mut csv = Csv::new(&[
        "item",
        "unit_price",
        "quantity",
        "unit",
        "amount",
        "currency",
        "cause",
        "root_image_id",
        "chain",
    ]);
    let cells = |item: &str, part: &PricePart| {
        vec![
            item.to_string(),
            part.unit_price.clone(),
            part.quantity.clone(),
            part.unit.clone(),
            part.amount.clone(),
            price.currency.clone(),
        ]
    };
    if let Some(part) = &price.instance {
        csv.row(cells("INSTANCE", part));
    }
    if let Some(fee) = &price.image_fee {
        if let Some(part) = &fee.price {
            let mut row = cells("IMAGE_FEE", part);
            row.extend([
                fee.cause.clone(),
                fee.root_image_id.clone(),
                chain_csv(&fee.chain),
            ]);
            csv.row(row);
        }
    }
    if let Some(part) = price.snapshot.as_ref().and_then(|s| s.price.as_ref()) {
        csv.row(cells("SNAPSHOT_STORAGE", part));
    }
    csv.row(vec![
        "TOTAL".into(),
        String::new(),
        String::new(),
        String::new(),
        price.total.clone(),
        price.currency.clone(),
    ]);
    csv.render()
}

/// What a bill line is for, beyond its resources: the instance type, or why an image fee is
/// paid.
fn line_detail(line: &LineItem) -> String {
    match &line.image_fee {
        Some(fee) => {
            let by = if fee.cause == "LICENSED" && line.vcpu > 0 {
                format!(" ({} vCPU)", line.vcpu)
            } else if !line.instance_type.is_empty() {
                format!(" ({})", line.instance_type)
            } else {
                String::new()
            };
            fee_detail(&fee.cause, &fee.root_image_id, &fee.chain, &by)
        }
        None => line.instance_type.clone(),
    }
}

/// A bill as tables: one row per line item, then the total of each kind and the grand total
/// with the currency, the period, and any usage the service could not price.
pub fn bill_text(bill: &DescribeBillResponse) -> String {
    let mut out = String::new();
    if bill.line_items.is_empty() {
        out.push_str("no line items\n");
    } else {
        let mut table = Table::new(&[
            "KIND",
            "REGION",
            "RESOURCES",
            "QUANTITY",
            "UNIT",
            "UNIT_PRICE",
            "AMOUNT",
            "DETAIL",
        ]);
        for line in &bill.line_items {
            table.row(vec![
                line.kind.clone(),
                line.region.clone(),
                line.resource_ids.join(","),
                line.quantity.clone(),
                line.unit.clone(),
                line.unit_price.clone(),
                line.amount.clone(),
                line_detail(line),
            ]);
        }
        out.push_str(&table.render());
    }
    out.push('\n');
    let mut totals = Table::new(&["TOTAL_OF", "AMOUNT", "CURRENCY"]);
    for total in &bill.totals {
        totals.row(vec![
            total.kind.clone(),
            total.amount.clone(),
            bill.currency.clone(),
        ]);
    }
    totals.row(vec![
        "TOTAL".into(),
        bill.total.clone(),
        bill.currency.clone(),
    ]);
    out.push_str(&totals.render());
    out.push_str(&format!(
        "\naccount {}, from {} to {}\n",
        output::escape(&bill.account_id),
        output::escape(&bill.from),
        output::escape(&bill.to)
    ));
    for anomaly in &bill.anomalies {
        out.push_str(&format!("not priced: {}\n", output::escape(anomaly)));
    }
    out
}

/// A bill as CSV: a header row and one row per line item (totals are left to the reader).
pub fn bill_csv(bill: &DescribeBillResponse) -> String {
    let mut csv = Csv::new(&[
        "kind",
        "region",
        "resource_ids",
        "instance_type",
        "vcpu",
        "quantity",
        "unit",
        "unit_price",
        "amount",
        "currency",
        "cause",
        "image_id",
        "root_image_id",
        "chain",
    ]);
    for line in &bill.line_items {
        let fee = line.image_fee.as_ref();
        csv.row(vec![
            line.kind.clone(),
            line.region.clone(),
            line.resource_ids.join(";"),
            line.instance_type.clone(),
            if line.vcpu == 0 {
                String::new()
            } else {
                line.vcpu.to_string()
            },
            line.quantity.clone(),
            line.unit.clone(),
            line.unit_price.clone(),
            line.amount.clone(),
            bill.currency.clone(),
            fee.map(|f| f.cause.clone()).unwrap_or_default(),
            fee.map(|f| f.image_id.clone()).unwrap_or_default(),
            fee.map(|f| f.root_image_id.clone()).unwrap_or_default(),
            fee.map(|f| chain_csv(&f.chain)).unwrap_or_default(),
        ]);
    }
    csv.render()
}

#[cfg(test)]
mod tests {
    use super::*;
    use imagefleet_proto::billing::v1::{
        ImageFee, ImageFeePrice, InstancePrice, KindTotal, LicenceClass, RegionPrices,
        SnapshotPrice,
    };

    fn link(id: &str) -> LineageLink {
        LineageLink {
            image_id: id.into(),
            ..Default::default()
        }
    }

    fn words(line: &str) -> Vec<&str> {
        line.split_whitespace().collect()
    }

    #[test]
    fn gb_rounds_half_up_to_hundredths() {
        assert_eq!(gb(0), "0.00");
        assert_eq!(gb(1 << 30), "1.00");
        assert_eq!(gb(80 << 30), "80.00");
        assert_eq!(gb((1 << 30) + (1 << 30) / 200 + 1), "1.01");
        assert_eq!(gb((1 << 30) / 200 - 1), "0.00");
    }

    #[test]
    fn chains_read_from_the_launched_image_to_the_root() {
        let chain = [link("img-a"), link("img-b"), link("img-root")];
        assert_eq!(chain_text(&chain), "img-a <- img-b <- img-root");
        assert_eq!(chain_csv(&chain), "img-a;img-b;img-root");
    }

    fn book() -> DescribePriceBookResponse {
        let price = |t: &str, p: &str| InstancePrice {
            instance_type: t.into(),
            hourly: p.into(),
        };
        DescribePriceBookResponse {
            currency: "USD".into(),
            region_set: vec![
                RegionPrices {
                    region: "ap-guangzhou".into(),
                    mainland: true,
                    instance_hour: vec![price("S5.MEDIUM4", "0.03")],
                    windows_hour: vec![],
                    licence_hour: vec![LicenceClass {
                        min_vcpu: 1,
                        max_vcpu: 4,
                        hourly: "0.05".into(),
                    }],
                    snapshot_gb_hour: "0.00005".into(),
                    free_tier_gb: 80,
                },
                RegionPrices {
                    region: "ap-singapore".into(),
                    mainland: false,
                    instance_hour: vec![
                        price("S5.MEDIUM4", "0.0364"),
                        price("S5.LARGE8", "0.0728"),
                    ],
                    windows_hour: vec![price("S5.MEDIUM4", "0.0184")],
                    licence_hour: vec![],
                    snapshot_gb_hour: "0.000075".into(),
                    free_tier_gb: 0,
                },
            ],
        }
    }

    #[test]
    fn price_tables_mark_free_and_missing_windows_fees() {
        let text = price_tables(&book());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            words(lines[0]),
            ["REGION", "INSTANCE_TYPE", "HOURLY", "WINDOWS_FEE"]
        );
        assert_eq!(
            words(lines[1]),
            ["ap-guangzhou", "S5.MEDIUM4", "0.03", "free"]
        );
        assert_eq!(
            words(lines[2]),
            ["ap-singapore", "S5.MEDIUM4", "0.0364", "0.0184"]
        );
        assert_eq!(
            words(lines[3]),
            ["ap-singapore", "S5.LARGE8", "0.0728", "-"]
        );
        assert!(text.contains("ap-guangzhou  1-4           0.05"), "{text}");
        assert!(
            text.contains("ap-guangzhou  0.00005           80"),
            "{text}"
        );
        assert!(
            text.ends_with("Windows is free on the mainland\n"),
            "{text}"
        );
        assert!(text.contains("prices in USD"), "{text}");
        assert_eq!(
            price_tables(&DescribePriceBookResponse::default()),
            "no prices found\n"
        );
    }

    #[test]
    fn price_csv_has_a_row_per_price() {
        let text = price_csv(&book());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "region,kind,instance_type,min_vcpu,max_vcpu,unit,price,currency,free_tier_gb",
                "ap-guangzhou,INSTANCE,S5.MEDIUM4,,,HOUR,0.03,USD,",
                "ap-guangzhou,WINDOWS_FEE,S5.MEDIUM4,,,HOUR,0,USD,",
                "ap-guangzhou,LICENCE_FEE,,1,4,HOUR,0.05,USD,",
                "ap-guangzhou,SNAPSHOT_STORAGE,,,,GB_HOUR,0.00005,USD,80",
                "ap-singapore,INSTANCE,S5.MEDIUM4,,,HOUR,0.0364,USD,",
                "ap-singapore,INSTANCE,S5.LARGE8,,,HOUR,0.0728,USD,",
                "ap-singapore,WINDOWS_FEE,S5.MEDIUM4,,,HOUR,0.0184,USD,",
                "ap-singapore,SNAPSHOT_STORAGE,,,,GB_HOUR,0.000075,USD,0",
            ]
        );
    }

    fn part(unit_price: &str, quantity: &str, unit: &str, amount: &str) -> Option<PricePart> {
        Some(PricePart {
            unit_price: unit_price.into(),
            unit: unit.into(),
            quantity: quantity.into(),
            amount: amount.into(),
        })
    }

    #[test]
    fn a_free_launch_says_there_is_no_image_fee() {
        let price = RunPrice {
            currency: "USD".into(),
            region: "ap-guangzhou".into(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 1,
            hours: 1,
            instance: part("0.03", "1", "HOUR", "0.03"),
            image_fee: None,
            snapshot: None,
            total: "0.03".into(),
        };
        let text = run_price_table(&price);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[2].starts_with("IMAGE_FEE"), "{text}");
        assert!(lines[2].contains("none"), "{text}");
        assert_eq!(words(lines[3]), ["TOTAL", "-", "-", "-", "0.03", "USD"]);
        assert_eq!(
            run_price_csv(&price),
            "item,unit_price,quantity,unit,amount,currency,cause,root_image_id,chain\n\
             INSTANCE,0.03,1,HOUR,0.03,USD,,,\n\
             TOTAL,,,,0.03,USD,,,\n"
        );
    }

    #[test]
    fn a_paid_launch_names_the_root_and_the_chain() {
        let price = RunPrice {
            currency: "USD".into(),
            region: "ap-singapore".into(),
            instance_type: "S5.MEDIUM4".into(),
            instance_count: 2,
            hours: 10,
            instance: part("0.0364", "20", "HOUR", "0.728"),
            image_fee: Some(ImageFeePrice {
                cause: "WINDOWS".into(),
                root_image_id: "img-root".into(),
                chain: vec![link("img-a"), link("img-root")],
                price: part("0.0184", "20", "HOUR", "0.368"),
            }),
            snapshot: Some(SnapshotPrice {
                bytes_held: 100 << 30,
                free_tier_bytes: 0,
                billable_bytes: 100 << 30,
                price: part("0.000075", "1000", "GB_HOUR", "0.075"),
            }),
            total: "1.171".into(),
        };
        let text = run_price_table(&price);
        assert!(
            text.contains("WINDOWS, paid root img-root: img-a <- img-root"),
            "{text}"
        );
        assert!(
            text.contains("100.00 GB held, 0.00 GB free, 100.00 GB billable"),
            "{text}"
        );
        let csv = run_price_csv(&price);
        assert!(
            csv.contains("\nIMAGE_FEE,0.0184,20,HOUR,0.368,USD,WINDOWS,img-root,img-a;img-root\n"),
            "{csv}"
        );
        assert!(
            csv.contains("\nSNAPSHOT_STORAGE,0.000075,1000,GB_HOUR,0.075,USD,,,\n"),
            "{csv}"
        );
    }

    #[test]
    fn an_empty_bill_still_has_its_total() {
        let bill = DescribeBillResponse {
            account_id: "100000000001".into(),
            from: "2026-12-01T00:00:00Z".into(),
            to: "2026-12-02T00:00:00Z".into(),
            currency: "USD".into(),
            total: "0".into(),
            ..Default::default()
        };
        let text = bill_text(&bill);
        assert!(text.starts_with("no line items\n"), "{text}");
        assert!(text.contains("\nTOTAL     0       USD\n"), "{text}");
        assert_eq!(
            bill_csv(&bill),
            "kind,region,resource_ids,instance_type,vcpu,quantity,unit,unit_price,amount,currency,cause,image_id,root_image_id,chain\n"
        );
    }

    #[test]
    fn licence_fees_name_the_vcpu_class_they_were_priced_by() {
        let bill = DescribeBillResponse {
            currency: "USD".into(),
            line_items: vec![LineItem {
                kind: "IMAGE_FEE".into(),
                region: "ap-guangzhou".into(),
                resource_ids: vec!["ins-a".into(), "img-a".into()],
                vcpu: 4,
                unit: "HOUR".into(),
                quantity: "2".into(),
                unit_price: "0.05".into(),
                amount: "0.1".into(),
                image_fee: Some(ImageFee {
                    cause: "LICENSED".into(),
                    image_id: "img-a".into(),
                    root_image_id: "img-rhel".into(),
                    chain: vec![link("img-a"), link("img-rhel")],
                }),
                ..Default::default()
            }],
            totals: vec![KindTotal {
                kind: "IMAGE_FEE".into(),
                amount: "0.1".into(),
            }],
            total: "0.1".into(),
            anomalies: vec!["event ap-guangzhou/7: unknown type".into()],
            ..Default::default()
        };
        let text = bill_text(&bill);
        assert!(
            text.contains("LICENSED (4 vCPU), paid root img-rhel: img-a <- img-rhel"),
            "{text}"
        );
        assert!(text.contains("ins-a,img-a"), "{text}");
        assert!(
            text.ends_with("not priced: event ap-guangzhou/7: unknown type\n"),
            "{text}"
        );
        assert!(
            bill_csv(&bill).ends_with(
                "\nIMAGE_FEE,ap-guangzhou,ins-a;img-a,,4,2,HOUR,0.05,0.1,USD,LICENSED,img-a,img-rhel,img-a;img-rhel\n"
            ),
            "{}",
            bill_csv(&bill)
        );
    }
}
