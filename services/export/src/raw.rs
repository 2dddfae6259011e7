//! The raw writer: the disk's bytes, with zero chunks emitted by the writer itself as runs of
//! the shared zero buffer.

use bytes::Bytes;

use crate::{Layout, Pieces};

pub(crate) struct RawWriter {
    /// Guest bytes emitted so far.
    written: u64,
}

impl RawWriter {
    pub(crate) fn new(_layout: &Layout) -> Self {
        RawWriter { written: 0 }
    }

    pub(crate) fn chunk(&mut self, layout: &Layout, index: u64, data: Bytes) -> Pieces {
        let offset = index * layout.chunk_size;
        let mut out = Pieces::new();
        out.push_zeros(offset.saturating_sub(self.written));
        self.written = offset + data.len() as u64;
        out.push(data);
        out
    }

    pub(crate) fn finish(&mut self, layout: &Layout) -> Pieces {
        let mut out = Pieces::new();
        out.push_zeros(layout.virtual_size.saturating_sub(self.written));
        self.written = layout.virtual_size;
        out
    }
}

#[cfg(test)]
mod tests {
    use crate::{is_shared_zeros, ExportFormat, Layout, Writer};
    use bytes::Bytes;

    #[test]
    fn zero_chunks_come_from_the_shared_buffer() {
        const MIB: u64 = 1 << 20;
        let virtual_size = 4 << 30;
        let count = (virtual_size / MIB) as usize;
        let mut allocated = vec![false; count];
        allocated[1000] = true;
        let layout = Layout {
            virtual_size,
            chunk_size: MIB,
            allocated,
        };
        let mut w = Writer::new(ExportFormat::Raw, layout, 0).unwrap();
        assert_eq!(w.file_size(), Some(virtual_size));
        let data = Bytes::from(vec![7u8; MIB as usize]);
        let mut pieces: Vec<Bytes> = w.start().collect();
        pieces.extend(w.chunk(1000, data.clone()).unwrap());
        pieces.extend(w.finish().unwrap());
        let total: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        assert_eq!(total, virtual_size);
        let data_pieces: Vec<&Bytes> = pieces.iter().filter(|p| !is_shared_zeros(p)).collect();
        assert_eq!(
            data_pieces.len(),
            1,
            "only the allocated chunk is not a shared zero slice"
        );
        assert_eq!(
            data_pieces[0].as_ptr(),
            data.as_ptr(),
            "the chunk is passed through, not copied"
        );
        // Offset of the data: the zeros before it.
        let before: u64 = pieces
            .iter()
            .take_while(|p| is_shared_zeros(p))
            .map(|p| p.len() as u64)
            .sum();
        assert_eq!(before, 1000 * MIB);
    }

    #[test]
    fn short_tail_chunk_and_tail_zeros() {
        let layout = Layout {
            virtual_size: (3 << 20) + 100,
            chunk_size: 1 << 20,
            allocated: vec![false, true, false, true],
        };
        let mut w = Writer::new(ExportFormat::Raw, layout, 0).unwrap();
        let mut bytes = Vec::new();
        bytes.extend(w.start().flat_map(|b| b.to_vec()));
        bytes.extend(
            w.chunk(1, Bytes::from(vec![1u8; 1 << 20]))
                .unwrap()
                .flat_map(|b| b.to_vec()),
        );
        bytes.extend(
            w.chunk(3, Bytes::from(vec![3u8; 100]))
                .unwrap()
                .flat_map(|b| b.to_vec()),
        );
        bytes.extend(w.finish().unwrap().flat_map(|b| b.to_vec()));
        assert_eq!(bytes.len(), (3 << 20) + 100);
        assert!(bytes[..1 << 20].iter().all(|b| *b == 0));
        assert!(bytes[1 << 20..2 << 20].iter().all(|b| *b == 1));
        assert!(bytes[2 << 20..3 << 20].iter().all(|b| *b == 0));
        assert!(bytes[3 << 20..].iter().all(|b| *b == 3));
    }
}
