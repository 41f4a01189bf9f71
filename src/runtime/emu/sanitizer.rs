//! memcheck and racecheck of the emulated device. The host-compiled kernels are instrumented with
//! `-fsanitize=thread` (build.rs), which makes the compiler call `__tsan_readN(addr)` / `__tsan_writeN(addr)`
//! before every load and store that is not of a register-held local. This file implements those callbacks
//! (the Linux kernel's KCSAN does the same with its own runtime) and checks each access:
//!
//! - on the thread's own stack: its locals, always fine;
//! - in the block's shared memory: it must lie inside one declared array (or the dynamic region), and the
//!   word must not be written by one thread and touched by another between two barriers (racecheck:
//!   read-after-write, write-after-read, write-after-write; atomics only race with plain accesses);
//! - anything else is global memory: it must lie inside the copy of a pointer argument's tensor (see
//!   `Staging`); anywhere else is a memcheck error naming the nearest argument.
//!
//! Shared memory is poisoned with 0xFF bytes (NaN) when a block starts, as real shared memory holds garbage.
use super::block::{current, fault, on_own_stack, BlockRun, Site, CURRENT, SHARED_LIMIT};

/// Bytes between shared arrays (and after the dynamic region) in the emulated layout: an overrun of up to
/// this many bytes lands in no array and is reported.
const SHARED_GAP: usize = 256;
/// The emulated shared memory of one block: the dynamic region, the static arrays and the gaps between them.
const ARENA_BYTES: usize = 2 * SHARED_LIMIT + 64 * SHARED_GAP;

#[derive(Clone, Copy, PartialEq)]
enum Access {
    Read,
    Write,
    Atomic,
}

/// What racecheck knows of one 4-byte shared word since the last barrier (threads stored as index + 1).
#[derive(Clone, Copy, Default)]
struct Shadow {
    epoch: u32,
    writer: u16,
    reader: u16,
    atomic: u16,
    /// More than one thread has read it / used it atomically.
    many_readers: bool,
    many_atomics: bool,
}

struct Array {
    site: Site,
    name: Site,
    offset: usize,
    bytes: usize,
}

/// The shared memory of the block a host thread executes.
pub(crate) struct SharedMemory {
    arena: Vec<u128>,
    dynamic: usize,
    next: usize,
    declared: usize,
    arrays: Vec<Array>,
    shadow: Vec<Shadow>,
}

impl SharedMemory {
    pub(crate) fn new() -> SharedMemory {
        SharedMemory {
            arena: vec![0; ARENA_BYTES / 16],
            dynamic: 0,
            next: 0,
            declared: 0,
            arrays: Vec::new(),
            shadow: vec![Shadow::default(); ARENA_BYTES / 4],
        }
    }

    fn base(&self) -> usize {
        self.arena.as_ptr() as usize
    }

    /// A new block: no static array yet, `dynamic` poisoned bytes at the start.
    pub(crate) fn start_block(&mut self, dynamic: usize) {
        self.arrays.clear();
        self.dynamic = dynamic;
        self.declared = 0;
        self.next = dynamic.next_multiple_of(16) + SHARED_GAP;
        self.poison(0, dynamic);
    }

    fn poison(&mut self, offset: usize, bytes: usize) {
        let base = self.base();
        // SAFETY: [offset, offset + bytes) lies inside the arena (checked by the callers).
        unsafe { std::ptr::write_bytes((base + offset) as *mut u8, 0xFF, bytes) };
        self.shadow[offset / 4..(offset + bytes).div_ceil(4)].fill(Shadow::default());
    }

    pub(crate) fn dynamic_base(&self) -> usize {
        self.base()
    }

