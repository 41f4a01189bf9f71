//! The CUDA side of the runtime: one stream, the cuBLAS handle and the kernel modules, all created once, over
//! one of two drivers:
//!
//! - **a GPU**: CUDA is loaded at run time (cudarc's dynamic loading), so this file builds everywhere;
//!   `Cuda::probe` checks for the driver library before touching it, because cudarc panics without it;
//! - **the emulated device** (`emu/`): host memory, the kernels compiled for the host, sanitizer checks and
//!   cuBLAS on the CPU, for machines without a GPU.
//!
//! Everything above the driver is shared: the kernel table and the run-time check of every launch's argument
//! list against the kernel's C signature, the geometry limits, the launch counts, the memory arithmetic.
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaEvent, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};

use super::emu::{self, Emu};
use crate::error::{Error, Result};
use crate::runtime::GemmPrecision;

/// What a kernel parameter takes: the `KArg` variant of its C type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ArgKind {
    Ptr,
    I32,
    I64,
    F32,
}

/// One parameter of a kernel's `extern "C"` signature.
pub(crate) struct Param {
    /// The C type as written (e.g. `const float*`).
    #[allow(dead_code)] // read by the generated entry points and by tests
    pub(crate) ty: &'static str,
    pub(crate) name: &'static str,
    pub(crate) kind: ArgKind,
}

/// A kernel of `cuda/*.cu` (or a planted-bug kernel of `cuda/emu/`, compiled for the emulator only).
pub(crate) struct KernelSignature {
    pub(crate) name: &'static str,
    pub(crate) module: &'static str,
    pub(crate) planted: bool,
    pub(crate) params: &'static [Param],
}

/// The host-compiled entry point of a kernel: runs it as one CUDA thread on a cuLaunchKernel-style argument
/// array (one pointer to each argument's value).
pub(crate) type EmuEntry = unsafe extern "C" fn(*const *const c_void);

mod generated {
    use super::{ArgKind, EmuEntry, KernelSignature, Param};
    include!(concat!(env!("OUT_DIR"), "/fatbins.rs"));
}
pub use generated::KERNELS_COMPILED;
pub(crate) use generated::{EMU_UNAVAILABLE, KERNELS};

/// Launches per kernel (index into KERNELS) since the process started: `snella selftest` reports how many of
/// the kernels it launched.
static LAUNCHES: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// (name, launches) of every kernel of cuda/*.cu, in the order of the sources.
pub(crate) fn launch_counts() -> Vec<(&'static str, u64)> {
    KERNELS
        .iter()
        .enumerate()
        .filter(|(_, k)| !k.planted)
        .map(|(i, k)| (k.name, LAUNCHES[i].load(Ordering::Relaxed)))
        .collect()
}

/// A device address with the extent of the tensor it points into (bytes from `addr` to the tensor's end): the
/// emulator's memcheck holds every access of a kernel to it. `DevPtr::NULL` is the null pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevPtr {
    /// The address (CUdeviceptr; on the emulator, a host address).
    pub addr: u64,
    /// Bytes from `addr` to the end of its tensor.
    pub bytes: usize,
}

impl DevPtr {
    /// The null pointer (an optional output the kernel must not write).
    pub const NULL: DevPtr = DevPtr { addr: 0, bytes: 0 };
}

/// A kernel argument: device pointers and scalars, matching the `extern "C"` signature in `cuda/*.cu`.
#[derive(Clone, Copy, Debug)]
pub enum KArg {
    Ptr(DevPtr),
    I32(i32),
    I64(i64),
    F32(f32),
}

impl KArg {
    fn kind(&self) -> ArgKind {
        match self {
            KArg::Ptr(_) => ArgKind::Ptr,
            KArg::I32(_) => ArgKind::I32,
            KArg::I64(_) => ArgKind::I64,
            KArg::F32(_) => ArgKind::F32,
        }
    }
}

/// A point on the stream's timeline, for timing work on the device.
pub enum Event {
    /// A CUDA event recorded on the engine's stream.
    Gpu(CudaEvent),
    /// The emulator's stream is synchronous: the time the work before it ended.
    Emu(Instant),
}

