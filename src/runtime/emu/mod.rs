//! The emulated CUDA device (`--device cuda-emu`): the layer under [`Cuda`](super::Cuda) for a machine
//! without a GPU. Everything above it (every op's CUDA branch, `Cuda::launch` with its argument lists and
//! geometry, the pools, uploads, downloads, memsets, cuBLAS calls, the step timer, `memory --measure`) is the
//! code that runs on a real GPU; only these pieces stand in for the hardware:
//!
//! - **memory** ([`Memory`]): host allocations standing in for device memory, out of a configurable total
//!   (`SNELLA_EMU_MEMORY`, default 80 GiB), with the context's and cuBLAS's own use modelled so that the
//!   free-memory arithmetic of the engine is exercised; fresh allocations hold NaN bytes, as device memory
//!   holds garbage;
//! - **copies, memsets, events, the stream**: synchronous; every copy is checked against its allocation;
//! - **kernels** ([`block`]): `cuda/*.cu` compiled a second time by the host C++ compiler (build.rs); each
//!   CUDA thread of a block is a fiber ([`fiber`]) with real barrier semantics, warp intrinsics exchange
//!   values across the 32 lanes of a warp, and blocks run in parallel on the host's cores;
//! - **sanitizers** ([`sanitizer`]): memcheck (every global access inside the tensor its pointer argument
//!   points into, every shared access inside its array), racecheck (shared words between barriers), synccheck
//!   (barriers and full-mask warp intrinsics that not every live thread reaches) and the launch check; each
//!   failure is an error naming the kernel, block, thread and address;
//! - **cuBLAS** ([`blas`]): the one entry point the engine calls, `cublasGemmStridedBatchedEx`, on the CPU
//!   with cuBLAS's column-major contract and argument validation; TF32 and BF16 modes round the inputs as the
//!   tensor cores do.
//!
//! What only a real GPU can tell (README, "Without a GPU"): timing, PTX/SASS code generation, FMA contraction
//! and libdevice's ulps, races between blocks, memory-model effects, and cuBLAS's own numerics.
pub(crate) mod blas;
mod block;
mod fiber;
mod sanitizer;

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Mutex;

use super::cuda::{ArgKind, DevPtr, KArg, KernelSignature};
use crate::error::{Error, Result};

/// Device memory a CUDA context takes when it is created (modelled; of the order seen on H100-class cards).
pub(crate) const CONTEXT_BYTES: usize = 512 << 20;
/// Device memory cuBLAS takes for the kernels of one compute type, loaded lazily at the first GEMM of that
/// type (CUDA's lazy module loading, modelled).
pub(crate) const CUBLAS_MODULE_BYTES: usize = 48 << 20;
/// cuBLAS's own workspace, allocated at the first GEMM when the caller set none (32 MiB on sm_90).
pub(crate) const CUBLAS_DEFAULT_WORKSPACE: usize = 32 << 20;
/// Default total device memory: an 80 GiB card.
pub(crate) const DEFAULT_TOTAL: usize = 80 << 30;
/// cuMemAlloc's alignment.
const ALLOC_ALIGN: usize = 512;

/// The emulated device: its memory and its cuBLAS state. Kernel launches are in [`block`].
pub(crate) struct Emu {
    memory: Mutex<Memory>,
    pub(crate) blas: Mutex<blas::BlasState>,
    /// Allocations that may still succeed before cuMemAlloc fails (tests of the failure paths).
    #[cfg(test)]
    pub(crate) allocations_left: std::sync::atomic::AtomicUsize,
}

/// Emulated device memory: host allocations keyed by address, out of `total` bytes.
pub(crate) struct Memory {
    total: usize,
    /// Bytes the model of the driver and cuBLAS holds (context, cuBLAS modules and default workspace).
    reserved: usize,
    allocations: BTreeMap<u64, usize>,
    used: usize,
}

