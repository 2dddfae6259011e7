//! The sharing service's gRPC face: `SharingInternalService` (service credentials only) over the
//! ownership maps.

use crate::maps::OwnershipMaps;
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
}