    /// The array a `SHARED_ARRAY` declaration names: the same storage for every thread of the block.
    pub(crate) fn declare(
        &mut self,
        site: Site,
        name: Site,
        bytes: usize,
        align: usize,
        dynamic: usize,
    ) -> Result<usize, String> {
        if let Some(a) = self.arrays.iter().find(|a| a.site == site) {
            return Ok(self.base() + a.offset);
        }
        if self.declared + bytes + dynamic > SHARED_LIMIT {
            return Err(format!(
                "`{}` ({bytes} B at {}) brings the block's shared memory to {} B static + {dynamic} B dynamic, above \
                 the {SHARED_LIMIT} B an sm_90 block may use without opting in",
                name.text(),
                site.text(),
                self.declared + bytes
            ));
        }
        let offset = self.next.next_multiple_of(align.max(16));
        if offset + bytes + SHARED_GAP > ARENA_BYTES {
            return Err(format!("too many shared arrays in one block (`{}` at {})", name.text(), site.text()));
        }
        self.arrays.push(Array { site, name, offset, bytes });
        self.declared += bytes;
        self.next = offset + bytes + SHARED_GAP;
        self.poison(offset, bytes);
        Ok(self.base() + offset)
    }

    /// The name of the region holding [off, off + bytes) and its start, or an error describing the miss.
    fn region(&self, off: usize, bytes: usize) -> Result<(&str, usize), String> {
        if off + bytes <= self.dynamic {
            return Ok(("dynamic shared memory", 0));
        }
        for a in &self.arrays {
            if off >= a.offset && off + bytes <= a.offset + a.bytes {
                return Ok((a.name.text(), a.offset));
            }
        }
        // The nearest region, for the message.
        let mut regions: Vec<(String, usize, usize)> =
            self.arrays.iter().map(|a| (format!("`{}`", a.name.text()), a.offset, a.bytes)).collect();
        if self.dynamic > 0 {
            regions.push(("dynamic shared memory".into(), 0, self.dynamic));
        }
        let dist = |r: &(String, usize, usize)| {
            if off < r.1 {
                r.1 - off
            } else {
                off.saturating_sub(r.1 + r.2)
            }
        };
        Err(match regions.iter().min_by_key(|r| dist(r)) {
            None => format!("{bytes} B at shared offset {off:#x}: the block has declared no shared memory"),
            Some((name, start, len)) if off >= start + len => {
                format!(
                    "{bytes} B at shared offset {off:#x}: {} B past the end of {name} ({len} B)",
                    off - (start + len)
                )
            }
            Some((name, start, len)) if off >= *start => format!(
                "{bytes} B at shared offset {off:#x}: running {} B past the end of {name} ({len} B)",
                off + bytes - (start + len)
            ),
            Some((name, start, len)) => {
                format!("{bytes} B at shared offset {off:#x}: {} B before the start of {name} ({len} B)", start - off)
            }
        })
    }

    /// racecheck of one word; Err names the other thread and the hazard.
    fn race(&mut self, word: usize, t: usize, epoch: u32, kind: Access) -> Result<(), (Option<usize>, &'static str)> {
        let me = (t + 1) as u16;
        let s = &mut self.shadow[word];
        if s.epoch != epoch {
            *s = Shadow { epoch, ..Shadow::default() };
        }
        let other = |x: u16| (x != 0 && x != me).then(|| x as usize - 1);
        let other_atomic = s.many_atomics || other(s.atomic).is_some();
        match kind {
            Access::Read => {
                if let Some(w) = other(s.writer) {
                    return Err((Some(w), "read-after-write"));
                }
                if other_atomic {
                    return Err((other(s.atomic), "read of a word updated atomically"));
                }
                if s.reader == 0 {
                    s.reader = me;
                } else if s.reader != me {
                    s.many_readers = true;
                }
            }
            Access::Write => {
                if let Some(w) = other(s.writer) {
                    return Err((Some(w), "write-after-write"));
                }
                if s.many_readers || other(s.reader).is_some() {
                    return Err((other(s.reader), "write-after-read"));
                }
                if other_atomic {
                    return Err((other(s.atomic), "write of a word updated atomically"));
                }
                s.writer = me;
            }
            Access::Atomic => {
                if let Some(w) = other(s.writer) {
                    return Err((Some(w), "atomic update of a word written plainly"));
                }
                if s.many_readers || other(s.reader).is_some() {
                    return Err((other(s.reader), "atomic update of a word read plainly"));
                }
                if s.atomic == 0 {
                    s.atomic = me;
                } else if s.atomic != me {
                    s.many_atomics = true;
                }
            }
        }
        Ok(())
    }
}

