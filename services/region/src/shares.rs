//! Shared images, on the region's side: who may see and use an image (owner, everyone for
//! public images, and accounts it is shared with, asked of the sharing service on every call:
//! a cancelled share stops working at once), and the share operations themselves.
//!
//! The sharing service is asked every time and its failures are `UNAVAILABLE`: a share check
//! that cannot be made never grants access.

use crate::batch::Batcher;
use crate::error::{RegionError, Result};
use crate::model::{ImageRow, ImageState};
use crate::region::Region;
use crate::validate;
use imagefleet_proto::catalog::v1::GetAccountRequest;
use imagefleet_proto::ids;
use imagefleet_proto::region::v1::{
    DescribeImageSharePermissionRequest, DescribeImageSharePermissionResponse, ImageShare,
    ModifyImageSharePermissionRequest, SharePermission,
};
use imagefleet_proto::sharing::v1 as sharing;
use imagefleet_proto::sharing::v1::sharing_internal_service_client::SharingInternalServiceClient;
use imagefleet_rpc::client::{signed_pool, SignedPool, SHARING_SCOPE};
use imagefleet_rpc::Credentials;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use tonic::Code;

/// The HTTP/2 connections of a region's channel to the sharing service, used in turn: each is
/// driven by one task on either side, and the checks of many concurrent launches went up to
/// ~1.4x faster over four than over one (`share_rps`, bench/RESULTS.md).
const SHARING_CONNECTIONS: usize = 4;

/// Batched share checks on the wire at once (one per connection).
const CHECKS_IN_FLIGHT: usize = SHARING_CONNECTIONS;

/// Batched listings on the wire at once: fewer than checks, since concurrent listings are
/// mostly of the same few accounts, and each account is asked once per call.
const LISTINGS_IN_FLIGHT: usize = 2;

/// The most checks (or accounts) in one batched call: the sharing service takes up to 1000.
const MAX_BATCH: usize = 256;

/// A region's client of the sharing service.
pub type SharingClient = SharingInternalServiceClient<SignedPool>;

/// The check every use of another account's image makes (launch, reset, describe by id): is
/// the image shared with the account now? One per region, on the region's one channel to the
/// sharing service (`SHARING_CONNECTIONS` connections used in turn); every answer comes from
/// the sharing service (nothing is cached), so a cancelled share is refused at the next call.
///
/// Checks (and listings of what is shared with an account) made while earlier ones are on the
/// wire travel together in the next `CheckShares` (`ListSharedWithAccounts`) call
/// ([`Batcher`]): each is still answered by a read made after it was asked.
#[derive(Clone)]
pub struct ShareChecker {
    client: SharingClient,
    batches: Arc<OnceLock<Batches>>,
}

struct Batches {
    checks: Batcher<sharing::CheckShareRequest, bool>,
    listings: Batcher<String, Vec<String>>,
}

impl ShareChecker {
    /// The region's client of the sharing service at `sharing_url`, signing with
    /// `credentials` (the region's service credentials): the channel `Region::open` makes.
    pub fn connect(
        sharing_url: &str,
        credentials: Credentials,
    ) -> Result<ShareChecker, tonic::transport::Error> {
        let channel = signed_pool(sharing_url, credentials, SHARING_SCOPE, SHARING_CONNECTIONS)?;
        Ok(ShareChecker {
            client: SharingInternalServiceClient::new(channel),
            batches: Arc::new(OnceLock::new()),
        })
    }

    /// The client, for the region's other calls to the sharing service (same channel).
    pub fn client(&self) -> SharingClient {
        self.client.clone()
    }