/// sm_90's launch limits (threads per block, block and grid dimensions, shared memory without opting in).
pub(crate) const MAX_THREADS_PER_BLOCK: u64 = 1024;
pub(crate) const MAX_BLOCK_DIM: (u32, u32, u32) = (1024, 1024, 64);
pub(crate) const MAX_GRID_DIM: (u32, u32, u32) = (i32::MAX as u32, 65535, 65535);
pub(crate) const MAX_SHARED_BYTES: u32 = 48 << 10;

pub struct Cuda {
    driver: Driver,
    /// Device bytes in use once the context, cuBLAS (warmed up) and the modules are set up; pool memory is
    /// measured above it.
    baseline_used: usize,
    pub name: String,
}

enum Driver {
    Gpu(Gpu),
    Emu(Emu),
}

struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: BlasHandle,
    /// By kernel name; planted-bug kernels have none.
    functions: HashMap<&'static str, CudaFunction>,
}

/// The cuBLAS handle, destroyed on drop (also when the setup after it fails).
struct BlasHandle(cublas_sys::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: a handle made by cublasCreate, destroyed once.
        unsafe {
            let _ = cudarc::cublas::result::destroy_handle(self.0);
        }
    }
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
            return Err(missing_cublas_message(&pip_cublas_dirs()));
        }
        Ok(())
    }

    /// The name of device 0 (call after a successful [`Cuda::probe`]).
    pub fn device_name() -> std::result::Result<String, String> {
        let dev = drv::device::get(0).map_err(|e| format!("cuDeviceGet failed: {e}"))?;
        drv::device::get_name(dev).map_err(|e| format!("cuDeviceGetName failed: {e}"))
    }

    /// Context on device 0, its default stream, cuBLAS bound to that stream (warmed up), every module loaded.
    pub fn new() -> Result<Cuda> {
        Cuda::probe().map_err(Error::NoCuda)?;
        let ctx = CudaContext::new(0).map_err(|e| Error::cuda("cuCtxCreate", e))?;
        // Buffers are raw pool offsets, not cudarc slices: no per-slice event tracking is needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let blas = BlasHandle(cudarc::cublas::result::create_handle().map_err(|e| Error::cuda("cublasCreate", e))?);
        unsafe {
            cudarc::cublas::result::set_stream(blas.0, stream.cu_stream() as _)
                .map_err(|e| Error::cuda("cublasSetStream", e))?;
        }
        let mut functions = HashMap::new();
        for (module_name, bytes) in generated::FATBINS {
            let module = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| Error::cuda(format!("loading module {module_name}"), e))?;
            for k in KERNELS.iter().filter(|k| k.module == *module_name && !k.planted) {
                let func =
                    module.load_function(k.name).map_err(|e| Error::cuda(format!("loading kernel {}", k.name), e))?;
                functions.insert(k.name, func);
            }
        }
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        Cuda::ready(Driver::Gpu(Gpu { ctx, stream, blas, functions }), name)
    }

    /// The emulated device (`--device cuda-emu`) with `total` bytes of memory (None: `SNELLA_EMU_MEMORY`, else
    /// 80 GiB).
    pub fn emulated(total: Option<usize>) -> Result<Cuda> {
        let emu = Emu::new(total)?;
        Cuda::ready(Driver::Emu(emu), "emulated CUDA device (sm_90 limits, kernels on the host)".into())
    }

    /// Warms cuBLAS up, then reads the baseline: cuBLAS loads its kernels lazily at the first GEMM (and, without
    /// a workspace, allocates its own), which would otherwise count as the engine's memory and could fail the
    /// first step of a plan that just fit.
    fn ready(driver: Driver, name: String) -> Result<Cuda> {
        let mut c = Cuda { driver, baseline_used: 0, name };
        c.warm_up_blas()?;
        let (free, total) = c.mem_info()?;
        c.baseline_used = total - free;
        Ok(c)
    }

    /// One 1x1x1 GEMM per compute type on a scratch allocation. No workspace is set yet, so cuBLAS also
    /// allocates its default one now (the plan's workspace replaces it in `Runtime::new`; it stays in the
    /// baseline).
    fn warm_up_blas(&self) -> Result<()> {
        let p = self.alloc(256)?;
        let one = DevPtr { addr: p.addr, bytes: 4 };
        let c = DevPtr { addr: p.addr + 4, bytes: 4 };
        let result = [GemmPrecision::Fp32, GemmPrecision::Tf32, GemmPrecision::Bf16]
            .into_iter()
            .try_for_each(|compute| self.gemm(&Gemm::plain(1, 1, 1, one, one, c, compute)));
        let result = result.and_then(|()| self.sync());
        self.free(p);
        result
    }

    /// The emulated device under this Cuda, for tests of the failure paths.
    #[cfg(test)]
    pub(crate) fn emu(&self) -> &Emu {
        match &self.driver {
            Driver::Emu(e) => e,
            Driver::Gpu(_) => panic!("not the emulated device"),
        }
    }

    /// Whether this is the emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.driver, Driver::Emu(_))
    }

    /// Device bytes in use after setup (see the field).
    pub fn baseline_used(&self) -> usize {
        self.baseline_used
    }

    /// Makes this context current on the calling thread. cudarc binds it for launches and module loads;
    /// the raw driver calls below (alloc, copies, memset, mem info) and cuBLAS need it bound too, and a
    /// primary context is only current on the thread that created it. Cheap (cuCtxGetCurrent).
    pub fn bind(&self) -> Result<()> {
        match &self.driver {
            Driver::Gpu(g) => g.ctx.bind_to_thread().map_err(|e| Error::cuda("cuCtxSetCurrent", e)),
            Driver::Emu(_) => Ok(()),
        }
    }

    /// Launches kernel `name` with `cfg`; `args` must match its `extern "C"` signature in `cuda/*.cu`, which is
    /// checked here at run time (and for every call site by the test `every_launch_matches_its_kernel_signature`).
    /// An empty grid launches nothing (the driver rejects it); geometry beyond sm_90's limits is an error naming
    /// the kernel.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let Some(index) = KERNELS.iter().position(|k| k.name == name) else {
            return Err(Error::cuda(name, "launch check: no kernel of that name in cuda/*.cu"));
        };
        let kernel = &KERNELS[index];
        check_arguments(kernel, args)?;
        let (g, blk) = (cfg.grid_dim, cfg.block_dim);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Ok(());
        }
        check_geometry(name, cfg)?;
        LAUNCHES[index].fetch_add(1, Ordering::Relaxed);
        match &self.driver {
            Driver::Gpu(gpu) => {
                let f = gpu.functions.get(name).ok_or_else(|| {
                    Error::cuda(name, "not compiled for a GPU (a planted-bug kernel of the emulator)")
                })?;
                let mut b = gpu.stream.launch_builder(f);
                // The builder keeps pointers to the values: they point into `args`, which outlives the launch.
                for a in args {
                    match a {
                        KArg::Ptr(p) => b.arg(&p.addr),
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
            Driver::Emu(e) => {
                let entry = generated::EMU_ENTRIES[index];
                e.launch(kernel, entry, g, blk, cfg.shared_mem_bytes as usize, args)
            }
        }
    }

    pub fn sync(&self) -> Result<()> {
        match &self.driver {
            Driver::Gpu(g) => g.stream.synchronize().map_err(|e| Error::cuda("stream synchronize", e)),
            Driver::Emu(_) => Ok(()),
        }
    }

    /// (free, total) device bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        match &self.driver {
            Driver::Gpu(_) => {
                self.bind()?;
                drv::mem_get_info().map_err(|e| Error::cuda("cuMemGetInfo", e))
            }
            Driver::Emu(e) => Ok(e.mem_info()),
        }
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        match &self.driver {
            Driver::Gpu(_) => {
                self.bind()?;
                let addr = unsafe { drv::malloc_sync(bytes.max(1)) }
                    .map_err(|e| Error::cuda(format!("cuMemAlloc({bytes} B)"), e))?;
                Ok(DevPtr { addr, bytes })
            }
            Driver::Emu(e) => e.alloc(bytes),
        }
    }

    pub fn free(&self, p: DevPtr) {
        match &self.driver {
            Driver::Gpu(_) => {
                let _ = self.bind();
                unsafe {
                    let _ = drv::free_sync(p.addr);
                }
            }
            Driver::Emu(e) => e.free(p.addr),
        }
    }

    fn check_copy(what: &str, p: DevPtr, bytes: usize) -> Result<()> {
        if bytes > p.bytes {
            return Err(Error::cuda(what, format!("{bytes} B do not fit the {} B tensor at {:#x}", p.bytes, p.addr)));
        }
        Ok(())
    }

    pub fn upload<T: bytemuck::Pod>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        Cuda::check_copy("memcpy HtoD", dst, std::mem::size_of_val(src))?;
        match &self.driver {
            Driver::Gpu(g) => {
                self.bind()?;
                unsafe { drv::memcpy_htod_async(dst.addr, src, g.stream.cu_stream()) }
                    .map_err(|e| Error::cuda("memcpy HtoD", e))?;
                self.sync()
            }
            Driver::Emu(e) => e.upload(dst, bytemuck::cast_slice(src)),
        }
    }

    pub fn download<T: bytemuck::Pod>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        Cuda::check_copy("memcpy DtoH", src, std::mem::size_of_val(dst))?;
        match &self.driver {
            Driver::Gpu(g) => {
                self.bind()?;
                self.sync()?;
                unsafe { drv::memcpy_dtoh_async(dst, src.addr, g.stream.cu_stream()) }
                    .map_err(|e| Error::cuda("memcpy DtoH", e))?;
                self.sync()
            }
            Driver::Emu(e) => e.download(bytemuck::cast_slice_mut(dst), src),
        }
    }

    pub fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        Cuda::check_copy("memset", dst, bytes)?;
        match &self.driver {
            Driver::Gpu(g) => {
                self.bind()?;
                unsafe { drv::memset_d8_async(dst.addr, byte, bytes, g.stream.cu_stream()) }
                    .map_err(|e| Error::cuda("memset", e))
            }
            Driver::Emu(e) => e.memset(dst, byte, bytes),
        }
    }

    /// cublasSetWorkspace: cuBLAS works in this memory instead of allocating its own.
    pub(crate) fn set_blas_workspace(&self, ws: DevPtr) -> Result<()> {
        match &self.driver {
            Driver::Gpu(g) => {
                self.bind()?;
                let st = unsafe { cublas_sys::cublasSetWorkspace_v2(g.blas.0, ws.addr as *mut _, ws.bytes) };
                if st != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    return Err(Error::cuda("cublasSetWorkspace", format!("{st:?}")));
                }
                Ok(())
            }
            Driver::Emu(e) => emu::blas::set_workspace(e, ws).map_err(|m| Error::cuda("cublasSetWorkspace", m)),
        }
    }

    /// cublasGemmStridedBatchedEx with fp32 A, B, C (column-major; see [`Gemm`]).
    pub(crate) fn gemm(&self, g: &Gemm) -> Result<()> {
        let what = || {
            format!(
                "cublasGemmStridedBatchedEx m {} n {} k {} batch {} ({}{})",
                g.m,
                g.n,
                g.k,
                g.batch,
                if g.transa { 'T' } else { 'N' },
                if g.transb { 'T' } else { 'N' }
            )
        };
        match &self.driver {
            Driver::Gpu(gpu) => {
                use cublas_sys as cb;
                // cuBLAS runs in the context current on this thread.
                self.bind()?;
                let op =
                    |t: bool| if t { cb::cublasOperation_t::CUBLAS_OP_T } else { cb::cublasOperation_t::CUBLAS_OP_N };
                let compute = match g.compute {
                    GemmPrecision::Fp32 => cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    GemmPrecision::Tf32 => cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
                    GemmPrecision::Bf16 => cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
                };
                let f32t = cb::cudaDataType_t::CUDA_R_32F;
                let status = unsafe {
                    cb::cublasGemmStridedBatchedEx(
                        gpu.blas.0,
                        op(g.transa),
                        op(g.transb),
                        g.m,
                        g.n,
                        g.k,
                        &g.alpha as *const f32 as *const _,
                        g.a.addr as *const _,
                        f32t,
                        g.lda,
                        g.stride_a,
                        g.b.addr as *const _,
                        f32t,
                        g.ldb,
                        g.stride_b,
                        &g.beta as *const f32 as *const _,
                        g.c.addr as *mut _,
                        f32t,
                        g.ldc,
                        g.stride_c,
                        g.batch,
                        compute,
                        cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                    )
                };
                if status != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                    return Err(Error::cuda(what(), format!("{status:?}")));
                }
                if cfg!(debug_assertions) {
                    self.sync()?;
                }
                Ok(())
            }
            Driver::Emu(e) => emu::blas::gemm_strided_batched(e, g).map_err(|m| Error::cuda(what(), m)),
        }
    }

    /// Records an event on the stream.
    pub fn record_event(&self) -> Result<Event> {
        match &self.driver {
            Driver::Gpu(g) => g
                .stream
                .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map(Event::Gpu)
                .map_err(|e| Error::cuda("cuEventRecord", e)),
            Driver::Emu(_) => Ok(Event::Emu(Instant::now())),
        }
    }

    /// Milliseconds between two events of this stream (waits for the later one).
    pub fn elapsed_ms(&self, start: &Event, end: &Event) -> Result<f64> {
        match (start, end) {
            (Event::Gpu(s), Event::Gpu(e)) => {
                s.elapsed_ms(e).map(|ms| ms as f64).map_err(|e| Error::cuda("cuEventElapsedTime", e))
            }
            (Event::Emu(s), Event::Emu(e)) => Ok(e.duration_since(*s).as_secs_f64() * 1e3),
            _ => Err(Error::cuda("cuEventElapsedTime", "events of different devices")),
        }
    }
}

