//! The reorder engine behind every table-based format: it turns file bytes, arriving in file
//! order, into guest extents emitted in guest order, holding what arrives early within a bound.
//!
//! A format parser tells the engine what it learns from its tables: "guest range G is zero",
//! "guest range G is the file bytes at F" (raw or compressed). File bytes that no table has
//! claimed yet are kept in a stash while the parser says a table still to come may claim them.
//! Guest pieces that are ready before the guest cursor reaches them wait in `ready`. Everything
//! held is counted, and [`Core::check_budget`] refuses the file once the count passes the limit.
//!
//! [`Core`] adds the file-side schedule of metadata regions (tables to read, regions to skip),
//! and [`Driver`] runs a [`Layout`] (one per format) over it.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;

use bytes::Bytes;

use crate::error::{inconsistent, not_streamable, truncated, Refusal};
use crate::{Extent, Format, HeaderInfo};

/// The sink for guest extents.
pub(crate) type Out<'a> = &'a mut dyn FnMut(Extent);

/// Bookkeeping cost counted for each map entry held, on top of the bytes it holds.
const ENTRY_COST: usize = 64;

/// How the bytes of an expected file range turn into guest bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// Raw deflate (qcow2 compression type 0).
    Deflate,
    /// Deflate with a zlib header (vmdk grains).
    Zlib,
    /// Zstandard (qcow2 compression type 1).
    Zstd,
}

/// Decompresses `input` into at most `max` bytes, and at least `min` (the stream may be
/// followed by slack, which is ignored).
pub(crate) fn decompress(
    codec: Codec,
    input: &[u8],
    min: usize,
    max: usize,
) -> Result<Vec<u8>, String> {
    let mut out = vec![0u8; max];
    let mut filled = 0usize;
    match codec {
        Codec::Deflate | Codec::Zlib => {
            let mut d = flate2::Decompress::new(codec == Codec::Zlib);
            loop {
                let before_in = d.total_in();
                let before_out = d.total_out();
                let in_at = usize::try_from(before_in).map_err(|_| "input too long")?;
                let status = d
                    .decompress(
                        input.get(in_at..).unwrap_or(&[]),
                        &mut out[filled..],
                        flate2::FlushDecompress::Finish,
                    )
                    .map_err(|e| format!("corrupt compressed data: {e}"))?;
                filled = usize::try_from(d.total_out()).map_err(|_| "output too long")?;
                if filled >= max || status == flate2::Status::StreamEnd {
                    break;
                }
                if d.total_in() == before_in && d.total_out() == before_out {
                    break;
                }
            }
        }
        Codec::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("corrupt zstd data: {e}"))?;
            // Bounds the decoder's own window buffer whatever the frame header claims.
            dec.window_log_max(23)
                .map_err(|e| format!("zstd decoder set-up failed: {e}"))?;
            while filled < max {
                match dec.read(&mut out[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => return Err(format!("corrupt zstd data: {e}")),
                }
            }
        }
    }
    if filled < min {
        return Err(format!(
            "compressed data decodes to {filled} bytes, expected {min}"
        ));
    }
    out.truncate(filled);
    Ok(out)
}

enum Piece {
    Data(Bytes),
    Zero(u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Data(b) => b.len() as u64,
            Piece::Zero(n) => *n,
        }
    }
}

enum ExpectKind {
    Raw,
    Compressed {
        codec: Codec,
        buf: Vec<u8>,
        out_len: u64,
    },
}

struct Expect {
    /// Guest offset the next expected file byte maps to (raw), or of the whole cluster.
    guest: u64,
    /// File bytes still expected.
    len: u64,
    kind: ExpectKind,
}

/// Guest-order emission, the file-order expectations and the stash.
pub(crate) struct Engine {
    virtual_size: u64,
    cursor: u64,
    pending_zero: Option<(u64, u64)>,
    ready: BTreeMap<u64, Piece>,
    ready_bytes: usize,
    expect: BTreeMap<(u64, u64), Expect>,
    expect_buf_bytes: usize,
    seq: u64,
    last_raw: Option<(u64, u64)>,
    stash: BTreeMap<u64, Bytes>,
    stash_bytes: usize,
    /// The stash drops its oldest bytes beyond this.
    stash_cap: usize,
    /// File bytes below this may have been dropped from the stash.
    evicted_below: u64,
}

