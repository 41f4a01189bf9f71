//! Builds the CUDA kernels twice, from the same `cuda/*.cu` sources:
//!
//! 1. **For a GPU**: nvcc compiles every `cuda/*.cu` into a fatbin that the binary embeds. nvcc is looked up as
//!    `$NVCC`, then `$CUDA_HOME/bin/nvcc`, then `nvcc` on `PATH`, then the copy that `scripts/install-nvcc.sh`
//!    puts in `.tools/nvcc`. Without nvcc the build still succeeds (one cargo warning) and the CUDA kernels are
//!    marked unavailable at run time; a kernel that fails to compile fails the build with nvcc's message.
//!    `SNELLA_CUDA_ARCHS` (default `90`) lists the SM versions: machine code for each, plus PTX of the last one
//!    so newer cards can JIT it. `--fmad=false`: every product and sum is rounded on its own, as the source
//!    and the CPU twin say, so the arithmetic kernels agree with the CPU to the bit (libdevice's exp, erf, tanh
//!    still differ from the host's by an ulp or two).
//! 2. **For the emulated CUDA device** (`--device cuda-emu`, `src/runtime/emu`): the host C++ compiler (the
//!    `cc` crate, g++) compiles every `cuda/*.cu`, and the test-only kernels of `cuda/emu/planted_bugs.cu`,
//!    against `cuda/emu/cuda_emu.h`, which provides the CUDA built-ins. The objects are instrumented with
//!    `-fsanitize=thread`: every load and store calls `__tsan_readN`/`__tsan_writeN`, which the emulator
//!    implements itself (as the Linux kernel's KCSAN does) to check each access. No nvcc is needed.
//!
//! `SNELLA_NO_NVCC` / `SNELLA_NO_EMU` skip one compile (the fuzz build, which runs on the CPU, skips both).
//!
//! Both builds read the kernels' `extern "C" __global__` signatures from the sources; the generated
//! `fatbins.rs` lists them, so every launch's argument list is checked against the C signature at run time.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

// Shared with the crate's test of the launch sites.
#[allow(dead_code)]
#[path = "src/runtime/source_text.rs"]
mod source_text;
use source_text::strip_comments;

