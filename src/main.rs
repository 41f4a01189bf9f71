//! The `snella` command line: one variant of [`Command`] per subcommand, one arm of [`run`] each.
//!
//! Errors are printed as one line, `snella: <message>`, with exit code 2 (clap's own usage errors also
//! exit 2). A subcommand that ran but found failures (a selftest check) exits 1. A training run stopped by
//! Ctrl-C (SIGINT) or SIGTERM writes a checkpoint, says how to resume and exits 128 + the signal (130, 143);
//! a second signal exits at once with that code. Nothing here panics.
//!
//! To add a subcommand: a variant with its arguments (a struct deriving `clap::Args`) to `Command`,
//! and an arm in `run` that calls into the library and returns `Ok(ExitCode::SUCCESS)`.
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::low_level;
use snella::model::{MemoryOptions, Precision, Recompute};
use snella::report::memory as mem;
use snella::report::speed;
use snella::train::recipe::TrainConfig;
use snella::train::{checkpoint, export, peft_adapter, pictures, trainer};
use snella::{
    cuda_available, cuda_emu_available, gpu_info, selftest, Backend, Device, Error, GemmPrecision, Result,
    KERNELS_COMPILED,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "snella",
    version,
    about = "Fine-tunes vision transformers with SNELLA (kernelized sparse PEFT), on CUDA or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Peak training memory of each model × method from the plan the engine allocates, beside the SNELL
    /// paper's figures (batch 8, fp32, 224 px); on a GPU with --measure, also measured by running steps.
    Memory(MemoryArgs),
    /// Fine-tunes a ViT with a recipe (TOML; `--set key=value` overrides), writing checkpoints and metrics.
    Train(TrainArgs),
    /// Evaluates a checkpoint on its recipe's test split (or the data given with --set data=...).
    Eval(EvalArgs),
    /// Exports a checkpoint: merged timm-format weights W0 + ΔW, and the compact sparse delta; or, for a LoRA
    /// run with --peft, a Hugging Face peft adapter.
    Export(ExportArgs),
    /// Redraws the pictures of a run (curves; for SNELL/SNELLA the allocation map) from its metrics.jsonl.
    Plot(PlotArgs),
    /// Images/s of one training step per model × method on the device, with model TFLOP/s and MFU.
    Bench(BenchArgs),
    /// Version, whether CUDA kernels are compiled into this binary, and what the CUDA probe finds.
    Info(InfoArgs),
    /// Every CUDA kernel against its CPU reference on fresh random inputs (a GPU, or --device cuda-emu).
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct MemoryArgs {
    /// Models (comma-separated): vit_b16, vit_l16, vit_h14, dinov2_s14, tiny.
    #[arg(long, value_delimiter = ',', default_value = "vit_b16,vit_l16,vit_h14")]
    models: Vec<String>,
    /// Methods (comma-separated): full, linear, gps, loraR, snellR, snellaR, mixkR, kloraR.
    #[arg(long, value_delimiter = ',', default_value = "full,lora8,gps,snell32,snella32")]
    methods: Vec<String>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Storage precisions to tabulate (comma-separated): fp32, bf16 (frozen block weights and the kept
    /// residual stream in bf16; factors, gradients, optimizer state and all math fp32).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "fp32")]
    precision: Vec<Precision>,
    /// Input resolution in pixels (square); the position table is resized.
    #[arg(long, default_value_t = 224)]
    resolution: usize,
    /// Rank for methods given without one (e.g. `--methods snella,lora --rank 16`).
    #[arg(long)]
    rank: Option<usize>,
    /// Recompute levels to tabulate (comma-separated): none (keep every activation, as the paper's
    /// PyTorch code), norms, attention, block (only each block's input is kept, and the branch factors are
    /// updated inside the backward, as `snella train --recompute block` does).
    #[arg(long, value_delimiter = ',', value_enum, default_value = "none,block")]
    recompute: Vec<Recompute>,
    /// Fraction of entries zeroed per layer for SNELL/SNELLA (does not change memory).
    #[arg(long, default_value_t = 0.5)]
    sparsity: f32,
    /// Classes of the head (the PyTorch benchmark uses 100).
    #[arg(long, default_value_t = 100)]
    classes: usize,
    /// Also write the table as JSON / CSV, and a bar chart as SVG / PNG.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    csv: Option<PathBuf>,
    #[arg(long)]
    svg: Option<PathBuf>,
    #[arg(long)]
    png: Option<PathBuf>,
    /// Run real training steps on the GPU and add the measured device memory (needs a GPU, or
    /// `--device cuda-emu`).
    #[arg(long)]
    measure: bool,
    /// The device --measure runs on: auto (a GPU), cuda, cuda-emu.
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
}

#[derive(Args)]
struct InfoArgs {
    /// Print one JSON object (for scripts): version, devices, kernels, the CUDA probe's result.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The recipe (see recipes/); without one, the defaults of the paper's recipe and --set.
    recipe: Option<PathBuf>,
    /// Overrides, e.g. `--set lr=5e-4 --set data=path/to/folder --set method=snella32`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Continue the run from its own `<out_dir>/checkpoint.safetensors` (bit-identical to an uninterrupted run).
    #[arg(long)]
    resume: bool,
    /// Continue from another checkpoint of the same recipe.
    #[arg(long, value_name = "CHECKPOINT")]
    resume_from: Option<PathBuf>,
    /// No progress bars and no notes (metrics still go to <out_dir>/metrics.jsonl; errors are still printed).
    #[arg(long)]
    quiet: bool,
    /// The device (the same as `--set device=...`): auto, cpu, cuda, cuda-emu.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// After training, export merged weights and the sparse delta into <out_dir>/export.
    #[arg(long)]
    export: bool,
}

#[derive(Args)]
struct CheckpointArgs {
    /// A checkpoint written by `snella train`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Overrides of the checkpoint's recipe, e.g. `--set data=... --set device=cpu`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// The device (the same as `--set device=...`): auto, cpu, cuda, cuda-emu.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    ck: CheckpointArgs,
    /// Also write the evaluated images (after the eval transform, (N, 3, H, W)), their labels and the logits
    /// (N, classes) to this safetensors file, to compare with another framework on the same inputs.
    #[arg(long, value_name = "FILE")]
    save_logits: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    #[command(flatten)]
    ck: CheckpointArgs,
    /// Folder for merged.safetensors and the sparse delta, or the adapter (created; existing files are replaced
    /// atomically).
    #[arg(long)]
    out: PathBuf,
    /// LoRA runs only: write a Hugging Face peft adapter (adapter_config.json, adapter_model.safetensors) with
    /// the module names of timm's VisionTransformer (`--peft`, `--peft timm`) or of Hugging Face's
    /// ViT/Dinov2ForImageClassification in transformers 5 (`--peft hf`) or 4 (`--peft hf4`), instead of the
    /// merged weights and the sparse delta.
    #[arg(long, value_name = "LAYOUT", num_args = 0..=1, default_missing_value = "timm")]
    peft: Option<String>,
}

#[derive(Args)]
struct PlotArgs {
    /// A run folder (the `out_dir` of a recipe), holding metrics.jsonl.
    run_dir: PathBuf,
    /// Where to write the pictures (created); default: the run folder.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, value_delimiter = ',', default_value = "vit_b16")]
    models: Vec<String>,
    #[arg(long, value_delimiter = ',', default_value = "full,lora8,gps,snell32,snella32")]
    methods: Vec<String>,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    #[arg(long, value_enum, default_value = "attention")]
    recompute: Recompute,
    /// Storage precision: fp32, or bf16 (frozen block weights and the kept residual stream).
    #[arg(long, value_enum, default_value = "fp32")]
    precision: Precision,
    /// Matrix products: fp32 (exact, the default), tf32 or bf16 tensor cores (CUDA only).
    #[arg(long, value_enum, default_value = "fp32")]
    gemm: GemmPrecision,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, value_enum, default_value = "auto")]
    device: DeviceArg,
    /// Also write the rows as JSON lines.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// CUDA when a GPU is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
    /// The emulated CUDA device: the CUDA code path on the host, with sanitizer checks (no GPU needed).
    #[value(name = "cuda-emu")]
    CudaEmu,
}

