fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ovl/api.proto", "ovl/peer.proto", "ovl/records.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    // Maps as BTreeMap: prost then encodes them in key order, so a message
    // re-encodes to the same bytes on both ends (peer calls MAC the body).
    tonic_prost_build::configure()
        .btree_map(".")
        .compile_fds(fds)?;
    Ok(())
}