impl Engine {
    pub(crate) fn new(virtual_size: u64) -> Engine {
        Engine {
            virtual_size,
            cursor: 0,
            pending_zero: None,
            ready: BTreeMap::new(),
            ready_bytes: 0,
            expect: BTreeMap::new(),
            expect_buf_bytes: 0,
            seq: 0,
            last_raw: None,
            stash: BTreeMap::new(),
            stash_bytes: 0,
            stash_cap: usize::MAX,
            evicted_below: 0,
        }
    }

    /// Sets the guest size once headers read after the engine was made tell it.
    pub(crate) fn set_virtual_size(&mut self, size: u64) {
        self.virtual_size = size;
    }

    pub(crate) fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Bytes and entries held, as counted against the limit.
    pub(crate) fn held(&self) -> usize {
        self.stash_bytes
            .saturating_add(self.ready_bytes)
            .saturating_add(self.expect_buf_bytes)
            .saturating_add(
                (self.expect.len() + self.ready.len() + self.stash.len())
                    .saturating_mul(ENTRY_COST),
            )
    }

    fn emit(&mut self, piece: Piece, out: Out) {
        let len = piece.len();
        match piece {
            Piece::Zero(n) => match &mut self.pending_zero {
                Some((_, l)) => *l += n,
                None => self.pending_zero = Some((self.cursor, n)),
            },
            Piece::Data(b) => {
                self.flush_zero(out);
                out(Extent::Data {
                    offset: self.cursor,
                    bytes: b,
                });
            }
        }
        self.cursor += len;
    }

    pub(crate) fn flush_zero(&mut self, out: Out) {
        if let Some((offset, len)) = self.pending_zero.take() {
            out(Extent::Zero { offset, len });
        }
    }

    fn drain(&mut self, out: Out) {
        while let Some(entry) = self.ready.first_entry() {
            if *entry.key() != self.cursor {
                break;
            }
            let piece = entry.remove();
            if let Piece::Data(b) = &piece {
                self.ready_bytes -= b.len();
            }
            self.emit(piece, out);
        }
    }

    fn insert(&mut self, guest: u64, piece: Piece, out: Out) -> Result<(), Refusal> {
        let mut piece = piece;
        if guest >= self.virtual_size {
            return Ok(());
        }
        let room = self.virtual_size - guest;
        if piece.len() > room {
            piece = match piece {
                Piece::Data(b) => Piece::Data(b.slice(..room as usize)),
                Piece::Zero(_) => Piece::Zero(room),
            };
        }
        let len = piece.len();
        if len == 0 {
            return Ok(());
        }
        if guest < self.cursor {
            return Err(inconsistent(format!(
                "two table entries map guest offset {guest}"
            )));
        }
        if guest == self.cursor {
            self.emit(piece, out);
            self.drain(out);
            return Ok(());
        }
        if let Some((&k, p)) = self.ready.range(..guest).next_back() {
            if k + p.len() > guest {
                return Err(inconsistent(format!(
                    "two table entries map guest offset {guest}"
                )));
            }
        }
        if let Some((&k, _)) = self.ready.range(guest..).next() {
            if k < guest + len {
                return Err(inconsistent(format!(
                    "two table entries map guest offset {k}"
                )));
            }
        }
        if let Piece::Zero(n) = piece {
            if let Some((&k, Piece::Zero(m))) = self.ready.range_mut(..guest).next_back() {
                if k + *m == guest {
                    *m += n;
                    return Ok(());
                }
            }
        }
        if let Piece::Data(b) = &piece {
            self.ready_bytes += b.len();
        }
        self.ready.insert(guest, piece);
        Ok(())
    }

    /// Guest range `[guest, guest+len)` reads as zeros.
    pub(crate) fn zero(&mut self, guest: u64, len: u64, out: Out) -> Result<(), Refusal> {
        self.insert(guest, Piece::Zero(len), out)
    }

