//! Packaging: man pages and shell completions generated from the clap
//! definitions, so they cannot drift from the real options
//! (`ovlctl generate-assets DIR`, hidden; run by deploy/package).

use std::path::Path;

use clap_complete::Shell;

/// Writes DIR/man/ovlctl*.1 (one page per subcommand) and
/// DIR/completions/{ovlctl.bash,_ovlctl,ovlctl.fish}.
pub fn write(mut cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    let name = cmd.get_name().to_owned();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
    }
    Ok(())
}