pub(crate) use emu::blas::Gemm;

/// The run-time half of the signature check: count, order and kind of the arguments.
fn check_arguments(k: &KernelSignature, args: &[KArg]) -> Result<()> {
    let want: Vec<ArgKind> = k.params.iter().map(|p| p.kind).collect();
    let got: Vec<ArgKind> = args.iter().map(KArg::kind).collect();
    if want != got {
        let sig: Vec<String> = k.params.iter().map(|p| format!("{} {}", p.ty, p.name)).collect();
        return Err(Error::cuda(
            k.name,
            format!("launch check: arguments {got:?} do not match the kernel's signature ({})", sig.join(", ")),
        ));
    }
    Ok(())
}

/// Block and grid dimensions and shared memory within sm_90's limits.
fn check_geometry(name: &str, cfg: LaunchConfig) -> Result<()> {
    let (g, b) = (cfg.grid_dim, cfg.block_dim);
    let threads = b.0 as u64 * b.1 as u64 * b.2 as u64;
    if threads == 0
        || threads > MAX_THREADS_PER_BLOCK
        || b.0 > MAX_BLOCK_DIM.0
        || b.1 > MAX_BLOCK_DIM.1
        || b.2 > MAX_BLOCK_DIM.2
        || g.0 > MAX_GRID_DIM.0
        || g.1 > MAX_GRID_DIM.1
        || g.2 > MAX_GRID_DIM.2
        || cfg.shared_mem_bytes > MAX_SHARED_BYTES
    {
        // 48 KiB: more dynamic shared memory needs cuFuncSetAttribute, which no kernel here uses.
        return Err(Error::cuda(
            name,
            format!(
                "launch check: beyond sm_90's limits: grid {g:?}, block {b:?} ({threads} threads; at most \
                 {MAX_THREADS_PER_BLOCK}), {} B dynamic shared memory (at most {MAX_SHARED_BYTES})",
                cfg.shared_mem_bytes
            ),
        ));
    }
    Ok(())
}

