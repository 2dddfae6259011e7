//! Safe, streaming inspection and decoding of uploaded disk images.
//!
//! An uploaded disk file is hostile until this crate has read it. The crate does no I/O: the
//! caller hands a [`Decoder`] the bytes of the file in order (an upload stream, an HTTP body),
//! and the decoder emits the guest disk as [`Extent`]s.
//!
//! # Contract
//!
//! - Formats read natively: raw, ISO 9660 (only with [`Limits::allow_iso`], decoded as raw),
//!   qcow2 v2/v3 (compressed clusters in deflate or zstd, zero clusters, extended L2 entries
//!   with subclusters), vmdk monolithicSparse and streamOptimized, VHD fixed and dynamic, VHDX.
//!   Everything else is refused with a [`Refusal`] whose [`Refusal::reason`] is a stable
//!   `InvalidImage.*` string (see [`RefusalKind`]).
//! - Detection looks at the first [`DETECT_LEN`] bytes (enough for the ISO descriptor at
//!   32769) and at the last 512 bytes (a VHD footer). A file that matches two formats is
//!   refused as `InvalidImage.Polyglot`; a declared format that differs from the detected one
//!   as `InvalidImage.FormatMismatch`.
//! - Refusals that the headers show come from [`Decoder::feed`] as soon as the bytes holding
//!   them have been fed. Once [`Decoder::header`] is `Some`, the format (and, except for raw
//!   files of unknown length, the virtual size) is known.
//! - The extents emitted over a whole decode, by `feed` and then `finish`, cover the guest range
//!   `[0, virtual_size)` exactly once, in increasing offset order, without overlap. Data extents
//!   may contain zeros. If `feed` or `finish` refuses, the extents emitted so far must be thrown
//!   away by the caller.
//! - Memory held is bounded by [`Limits::max_reorder_bytes`] plus small constants whatever the
//!   input: data that arrives before the table that maps it, or out of guest order, is held up
//!   to that bound, and beyond it the file is refused as `InvalidImage.NotStreamable` (such a
//!   file can be made streamable with `qemu-img convert`). [`Decoder::held_bytes`] reports it.
//! - A raw file whose last 512 bytes are a valid fixed-VHD footer is a fixed VHD: its footer is
//!   not guest data. So a raw decode always holds back the last 512 bytes until `finish`, and
//!   the header of an undeclared raw file is marked [`HeaderInfo::provisional`]: the
//!   [`Summary`] is authoritative.
//! - Arithmetic on every offset and size from the file is checked; no input makes the decoder
//!   panic.
//!
//! # Choices worth knowing
//!
//! - qcow2: the dirty bit is accepted (refcounts are not used); the corrupt bit is refused as
//!   `Inconsistent`. Internal snapshots are ignored (only the active L1 table is read). A data
//!   cluster referenced twice is decoded only if both references are known before its bytes
//!   arrive (qemu-img never writes such files).
//! - A raw file's virtual size is its exact length (qemu-img rounds it up to whole sectors).
//! - A fixed VHD's disk is its data area; the footer's size must match it (as CHS geometry or
//!   as the current size).
//! - streamOptimized vmdk grains must come in increasing guest order (every known writer does
//!   so); the grain tables at the end are only counted against the grains.
//! - A VHDX whose log is not empty needs replaying and is refused as `Unsupported`.
//! - File bytes that no table has claimed yet are held (at most a quarter of the bound, oldest
//!   dropped first) while a table still to come may claim them; a table that then claims
//!   dropped bytes makes the file `NotStreamable`.
//!
//! # Layout
//!
//! `detect` finds the format; `reorder` is the engine shared by the table-based formats (it
//! turns file-order bytes into guest-order extents within the bound); `raw`, `qcow2`, `vmdk`,
//! `vhd` and `vhdx` each own one format's headers and tables.