    /// The batching tasks, started on first use (on the runtime of the first caller).
    fn batches(&self) -> &Batches {
        self.batches.get_or_init(|| {
            let client = self.client.clone();
            let checks = Batcher::spawn(CHECKS_IN_FLIGHT, MAX_BATCH, move |checks| {
                let mut client = client.clone();
                async move {
                    let answer = client
                        .check_shares(sharing::CheckSharesRequest { checks })
                        .await?;
                    Ok(answer.into_inner().shared)
                }
            });
            let client = self.client.clone();
            let listings = Batcher::spawn(
                LISTINGS_IN_FLIGHT,
                MAX_BATCH,
                move |accounts: Vec<String>| {
                    let mut client = client.clone();
                    async move {
                        // Each account once, however many asked.
                        let mut unique = accounts.clone();
                        unique.sort();
                        unique.dedup();
                        let lists = client
                            .list_shared_with_accounts(sharing::ListSharedWithAccountsRequest {
                                account_ids: unique.clone(),
                            })
                            .await?
                            .into_inner()
                            .lists;
                        if lists.len() != unique.len() {
                            return Err(tonic::Status::internal(format!(
                                "{} lists for {} accounts",
                                lists.len(),
                                unique.len()
                            )));
                        }
                        let by_account: HashMap<String, Vec<String>> = unique
                            .into_iter()
                            .zip(lists.into_iter().map(|l| l.image_ids))
                            .collect();
                        Ok(accounts
                            .iter()
                            .map(|a| by_account.get(a).cloned().unwrap_or_default())
                            .collect())
                    }
                },
            );
            Batches { checks, listings }
        })
    }

    /// Whether `image_id` is shared with `account`, as the sharing service says now.
    pub async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, tonic::Status> {
        // Checked here so that one bad request never fails the batch it would travel in.
        ids::check_image_id("image_id", image_id)?;
        ids::check_account_id("account_id", account)?;
        self.batches()
            .checks
            .call(sharing::CheckShareRequest {
                image_id: image_id.to_string(),
                account_id: account.to_string(),
            })
            .await
    }

    /// The images shared with `account` (in any region), as the sharing service says now.
    pub async fn shared_with(&self, account: &str) -> Result<Vec<String>, tonic::Status> {
        ids::check_account_id("account_id", account)?;
        self.batches().listings.call(account.to_string()).await
    }
}

/// How the caller is related to an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Own,
    Public,
    /// Another account's image shared with the caller: launch and reset only.
    Shared,
}

fn sharing_down(status: tonic::Status) -> RegionError {
    imagefleet_rpc::unavailable("sharing", status).into()
}

impl Region {
    /// The image and how the caller may use it; `NOT_FOUND` if the caller may not see it.
    pub(crate) async fn resolve_image(
        &self,
        image_id: &str,
        caller: &str,
    ) -> Result<(ImageRow, Access)> {
        let image = self
            .image_row(image_id)?
            .ok_or_else(|| RegionError::ImageNotFound(image_id.to_string()))?;
        if image.is_public() {
            return Ok((image, Access::Public));
        }
        if image.owner == caller {
            return Ok((image, Access::Own));
        }
        if self.is_shared_with(image_id, caller).await? {
            return Ok((image, Access::Shared));
        }
        Err(RegionError::ImageNotFound(image_id.to_string()))
    }

    /// An image's row: from memory while the store is unchanged since it was read, else read
    /// on the calling thread (one row by its key).
    fn image_row(&self, image_id: &str) -> Result<Option<ImageRow>> {
        let generation = self.store.generation();
        if let Some(row) = self.image_rows.get(image_id, generation) {
            return Ok((*row).clone());
        }
        let row = self.read_row(|store| store.image(image_id))?;
        self.image_rows
            .put(image_id, generation, Arc::new(row.clone()), 1);
        Ok(row)
    }

    async fn is_shared_with(&self, image_id: &str, account: &str) -> Result<bool> {
        self.shares
            .is_shared(image_id, account)
            .await
            .map_err(sharing_down)
    }

    /// Images of this region shared with `account` (for listings).
    pub(crate) async fn shared_with(&self, account: &str) -> Result<Vec<ImageRow>> {
        let ids = self
            .shares
            .shared_with(account)
            .await
            .map_err(sharing_down)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let owner = account.to_string();
        self.read(move |store| {
            let mut rows = Vec::new();
            for id in ids {
                if let Some(row) = store
                    .image(&id)?
                    .filter(|r| !r.is_public() && r.owner != owner)
                {
                    rows.push(row);
                }
            }
            Ok(rows)
        })
        .await
    }