/// Checks one access of the running kernel thread (and faults it on a violation).
fn check(addr: usize, bytes: usize, kind: Access) {
    let run = CURRENT.get();
    if run.is_null() {
        return; // not inside a launch (e.g. a static constructor of the kernels' objects)
    }
    // SAFETY: a kernel is running on a fiber of this block; no other reference to it is live.
    let run: &mut BlockRun = unsafe { current() };
    // Most accesses are global: the argument copies (a handful) are scanned from the one hit last.
    let staging = run.launch().staging;
    let n = staging.groups.len();
    for k in 0..n {
        let i = if run.last_group + k < n { run.last_group + k } else { run.last_group + k - n };
        let g = &staging.groups[i];
        if addr >= g.host && addr + bytes <= g.host + g.bytes {
            run.last_group = i;
            return;
        }
    }
    let base = run.shared.base();
    if addr >= base && addr < base + ARENA_BYTES {
        return check_shared(run, addr - base, bytes, kind);
    }
    if on_own_stack(run, addr) {
        return;
    }
    let msg = staging.describe_miss(addr, bytes);
    fault("memcheck", &format!("global {} of {msg}", verb(kind)));
}

fn verb(kind: Access) -> &'static str {
    match kind {
        Access::Read => "read",
        Access::Write => "write",
        Access::Atomic => "atomic update",
    }
}

/// memcheck and racecheck of a shared-memory access at offset `off` of the block's shared memory.
fn check_shared(run: &mut BlockRun, off: usize, bytes: usize, kind: Access) {
    let (name, start) = match run.shared.region(off, bytes) {
        Ok((n, s)) => (n.to_string(), s),
        Err(msg) => fault("memcheck", &format!("shared {} of {msg}", verb(kind))),
    };
    let (t, epoch) = (run.cur, run.epoch);
    for word in off / 4..(off + bytes).div_ceil(4) {
        if let Err((other, hazard)) = run.shared.race(word, t, epoch, kind) {
            let who = match other {
                Some(o) => {
                    let (bx, by, _) = run.launch().block;
                    let (bx, by) = (bx as usize, by as usize);
                    format!("thread ({},{},{})", o % bx, (o / bx) % by, o / (bx * by))
                }
                None => "another thread".to_string(),
            };
            fault(
                "racecheck",
                &format!(
                    "{hazard} hazard: {} of `{name}`+{} (shared offset {:#x}), which {who} touched since the last \
                     __syncthreads",
                    verb(kind),
                    word * 4 - start,
                    word * 4
                ),
            );
        }
    }
}

/// The checks of an atomic operation (called by the atomic built-ins before they act).
pub(crate) fn check_atomic(addr: usize, bytes: usize) {
    check(addr, bytes, Access::Atomic)
}

// The instrumentation's entry points. Functions of the objects call __tsan_init from a constructor; with
// --param=tsan-instrument-func-entry-exit=0 (build.rs) they make no other calls than these.
#[no_mangle]
extern "C" fn __tsan_init() {}

macro_rules! tsan_callbacks {
    ($($read:ident, $write:ident, $bytes:expr;)*) => {$(
        #[no_mangle]
        extern "C" fn $read(addr: *const u8) {
            check(addr as usize, $bytes, Access::Read)
        }
        #[no_mangle]
        extern "C" fn $write(addr: *const u8) {
            check(addr as usize, $bytes, Access::Write)
        }
    )*};
}

tsan_callbacks! {
    __tsan_read1, __tsan_write1, 1;
    __tsan_read2, __tsan_write2, 2;
    __tsan_read4, __tsan_write4, 4;
    __tsan_read8, __tsan_write8, 8;
    __tsan_read16, __tsan_write16, 16;
    __tsan_unaligned_read2, __tsan_unaligned_write2, 2;
    __tsan_unaligned_read4, __tsan_unaligned_write4, 4;
    __tsan_unaligned_read8, __tsan_unaligned_write8, 8;
    __tsan_unaligned_read16, __tsan_unaligned_write16, 16;
}

#[no_mangle]
extern "C" fn __tsan_read_range(addr: *const u8, bytes: usize) {
    check(addr as usize, bytes, Access::Read)
}

#[no_mangle]
extern "C" fn __tsan_write_range(addr: *const u8, bytes: usize) {
    check(addr as usize, bytes, Access::Write)
}
