//! `sqlx::migrate!` embeds the migrations at compile time; without this, a
//! new migration file could be left out of a binary that nothing else made
//! cargo rebuild.
//!
//! The gRPC server's code is generated from `proto/` here, with the .proto
//! parsed by protox (so no `protoc` is needed), and the parsed descriptors
//! are kept for server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
    println!("cargo:rerun-if-changed=../proto");
    let descriptors = protox::compile(["opspawn/v1/tasks.proto"], ["../proto"])
        .unwrap_or_else(|e| panic!("compiling proto/opspawn/v1/tasks.proto: {e}"));
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
