//! The formats of the API's ids, and the checks that turn a malformed one into
//! `INVALID_ARGUMENT` naming the field.

use crate::error::invalid_argument;
use tonic::Status;

fn prefixed(value: &str, prefix: &str) -> bool {
    value.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 8
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    })
}

/// `img-` followed by exactly 8 lowercase ASCII letters or digits.
pub fn is_image_id(value: &str) -> bool {
    prefixed(value, "img-")
}

/// `ins-` followed by exactly 8 lowercase ASCII letters or digits.
pub fn is_instance_id(value: &str) -> bool {
    prefixed(value, "ins-")
}

/// Exactly 12 ASCII digits.
pub fn is_account_id(value: &str) -> bool {
    value.len() == 12 && value.bytes().all(|b| b.is_ascii_digit())
}

pub fn check_image_id(field: &str, value: &str) -> Result<(), Status> {
    if is_image_id(value) {
        return Ok(());
    }
    Err(invalid_argument(
        field,
        "InvalidImageId.Malformed",
        format!("{value:?} is not an image id (img- and 8 lowercase letters or digits)"),
    ))
}

pub fn check_instance_id(field: &str, value: &str) -> Result<(), Status> {
    if is_instance_id(value) {
        return Ok(());
    }
    Err(invalid_argument(
        field,
        "InvalidInstanceId.Malformed",
        format!("{value:?} is not an instance id (ins- and 8 lowercase letters or digits)"),
    ))
}

pub fn check_account_id(field: &str, value: &str) -> Result<(), Status> {
    if is_account_id(value) {
        return Ok(());
    }
    Err(invalid_argument(
        field,
        "InvalidAccountId.Malformed",
        format!("{value:?} is not an account id (12 digits)"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert!(is_image_id("img-0a1b2c3d"));
        for bad in [
            "img-0A1b2c3d",
            "img-0a1b2c3",
            "img-0a1b2c3de",
            "ins-0a1b2c3d",
            "",
        ] {
            assert!(!is_image_id(bad), "{bad}");
        }
        assert!(is_instance_id("ins-abcdefgh"));
        assert!(is_account_id("100000000001"));
        assert!(!is_account_id("10000000001"));
        assert!(!is_account_id("10000000000a"));
    }
}
