//! The chunk's shape: `CHUNK_SIZE`, the `ChunkDigest` that names a chunk, `is_zero`, and the
//! `Space` a backend reports.

use sha2::{Digest as _, Sha256};

/// Every chunk is exactly this long (a disk's tail chunk is zero-padded).
pub const CHUNK_SIZE: usize = 1 << 20;

/// The sha256 of a chunk's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkDigest(pub [u8; 32]);

impl ChunkDigest {
    pub fn of(data: &[u8]) -> Self {
        ChunkDigest(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(ChunkDigest)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        hex::decode(text).ok().and_then(|b| Self::from_slice(&b))
    }
}

impl std::fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.to_hex())
    }
}

/// True if every byte is zero.
///
/// Blocks of 256 bytes are OR-folded (the compiler turns each fold into a few vector ORs),
/// stopping at the first block that is not zero: most data is not, and its first block says
/// so; a zero run is read once at memory speed.
pub fn is_zero(data: &[u8]) -> bool {
    let blocks = data.chunks_exact(256);
    let tail = blocks.remainder();
    blocks
        .into_iter()
        .all(|block| block.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && tail.iter().all(|&b| b == 0)
}

/// How much a backend holds and how much more it can take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Bytes held by stored chunks (`CHUNK_SIZE` per chunk).
    pub used_bytes: u64,
    /// Bytes still free for new chunks.
    pub free_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_hex_round_trips_and_debug_is_hex() {
        let d = ChunkDigest::of(b"abc");
        let hex = d.to_hex();
        assert_eq!(
            hex,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ChunkDigest::from_hex(&hex), Some(d));
        assert_eq!(format!("{d:?}"), hex);
        assert_eq!(ChunkDigest::from_slice(&[1u8; 31]), None);
        assert_eq!(ChunkDigest::from_hex("zz"), None);
    }

    #[test]
    fn is_zero_checks_every_byte() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0u8; 13]));
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        // A single non-zero byte anywhere: in a whole block, at a block's edges, in the tail.
        let mut w = vec![0u8; 3 * 256 + 17];
        for at in 0..w.len() {
            w[at] = 0x80;
            assert!(!is_zero(&w), "the byte at {at} was missed");
            assert!(is_zero(&w[..at]) && is_zero(&w[at + 1..]));
            w[at] = 0;
        }
    }
}
