//! [`Pieces`]: what a writer call produces, file bytes in order, with runs of zeros kept as
//! lengths and handed out as slices of one static zero buffer.

use std::collections::VecDeque;

use bytes::Bytes;

/// The largest zero piece handed out; also the size of the shared static zero buffer.
pub const ZERO_PIECE_LEN: usize = 1 << 20;

/// One MiB of zeros in the binary's zero-initialised data, shared by every zero piece.
static ZEROS: [u8; ZERO_PIECE_LEN] = [0; ZERO_PIECE_LEN];

/// `len` zero bytes from the shared buffer (`len` at most [`ZERO_PIECE_LEN`]).
pub(crate) fn zeros(len: usize) -> &'static [u8] {
    &ZEROS[..len.min(ZERO_PIECE_LEN)]
}

/// Whether `piece` is a slice of the shared zero buffer (that is, cost no allocation).
pub fn is_shared_zeros(piece: &Bytes) -> bool {
    let start = ZEROS.as_ptr() as usize;
    let end = start + ZERO_PIECE_LEN;
    let p = piece.as_ptr() as usize;
    !piece.is_empty() && p >= start && p + piece.len() <= end
}

#[derive(Debug, Clone)]
enum Part {
    Data(Bytes),
    Zeros(u64),
}

/// File bytes in order, as produced by one writer call.
///
/// Iterating yields non-empty [`Bytes`] pieces in file order. Runs of zeros are stored as a
/// length and yielded as slices of one static zero buffer, at most [`ZERO_PIECE_LEN`] bytes
/// each, so a long run of zeros (a raw file's holes) costs neither memory nor copying.
#[derive(Debug, Clone, Default)]
pub struct Pieces {
    parts: VecDeque<Part>,
    byte_len: u64,
}

impl Pieces {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Total bytes still to be yielded.
    pub fn byte_len(&self) -> u64 {
        self.byte_len
    }

    /// Whether nothing is left to yield.
    pub fn is_empty(&self) -> bool {
        self.byte_len == 0
    }

    pub(crate) fn push(&mut self, data: impl Into<Bytes>) {
        let data = data.into();
        if data.is_empty() {
            return;
        }
        self.byte_len += data.len() as u64;
        self.parts.push_back(Part::Data(data));
    }

    pub(crate) fn push_zeros(&mut self, len: u64) {
        if len == 0 {
            return;
        }
        self.byte_len += len;
        if let Some(Part::Zeros(run)) = self.parts.back_mut() {
            *run += len;
        } else {
            self.parts.push_back(Part::Zeros(len));
        }
    }

    pub(crate) fn append(&mut self, other: Pieces) {
        for part in other.parts {
            match part {
                Part::Data(data) => self.push(data),
                Part::Zeros(len) => self.push_zeros(len),
            }
        }
    }
}

impl Iterator for Pieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let piece = match self.parts.pop_front()? {
            Part::Data(data) => data,
            Part::Zeros(len) => {
                let take = len.min(ZERO_PIECE_LEN as u64);
                if len > take {
                    self.parts.push_front(Part::Zeros(len - take));
                }
                Bytes::from_static(zeros(take as usize))
            }
        };
        self.byte_len -= piece.len() as u64;
        Some(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_runs_merge_and_come_out_as_shared_slices() {
        let mut pieces = Pieces::new();
        pieces.push(Bytes::from_static(b"head"));
        pieces.push_zeros(ZERO_PIECE_LEN as u64);
        pieces.push_zeros(10);
        pieces.push(Bytes::new());
        pieces.push(vec![1u8, 2]);
        assert_eq!(pieces.byte_len(), 4 + ZERO_PIECE_LEN as u64 + 10 + 2);
        let out: Vec<Bytes> = pieces.collect();
        let lens: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(lens, vec![4, ZERO_PIECE_LEN, 10, 2]);
        assert!(!is_shared_zeros(&out[0]));
        assert!(is_shared_zeros(&out[1]) && is_shared_zeros(&out[2]));
        assert!(!is_shared_zeros(&out[3]));
    }
}
