//! `ovl-cni`: the CNI plugin `ovl` (CNI spec 1.0 and 1.1). A runtime runs
//! it with `CNI_*` in the environment and the network configuration on
//! stdin; it prints a result (or a spec error) as JSON on stdout and exits
//! non-zero on error. See `ovlctl::cni`.

use std::io::{Read, Write};
use std::process::ExitCode;

use ovlctl::cni::{self, spec};

fn main() -> ExitCode {
    let outcome = invoke();
    let (json, code) = match outcome {
        Ok(None) => return ExitCode::SUCCESS,
        Ok(Some(v)) => (v, ExitCode::SUCCESS),
        Err((version, e)) => (e.to_json(&version), ExitCode::FAILURE),
    };
    let mut out = std::io::stdout().lock();
    // Nothing useful is left to do if the runtime closed our stdout.
    if serde_json::to_writer(&mut out, &json).is_ok() {
        let _ = out.write_all(b"\n");
    }
    code
}

/// Errors carry the version to answer in: the config's if it named one.
fn invoke() -> Result<Option<serde_json::Value>, (String, spec::CniError)> {
    let newest = || spec::NEWEST.to_string();
    let env = spec::Env::parse(|k| std::env::var(k).ok()).map_err(|e| (newest(), e))?;
    let mut stdin = Vec::new();
    std::io::stdin()
        .take(spec::MAX_CONFIG as u64 + 1)
        .read_to_end(&mut stdin)
        .map_err(|e| {
            (
                newest(),
                spec::CniError::new(spec::Code::Io, format!("reading stdin: {e}")),
            )
        })?;
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_string))
        .filter(|v| spec::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(newest);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            (
                version.clone(),
                spec::CniError::new(spec::Code::Io, format!("starting the runtime: {e}")),
            )
        })?;
    runtime
        .block_on(cni::run(&env, &stdin, std::env::var("OVL_SOCKET").ok()))
        .map_err(|e| (version, e))
}
