//! Generates the MadTech API from `madtech/**/*.proto` with the protoc that
//! ships inside `protoc-bin-vendored`, so a fresh machine needs no manual step.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "madtech/profiles/v1/profiles.proto",
    "madtech/consent/v1/consent.proto",
    "madtech/consent/v1/privacy.proto",
    "madtech/segments/v1/segments.proto",
    "madtech/activation/v1/activation.proto",
    "madtech/gateway/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    let includes = [PathBuf::from("."), well_known];
    let protos: Vec<PathBuf> = PROTOS.iter().map(PathBuf::from).collect();
    tonic_prost_build::configure()
        // Written by hand so a page can carry members encoded in advance
        // (see `src/export_page.rs`); the wire format is the .proto's.
        .extern_path(
            ".madtech.segments.v1.ExportAudienceResponse",
            "crate::segments::export_page::ExportAudienceResponse",
        )
        .file_descriptor_set_path(out_dir.join("madtech_descriptor.bin"))
        .compile_with_config(config, &protos, &includes)?;
    Ok(())
}
