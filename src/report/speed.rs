//! `snella bench`: images/s of one training step (forward, backward, AdamW, allocator update) per model ×
//! method on the device, with the model FLOPs per step and, on a known card, the fraction of its peak
//! (MFU). For GPU machines without a Rust toolchain, where `cargo bench` cannot run.
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::model::{MemoryOptions, Model, Precision, Recompute, ViTConfig};
use crate::peft::allocator::{Allocator, AllocatorConfig};
use crate::peft::Method;
use crate::runtime::GemmPrecision;
use crate::runtime::{mib, Backend};

/// One measured configuration of `snella bench`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SpeedRow {
    /// Model name (`vit_b16`, ...).
    pub model: String,
    /// Method name (`snella32`, ...).
    pub method: String,
    /// Images per step.
    pub batch: usize,
    /// What the backward recomputes.
    pub recompute: Recompute,
    /// Storage precision of the frozen weights and the kept residual stream.
    pub precision: Precision,
    /// Precision of the matrix products.
    pub gemm: GemmPrecision,
    /// `cpu`, or the GPU's name.
    pub device: String,
    /// Training throughput (images per second).
    pub images_per_s: f64,
    /// Wall-clock milliseconds of one step.
    pub step_ms: f64,
    /// Model FLOPs of one step (3 × the forward's matrix products; recomputation not counted).
    pub tflop_per_step: f64,
    /// Achieved model TFLOP/s and its fraction of the card's dense peak for this GEMM precision.
    pub tflops: f64,
    /// `tflops` over the card's dense peak (None when the card is unknown or on the CPU).
    pub mfu: Option<f64>,
    /// MiB the plan allocates.
    pub planned_mib: f64,
    /// Device memory above the post-setup baseline after the steps (GPU only).
    pub device_mib: Option<f64>,
}

/// FLOPs of one forward pass: the matrix products of patch embedding, blocks and head.
pub(crate) fn forward_flops(cfg: &ViTConfig, b: usize) -> f64 {
    let (d, f, t, h, hd) =
        (cfg.embed_dim as f64, cfg.mlp_hidden as f64, cfg.tokens() as f64, cfg.num_heads as f64, cfg.head_dim() as f64);
    let bt = b as f64 * t;
    let block =
        2.0 * bt * d * (3.0 * d) + 2.0 * 2.0 * b as f64 * h * t * t * hd + 2.0 * bt * d * d + 2.0 * 2.0 * bt * d * f;
    let embed = 2.0 * (b * cfg.num_patches() * cfg.patch_dim()) as f64 * d;
    embed + cfg.depth as f64 * block + 2.0 * b as f64 * d * cfg.num_classes as f64
}

/// Dense peak FLOP/s of a card by name, for the GEMM precision (SXM figures; None when unknown).
pub(crate) fn peak_flops(device: &str, gemm: GemmPrecision) -> Option<f64> {
    let d = device.to_ascii_uppercase();
    let (fp32, tf32, bf16) = if d.contains("H100") || d.contains("H200") || d.contains("GH200") {
        (67e12, 495e12, 989e12)
    } else if d.contains("A100") {
        (19.5e12, 156e12, 312e12)
    } else {
        return None;
    };
    Some(match gemm {
        GemmPrecision::Fp32 => fp32,
        GemmPrecision::Tf32 => tf32,
        GemmPrecision::Bf16 => bf16,
    })
}

