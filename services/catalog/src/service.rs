//! The catalog's gRPC services: `CatalogService` for accounts and `CatalogInternalService` for
//! other imagefleet services. Each call runs its store work on a blocking thread.

use crate::store::blocking;
use crate::Catalog;
use imagefleet_proto::catalog::v1::catalog_internal_service_server::CatalogInternalService;
use imagefleet_proto::catalog::v1::catalog_service_server::CatalogService;
use imagefleet_proto::catalog::v1::*;
use imagefleet_proto::error;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Both catalog services over one catalog.
#[derive(Clone)]
pub struct CatalogApi {
    catalog: Arc<Catalog>,
}

impl CatalogApi {
    pub fn new(catalog: Arc<Catalog>) -> Self {
        CatalogApi { catalog }
    }

    /// Runs `f` on the catalog on a blocking thread.
    async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Catalog) -> Result<T, Status> + Send + 'static,
    ) -> Result<Response<T>, Status> {
        let catalog = self.catalog.clone();
        blocking(move || f(&catalog)).await.map(Response::new)
    }

    /// `DescribeRegions` (for clients: `endpoint` is the public one) and `ListRegions` (for
    /// services: the endpoint on their network).
    async fn describe_regions(
        &self,
        for_clients: bool,
    ) -> Result<Response<DescribeRegionsResponse>, Status> {
        self.call(move |c| {
            let mut region_set = c.regions()?;
            if for_clients {
                region_set = region_set
                    .into_iter()
                    .map(crate::regions::for_clients)
                    .collect();
            }
            Ok(DescribeRegionsResponse {
                total_count: u32::try_from(region_set.len()).unwrap_or(u32::MAX),
                region_set,
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl CatalogService for CatalogApi {
    async fn describe_regions(
        &self,
        request: Request<DescribeRegionsRequest>,
    ) -> Result<Response<DescribeRegionsResponse>, Status> {
        imagefleet_rpc::auth::account_id(&request)?;
        CatalogApi::describe_regions(self, true).await
    }

    async fn describe_public_images(
        &self,
        request: Request<DescribePublicImagesRequest>,
    ) -> Result<Response<DescribePublicImagesResponse>, Status> {
        imagefleet_rpc::auth::account_id(&request)?;
        self.call(|c| {
            Ok(DescribePublicImagesResponse {
                image_set: c.public_images()?,
            })
        })
        .await
    }
}

#[tonic::async_trait]
impl CatalogInternalService for CatalogApi {
    async fn register_region(
        &self,
        request: Request<RegisterRegionRequest>,
    ) -> Result<Response<RegisterRegionResponse>, Status> {
        // A region registers itself only (an operator may register any).
        if let Ok(imagefleet_rpc::Caller::Service(name)) = imagefleet_rpc::auth::caller(&request) {
            if name.starts_with(imagefleet_rpc::identity::REGION_PREFIX)
                && *name
                    != format!(
                        "{}{}",
                        imagefleet_rpc::identity::REGION_PREFIX,
                        request.get_ref().region
                    )
            {
                return Err(imagefleet_proto::error::status(
                    tonic::Code::PermissionDenied,
                    "UnauthorizedOperation.CallerNotAllowed",
                    format!("{name} may register only its own region"),
                ));
            }
        }
        let r = request.into_inner();
        self.call(move |c| {
            Ok(RegisterRegionResponse {
                region: Some(c.register_region(&r.region, &r.endpoint, &r.public_endpoint)?),
            })
        })
        .await
    }

    async fn list_regions(
        &self,
        _request: Request<DescribeRegionsRequest>,
    ) -> Result<Response<DescribeRegionsResponse>, Status> {
        CatalogApi::describe_regions(self, false).await
    }

    async fn create_account(
        &self,
        request: Request<CreateAccountRequest>,
    ) -> Result<Response<CreateAccountResponse>, Status> {
        let r = request.into_inner();
        self.call(move |c| {
            let id = Some(r.account_id.as_str()).filter(|id| !id.is_empty());
            Ok(CreateAccountResponse {
                account: Some(c.create_account(id, &r.name)?),
            })
        })
        .await
    }

    async fn get_account(
        &self,
        request: Request<GetAccountRequest>,
    ) -> Result<Response<GetAccountResponse>, Status> {
        let r = request.into_inner();
        self.call(move |c| {
            Ok(GetAccountResponse {
                account: Some(c.account(&r.account_id)?),
            })
        })
        .await
    }

    async fn get_account_credential(
        &self,
        request: Request<GetAccountCredentialRequest>,
    ) -> Result<Response<GetAccountCredentialResponse>, Status> {
        let r = request.into_inner();
        self.call(move |c| {
            let key = c.account_credential(&r.secret_id)?;
            Ok(GetAccountCredentialResponse {
                account_id: key.account_id,
                secret_key: key.secret_key,
            })
        })
        .await
    }

    async fn register_image(
        &self,
        request: Request<RegisterImageRequest>,
    ) -> Result<Response<RegisterImageResponse>, Status> {
        let image = request
            .into_inner()
            .image
            .ok_or_else(|| error::invalid_argument("image", "MissingParameter", "is required"))?;
        self.call(move |c| {
            c.register_image(&image)?;
            Ok(RegisterImageResponse {})
        })
        .await
    }

    async fn unregister_image(
        &self,
        request: Request<UnregisterImageRequest>,
    ) -> Result<Response<UnregisterImageResponse>, Status> {
        let r = request.into_inner();
        self.call(move |c| {
            c.unregister_image(&r.image_id, &r.region)?;
            Ok(UnregisterImageResponse {})
        })
        .await
    }

    async fn lookup_image(
        &self,
        request: Request<LookupImageRequest>,
    ) -> Result<Response<LookupImageResponse>, Status> {
        let r = request.into_inner();
        self.call(move |c| {
            Ok(LookupImageResponse {
                records: c.lookup_image(&r.image_id)?,
            })
        })
        .await
    }
}