    /// Guest bytes known now (a decompressed grain, raw bytes at hand).
    pub(crate) fn data(&mut self, guest: u64, bytes: Bytes, out: Out) -> Result<(), Refusal> {
        self.insert(guest, Piece::Data(bytes), out)
    }

    /// Copies `[a, b)` out of the stash, or `None` if any of it is not there.
    pub(crate) fn stash_get(&self, a: u64, b: u64) -> Option<Vec<Bytes>> {
        let mut parts = Vec::new();
        let mut at = a;
        if a >= b {
            return Some(parts);
        }
        let start_key = self.stash.range(..=a).next_back().map(|(k, _)| *k)?;
        for (&k, v) in self.stash.range(start_key..) {
            if at >= b {
                break;
            }
            let end = k + v.len() as u64;
            if k > at || end <= at {
                return None;
            }
            let lo = (at - k) as usize;
            let hi = (b.min(end) - k) as usize;
            parts.push(v.slice(lo..hi));
            at = b.min(end);
        }
        if at < b {
            return None;
        }
        Some(parts)
    }

    pub(crate) fn set_stash_cap(&mut self, cap: usize) {
        self.stash_cap = cap;
    }

    /// The refusal for file bytes `[a, b)` that a table claims but that are not at hand.
    pub(crate) fn missing(&self, a: u64, what: String) -> Refusal {
        if a < self.evicted_below {
            not_streamable(format!(
                "{what} is referenced by a table stored far after it"
            ))
        } else {
            inconsistent(format!("{what} overlaps metadata"))
        }
    }

    fn stash_put(&mut self, a: u64, bytes: Bytes) {
        self.stash_bytes += bytes.len();
        self.stash.insert(a, bytes);
        while self.stash_bytes > self.stash_cap {
            let Some((k, v)) = self.stash.pop_first() else {
                break;
            };
            self.stash_bytes -= v.len();
            self.evicted_below = self.evicted_below.max(k + v.len() as u64);
        }
    }

    pub(crate) fn clear_stash(&mut self) {
        self.stash.clear();
        self.stash_bytes = 0;
    }

    /// True if an expectation starts in `[a, b)`.
    pub(crate) fn expect_starts_in(&self, a: u64, b: u64) -> bool {
        a < b && self.expect.range((a, 0)..(b, 0)).next().is_some()
    }

    /// True if an expectation covers any of `[a, b)` (checks the ones starting in it and the
    /// one starting just before it).
    pub(crate) fn expect_overlaps(&self, a: u64, b: u64) -> bool {
        if self.expect_starts_in(a, b) {
            return true;
        }
        self.expect
            .range(..(a, 0))
            .next_back()
            .is_some_and(|(k, e)| k.0 + e.len > a)
    }

    /// File bytes `[file, file+len)` are guest bytes at `guest`. `pos` is the file offset of
    /// the next byte to arrive; bytes before it come from the stash.
    pub(crate) fn expect_raw(
        &mut self,
        pos: u64,
        file: u64,
        len: u64,
        guest: u64,
        out: Out,
    ) -> Result<(), Refusal> {
        if len == 0 {
            return Ok(());
        }
        let (mut file, mut len, mut guest) = (file, len, guest);
        if file < pos {
            let have = (file + len).min(pos);
            let parts = self.stash_get(file, have).ok_or_else(|| {
                self.missing(
                    file,
                    format!("data for guest offset {guest} at file offset {file}"),
                )
            })?;
            for part in parts {
                let n = part.len() as u64;
                self.insert(guest, Piece::Data(part), out)?;
                guest += n;
            }
            len -= have - file;
            file = have;
            if len == 0 {
                return Ok(());
            }
        }
        if let Some(k) = self.last_raw {
            if let Some(e) = self.expect.get_mut(&k) {
                if matches!(e.kind, ExpectKind::Raw)
                    && k.0 + e.len == file
                    && e.guest + e.len == guest
                {
                    e.len += len;
                    return Ok(());
                }
            }
        }
        let key = (file, self.seq);
        self.seq += 1;
        self.expect.insert(
            key,
            Expect {
                guest,
                len,
                kind: ExpectKind::Raw,
            },
        );
        self.last_raw = Some(key);
        Ok(())
    }