/// Times `steps` training steps after `warmup` ones (the step reads the loss back, which synchronises) of
/// `model_name` × `method_name` at `batch` with a 100-class head and synthetic data.
///
/// # Errors
/// `Invalid` for an unknown model or method, a zero batch or step count; `OutOfMemory`, `Cuda` from the
/// device.
#[allow(clippy::too_many_arguments)]
pub fn step_speed(
    model_name: &str,
    method_name: &str,
    batch: usize,
    memory: impl Into<MemoryOptions>,
    backend: Backend,
    gemm: GemmPrecision,
    warmup: usize,
    steps: usize,
) -> Result<SpeedRow> {
    if steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    let cfg = ViTConfig::by_name(model_name, 100)?;
    let method = Method::parse(method_name, 0.5)?;
    let device = match &backend {
        Backend::Cpu => "cpu".to_string(),
        Backend::Cuda(c) => c.name.clone(),
    };
    let memory = memory.into();
    let mut model = Model::new(backend, &cfg, method, batch, memory)?;
    model.rt.set_gemm_precision(gemm);
    model.init_method(0)?; // the branches, or GPS's masks
    for (i, name) in model.param_names().iter().enumerate() {
        if name.starts_with("branch.") {
            continue;
        }
        let n = model.param_len(name)?;
        let v: Vec<f32> = if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name == "norm.weight" {
            vec![1.0; n]
        } else {
            (0..n).map(|j| 0.02 * (((j * 2654435761 + i) % 2001) as f32 / 1000.0 - 1.0)).collect()
        };
        model.set_param(name, &v)?;
    }
    let per = cfg.in_chans * cfg.img_size.0 * cfg.img_size.1;
    let images: Vec<f32> = (0..batch * per).map(|i| ((i % 251) as f32) / 125.0 - 1.0).collect();
    let labels: Vec<i32> = (0..batch).map(|i| (i % cfg.num_classes) as i32).collect();
    model.set_batch(&images, &labels)?;
    let alloc = match method {
        Method::Kernel(k) if k.allocator => {
            Some(Allocator::new(&model, AllocatorConfig { init_ratio: 0.5, target_ratio: 0.5, ..Default::default() })?)
        }
        _ => None,
    };
    let run = |model: &mut Model, n: usize| -> Result<()> {
        for _ in 0..n {
            model.forward()?;
            model.backward_step(1e-4, 0.05, alloc.as_ref().map(Allocator::betas))?;
        }
        model.rt.sync()
    };
    run(&mut model, warmup)?;
    let timer = StepTimer::start(&model)?;
    run(&mut model, steps)?;
    let secs = timer.stop(&model)?.as_secs_f64() / steps as f64;
    let flops = 3.0 * forward_flops(&cfg, batch);
    let tflops = flops / secs / 1e12;
    Ok(SpeedRow {
        model: model_name.into(),
        method: method.name(),
        batch,
        recompute: memory.recompute,
        precision: memory.precision,
        gemm,
        mfu: peak_flops(&device, gemm).map(|p| flops / secs / p),
        device,
        images_per_s: batch as f64 / secs,
        step_ms: secs * 1e3,
        tflop_per_step: flops / 1e12,
        tflops,
        planned_mib: mib(model.rt.plan.total_bytes()),
        device_mib: model.rt.device_used_above_baseline()?.map(mib),
    })
}

/// Times work on a model's device: on CUDA, events recorded on the engine's stream before and after the
/// work (device time, read once the stream has finished); on the CPU, wall-clock time. Used by
/// `snella bench` and `cargo bench` (criterion's `iter_custom`).
pub struct StepTimer {
    wall: Instant,
    event: Option<crate::runtime::cuda::Event>,
}

impl StepTimer {
    /// Starts timing: records a CUDA event on the model's stream (GPU) or reads the clock (CPU).
    ///
    /// # Errors
    /// `Cuda` when the event cannot be created or recorded.
    pub fn start(model: &Model) -> Result<StepTimer> {
        let event = match &model.rt.backend {
            Backend::Cpu => None,
            Backend::Cuda(c) => Some(c.record_event()?),
        };
        Ok(StepTimer { wall: Instant::now(), event })
    }

    /// The time since [`StepTimer::start`], with the device synchronised (every launched op is included).
    ///
    /// # Errors
    /// `Cuda` when recording, synchronising or reading the events fails.
    pub fn stop(self, model: &Model) -> Result<Duration> {
        match (&model.rt.backend, self.event) {
            (Backend::Cuda(c), Some(start)) => {
                let end = c.record_event()?;
                let ms = c.elapsed_ms(&start, &end)?;
                Ok(Duration::from_secs_f64(ms / 1e3))
            }
            _ => {
                model.rt.sync()?;
                Ok(self.wall.elapsed())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b16_forward_is_17_6_gflop_per_image() {
        let cfg = ViTConfig::by_name("vit_b16", 1000).unwrap();
        let g = forward_flops(&cfg, 1) / 1e9;
        assert!((g - 35.1).abs() < 0.5, "{g} GFLOP (2 x 17.6 GMAC)");
    }

    #[test]
    fn a_cpu_step_is_timed() {
        let r =
            step_speed("tiny", "snella8", 2, Recompute::Attention, Backend::Cpu, GemmPrecision::Fp32, 1, 2).unwrap();
        assert!(r.images_per_s > 0.0 && r.mfu.is_none() && r.device == "cpu");
    }
}
