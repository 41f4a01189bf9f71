//! Files: safetensors, the one tensor format the engine reads and writes ([`safetensors`]), atomic writes, so
//! that an interrupted run never leaves a half-written checkpoint, export or table behind, and appends that
//! are on disk before the call returns.
//!
//! Every write goes through [`create`], where tests can make writes fail as a full disk, a read-only folder
//! or a vanished path would ([`fault`]).
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
/// `remove_temporaries` clears it.
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

/// Removes `dir/<name>` for each of `names`; one that does not exist is fine.
///
/// # Errors
/// `Io` naming a file that exists but cannot be removed.
pub(crate) fn remove_files(dir: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let p = dir.join(name);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io(&p, e)),
            _ => {}
        }
    }
    Ok(())
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

/// Opens `path` for writing (truncated, or for appending), through the [`fault`] injector.
fn create(path: &Path, append: bool) -> std::io::Result<fault::Writer> {
    fault::open(path, append)
}

/// Test support: makes the writes under a folder fail as a full disk (after a number of bytes), a read-only
/// folder or a vanished path (when a file is opened) would, with the operating system's error code. Writes
/// elsewhere are unaffected, so tests running in parallel do not disturb each other. Not a stable API: reached
/// through `snella::testing::FailWrites`.
pub mod fault {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    /// One planned failure: writes under `under` fail with `errno`, at open (`budget: None`) or once `budget`
    /// bytes have been written under it in all (the disk is full).
    struct Plan {
        under: PathBuf,
        errno: i32,
        budget: Mutex<Option<u64>>,
    }

    static PLANS: Mutex<Vec<Arc<Plan>>> = Mutex::new(Vec::new());

    fn plans() -> std::sync::MutexGuard<'static, Vec<Arc<Plan>>> {
        // A test that panicked while holding the lock leaves the list as it was: still a valid list.
        PLANS.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes under a folder fail until this is dropped (see the module).
    #[must_use = "the failure stops when this is dropped"]
    pub struct FailWrites(Arc<Plan>);

    impl FailWrites {
        /// Opening a file for writing under `under` fails with `errno` (EACCES: a read-only folder; ENOENT: the
        /// folder has gone).
        pub fn at_open(under: &Path, errno: i32) -> FailWrites {
            FailWrites::add(under, errno, None)
        }

        /// Files under `under` open, but writes fail with `errno` once `bytes` bytes have been written under it
        /// in all, the last write cut short (ENOSPC: the disk is full).
        pub fn after_bytes(under: &Path, errno: i32, bytes: u64) -> FailWrites {
            FailWrites::add(under, errno, Some(bytes))
        }

        fn add(under: &Path, errno: i32, budget: Option<u64>) -> FailWrites {
            let plan = Arc::new(Plan { under: under.to_path_buf(), errno, budget: Mutex::new(budget) });
            plans().push(Arc::clone(&plan));
            FailWrites(plan)
        }
    }

    impl Drop for FailWrites {
        fn drop(&mut self) {
            plans().retain(|p| !Arc::ptr_eq(p, &self.0));
        }
    }

    /// Opens `path` for writing (truncated, or for appending), failing as planned for its folder.
    pub(super) fn open(path: &Path, append: bool) -> std::io::Result<Writer> {
        let plan = plans().iter().find(|p| path.starts_with(&p.under)).cloned();
        if let Some(p) = &plan {
            if p.budget.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
                return Err(std::io::Error::from_raw_os_error(p.errno));
            }
        }
        let file = std::fs::OpenOptions::new().write(true).create(true).truncate(!append).append(append).open(path)?;
        Ok(Writer { file, plan })
    }

    /// A file opened by `io::create`: writes pass through until its plan's budget is spent.
    pub(crate) struct Writer {
        file: std::fs::File,
        plan: Option<Arc<Plan>>,
    }

    impl Writer {
        pub(super) fn sync_all(&self) -> std::io::Result<()> {
            self.file.sync_all()
        }
        pub(super) fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
    }

    impl Write for Writer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let Some(plan) = &self.plan else { return self.file.write(buf) };
            let mut budget = plan.budget.lock().unwrap_or_else(|e| e.into_inner());
            let left = budget.unwrap_or(0);
            if left == 0 && !buf.is_empty() {
                return Err(std::io::Error::from_raw_os_error(plan.errno));
            }
            let n = self.file.write(&buf[..buf.len().min(left as usize)])?;
            *budget = Some(left - n as u64);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }
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