mod detect;
mod error;
mod qcow2;
mod raw;
mod reorder;
mod vhd;
mod vhdx;
mod vmdk;

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub use detect::{detect, DETECT_LEN};
pub use error::{Refusal, RefusalKind};

use reorder::Out;

/// Limits applied to every decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest virtual (guest) size accepted.
    pub max_virtual_size: u64,
    /// Largest file accepted.
    pub max_actual_size: u64,
    /// Largest amount of data (and table bookkeeping) held to reorder the file into guest order.
    pub max_reorder_bytes: usize,
    /// Whether ISO images are accepted.
    pub allow_iso: bool,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_virtual_size: 500 << 30,
            max_actual_size: 50 << 30,
            max_reorder_bytes: 64 << 20,
            allow_iso: false,
        }
    }
}

/// A detected image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Raw,
    Qcow2,
    VmdkMonolithicSparse,
    VmdkStreamOptimized,
    VhdFixed,
    VhdDynamic,
    Vhdx,
    Iso,
}

impl Format {
    /// The format family name, as declared by clients: `raw`, `qcow2`, `vmdk`, `vhd`, `vhdx`,
    /// `iso`.
    pub fn as_str(self) -> &'static str {
        self.declared().as_str()
    }

    /// The variant name, e.g. `streamOptimized` for a vmdk, `dynamic` for a vhd.
    pub fn variant(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::VmdkMonolithicSparse => "monolithicSparse",
            Format::VmdkStreamOptimized => "streamOptimized",
            Format::VhdFixed => "fixed",
            Format::VhdDynamic => "dynamic",
            Format::Vhdx => "vhdx",
            Format::Iso => "iso",
        }
    }

    /// The declared format this format satisfies.
    pub fn declared(self) -> DeclaredFormat {
        match self {
            Format::Raw => DeclaredFormat::Raw,
            Format::Qcow2 => DeclaredFormat::Qcow2,
            Format::VmdkMonolithicSparse | Format::VmdkStreamOptimized => DeclaredFormat::Vmdk,
            Format::VhdFixed | Format::VhdDynamic => DeclaredFormat::Vhd,
            Format::Vhdx => DeclaredFormat::Vhdx,
            Format::Iso => DeclaredFormat::Iso,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format as a client declares it. `Vmdk` matches both vmdk kinds, `Vhd` both vhd kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeclaredFormat {
    Raw,
    Qcow2,
    Vmdk,
    Vhd,
    Vhdx,
    Iso,
}

impl DeclaredFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DeclaredFormat::Raw => "raw",
            DeclaredFormat::Qcow2 => "qcow2",
            DeclaredFormat::Vmdk => "vmdk",
            DeclaredFormat::Vhd => "vhd",
            DeclaredFormat::Vhdx => "vhdx",
            DeclaredFormat::Iso => "iso",
        }
    }

    /// Whether a detected format satisfies this declaration.
    pub fn matches(self, format: Format) -> bool {
        format.declared() == self
    }
}

impl fmt::Display for DeclaredFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown format name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownFormat(pub String);

impl fmt::Display for UnknownFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown disk format {:?} (expected raw, qcow2, vmdk, vhd, vhdx or iso)",
            self.0
        )
    }
}

impl std::error::Error for UnknownFormat {}

impl FromStr for DeclaredFormat {
    type Err = UnknownFormat;

    /// Parses `raw`, `qcow2`, `vmdk`, `vhd` (also `vpc`), `vhdx`, `iso`, case-insensitively.
    fn from_str(s: &str) -> Result<DeclaredFormat, UnknownFormat> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(DeclaredFormat::Raw),
            "qcow2" => Ok(DeclaredFormat::Qcow2),
            "vmdk" => Ok(DeclaredFormat::Vmdk),
            "vhd" | "vpc" => Ok(DeclaredFormat::Vhd),
            "vhdx" => Ok(DeclaredFormat::Vhdx),
            "iso" => Ok(DeclaredFormat::Iso),
            _ => Err(UnknownFormat(s.to_string())),
        }
    }
}

