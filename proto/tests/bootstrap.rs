//! Regenerates the Rust for `proto/ebb/v1/*.proto` and fails when the committed copy differs,
//! so that nobody needs `protoc` and nobody forgets to regenerate.
//! `EBB_BLESS=1 cargo test -p ebb-proto` writes the new copy instead.

use std::path::{Path, PathBuf};

const GENERATED: &str = "ebb.v1.rs";
const DESCRIPTORS: &str = "ebb.v1.descriptor.bin";

#[test]
fn generated_code_is_up_to_date() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let protos: Vec<PathBuf> = std::fs::read_dir(root.join("proto/ebb/v1"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    let descriptors = protox::compile(&protos, [root.join("proto")]).expect("the .proto files compile");
    let encoded = prost::Message::encode_to_vec(&descriptors);

    let out = tempfile::tempdir().unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::SmallBufferCodec")
        .out_dir(out.path())
        .compile_fds(descriptors)
        .expect("code generation succeeds");

    let fresh = std::fs::read(out.path().join(GENERATED)).unwrap();
    check(&root.join("src/gen").join(GENERATED), &fresh);
    // For gRPC server reflection.
    check(&root.join("src/gen").join(DESCRIPTORS), &encoded);
}

fn check(committed_path: &Path, fresh: &[u8]) {
    let committed = std::fs::read(committed_path).unwrap_or_default();
    if fresh == committed {
        return;
    }
    if std::env::var_os("EBB_BLESS").is_some() {
        std::fs::create_dir_all(committed_path.parent().unwrap()).unwrap();
        std::fs::write(committed_path, fresh).unwrap();
        return;
    }
    panic!(
        "{} is out of date with the .proto files; run `EBB_BLESS=1 cargo test -p ebb-proto --test bootstrap` and commit the result",
        committed_path.display()
    );
}
