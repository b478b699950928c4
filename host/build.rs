//! `sqlx::migrate!` embeds the migrations at compile time; without this, a
//! new migration file could be left out of a binary that nothing else made
//! cargo rebuild.
//!
//! The gRPC server's code is generated from `proto/` here, with the .proto
//! files parsed by protox (so no `protoc` is needed), and the parsed
//! descriptors are kept for server reflection.

use std::path::PathBuf;

use prost::Message;

/// The gRPC API's files, under `proto/`: one per service (`tests/build.rs`
/// lists the same).
const PROTO_FILES: [&str; 3] = [
    "opspawn/v1/tasks.proto",
    "opspawn/v1/threads.proto",
    "opspawn/v1/memories.proto",
];

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(PROTO_FILES, ["../proto"])
        .unwrap_or_else(|e| panic!("compiling the .proto files in proto/: {e}"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    std::fs::write(
        out_dir.join("opspawn_descriptor.bin"),
        descriptors.encode_to_vec(),
    )
    .expect("writing the descriptor set");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(descriptors)
        .expect("generating the gRPC server code");
}
