//! `SyncImages` on the source region: checks every rule, then every destination admits its
//! copies in one transaction; all copies of the call start, or none does. A refusal names the
//! source image and the destination region (`ErrorInfo` metadata `image_id` and `region`); a
//! dry run runs exactly the same checks, the destinations' included, and keeps nothing.

use super::{MAX_SYNC_IMAGES, MAX_SYNC_REGIONS};
use crate::catalogue;
use crate::error::{RegionError, Result};
use crate::meta::CopyPin;
use crate::model::{ImageRow, ImageState};
use crate::region::{blocking, Region};
use crate::shares::Access;
use crate::validate;
use imagefleet_proto::region::v1::*;
use imagefleet_rpc::time::unix_now;
use sha2::Digest;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// How long past the copy deadline a source keeps a pin the destination never released.
const PIN_GRACE_SECS: i64 = 3600;

/// The idempotency key of one (image, destination) of a `SyncImages` call.
fn request_key(owner: &str, client_token: &str, image_id: &str, region: &str) -> String {
    if client_token.is_empty() {
        return format!("once:{}", hex::encode(rand::random::<[u8; 16]>()));
    }
    let mut h = sha2::Sha256::new();
    for part in [owner, client_token, image_id, region] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    format!("token:{}", hex::encode(h.finalize()))
}

fn refused(image_id: &str, region: &str, e: RegionError) -> RegionError {
    match e {
        e @ RegionError::CopyRefused { .. } => e,
        e => RegionError::CopyRefused {
            image_id: image_id.to_string(),
            region: region.to_string(),
            source: Box::new(e),
        },
    }
}

/// A destination's answer, as a refusal naming it (and the first image, unless the
/// destination named the one it refused).
fn from_destination(status: tonic::Status, first_image: &str, region: &str) -> RegionError {
    let metadata = imagefleet_proto::error::metadata(&status);
    if metadata.contains_key("image_id") && metadata.contains_key("region") {
        return RegionError::Status(status);
    }
    refused(
        first_image,
        region,
        RegionError::Status(imagefleet_rpc::unavailable(region, status)),
    )
}

fn check_request(req: &SyncImagesRequest) -> Result<()> {
    if req.image_ids.is_empty() {
        return Err(RegionError::invalid(
            "image_ids",
            "MissingParameter",
            "give at least one image id",
        ));
    }
    if req.image_ids.len() > MAX_SYNC_IMAGES {
        return Err(RegionError::invalid(
            "image_ids",
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_SYNC_IMAGES} images per call"),
        ));
    }
    validate::id_list("image_ids", &req.image_ids, validate::image_id)?;
    if req.destination_regions.is_empty() {
        return Err(RegionError::invalid(
            "destination_regions",
            "MissingParameter",
            "give at least one destination region",
        ));
    }
    if req.destination_regions.len() > MAX_SYNC_REGIONS {
        return Err(RegionError::invalid(
            "destination_regions",
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_SYNC_REGIONS} destination regions per call"),
        ));
    }
    let mut seen = HashSet::new();
    for r in &req.destination_regions {
        if !seen.insert(r) {
            return Err(RegionError::invalid(
                "destination_regions",
                "InvalidParameterValue.Duplicate",
                format!("{r} is listed twice"),
            ));
        }
    }
    if !req.image_name.is_empty() {
        validate::image_name("image_name", &req.image_name)?;
    }
    if req.client_token.chars().count() > 64 {
        return Err(RegionError::invalid(
            "client_token",
            "InvalidParameterValue.ClientToken",
            "client tokens are at most 64 printable characters",
        ));
    }
    imagefleet_proto::text::check("client_token", &req.client_token)?;
    Ok(())
}

fn sync_source(image: &ImageRow, here: &str, caller: &str, name: &str) -> SyncSource {
    SyncSource {
        region: here.to_string(),
        image_id: image.image_id.clone(),
        owner_account_id: caller.to_string(),
        image_name: if name.is_empty() {
            image.name.clone()
        } else {
            name.to_string()
        },
        image_description: image.description.clone(),
        os_name: image.os_name.clone(),
        platform: image.platform.clone(),
        architecture: image.architecture.clone(),
        license_type: image.license_type.clone(),
        virtual_size_bytes: image.virtual_size,
        content_digest: image.content_digest.clone(),
        ultimate_source_image_id: image.root_image_id.clone(),
        ultimate_source_paid: image.root_paid,
        snapshot_id: image.snapshot_id.clone().unwrap_or_default(),
        stored_bytes: image.stored_bytes,
        lineage_chain: image.chain.to_proto(here),
        root_kind: image.root_kind.as_str().to_string(),
    }
}

