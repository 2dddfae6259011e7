//! How results are printed: aligned tables for people, proto3 JSON and CSV for programs. Text that
//! came from a server (names, descriptions, reasons, error messages) never reaches the terminal
//! with its control or bidirectional formatting characters: `escape` makes them visible.

use crate::error::{CliError, Result};
use imagefleet_proto::text::{is_bidi_control, is_control};
use prost_reflect::{DynamicMessage, SerializeOptions};
use std::borrow::Cow;

/// A character that must not reach a terminal as itself: a control character (C0, DEL, C1,
/// line and paragraph separators) or a bidirectional formatting character.
pub fn must_escape(c: char) -> bool {
    is_control(c) || is_bidi_control(c)
}

/// `text` as it may be printed: every character of `must_escape` written as a visible escape
/// (`\n`, `\t`, `\r`, else `\u{1b}`), everything else unchanged. Tables, field lists, progress
/// lines and error messages go through it; JSON output escapes the same characters as `\uXXXX`.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(must_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if must_escape(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// A prost message that knows its full proto name, so it can be rendered as proto3 JSON
/// through the descriptor pool.
pub trait ProtoMessage: prost::Message {
    const FULL_NAME: &'static str;
}

macro_rules! proto_messages {
    ($package:literal, $module:ident: $($message:ident),* $(,)?) => {
        $(
            impl ProtoMessage for $module::$message {
                const FULL_NAME: &'static str = concat!($package, ".", stringify!($message));
            }
        )*
    };
}

use imagefleet_proto::billing::v1 as billing;
use imagefleet_proto::catalog::v1 as catalog;
use imagefleet_proto::region::v1 as region;

proto_messages!("imagefleet.catalog.v1", catalog: DescribeRegionsResponse);
proto_messages!(
    "imagefleet.billing.v1",
    billing: DescribePriceBookResponse,
    DescribeBillResponse,
);
proto_messages!(
    "imagefleet.region.v1",
    region: Image,
    DescribeImagesResponse,
    DescribeImageQuotaResponse,
    ModifyImageAttributeResponse,
    DeleteImagesResponse,
    CreateImageResponse,
    RunInstancesResponse,
    DescribeInstancesResponse,
    TerminateInstancesResponse,
    ResetInstanceResponse,
    SyncImagesResponse,
    ModifyImageSharePermissionResponse,
    DescribeImageSharePermissionResponse,
    DescribeInstanceTypeConfigsResponse,
    DescribeImportImageOsResponse,
    InquiryPriceRunInstancesResponse,
);

/// A message as proto3 JSON: enum values by name, every field present (defaults included).
pub fn json_value<M: ProtoMessage>(message: &M) -> Result<serde_json::Value> {
    let descriptor = imagefleet_proto::descriptor_pool()
        .get_message_by_name(M::FULL_NAME)
        .ok_or_else(|| {
            CliError::Failed(format!("no descriptor for {} in the pool", M::FULL_NAME))
        })?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| CliError::Failed(format!("cannot re-decode {}: {e}", M::FULL_NAME)))?;
    let options = SerializeOptions::new().skip_default_fields(false);
    dynamic
        .serialize_with_options(serde_json::value::Serializer, &options)
        .map_err(|e| CliError::Failed(format!("cannot render {} as JSON: {e}", M::FULL_NAME)))
}

