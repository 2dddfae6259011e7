//! Input checks for the region API: ids, names, filters and pages. Every failure is
//! `INVALID_ARGUMENT` naming the field, checked before anything changes.

use imagefleet_proto::error::invalid_argument;
use imagefleet_proto::region::v1::Filter;
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
    if name.chars().any(char::is_control) {
        return Err(invalid_argument(
            field,
            "InvalidImageName.Malformed",
            "image names cannot contain control characters",
        ));
    }
    Ok(())
}

pub fn description(field: &str, text: &str) -> Result<(), Status> {
    if text.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(invalid_argument(
            field,
            "InvalidParameterValue.TooLong",
            format!("descriptions are at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    Ok(())
}

/// Resolves offset/limit/page_token into (offset, limit).
pub fn page(offset: u32, limit: u32, page_token: &str) -> Result<(usize, usize), Status> {
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
    let decoded = hex::decode(page_token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.strip_prefix("offset:")
                .and_then(|n| n.parse::<usize>().ok())
        });
    match decoded {
        Some(offset) => Ok((offset, limit)),
        None => Err(invalid_argument(
            "page_token",
            "InvalidParameterValue.PageToken",
            "page_token is not one this service issued",
        )),
    }
}

/// The token for the page after `offset + limit`, if there is one.
pub fn next_page_token(offset: usize, limit: usize, total: usize) -> String {
    if offset + limit < total {
        hex::encode(format!("offset:{}", offset + limit))
    } else {
        String::new()
    }
}

/// Checks filter names against `allowed` and that each has values.
pub fn filters(filters: &[Filter], allowed: &[&str]) -> Result<(), Status> {
    if filters.len() > 10 {
        return Err(invalid_argument(
            "filters",
            "InvalidFilter",
            "at most 10 filters",
        ));
    }
    for f in filters {
        if !allowed.contains(&f.name.as_str()) {
            return Err(invalid_argument(
                "filters",
                "InvalidFilter",
                format!(
                    "unknown filter {:?}; filters are {}",
                    f.name,
                    allowed.join(", ")
                ),
            ));
        }
        if f.values.is_empty() || f.values.len() > 100 {
            return Err(invalid_argument(
                "filters",
                "InvalidFilterValue.LimitExceeded",
                format!("filter {} takes 1 to 100 values", f.name),
            ));
        }
    }
    Ok(())
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
    }

    #[test]
    fn pages_round_trip_and_limits_hold() {
        assert_eq!(page(0, 0, "").unwrap(), (0, 20));
        assert!(page(0, 101, "").is_err());
        let token = next_page_token(0, 20, 45);
        assert_eq!(page(0, 20, &token).unwrap(), (20, 20));
        assert_eq!(next_page_token(40, 20, 45), "");
        assert!(page(0, 20, "zz").is_err());
    }
}
