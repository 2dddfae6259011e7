//! Input checks for the region API: ids, names, filters and pages. Every failure is
//! `INVALID_ARGUMENT` naming the field, checked before anything changes.

use imagefleet_proto::error::invalid_argument;
use imagefleet_proto::region::v1::Filter;
use imagefleet_proto::text;
use tonic::Status;

pub const MAX_PAGE: u32 = 100;
pub const DEFAULT_PAGE: u32 = 20;
pub const MAX_NAME_CHARS: usize = 60;
pub const MAX_DESCRIPTION_CHARS: usize = 256;
pub const MAX_IO_BYTES: u64 = 4 * 1024 * 1024;

pub use imagefleet_proto::ids::{check_image_id as image_id, check_instance_id as instance_id};

/// A list of ids: at most `MAX_PAGE`, each well-formed, no repeats.
pub fn id_list(
    field: &str,
    ids: &[String],
    check: fn(&str, &str) -> Result<(), Status>,
) -> Result<(), Status> {
    if ids.len() > MAX_PAGE as usize {
        return Err(invalid_argument(
            field,
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_PAGE} ids per call"),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        check(field, id)?;
        if !seen.insert(id) {
            return Err(invalid_argument(
                field,
                "InvalidParameterValue.Duplicate",
                format!("{id} is listed twice"),
            ));
        }
    }
    Ok(())
}

pub fn image_name(field: &str, name: &str) -> Result<(), Status> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_NAME_CHARS {
        return Err(invalid_argument(
            field,
            "InvalidImageName.Malformed",
            format!("image names are 1 to {MAX_NAME_CHARS} characters"),
        ));
    }
    text::check(field, name)
}