/// A piece of the guest disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extent {
    /// Guest bytes at `offset` (they may be zeros).
    Data { offset: u64, bytes: Bytes },
    /// `len` guest bytes at `offset` that read as zeros.
    Zero { offset: u64, len: u64 },
}

impl Extent {
    pub fn offset(&self) -> u64 {
        match self {
            Extent::Data { offset, .. } | Extent::Zero { offset, .. } => *offset,
        }
    }

    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { bytes, .. } => bytes.len() as u64,
            Extent::Zero { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the headers say, once they have been read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    pub format: Format,
    /// The guest size; `None` for a raw file of unknown length (known at `finish`).
    pub virtual_size: Option<u64>,
    /// True when the end of the file may still change the format and size: a raw file that
    /// turns out to end with a fixed-VHD footer.
    pub provisional: bool,
    /// qcow2 cluster, vmdk grain or vhd/vhdx block size, in bytes.
    pub cluster_size: Option<u64>,
}

/// The result of a complete decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub format: Format,
    pub virtual_size: u64,
    /// Bytes of the file read.
    pub bytes_read: u64,
    /// SHA-256 of the guest content, when asked for with [`Decoder::set_digest`].
    pub sha256: Option<[u8; 32]>,
}

/// One format's decoding state, fed after detection.
pub(crate) trait Body: Send {
    /// Next bytes of the file (possibly none).
    fn feed(&mut self, data: &[u8], out: Out) -> Result<(), Refusal>;
    fn header(&self) -> Option<HeaderInfo>;
    fn held(&self) -> usize;
    /// End of file; `tail` is the file's last bytes (up to 512). Returns the final format and
    /// virtual size.
    fn finish(&mut self, tail: &[u8], out: Out) -> Result<(Format, u64), Refusal>;
}

enum State {
    Prefix(Vec<u8>),
    Body(Box<dyn Body>),
}

/// Tracks the extents handed to the caller: checks the ordering contract, hashes content.
struct Emitted {
    next: u64,
    broken: bool,
    digest: Option<Sha256>,
}

impl Emitted {
    fn take(&mut self, e: &Extent) -> bool {
        if e.offset() != self.next || self.broken {
            self.broken = true;
            return false;
        }
        self.next += e.len();
        if let Some(d) = &mut self.digest {
            match e {
                Extent::Data { bytes, .. } => d.update(bytes),
                Extent::Zero { len, .. } => {
                    static ZEROS: [u8; 65536] = [0u8; 65536];
                    let mut left = *len;
                    while left > 0 {
                        let n = left.min(ZEROS.len() as u64) as usize;
                        d.update(&ZEROS[..n]);
                        left -= n as u64;
                    }
                }
            }
        }
        !e.is_empty()
    }
}

fn sink<'a>(emitted: &'a mut Emitted, out: &'a mut dyn FnMut(Extent)) -> impl FnMut(Extent) + 'a {
    move |e: Extent| {
        if emitted.take(&e) {
            out(e);
        }
    }
}

/// The push-based streaming decoder. See the crate documentation for its contract. It is
/// `Send`, so it can live in an async task between pieces of an upload.
pub struct Decoder {
    limits: Limits,
    declared: Option<DeclaredFormat>,
    file_size: Option<u64>,
    read: u64,
    tail: Vec<u8>,
    state: State,
    header: Option<HeaderInfo>,
    failed: Option<Refusal>,
    emitted: Emitted,
}

const TAIL: usize = 512;

