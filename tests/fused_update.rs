//! The fused update (`MemoryOptions::fused_update`): the branch factors' AdamW step and the allocator's EMA
//! update run inside the backward, one Linear at a time. It must give the same bits as the library's plain
//! cycle (backward, adamw_step, Allocator::update), need only one Linear's room for the branch gradients,
//! and refuse the calls that would read gradients it no longer keeps.
mod common;

use common::{deterministic_params, fails, tiny_layer_scale};
use snella::model::{MemoryOptions, Model, Precision, Recompute};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::{KernelMethod, Method};
use snella::{Backend, Plan, Pool};

const B: usize = 3;

fn options(recompute: Recompute, precision: Precision, fused_update: bool) -> MemoryOptions {
    MemoryOptions { recompute, precision, fused_update }
}

fn model(method: &Method, memory: MemoryOptions) -> Model {
    let cfg = tiny_layer_scale();
    let mut m = Model::new(Backend::Cpu, &cfg, *method, B, memory).unwrap();
    deterministic_params(&m);
    m.set_block_drop_path(0.1).unwrap();
    m
}

fn batch(step: usize) -> (Vec<f32>, Vec<i32>) {
    let per = 3 * 32 * 32;
    let images = (0..B * per).map(|i| (((i * 31 + step * 17) % 97) as f32 / 48.0 - 1.0) * 0.8).collect();
    let labels = (0..B).map(|i| ((i + step) % 10) as i32).collect();
    (images, labels)
}

/// Every tensor a step changes: trainable values, AdamW moments, allocator EMAs (by plan name).
fn state(m: &Model) -> Vec<(String, Vec<u32>)> {
    m.plan()
        .tensors()
        .iter()
        .filter(|t| matches!(t.pool, Pool::Trainable | Pool::Optimizer))
        .map(|t| (t.name.clone(), m.read_tensor(&t.name).unwrap().iter().map(|v| v.to_bits()).collect()))
        .collect()
}

fn allocator(m: &Model, method: &Method) -> Option<Allocator> {
    matches!(method, Method::Kernel(k) if k.allocator).then(|| {
        Allocator::new(m, AllocatorConfig { init_ratio: 0.5, target_ratio: 0.5, ..Default::default() }).unwrap()
    })
}

fn methods() -> Vec<(&'static str, Method)> {
    let snella = Method::parse("snella8", 0.5).unwrap();
    let Method::Kernel(k) = snella else { unreachable!() };
    vec![
        ("snella8", snella),
        ("snell8", Method::parse("snell8", 0.5).unwrap()),
        ("lora4", Method::parse("lora4", 0.5).unwrap()),
        ("mixk8", Method::parse("mixk8", 0.5).unwrap()),
        // The official recipe's branch dropout and drop-path: the unmerged branch path.
        ("snella8 regularised", Method::Kernel(KernelMethod { dropout: 0.1, drop_path: 0.1, ..k })),
    ]
}

#[test]
fn the_fused_update_gives_the_bits_of_the_plain_cycle() {
    for (name, method) in methods() {
        for (recompute, precision) in [
            (Recompute::Block, Precision::Fp32),
            (Recompute::Attention, Precision::Fp32),
            (Recompute::Block, Precision::Bf16),
        ] {
            let what = format!("{name} at {recompute:?} {precision:?}");
            let mut plain = model(&method, options(recompute, precision, false));
            let mut fused = model(&method, options(recompute, precision, true));
            let (ap, af) = (allocator(&plain, &method), allocator(&fused, &method));
            for step in 0..3 {
                let (x, y) = batch(step);
                let lr = 1e-3 * (step + 1) as f64;
                plain.set_batch(&x, &y).unwrap();
                fused.set_batch(&x, &y).unwrap();
                let (lp, lf) = (plain.forward().unwrap(), fused.forward().unwrap());
                assert_eq!(lp.to_bits(), lf.to_bits(), "{what}: loss of step {step}");
                // The plain model through the three calls an embedding program makes.
                plain.backward().unwrap();
                plain.adamw_step(lr, 0.05).unwrap();
                if let Some(a) = &ap {
                    a.update(&plain).unwrap();
                }
                fused.backward_step(lr, 0.05, af.as_ref().map(Allocator::betas)).unwrap();
                for ((n, p), (_, f)) in state(&plain).iter().zip(state(&fused)) {
                    let diff = p.iter().zip(&f).filter(|(a, b)| a != b).count();
                    assert_eq!(diff, 0, "{what}: {n} differs in {diff} of {} entries after step {step}", p.len());
                }
            }
        }
    }
}

