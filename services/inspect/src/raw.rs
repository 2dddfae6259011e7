//! Raw, ISO and fixed-VHD files: the file is the guest disk, except that a fixed VHD ends with
//! a 512-byte footer. The last 512 bytes are held back until the end shows which it is.

use bytes::Bytes;

use crate::error::{Refusal, RefusalKind};
use crate::reorder::Out;
use crate::{vhd, DeclaredFormat, Extent, Format, HeaderInfo, Limits};

const FOOTER: usize = 512;

pub(crate) struct RawBody {
    format: Format,
    declared: Option<DeclaredFormat>,
    file_size: Option<u64>,
    limits: Limits,
    emitted: u64,
    hold: Vec<u8>,
}

impl RawBody {
    pub(crate) fn new(
        format: Format,
        declared: Option<DeclaredFormat>,
        file_size: Option<u64>,
        limits: Limits,
    ) -> RawBody {
        RawBody {
            format,
            declared,
            file_size,
            limits,
            emitted: 0,
            hold: Vec::with_capacity(FOOTER * 2),
        }
    }

    fn emit(&mut self, bytes: &[u8], out: Out) -> Result<(), Refusal> {
        if bytes.is_empty() {
            return Ok(());
        }
        let end = self.emitted + bytes.len() as u64;
        if end > self.limits.max_virtual_size {
            return Err(too_large(end, self.limits.max_virtual_size));
        }
        out(Extent::Data {
            offset: self.emitted,
            bytes: Bytes::copy_from_slice(bytes),
        });
        self.emitted = end;
        Ok(())
    }

    fn expects_vhd(&self) -> bool {
        self.declared == Some(DeclaredFormat::Vhd)
    }
}

fn too_large(size: u64, max: u64) -> Refusal {
    Refusal::new(
        RefusalKind::VirtualSizeTooLarge,
        format!("the disk is at least {size} bytes, over the limit of {max} bytes"),
    )
}

impl crate::Body for RawBody {
    fn feed(&mut self, data: &[u8], out: Out) -> Result<(), Refusal> {
        if data.len() >= FOOTER {
            let hold = std::mem::take(&mut self.hold);
            self.emit(&hold, out)?;
            let cut = data.len() - FOOTER;
            self.emit(&data[..cut], out)?;
            self.hold.extend_from_slice(&data[cut..]);
        } else {
            self.hold.extend_from_slice(data);
            if self.hold.len() > FOOTER {
                let cut = self.hold.len() - FOOTER;
                let head: Vec<u8> = self.hold.drain(..cut).collect();
                self.emit(&head, out)?;
            }
        }
        Ok(())
    }

    fn header(&self) -> Option<HeaderInfo> {
        let virtual_size = if self.expects_vhd() {
            self.file_size.map(|s| s.saturating_sub(FOOTER as u64))
        } else {
            self.file_size
        };
        Some(HeaderInfo {
            format: if self.expects_vhd() {
                Format::VhdFixed
            } else {
                self.format
            },
            virtual_size,
            provisional: self.format == Format::Raw && self.declared.is_none(),
            cluster_size: None,
        })
    }

    fn held(&self) -> usize {
        self.hold.capacity()
    }

    fn finish(&mut self, _tail: &[u8], out: Out) -> Result<(Format, u64), Refusal> {
        let hold = std::mem::take(&mut self.hold);
        let is_footer = hold.len() == FOOTER && hold.starts_with(b"conectix");
        if is_footer {
            if self.format == Format::Iso {
                return Err(Refusal::new(
                    RefusalKind::Polyglot,
                    "the file is an ISO image but also ends with a VHD footer",
                ));
            }
            match vhd::Footer::parse(&hold) {
                Ok(footer) => {
                    if self.declared == Some(DeclaredFormat::Raw) {
                        return Err(Refusal::new(
                            RefusalKind::FormatMismatch,
                            "the file was declared raw but ends with a VHD footer (it is a fixed VHD)",
                        ));
                    }
                    match footer.disk_type {
                        vhd::DISK_FIXED => {}
                        vhd::DISK_DIFFERENCING => {
                            return Err(Refusal::new(
                                RefusalKind::BackingFile,
                                "a differencing VHD depends on a parent image",
                            ))
                        }
                        t => {
                            return Err(crate::error::inconsistent(format!(
                                "a VHD footer of disk type {t} at the end of a file without a VHD header"
                            )))
                        }
                    }
                    // The data area is the disk. Creators disagree on whether the CHS
                    // geometry or the current size is the disk size; either may match it.
                    let size = footer.virtual_size();
                    if size != self.emitted && footer.current_size() != self.emitted {
                        return Err(crate::error::inconsistent(format!(
                            "the fixed VHD footer says {size} bytes but the file holds {} bytes of disk",
                            self.emitted
                        )));
                    }
                    return Ok((Format::VhdFixed, self.emitted));
                }
                Err(e) if self.expects_vhd() => return Err(e),
                Err(_) => {}
            }
        }
        if self.expects_vhd() {
            return Err(Refusal::new(
                RefusalKind::FormatMismatch,
                "the file was declared vhd but has no VHD footer",
            ));
        }
        self.emit(&hold, out)?;
        Ok((self.format, self.emitted))
    }
}