/// A JSON value as the one document printed on stdout.
pub fn json_document(value: &serde_json::Value) -> String {
    // Serializing a `Value` to a string cannot fail (its map keys are strings).
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    // serde_json escapes C0 controls inside strings itself (the new lines and spaces left are
    // the layout's); DEL, C1, the separators and bidirectional formatting characters it writes
    // as they are. Those can only stand inside strings, where `\uXXXX` means the same
    // character (all of them are in the Basic Multilingual Plane).
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if !c.is_ascii() && must_escape(c) || c == '\u{7f}' {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.push('\n');
    out
}

/// A message as the one JSON document printed on stdout.
pub fn json<M: ProtoMessage>(message: &M) -> Result<String> {
    Ok(json_document(&json_value(message)?))
}

/// A table with a header row and columns padded to their widest cell. Empty cells print as
/// `-` so that every row splits into the same number of words.
#[derive(Debug)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain(std::iter::once(self.header.len()))
            .max()
            .unwrap_or(0);
        let cell = |row: &[String], i: usize| -> String {
            match row.get(i).map(|c| c.as_str()) {
                None | Some("") => "-".to_string(),
                Some(text) => escape(text).into_owned(),
            }
        };
        let all_rows = std::iter::once(&self.header).chain(self.rows.iter());
        let mut widths = vec![0usize; columns];
        for row in all_rows.clone() {
            for (i, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        for row in all_rows {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let text = cell(row, i);
                if i + 1 == columns {
                    line.push_str(&text);
                } else {
                    line.push_str(&text);
                    let pad = width - text.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Comma-separated values (RFC 4180 quoting, `\n` line ends): a header row, then one line per
/// row. A field is quoted (`"`, with inner quotes doubled) when it holds a comma, a quote or
/// leading or trailing spaces; characters of `must_escape` are made visible first, as in
/// tables, so a field never spans lines.
#[derive(Debug)]
pub struct Csv {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Csv {
    pub fn new(header: &[&str]) -> Self {
        Csv {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for row in std::iter::once(&self.header).chain(self.rows.iter()) {
            let fields: Vec<String> = (0..self.header.len())
                .map(|i| csv_field(row.get(i).map(String::as_str).unwrap_or("")))
                .collect();
            out.push_str(&fields.join(","));
            out.push('\n');
        }
        out
    }
}

fn csv_field(text: &str) -> String {
    let text = escape(text);
    if text.contains([',', '"']) || text.starts_with(' ') || text.ends_with(' ') {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.into_owned()
    }
}

/// Ids alone, one a line (`--output id`), escaped like every server text.
pub fn ids<'a>(ids: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for id in ids {
        out.push_str(&escape(id));
        out.push('\n');
    }
    out
}

/// A list as a table for people: the rows and a total line (`20 of 506 shown; --all or
/// --limit N --offset 20 for more` when more exist), or one line saying nothing matched.
/// `noun` names the items in the plural (`images`); `offset` is where the rows start.
pub fn list_table(rows: &Table, noun: &str, offset: u32, total: u32, more: bool) -> String {
    let shown = rows.rows.len();
    if shown == 0 {
        return if offset > 0 && total > 0 {
            format!("no {noun} from offset {offset} ({total} in all)\n")
        } else {
            format!("no {noun} found\n")
        };
    }
    let mut out = rows.render();
    let next = u64::from(offset) + shown as u64;
    let total = u64::from(total).max(next);
    if more || next < total {
        out.push_str(&format!(
            "{shown} of {total} shown; --all or --limit N --offset {next} for more\n"
        ));
    } else if offset > 0 {
        out.push_str(&format!(
            "{shown} of {total} shown (from offset {offset})\n"
        ));
    } else {
        out.push_str(&format!("{shown} of {total} shown\n"));
    }
    out
}

/// Fields shown one per line (`NAME  value`), for a single object's every field.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let value = if value.is_empty() {
            Cow::Borrowed("-")
        } else {
            escape(value)
        };
        out.push_str(&format!("{key:<width$}  {value}\n"));
    }
    out
}

/// The name of an enum value (`NORMAL`), or its number if this client does not know it.
pub fn enum_name<E>(value: i32, name: impl Fn(&E) -> &'static str) -> String
where
    E: TryFrom<i32>,
{
    E::try_from(value)
        .map(|e| name(&e).to_string())
        .unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use region::{DescribeImagesResponse, Image, ImageState, ImageType};

    #[test]
    fn tables_align_their_columns() {
        let mut table = Table::new(&["IMAGE_ID", "NAME", "STATE"]);
        table.row(vec!["img-aaaaaaaa".into(), "a".into(), "NORMAL".into()]);
        table.row(vec!["img-b".into(), "".into(), "CREATING".into()]);
        assert_eq!(
            table.render(),
            "IMAGE_ID      NAME  STATE\n\
             img-aaaaaaaa  a     NORMAL\n\
             img-b         -     CREATING\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        let table = Table::new(&["A", "BB"]);
        assert_eq!(table.render(), "A  BB\n");
    }

    #[test]
    fn list_tables_end_with_the_total_and_a_next_page_hint() {
        let mut table = Table::new(&["IMAGE_ID"]);
        table.row(vec!["img-aaaaaaaa".into()]);
        table.row(vec!["img-bbbbbbbb".into()]);
        assert_eq!(
            list_table(&table, "images", 0, 506, true),
            "IMAGE_ID\nimg-aaaaaaaa\nimg-bbbbbbbb\n\
             2 of 506 shown; --all or --limit N --offset 2 for more\n"
        );
        assert_eq!(
            list_table(&table, "images", 0, 2, false),
            "IMAGE_ID\nimg-aaaaaaaa\nimg-bbbbbbbb\n2 of 2 shown\n"
        );
        assert_eq!(
            list_table(&table, "images", 4, 6, false),
            "IMAGE_ID\nimg-aaaaaaaa\nimg-bbbbbbbb\n2 of 6 shown (from offset 4)\n"
        );
        let empty = Table::new(&["IMAGE_ID"]);
        assert_eq!(
            list_table(&empty, "images", 0, 0, false),
            "no images found\n"
        );
        assert_eq!(
            list_table(&empty, "instances", 40, 3, false),
            "no instances from offset 40 (3 in all)\n"
        );
    }

    #[test]
    fn ids_are_one_a_line() {
        assert_eq!(ids(["img-a", "img-b"]), "img-a\nimg-b\n");
        assert_eq!(ids([]), "");
        assert_eq!(ids(["x\ny"]), "x\\ny\n");
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut csv = Csv::new(&["kind", "resource_ids", "amount"]);
        csv.row(vec![
            "INSTANCE".into(),
            "ins-a;ins-b".into(),
            "0.3288".into(),
        ]);
        csv.row(vec!["NOTE".into(), "a,b \"c\"".into(), " 1".into()]);
        csv.row(vec!["SHORT".into()]);
        csv.row(vec!["X".into(), "line\nbreak\u{1b}".into(), String::new()]);
        assert_eq!(
            csv.render(),
            "kind,resource_ids,amount\n\
             INSTANCE,ins-a;ins-b,0.3288\n\
             NOTE,\"a,b \"\"c\"\"\",\" 1\"\n\
             SHORT,,\n\
             X,line\\nbreak\\u{1b},\n"
        );
    }

    #[test]
    fn fields_align_their_values() {
        assert_eq!(
            fields(&[("ID", "img-1".into()), ("STATE", String::new())]),
            "ID     img-1\nSTATE  -\n"
        );
    }

    #[test]
    fn json_uses_enum_names_and_keeps_defaults() {
        let response = DescribeImagesResponse {
            image_set: vec![Image {
                image_id: "img-aaaaaaaa".into(),
                image_state: ImageState::Normal as i32,
                image_type: ImageType::PrivateImage as i32,
                virtual_size_bytes: 1 << 30,
                ..Default::default()
            }],
            total_count: 1,
            next_page_token: String::new(),
        };
        let value = json_value(&response).expect("renders");
        let image = &value["imageSet"][0];
        assert_eq!(image["imageId"], "img-aaaaaaaa");
        assert_eq!(image["imageState"], "NORMAL");
        assert_eq!(image["imageType"], "PRIVATE_IMAGE");
        assert_eq!(image["imageSource"], "IMAGE_SOURCE_UNSPECIFIED");
        assert_eq!(image["imageName"], "");
        assert_eq!(image["syncPercent"], 0);
        assert_eq!(image["virtualSizeBytes"], "1073741824");
        assert_eq!(value["totalCount"], 1);
        assert_eq!(value["nextPageToken"], "");
    }

    #[test]
    fn json_is_one_document() {
        let text = json(&region::DeleteImagesResponse {}).expect("renders");
        assert_eq!(text, "{}\n");
        let parsed: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert!(parsed.is_object());
    }

    #[test]
    fn every_named_message_is_in_the_pool() {
        fn check<M: ProtoMessage>() {
            assert!(
                imagefleet_proto::descriptor_pool()
                    .get_message_by_name(M::FULL_NAME)
                    .is_some(),
                "{}",
                M::FULL_NAME
            );
        }
        check::<catalog::DescribeRegionsResponse>();
        check::<Image>();
        check::<DescribeImagesResponse>();
        check::<region::DescribeImageQuotaResponse>();
        check::<region::ModifyImageAttributeResponse>();
        check::<region::DeleteImagesResponse>();
        check::<region::CreateImageResponse>();
        check::<region::RunInstancesResponse>();
        check::<region::DescribeInstancesResponse>();
        check::<region::TerminateInstancesResponse>();
        check::<region::ResetInstanceResponse>();
        check::<region::SyncImagesResponse>();
        check::<region::ModifyImageSharePermissionResponse>();
        check::<region::DescribeImageSharePermissionResponse>();
        check::<region::DescribeInstanceTypeConfigsResponse>();
        check::<region::InquiryPriceRunInstancesResponse>();
        check::<billing::DescribePriceBookResponse>();
        check::<billing::DescribeBillResponse>();
    }

    /// What an image's owner could write to take over a receiver's terminal: set its title
    /// (OSC 0 ... BEL), clear the screen (CSI 2J), the 8-bit CSI, DEL, a new line starting a
    /// fake row, and a right-to-left override reversing what follows.
    const HOSTILE: &str =
        "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\u{9b}31m\u{7f}\nimg-fake0001  NORMAL\u{202e}exe.txt\u{2066}";

    fn assert_inert(printed: &str) {
        for c in printed.chars() {
            assert!(
                !must_escape(c) || c == '\n',
                "{c:?} reached the output: {printed:?}"
            );
        }
    }

    #[test]
    fn escape_makes_controls_and_bidi_visible() {
        let escaped = escape(HOSTILE);
        assert_eq!(
            escaped,
            "ok\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{9b}31m\\u{7f}\\nimg-fake0001  NORMAL\\u{202e}exe.txt\\u{2066}"
        );
        assert!(!escaped.chars().any(must_escape));
        assert!(matches!(escape("plain 镜像 text"), Cow::Borrowed(_)));
    }

    #[test]
    fn tables_and_fields_print_hostile_text_inert() {
        let mut table = Table::new(&["IMAGE_ID", "NAME"]);
        table.row(vec!["img-aaaaaaaa".into(), HOSTILE.into()]);
        let printed = table.render();
        assert_inert(&printed);
        // One header and one row: the embedded new line did not start a row of its own.
        assert_eq!(printed.lines().count(), 2, "{printed}");
        let printed = fields(&[("DESCRIPTION", HOSTILE.to_string())]);
        assert_inert(&printed);
        assert_eq!(printed.lines().count(), 1, "{printed}");
    }

    #[test]
    fn json_escapes_what_serde_leaves_raw_and_still_parses() {
        let response = DescribeImagesResponse {
            image_set: vec![Image {
                image_id: "img-aaaaaaaa".into(),
                image_description: HOSTILE.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let printed = json(&response).expect("renders");
        assert_inert(&printed);
        let parsed: serde_json::Value = serde_json::from_str(&printed).expect("valid JSON");
        assert_eq!(parsed["imageSet"][0]["imageDescription"], HOSTILE);
    }

    #[test]
    fn unknown_enum_numbers_print_as_numbers() {
        assert_eq!(enum_name(2, ImageState::as_str_name), "NORMAL");
        assert_eq!(enum_name(99, ImageState::as_str_name), "99");
    }
}
