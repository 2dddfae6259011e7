//! The export writers' errors: a bad layout, chunks handed in out of contract, or a file that
//! the chosen format cannot describe.

/// Why a [`crate::Writer`] refused its layout or a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// The format name is not one of `raw`, `qcow2`, `vhd`, `vmdk`.
    #[error("unknown export format {0:?}: expected raw, qcow2, vhd or vmdk")]
    UnknownFormat(String),
    /// The layout is inconsistent (zero size, bad chunk size, wrong number of chunk flags).
    #[error("invalid layout: {0}")]
    InvalidLayout(String),
    /// The virtual size is over what this crate exports.
    #[error("virtual size {size} is over the export limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    /// `chunk` was called before `start`.
    #[error("chunk {index} was passed before start()")]
    NotStarted { index: u64 },
    /// `chunk` was called with an index other than the next allocated chunk.
    #[error("chunk {index} is out of order: the next allocated chunk is {expected}")]
    UnexpectedChunk { index: u64, expected: u64 },
    /// `chunk` was called after every allocated chunk was already written, or for an
    /// index beyond them.
    #[error("chunk {index} is not an allocated chunk still to be written")]
    NoMoreChunks { index: u64 },
    /// The data of a chunk does not have the chunk's length.
    #[error("chunk {index} is {got} bytes, expected {expected}")]
    ChunkLength { index: u64, expected: u64, got: u64 },
    /// `finish` was called while an allocated chunk was still to be written.
    #[error("export finished before allocated chunk {index} was written")]
    MissingChunk { index: u64 },
    /// The compressor failed on a grain.
    #[error("compressing grain {grain}: {message}")]
    Compression { grain: u64, message: String },
    /// The file would grow past what the format's offsets can address.
    #[error("{format} file would grow past its {limit}-byte addressing limit")]
    FileTooLarge { format: &'static str, limit: u64 },
}
