//! The one error the inspector returns: a refusal of the uploaded file, with a stable reason.

use std::fmt;

/// Why a file was refused. Each kind has one stable reason string (see [`RefusalKind::reason`]),
/// which callers put in the `ErrorInfo.reason` of an `INVALID_ARGUMENT` status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalKind {
    /// The image depends on another file (qcow2 backing file, VHD/VHDX differencing disk,
    /// vmdk delta link).
    BackingFile,
    /// A qcow2 image whose data lives in an external data file.
    ExternalDataFile,
    /// A qcow2 image with incompatible feature bits this reader does not know.
    UnknownFeature,
    /// An encrypted image (qcow2 AES or LUKS, a LUKS container).
    Encrypted,
    /// A vmdk that is not one self-contained monolithicSparse or streamOptimized file.
    UnsupportedVmdk,
    /// A QED image.
    Qed,
    /// The file matches two formats at once.
    Polyglot,
    /// The declared format differs from the detected one.
    FormatMismatch,
    /// The file ends before its headers or tables do.
    Truncated,
    /// Headers or tables contradict themselves or the file.
    Inconsistent,
    /// The virtual (guest) size is over the limit.
    VirtualSizeTooLarge,
    /// The file itself is over the limit.
    FileTooLarge,
    /// An ISO image, accepted only when forced.
    IsoNeedsForce,
    /// The file cannot be decoded in one pass within the memory bound.
    NotStreamable,
    /// A recognised format or variant this reader does not accept.
    Unsupported,
}

impl RefusalKind {
    /// Every kind, for documenting and mapping the reasons.
    pub const ALL: [RefusalKind; 15] = [
        RefusalKind::BackingFile,
        RefusalKind::ExternalDataFile,
        RefusalKind::UnknownFeature,
        RefusalKind::Encrypted,
        RefusalKind::UnsupportedVmdk,
        RefusalKind::Qed,
        RefusalKind::Polyglot,
        RefusalKind::FormatMismatch,
        RefusalKind::Truncated,
        RefusalKind::Inconsistent,
        RefusalKind::VirtualSizeTooLarge,
        RefusalKind::FileTooLarge,
        RefusalKind::IsoNeedsForce,
        RefusalKind::NotStreamable,
        RefusalKind::Unsupported,
    ];

    /// The stable reason string, e.g. `InvalidImage.BackingFile`.
    pub fn reason(self) -> &'static str {
        match self {
            RefusalKind::BackingFile => "InvalidImage.BackingFile",
            RefusalKind::ExternalDataFile => "InvalidImage.ExternalDataFile",
            RefusalKind::UnknownFeature => "InvalidImage.UnknownFeature",
            RefusalKind::Encrypted => "InvalidImage.Encrypted",
            RefusalKind::UnsupportedVmdk => "InvalidImage.UnsupportedVmdk",
            RefusalKind::Qed => "InvalidImage.Qed",
            RefusalKind::Polyglot => "InvalidImage.Polyglot",
            RefusalKind::FormatMismatch => "InvalidImage.FormatMismatch",
            RefusalKind::Truncated => "InvalidImage.Truncated",
            RefusalKind::Inconsistent => "InvalidImage.Inconsistent",
            RefusalKind::VirtualSizeTooLarge => "InvalidImage.VirtualSizeTooLarge",
            RefusalKind::FileTooLarge => "InvalidImage.FileTooLarge",
            RefusalKind::IsoNeedsForce => "InvalidImage.IsoNeedsForce",
            RefusalKind::NotStreamable => "InvalidImage.NotStreamable",
            RefusalKind::Unsupported => "InvalidImage.Unsupported",
        }
    }
}

/// A refused file: a stable kind and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    kind: RefusalKind,
    message: String,
}

impl Refusal {
    /// A refusal of `kind` with a human message.
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    /// The kind of refusal.
    pub fn kind(&self) -> RefusalKind {
        self.kind
    }

    /// The stable reason string (`InvalidImage.*`).
    pub fn reason(&self) -> &'static str {
        self.kind.reason()
    }

    /// The human message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.reason(), self.message)
    }
}

impl std::error::Error for Refusal {}

/// Shorthands used by the parsers.
pub(crate) fn inconsistent(msg: impl Into<String>) -> Refusal {
    Refusal::new(RefusalKind::Inconsistent, msg)
}

pub(crate) fn truncated(msg: impl Into<String>) -> Refusal {
    Refusal::new(RefusalKind::Truncated, msg)
}

pub(crate) fn not_streamable(msg: impl Into<String>) -> Refusal {
    Refusal::new(
        RefusalKind::NotStreamable,
        format!(
            "{}; convert the image with `qemu-img convert` first and upload the result",
            msg.into()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_and_prefixed() {
        let mut seen = std::collections::HashSet::new();
        for k in RefusalKind::ALL {
            assert!(k.reason().starts_with("InvalidImage."));
            assert!(seen.insert(k.reason()));
        }
    }
}