    /// File bytes `[file, file+len)` decompress to `out_len` guest bytes at `guest`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn expect_compressed(
        &mut self,
        pos: u64,
        file: u64,
        len: u64,
        guest: u64,
        out_len: u64,
        codec: Codec,
        out: Out,
    ) -> Result<(), Refusal> {
        let mut buf = Vec::new();
        let (mut file, mut len) = (file, len);
        if file < pos {
            let have = (file + len).min(pos);
            let parts = self.stash_get(file, have).ok_or_else(|| {
                self.missing(
                    file,
                    format!("compressed data for guest offset {guest} at file offset {file}"),
                )
            })?;
            for part in parts {
                buf.extend_from_slice(&part);
            }
            len -= have - file;
            file = have;
        }
        if len == 0 {
            return self.finish_compressed(guest, codec, &buf, out_len, out);
        }
        self.expect_buf_bytes += buf.len();
        let key = (file, self.seq);
        self.seq += 1;
        self.expect.insert(
            key,
            Expect {
                guest,
                len,
                kind: ExpectKind::Compressed {
                    codec,
                    buf,
                    out_len,
                },
            },
        );
        Ok(())
    }

    fn finish_compressed(
        &mut self,
        guest: u64,
        codec: Codec,
        buf: &[u8],
        out_len: u64,
        out: Out,
    ) -> Result<(), Refusal> {
        let want = usize::try_from(out_len).map_err(|_| inconsistent("cluster too large"))?;
        let data = decompress(codec, buf, want, want)
            .map_err(|e| inconsistent(format!("guest offset {guest}: {e}")))?;
        self.insert(guest, Piece::Data(Bytes::from(data)), out)
    }

    /// Bytes of the file at `[p, p+bytes.len())`, in order.
    pub(crate) fn file_bytes(
        &mut self,
        p: u64,
        bytes: Bytes,
        stash_wanted: bool,
        out: Out,
    ) -> Result<(), Refusal> {
        let end = p + bytes.len() as u64;
        let keys: Vec<(u64, u64)> = self
            .expect
            .range((p, 0)..(end, 0))
            .map(|(k, _)| *k)
            .collect();
        let mut covered = p;
        let mut gaps = Vec::new();
        for key in keys {
            let Some(mut e) = self.expect.remove(&key) else {
                continue;
            };
            let s = key.0;
            let take_end = end.min(s + e.len);
            if s > covered {
                gaps.push((covered, s));
            }
            covered = covered.max(take_end);
            let slice = bytes.slice((s - p) as usize..(take_end - p) as usize);
            let take = take_end - s;
            if let ExpectKind::Compressed { .. } = e.kind {
                // The last sector of a compressed cluster may also hold the start of the
                // next one, which a table still to come may claim.
                let slack = s.max((s + e.len).saturating_sub(512));
                if slack < take_end {
                    gaps.push((slack, take_end));
                }
            }
            e.len -= take;
            match &mut e.kind {
                ExpectKind::Raw => {
                    self.insert(e.guest, Piece::Data(slice), out)?;
                    e.guest += take;
                }
                ExpectKind::Compressed { buf, .. } => {
                    buf.extend_from_slice(&slice);
                    self.expect_buf_bytes += slice.len();
                }
            }
            if e.len > 0 {
                let nk = (take_end, key.1);
                if self.last_raw == Some(key) {
                    self.last_raw = Some(nk);
                }
                self.expect.insert(nk, e);
            } else if let ExpectKind::Compressed {
                codec,
                buf,
                out_len,
            } = e.kind
            {
                self.expect_buf_bytes -= buf.len();
                self.finish_compressed(e.guest, codec, &buf, out_len, out)?;
            }
        }
        if covered < end {
            gaps.push((covered, end));
        }
        if stash_wanted {
            gaps.sort_unstable();
            let mut merged: Vec<(u64, u64)> = Vec::new();
            for (a, b) in gaps {
                match merged.last_mut() {
                    Some(last) if a <= last.1 => last.1 = last.1.max(b),
                    _ => merged.push((a, b)),
                }
            }
            for (a, b) in merged {
                self.stash_put(a, bytes.slice((a - p) as usize..(b - p) as usize));
            }
        }
        Ok(())
    }

    /// End of file: compressed clusters cut short by the end are decoded from what arrived
    /// (their length is rounded up to a sector); anything else still expected is an error.
    pub(crate) fn finish_expectations(&mut self, out: Out) -> Result<(), Refusal> {
        let expect = std::mem::take(&mut self.expect);
        for (key, e) in expect {
            match e.kind {
                ExpectKind::Compressed {
                    codec,
                    buf,
                    out_len,
                } if e.len < 512 => {
                    self.expect_buf_bytes -= buf.len();
                    self.finish_compressed(e.guest, codec, &buf, out_len, out)?;
                }
                _ => {
                    return Err(inconsistent(format!(
                        "data for guest offset {} is at file offset {}, past the end of the file",
                        e.guest, key.0
                    )))
                }
            }
        }
        Ok(())
    }

    /// Checks every guest byte was emitted and flushes the last zero run.
    pub(crate) fn finish(&mut self, out: Out) -> Result<(), Refusal> {
        self.drain(out);
        if self.cursor != self.virtual_size {
            return Err(inconsistent(format!(
                "guest range from offset {} is not mapped by any table",
                self.cursor
            )));
        }
        self.flush_zero(out);
        Ok(())
    }
}

