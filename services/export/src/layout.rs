//! [`Layout`]: the shape of the disk being exported (size, chunk size, which chunks hold
//! data), and the bookkeeping that holds callers to passing every allocated chunk in order.

use crate::ExportError;

/// The largest virtual size exported (1 TiB): well over the import limit, and inside every
/// format's addressing (VHD's 2040 GiB, a VMDK's 32-bit sector offsets).
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 40;

/// The smallest chunk size accepted: one qcow2 cluster, one VMDK grain.
pub const MIN_CHUNK_SIZE: u64 = 64 << 10;

/// The largest chunk size accepted: one VHD block, so no chunk straddles two blocks.
pub const MAX_CHUNK_SIZE: u64 = 2 << 20;

/// The disk being exported, known before any byte is streamed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// The guest disk's size in bytes.
    pub virtual_size: u64,
    /// Bytes per chunk (a power of two from 64 KiB to 2 MiB; the store uses 1 MiB). Every
    /// chunk is this long except the last, which ends at `virtual_size`.
    pub chunk_size: u64,
    /// One flag per chunk: `false` means the chunk is all zeros and is never passed in.
    pub allocated: Vec<bool>,
}

impl Layout {
    /// Number of chunks covering the virtual size.
    pub fn chunk_count(&self) -> u64 {
        self.virtual_size.div_ceil(self.chunk_size.max(1))
    }

    /// Byte length of chunk `index` (shorter for the last chunk; 0 beyond the end).
    pub fn chunk_len(&self, index: u64) -> u64 {
        let start = index.saturating_mul(self.chunk_size);
        self.virtual_size.saturating_sub(start).min(self.chunk_size)
    }

    /// Whether chunk `index` holds data.
    pub fn is_allocated(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.allocated.get(i))
            .copied()
            .unwrap_or(false)
    }

    pub(crate) fn validate(&self) -> Result<(), ExportError> {
        if self.virtual_size == 0 {
            return Err(ExportError::InvalidLayout("virtual size is zero".into()));
        }
        if self.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(ExportError::TooLarge {
                size: self.virtual_size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        if !self.chunk_size.is_power_of_two()
            || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size)
        {
            return Err(ExportError::InvalidLayout(format!(
                "chunk size {} is not a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}",
                self.chunk_size
            )));
        }
        if self.allocated.len() as u64 != self.chunk_count() {
            return Err(ExportError::InvalidLayout(format!(
                "{} chunk flags for {} chunks",
                self.allocated.len(),
                self.chunk_count()
            )));
        }
        Ok(())
    }
}

/// Holds the caller to the chunk contract: exactly the allocated chunks, in index order,
/// each with its full length.
#[derive(Debug, Default)]
pub(crate) struct ChunkOrder {
    /// Chunks before this index have been written or skipped as zero.
    next: usize,
}

impl ChunkOrder {
    fn next_allocated(&self, layout: &Layout) -> Option<usize> {
        let rest = layout.allocated.get(self.next..)?;
        rest.iter().position(|a| *a).map(|p| self.next + p)
    }

    /// Checks that chunk `index` with `len` bytes is the next one due, and moves past it.
    pub(crate) fn accept(
        &mut self,
        layout: &Layout,
        index: u64,
        len: u64,
    ) -> Result<(), ExportError> {
        let due = match self.next_allocated(layout) {
            Some(due) if due as u64 == index => due,
            Some(due) => {
                return Err(ExportError::UnexpectedChunk {
                    index,
                    expected: due as u64,
                })
            }
            None => return Err(ExportError::NoMoreChunks { index }),
        };
        let expected = layout.chunk_len(index);
        if len != expected {
            return Err(ExportError::ChunkLength {
                index,
                expected,
                got: len,
            });
        }
        self.next = due + 1;
        Ok(())
    }

    /// Checks that no allocated chunk is still due.
    pub(crate) fn finish(&self, layout: &Layout) -> Result<(), ExportError> {
        match self.next_allocated(layout) {
            Some(index) => Err(ExportError::MissingChunk {
                index: index as u64,
            }),
            None => Ok(()),
        }
    }
}