impl Emu {
    /// A device of `total` bytes (None: `SNELLA_EMU_MEMORY`, else 80 GiB), with its context created.
    pub(crate) fn new(total: Option<usize>) -> Result<Emu> {
        if let Some(why) = super::cuda::EMU_UNAVAILABLE {
            return Err(Error::NoCuda(format!("the emulated CUDA device is not in this build: {why}")));
        }
        let total = match total {
            Some(t) => t,
            None => match std::env::var("SNELLA_EMU_MEMORY") {
                Ok(s) => parse_bytes(&s).ok_or_else(|| {
                    Error::invalid("SNELLA_EMU_MEMORY", format!("{s:?} is not a size (e.g. 80G, 512M, 1073741824)"))
                })?,
                Err(_) => DEFAULT_TOTAL,
            },
        };
        if total < CONTEXT_BYTES {
            return Err(Error::invalid(
                "emulated device memory",
                format!("{} MiB is less than a CUDA context takes ({} MiB)", total >> 20, CONTEXT_BYTES >> 20),
            ));
        }
        let memory = Memory { total, reserved: CONTEXT_BYTES, allocations: BTreeMap::new(), used: 0 };
        Ok(Emu {
            memory: Mutex::new(memory),
            blas: Mutex::new(blas::BlasState::default()),
            #[cfg(test)]
            allocations_left: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    pub(crate) fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (free, total) bytes, as cuMemGetInfo.
    pub(crate) fn mem_info(&self) -> (usize, usize) {
        let m = self.memory();
        (m.total - m.reserved - m.used, m.total)
    }

    /// cuMemAlloc: fresh memory holds NaN bytes (0xFF), as device memory holds whatever was there.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        let bytes = bytes.max(1);
        #[cfg(test)]
        {
            use std::sync::atomic::Ordering::Relaxed;
            if self.allocations_left.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_err() {
                return Err(Error::cuda(
                    format!("cuMemAlloc({bytes} B)"),
                    "CUDA_ERROR_OUT_OF_MEMORY (injected by a test)",
                ));
            }
        }
        let mut m = self.memory();
        if bytes > m.total - m.reserved - m.used {
            return Err(Error::cuda(
                format!("cuMemAlloc({bytes} B)"),
                format!("CUDA_ERROR_OUT_OF_MEMORY (emulated device: {} B free)", m.total - m.reserved - m.used),
            ));
        }
        let layout = Layout::from_size_align(bytes, ALLOC_ALIGN).map_err(|e| Error::cuda("cuMemAlloc", e))?;
        // SAFETY: a non-zero size with a valid alignment.
        let p = unsafe { std::alloc::alloc(layout) };
        if p.is_null() {
            return Err(Error::cuda(format!("cuMemAlloc({bytes} B)"), "the host has no memory left for it"));
        }
        // SAFETY: `p` holds `bytes` bytes.
        unsafe { std::ptr::write_bytes(p, 0xFF, bytes) };
        m.allocations.insert(p as u64, bytes);
        m.used += bytes;
        Ok(DevPtr { addr: p as u64, bytes })
    }

    /// cuMemFree of a pointer that cuMemAlloc returned (anything else is ignored, as the driver reports it).
    pub(crate) fn free(&self, p: u64) {
        let mut m = self.memory();
        if let Some(bytes) = m.allocations.remove(&p) {
            m.used -= bytes;
            // SAFETY: allocated in `alloc` with this layout.
            unsafe { std::alloc::dealloc(p as *mut u8, Layout::from_size_align_unchecked(bytes, ALLOC_ALIGN)) };
        }
    }

    /// Checks that `bytes` bytes at `p` lie inside one allocation and inside the tensor `p` points into, and
    /// returns the host address.
    pub(crate) fn host(&self, what: &str, p: DevPtr, bytes: usize) -> Result<*mut u8> {
        if bytes > p.bytes {
            return Err(Error::cuda(
                what,
                format!("{bytes} B at {:#x} run past the end of its tensor ({} B)", p.addr, p.bytes),
            ));
        }
        self.memory().check(p.addr, bytes).map_err(|e| Error::cuda(what, e))?;
        Ok(p.addr as *mut u8)
    }

    pub(crate) fn upload(&self, dst: DevPtr, src: &[u8]) -> Result<()> {
        let d = self.host("memcpy HtoD", dst, src.len())?;
        // SAFETY: checked to lie inside an allocation; `src` is a host slice that cannot overlap it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), d, src.len()) };
        Ok(())
    }

    pub(crate) fn download(&self, dst: &mut [u8], src: DevPtr) -> Result<()> {
        let s = self.host("memcpy DtoH", src, dst.len())?;
        // SAFETY: as in `upload`.
        unsafe { std::ptr::copy_nonoverlapping(s, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    pub(crate) fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        let d = self.host("memset", dst, bytes)?;
        // SAFETY: checked to lie inside an allocation.
        unsafe { std::ptr::write_bytes(d, byte, bytes) };
        Ok(())
    }

    /// Runs a kernel on the emulated device (see [`block::launch`]).
    pub(crate) fn launch(
        &self,
        kernel: &'static KernelSignature,
        entry: super::cuda::EmuEntry,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        dynamic_shared: usize,
        args: &[KArg],
    ) -> Result<()> {
        let staging = Staging::new(self, kernel, args)?;
        let values: Vec<u64> = args
            .iter()
            .enumerate()
            .map(|(i, a)| match *a {
                KArg::Ptr(p) => staging.host_address(i, p),
                KArg::I32(v) => v as u32 as u64,
                KArg::I64(v) => v as u64,
                KArg::F32(v) => v.to_bits() as u64,
            })
            .collect();
        // Little endian: each value's first bytes are the i32 / f32 the kernel reads.
        let pointers: Vec<*const c_void> = values.iter().map(|v| v as *const u64 as *const c_void).collect();
        block::launch(kernel, entry, &pointers, grid, block, dynamic_shared, &staging)
            .map_err(|msg| Error::cuda(kernel.name, msg))?;
        staging.copy_back();
        Ok(())
    }

    /// Models cuBLAS taking `bytes` of device memory for itself (lazily loaded kernels, its workspace).
    pub(crate) fn reserve(&self, bytes: usize) -> std::result::Result<(), String> {
        let mut m = self.memory();
        if bytes > m.total - m.reserved - m.used {
            return Err(format!("{bytes} B needed, {} B free", m.total - m.reserved - m.used));
        }
        m.reserved += bytes;
        Ok(())
    }
}

/// Allocations still live when an emulated device was dropped, over the process (a test counts leaks with it).
#[cfg(test)]
pub(crate) static LEAKED_AT_DROP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Drop for Emu {
    fn drop(&mut self) {
        let addrs: Vec<u64> = self.memory().allocations.keys().copied().collect();
        #[cfg(test)]
        LEAKED_AT_DROP.fetch_add(addrs.len(), std::sync::atomic::Ordering::Relaxed);
        for a in addrs {
            self.free(a);
        }
    }
}

impl Memory {
    /// Ok if [addr, addr + bytes) lies inside one allocation.
    pub(crate) fn check(&self, addr: u64, bytes: usize) -> std::result::Result<(), String> {
        match self.allocations.range(..=addr).next_back() {
            Some((&start, &len)) if addr + bytes as u64 <= start + len as u64 => Ok(()),
            Some((&start, &len)) if addr < start + len as u64 => Err(format!(
                "{bytes} B at {addr:#x} run {} B past the end of the allocation at {start:#x} ({len} B)",
                addr + bytes as u64 - (start + len as u64)
            )),
            _ => Err(format!("{addr:#x} is not inside any device allocation")),
        }
    }
}

/// "80G", "512M", "64K" (powers of 1024) or a number of bytes.
pub(crate) fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'G' | 'g') => (&s[..i], 30),
        (i, 'M' | 'm') => (&s[..i], 20),
        (i, 'K' | 'k') => (&s[..i], 10),
        _ => (s, 0),
    };
    num.trim().parse::<usize>().ok()?.checked_mul(1 << shift)
}

/// The pointer arguments of one launch, each copied into its own host buffer with unmapped-by-convention gaps
/// around it: an access the kernel makes through a pointer argument must land inside that argument's copy,
/// so an overrun is caught even where the pool puts another argument's tensor right behind it. Arguments
/// whose tensors overlap (in-place ops) share one copy, so aliasing is kept. After the launch every copy is
/// written back (the stream is synchronous, so nothing else touches the tensors meanwhile).
pub(crate) struct Staging {
    /// Sorted by host address.
    pub(crate) groups: Vec<Group>,
    /// The whole staging area (copies and gaps); the groups point into it.
    _buffer: Vec<u128>,
    /// For each argument: its group, or None (scalar or null pointer).
    arg_group: Vec<Option<usize>>,
}

/// One staged copy: device range [dev, dev + bytes) at host address `host`.
pub(crate) struct Group {
    pub(crate) dev: u64,
    pub(crate) bytes: usize,
    pub(crate) host: usize,
    /// The pointer arguments (index, name, device address, extent) that point into this copy.
    pub(crate) args: Vec<(usize, &'static str, DevPtr)>,
}

impl Staging {
    fn new(emu: &Emu, kernel: &'static KernelSignature, args: &[KArg]) -> Result<Staging> {
        let mut ranges: Vec<(u64, u64, usize)> = Vec::new(); // (start, end, arg)
        for (i, a) in args.iter().enumerate() {
            if let KArg::Ptr(p) = *a {
                if p.addr == 0 {
                    continue; // a null pointer: the kernel must not dereference it
                }
                let what = format!("argument {i} `{}` of {}", kernel.params[i].name, kernel.name);
                emu.host(&what, p, p.bytes)?;
                ranges.push((p.addr, p.addr + p.bytes as u64, i));
            }
        }
        ranges.sort();
        // Merge overlapping extents into groups.
        let mut spans: Vec<(u64, u64, Vec<usize>)> = Vec::new();
        for (s, e, i) in ranges {
            match spans.last_mut() {
                Some(last) if s < last.1 => {
                    last.1 = last.1.max(e);
                    last.2.push(i);
                }
                _ => spans.push((s, e, vec![i])),
            }
        }
        // Layout: gap, copy, gap, copy, ..., gap. A gap is as large as its neighbours (at least 4 KiB), so
        // an overrun of up to a whole tensor's size lands in no copy. The gaps are never touched.
        let gap = |bytes: usize| bytes.max(4096).next_multiple_of(256);
        let mut at = spans.first().map_or(0, |s| gap((s.1 - s.0) as usize));
        let mut offsets = Vec::with_capacity(spans.len());
        for s in &spans {
            let bytes = (s.1 - s.0) as usize;
            offsets.push(at);
            at += bytes.next_multiple_of(256) + gap(bytes);
        }
        let mut buffer = vec![0u128; at.div_ceil(16)];
        let base = buffer.as_mut_ptr() as usize;
        let mut arg_group = vec![None; args.len()];
        let mut groups = Vec::with_capacity(spans.len());
        for (g, ((start, end, members), off)) in spans.into_iter().zip(offsets).enumerate() {
            let bytes = (end - start) as usize;
            // SAFETY: the source range lies inside one device allocation (checked above); the destination is
            // this group's slot of `buffer`.
            unsafe { std::ptr::copy_nonoverlapping(start as *const u8, (base + off) as *mut u8, bytes) };
            let mut described = Vec::new();
            for i in members {
                arg_group[i] = Some(g);
                if let KArg::Ptr(p) = args[i] {
                    described.push((i, kernel.params[i].name, p));
                }
            }
            groups.push(Group { dev: start, bytes, host: base + off, args: described });
        }
        debug_assert!(kernel.params.iter().zip(args).all(|(p, a)| matches!(
            (p.kind, a),
            (ArgKind::Ptr, KArg::Ptr(_))
                | (ArgKind::I32, KArg::I32(_))
                | (ArgKind::I64, KArg::I64(_))
                | (ArgKind::F32, KArg::F32(_))
        )));
        Ok(Staging { groups, _buffer: buffer, arg_group })
    }

