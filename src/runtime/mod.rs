//! The minimal tensor runtime: a device (CPU or CUDA), a memory plan, and one allocation per pool.
//!
//! Ops receive `&Runtime` and `Tensor` handles; on the CPU a handle resolves to a slice of a `Vec` arena,
//! on CUDA to a raw device pointer (pool base + offset). Nothing allocates after `Runtime::new`.
pub mod cuda;
pub mod plan;

use std::cell::Cell;

use crate::error::{Error, Result};
use crate::ops::GemmPrecision;
pub use cuda::{Cuda, DevPtr};
pub(crate) use plan::Tensor;
pub use plan::{mib, DType, Plan, Pool, TensorSpec};

/// Where the engine runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Device {
    /// The CPU backend: the readable reference, always available.
    Cpu,
    /// CUDA device 0 (dynamically loaded driver, cuBLAS and the embedded kernels).
    Cuda,
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
/// Several models can share one by value only, so each model owns its backend.
pub enum Backend {
    /// The CPU.
    Cpu,
    /// An initialised CUDA context (opaque).
    Cuda(Box<Cuda>),
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
            Device::Cuda => Backend::Cuda(Box::new(Cuda::new()?)),
        })
    }
    /// Which device this backend drives.
    pub fn device(&self) -> Device {
        match self {
            Backend::Cpu => Device::Cpu,
            Backend::Cuda(_) => Device::Cuda,
        }
    }
}

enum Arena {
    /// f32 words: every tensor offset is a multiple of `plan::ALIGN`, so any dtype view is aligned.
    Cpu(Vec<f32>),
    Cuda(DevPtr),
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

impl Runtime {
    /// Allocates every pool of `plan` once. On CUDA the plan is first checked against free device memory.
    pub fn new(backend: Backend, plan: Plan) -> Result<Runtime> {
        let mut arenas = Vec::with_capacity(6);
        if let Backend::Cuda(c) = &backend {
            let (free, _) = c.mem_info()?;
            // Each allocation can round up to the 2 MiB allocation granularity.
            let need = plan.total_bytes() + 6 * (2 << 20);
            if need > free {
                return Err(Error::OutOfMemory { need_mib: mib(need), free_mib: mib(free), max_batch: 0 });
            }
        }
        for pool in Pool::ALL {
            let bytes = plan.pool_bytes(pool);
            arenas.push(match &backend {
                Backend::Cpu => Arena::Cpu(vec![0.0f32; bytes / 4]),
                Backend::Cuda(c) => {
                    let p = c.alloc(bytes)?;
                    c.memset(p, 0, bytes)?;
                    Arena::Cuda(p)
                }
            });
        }
        let rt = Runtime { backend, plan, arenas, peaks: Default::default(), gemm_precision: Cell::default() };
        if let (Backend::Cuda(c), Some(ws)) = (&rt.backend, rt.plan.find(plan::CUBLAS_WORKSPACE)) {
            use cudarc::cublas::sys as cb;
            let st = unsafe { cb::cublasSetWorkspace_v2(c.blas, rt.ptr(ws) as *mut _, ws.bytes()) };
            if st != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(Error::cuda("cublasSetWorkspace", format!("{st:?}")));
            }
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

    /// The device address of a tensor.
    pub(crate) fn ptr(&self, t: Tensor) -> DevPtr {
        self.touch(t);
        match &self.arenas[t.pool.index()] {
            Arena::Cuda(p) => p + t.offset as u64,
            Arena::Cpu(_) => panic!("device pointer of a CPU tensor"),
        }
    }

    pub(crate) fn cuda(&self) -> &Cuda {
        match &self.backend {
            Backend::Cuda(c) => c,
            Backend::Cpu => panic!("CUDA op on the CPU backend"),
        }
    }

    /// Copies host values into a tensor (f32 or i32 by the tensor's dtype).
    pub fn upload(&self, t: Tensor, data: &[f32]) -> Result<()> {
        self.check_len(t, data.len())?;
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

    pub fn download(&self, t: Tensor) -> Result<Vec<f32>> {
        match &self.backend {
            Backend::Cpu => Ok(self.f32(t).to_vec()),
            Backend::Cuda(c) => {
                let mut v = vec![0f32; t.numel];
                c.download(&mut v, self.ptr(t))?;
                Ok(v)
            }
        }
    }

    /// Sets every byte of a tensor to `byte` (0 for zeroing; 0xFF makes f32 NaNs, used to poison outputs).
    pub fn fill_bytes(&self, t: Tensor, byte: u8) -> Result<()> {
        match &self.backend {
            Backend::Cpu => {
                let s = self.f32_mut(Tensor { dtype: DType::F32, numel: t.bytes() / 4, ..t });
                s.fill(f32::from_bits(u32::from_ne_bytes([byte; 4])));
            }
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
                Ok(Some((total - free).saturating_sub(c.baseline_used)))
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Backend::Cuda(c) = &self.backend {
            for a in &self.arenas {
                if let Arena::Cuda(p) = a {
                    c.free(*p);
                }
            }
        }
    }
}