/// Folders of pip's nvidia-cublas wheels (`.../site-packages/nvidia/cublas/lib` or `nvidia/cu13/lib`) that hold a
/// libcublas, where python installs usually put them.
fn pip_cublas_dirs() -> Vec<std::path::PathBuf> {
    let mut roots: Vec<std::path::PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(v.into());
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        let home = std::path::PathBuf::from(home);
        roots.push(home.join(".local"));
        if let Ok(rd) = std::fs::read_dir(home.join(".pyenv/versions")) {
            roots.extend(rd.flatten().map(|e| e.path()));
        }
    }
    roots.extend(["/usr", "/usr/local", "/opt/conda"].map(std::path::PathBuf::from));
    find_pip_cublas(&roots)
}

/// The folders under `<root>/lib/python3*/{site,dist}-packages/nvidia/{cublas,cu13,cu12}/lib` that hold a
/// libcublas.so*.
pub(crate) fn find_pip_cublas(roots: &[std::path::PathBuf]) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for root in roots {
        let Ok(libs) = std::fs::read_dir(root.join("lib")) else { continue };
        for py in libs.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("python3")) {
            for pk in ["site-packages", "dist-packages"] {
                for sub in ["cublas/lib", "cu13/lib", "cu12/lib"] {
                    let dir = py.path().join(pk).join("nvidia").join(sub);
                    let has = std::fs::read_dir(&dir)
                        .map(|rd| rd.flatten().any(|e| e.file_name().to_string_lossy().starts_with("libcublas.so")))
                        .unwrap_or(false);
                    if has {
                        found.push(dir);
                    }
                }
            }
        }
    }
    found
}

