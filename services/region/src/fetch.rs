//! `ImportImage`: a disk file pulled from an http or https URL.

use crate::region::Region;
use imagefleet_proto::region::v1::{ImportImageRequest, ImportImageResponse};
use std::sync::Arc;
use tonic::Status;

pub(crate) async fn import_image(
    _region: &Arc<Region>,
    _caller: &str,
    _req: ImportImageRequest,
) -> Result<ImportImageResponse, Status> {
    Err(Status::unimplemented("not yet"))
}