/// A metadata region scheduled by a layout: `tag` tells the layout what it is, `arg` carries
/// an index (which L2 table, which block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tag {
    pub kind: u8,
    pub arg: u64,
}

struct Meta {
    len: u64,
    tag: Tag,
    skip: bool,
    buf: Vec<u8>,
}

/// The file side: position, scheduled metadata regions, the engine.
pub(crate) struct Core {
    pub pos: u64,
    pub engine: Engine,
    pub file_size: Option<u64>,
    pub max_file: u64,
    pub limit: usize,
    meta: BTreeMap<u64, Meta>,
    meta_bytes: usize,
    done: VecDeque<(u64, Tag, Vec<u8>)>,
    done_bytes: usize,
}

impl Core {
    pub(crate) fn new(
        virtual_size: u64,
        file_size: Option<u64>,
        max_file: u64,
        limit: usize,
    ) -> Core {
        let mut core = Core {
            pos: 0,
            engine: Engine::new(virtual_size),
            file_size,
            max_file,
            limit,
            meta: BTreeMap::new(),
            meta_bytes: 0,
            done: VecDeque::new(),
            done_bytes: 0,
        };
        core.engine.set_stash_cap(limit / 4);
        core
    }

    /// The file length known so far: the declared size, else the limit.
    pub(crate) fn file_end(&self) -> u64 {
        self.file_size.unwrap_or(self.max_file)
    }

    /// Checks a data range lies inside the file as far as is known now.
    pub(crate) fn check_data_range(
        &self,
        file: u64,
        len: u64,
        slack: u64,
        what: &str,
    ) -> Result<(), Refusal> {
        match file.checked_add(len) {
            Some(end) if file < self.file_end() && end <= self.file_end().saturating_add(slack) => {
                Ok(())
            }
            _ => Err(inconsistent(format!(
                "{what} at file offset {file} lies past the end of the file"
            ))),
        }
    }