pub fn description(field: &str, text: &str) -> Result<(), Status> {
    if text.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(invalid_argument(
            field,
            "InvalidParameterValue.TooLong",
            format!("descriptions are at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    text::check(field, text)
}

/// An instance name: at most `MAX_NAME_CHARS`, free text; empty means the default name.
pub fn instance_name(field: &str, name: &str) -> Result<(), Status> {
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(invalid_argument(
            field,
            "InvalidParameterValue.TooLong",
            format!("instance names are at most {MAX_NAME_CHARS} characters"),
        ));
    }
    text::check(field, name)
}

/// Which list a page token belongs to: a token of one list is refused by another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Listing {
    Images = 1,
    Instances = 2,
}

const PAGE_TOKEN_VERSION: u8 = 1;
/// Version, listing, offset (u32, big-endian).
const PAGE_TOKEN_BODY: usize = 6;
const PAGE_TOKEN_TAG: usize = 8;

/// The check of a page token's body: it tells a token this service issued from a mistyped,
/// truncated or edited one.
fn page_token_tag(body: &[u8]) -> [u8; PAGE_TOKEN_TAG] {
    use sha2::Digest;
    let digest = sha2::Sha256::new()
        .chain_update(b"imagefleet.region.page-token")
        .chain_update(body)
        .finalize();
    let mut tag = [0u8; PAGE_TOKEN_TAG];
    tag.copy_from_slice(&digest[..PAGE_TOKEN_TAG]);
    tag
}

/// A page token: hex of version, listing and offset, followed by their check. Opaque to
/// clients.
fn encode_page_token(listing: Listing, offset: u32) -> String {
    let mut bytes = Vec::with_capacity(PAGE_TOKEN_BODY + PAGE_TOKEN_TAG);
    bytes.push(PAGE_TOKEN_VERSION);
    bytes.push(listing as u8);
    bytes.extend_from_slice(&offset.to_be_bytes());
    let tag = page_token_tag(&bytes);
    bytes.extend_from_slice(&tag);
    hex::encode(bytes)
}

/// The offset a page token names, if it is one this service issued for `listing`.
fn decode_page_token(listing: Listing, token: &str) -> Option<u32> {
    if token.len() != 2 * (PAGE_TOKEN_BODY + PAGE_TOKEN_TAG) {
        return None;
    }
    let bytes = hex::decode(token).ok()?;
    let (body, tag) = bytes.split_at(PAGE_TOKEN_BODY);
    if tag != page_token_tag(body) || body[0] != PAGE_TOKEN_VERSION || body[1] != listing as u8 {
        return None;
    }
    Some(u32::from_be_bytes([body[2], body[3], body[4], body[5]]))
}

/// Resolves offset/limit/page_token of a `listing` into (offset, limit).
pub fn page(
    listing: Listing,
    offset: u32,
    limit: u32,
    page_token: &str,
) -> Result<(usize, usize), Status> {
    if limit > MAX_PAGE {
        return Err(invalid_argument(
            "limit",
            "InvalidParameterValue.LimitExceeded",
            format!("limit is at most {MAX_PAGE}"),
        ));
    }
    let limit = if limit == 0 { DEFAULT_PAGE } else { limit } as usize;
    if page_token.is_empty() {
        return Ok((offset as usize, limit));
    }
    if offset != 0 {
        return Err(invalid_argument(
            "page_token",
            "InvalidParameter.Conflict",
            "give offset or page_token, not both",
        ));
    }
    match decode_page_token(listing, page_token) {
        Some(offset) => Ok((offset as usize, limit)),
        None => Err(invalid_argument(
            "page_token",
            "InvalidParameterValue.PageToken",
            "page_token is not one this service issued for this list",
        )),
    }
}

/// The token for the page after `offset + limit` of a `listing`, if there is one.
pub fn next_page_token(listing: Listing, offset: usize, limit: usize, total: usize) -> String {
    let next = offset.saturating_add(limit);
    match u32::try_from(next) {
        Ok(next_offset) if next < total => encode_page_token(listing, next_offset),
        _ => String::new(),
    }
}

/// What values a filter takes.
pub enum FilterValues {
    /// Ids, each checked by the function (e.g. `image_id`).
    Ids(fn(&str, &str) -> Result<(), Status>),
    /// One of a fixed set of names (states, types).
    OneOf(Vec<&'static str>),
    /// Free text (names, platforms).
    Text,
}

/// A filter a list accepts.
pub struct FilterSpec {
    pub name: &'static str,
    pub values: FilterValues,
}

/// Checks filter names against `allowed`, that each has 1 to 100 values, and that every value
/// is one the filter can match (`InvalidFilterValue*`, never a filter silently matching
/// nothing because of a typo).
pub fn filters(filters: &[Filter], allowed: &[FilterSpec]) -> Result<(), Status> {
    if filters.len() > 10 {
        return Err(invalid_argument(
            "filters",
            "InvalidFilter",
            "at most 10 filters",
        ));
    }
    for f in filters {
        let Some(spec) = allowed.iter().find(|spec| spec.name == f.name) else {
            return Err(invalid_argument(
                "filters",
                "InvalidFilter",
                format!(
                    "unknown filter {:?}; filters are {}",
                    f.name,
                    allowed
                        .iter()
                        .map(|spec| spec.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        if f.values.is_empty() || f.values.len() > 100 {
            return Err(invalid_argument(
                "filters",
                "InvalidFilterValue.LimitExceeded",
                format!("filter {} takes 1 to 100 values", f.name),
            ));
        }
        for value in &f.values {
            filter_value(spec, value)?;
        }
    }
    Ok(())
}

fn filter_value(spec: &FilterSpec, value: &str) -> Result<(), Status> {
    let name = spec.name;
    match &spec.values {
        FilterValues::Ids(check) => check("filters", value).map_err(|_| {
            invalid_argument(
                "filters",
                "InvalidFilterValue.Malformed",
                format!("{name} {value:?} is not a well-formed id"),
            )
        }),
        FilterValues::OneOf(names) if names.contains(&value) => Ok(()),
        FilterValues::OneOf(names) => Err(invalid_argument(
            "filters",
            "InvalidFilterValue",
            format!("{name} {value:?} is not one of {}", names.join(", ")),
        )),
        FilterValues::Text => match text::problem(value) {
            None if value.chars().count() <= MAX_DESCRIPTION_CHARS => Ok(()),
            None => Err(invalid_argument(
                "filters",
                "InvalidFilterValue.TooLong",
                format!("{name} values are at most {MAX_DESCRIPTION_CHARS} characters"),
            )),
            Some((reason, message)) => Err(invalid_argument(
                "filters",
                if reason == text::BLANK {
                    "InvalidFilterValue.Blank"
                } else {
                    "InvalidFilterValue.InvalidCharacters"
                },
                format!("{name} values {message}"),
            )),
        },
    }
}

/// True if every filter has a value equal to what `field` returns for its name.
pub fn matches(filters: &[Filter], field: impl Fn(&str) -> String) -> bool {
    filters.iter().all(|f| {
        let value = field(&f.name);
        f.values.contains(&value)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert!(image_id("image_id", "img-abc12345").is_ok());
        for bad in [
            "img-ABC12345",
            "img-abc1234",
            "ins-abc12345",
            "",
            "img-abc123456",
        ] {
            assert!(image_id("image_id", bad).is_err(), "{bad}");
        }
        assert!(image_name("image_name", &"x".repeat(60)).is_ok());
        assert!(image_name("image_name", &"x".repeat(61)).is_err());
        assert!(image_name("image_name", "").is_err());
        for bad in [" ", "\u{200B}", "a\u{202E}b", "a\nb", "\u{1b}]0;x\u{7}"] {
            assert!(image_name("image_name", bad).is_err(), "{bad:?}");
            assert!(description("image_description", bad).is_err(), "{bad:?}");
            assert!(instance_name("instance_name", bad).is_err(), "{bad:?}");
        }
        assert!(description("image_description", "").is_ok());
        assert!(instance_name("instance_name", "").is_ok());
    }

    #[test]
    fn pages_round_trip_and_limits_hold() {
        use Listing::*;
        assert_eq!(page(Images, 0, 0, "").unwrap(), (0, 20));
        assert!(page(Images, 0, 101, "").is_err());
        let token = next_page_token(Images, 0, 20, 45);
        assert_eq!(page(Images, 0, 20, &token).unwrap(), (20, 20));
        assert_eq!(next_page_token(Images, 40, 20, 45), "");
        assert!(page(Images, 0, 20, "zz").is_err());
        // A token of one list is not one of another.
        assert!(page(Instances, 0, 20, &token).is_err());
    }

    #[test]
    fn edited_and_forged_page_tokens_are_refused() {
        let token = next_page_token(Listing::Images, 0, 20, 45);
        let mut edited = token.clone().into_bytes();
        // Change one hex digit of the offset.
        edited[9] = if edited[9] == b'0' { b'1' } else { b'0' };
        let edited = String::from_utf8(edited).unwrap();
        assert!(page(Listing::Images, 0, 20, &edited).is_err());
        // The old plain form, with an offset that would wrap.
        let old = hex::encode("offset:18446744073709551610");
        let refused = page(Listing::Images, 0, 20, &old).unwrap_err();
        assert_eq!(
            imagefleet_proto::error::reason(&refused).as_deref(),
            Some("InvalidParameterValue.PageToken")
        );
        assert!(page(Listing::Images, 0, 20, &format!("{token}00")).is_err());
        // No offset makes the next token overflow.
        assert_eq!(next_page_token(Listing::Images, usize::MAX, 20, 45), "");
        let last = next_page_token(Listing::Images, u32::MAX as usize - 10, 5, usize::MAX);
        assert_eq!(
            page(Listing::Images, 0, 5, &last).unwrap(),
            (u32::MAX as usize - 5, 5)
        );
        assert_eq!(
            next_page_token(Listing::Images, u32::MAX as usize, 5, usize::MAX),
            ""
        );
    }

    #[test]
    fn filter_values_are_checked() {
        let specs = [
            FilterSpec {
                name: "image-id",
                values: FilterValues::Ids(image_id),
            },
            FilterSpec {
                name: "image-state",
                values: FilterValues::OneOf(vec!["NORMAL", "CREATING"]),
            },
            FilterSpec {
                name: "image-name",
                values: FilterValues::Text,
            },
        ];
        let filter = |name: &str, value: &str| Filter {
            name: name.into(),
            values: vec![value.into()],
        };
        let reason_of = |f: Filter| {
            filters(&[f], &specs)
                .err()
                .and_then(|s| imagefleet_proto::error::reason(&s))
        };
        assert_eq!(reason_of(filter("image-state", "NORMAL")), None);
        assert_eq!(reason_of(filter("image-name", "web")), None);
        assert_eq!(reason_of(filter("image-id", "img-abc12345")), None);
        assert_eq!(
            reason_of(filter("image-state", "BOGUS")).as_deref(),
            Some("InvalidFilterValue")
        );
        assert_eq!(
            reason_of(filter("image-id", "nope")).as_deref(),
            Some("InvalidFilterValue.Malformed")
        );
        assert_eq!(
            reason_of(filter("image-name", "\u{1b}[2J")).as_deref(),
            Some("InvalidFilterValue.InvalidCharacters")
        );
        assert_eq!(
            reason_of(filter("bogus", "x")).as_deref(),
            Some("InvalidFilter")
        );
    }
}
