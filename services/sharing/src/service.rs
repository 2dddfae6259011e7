//! The sharing service's gRPC face: `SharingInternalService` (service credentials only) over the
//! ownership maps.

use crate::maps::{OwnershipMaps, ShareChange};
use imagefleet_proto::error::invalid_argument;
use imagefleet_proto::ids;
use imagefleet_proto::sharing::v1::sharing_internal_service_server::SharingInternalService;
use imagefleet_proto::sharing::v1::*;
use tonic::{Request, Response, Status};

pub struct SharingApi {
    maps: OwnershipMaps,
}

impl SharingApi {
    pub fn new(maps: OwnershipMaps) -> Self {
        SharingApi { maps }
    }
}

#[tonic::async_trait]
impl SharingInternalService for SharingApi {
    async fn set_image_owner(
        &self,
        request: Request<SetImageOwnerRequest>,
    ) -> Result<Response<SetImageOwnerResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        ids::check_account_id("owner_account_id", &r.owner_account_id)?;
        self.maps
            .set_owner(&r.image_id, &r.owner_account_id)
            .await?;
        Ok(Response::new(SetImageOwnerResponse {}))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        self.maps.remove_image(&r.image_id).await?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn get_image_owner(
        &self,
        request: Request<GetImageOwnerRequest>,
    ) -> Result<Response<GetImageOwnerResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        let owner = self.maps.owner(&r.image_id).await?;
        Ok(Response::new(GetImageOwnerResponse {
            owner_account_id: owner.unwrap_or_default(),
        }))
    }

    async fn modify_shares(
        &self,
        request: Request<ModifySharesRequest>,
    ) -> Result<Response<ModifySharesResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        ids::check_account_id("owner_account_id", &r.owner_account_id)?;
        let change = match SharePermission::try_from(r.permission) {
            Ok(SharePermission::Share) => ShareChange::Share,
            Ok(SharePermission::Cancel) => ShareChange::Cancel,
            _ => {
                return Err(invalid_argument(
                    "permission",
                    "InvalidParameterValue.Permission",
                    "permission is SHARE or CANCEL",
                ))
            }
        };
        if r.account_ids.is_empty() || r.account_ids.len() > crate::maps::MAX_SHARES {
            return Err(invalid_argument(
                "account_ids",
                "InvalidParameterValue.LimitExceeded",
                format!("1 to {} account ids", crate::maps::MAX_SHARES),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for account in &r.account_ids {
            ids::check_account_id("account_ids", account)?;
            if !seen.insert(account) {
                return Err(invalid_argument(
                    "account_ids",
                    "InvalidParameterValue.Duplicate",
                    format!("{account} is listed twice"),
                ));
            }
        }
        let now = imagefleet_rpc::time::unix_now();
        self.maps
            .modify_shares(
                &r.image_id,
                &r.owner_account_id,
                change,
                &r.account_ids,
                now,
            )
            .await??;
        tracing::info!(image = %r.image_id, ?change, accounts = r.account_ids.len(), "shares changed");
        Ok(Response::new(ModifySharesResponse {}))
    }

    async fn describe_shares(
        &self,
        request: Request<DescribeSharesRequest>,
    ) -> Result<Response<DescribeSharesResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        let shares = self
            .maps
            .shares(&r.image_id)
            .await?
            .into_iter()
            .map(|(account_id, at)| Share {
                account_id,
                shared_time: imagefleet_rpc::time::rfc3339(at),
            })
            .collect();
        Ok(Response::new(DescribeSharesResponse { shares }))
    }

    async fn check_share(
        &self,
        request: Request<CheckShareRequest>,
    ) -> Result<Response<CheckShareResponse>, Status> {
        let r = request.into_inner();
        ids::check_image_id("image_id", &r.image_id)?;
        ids::check_account_id("account_id", &r.account_id)?;
        let shared = self.maps.is_shared(&r.image_id, &r.account_id).await?;
        Ok(Response::new(CheckShareResponse { shared }))
    }

    async fn list_shared_with(
        &self,
        request: Request<ListSharedWithRequest>,
    ) -> Result<Response<ListSharedWithResponse>, Status> {
        let r = request.into_inner();
        ids::check_account_id("account_id", &r.account_id)?;
        let image_ids = self.maps.shared_with(&r.account_id).await?;
        Ok(Response::new(ListSharedWithResponse { image_ids }))
    }

    async fn check_shares(
        &self,
        request: Request<CheckSharesRequest>,
    ) -> Result<Response<CheckSharesResponse>, Status> {
        let r = request.into_inner();
        check_batch("checks", r.checks.len())?;
        for (n, check) in r.checks.iter().enumerate() {
            ids::check_image_id(&format!("checks[{n}].image_id"), &check.image_id)?;
            ids::check_account_id(&format!("checks[{n}].account_id"), &check.account_id)?;
        }
        let checks: Vec<(&str, &str)> = r
            .checks
            .iter()
            .map(|c| (c.image_id.as_str(), c.account_id.as_str()))
            .collect();
        let shared = self.maps.are_shared(&checks).await?;
        Ok(Response::new(CheckSharesResponse { shared }))
    }

    async fn list_shared_with_accounts(
        &self,
        request: Request<ListSharedWithAccountsRequest>,
    ) -> Result<Response<ListSharedWithAccountsResponse>, Status> {
        let r = request.into_inner();
        check_batch("account_ids", r.account_ids.len())?;
        for (n, account) in r.account_ids.iter().enumerate() {
            ids::check_account_id(&format!("account_ids[{n}]"), account)?;
        }
        let lists =
            futures::future::try_join_all(r.account_ids.iter().map(|a| self.maps.shared_with(a)))
                .await?;
        Ok(Response::new(ListSharedWithAccountsResponse {
            lists: lists
                .into_iter()
                .map(|image_ids| ListSharedWithResponse { image_ids })
                .collect(),
        }))
    }
}

/// The most checks or accounts one batched call may carry.
pub const MAX_BATCH: usize = 1000;

fn check_batch(field: &str, len: usize) -> Result<(), Status> {
    if len > MAX_BATCH {
        return Err(invalid_argument(
            field,
            "InvalidParameterValue.LimitExceeded",
            format!("at most {MAX_BATCH} in one call, not {len}"),
        ));
    }
    Ok(())
}