    /// Schedules the metadata region `[start, start+len)`: its bytes go to the layout
    /// (or, with `skip`, are dropped) instead of the engine.
    pub(crate) fn schedule(
        &mut self,
        start: u64,
        len: u64,
        tag: Tag,
        skip: bool,
    ) -> Result<(), Refusal> {
        let end = start
            .checked_add(len)
            .ok_or_else(|| inconsistent(format!("table at offset {start} has a bad size")))?;
        if len == 0 {
            if !skip {
                self.done.push_back((start, tag, Vec::new()));
            }
            return Ok(());
        }
        if end > self.file_end() {
            if skip {
                return Ok(());
            }
            let msg =
                format!("table at file offset {start} ({len} bytes) lies past the end of the file");
            return Err(if start < self.file_end() {
                truncated(msg)
            } else {
                inconsistent(msg)
            });
        }
        if skip && end <= self.pos {
            return Ok(());
        }
        let overlaps_meta = self
            .meta
            .range(..end)
            .next_back()
            .is_some_and(|(&k, m)| k + m.len > start);
        if overlaps_meta {
            return Err(inconsistent(format!(
                "tables overlap at file offset {start}"
            )));
        }
        if self.engine.expect_overlaps(start.max(self.pos), end) {
            return Err(inconsistent(format!(
                "table at file offset {start} overlaps data"
            )));
        }
        let mut buf = Vec::new();
        let mut key = start;
        if start < self.pos {
            let have = end.min(self.pos);
            if skip {
                key = self.pos;
            } else {
                let parts = self.engine.stash_get(start, have).ok_or_else(|| {
                    self.engine
                        .missing(start, format!("the table at file offset {start}"))
                })?;
                for p in parts {
                    buf.extend_from_slice(&p);
                }
                if end <= self.pos {
                    self.done_bytes += buf.len();
                    self.done.push_back((start, tag, buf));
                    return Ok(());
                }
            }
        }
        self.meta_bytes += buf.len();
        self.meta.insert(
            key,
            Meta {
                len: end - key,
                tag,
                skip,
                buf,
            },
        );
        Ok(())
    }

    fn meta_overlaps(&self, a: u64, b: u64) -> bool {
        a < b
            && self
                .meta
                .range(..b)
                .next_back()
                .is_some_and(|(&k, m)| k + m.len > a)
    }

    /// Guest bytes at `guest` are the file bytes `[file, file+len)`.
    pub(crate) fn map_raw(
        &mut self,
        file: u64,
        len: u64,
        guest: u64,
        out: Out,
    ) -> Result<(), Refusal> {
        self.check_data_range(file, len, 0, "data")?;
        if self.meta_overlaps(file.max(self.pos), file + len) {
            return Err(inconsistent(format!(
                "data at file offset {file} overlaps a table"
            )));
        }
        self.engine.expect_raw(self.pos, file, len, guest, out)
    }

    /// Guest bytes `[guest, guest+out_len)` are the compressed file bytes `[file, file+len)`.
    pub(crate) fn map_compressed(
        &mut self,
        file: u64,
        len: u64,
        guest: u64,
        out_len: u64,
        codec: Codec,
        out: Out,
    ) -> Result<(), Refusal> {
        self.check_data_range(file, len, 512, "compressed data")?;
        if self.meta_overlaps(file.max(self.pos), file + len) {
            return Err(inconsistent(format!(
                "compressed data at file offset {file} overlaps a table"
            )));
        }
        self.engine
            .expect_compressed(self.pos, file, len, guest, out_len, codec, out)
    }

    pub(crate) fn held(&self) -> usize {
        self.engine
            .held()
            .saturating_add(self.meta_bytes)
            .saturating_add(self.done_bytes)
            .saturating_add(self.meta.len().saturating_mul(ENTRY_COST))
    }
}

/// A format's table logic, run by [`Driver`].
pub(crate) trait Layout {
    /// A scheduled region has arrived whole.
    fn on_meta(
        &mut self,
        tag: Tag,
        start: u64,
        bytes: Vec<u8>,
        core: &mut Core,
        out: Out,
    ) -> Result<(), Refusal>;
    /// Whether file bytes no table has claimed may still be claimed by a table to come.
    fn stash_wanted(&self, core: &Core) -> bool;
    /// Bytes the layout itself holds (tables waiting for other tables).
    fn held(&self) -> usize {
        0
    }
    /// End of file, after every scheduled region and expectation was settled.
    fn finish(&mut self, _core: &mut Core, _out: Out) -> Result<(), Refusal> {
        Ok(())
    }
    /// Checks the file's last bytes (up to 512).
    fn check_tail(&self, _tail: &[u8]) -> Result<(), Refusal> {
        Ok(())
    }
    /// The format being decoded.
    fn format(&self) -> Format;
    /// What the headers said, once they have said it.
    fn info(&self, core: &Core) -> Option<HeaderInfo>;
}

impl<L: Layout + Send> crate::Body for Driver<L> {
    fn feed(&mut self, data: &[u8], out: Out) -> Result<(), Refusal> {
        Driver::feed(self, data, out)
    }

