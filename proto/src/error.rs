//! The error model: every error is a canonical gRPC status carrying a `google.rpc.ErrorInfo`
//! whose `reason` is the CVM-style error code (`InvalidImageId.NotFound`, ...). Bad input also
//! carries a `google.rpc.BadRequest` naming the field.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// The `domain` of every `ErrorInfo` this project emits.
pub const DOMAIN: &str = "imagefleet";

/// A status with an `ErrorInfo` of `reason`.
pub fn status(code: Code, reason: &str, message: impl Into<String>) -> Status {
    let details = ErrorDetails::with_error_info(reason, DOMAIN, std::collections::HashMap::new());
    Status::with_error_details(code, message, details)
}

/// A status with an `ErrorInfo` of `reason` and `metadata` (e.g. which image and region a
/// refusal is about).
pub fn status_with_metadata(
    code: Code,
    reason: &str,
    message: impl Into<String>,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> Status {
    let metadata: std::collections::HashMap<String, String> = metadata.into_iter().collect();
    let details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    Status::with_error_details(code, message, details)
}

/// The `ErrorInfo` metadata of a status (empty without one).
pub fn metadata(status: &Status) -> std::collections::HashMap<String, String> {
    status
        .get_details_error_info()
        .map(|info| info.metadata)
        .unwrap_or_default()
}

/// `INVALID_ARGUMENT` naming `field`, with `reason` in the `ErrorInfo` and a `BadRequest`
/// field violation.
pub fn invalid_argument(field: &str, reason: &str, message: impl Into<String>) -> Status {
    let message = message.into();
    let mut metadata = std::collections::HashMap::new();
    metadata.insert("field".to_string(), field.to_string());
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    details.add_bad_request_violation(field, message.clone());
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {message}"),
        details,
    )
}

/// The `ErrorInfo` reason of a status, if it carries one.
pub fn reason(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

/// The field an `INVALID_ARGUMENT` status names, if any.
pub fn field(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("field").cloned())
}
