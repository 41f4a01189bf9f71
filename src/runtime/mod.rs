//! The minimal tensor runtime: a device (CPU or CUDA), a memory plan, and one allocation per pool.
//!
//! Ops receive `&Runtime` and `Tensor` handles; on the CPU a handle resolves to a slice of a `Vec` arena,
//! on CUDA to a raw device pointer (pool base + offset). Nothing allocates after `Runtime::new`.
pub mod cuda;
mod emu;
pub mod plan;
pub mod planted;
#[cfg(test)]
mod source_text;

use std::cell::Cell;
use std::sync::Arc;

use crate::error::{Error, Result};
pub use cuda::{Cuda, DevPtr};
pub(crate) use plan::Tensor;
pub use plan::{mib, DType, Plan, Pool, TensorSpec};

/// Tensor-core modes of the matrix products (cuBLAS compute types); the CPU always computes in fp32. The
/// runtime holds the mode of its products (`Runtime::set_gemm_precision`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum GemmPrecision {
    /// Plain fp32 (no tensor cores): matches the golden vectors.
    #[default]
    Fp32,
    /// fp32 data, TF32 tensor cores.
    Tf32,
    /// fp32 data, bf16 tensor cores (inputs rounded to bf16, fp32 accumulation).
    Bf16,
}

/// Where the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Device {
    /// The CPU backend: the readable reference, always available.
    Cpu,
    /// CUDA device 0 (dynamically loaded driver, cuBLAS and the embedded kernels).
    Cuda,
    /// The emulated CUDA device: the same CUDA code path (every kernel, launch, pool and cuBLAS call) on the
    /// host, with sanitizer checks; no GPU or CUDA install needed. Memory: `SNELLA_EMU_MEMORY` (default 80G).
    #[value(name = "cuda-emu")]
    #[serde(rename = "cuda-emu")]
    CudaEmu,
}

impl Device {
    /// The name the command line takes: `cpu`, `cuda`, `cuda-emu`.
    pub fn name(self) -> &'static str {
        match self {
            Device::Cpu => "cpu",
            Device::Cuda => "cuda",
            Device::CudaEmu => "cuda-emu",
        }
    }
}

impl Device {
    /// CUDA when a GPU, its driver and cuBLAS are usable, else the CPU with a one-line notice on stderr.
    pub fn auto() -> Device {
        match Cuda::probe() {
            Ok(()) => Device::Cuda,
            Err(why) => {
                eprintln!("snella: no usable GPU ({why}); running on the CPU");
                Device::Cpu
            }
        }
    }
}

/// What executes the ops: the CPU, or a CUDA context (device 0, one stream, cuBLAS, the kernel modules).
/// Cloning is cheap and shares the context: models built on clones of one backend run on its one stream,
/// in the order their ops are issued, and [`Backend::new`] pays for the context (and its cuBLAS warm-up)
/// once. The device memory a model reports above the setup baseline then counts every model on it.
#[derive(Clone)]
pub enum Backend {
    /// The CPU.
    Cpu,
    /// An initialised CUDA context (opaque), shared by the clones of this backend.
    Cuda(Arc<Cuda>),
}

impl Backend {
    /// Opens the backend of `device`.
    ///
    /// # Errors
    /// [`Error::NoCuda`] naming what is missing (driver, device, cuBLAS, kernels) when `device` is CUDA and no
    /// GPU is usable; [`Error::Cuda`] when context creation or module loading fails.
    pub fn new(device: Device) -> Result<Backend> {
        Ok(match device {
            Device::Cpu => Backend::Cpu,
            Device::Cuda => Backend::Cuda(Arc::new(Cuda::new()?)),
            Device::CudaEmu => Backend::Cuda(Arc::new(Cuda::emulated(None)?)),
        })
    }

    /// The emulated CUDA device with `total_bytes` of device memory (instead of `SNELLA_EMU_MEMORY`).
    ///
    /// # Errors
    /// [`Error::NoCuda`] when this build has no emulator (see `snella info`); `Invalid` for a total below what a
    /// CUDA context takes (512 MiB).
    pub fn emulated(total_bytes: usize) -> Result<Backend> {
        Ok(Backend::Cuda(Arc::new(Cuda::emulated(Some(total_bytes))?)))
    }

    /// Which device this backend drives.
    pub fn device(&self) -> Device {
        match self {
            Backend::Cpu => Device::Cpu,
            Backend::Cuda(c) if c.is_emulated() => Device::CudaEmu,
            Backend::Cuda(_) => Device::Cuda,
        }
    }
}

