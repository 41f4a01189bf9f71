//! The CUDA side of the runtime: context, one stream, the cuBLAS handle and the kernel modules, all
//! created once. CUDA is loaded at run time (cudarc's dynamic loading), so this file builds everywhere;
//! `Cuda::probe` checks for the driver library before touching it, because cudarc panics without it.
use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::sys as cublas_sys;
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg,
};

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

    /// The name of device 0 (call after a successful [`Cuda::probe`]).
    pub fn device_name() -> std::result::Result<String, String> {
        let dev = drv::device::get(0).map_err(|e| format!("cuDeviceGet failed: {e}"))?;
        drv::device::get_name(dev).map_err(|e| format!("cuDeviceGetName failed: {e}"))
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
            cudarc::cublas::result::set_stream(blas, stream.cu_stream() as _)
                .map_err(|e| Error::cuda("cublasSetStream", e))?;
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

    /// Makes this context current on the calling thread. cudarc binds it for launches and module loads;
    /// the raw driver calls below (alloc, copies, memset, mem info) and cuBLAS need it bound too, and a
    /// primary context is only current on the thread that created it. Cheap (cuCtxGetCurrent).
    pub fn bind(&self) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| Error::cuda("cuCtxSetCurrent", e))
    }

    /// Launches kernel `name` with `cfg`; `args` must match its `extern "C"` signature in `cuda/*.cu` (the
    /// test `every_launch_matches_its_kernel_signature` checks every call site). An empty grid launches
    /// nothing (the driver rejects it); geometry beyond the device limits is an error naming the kernel.
    pub fn launch(&self, name: &str, cfg: LaunchConfig, args: &[KArg]) -> Result<()> {
        let (g, blk) = (cfg.grid_dim, cfg.block_dim);
        if g.0 == 0 || g.1 == 0 || g.2 == 0 {
            return Ok(());
        }
        let threads = blk.0 as u64 * blk.1 as u64 * blk.2 as u64;
        // 48 KiB: more dynamic shared memory needs cuFuncSetAttribute, which no kernel here uses.
        if threads == 0
            || threads > 1024
            || g.0 > i32::MAX as u32
            || g.1 > 65535
            || g.2 > 65535
            || cfg.shared_mem_bytes > 48 << 10
        {
            return Err(Error::cuda(
                name,
                format!(
                    "launch out of the device limits: grid {g:?}, block {blk:?}, {} B dynamic shared memory",
                    cfg.shared_mem_bytes
                ),
            ));
        }
        let f = self.function(name)?;
        let mut b = self.stream.launch_builder(f);
        // The builder keeps pointers to the values: they point into `args`, which outlives the launch.
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
        self.bind()?;
        drv::mem_get_info().map_err(|e| Error::cuda("cuMemGetInfo", e))
    }

    pub fn alloc(&self, bytes: usize) -> Result<DevPtr> {
        self.bind()?;
        unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| Error::cuda(format!("cuMemAlloc({bytes} B)"), e))
    }

    pub fn free(&self, p: DevPtr) {
        let _ = self.bind();
        unsafe {
            let _ = drv::free_sync(p);
        }
    }

    pub fn upload<T>(&self, dst: DevPtr, src: &[T]) -> Result<()> {
        self.bind()?;
        unsafe { drv::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memcpy HtoD", e))?;
        self.sync()
    }

    pub fn download<T>(&self, dst: &mut [T], src: DevPtr) -> Result<()> {
        self.bind()?;
        self.sync()?;
        unsafe { drv::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| Error::cuda("memcpy DtoH", e))?;
        self.sync()
    }

    pub fn memset(&self, dst: DevPtr, byte: u8, bytes: usize) -> Result<()> {
        self.bind()?;
        unsafe { drv::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }.map_err(|e| Error::cuda("memset", e))
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        let _ = self.bind(); // cublasDestroy synchronises the device of the current context
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

    /// The KArg variant a C parameter type takes: any pointer is Ptr, `int`/`unsigned` I32, `long` I64.
    fn kind_of_c_type(ty: &str) -> Option<&'static str> {
        if ty.contains('*') {
            return Some("Ptr");
        }
        let words: Vec<&str> = ty.split_whitespace().filter(|w| *w != "const").collect();
        match words.join(" ").as_str() {
            "int" | "unsigned" | "unsigned int" | "int32_t" | "uint32_t" => Some("I32"),
            "long" | "long long" | "long int" | "unsigned long" | "int64_t" | "uint64_t" | "size_t" => Some("I64"),
            "float" => Some("F32"),
            _ => None,
        }
    }

    /// Text with `//` comments blanked out (string literals kept, so "a//b" survives).
    fn strip_comments(src: &str) -> String {
        let mut out = String::with_capacity(src.len());
        let (mut in_str, mut chars) = (false, src.chars().peekable());
        while let Some(c) = chars.next() {
            if in_str {
                out.push(c);
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else if c == '"' {
                    in_str = false;
                }
            } else if c == '"' {
                in_str = true;
                out.push(c);
            } else if c == '/' && chars.peek() == Some(&'/') {
                for n in chars.by_ref() {
                    if n == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    }

    /// `s` split at the commas that are outside any (), [], {} and string literal.
    fn split_top(s: &str) -> Vec<String> {
        let (mut parts, mut cur, mut depth, mut in_str) = (Vec::new(), String::new(), 0i32, false);
        for c in s.chars() {
            match c {
                '"' => in_str = !in_str,
                '(' | '[' | '{' if !in_str => depth += 1,
                ')' | ']' | '}' if !in_str => depth -= 1,
                ',' if !in_str && depth == 0 => {
                    parts.push(std::mem::take(&mut cur).trim().to_string());
                    continue;
                }
                _ => {}
            }
            cur.push(c);
        }
        if !cur.trim().is_empty() {
            parts.push(cur.trim().to_string());
        }
        parts
    }

    /// The text between the parenthesis at `open` and its match.
    fn inside_parens(s: &str, open: usize) -> &str {
        let (mut depth, mut in_str) = (0, false);
        for (i, c) in s[open..].char_indices() {
            match c {
                '"' => in_str = !in_str,
                '(' if !in_str => depth += 1,
                ')' if !in_str => {
                    depth -= 1;
                    if depth == 0 {
                        return &s[open + 1..open + i];
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced parentheses after byte {open}")
    }

    /// kernel name -> KArg kinds of its parameters, from every `extern "C" __global__` of cuda/*.cu.
    fn kernel_signatures(root: &Path) -> BTreeMap<String, Vec<&'static str>> {
        let mut sigs = BTreeMap::new();
        for e in std::fs::read_dir(root.join("cuda")).unwrap().flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "cu") {
                continue;
            }
            let src = strip_comments(&std::fs::read_to_string(&path).unwrap());
            let mut at = 0;
            while let Some(i) = src[at..].find("__global__") {
                let start = at + i;
                let open = start + src[start..].find('(').unwrap();
                let name = src[start..open].split_whitespace().last().unwrap().to_string();
                let params = inside_parens(&src, open);
                let kinds = split_top(params)
                    .iter()
                    .map(|p| {
                        // The type is everything before the parameter name (the last identifier).
                        let name_at = p.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
                        kind_of_c_type(&p[..name_at]).unwrap_or_else(|| {
                            panic!("{}: {name}: parameter type of `{p}` has no KArg", path.display())
                        })
                    })
                    .collect();
                assert!(sigs.insert(name.clone(), kinds).is_none(), "kernel {name} defined twice");
                at = open;
            }
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
        let sigs = kernel_signatures(root);
        assert!(sigs.len() >= 30, "found only {} kernels in cuda/*.cu", sigs.len());
        let mut files = Vec::new();
        rust_sources(&root.join("src"), &mut files);
        let (mut launched, mut errors) = (BTreeMap::<String, usize>::new(), Vec::new());
        for file in &files {
            if file.ends_with("runtime/cuda.rs") {
                continue; // the definition of launch and cudarc's builder launch
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
    fn signature_parser_reads_types() {
        assert_eq!(kind_of_c_type("const float* "), Some("Ptr"));
        assert_eq!(kind_of_c_type("const unsigned char*"), Some("Ptr"));
        assert_eq!(kind_of_c_type("unsigned "), Some("I32"));
        assert_eq!(kind_of_c_type("long "), Some("I64"));
        assert_eq!(kind_of_c_type("float "), Some("F32"));
        assert_eq!(kind_of_c_type("double "), None);
        assert_eq!(split_top("a, f(b, c), [d, e], \"x,y\""), vec!["a", "f(b, c)", "[d, e]", "\"x,y\""]);
        assert_eq!(strip_comments("a // b\nc \"//\" d"), "a \nc \"//\" d");
    }
}