pub(crate) async fn sync_images(
    region: &Arc<Region>,
    caller: &str,
    req: SyncImagesRequest,
) -> Result<SyncImagesResponse> {
    check_request(&req)?;
    let here = region.config.region.clone();
    let directory = region.region_directory().await?;
    let first_image = req.image_ids[0].clone();
    for dest in &req.destination_regions {
        let (reason, message) = if dest == &here {
            (
                "UnsupportedOperation.Region",
                "an image cannot be copied to its own region".to_string(),
            )
        } else if !directory.iter().any(|r| &r.region == dest) {
            (
                "InvalidRegion.NotFound",
                format!("region {dest} does not exist"),
            )
        } else if catalogue::is_mainland(dest) != catalogue::is_mainland(&here) {
            (
                "UnsupportedOperation.Region",
                format!("copies stay on one side of the mainland China line: {here} -> {dest} is not allowed"),
            )
        } else {
            continue;
        };
        return Err(refused(
            &first_image,
            dest,
            RegionError::invalid("destination_regions", reason, message),
        ));
    }
    let first_dest = req.destination_regions[0].clone();
    let mut sources = Vec::new();
    for image_id in &req.image_ids {
        let image = match region.resolve_image(image_id, caller).await {
            Ok((image, Access::Own)) => image,
            Ok(_) => {
                return Err(refused(
                    image_id,
                    &first_dest,
                    RegionError::NotYours(image_id.clone()),
                ))
            }
            Err(e) => return Err(refused(image_id, &first_dest, e)),
        };
        if image.state != ImageState::Normal {
            return Err(refused(
                image_id,
                &first_dest,
                RegionError::image_state(&image),
            ));
        }
        sources.push(image);
    }

    // Every copy, grouped by destination (each destination admits its group whole).
    let mut plan: BTreeMap<String, Vec<SyncCopy>> = BTreeMap::new();
    let mut order = Vec::new();
    for image in &sources {
        for dest in &req.destination_regions {
            let key = request_key(caller, &req.client_token, &image.image_id, dest);
            plan.entry(dest.clone()).or_default().push(SyncCopy {
                source: Some(sync_source(image, &here, caller, &req.image_name)),
                request_key: key,
            });
            order.push((image.image_id.clone(), dest.clone()));
        }
    }
    let first_of = |copies: &[SyncCopy]| {
        copies
            .first()
            .and_then(|c| c.source.as_ref())
            .map(|s| s.image_id.clone())
            .unwrap_or_default()
    };

    // The checks, everywhere, before anything is kept anywhere.
    for (dest, copies) in &plan {
        region
            .peer(dest)
            .await
            .map_err(|e| refused(&first_of(copies), dest, e))?
            .start_sync(StartSyncRequest {
                copies: copies.clone(),
                dry_run: true,
            })
            .await
            .map_err(|s| from_destination(s, &first_of(copies), dest))?;
    }
    if req.dry_run {
        return Ok(SyncImagesResponse {
            image_set: order
                .into_iter()
                .map(|(source_image_id, region)| SyncedImage {
                    source_image_id,
                    region,
                    image_id: String::new(),
                })
                .collect(),
        });
    }

    // Pin the source snapshots for the copies' lifetime, then admit for real.
    let expires_at = unix_now() + region.config.copy_deadline.as_secs() as i64 + PIN_GRACE_SECS;
    let pins: Vec<CopyPin> = plan
        .iter()
        .flat_map(|(dest, copies)| {
            copies.iter().map(move |c| CopyPin {
                request_key: c.request_key.clone(),
                image_id: c
                    .source
                    .as_ref()
                    .map(|s| s.image_id.clone())
                    .unwrap_or_default(),
                dest_region: dest.clone(),
                expires_at,
            })
        })
        .collect();
    let keys: Vec<String> = pins.iter().map(|p| p.request_key.clone()).collect();
    let store = region.store.clone();
    let owner = caller.to_string();
    blocking(move || store.pin_for_copies(&owner, &pins)).await?;

    let mut started: Vec<(String, Vec<String>)> = Vec::new();
    let mut ids = std::collections::HashMap::new();
    for (dest, copies) in &plan {
        let admitted = async {
            region
                .peer(dest)
                .await
                .map_err(|e| refused(&first_of(copies), dest, e))?
                .start_sync(StartSyncRequest {
                    copies: copies.clone(),
                    dry_run: false,
                })
                .await
                .map_err(|s| from_destination(s, &first_of(copies), dest))
        }
        .await;
        match admitted {
            Ok(response) => {
                let image_ids = response.into_inner().image_ids;
                for (copy, id) in copies.iter().zip(&image_ids) {
                    let source = copy
                        .source
                        .as_ref()
                        .map(|s| s.image_id.clone())
                        .unwrap_or_default();
                    ids.insert((source, dest.clone()), id.clone());
                }
                started.push((dest.clone(), image_ids));
            }
            Err(e) => {
                undo(region, started, keys).await;
                return Err(e);
            }
        }
    }
    tracing::info!(region = %here, copies = order.len(), "copies started");
    Ok(SyncImagesResponse {
        image_set: order
            .into_iter()
            .map(|(source_image_id, region)| SyncedImage {
                image_id: ids
                    .remove(&(source_image_id.clone(), region.clone()))
                    .unwrap_or_default(),
                source_image_id,
                region,
            })
            .collect(),
    })
}

/// Takes back the copies of a call that could not start everywhere, and its pins.
async fn undo(region: &Arc<Region>, started: Vec<(String, Vec<String>)>, keys: Vec<String>) {
    for (dest, image_ids) in started {
        let cancelled = async {
            region
                .peer(&dest)
                .await?
                .cancel_sync(CancelSyncRequest { image_ids })
                .await?;
            Ok::<_, RegionError>(())
        }
        .await;
        if let Err(e) = cancelled {
            tracing::warn!(%dest, error = %e, "copies of a refused call not cancelled; they fail when their source pins go");
        }
    }
    let store = region.store.clone();
    match blocking(move || store.release_pins(&keys, unix_now())).await {
        Ok(released) => {
            let _ = region.reclaim(released).await;
        }
        Err(e) => tracing::warn!(error = %e, "pins of a refused call stay until they expire"),
    }
}