/// Where `scripts/install-nvcc.sh` installs nvcc, relative to the repository root.
const TOOLS_NVCC: &str = ".tools/nvcc/nvidia/cu13/bin/nvcc";

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        let p = Path::new(&home).join("bin/nvcc");
        if p.exists() {
            return Some(p);
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let p = dir.join("nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = root.join(TOOLS_NVCC);
    p.exists().then_some(p)
}

/// One parameter of a kernel's C signature.
struct Param {
    /// The C type as written, without top-level `const` on scalars (e.g. `const float*`, `long`).
    ty: String,
    name: String,
    /// The `KArg` variant it takes: Ptr, I32, I64, F32.
    kind: &'static str,
}

struct Kernel {
    name: String,
    module: String,
    params: Vec<Param>,
    /// Test-only kernels with planted bugs (`cuda/emu/`): compiled for the emulator only.
    planted: bool,
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let cuda_dir = root.join("cuda");
    let emu_dir = cuda_dir.join("emu");
    println!("cargo:rerun-if-changed=cuda");
    println!("cargo:rerun-if-changed=src/runtime/source_text.rs");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=PATH");
    println!("cargo:rerun-if-env-changed=SNELLA_CUDA_ARCHS");
    println!("cargo:rerun-if-env-changed=SNELLA_NO_EMU");
    println!("cargo:rerun-if-env-changed=SNELLA_NO_NVCC");

    let sources = cu_files(&cuda_dir);
    let planted_sources = cu_files(&emu_dir);
    for p in sources.iter().chain(&planted_sources) {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    for p in [cuda_dir.join("common.cuh"), emu_dir.join("cuda_emu.h")] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let mut kernels = Vec::new();
    for (src, planted) in sources.iter().map(|s| (s, false)).chain(planted_sources.iter().map(|s| (s, true))) {
        let text = fs::read_to_string(src).unwrap();
        let module = src.file_stem().unwrap().to_string_lossy().to_string();
        for (name, params) in kernel_signatures(&text, src) {
            kernels.push(Kernel { name, module: module.clone(), params, planted });
        }
    }

    // SNELLA_NO_NVCC: a build that runs only on the CPU (the fuzz targets) skips the nvcc compile.
    let nvcc = if env::var_os("SNELLA_NO_NVCC").is_some() { None } else { find_nvcc(&root) };
    // Rerun when scripts/install-nvcc.sh puts nvcc into .tools (a build made before it has no kernels).
    // Cargo reruns a build script on every build while a watched path is missing, so the folder is watched
    // (it is in the repository, with a README); its contents change when nvcc arrives.
    let tools = root.join(".tools");
    if !tools.is_dir() {
        let _ = fs::create_dir_all(&tools); // deleted by hand: one extra rebuild, then quiet again
    }
    println!("cargo:rerun-if-changed={}", tools.display());
    let fatbins = match &nvcc {
        Some(nvcc) => sources.iter().map(|src| compile_fatbin(nvcc, &cuda_dir, &out, src)).collect(),
        None => {
            println!(
                "cargo:warning=nvcc not found ($NVCC, $CUDA_HOME/bin, PATH, .tools/nvcc): building without CUDA \
                 kernels for a GPU (run scripts/install-nvcc.sh to get nvcc 13.0); the emulated device still works"
            );
            Vec::new()
        }
    };
    let emu = if env::var_os("SNELLA_NO_EMU").is_some() {
        Err("built with SNELLA_NO_EMU set".to_string())
    } else {
        compile_emulated(&root, &cuda_dir, &out, &sources, &planted_sources, &kernels)
    };
    if let Err(why) = &emu {
        println!("cargo:warning=the emulated CUDA device is not available: {why}");
    }
    fs::write(out.join("fatbins.rs"), generated_rust(nvcc.is_some(), &fatbins, &kernels, &emu)).unwrap();
}

/// The `.cu` files of a folder, sorted.
fn cu_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> =
        fs::read_dir(dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    v.sort();
    v
}

/// (module stem, fatbin path) of one nvcc compile.
fn compile_fatbin(nvcc: &Path, cuda_dir: &Path, out: &Path, src: &Path) -> (String, PathBuf) {
    let archs = env::var("SNELLA_CUDA_ARCHS").unwrap_or_else(|_| "90".into());
    let archs: Vec<&str> = archs.split([',', ' ', ';']).filter(|s| !s.is_empty()).collect();
    let stem = src.file_stem().unwrap().to_string_lossy().to_string();
    let fatbin = out.join(format!("{stem}.fatbin"));
    let mut cmd = Command::new(nvcc);
    // No --use_fast_math: erff, expf and sqrtf must stay accurate for parity with the CPU. No FMA contraction:
    // the kernels round each product as written (see the file docs).
    cmd.arg("-fatbin").arg("-O3").arg("-std=c++17").arg("--fmad=false");
    cmd.arg("-I").arg(cuda_dir);
    for a in &archs {
        cmd.arg("-gencode").arg(format!("arch=compute_{a},code=sm_{a}"));
    }
    let last = archs.last().copied().unwrap_or("90");
    cmd.arg("-gencode").arg(format!("arch=compute_{last},code=compute_{last}"));
    cmd.arg("-o").arg(&fatbin).arg(src);
    let res = cmd.output().unwrap_or_else(|e| panic!("cannot run nvcc at {}: {e}", nvcc.display()));
    if !res.status.success() {
        panic!(
            "nvcc failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
    }
    (stem, fatbin)
}

/// Compiles the kernels for the host into the static library `snella_emu_kernels`: each `.cu` is included by
/// a generated `.cpp` that adds one entry point per kernel, `snella_emu_entry_<kernel>(void* const* args)`,
/// which unpacks a cuLaunchKernel-style argument array and calls the kernel as one CUDA thread.
fn compile_emulated(
    root: &Path,
    cuda_dir: &Path,
    out: &Path,
    sources: &[PathBuf],
    planted: &[PathBuf],
    kernels: &[Kernel],
) -> Result<(), String> {
    let target =
        (env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default(), env::var("CARGO_CFG_TARGET_OS").unwrap_or_default());
    if target != ("x86_64".to_string(), "linux".to_string()) {
        return Err(format!("its fibers are written for x86-64 Linux, not {} {}", target.0, target.1));
    }
    let gen_dir = out.join("emu");
    fs::create_dir_all(&gen_dir).map_err(|e| e.to_string())?;
    let mut units = Vec::new();
    for src in sources.iter().chain(planted) {
        let module = src.file_stem().unwrap().to_string_lossy().to_string();
        let mut cpp = format!(
            "// Generated by build.rs: {} compiled for the emulated CUDA device.\n#include \"{}\"\n\n",
            src.strip_prefix(root).unwrap_or(src).display(),
            src.display()
        );
        for k in kernels.iter().filter(|k| k.module == module) {
            // The entry reads the argument array that Rust owns: not instrumented (the kernel's own accesses are).
            cpp.push_str(&format!(
                "extern \"C\" __attribute__((no_sanitize_thread)) void snella_emu_entry_{}(void* const* a) {{\n    {}(",
                k.name, k.name
            ));
            let args: Vec<String> = k
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    if p.kind == "Ptr" {
                        format!("({})(uintptr_t)(*(const unsigned long long*)a[{i}])", p.ty)
                    } else {
                        format!("*(const {}*)a[{i}]", p.ty)
                    }
                })
                .collect();
            cpp.push_str(&args.join(", "));
            cpp.push_str(");\n}\n");
        }
        let unit = gen_dir.join(format!("{module}.cpp"));
        // Rewrite only when changed, so cc's outputs stay fresh across reruns of this script.
        if fs::read_to_string(&unit).ok().as_deref() != Some(cpp.as_str()) {
            fs::write(&unit, cpp).map_err(|e| e.to_string())?;
        }
        units.push(unit);
    }
    // cc recompiles every unit on each run of this script, which reruns on every build while nvcc is missing
    // (see main): skip the compile when the sources, the header and this script are what the library was built from.
    let mut stamp = String::new();
    for f in units.iter().chain(sources).chain(planted) {
        stamp.push_str(&fs::read_to_string(f).unwrap_or_default());
    }
    for f in [cuda_dir.join("common.cuh"), cuda_dir.join("emu/cuda_emu.h"), root.join("build.rs")] {
        stamp.push_str(&fs::read_to_string(f).unwrap_or_default());
    }
    let stamp = format!("{:016x}", fnv1a(stamp.as_bytes()));
    let stamp_file = gen_dir.join("stamp");
    if out.join("libsnella_emu_kernels.a").exists() && fs::read_to_string(&stamp_file).ok() == Some(stamp.clone()) {
        println!("cargo:rustc-link-search=native={}", out.display());
        println!("cargo:rustc-link-lib=static=snella_emu_kernels");
        return Ok(());
    }
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .cpp_link_stdlib(None) // no exceptions, RTTI or allocation: libstdc++ is not needed
        .opt_level(2)
        .debug(false)
        .include(cuda_dir)
        .define("SNELLA_EMU", None)
        .flag("-std=c++17")
        // Every memory access of a kernel goes through the emulator's checks (src/runtime/emu/sanitizer.rs).
        .flag("-fsanitize=thread")
        .flag("--param=tsan-instrument-func-entry-exit=0")
        // IEEE single precision, each operation rounded as written: no contraction into FMA, no fast math.
        .flag("-ffp-contract=off")
        .flag("-fno-fast-math")
        .flag("-fno-exceptions")
        .flag("-fno-rtti")
        .flag("-Wno-unknown-pragmas") // #pragma unroll is nvcc's
        .files(&units);
    // No usable C++ compiler on this machine: the build goes on without the emulator (one warning). A kernel
    // that the compiler rejects is a bug in cuda/: the build fails, as it does for nvcc.
    let compiler = build.get_compiler();
    let runs = Command::new(compiler.path()).arg("--version").output().is_ok_and(|o| o.status.success());
    if !runs {
        return Err(format!("no usable host C++ compiler ({}); install g++", compiler.path().display()));
    }
    if let Err(e) = build.try_compile("snella_emu_kernels") {
        panic!("the host C++ compile of the kernels for the emulated device failed (the compiler's messages are above): {e}");
    }
    fs::write(&stamp_file, stamp).map_err(|e| e.to_string())
}

/// FNV-1a, 64 bits: a change detector for the stamp, not a cryptographic hash.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn generated_rust(nvcc: bool, fatbins: &[(String, PathBuf)], kernels: &[Kernel], emu: &Result<(), String>) -> String {
    let mut code =
        String::from("// Generated by build.rs: the kernels of cuda/*.cu, for a GPU and for the emulator.\n");
    code.push_str(&format!("pub const KERNELS_COMPILED: bool = {nvcc};\n"));
    code.push_str("/// (module, nvcc fatbin) of every cuda/*.cu.\npub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, path) in fatbins {
        code.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", path.display().to_string()));
    }
    code.push_str("];\n");
    code.push_str("/// Every `extern \"C\" __global__` of cuda/*.cu (and the emulator's planted-bug kernels).\n");
    code.push_str("pub const KERNELS: &[KernelSignature] = &[\n");
    for k in kernels {
        let params: Vec<String> = k
            .params
            .iter()
            .map(|p| format!("Param {{ ty: {:?}, name: {:?}, kind: ArgKind::{} }}", p.ty, p.name, p.kind))
            .collect();
        code.push_str(&format!(
            "    KernelSignature {{ name: {:?}, module: {:?}, planted: {}, params: &[{}] }},\n",
            k.name,
            k.module,
            k.planted,
            params.join(", ")
        ));
    }
    code.push_str("];\n");
    match emu {
        Ok(()) => {
            code.push_str("pub const EMU_UNAVAILABLE: Option<&str> = None;\n");
            code.push_str("/// The host-compiled entry point of each kernel, in the order of `KERNELS`.\n");
            code.push_str("pub static EMU_ENTRIES: &[EmuEntry] = &[\n");
            for k in kernels {
                code.push_str(&format!("    {{ extern \"C\" {{ fn snella_emu_entry_{0}(args: *const *const core::ffi::c_void); }} snella_emu_entry_{0} }},\n", k.name));
            }
            code.push_str("];\n");
        }
        Err(why) => {
            code.push_str(&format!("pub const EMU_UNAVAILABLE: Option<&str> = Some({why:?});\n"));
            code.push_str("pub static EMU_ENTRIES: &[EmuEntry] = &[];\n");
        }
    }
    code
}

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

/// (name, parameters) of every `__global__` function of a .cu source.
fn kernel_signatures(src: &str, path: &Path) -> Vec<(String, Vec<Param>)> {
    let src = strip_comments(src);
    let mut kernels = Vec::new();
    let mut at = 0;
    while let Some(i) = src[at..].find("__global__") {
        let start = at + i;
        let open = start + src[start..].find('(').unwrap();
        let name = src[start..open].split_whitespace().last().unwrap().to_string();
        let close = open + src[open..].find(')').unwrap();
        let mut params = Vec::new();
        for p in src[open + 1..close].split(',').map(str::trim).filter(|p| !p.is_empty() && *p != "void") {
            // The type is everything before the parameter name (the last identifier).
            let name_at = p.rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(0, |i| i + 1);
            let (ty, pname) = (p[..name_at].trim(), p[name_at..].trim());
            let kind = kind_of_c_type(ty)
                .unwrap_or_else(|| panic!("{}: {name}: parameter type of `{p}` has no KArg", path.display()));
            let ty = if kind == "Ptr" { ty.to_string() } else { ty.replace("const", "").trim().to_string() };
            params.push(Param { ty, name: pname.to_string(), kind });
        }
        kernels.push((name, params));
        at = close;
    }
    kernels
}