/// The host's available memory (Linux `MemAvailable`), or None where it cannot be read.
fn host_available_bytes() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

enum Arena {
    /// f32 words: every tensor offset is a multiple of `plan::ALIGN`, so any dtype view is aligned.
    Cpu(Vec<f32>),
    Cuda(DevPtr),
}

/// Bytes kept free beyond the plan when checking it against free device memory: each pool's allocation can
/// round up to the 2 MiB granularity, and cuBLAS (warmed up before the baseline, see `Cuda::ready`) may still
/// load kernels for shapes larger than the warm-up's and build cuBLASLt heuristics once the pools exist.
pub(crate) const DEVICE_HEADROOM: usize = 6 * (2 << 20) + (64 << 20);

/// Free device bytes a plan of `plan_bytes` needs: the rule of [`Runtime::new`], also used to find the largest
/// batch that fits.
pub(crate) fn device_bytes_needed(plan_bytes: usize) -> usize {
    plan_bytes + DEVICE_HEADROOM
}

/// Per-pool accounting, as reported by `Runtime::pool_report`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PoolUsage {
    /// Bytes the plan asks for.
    pub planned: usize,
    /// Bytes actually allocated for the pool.
    pub allocated: usize,
    /// High-water mark of bytes handed out to ops (end of the furthest tensor touched).
    pub peak: usize,
}

pub(crate) struct Runtime {
    pub(crate) backend: Backend,
    pub(crate) plan: Plan,
    arenas: Vec<Arena>,
    peaks: [Cell<usize>; 6],
    gemm_precision: Cell<GemmPrecision>,
}

