fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["ovl/api.proto", "ovl/peer.proto", "ovl/records.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
