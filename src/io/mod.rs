//! Files: safetensors, the one tensor format the engine reads and writes ([`safetensors`]), and atomic
//! writes, so that an interrupted run never leaves a half-written checkpoint, export or table behind.
pub(crate) mod safetensors;

use std::io::{Read, Write};
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically: a temporary `.<name>.tmp-<pid>` in the same folder, `fsync`, then
/// a rename over `path`. On any error the temporary is removed, `path` is left as it was, and the error
/// (`Error::Io`) names the path that failed.
///
/// # Errors
/// `Invalid { option: "output path" }` for a path without a file name; `Io` naming `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::invalid("output path", format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
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