impl DeviceArg {
    fn resolve(self) -> Device {
        match self {
            DeviceArg::Auto => Device::auto(),
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => Device::Cuda,
            DeviceArg::CudaEmu => Device::CudaEmu,
        }
    }

    /// The recipe's spelling (`device = "..."`).
    fn recipe_name(self) -> &'static str {
        match self {
            DeviceArg::Auto => "auto",
            DeviceArg::Cpu => "cpu",
            DeviceArg::Cuda => "cuda",
            DeviceArg::CudaEmu => "cuda-emu",
        }
    }
}

#[derive(Args)]
struct SelftestArgs {
    /// auto and cuda both need a GPU (a selftest that tested nothing must not pass); cuda-emu runs the kernels on
    /// the emulated device.
    #[arg(long, value_enum, default_value_t = SelftestDevice::Auto)]
    device: SelftestDevice,
    /// Run only the checks whose name contains this string.
    #[arg(long)]
    filter: Option<String>,
    /// Fix every check's seed (decimal or 0x-hex, as printed) to replay a failure.
    #[arg(long, value_parser = parse_seed)]
    seed: Option<u64>,
    /// List the checks and exit.
    #[arg(long)]
    list: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SelftestDevice {
    /// A GPU (an error without one).
    Auto,
    Cuda,
    /// The emulated CUDA device: the kernels compiled for the host, with sanitizer checks.
    #[value(name = "cuda-emu")]
    CudaEmu,
}

fn parse_seed(s: &str) -> std::result::Result<u64, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("not a seed ({e})"))
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("snella: {e}");
            ExitCode::from(2)
        }
    }
}

