//! Compiles the protos with protox (no system `protoc`), then generates prost messages and
//! tonic clients and servers. The encoded descriptor set is kept for reflection, request
//! signing (which calls are client-streaming) and proto3 JSON output.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "imagefleet/region/v1/region.proto",
    "imagefleet/catalog/v1/catalog.proto",
    "imagefleet/sharing/v1/sharing.proto",
    "imagefleet/billing/v1/billing.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", root.join(proto).display());
    }
    let fds = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("imagefleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Malformed messages are INVALID_ARGUMENT with an ErrorInfo, not INTERNAL.
        .codec_path("crate::codec::ImagefleetCodec")
        .compile_fds(fds)?;
    Ok(())
}
