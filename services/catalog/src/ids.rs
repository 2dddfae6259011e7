//! The formats of the ids the catalog keeps: image ids (`img-` + 8 lowercase alphanumerics) and
//! account ids (12 digits), and the checks that turn a malformed one into `INVALID_ARGUMENT`.

use crate::error::CatalogError;

pub use imagefleet_proto::ids::{is_account_id, is_image_id};

/// `INVALID_ARGUMENT` (`InvalidImageId.Malformed`) naming `field` unless `value` is an image id.
pub fn check_image_id(field: &'static str, value: &str) -> Result<(), CatalogError> {
    if is_image_id(value) {
        Ok(())
    } else {
        Err(CatalogError::invalid(
            field,
            "InvalidImageId.Malformed",
            format!(
                "{value:?} is not an image id (img- followed by 8 lowercase letters or digits)"
            ),
        ))
    }
}

/// `INVALID_ARGUMENT` (`InvalidAccountId.Malformed`) naming `field` unless `value` is an account
/// id.
pub fn check_account_id(field: &'static str, value: &str) -> Result<(), CatalogError> {
    if is_account_id(value) {
        Ok(())
    } else {
        Err(CatalogError::invalid(
            field,
            "InvalidAccountId.Malformed",
            format!("{value:?} is not an account id (12 digits)"),
        ))
    }
}

/// `INVALID_ARGUMENT` naming `field` if `value` is longer than `max` characters or is not
/// acceptable free text (`imagefleet_proto::text`: no control or bidirectional formatting
/// characters, not blank).
pub fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), CatalogError> {
    if value.chars().count() > max {
        return Err(CatalogError::invalid(
            field,
            "InvalidParameterValue.TooLong",
            format!("must be at most {max} characters"),
        ));
    }
    match imagefleet_proto::text::problem(value) {
        None => Ok(()),
        Some((reason, message)) => Err(CatalogError::invalid(field, reason, message)),
    }
}