    /// The accounts an image is shared with.
    pub(crate) async fn shares_of(&self, image_id: &str) -> Result<Vec<sharing::Share>> {
        Ok(self
            .sharing
            .clone()
            .describe_shares(sharing::DescribeSharesRequest {
                image_id: image_id.to_string(),
            })
            .await
            .map_err(sharing_down)?
            .into_inner()
            .shares)
    }

    /// An image the caller owns, or the reason it is not.
    async fn own_image(&self, image_id: &str, caller: &str) -> Result<ImageRow> {
        match self.resolve_image(image_id, caller).await? {
            (image, Access::Own) => Ok(image),
            _ => Err(RegionError::NotYours(image_id.to_string())),
        }
    }

    pub(crate) async fn modify_share_permission(
        &self,
        caller: &str,
        req: ModifyImageSharePermissionRequest,
    ) -> Result<()> {
        validate::image_id("image_id", &req.image_id)?;
        let permission = match SharePermission::try_from(req.permission) {
            Ok(SharePermission::Share) => sharing::SharePermission::Share,
            Ok(SharePermission::Cancel) => sharing::SharePermission::Cancel,
            _ => {
                return Err(RegionError::invalid(
                    "permission",
                    "InvalidParameterValue.Permission",
                    "permission is SHARE or CANCEL",
                ))
            }
        };
        if req.account_ids.is_empty() || req.account_ids.len() > 500 {
            return Err(RegionError::invalid(
                "account_ids",
                "InvalidParameterValue.LimitExceeded",
                "give 1 to 500 account ids",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for account in &req.account_ids {
            imagefleet_proto::ids::check_account_id("account_ids", account)?;
            if !seen.insert(account) {
                return Err(RegionError::invalid(
                    "account_ids",
                    "InvalidParameterValue.Duplicate",
                    format!("{account} is listed twice"),
                ));
            }
            if account == caller {
                return Err(RegionError::invalid(
                    "account_ids",
                    "FailedOperation.AccountIsYourSelf",
                    "an image cannot be shared with its owner",
                ));
            }
        }
        let lock = self.resource_lock(&req.image_id);
        let _guard = lock.lock().await;
        let image = self.own_image(&req.image_id, caller).await?;
        if image.state != ImageState::Normal {
            return Err(RegionError::image_state(&image));
        }
        if permission == sharing::SharePermission::Share {
            for account in &req.account_ids {
                let found = self
                    .catalog
                    .clone()
                    .get_account(GetAccountRequest {
                        account_id: account.clone(),
                    })
                    .await;
                match found {
                    Ok(_) => {}
                    Err(status) if status.code() == Code::NotFound => {
                        return Err(imagefleet_proto::error::status(
                            Code::NotFound,
                            "InvalidAccountId.NotFound",
                            format!("account {account} does not exist"),
                        )
                        .into())
                    }
                    Err(status) => {
                        return Err(imagefleet_rpc::unavailable("catalog", status).into())
                    }
                }
            }
        }
        self.sharing
            .clone()
            .modify_shares(sharing::ModifySharesRequest {
                image_id: req.image_id.clone(),
                owner_account_id: caller.to_string(),
                permission: permission.into(),
                account_ids: req.account_ids.clone(),
            })
            .await
            .map_err(sharing_down)?;
        tracing::info!(image = %req.image_id, ?permission, accounts = req.account_ids.len(), "share permission changed");
        Ok(())
    }

    pub(crate) async fn describe_share_permission(
        &self,
        caller: &str,
        req: DescribeImageSharePermissionRequest,
    ) -> Result<DescribeImageSharePermissionResponse> {
        validate::image_id("image_id", &req.image_id)?;
        self.own_image(&req.image_id, caller).await?;
        let share_permission_set = self
            .shares_of(&req.image_id)
            .await?
            .into_iter()
            .map(|s| ImageShare {
                account_id: s.account_id,
                created_time: s.shared_time,
            })
            .collect();
        Ok(DescribeImageSharePermissionResponse {
            share_permission_set,
        })
    }
}