    fn header(&self) -> Option<HeaderInfo> {
        self.layout.info(&self.core)
    }

    fn held(&self) -> usize {
        Driver::held(self)
    }

    fn finish(&mut self, tail: &[u8], out: Out) -> Result<(Format, u64), Refusal> {
        Driver::finish(self, out)?;
        self.layout.check_tail(tail)?;
        Ok((self.layout.format(), self.core.engine.virtual_size()))
    }
}

/// Runs a layout over the file bytes.
pub(crate) struct Driver<L: Layout> {
    pub layout: L,
    pub core: Core,
}

impl<L: Layout> Driver<L> {
    pub(crate) fn new(layout: L, core: Core) -> Driver<L> {
        Driver { layout, core }
    }

    fn settle(&mut self, out: Out) -> Result<(), Refusal> {
        while let Some((start, tag, bytes)) = self.core.done.pop_front() {
            self.core.done_bytes -= bytes.len();
            self.layout
                .on_meta(tag, start, bytes, &mut self.core, out)?;
        }
        if !self.layout.stash_wanted(&self.core) {
            self.core.engine.clear_stash();
        }
        Ok(())
    }

    pub(crate) fn held(&self) -> usize {
        self.core.held().saturating_add(self.layout.held())
    }

    fn check_budget(&self) -> Result<(), Refusal> {
        let held = self.held();
        if held > self.core.limit {
            return Err(not_streamable(format!(
                "decoding this image in one pass needs more than {} MiB held in memory \
                 (tables stored after the data they map, or data far out of guest order)",
                self.core.limit >> 20
            )));
        }
        Ok(())
    }