/// Rust ignores SIGPIPE, so `println!` into a closed pipe (`snella memory | head`) would panic; with the
/// default action restored the process ends quietly, as other command-line tools do.
fn restore_sigpipe() {
    #[cfg(unix)]
    {
        extern "C" {
            fn signal(signum: i32, handler: usize) -> usize;
        }
        const SIGPIPE: i32 = 13;
        const SIG_DFL: usize = 0;
        // SAFETY: libc's signal() with the default disposition, before any other thread exists.
        unsafe {
            signal(SIGPIPE, SIG_DFL);
        }
    }
}

fn run(cmd: Command) -> Result<ExitCode> {
    match cmd {
        Command::Memory(a) => {
            memory(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(a) => {
            bench(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Train(a) => train(a),
        Command::Eval(a) => {
            let (mut t, _) = trainer_from_checkpoint(&a.ck)?;
            let (loss, acc) = trainer::evaluate(&mut t.model, &t.test_loader)?;
            println!("test loss {loss:.4}  top-1 {:.2}%  ({} images)", 100.0 * acc, t.test_loader.dataset().len());
            if let Some(path) = &a.save_logits {
                save_logits(&mut t, path)?;
                println!("wrote {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export(a) => export(a),
        Command::Plot(a) => {
            plot(a)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Info(a) => {
            info(a.json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest(a) => {
            if a.list {
                for (name, tol) in selftest::check_list() {
                    println!("{name:<40} tol {tol:.0e}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let device = match a.device {
                SelftestDevice::CudaEmu => Device::CudaEmu,
                _ => match cuda_available() {
                    Ok(_) => Device::Cuda,
                    Err(why) if a.device == SelftestDevice::Cuda => return Err(Error::NoCuda(why)),
                    // Plain `snella selftest`: say what it needs as well as what was probed.
                    Err(why) => {
                        return Err(Error::NoCuda(format!(
                            "{why} (selftest compares CUDA with the CPU and needs a GPU; --device cuda-emu runs it on \
                             the emulated device)"
                        )))
                    }
                },
            };
            let ok = selftest::run_seeded(device, a.filter.as_deref(), a.seed)?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

/// What `snella info` reports, gathered once and printed as text or JSON.
#[derive(serde::Serialize)]
struct InfoReport {
    version: &'static str,
    /// nvcc's fatbins are in the binary.
    kernels_compiled: bool,
    /// The devices this machine can run: cpu, cuda-emu, cuda.
    devices: Vec<&'static str>,
    /// What `--device auto` picks.
    auto_device: &'static str,
    cuda_emu: Probe,
    cuda: Probe,
    gpu: Option<GpuReport>,
    /// Why device 0 could not be opened though the probe passed.
    gpu_error: Option<String>,
}

#[derive(serde::Serialize)]
struct Probe {
    available: bool,
    /// Why not, when not.
    reason: Option<String>,
}

#[derive(serde::Serialize)]
struct GpuReport {
    name: String,
    total_bytes: usize,
    free_bytes: usize,
}

fn info(json: bool) {
    let probe = |r: std::result::Result<(), String>| Probe { available: r.is_ok(), reason: r.err() };
    let cuda = probe(cuda_available().map(|_| ()));
    let cuda_emu = probe(cuda_emu_available());
    let (gpu, gpu_error) = match cuda.available.then(gpu_info) {
        Some(Ok(g)) => (Some(GpuReport { name: g.name, total_bytes: g.total_bytes, free_bytes: g.free_bytes }), None),
        Some(Err(e)) => (None, Some(e.to_string())),
        None => (None, None),
    };
    let mut devices = vec!["cpu"];
    devices.extend(cuda_emu.available.then_some("cuda-emu"));
    devices.extend(cuda.available.then_some("cuda"));
    let auto_device = if cuda.available { "cuda" } else { "cpu" };
    let r = InfoReport {
        version: env!("CARGO_PKG_VERSION"),
        kernels_compiled: KERNELS_COMPILED,
        devices,
        auto_device,
        cuda_emu,
        cuda,
        gpu,
        gpu_error,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
        return;
    }
    println!("snella {}", r.version);
    if r.kernels_compiled {
        println!("CUDA kernels compiled in: yes (nvcc fatbins embedded at build time)");
    } else {
        println!("CUDA kernels compiled in: no (built without nvcc; run scripts/install-nvcc.sh and rebuild)");
    }
    match &r.cuda_emu.reason {
        None => println!(
            "emulated CUDA device: yes (--device cuda-emu: the kernels compiled for the host, with sanitizers)"
        ),
        Some(why) => println!("emulated CUDA device: no ({why})"),
    }
    match &r.cuda.reason {
        Some(why) => {
            println!("CUDA probe: unavailable: {why}");
            println!(
                "device: cpu (every command falls back to the CPU; --device cuda is an error, --device cuda-emu works)"
            );
        }
        None => {
            println!("CUDA probe: ok (driver, device and cuBLAS found)");
            let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
            match (&r.gpu, &r.gpu_error) {
                (Some(g), _) => {
                    println!(
                        "GPU 0: {}, {:.1} GiB total, {:.1} GiB free",
                        g.name,
                        gib(g.total_bytes),
                        gib(g.free_bytes)
                    )
                }
                (None, e) => println!("GPU 0: could not be initialised: {}", e.as_deref().unwrap_or("")),
            }
        }
    }
}

fn memory(a: MemoryArgs) -> Result<()> {
    if a.batch == 0 {
        return Err(Error::invalid("--batch", "must be at least 1"));
    }
    let methods: Vec<String> = a
        .methods
        .iter()
        .map(|m| match a.rank {
            Some(r) if !m.chars().any(|c| c.is_ascii_digit()) && !matches!(m.as_str(), "full" | "linear" | "gps") => {
                format!("{m}{r}")
            }
            _ => m.clone(),
        })
        .collect();
    let measure = match (a.measure, a.device) {
        (false, _) => None,
        (true, DeviceArg::Cpu) => {
            return Err(Error::invalid("--device", "--measure measures device memory: use cuda, cuda-emu or auto"))
        }
        (true, DeviceArg::CudaEmu) => Some(Device::CudaEmu),
        (true, _) => {
            cuda_available().map_err(|why| {
                Error::NoCuda(format!(
                    "{why} (--measure runs real steps on a GPU; --device cuda-emu runs them emulated)"
                ))
            })?;
            Some(Device::Cuda)
        }
    };
    let mut rows = Vec::new();
    for &precision in &a.precision {
        for &recompute in &a.recompute {
            let memory = MemoryOptions::for_training(recompute, precision);
            rows.extend(mem::memory_rows_at(
                &a.models,
                &methods,
                a.batch,
                a.sparsity,
                a.classes,
                memory,
                Some(a.resolution),
            )?);
        }
    }
    if let Some(device) = measure {
        for r in rows.iter_mut() {
            match mem::measure(r, Backend::new(device)?, 2, a.sparsity, a.classes) {
                Ok((_, dev)) => r.measured_mib = dev,
                Err(Error::OutOfMemory { .. }) => eprintln!("snella: {} {} does not fit this GPU", r.model, r.method),
                Err(e) => return Err(e),
            }
        }
    }
    println!(
        "Peak training memory, batch {}, {} px (MiB; paper: SNELL Tables A8(b)/A12, fp32, MB = MiB; snellaR rows\n\
         are compared with the paper's SNELL-R figure, SNELLA's own table being unpublished in a readable form)",
        a.batch, a.resolution
    );
    match measure {
        None => {
            println!("These are the planned bytes the engine allocates, exactly (no GPU run: add --measure on a GPU).")
        }
        Some(d) => println!("Measured: device memory above the baseline after 2 training steps on {}.", d.name()),
    }
    print!("{}", mem::table(&rows));
    if rows.iter().any(|r| r.fused_update) {
        println!(
            "At block the branch factors are updated inside the backward, as `snella train --recompute block` runs \
             (the fused update): their gradients are one Linear's slots in scratch, not a grads buffer."
        );
    }
    if measure.is_some() {
        // The plan's claim: every device byte of a step comes from the pools.
        let off: Vec<String> = rows
            .iter()
            .filter_map(|r| {
                r.measured_mib
                    .filter(|&m| m != r.total_mib)
                    .map(|m| format!("{} {} {:+.1} MiB", r.model, r.method, m - r.total_mib))
            })
            .collect();
        if off.is_empty() {
            println!("measured = planned on every row");
        } else {
            println!("measured - planned: {}", off.join(", "));
        }
    }
    println!();
    print!("{}", mem::reductions(&rows));
    // Each output is made only when asked for (a chart takes a moment to draw).
    let write = |path: &Option<PathBuf>, bytes: &dyn Fn() -> Result<Vec<u8>>| -> Result<()> {
        if let Some(p) = path {
            mem::write_atomic(p, bytes()?)?;
            println!("wrote {}", p.display());
        }
        Ok(())
    };
    write(&a.json, &|| Ok(serde_json::to_string_pretty(&rows).unwrap_or_default().into_bytes()))?;
    write(&a.csv, &|| Ok(mem::csv(&rows).into_bytes()))?;
    write(&a.svg, &|| mem::svg(&rows).map(String::into_bytes))?;
    write(&a.png, &|| mem::png(&rows))
}

/// `snella export`: the merged weights and the sparse delta, or with `--peft` a LoRA run's peft adapter.
fn export(a: ExportArgs) -> Result<ExitCode> {
    // The layout and the method are checked before anything is built or written.
    let layout = a.peft.as_deref().map(peft_adapter::PeftLayout::parse).transpose()?;
    let (t, meta) = trainer_from_checkpoint(&a.ck)?;
    let written = match layout {
        Some(layout) => {
            let base = meta.config.as_ref().and_then(|c| c.weights.as_ref()).map(|w| w.display().to_string());
            let adapter = peft_adapter::peft_adapter(&t.model, layout, base.as_deref())?;
            std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
            peft_adapter::write_peft_adapter(&a.out, &adapter)?
        }
        None => {
            std::fs::create_dir_all(&a.out).map_err(|e| Error::io(&a.out, e))?;
            export::export_all(&t.model, &a.out)?
        }
    };
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The test split's images (after the eval transform), labels and logits, in loader order, as safetensors.
fn save_logits(t: &mut trainer::Trainer, path: &std::path::Path) -> Result<()> {
    let v = t.model.config().num_classes;
    let (mut images, mut labels, mut logits, mut shape) = (Vec::new(), Vec::new(), Vec::new(), (0, 0));
    t.model.set_training(false);
    for batch in t.test_loader.epoch(0) {
        let batch = batch?;
        t.model.set_batch(&batch.images, &batch.labels)?;
        t.model.forward()?;
        logits.extend(t.model.logits()?);
        images.extend_from_slice(&batch.images);
        labels.extend(batch.labels.iter().map(|&l| l as f32));
        shape = (batch.height, batch.width);
    }
    let n = labels.len();
    let tensors = snella::model::load::TensorMap::from([
        ("images".to_string(), (vec![n, 3, shape.0, shape.1], images)),
        ("labels".to_string(), (vec![n], labels)),
        ("logits".to_string(), (vec![n, v], logits)),
    ]);
    snella::model::load::write_safetensors(path, &tensors)
}

/// `snella plot RUN_DIR`: the pictures of a run from its metrics.jsonl, headed by the method its checkpoint names.
fn plot(a: PlotArgs) -> Result<()> {
    let metrics = a.run_dir.join(trainer::METRICS_FILE);
    if !metrics.is_file() {
        return Err(Error::invalid(
            "RUN_DIR",
            format!("{} holds no {} (is it the out_dir of a run?)", a.run_dir.display(), trainer::METRICS_FILE),
        ));
    }
    let title = checkpoint::read_checkpoint_meta(&checkpoint::checkpoint_path(&a.run_dir))
        .map(|m| m.method)
        .unwrap_or_else(|_| "run".into());
    let out = a.out.unwrap_or(a.run_dir);
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    for p in pictures::redraw(&metrics, &out, &title)? {
        println!("wrote {}", p.display());
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 {
        return Err(Error::invalid("--batch/--steps", "must be at least 1"));
    }
    let device = a.device.resolve();
    let mut json = String::new();
    println!(
        "{:<9} {:<9} {:>5} {:<9} {:<5} {:<5} {:>10} {:>9} {:>8} {:>6} {:>10} {:>11}  device",
        "model",
        "method",
        "batch",
        "recompute",
        "store",
        "gemm",
        "images/s",
        "step ms",
        "TFLOP/s",
        "MFU",
        "plan MiB",
        "device MiB"
    );
    for model in &a.models {
        for method in &a.methods {
            let r = match speed::step_speed(
                model,
                method,
                a.batch,
                MemoryOptions::for_training(a.recompute, a.precision),
                Backend::new(device)?,
                a.gemm,
                a.warmup,
                a.steps,
            ) {
                Ok(r) => r,
                Err(e @ Error::OutOfMemory { .. }) => {
                    eprintln!("snella: {model} {method}: {e}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let opt = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
            println!(
                "{:<9} {:<9} {:>5} {:<9} {:<5} {:<5} {:>10.2} {:>9.2} {:>8.2} {:>6} {:>10.1} {:>11}  {}",
                r.model,
                r.method,
                r.batch,
                format!("{:?}", r.recompute).to_lowercase(),
                r.precision.name(),
                format!("{:?}", r.gemm).to_lowercase(),
                r.images_per_s,
                r.step_ms,
                r.tflops,
                opt(r.mfu.map(|m| 100.0 * m), 1),
                r.planned_mib,
                opt(r.device_mib, 1),
                r.device
            );
            json.push_str(&serde_json::to_string(&r).unwrap_or_default());
            json.push('\n');
        }
    }
    if let Some(p) = &a.json {
        mem::write_atomic(p, &json)?;
    }
    Ok(())
}

/// `key=value` pairs of `--set`.
fn overrides(set: &[String]) -> Result<Vec<(&str, &str)>> {
    set.iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k, v)),
            _ => Err(Error::invalid("--set", format!("'{kv}' is not KEY=VALUE"))),
        })
        .collect()
}

fn train(a: TrainArgs) -> Result<ExitCode> {
    let (stop, signal) = stop_on_signals()?;
    let mut cfg = match &a.recipe {
        Some(p) => TrainConfig::load(p)?,
        None => TrainConfig::default(),
    };
    cfg.apply_overrides(&overrides(&with_device(&a.set, a.device))?)?;
    let mut t = trainer::Trainer::new(cfg)?;
    let resume = a.resume_from.clone().or_else(|| a.resume.then(|| t.checkpoint_path()));
    if let Some(path) = resume {
        t.resume_from(&path)?;
    }
    // After the checks, so that a bad argument is one line of error and nothing else.
    for n in t.notes.iter().filter(|_| !a.quiet) {
        eprintln!("snella: {n}");
    }
    let summary = t.run_until(!a.quiet, &stop)?;
    println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    if summary.interrupted {
        let sig = signal.load(Ordering::SeqCst) as i32;
        let s = &t.state;
        eprintln!(
            "snella: interrupted by {} at epoch {} batch {} (step {}); the checkpoint {} holds this point; resume with: {}",
            if sig == SIGTERM { "SIGTERM" } else { "SIGINT" },
            s.epoch,
            s.step_in_epoch,
            s.global_step,
            summary.checkpoint.display(),
            resume_command()
        );
        return Ok(ExitCode::from(128 + sig as u8));
    }
    if a.export && summary.completed {
        for p in t.export()? {
            println!("wrote {}", p.display());
        }
    } else if a.export {
        eprintln!("snella: not exported: the run stopped before its last epoch (max_steps); resume it to finish");
    }
    Ok(ExitCode::SUCCESS)
}

/// A flag that SIGINT and SIGTERM set (the trainer stops at the next step boundary), and the signal that
/// set it. A second signal exits at once with 128 + its number: checkpoints are written atomically, so the
/// last one stays valid whenever that happens.
fn stop_on_signals() -> Result<(Arc<AtomicBool>, Arc<AtomicUsize>)> {
    let (stop, signal) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    // One counter for both signals, taken with one atomic step: two signals handled at the same time on two
    // threads (SIGINT and SIGTERM pending while the process was stopped) cannot both see themselves first.
    let count = Arc::new(AtomicUsize::new(0));
    for sig in [SIGINT, SIGTERM] {
        let (stop, signal, count) = (Arc::clone(&stop), Arc::clone(&signal), Arc::clone(&count));
        let action = move || {
            if count.fetch_add(1, Ordering::SeqCst) > 0 {
                low_level::exit(128 + sig);
            }
            signal.store(sig as usize, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        };
        // SAFETY: the action only touches atomics and calls _exit, both async-signal-safe.
        let registered = unsafe { low_level::register(sig, action) };
        registered.map_err(|e| Error::invalid("signals", format!("cannot handle signal {sig}: {e}")))?;
    }
    Ok((stop, signal))
}

/// This process's command line resuming from its own checkpoint: `--resume-from CHECKPOINT` dropped (the
/// checkpoint written on the way out is the run's own) and `--resume` added.
fn resume_command() -> String {
    let quote = |a: String| {
        if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
            a
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    let mut args = Vec::new();
    let mut all = std::env::args_os().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = all.next() {
        match a.as_str() {
            "--resume" => {}
            "--resume-from" => {
                all.next();
            }
            _ if a.starts_with("--resume-from=") => {}
            _ => args.push(quote(a)),
        }
    }
    args.push("--resume".into());
    args.join(" ")
}

/// The `--set` overrides with `--device` appended as `device=...` (it wins over an earlier `--set device=`).
fn with_device(set: &[String], device: Option<DeviceArg>) -> Vec<String> {
    let mut v = set.to_vec();
    v.extend(device.map(|d| format!("device={}", d.recipe_name())));
    v
}

/// A trainer built from the recipe stored in a checkpoint (with overrides), holding the checkpoint's state.
fn trainer_from_checkpoint(a: &CheckpointArgs) -> Result<(trainer::Trainer, checkpoint::CheckpointMeta)> {
    let meta = checkpoint::read_checkpoint_meta(&a.checkpoint)?;
    let mut cfg = meta.config.clone().ok_or_else(|| {
        Error::invalid(
            "--checkpoint",
            format!("{} holds no recipe (it was not written by `snella train`)", a.checkpoint.display()),
        )
    })?;
    cfg.apply_overrides(&overrides(&with_device(&a.set, a.device))?)?;
    let mut t = trainer::Trainer::new(cfg)?;
    let meta = checkpoint::load_checkpoint(&a.checkpoint, &mut t.model, None)?;
    Ok((t, meta))
}
