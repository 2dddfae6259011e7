//! Public images: generated deterministically from their definitions at a region's first start,
//! so every region holds identical bytes (and identical chunks) without shipping disk files.
//! Each is a small bootable-looking raw disk: an MBR with one partition, a superblock-like
//! header, some data, the rest zeros.

use crate::catalogue::{self, PublicImage};
use crate::disk;
use crate::error::Result;
use crate::meta::Store;
use crate::model::{Chain, ImageKind, ImageRow, ImageSource, ImageState, LineageLink};
use imagefleet_chunkstore::{ChunkStore, CHUNK_SIZE};
use sha2::{Digest, Sha256};
use std::sync::RwLock;

/// Lowercase alphanumerics derived from a label: deterministic ids for public images.
pub fn stable_suffix(label: &str) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    Sha256::digest(label.as_bytes())
        .iter()
        .take(8)
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

pub fn image_id(image: &PublicImage) -> String {
    format!(
        "img-{}",
        stable_suffix(&format!("public-image:{}", image.name))
    )
}

pub fn snapshot_id(image: &PublicImage) -> String {
    format!(
        "snap-{}",
        stable_suffix(&format!("public-snapshot:{}", image.name))
    )
}

/// Fills `out` with bytes derived from `seed` (sha256 in counter mode).
fn fill(seed: &str, out: &mut [u8]) {
    for (i, block) in out.chunks_mut(32).enumerate() {
        let mut h = Sha256::new();
        h.update(seed.as_bytes());
        h.update((i as u64).to_le_bytes());
        let d = h.finalize();
        block.copy_from_slice(&d[..block.len()]);
    }
}

/// Number of chunks on the disk.
pub fn chunk_count(image: &PublicImage) -> u64 {
    image.virtual_size_mib * (1 << 20) / CHUNK_SIZE as u64
}

/// The content of chunk `idx`; `None` for a chunk of zeros.
pub fn chunk(image: &PublicImage, idx: u64) -> Option<Vec<u8>> {
    let data_chunks = 2 + image.virtual_size_mib / 32;
    let mut buf = vec![0u8; CHUNK_SIZE];
    match idx {
        0 => {
            // Master boot record: boot code, one active partition from LBA 2048 to the end.
            fill("imagefleet-boot-code", &mut buf[..440]);
            let sectors = (image.virtual_size_mib << 20) / 512;
            let entry = &mut buf[446..462];
            entry[0] = 0x80;
            entry[4] = image.partition_type;
            entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
            entry[12..16].copy_from_slice(&((sectors - 2048) as u32).to_le_bytes());
            buf[510] = 0x55;
            buf[511] = 0xAA;
        }
        1 => {
            let header = format!(
                "IMAGEFLEET-PUBLIC-IMAGE\nname={}\nos={}\nplatform={}\narch={}\n",
                image.name, image.os_name, image.platform, image.architecture
            );
            buf[..header.len()].copy_from_slice(header.as_bytes());
            fill(
                &format!("superblock:{}", image.name),
                &mut buf[4096..4096 + 256 * 1024],
            );
        }
        i if i < data_chunks => fill(&format!("data:{}:{i}", image.name), &mut buf),
        // One chunk every Linux image has in common, as distributions share files.
        i if i == data_chunks && !image.is_windows() => fill("shared:linux-firmware", &mut buf),
        _ => return None,
    }
    Some(buf)
}

/// Seeds every public image the region does not have yet: chunks stored and made durable,
/// then the image and its manifest recorded.
pub(crate) fn seed_public_images(
    region: &str,
    store: &Store,
    chunks: &ChunkStore,
    chunk_refs: &RwLock<()>,
) -> Result<()> {
    let mainland = catalogue::is_mainland(region);
    for def in catalogue::PUBLIC_IMAGES {
        let id = image_id(def);
        if store.image(&id)?.is_some() {
            continue;
        }
        let _guard = chunk_refs.read().unwrap_or_else(|e| e.into_inner());
        let mut manifest = Vec::new();
        for idx in 0..chunk_count(def) {
            if let Some(data) = chunk(def, idx) {
                if let Some(d) = chunks.put(&data)? {
                    manifest.push((idx, d));
                }
            }
        }
        chunks.sync()?;
        let virtual_size = def.virtual_size_mib << 20;
        let row = ImageRow {
            image_id: id.clone(),
            owner: String::new(),
            name: def.name.to_string(),
            description: format!("{} public image", def.os_name),
            kind: ImageKind::Public,
            source: ImageSource::Official,
            state: ImageState::Normal,
            state_reason: String::new(),
            os_name: def.os_name.into(),
            platform: def.platform.into(),
            architecture: def.architecture.into(),
            virtual_size,
            created_at: 1_700_000_000,
            snapshot_id: Some(snapshot_id(def)),
            license_type: "TencentCloud".into(),
            sync_percent: 100,
            parent_image_id: String::new(),
            parent_region: String::new(),
            parent_owner: String::new(),
            root_image_id: id.clone(),
            root_paid: def.paid_in(mainland),
            chain: Chain(vec![LineageLink {
                image_id: id.clone(),
                region: region.to_string(),
                owner: String::new(),
            }]),
            root_kind: def.root_kind(),
            content_digest: disk::manifest_digest(virtual_size, &manifest),
            deprecated: false,
            stored_bytes: 0,
        };
        store.insert_public_image(&row, &manifest)?;
        tracing::info!(%region, image = %id, name = def.name, "seeded public image");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::PUBLIC_IMAGES;

    #[test]
    fn public_images_are_deterministic_bootable_and_mostly_zero() {
        for image in PUBLIC_IMAGES {
            let first = chunk(image, 0).unwrap();
            assert_eq!(&first[510..512], &[0x55, 0xAA]);
            assert_eq!(first[446 + 4], image.partition_type);
            assert_eq!(chunk(image, 1), chunk(image, 1));
            let stored = (0..chunk_count(image))
                .filter(|i| chunk(image, *i).is_some())
                .count() as u64;
            assert!(
                stored * 4 < chunk_count(image),
                "{} is mostly zeros",
                image.name
            );
            assert!(image_id(image).starts_with("img-") && image_id(image).len() == 12);
        }
        let ids: std::collections::HashSet<_> = PUBLIC_IMAGES.iter().map(image_id).collect();
        assert_eq!(ids.len(), PUBLIC_IMAGES.len());
    }
}