impl Decoder {
    /// A decoder for one file. `declared` is the client's declared format, if any;
    /// `file_size` the file's length if known in advance (it lets some checks happen earlier).
    pub fn new(
        limits: Limits,
        declared: Option<DeclaredFormat>,
        file_size: Option<u64>,
    ) -> Decoder {
        let failed = match file_size {
            Some(s) if s > limits.max_actual_size => Some(Refusal::new(
                RefusalKind::FileTooLarge,
                format!(
                    "the file is {s} bytes, over the limit of {} bytes",
                    limits.max_actual_size
                ),
            )),
            _ => None,
        };
        Decoder {
            limits,
            declared,
            file_size,
            read: 0,
            tail: Vec::with_capacity(TAIL * 2),
            state: State::Prefix(Vec::new()),
            header: None,
            failed,
            emitted: Emitted {
                next: 0,
                broken: false,
                digest: None,
            },
        }
    }

    /// Asks for a SHA-256 of the guest content in the [`Summary`] (it costs a hash over the
    /// whole virtual size, zeros included). Call before the first `feed`.
    pub fn set_digest(&mut self, on: bool) {
        self.emitted.digest = if on { Some(Sha256::new()) } else { None };
    }

    /// Once the headers are read: format and virtual size.
    pub fn header(&self) -> Option<&HeaderInfo> {
        self.header.as_ref()
    }

    /// Bytes of the file fed so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    /// Memory held by the decoder for reordering, as counted against
    /// [`Limits::max_reorder_bytes`] (plus the detection prefix before the format is known).
    pub fn held_bytes(&self) -> usize {
        match &self.state {
            State::Prefix(p) => p.len(),
            State::Body(b) => b.held(),
        }
    }

