//! The hostile-tenant suite: one account (or an outsider) tries to harm another account or the
//! service, against real processes (`imaged` services and a real Redis) over gRPC. Each module
//! covers one kind of attack; each test names the defect it guards against.

#[path = "../common/mod.rs"]
mod common;

mod input;
mod lineage;
mod processes;
mod storage;
mod streams;
mod transport;