/// What to say when the driver is there but cuBLAS is not on the loader path.
pub(crate) fn missing_cublas_message(pip_dirs: &[std::path::PathBuf]) -> String {
    match pip_dirs.first() {
        Some(d) => format!(
            "the cuBLAS library (libcublas.so) is not on the loader path, but a pip wheel has it in {}; run with \
             LD_LIBRARY_PATH={}:$LD_LIBRARY_PATH (or --device cuda-emu to use the emulated device)",
            d.display(),
            d.display()
        ),
        None => "the cuBLAS library (libcublas.so) was not found; install it (e.g. pip install nvidia-cublas) and add \
                 its folder to LD_LIBRARY_PATH"
            .into(),
    }
}

/// A 1-D launch of `n` threads in blocks of `block` (at least one block: the kernels bound-check, so
/// n = 0 runs nothing).
pub fn grid_1d(n: usize, block: u32) -> LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1);
    assert!(blocks <= i32::MAX as usize, "grid_1d: {n} threads exceed the grid");
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row (rows = 0 launches nothing, see [`Cuda::launch`]).
pub fn grid_rows(rows: usize, block: u32, shared_mem_bytes: u32) -> LaunchConfig {
    assert!(rows <= i32::MAX as usize, "grid_rows: {rows} rows exceed the grid");
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes }
}

