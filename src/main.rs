//! The `snella` command line: one variant of [`Command`] per subcommand, one arm of [`run`] each.
//!
//! Errors are printed as one line, `snella: <message>`, with exit code 2 (clap's own usage errors also
//! exit 2). A subcommand that ran but found failures (a selftest check) exits 1. Nothing here panics.
//!
//! To add a subcommand: a variant with its arguments (a struct deriving `clap::Args`) to `Command`,
//! and an arm in `run` that calls into the library and returns `Ok(ExitCode::SUCCESS)`.
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use snella::runtime::cuda::KERNELS_COMPILED;
use snella::runtime::Cuda;
use snella::{selftest, Error, Result};

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
    /// Version, whether CUDA kernels are compiled into this binary, and what the CUDA probe finds.
    Info,
    /// Every CUDA kernel against its CPU reference on fresh random inputs (needs a GPU).
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct SelftestArgs {
    /// auto and cuda both need a GPU: a selftest that tested nothing must not pass.
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
    Auto,
    Cuda,
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
        Command::Info => {
            info();
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest(a) => {
            if a.list {
                for c in selftest::checks() {
                    println!("{:<40} tol {:.0e}", c.name, c.tol);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if let Err(why) = Cuda::probe() {
                return Err(match a.device {
                    SelftestDevice::Cuda => Error::NoCuda(why),
                    // Plain `snella selftest`: say what it needs as well as what was probed.
                    SelftestDevice::Auto => {
                        Error::NoCuda(format!("{why} (selftest compares CUDA with the CPU and needs a GPU)"))
                    }
                });
            }
            let ok = selftest::run_seeded(a.filter.as_deref(), a.seed)?;
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}

fn info() {
    println!("snella {}", env!("CARGO_PKG_VERSION"));
    if KERNELS_COMPILED {
        println!("CUDA kernels compiled in: yes (nvcc fatbins embedded at build time)");
    } else {
        println!("CUDA kernels compiled in: no (built without nvcc; run scripts/install-nvcc.sh and rebuild)");
    }
    match Cuda::probe() {
        Err(why) => {
            println!("CUDA probe: unavailable: {why}");
            println!("device: cpu (every command falls back to the CPU; --device cuda is an error)");
        }
        Ok(()) => {
            println!("CUDA probe: ok (driver, device and cuBLAS found)");
            match Cuda::new().and_then(|c| Ok((c.mem_info()?, c.name.clone()))) {
                Ok(((free, total), name)) => {
                    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                    println!("GPU 0: {name}, {:.1} GiB total, {:.1} GiB free", gib(total), gib(free));
                }
                Err(e) => println!("GPU 0: could not be initialised: {e}"),
            }
        }
    }
}