    /// The host address the kernel receives for pointer argument `i` (0 stays 0).
    fn host_address(&self, i: usize, p: DevPtr) -> u64 {
        match self.arg_group[i] {
            Some(g) => (self.groups[g].host as u64) + (p.addr - self.groups[g].dev),
            None => 0,
        }
    }

    fn copy_back(&self) {
        for g in &self.groups {
            // SAFETY: the inverse of the copy in `new`, into the same device range.
            unsafe { std::ptr::copy_nonoverlapping(g.host as *const u8, g.dev as *mut u8, g.bytes) };
        }
    }

    /// Describes a global address that lies in no copy: relative to the nearest argument.
    pub(crate) fn describe_miss(&self, addr: usize, bytes: usize) -> String {
        let nearest = self.groups.iter().min_by_key(|g| {
            if addr < g.host {
                g.host - addr
            } else {
                addr.saturating_sub(g.host + g.bytes)
            }
        });
        let Some(g) = nearest else {
            return format!("{bytes} B at host address {addr:#x}: the launch has no pointer arguments");
        };
        let names: Vec<String> = g.args.iter().map(|(i, n, _)| format!("argument {i} `{n}`")).collect();
        let dev = g.dev as i128 + (addr as i128 - g.host as i128);
        let place = if addr < g.host {
            format!("{} B before the start of", g.host - addr)
        } else if addr >= g.host + g.bytes {
            format!("{} B past the end of", addr - (g.host + g.bytes))
        } else {
            format!("running {} B past the end of", addr + bytes - (g.host + g.bytes))
        };
        format!("{bytes} B at device address {dev:#x}, {place} {} ({} B at {:#x})", names.join(" / "), g.bytes, g.dev)
    }
}
