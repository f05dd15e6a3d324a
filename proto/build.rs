//! Compiles `rcsync/v1/*.proto` with protox (pure Rust: no `protoc` on the build machine) and
//! writes the encoded file descriptor set next to the generated code for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &["rcsync/v1/runtime_class_sync.proto", "rcsync/v1/pod_sync.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("rcsync_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .compile_fds(fds)?;
    Ok(())
}
