//! The `ebb.v1` protocol. Only the `.proto` files, the Rust generated from them and the rules the
//! protocol states (custom metric names) live here; no other logic.
//!
//! The generated code is committed. `tests/bootstrap.rs` regenerates it with a pure-Rust protobuf
//! compiler and fails when the committed copy drifts; run it with `EBB_BLESS=1` to update the copy.

#![forbid(unsafe_code)]

/// The longest custom metric name.
pub const MAX_CUSTOM_METRIC_NAME: usize = 64;

/// A custom metric's name (`Sample.custom`): a lowercase letter, then lowercase letters, digits and `_`.
pub fn is_custom_metric_name(name: &str) -> bool {
    name.len() <= MAX_CUSTOM_METRIC_NAME
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// The codec the generated clients and servers use: prost with small buffers. ebb's messages are a few
/// hundred bytes and every agent's stream holds an encode and a decode buffer, so tonic's default 8 KiB each
/// would be most of the collector's memory per agent. Buffers still grow for larger messages.
pub mod codec {
    use std::marker::PhantomData;

    use tonic::codec::{BufferSettings, Codec};
    use tonic_prost::ProstCodec;

    const SMALL: usize = 1024;
    /// tonic's default: after this many bytes an encoder yields to the runtime.
    const YIELD_THRESHOLD: usize = 32 * 1024;

    #[derive(Debug, Clone, Copy)]
    pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

    impl<T, U> Default for SmallBufferCodec<T, U> {
        fn default() -> Self {
            Self(PhantomData)
        }
    }

    impl<T, U> Codec for SmallBufferCodec<T, U>
    where
        T: prost::Message + Send + 'static,
        U: prost::Message + Default + Send + 'static,
    {
        type Encode = T;
        type Decode = U;
        type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
        type Decoder = <ProstCodec<T, U> as Codec>::Decoder;

        fn encoder(&mut self) -> Self::Encoder {
            ProstCodec::<T, U>::raw_encoder(BufferSettings::new(SMALL, YIELD_THRESHOLD))
        }

        fn decoder(&mut self) -> Self::Decoder {
            ProstCodec::<T, U>::raw_decoder(BufferSettings::new(SMALL, YIELD_THRESHOLD))
        }
    }
}

/// The encoded `FileDescriptorSet` of `ebb.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("gen/ebb.v1.descriptor.bin");

/// Package `ebb.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!("gen/ebb.v1.rs");
}