    /// Next bytes of the file, in order. Emits guest extents through `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut dyn FnMut(Extent)) -> Result<(), Refusal> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let r = self.feed_inner(bytes, out);
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn feed_inner(&mut self, bytes: &[u8], out: &mut dyn FnMut(Extent)) -> Result<(), Refusal> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.read = self.read.saturating_add(bytes.len() as u64);
        if self.read > self.limits.max_actual_size {
            return Err(Refusal::new(
                RefusalKind::FileTooLarge,
                format!(
                    "the file is over the limit of {} bytes",
                    self.limits.max_actual_size
                ),
            ));
        }
        if let Some(s) = self.file_size {
            if self.read > s {
                return Err(error::inconsistent(format!(
                    "the file is longer than its declared size of {s} bytes"
                )));
            }
        }
        let keep = bytes.len().min(TAIL);
        self.tail.extend_from_slice(&bytes[bytes.len() - keep..]);
        if self.tail.len() > TAIL {
            let cut = self.tail.len() - TAIL;
            self.tail.drain(..cut);
        }
        match &mut self.state {
            State::Prefix(prefix) => {
                // Only the detection window is copied; the rest goes straight to the body.
                let take = DETECT_LEN.saturating_sub(prefix.len()).min(bytes.len());
                prefix.extend_from_slice(&bytes[..take]);
                if let Some(format) = detect(prefix, self.file_size)? {
                    let prefix = std::mem::take(prefix);
                    let mut body = self.open_body(format, &prefix, out)?;
                    body.feed(&bytes[take..], &mut sink(&mut self.emitted, out))?;
                    self.state = State::Body(body);
                }
            }
            State::Body(body) => body.feed(bytes, &mut sink(&mut self.emitted, out))?,
        }
        self.after_step()
    }

    fn after_step(&mut self) -> Result<(), Refusal> {
        if self.emitted.broken {
            return Err(error::inconsistent(
                "internal error: extents out of order; the image was not accepted",
            ));
        }
        if self.header.is_none() {
            if let State::Body(b) = &self.state {
                self.header = b.header();
            }
        }
        Ok(())
    }

    fn open_body(
        &mut self,
        format: Format,
        prefix: &[u8],
        out: &mut dyn FnMut(Extent),
    ) -> Result<Box<dyn Body>, Refusal> {
        let mismatch = |declared: DeclaredFormat| {
            Refusal::new(
                RefusalKind::FormatMismatch,
                format!(
                    "the file was declared {declared} but is {}",
                    format.as_str()
                ),
            )
        };
        if let Some(d) = self.declared {
            let ok = d.matches(format) || (d == DeclaredFormat::Vhd && format == Format::Raw);
            if !ok {
                return Err(mismatch(d));
            }
        }
        if format == Format::Iso && !self.limits.allow_iso {
            return Err(Refusal::new(
                RefusalKind::IsoNeedsForce,
                "the file is an ISO image; import it with the force option to accept it",
            ));
        }
        let mut body: Box<dyn Body> = match format {
            Format::Raw | Format::Iso | Format::VhdFixed => Box::new(raw::RawBody::new(
                format,
                self.declared,
                self.file_size,
                self.limits,
            )),
            Format::Qcow2 => qcow2::open(prefix, self.file_size, self.limits)?,
            Format::VmdkMonolithicSparse | Format::VmdkStreamOptimized => {
                vmdk::open(prefix, format, self.file_size, self.limits)?
            }
            Format::VhdDynamic => vhd::open_dynamic(prefix, self.file_size, self.limits)?,
            Format::Vhdx => vhdx::open(prefix, self.file_size, self.limits)?,
        };
        body.feed(prefix, &mut sink(&mut self.emitted, out))?;
        Ok(body)
    }

    /// End of file. Emits the rest of the guest disk and checks the file was complete.
    pub fn finish(mut self, out: &mut dyn FnMut(Extent)) -> Result<Summary, Refusal> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if let Some(s) = self.file_size {
            if self.read < s {
                return Err(error::truncated(format!(
                    "the file ended after {} of its {s} bytes",
                    self.read
                )));
            }
        }
        if self.read == 0 {
            return Err(error::truncated("the file is empty"));
        }
        if let State::Prefix(prefix) = &mut self.state {
            let prefix = std::mem::take(prefix);
            let format = detect::detect(&prefix, Some(prefix.len() as u64))?.unwrap_or(Format::Raw);
            let body = self.open_body(format, &prefix, out)?;
            self.state = State::Body(body);
            self.after_step()?;
        }
        let State::Body(body) = &mut self.state else {
            return Err(error::truncated("the file is empty"));
        };
        let (format, virtual_size) = body.finish(&self.tail, &mut sink(&mut self.emitted, out))?;
        if self.emitted.broken || self.emitted.next != virtual_size {
            return Err(error::inconsistent(
                "internal error: the extents do not cover the disk; the image was not accepted",
            ));
        }
        let polyglot_footer =
            !matches!(format, Format::Raw | Format::VhdFixed | Format::VhdDynamic)
                && self.tail.len() == TAIL
                && self.tail.starts_with(b"conectix");
        if polyglot_footer {
            return Err(Refusal::new(
                RefusalKind::Polyglot,
                format!(
                    "the file is {} but also ends with a VHD footer",
                    format.variant()
                ),
            ));
        }
        Ok(Summary {
            format,
            virtual_size,
            bytes_read: self.read,
            sha256: self.emitted.digest.take().map(|d| d.finalize().into()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoder_can_move_between_threads() {
        fn send<T: Send>() {}
        send::<Decoder>();
        send::<Refusal>();
        send::<Extent>();
    }

    #[test]
    fn declared_formats_parse() {
        assert_eq!(
            "VMDK".parse::<DeclaredFormat>().unwrap(),
            DeclaredFormat::Vmdk
        );
        assert_eq!(
            "vpc".parse::<DeclaredFormat>().unwrap(),
            DeclaredFormat::Vhd
        );
        assert!("qed".parse::<DeclaredFormat>().is_err());
        assert!(DeclaredFormat::Vmdk.matches(Format::VmdkStreamOptimized));
        assert!(DeclaredFormat::Vhd.matches(Format::VhdFixed));
        assert!(!DeclaredFormat::Raw.matches(Format::Iso));
        assert_eq!(Format::VhdDynamic.as_str(), "vhd");
    }
}