    pub(crate) fn feed(&mut self, data: &[u8], out: Out) -> Result<(), Refusal> {
        let mut i = 0usize;
        while i < data.len() {
            let p = self.core.pos;
            let left = (data.len() - i) as u64;
            let current = self
                .core
                .meta
                .range(..=p)
                .next_back()
                .filter(|(&s, m)| s + m.len > p)
                .map(|(&s, _)| s);
            if let Some(s) = current {
                let Some(m) = self.core.meta.get_mut(&s) else {
                    break;
                };
                let take = (s + m.len - p).min(left);
                let end = p + take;
                if self.core.engine.expect_starts_in(p, end) {
                    return Err(inconsistent(format!(
                        "data overlaps the table at file offset {s}"
                    )));
                }
                if !m.skip {
                    m.buf.extend_from_slice(&data[i..i + take as usize]);
                    self.core.meta_bytes += take as usize;
                }
                self.core.pos = end;
                i += take as usize;
                if s + m.len == end {
                    if let Some(m) = self.core.meta.remove(&s) {
                        self.core.meta_bytes -= m.buf.len();
                        if !m.skip {
                            self.core.done_bytes += m.buf.len();
                            self.core.done.push_back((s, m.tag, m.buf));
                        }
                    }
                }
            } else {
                let next = self
                    .core
                    .meta
                    .range(p..)
                    .next()
                    .map(|(&s, _)| s)
                    .unwrap_or(u64::MAX);
                let take = (next - p).min(left);
                let bytes = Bytes::copy_from_slice(&data[i..i + take as usize]);
                let wanted = self.layout.stash_wanted(&self.core);
                self.core.engine.file_bytes(p, bytes, wanted, out)?;
                self.core.pos = p + take;
                i += take as usize;
            }
            self.check_budget()?;
            self.settle(out)?;
            self.check_budget()?;
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self, out: Out) -> Result<(), Refusal> {
        self.settle(out)?;
        if let Some((&s, m)) = self.core.meta.iter().find(|(_, m)| !m.skip) {
            // A table the file stops inside was cut short; one that starts past the end was
            // never there.
            if s < self.core.pos {
                return Err(truncated(format!(
                    "the file ends at {} bytes, inside the table at file offset {} ({} bytes)",
                    self.core.pos, s, m.len
                )));
            }
            return Err(inconsistent(format!(
                "the table at file offset {s} lies past the end of the file ({} bytes)",
                self.core.pos
            )));
        }
        self.core.engine.finish_expectations(out)?;
        self.layout.finish(&mut self.core, out)?;
        self.core.engine.finish(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(engine: &mut Engine, f: impl FnOnce(&mut Engine, Out)) -> Vec<Extent> {
        let mut got = Vec::new();
        let mut out = |e: Extent| got.push(e);
        f(engine, &mut out);
        got
    }

    #[test]
    fn pieces_out_of_order_come_out_in_order() {
        let mut e = Engine::new(4096);
        let got = collect(&mut e, |e, out| {
            e.data(2048, Bytes::from(vec![2u8; 2048]), out).unwrap();
            e.zero(1024, 1024, out).unwrap();
            assert!(e.held() >= 2048, "the early piece is held");
            e.data(0, Bytes::from(vec![1u8; 1024]), out).unwrap();
            e.finish(out).unwrap();
        });
        let offsets: Vec<(u64, u64)> = got.iter().map(|x| (x.offset(), x.len())).collect();
        assert_eq!(offsets, vec![(0, 1024), (1024, 1024), (2048, 2048)]);
        assert_eq!(e.held(), 0);
    }

    #[test]
    fn overlapping_pieces_are_refused() {
        let mut e = Engine::new(4096);
        collect(&mut e, |e, out| {
            e.zero(1024, 1024, out).unwrap();
            let r = e.data(1536, Bytes::from(vec![1u8; 10]), out);
            assert_eq!(r.unwrap_err().kind(), crate::RefusalKind::Inconsistent);
            e.zero(0, 1024, out).unwrap();
            let r = e.zero(512, 10, out);
            assert_eq!(r.unwrap_err().kind(), crate::RefusalKind::Inconsistent);
        });
    }

    #[test]
    fn adjacent_zero_runs_merge() {
        let mut e = Engine::new(1 << 30);
        let got = collect(&mut e, |e, out| {
            for i in 0..1024u64 {
                e.zero(i << 20, 1 << 20, out).unwrap();
            }
            e.finish(out).unwrap();
        });
        assert_eq!(
            got,
            vec![Extent::Zero {
                offset: 0,
                len: 1 << 30
            }]
        );
    }

    #[test]
    fn expected_bytes_map_to_guest_and_unclaimed_bytes_are_stashed() {
        let mut e = Engine::new(8192);
        let got = collect(&mut e, |e, out| {
            // File [1000, 5096) holds guest [4096, 8192); file [0, 1000) is unclaimed.
            e.expect_raw(0, 1000, 4096, 4096, out).unwrap();
            e.file_bytes(0, Bytes::from(vec![7u8; 3000]), true, out)
                .unwrap();
            // A later table claims file [0, 1000) for guest [0, 1000).
            e.expect_raw(3000, 0, 1000, 0, out).unwrap();
            e.zero(1000, 3096, out).unwrap();
            e.file_bytes(3000, Bytes::from(vec![8u8; 2096]), true, out)
                .unwrap();
            e.finish_expectations(out).unwrap();
            e.finish(out).unwrap();
        });
        let total: u64 = got.iter().map(Extent::len).sum();
        assert_eq!(total, 8192);
        assert_eq!(got[0].offset(), 0);
    }

    #[test]
    fn missing_file_bytes_are_refused() {
        let mut e = Engine::new(8192);
        collect(&mut e, |e, out| {
            e.file_bytes(0, Bytes::from(vec![7u8; 3000]), false, out)
                .unwrap();
            let r = e.expect_raw(3000, 0, 1000, 0, out);
            assert_eq!(r.unwrap_err().kind(), crate::RefusalKind::Inconsistent);
        });
    }

    #[test]
    fn stash_drops_oldest_beyond_its_cap() {
        let mut e = Engine::new(1 << 20);
        e.set_stash_cap(4096);
        collect(&mut e, |e, out| {
            for i in 0..4u64 {
                e.file_bytes(i * 2048, Bytes::from(vec![1u8; 2048]), true, out)
                    .unwrap();
            }
            let r = e.expect_raw(8192, 0, 512, 0, out);
            assert_eq!(r.unwrap_err().kind(), crate::RefusalKind::NotStreamable);
            assert!(e.expect_raw(8192, 4096, 4096, 4096, out).is_ok());
        });
    }
}
