//! File writes that never leave a half-written file: write beside, then rename.

use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "cannot move {} into place at {}",
            tmp.display(),
            path.display()
        )
    })
}

/// Streams a file to `path` through a temporary file beside it (`.NAME.tmp-PID`), renamed
/// into place once `write` has finished; on any error the temporary file is removed and
/// nothing is left at `path`. Says so clearly when the parent is missing or is a file.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        let what = if dir.exists() {
            "is a file, not a folder"
        } else {
            "does not exist"
        };
        anyhow::bail!(
            "cannot write {}: its parent {} {what}",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        anyhow::bail!("cannot write {}: it is a folder", path.display());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).with_context(|| {
            format!("cannot create {} (is the folder writable?)", tmp.display())
        })?;
        let mut w = std::io::BufWriter::new(file);
        write(&mut w)?;
        let file = w
            .into_inner()
            .map_err(|e| anyhow::anyhow!("cannot write {}: {}", tmp.display(), e.error()))?;
        file.sync_all()
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| {
            format!(
                "cannot move {} into place at {}",
                tmp.display(),
                path.display()
            )
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Pretty JSON with a trailing newline, written atomically.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}
