//! Files: safetensors, the one tensor format the engine reads and writes ([`safetensors`]), atomic writes, so
//! that an interrupted run never leaves a half-written checkpoint, export or table behind, and appends that
//! are on disk before the call returns.
pub(crate) mod safetensors;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The temporary that [`write_atomic`] writes before renaming it to `path`: `.<name>.tmp-<pid>` beside it.
fn temporary(path: &Path, name: &str) -> PathBuf {
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Writes `bytes` to `path` atomically: a temporary `.<name>.tmp-<pid>` in the same folder, `fsync`, then
/// a rename over `path`. On any error the temporary is removed, `path` is left as it was, and the error
/// (`Error::Io`) names the path that failed. A process killed part-way leaves the temporary behind;
/// [`remove_temporaries`] clears it.
///
/// # Errors
/// `Invalid { option: "output path" }` for a path without a file name; `Io` naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = temporary(path, &name);
    let write = || -> std::io::Result<()> {
        let mut f = create(&tmp, false)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Appends `bytes` to `path` (created if missing) and syncs it, so they are on disk before whatever the caller
/// writes next. Not atomic: a failure or a kill part-way can leave part of `bytes` at the end of the file.
///
/// # Errors
/// `Io` naming `path`.
pub(crate) fn append(path: &Path, bytes: &[u8]) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut f = create(path, true)?;
        f.write_all(bytes)?;
        f.sync_data()
    };
    write().map_err(|e| Error::io(path, e))
}

/// Removes the temporaries that killed writers of `dir/<name>` left behind ([`write_atomic`]'s
/// `.<name>.tmp-<pid>`, whatever the pid), for each of `names`. A folder that does not exist has none.
///
/// # Errors
/// `Io` naming the folder or the temporary that cannot be listed or removed.
pub(crate) fn remove_temporaries(dir: &Path, names: &[&str]) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let Some(file) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let ours = names.iter().any(|n| {
            file.strip_prefix(&format!(".{n}.tmp-"))
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        });
        if ours {
            std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Opens `path` for writing (truncated, or for appending).
fn create(path: &Path, append: bool) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().write(true).create(true).truncate(!append).append(append).open(path)
}

/// Reads until `buf` is full or the file ends; returns the bytes read (a short file is not an error here).
pub(crate) fn read_up_to(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
