//! Whole training steps of the golden cases on the CPU and on the device: loss, logits, thresholds, every
//! gradient and the parameters after a few AdamW steps, at each recompute level and storage precision, and
//! with the official recipe's dropout and drop-path.
use super::{scale_of, Case};
use crate::error::Result;
use crate::golden::{golden_dir, GoldenCase};
use crate::model::{MemoryOptions, Recompute};
use crate::peft::allocator::{Allocator, AllocatorConfig};
use crate::peft::Method;
use crate::runtime::Backend;

/// bf16 storage at a recompute level.
pub(super) fn bf16(recompute: Recompute) -> MemoryOptions {
    MemoryOptions { recompute, precision: crate::model::Precision::Bf16, fused_update: false }
}

/// Three training steps of a golden case on the CPU and on the device, compared tensor by tensor.
/// Tensors the manifest lists as rounding noise (exactly zero in exact arithmetic) are compared in absolute
/// terms: 1e-6 for gradients, 2·lr per step for parameters (AdamW turns noise into ±lr steps).
pub(super) fn step(cx: &mut Case, case: &str, memory: impl Into<MemoryOptions>) -> Result<()> {
    let memory = memory.into();
    let g = GoldenCase::load(&golden_dir(), case)?;
    let mut cpu = g.build_model(Backend::Cpu, memory)?;
    let mut dev = g.build_model(Backend::new(cx.dev)?, memory)?;
    let names = g.trainable();
    let alloc = match cpu.method() {
        Method::Kernel(k) if k.allocator => Some(Allocator::new(&cpu, AllocatorConfig::default())?),
        _ => None,
    };
    let (lr, wd, steps) = (1e-3, 0.05, 3);
    let noise_tol = |cx: &mut Case, name: String, want: &[f32], got: &[f32], abs: f64| {
        cx.compare_values(name, want, got, Some(abs / scale_of(want)));
    };
    for step in 0..steps {
        let (lc, ld) = (cpu.forward()?, dev.forward()?);
        cx.compare_values(format!("step{step}.loss"), &[lc], &[ld], None);
        if step == 0 {
            cx.compare_values("logits", &cpu.logits()?, &dev.logits()?, None);
            cx.compare_values("thresholds", &cpu.thresholds()?, &dev.thresholds()?, None);
        }
        cpu.backward()?;
        dev.backward()?;
        if step == 0 {
            for n in &names {
                let (want, got) = (cpu.get_grad(n)?, dev.get_grad(n)?);
                if g.noise_ranges(n).iter().map(|(a, b)| b - a).sum::<usize>() == want.len() {
                    noise_tol(cx, format!("grad.{n} (noise)"), &want, &got, 1e-6);
                } else {
                    // A long sum with cancellation (a mixture scalar's gradient) may differ between two fp32
                    // orders by more than the check's tolerance: the manifest's suggested_atol, the error
                    // it measured between fp32 implementations, is the floor.
                    let tol = g.atol(&format!("grad.{n}")).map(|a| (a / scale_of(&want)).max(cx.tol));
                    cx.compare_values(format!("grad.{n}"), &want, &got, tol);
                }
            }
        }
        cpu.adamw_step(lr, wd)?;
        dev.adamw_step(lr, wd)?;
        if let Some(a) = &alloc {
            a.update(&cpu)?;
            a.update(&dev)?;
        }
    }
    for n in &names {
        let (want, got) = (cpu.get_param(n)?, dev.get_param(n)?);
        if g.noise_ranges(n).is_empty() {
            cx.compare_adamw(format!("param.{n} after {steps} steps"), &want, &got, lr, steps);
        } else {
            noise_tol(cx, format!("param.{n} after {steps} steps (noise)"), &want, &got, 2.0 * lr * steps as f64);
        }
    }
    if let Some(a) = &alloc {
        cx.compare_values("allocator scores", &a.scores(&cpu)?, &a.scores(&dev)?, None);
    }
    dev.rt.sync()
}

/// Three steps of snella_tiny at `Block`: the CPU through the plain cycle (backward, adamw_step,
/// Allocator::update), the device with the fused update (`backward_step`, the branch factors stepped inside
/// the backward); losses, parameters and allocator scores compared.
pub(super) fn step_fused(cx: &mut Case) -> Result<()> {
    let g = GoldenCase::load(&golden_dir(), "snella_tiny")?;
    let plain = MemoryOptions::from(Recompute::Block);
    let mut cpu = g.build_model(Backend::Cpu, plain)?;
    let mut dev = g.build_model(Backend::new(cx.dev)?, MemoryOptions { fused_update: true, ..plain })?;
    let alloc = match cpu.method() {
        Method::Kernel(k) if k.allocator => Some(Allocator::new(&cpu, AllocatorConfig::default())?),
        _ => None,
    };
    let (lr, wd, steps) = (1e-3, 0.05, 3);
    for step in 0..steps {
        let (lc, ld) = (cpu.forward()?, dev.forward()?);
        cx.compare_values(format!("step{step}.loss"), &[lc], &[ld], None);
        cpu.backward()?;
        cpu.adamw_step(lr, wd)?;
        if let Some(a) = &alloc {
            a.update(&cpu)?;
        }
        dev.backward_step(lr, wd, alloc.as_ref().map(Allocator::betas))?;
    }
    for n in g.trainable() {
        let (want, got) = (cpu.get_param(&n)?, dev.get_param(&n)?);
        if g.noise_ranges(&n).is_empty() {
            cx.compare_adamw(format!("param.{n} after {steps} steps"), &want, &got, lr, steps);
        } else {
            let abs = 2.0 * lr * steps as f64;
            cx.compare_values(
                format!("param.{n} after {steps} steps (noise)"),
                &want,
                &got,
                Some(abs / scale_of(&want)),
            );
        }
    }
    if let Some(a) = &alloc {
        cx.compare_values("allocator scores", &a.scores(&cpu)?, &a.scores(&dev)?, None);
    }
    dev.rt.sync()
}

/// [`step`] of snella_tiny with branch dropout 0.1, branch drop-path 0.1 and block drop-path 0.1.
pub(super) fn step_dropout(cx: &mut Case) -> Result<()> {
    let g = GoldenCase::load(&golden_dir(), "snella_tiny")?;
    let Method::Kernel(k) = g.method()? else { unreachable!() };
    let method = Method::Kernel(crate::peft::KernelMethod { dropout: 0.1, drop_path: 0.1, ..k });
    let mut cpu = g.build_model_with(Backend::Cpu, Recompute::Attention, method)?;
    let mut dev = g.build_model_with(Backend::new(cx.dev)?, Recompute::Attention, method)?;
    for m in [&mut cpu, &mut dev] {
        m.set_block_drop_path(0.1)?;
        m.set_regularisation_seed(7);
    }
    for step in 0..2 {
        let (lc, ld) = (cpu.forward()?, dev.forward()?);
        cx.compare_values(format!("step{step}.loss"), &[lc], &[ld], None);
        cpu.backward()?;
        dev.backward()?;
        for n in g.trainable() {
            if n.ends_with("attn.k.beta") {
                continue; // ~0 by softmax's shift invariance: rounding noise on both devices
            }
            cx.compare_values(format!("step{step}.grad.{n}"), &cpu.get_grad(&n)?, &dev.get_grad(&n)?, None);
        }
        cpu.adamw_step(1e-3, 0.05)?;
        dev.adamw_step(1e-3, 0.05)?;
    }
    dev.rt.sync()
}
