//! One training step (forward, backward, AdamW, allocator update) per model × method × storage precision
//! (`SNELLA_BENCH_PRECISIONS`, default fp32,bf16) on the available device, in images/s (criterion
//! throughput; GPU time from CUDA events around the steps with the device synchronised, wall-clock on the
//! CPU). The planned memory per pool and the peak bytes the ops touched are printed per case.
//! CPU runs use small configurations so the whole bench finishes in minutes:
//!   cargo bench --bench step                      (auto device)
//!   SNELLA_BENCH_MODELS=vit_b16 SNELLA_BENCH_BATCH=64 cargo bench --bench step   (a GPU run)
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use snella::mib;
use snella::model::{MemoryOptions, Model, Precision, Recompute, ViTConfig};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::Method;
use snella::report::speed::StepTimer;
use snella::{Backend, Device};

fn env_list(key: &str, default: &str) -> Vec<String> {
    std::env::var(key).unwrap_or_else(|_| default.into()).split(',').map(str::to_string).collect()
}

/// A small ViT for CPU benches: 64 px, patch 8, width 192, depth 4.
fn bench_config(name: &str) -> ViTConfig {
    match name {
        "small" => ViTConfig {
            img_size: (64, 64),
            patch_size: 8,
            embed_dim: 192,
            depth: 4,
            num_heads: 3,
            mlp_hidden: 768,
            ..ViTConfig::by_name("tiny", 100).unwrap()
        },
        other => ViTConfig::by_name(other, 100).expect("model name"),
    }
}

fn step(c: &mut Criterion) {
    let device = Device::auto();
    let gpu = device == Device::Cuda;
    let models = env_list("SNELLA_BENCH_MODELS", if gpu { "vit_b16,vit_l16,vit_h14" } else { "tiny,small" });
    let methods = env_list(
        "SNELLA_BENCH_METHODS",
        if gpu { "full,lora8,gps,snell32,snella32" } else { "full,lora8,gps,snell8,snella8" },
    );
    let batch: usize =
        std::env::var("SNELLA_BENCH_BATCH").ok().and_then(|b| b.parse().ok()).unwrap_or(if gpu { 8 } else { 4 });
    let recompute = match std::env::var("SNELLA_BENCH_RECOMPUTE").as_deref() {
        Ok("none") => Recompute::None,
        Ok("norms") => Recompute::Norms,
        Ok("block") => Recompute::Block,
        _ => Recompute::Attention,
    };
    let precisions: Vec<Precision> = env_list("SNELLA_BENCH_PRECISIONS", "fp32,bf16")
        .iter()
        .map(|p| if p == "bf16" { Precision::Bf16 } else { Precision::Fp32 })
        .collect();
    let mut group = c.benchmark_group(format!("step_{}", if gpu { "cuda" } else { "cpu" }));
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    for model_name in &models {
        let cfg = bench_config(model_name);
        for (method_name, &precision) in methods.iter().flat_map(|m| precisions.iter().map(move |p| (m, p))) {
            let method = Method::parse(method_name, 0.5).expect("method");
            let memory = MemoryOptions::for_training(recompute, precision);
            let case = format!("{model_name}/{method_name}/{}/b{batch}", precision.name());
            let backend = Backend::new(device).expect("backend");
            let mut model = match Model::new(backend, &cfg, method, batch, memory) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("{case}: skipped: {e}");
                    continue;
                }
            };
            model.init_method(0).expect("GPS masks"); // then init() sets every parameter, branches included
            init(&model, &cfg);
            let per = cfg.in_chans * cfg.img_size.0 * cfg.img_size.1;
            let images: Vec<f32> = (0..batch * per).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
            let labels: Vec<i32> = (0..batch).map(|i| (i % cfg.num_classes) as i32).collect();
            model.set_batch(&images, &labels).unwrap();
            let alloc = matches!(method, Method::Kernel(k) if k.allocator).then(|| {
                Allocator::new(&model, AllocatorConfig { init_ratio: 0.5, target_ratio: 0.5, ..Default::default() })
                    .unwrap()
            });
            // Device time: CUDA events around the steps on a GPU (the stream synchronised at the end),
            // wall-clock on the CPU.
            group.bench_function(&case, |b| {
                b.iter_custom(|iters| {
                    let timer = StepTimer::start(&model).unwrap();
                    for _ in 0..iters {
                        model.forward().unwrap();
                        model.backward_step(1e-4, 0.05, alloc.as_ref().map(Allocator::betas)).unwrap();
                    }
                    timer.stop(&model).unwrap()
                })
            });
            let report = model.pool_report();
            let planned: usize = report.iter().map(|(_, u)| u.planned).sum();
            let peak: usize = report.iter().map(|(_, u)| u.peak).sum();
            let device_used = model.device_used_above_baseline().unwrap();
            println!(
                "memory {case}: planned {:.1} MiB, touched {:.1} MiB{}",
                mib(planned),
                mib(peak),
                device_used.map(|u| format!(", device above baseline {:.1} MiB", mib(u))).unwrap_or_default()
            );
            for (pool, u) in report {
                println!(
                    "    {:<12} planned {:>10.2} MiB  peak {:>10.2} MiB",
                    pool.name(),
                    mib(u.planned),
                    mib(u.peak)
                );
            }
        }
    }
    group.finish();
}

/// Sane random-ish weights (values only need to keep the step finite).
fn init(model: &Model, cfg: &ViTConfig) {
    for (i, name) in model.param_names().iter().enumerate() {
        let n = model.param_len(name).unwrap();
        let ones = name.ends_with("norm1.weight")
            || name.ends_with("norm2.weight")
            || name == "norm.weight"
            || name.ends_with(".alpha")
            || (name.ends_with(".gamma") && name.starts_with("branch."));
        let val: Vec<f32> = if ones {
            vec![1.0; n]
        } else if name.ends_with(".bias") || name.ends_with(".beta") {
            vec![0.0; n]
        } else {
            let scale = if name.contains("_Qs") { 0.01 } else { 0.02 };
            (0..n).map(|j| scale * (((j * 2654435761 + i * 97) % 2001) as f32 / 1000.0 - 1.0)).collect()
        };
        model.set_param(name, &val).unwrap();
    }
    let _ = cfg;
}

criterion_group!(benches, step);
criterion_main!(benches);