/// Asks Linux to back a fresh CPU pool with 2 MiB pages (transparent huge pages, where the system's setting
/// is `madvise` or `always`): the merged weights are written and read down their columns, at a stride of a
/// row (3 to 20 KiB), and with 4 KiB pages nearly every entry of such a walk missed the TLB. Advice only:
/// the pool is the same memory, and where the kernel declines nothing changes.
fn advise_huge_pages(v: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (v.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_mut_ptr() as usize + std::mem::size_of_val(v)) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside v's allocation; MADV_HUGEPAGE changes no contents.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

impl Runtime {
    /// Allocates every pool of `plan` once. On CUDA the plan is first checked against free device memory.
    pub fn new(backend: Backend, plan: Plan) -> Result<Runtime> {
        if let Backend::Cuda(c) = &backend {
            let (free, _) = c.mem_info()?;
            let need = device_bytes_needed(plan.total_bytes());
            if need > free {
                return Err(Error::OutOfMemory { need_mib: mib(need), free_mib: mib(free), max_batch: 0 });
            }
        }
        if let (Backend::Cpu, Some(free)) = (&backend, host_available_bytes()) {
            // A plan larger than the host's available memory would be killed by the OOM killer while the
            // first step touches its pages; say so before allocating instead.
            if plan.total_bytes() > free {
                return Err(Error::OutOfMemory {
                    need_mib: mib(plan.total_bytes()),
                    free_mib: mib(free),
                    max_batch: 0,
                });
            }
        }
        // The runtime owns each pool as soon as it is allocated, so a failure part-way frees the earlier ones.
        let mut rt =
            Runtime { backend, plan, arenas: Vec::new(), peaks: Default::default(), gemm_precision: Cell::default() };
        for pool in Pool::ALL {
            let bytes = rt.plan.pool_bytes(pool);
            let arena = match &rt.backend {
                Backend::Cpu => {
                    let mut v = vec![0.0f32; bytes / 4];
                    advise_huge_pages(&mut v);
                    Arena::Cpu(v)
                }
                // An empty pool allocates nothing (cuMemAlloc(0) is an error, and 1 byte would take 2 MiB).
                Backend::Cuda(_) if bytes == 0 => Arena::Cuda(DevPtr::NULL),
                Backend::Cuda(c) => {
                    let p = c.alloc(bytes)?;
                    rt.arenas.push(Arena::Cuda(p));
                    c.memset(p, 0, bytes)?;
                    continue;
                }
            };
            rt.arenas.push(arena);
        }
        if let (Backend::Cuda(c), Some(ws)) = (&rt.backend, rt.plan.find(plan::CUBLAS_WORKSPACE)) {
            c.set_blas_workspace(rt.ptr(ws))?;
        }
        Ok(rt)
    }

    #[cfg(test)]
    pub(crate) fn cpu(plan: Plan) -> Runtime {
        Runtime::new(Backend::Cpu, plan).expect("CPU allocation cannot fail the device check")
    }

    pub fn device(&self) -> Device {
        self.backend.device()
    }

    pub fn gemm_precision(&self) -> GemmPrecision {
        self.gemm_precision.get()
    }

    /// Tensor-core mode of the CUDA matrix products (the CPU ignores it).
    pub fn set_gemm_precision(&self, p: GemmPrecision) {
        self.gemm_precision.set(p)
    }

    fn touch(&self, t: Tensor) {
        let end = t.offset + t.bytes();
        let p = &self.peaks[t.pool.index()];
        if end > p.get() {
            p.set(end);
        }
    }

    /// The CPU slice of an f32 tensor.
    pub(crate) fn f32(&self, t: Tensor) -> &[f32] {
        debug_assert_eq!(t.dtype, DType::F32);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => &v[t.offset / 4..t.offset / 4 + t.numel],
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The mutable CPU slice of an f32 tensor.
    ///
    /// Several tensors of the same arena are borrowed at once by an op (inputs and outputs), which Rust's
    /// borrow rules cannot express for one `Vec`; the plan guarantees that live tensors do not overlap, so
    /// handing out a `&mut` to one tensor's range while others are read is sound as long as an op never
    /// passes the same (or an overlapping) tensor as both input and output, which every op asserts.
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn f32_mut(&self, t: Tensor) -> &mut [f32] {
        debug_assert_eq!(t.dtype, DType::F32);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => unsafe {
                let base = v.as_ptr() as *mut f32;
                std::slice::from_raw_parts_mut(base.add(t.offset / 4), t.numel)
            },
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The mutable CPU bytes of a u8 tensor (masks).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn u8_mut(&self, t: Tensor) -> &mut [u8] {
        debug_assert_eq!(t.dtype, DType::U8);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => unsafe { std::slice::from_raw_parts_mut((v.as_ptr() as *mut u8).add(t.offset), t.numel) },
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The CPU slice of an i32 tensor (labels).
    pub(crate) fn i32(&self, t: Tensor) -> &[i32] {
        debug_assert_eq!(t.dtype, DType::I32);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => bytemuck::cast_slice(&v[t.offset / 4..t.offset / 4 + t.numel]),
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The CPU slice of a bf16 tensor (its offset is in bytes; every bf16 element is 2-byte aligned).
    pub(crate) fn bf16(&self, t: Tensor) -> &[half::bf16] {
        debug_assert_eq!(t.dtype, DType::BF16);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => bytemuck::cast_slice(&bytemuck::cast_slice::<f32, u8>(v)[t.offset..t.offset + t.bytes()]),
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The mutable CPU slice of a bf16 tensor (see [`Runtime::f32_mut`] for why `&self` hands out `&mut`).
    #[allow(clippy::mut_from_ref)]
    pub(crate) fn bf16_mut(&self, t: Tensor) -> &mut [half::bf16] {
        debug_assert_eq!(t.dtype, DType::BF16);
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => unsafe {
                assert!(
                    t.offset.is_multiple_of(2) && t.offset + t.bytes() <= v.len() * 4,
                    "bf16 view out of its arena"
                );
                let base = (v.as_ptr() as *mut u8).add(t.offset) as *mut half::bf16;
                std::slice::from_raw_parts_mut(base, t.numel)
            },
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The mutable CPU bytes of a tensor of any dtype (exactly its `bytes()`, nothing of its neighbours).
    #[allow(clippy::mut_from_ref)]
    fn bytes_mut(&self, t: Tensor) -> &mut [u8] {
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cpu(v) => unsafe {
                assert!(t.offset + t.bytes() <= v.len() * 4, "byte view out of its arena");
                std::slice::from_raw_parts_mut((v.as_ptr() as *mut u8).add(t.offset), t.bytes())
            },
            Arena::Cuda(_) => panic!("CPU view of a CUDA tensor"),
        }
    }

    /// The device address of a tensor, with its extent.
    pub(crate) fn ptr(&self, t: Tensor) -> DevPtr {
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cuda(p) => DevPtr { addr: p.addr + t.offset as u64, bytes: t.bytes() },
            Arena::Cpu(_) => panic!("device pointer of a CPU tensor"),
        }
    }

    /// The device address of an optional tensor; `DevPtr::NULL` (a null pointer) for None.
    pub(crate) fn ptr_or_null(&self, t: Option<Tensor>) -> DevPtr {
        t.map_or(DevPtr::NULL, |t| self.ptr(t))
    }

    pub(crate) fn cuda(&self) -> &Cuda {
        match &self.backend {
            Backend::Cuda(c) => c,
            Backend::Cpu => panic!("CUDA op on the CPU backend"),
        }
    }

    /// Copies host values into a tensor: f32 as they are, or into a bf16 tensor rounded to nearest even on the
    /// host (the rounding of `ops::convert::bf16_round`).
    pub fn upload(&self, t: Tensor, data: &[f32]) -> Result<()> {
        self.check_len(t, data.len())?;
        if t.dtype == DType::BF16 {
            match &self.backend {
                Backend::Cpu => {
                    for (d, &x) in self.bf16_mut(t).iter_mut().zip(data) {
                        *d = half::bf16::from_f32(x);
                    }
                }
                Backend::Cuda(c) => {
                    let host: Vec<half::bf16> = data.iter().map(|&x| half::bf16::from_f32(x)).collect();
                    c.upload(self.ptr(t), &host)?
                }
            }
            return Ok(());
        }
        match &self.backend {
            Backend::Cpu => self.f32_mut(t).copy_from_slice(data),
            Backend::Cuda(c) => c.upload(self.ptr(t), data)?,
        }
        Ok(())
    }

    pub fn upload_i32(&self, t: Tensor, data: &[i32]) -> Result<()> {
        self.check_len(t, data.len())?;
        match &self.backend {
            Backend::Cpu => {
                self.touch(t);
                let Arena::Cpu(v) = &self.arenas[t.pool.index()] else { unreachable!() };
                let dst =
                    unsafe { std::slice::from_raw_parts_mut((v.as_ptr() as *mut i32).add(t.offset / 4), t.numel) };
                dst.copy_from_slice(data);
            }
            Backend::Cuda(c) => c.upload(self.ptr(t), data)?,
        }
        Ok(())
    }

    /// A tensor's values on the host: f32 as they are, a bf16 tensor widened (exactly) to f32.
    pub fn download(&self, t: Tensor) -> Result<Vec<f32>> {
        if t.dtype == DType::BF16 {
            return Ok(match &self.backend {
                Backend::Cpu => self.bf16(t).iter().map(|b| b.to_f32()).collect(),
                Backend::Cuda(c) => {
                    let mut host = vec![half::bf16::ZERO; t.numel];
                    c.download(&mut host, self.ptr(t))?;
                    host.iter().map(|b| b.to_f32()).collect()
                }
            });
        }
        match &self.backend {
            Backend::Cpu => Ok(self.f32(t).to_vec()),
            Backend::Cuda(c) => {
                let mut v = vec![0f32; t.numel];
                c.download(&mut v, self.ptr(t))?;
                Ok(v)
            }
        }
    }

    /// Sets every byte of a tensor to `byte` (0 for zeroing; 0xFF makes f32 and bf16 NaNs, used to poison
    /// outputs). Exactly the tensor's bytes: a bf16 or u8 tensor may end, or a slice of one start, inside a word.
    pub fn fill_bytes(&self, t: Tensor, byte: u8) -> Result<()> {
        match &self.backend {
            Backend::Cpu => self.bytes_mut(t).fill(byte),
            Backend::Cuda(c) => c.memset(self.ptr(t), byte, t.bytes())?,
        }
        Ok(())
    }

    /// Zeroes a whole pool (e.g. the gradients before a backward) in one memset.
    pub fn zero_pool(&self, pool: Pool) -> Result<()> {
        let bytes = self.plan.pool_bytes(pool);
        match &self.arenas[pool.index()] {
            Arena::Cpu(_) => {
                self.f32_mut(Tensor { id: u32::MAX, pool, offset: 0, numel: bytes / 4, dtype: DType::F32 }).fill(0.0)
            }
            Arena::Cuda(p) => self.cuda().memset(*p, 0, bytes)?,
        }
        Ok(())
    }

    pub fn zero(&self, t: Tensor) -> Result<()> {
        self.fill_bytes(t, 0)
    }

    fn check_len(&self, t: Tensor, n: usize) -> Result<()> {
        if n != t.numel {
            let spec = self.plan.spec(t);
            return Err(Error::invalid(
                spec.name.clone(),
                format!("{n} values given for a tensor of shape {:?} ({} elements)", spec.shape, t.numel),
            ));
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        match &self.backend {
            Backend::Cpu => Ok(()),
            Backend::Cuda(c) => c.sync(),
        }
    }

    /// Planned, allocated and peak bytes of every pool.
    pub fn pool_report(&self) -> Vec<(Pool, PoolUsage)> {
        Pool::ALL
            .iter()
            .map(|&p| {
                let planned = self.plan.pool_bytes(p);
                let allocated = match &self.arenas[p.index()] {
                    Arena::Cpu(v) => v.len() * 4,
                    Arena::Cuda(_) => planned,
                };
                (p, PoolUsage { planned, allocated, peak: self.peaks[p.index()].get() })
            })
            .collect()
    }

    /// Device bytes in use above the baseline read after CUDA setup (None on the CPU).
    pub fn device_used_above_baseline(&self) -> Result<Option<usize>> {
        match &self.backend {
            Backend::Cpu => Ok(None),
            Backend::Cuda(c) => {
                let (free, total) = c.mem_info()?;
                Ok(Some((total - free).saturating_sub(c.baseline_used())))
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Backend::Cuda(c) = &self.backend {
            for a in &self.arenas {
                if let Arena::Cuda(p) = a {
                    if p.addr != 0 {
                        c.free(*p);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emulated(total: usize) -> Backend {
        Backend::emulated(total).expect("the emulated device is part of every x86-64 Linux build")
    }

    fn free_of(b: &Backend) -> usize {
        let Backend::Cuda(c) = b else { unreachable!() };
        c.mem_info().unwrap().0
    }

    /// cuBLAS loads its kernels (and its default workspace) at the first GEMM of each compute type: the
    /// context warms it up before reading the baseline, so what is measured above the baseline after real
    /// products is exactly the pools.
    #[test]
    fn the_baseline_is_read_after_cublas_warms_up() {
        let b = emulated(2 << 30);
        let Backend::Cuda(c) = &b else { unreachable!() };
        let want = emu::CONTEXT_BYTES + 3 * emu::CUBLAS_MODULE_BYTES + emu::CUBLAS_DEFAULT_WORKSPACE;
        assert_eq!(c.baseline_used(), want, "context, three compute types' kernels and the default workspace");
        let mut p = Plan::new();
        p.add_cublas_workspace();
        let (x, y, z) = (
            p.f32("x", &[64, 64], Pool::Scratch),
            p.f32("y", &[64, 64], Pool::Scratch),
            p.f32("z", &[64, 64], Pool::Scratch),
        );
        let rt = Runtime::new(b, p).unwrap();
        rt.upload(x, &[0.5; 4096]).unwrap();
        rt.upload(y, &[0.25; 4096]).unwrap();
        for prec in [GemmPrecision::Fp32, GemmPrecision::Tf32, GemmPrecision::Bf16] {
            rt.set_gemm_precision(prec);
            crate::ops::matmul(&rt, z, x, y, crate::ops::Matmul::new(64, 64, 64, false, true)).unwrap();
        }
        assert_eq!(rt.download(z).unwrap()[0], 8.0);
        assert_eq!(rt.device_used_above_baseline().unwrap(), Some(rt.plan.total_bytes()));
    }

    /// A plan that passes the free-memory check runs its products: the headroom covers what cuBLAS may still
    /// take, and one byte less free is refused before anything is allocated.
    #[test]
    fn a_plan_that_just_fits_runs_and_one_that_does_not_is_refused() {
        let plan = || {
            let mut p = Plan::new();
            p.add_cublas_workspace();
            let t = [
                p.f32("a", &[256, 256], Pool::Activations),
                p.f32("b", &[256, 256], Pool::Frozen),
                p.f32("c", &[256, 256], Pool::Scratch),
            ];
            (p, t)
        };
        let probe = emulated(2 << 30);
        let (p, _) = plan();
        // The total that leaves exactly the plan and the headroom free after setup.
        let total = (2 << 30) - free_of(&probe) + p.total_bytes() + DEVICE_HEADROOM;
        let (p, [a, b, c]) = plan();
        let rt = Runtime::new(emulated(total), p).unwrap();
        rt.upload(a, &vec![1.0; 65536]).unwrap();
        rt.upload(b, &vec![1.0; 65536]).unwrap();
        crate::ops::matmul(&rt, c, a, b, crate::ops::Matmul::new(256, 256, 256, false, false)).unwrap();
        assert_eq!(rt.download(c).unwrap()[0], 256.0);
        let (p, _) = plan();
        match Runtime::new(emulated(total - 1), p) {
            Err(Error::OutOfMemory { .. }) => {}
            other => panic!("one byte short must be OutOfMemory, got {:?}", other.err()),
        }
    }

    /// A pool allocation that fails part-way frees the pools allocated before it (on a GPU the primary
    /// context outlives the runtime, so they would stay allocated; the emulator counts what a device still
    /// holds when it is dropped).
    #[test]
    fn a_failed_pool_allocation_frees_the_earlier_pools() {
        let b = emulated(2 << 30);
        let Backend::Cuda(c) = &b else { unreachable!() };
        c.emu().allocations_left.store(3, std::sync::atomic::Ordering::Relaxed);
        let mut p = Plan::new();
        for pool in Pool::ALL {
            p.f32(pool.name(), &[1 << 16], pool);
        }
        let leaked = emu::LEAKED_AT_DROP.load(std::sync::atomic::Ordering::Relaxed);
        let err = Runtime::new(b, p).err().expect("the fourth pool's allocation fails");
        assert!(err.to_string().contains("injected"), "{err}");
        assert_eq!(emu::LEAKED_AT_DROP.load(std::sync::atomic::Ordering::Relaxed), leaked, "pools were leaked");
    }

    #[test]
    fn bf16_upload_rounds_and_download_widens() {
        let n = 1001; // odd: the tensor ends inside a 4-byte word
        let mut p = Plan::new();
        let b = p.add("b", &[n], DType::BF16, Pool::Activations);
        let after = p.add("after", &[3], DType::F32, Pool::Activations);
        let rt = Runtime::cpu(p);
        let x: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.013_7 + 1e-3).collect();
        rt.upload(b, &x).unwrap();
        let got = rt.download(b).unwrap();
        for (i, (&g, &x)) in got.iter().zip(&x).enumerate() {
            assert_eq!(g.to_bits(), half::bf16::from_f32(x).to_f32().to_bits(), "element {i}");
            assert!(((g - x) / x).abs() <= 1.0 / 256.0, "element {i}: {g} for {x}");
        }
        // Values that bf16 holds exactly come back unchanged; a tie rounds to the even neighbour.
        let held = [1.0, -0.5, f32::from_bits(0x7F7F_0000), f32::from_bits(0x8001_0000), 1.5, -0.0, f32::INFINITY];
        let exact: Vec<f32> = (0..n).map(|i| held[i % held.len()]).collect();
        rt.upload(b, &exact).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert!(bits(&rt.download(b).unwrap()) == bits(&exact), "bf16 values must round-trip unchanged");
        let mut tie = exact.clone();
        tie[n - 1] = f32::from_bits(0x3F81_8000);
        rt.upload(b, &tie).unwrap();
        assert_eq!(rt.download(b).unwrap()[n - 1].to_bits(), 0x3F82_0000);
        assert!(rt.upload(b, &x[1..]).is_err(), "a length mismatch is an error");
        rt.upload(after, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(rt.download(after).unwrap(), [1.0, 2.0, 3.0]);
    }

    #[test]
    fn fill_bytes_covers_exactly_the_tensor() {
        let n = 7;
        let mut p = Plan::new();
        let b = p.add("b", &[n], DType::BF16, Pool::Scratch);
        let m = p.add("m", &[5], DType::U8, Pool::Scratch);
        let rt = Runtime::cpu(p);
        rt.fill_bytes(b, 0xFF).unwrap();
        assert!(rt.download(b).unwrap().iter().all(|v| v.is_nan()), "the last (odd) element is poisoned too");
        // A slice that starts and ends inside words: its neighbours keep their poison.
        rt.zero(b.slice(1, 3)).unwrap();
        let v = rt.download(b).unwrap();
        assert!(v[0].is_nan() && v[1..4] == [0.0; 3] && v[4..].iter().all(|x| x.is_nan()), "{v:?}");
        rt.fill_bytes(m, 0xAB).unwrap();
        assert_eq!(rt.u8_mut(m), &[0xAB; 5]);
        // The bytes after the tensor (alignment padding) are not the tensor's.
        let pad = Tensor { numel: 3, offset: m.offset + 5, ..m };
        assert_eq!(rt.u8_mut(pad), &[0; 3]);
    }
}
