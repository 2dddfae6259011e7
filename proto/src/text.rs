//! Free text in requests (image names and descriptions, instance names, account names, filter
//! values): what characters it may hold. One check for every service, so a name refused by one
//! is refused by all.
//!
//! Refused, as `INVALID_ARGUMENT` naming the field:
//! - control characters: C0 (`U+0000..U+001F`), DEL (`U+007F`), C1 (`U+0080..U+009F`) and the
//!   line and paragraph separators (`U+2028`, `U+2029`), reason
//!   `InvalidParameterValue.InvalidCharacters`: a terminal printing them could be driven by
//!   whoever wrote the text;
//! - bidirectional formatting characters (embeddings and overrides `U+202A..U+202E`, isolates
//!   `U+2066..U+2069`, the marks `U+200E`, `U+200F` and `U+061C`), same reason: they make text
//!   display in an order other than the one it is stored in;
//! - text that is not empty but shows nothing (only spaces, zero-width or other invisible
//!   characters), reason `InvalidParameterValue.Blank`.
//!
//! Empty text is not refused here: whether a field may be empty is the field's own rule.

use crate::error::invalid_argument;
use tonic::Status;

/// Refused because of a character the text holds.
pub const INVALID_CHARACTERS: &str = "InvalidParameterValue.InvalidCharacters";
/// Refused because the text shows nothing.
pub const BLANK: &str = "InvalidParameterValue.Blank";

/// A control character: C0, DEL, C1, or a line or paragraph separator.
pub fn is_control(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// A bidirectional formatting character: embeddings, overrides, isolates and marks.
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}'
    )
}

/// A character that takes no visible space of its own: white space, zero-width characters,
/// joiners, fillers, variation selectors and tags.
pub fn is_invisible(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{034F}'
                | '\u{115F}'
                | '\u{1160}'
                | '\u{17B4}'
                | '\u{17B5}'
                | '\u{180B}'..='\u{180F}'
                | '\u{200B}'..='\u{200D}'
                | '\u{2060}'..='\u{2064}'
                | '\u{206A}'..='\u{206F}'
                | '\u{3164}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{FEFF}'
                | '\u{FFA0}'
                | '\u{E0000}'..='\u{E007F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

/// Why `value` is not acceptable free text: the reason and a message, or `None` if it is.
pub fn problem(value: &str) -> Option<(&'static str, String)> {
    if let Some(c) = value.chars().find(|&c| is_control(c)) {
        return Some((
            INVALID_CHARACTERS,
            format!(
                "must not contain control characters (found U+{:04X})",
                c as u32
            ),
        ));
    }
    if let Some(c) = value.chars().find(|&c| is_bidi_control(c)) {
        return Some((
            INVALID_CHARACTERS,
            format!(
                "must not contain bidirectional formatting characters (found U+{:04X})",
                c as u32
            ),
        ));
    }
    if !value.is_empty() && value.chars().all(is_invisible) {
        return Some((
            BLANK,
            "must contain a visible character (not only spaces or invisible characters)".into(),
        ));
    }
    None
}

/// `INVALID_ARGUMENT` naming `field` (in the `ErrorInfo` metadata and a `BadRequest`) unless
/// `value` is acceptable free text (see the module documentation).
pub fn check(field: &str, value: &str) -> Result<(), Status> {
    match problem(value) {
        None => Ok(()),
        Some((reason, message)) => Err(invalid_argument(field, reason, message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_text_passes() {
        for ok in [
            "",
            "web server",
            "  padded  ",
            "镜像-01",
            "café ☕",
            "emoji 👩\u{200D}💻 joined",
            "tab-free\u{00A0}nbsp",
        ] {
            assert_eq!(problem(ok), None, "{ok:?}");
        }
    }

    #[test]
    fn controls_and_bidi_are_refused() {
        for bad in [
            "\u{1b}]0;owned\u{7}\u{1b}[2J",
            "line\nbreak",
            "tab\there",
            "nul\0",
            "del\u{7f}",
            "csi\u{9b}2J",
            "sep\u{2028}",
            "evil\u{202E}gpj.exe",
            "iso\u{2066}late",
            "mark\u{200F}",
            "arabic\u{061C}",
        ] {
            assert_eq!(
                problem(bad).map(|(r, _)| r),
                Some(INVALID_CHARACTERS),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn text_showing_nothing_is_blank() {
        for bad in [
            " ",
            "   ",
            "\u{200B}",
            "\u{3000}",
            "\u{FEFF}\u{2060}",
            "\u{00A0}",
        ] {
            assert_eq!(problem(bad).map(|(r, _)| r), Some(BLANK), "{bad:?}");
        }
    }

    #[test]
    fn the_status_names_the_field() {
        let status = check("image_description", "\u{1b}[2J").unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            crate::error::reason(&status).as_deref(),
            Some(INVALID_CHARACTERS)
        );
        assert_eq!(
            crate::error::field(&status).as_deref(),
            Some("image_description")
        );
    }
}
