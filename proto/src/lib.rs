//! The `ebb.v1` protocol. Only the `.proto` files and the Rust generated from them live here; no logic.
//!
//! The generated code is committed. `tests/bootstrap.rs` regenerates it with a pure-Rust protobuf
//! compiler and fails when the committed copy drifts; run it with `EBB_BLESS=1` to update the copy.

#![forbid(unsafe_code)]

/// The encoded `FileDescriptorSet` of `ebb.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/ebb.v1.descriptor.bin");

/// Package `ebb.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!("gen/ebb.v1.rs");
}
