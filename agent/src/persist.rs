//! Crash-safe files in the state dir: write to a temp file, fsync, rename,
//! fsync the directory. A reader sees the old or the new content, never half.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {source}")]
pub struct PersistError {
    op: &'static str,
    path: PathBuf,
    #[source]
    source: io::Error,
}

impl PersistError {
    pub fn new(op: &'static str, path: &Path, source: io::Error) -> Self {
        Self {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

fn ctx<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with mode 0700 if missing.
pub fn ensure_private_dir(dir: &Path) -> Result<(), PersistError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(ctx("create directory", dir))
}

/// Atomically replaces `path` with `data`, mode 0600.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(ctx("create", &tmp))?;
        f.write_all(data).map_err(ctx("write", &tmp))?;
        f.sync_all().map_err(ctx("fsync", &tmp))?;
    }
    fs::rename(&tmp, path).map_err(ctx("rename into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx("fsync directory", dir))
}

/// Reads a file, `Ok(None)` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PersistError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ctx("read", path)(e)),
    }
}

/// Removes a file; a missing file is not an error.
pub fn remove_durable(path: &Path) -> Result<(), PersistError> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx("remove", path)(e)),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx("fsync directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_content_with_private_mode() {
        let dir = std::env::temp_dir().join(format!("ovl-persist-{}", std::process::id()));
        ensure_private_dir(&dir).unwrap();
        let p = dir.join("f.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(read_optional(&p).unwrap().unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        remove_durable(&p).unwrap();
        assert!(read_optional(&p).unwrap().is_none());
        remove_durable(&p).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
