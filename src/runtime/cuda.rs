//! The CUDA side of the runtime: context, one stream, the cuBLAS handle and the kernel modules, all
//! created once. CUDA is loaded at run time (cudarc's dynamic loading), so this file builds everywhere;
//! `Cuda::probe` checks for the driver library before touching it, because cudarc panics without it.
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};

mod fatbins {
    include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));
}
pub use fatbins::KERNELS_COMPILED;

/// A raw device address (CUdeviceptr). Kernels receive pool base + offset as plain pointers.
pub type DevPtr = u64;

pub struct Cuda {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: cublas_sys::cublasHandle_t,
    functions: HashMap<String, CudaFunction>,
    /// Device bytes in use right after context, cuBLAS and module setup (cuMemGetInfo); pool memory is
    /// measured above it.
    pub baseline_used: usize,
    pub name: String,
}

// The cuBLAS handle is only used from the thread that owns the engine; the raw pointer blocks auto Send.
unsafe impl Send for Cuda {}
unsafe impl Sync for Cuda {}

impl Cuda {
    /// Whether a CUDA driver library can be loaded and reports at least one device. Never panics.
    pub fn probe() -> std::result::Result<(), String> {
        if !unsafe { drv_sys::is_culib_present() } {
            return Err("the CUDA driver library (libcuda.so) was not found".into());
        }
        if !KERNELS_COMPILED {
            return Err("this binary was built without nvcc, so it has no CUDA kernels".into());
        }
        drv::init().map_err(|e| format!("cuInit failed: {e}"))?;
        let n = drv::device::get_count().map_err(|e| format!("cuDeviceGetCount failed: {e}"))?;
        if n < 1 {
            return Err("the CUDA driver reports no device".into());
        }
        if !unsafe { cublas_sys::is_culib_present() } {
            return Err("the cuBLAS library (libcublas.so) was not found; add its folder to LD_LIBRARY_PATH".into());
        }
        Ok(())
    }

    /// Context on device 0, its default stream, cuBLAS bound to that stream, every embedded module loaded.
    pub fn new() -> Result<Cuda> {
        Cuda::probe().map_err(Error::NoCuda)?;
        let ctx = CudaContext::new(0).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        // Buffers are raw pool offsets, not cudarc slices: no per-slice event tracking is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = cudarc::cublas::result::create_handle().map_err(|e| Error::cuda("cublasCreate", e))?;
        unsafe {
            cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _).map_err(|e| Error::cuda("cublasSetStream", e))?;
        }
        let mut functions = HashMap::new();
        for (module_name, bytes, names) in fatbins::FATBINS {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| Error::cuda(format!("loading module {module_name}"), e))?;
            for &f in names.iter() {
                let func = module.load_function(f).map_err(|e| Error::cuda(format!("loading kernel {f}"), e))?;
                functions.insert(f.to_string(), func);
            }
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let (free, total) = drv::mem_get_info().map_err(|e| Error::cuda("cuMemGetInfo", e))?;
        Ok(Cuda { ctx, stream, blas, functions, baseline_used: total - free, name })
    }

    pub fn function(&self, name: &str) -> Result<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| Error::cuda(name, "kernel not found in the embedded fatbins"))
    }

    /// Launches `name` over a 1-D grid of `n` threads (blocks of 256) with the given arguments.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                KArg::Ptr(p) => b.arg(p),
                KArg::I32(v) => b.arg(v),
                KArg::I64(v) => b.arg(v),
                KArg::F32(v) => b.arg(v),
            };
        }
        unsafe { b.launch(cfg) }.map_err(|e| Error::cuda(name, e))?;
        if cfg!(debug_assertions) || std::env::var_os("SNELLA_SYNC_LAUNCH").is_some() {
            self.sync().map_err(|e| Error::cuda(format!("{name} (after launch)"), e))?;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| Error::cuda("stream synchronize", e))
    }

    /// (free, total) device bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        drv::mem_get_info().map_err(|e| Error::cuda("cuMemGetInfo", e))
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| Error::cuda(format!("cuMemAlloc({bytes} B)"), e))
    }

    pub fn free(&self, p: DevPtr) {
        unsafe {
            let _ = drv::free_sync(p);
        }
    }

    pub fn upload<T>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(|e| Error::cuda("memcpy HtoD", e))?;
        self.sync()
    }

    pub fn download<T>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        self.sync()?;
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(|e| Error::cuda("memcpy DtoH", e))?;
        self.sync()
    }

    pub fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        unsafe { drv::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }.map_err(|e| Error::cuda("memset", e))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.blas);
        }
    }
}

/// A kernel argument: device pointers and scalars, matching the `extern "C"` signature in `cuda/*.cu`.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// A 1-D launch of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n as u32).div_ceil(block).max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row.
pub fn grid_rows(rows: usize, block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}