#[cfg(test)]
mod tests {
    //! Every `launch("snella_x", cfg, &[KArg::..])` in src/ against the `extern "C"` signature of snella_x in
    //! cuda/*.cu: count, order and kind of each argument (a wrong one silently shifts every later argument).
    //! Runs without a GPU or nvcc: it reads the sources.
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::super::source_text::{inside_parens, split_top, strip_comments};

    /// kernel name -> KArg kinds of its parameters, from the signatures build.rs read from cuda/*.cu.
    fn kernel_signatures() -> BTreeMap<String, Vec<&'static str>> {
        let kind = |k: super::ArgKind| match k {
            super::ArgKind::Ptr => "Ptr",
            super::ArgKind::I32 => "I32",
            super::ArgKind::I64 => "I64",
            super::ArgKind::F32 => "F32",
        };
        let mut sigs = BTreeMap::new();
        for k in super::KERNELS.iter().filter(|k| !k.planted) {
            assert!(
                sigs.insert(k.name.to_string(), k.params.iter().map(|p| kind(p.kind)).collect()).is_none(),
                "kernel {} defined twice",
                k.name
            );
        }
        sigs
    }

    fn rust_sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                rust_sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    #[test]
    fn every_launch_matches_its_kernel_signature() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let sigs = kernel_signatures();
        assert!(sigs.len() >= 30, "found only {} kernels in cuda/*.cu", sigs.len());
        let mut files = Vec::new();
        rust_sources(&root.join("src"), &mut files);
        let (mut launched, mut errors) = (BTreeMap::<String, usize>::new(), Vec::new());
        for file in &files {
            if file.strip_prefix(root.join("src/runtime")).is_ok() {
                continue; // the definition of launch, the emulator, and the planted-bug launcher (its test names the kernels)
            }
            let src = strip_comments(&std::fs::read_to_string(file).unwrap());
            let rel = file.strip_prefix(root).unwrap().display().to_string();
            let mut at = 0;
            while let Some(i) = src[at..].find(".launch(") {
                let open = at + i + ".launch".len();
                at = open;
                let parts = split_top(inside_parens(&src, open));
                let Some(name) = parts.first().and_then(|p| p.strip_prefix('"')).and_then(|p| p.strip_suffix('"'))
                else {
                    errors.push(format!("{rel}: a launch whose kernel name is not a string literal: {parts:?}"));
                    continue;
                };
                *launched.entry(name.to_string()).or_default() += 1;
                let Some(want) = sigs.get(name) else {
                    errors.push(format!("{rel}: {name} is not a kernel of cuda/*.cu"));
                    continue;
                };
                let list = parts.get(2).map(|s| s.as_str()).unwrap_or("");
                let Some(items) = list.strip_prefix("&[").and_then(|l| l.strip_suffix(']')) else {
                    errors.push(format!(
                        "{rel}: {name}: the arguments must be a literal `&[KArg::..(..), ..]`, got `{list}`"
                    ));
                    continue;
                };
                let got: Vec<String> = split_top(items)
                    .iter()
                    .map(|a| {
                        ["Ptr", "I32", "I64", "F32"]
                            .into_iter()
                            .find(|k| a.starts_with(&format!("KArg::{k}(")))
                            .map_or_else(|| format!("`{a}` (not KArg::..(..))"), |k| k.to_string())
                    })
                    .collect();
                if got.len() != want.len() || got.iter().zip(want).any(|(g, w)| g != w) {
                    errors.push(format!("{rel}: {name}: launched with {got:?}, the kernel takes {want:?}"));
                }
            }
        }
        for name in sigs.keys() {
            if !launched.contains_key(name) {
                errors.push(format!("kernel {name} is never launched from src/"));
            }
        }
        assert!(errors.is_empty(), "kernel launches that do not match cuda/*.cu:\n{}", errors.join("\n"));
    }

    #[test]
    fn call_site_parser_splits_and_strips() {
        assert_eq!(split_top("a, f(b, c), [d, e], \"x,y\""), vec!["a", "f(b, c)", "[d, e]", "\"x,y\""]);
        assert_eq!(strip_comments("a // b\nc \"//\" d"), "a \nc \"//\" d");
    }

    #[test]
    fn pip_wheels_of_cublas_are_found_and_named() {
        let root = std::env::temp_dir().join(format!("snella-pip-{}", std::process::id()));
        let lib = root.join("lib/python3.11/site-packages/nvidia/cublas/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join("libcublas.so.13"), b"").unwrap();
        let found = super::find_pip_cublas(std::slice::from_ref(&root));
        assert_eq!(found, vec![lib.clone()]);
        let msg = super::missing_cublas_message(&found);
        assert!(msg.contains(&format!("LD_LIBRARY_PATH={}", lib.display())), "{msg}");
        assert!(super::missing_cublas_message(&[]).contains("not found"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