#[test]
fn backward_step_without_the_fused_plan_is_the_plain_cycle() {
    let method = Method::parse("snella8", 0.5).unwrap();
    let mut plain = model(&method, Recompute::Attention.into());
    let mut stepped = model(&method, Recompute::Attention.into());
    let (ap, as_) = (allocator(&plain, &method).unwrap(), allocator(&stepped, &method).unwrap());
    for step in 0..2 {
        let (x, y) = batch(step);
        for m in [&mut plain, &mut stepped] {
            m.set_batch(&x, &y).unwrap();
            m.forward().unwrap();
        }
        plain.backward().unwrap();
        plain.adamw_step(1e-3, 0.05).unwrap();
        ap.update(&plain).unwrap();
        stepped.backward_step(1e-3, 0.05, Some(as_.betas())).unwrap();
        assert!(state(&plain) == state(&stepped), "step {step}");
    }
    // Its gradients stay readable, as after backward.
    assert!(stepped.get_grad("branch.blocks.0.attn.q.In_Qs").is_ok());
}

#[test]
fn the_branch_gradients_take_one_linears_room() {
    let cfg = tiny_layer_scale();
    for name in ["snella8", "lora4"] {
        let method = Method::parse(name, 0.5).unwrap();
        let plain = snella::model::plan(&cfg, &method, 8, options(Recompute::Block, Precision::Fp32, false)).unwrap();
        let fused = snella::model::plan(&cfg, &method, 8, options(Recompute::Block, Precision::Fp32, true)).unwrap();
        let bytes = |p: &Plan, f: &dyn Fn(&str) -> bool| -> usize {
            p.tensors().iter().filter(|t| f(&t.name)).map(|t| t.numel() * 4).sum()
        };
        // The gradient pool loses every branch gradient and keeps the others (head, cls token).
        let branch_grads = bytes(&plain, &|n| n.starts_with("grad.branch."));
        assert!(branch_grads > 0);
        let grads =
            |p: &Plan| p.tensors().iter().filter(|t| t.pool == Pool::Grads).map(|t| t.name.clone()).collect::<Vec<_>>();
        let kept: Vec<String> = grads(&plain).into_iter().filter(|n| !n.starts_with("grad.branch.")).collect();
        assert_eq!(grads(&fused), kept, "{name}");
        assert!(fused.pool_bytes(Pool::Grads) < plain.pool_bytes(Pool::Grads), "{name}");
        // The slots are one Linear's: three (in, out) = (D, D) branches or one (D, F) / (F, D) branch.
        let slots = bytes(&fused, &|n| n.contains(".grad") && n.starts_with("branch.scratch."));
        let per_block = branch_grads / cfg.depth;
        assert!(slots < per_block, "{name}: slots {slots} B vs one block's branch gradients {per_block} B");
        assert!(fused.total_bytes() < plain.total_bytes(), "{name}");
        // Nothing else changes.
        for pool in [Pool::Frozen, Pool::Trainable, Pool::Optimizer, Pool::Activations] {
            assert_eq!(fused.pool_bytes(pool), plain.pool_bytes(pool), "{name}: {pool:?}");
        }
    }
    // Methods without branches ignore the option.
    let full = Method::Full;
    let a = snella::model::plan(&cfg, &full, 8, options(Recompute::Block, Precision::Fp32, false)).unwrap();
    let b = snella::model::plan(&cfg, &full, 8, options(Recompute::Block, Precision::Fp32, true)).unwrap();
    assert_eq!(a.total_bytes(), b.total_bytes());
}

#[test]
fn a_fused_model_refuses_what_would_read_its_dropped_gradients() {
    let method = Method::parse("snella8", 0.5).unwrap();
    let mut m = model(&method, options(Recompute::Block, Precision::Fp32, true));
    let a = allocator(&m, &method).unwrap();
    let (x, y) = batch(0);
    m.set_batch(&x, &y).unwrap();
    m.forward().unwrap();
    fails(m.backward(), &["backward", "backward_step"]);
    fails(m.adamw_step(1e-3, 0.0), &["adamw_step", "backward_step"]);
    m.backward_step(1e-3, 0.05, Some(a.betas())).unwrap();
    fails(m.get_grad("branch.blocks.1.mlp.fc2.Out_Qs"), &["branch.blocks.1.mlp.fc2.Out_Qs", "fused"]);
    assert!(m.get_grad("head.weight").is_ok(), "the head's gradient is kept");
    fails(a.update(&m), &["allocator", "backward_step"]);
    fails(m.backward_step(f64::NAN, 0.0, None), &["learning rate"]);
    // EMA rates for a method without allocator state.
    let mut lora = model(&Method::parse("lora4", 0.5).unwrap(), options(Recompute::Block, Precision::Fp32, true));
    lora.set_batch(&x, &y).unwrap();
    lora.forward().unwrap();
    fails(lora.backward_step(1e-3, 0.0, Some(a.betas())), &["allocator", "lora"]);
}

#[test]
fn training_fuses_the_update_at_block_only() {
    for rc in [Recompute::None, Recompute::Norms, Recompute::Attention] {
        assert!(!MemoryOptions::for_training(rc, Precision::Fp32).fused_update);
    }
    assert!(MemoryOptions::for_training(Recompute::Block, Precision::Bf16).fused_update);
}
