//! bf16 storage (`Precision::Bf16`): the frozen block weights and the kept residual stream are bf16, the
//! trainable set and all math fp32. What it must do: save exactly the planned bytes, stay close to the fp32
//! model, keep recomputation exact (every level gives bit-identical gradients, because the forward itself
//! runs on the rounded stream), and train.
mod common;
use common::{deterministic_params, tiny_layer_scale};
use snella::golden::test_backend;
use snella::model::{plan, MemoryOptions, Model, Precision, Recompute, ViTConfig};
use snella::peft::{KernelMethod, Method};
use snella::{mib, DType, Pool};

const METHODS: [&str; 8] = ["full", "linear", "gps", "lora8", "snell8", "snella8", "mixk8", "snella8-reg"];

fn bf16(recompute: Recompute) -> MemoryOptions {
    MemoryOptions { recompute, precision: Precision::Bf16, fused_update: false }
}

/// Deterministic weights (LayerNorm scales and α, γ at 1), the same for every precision. `snella8-reg`:
/// SNELLA-8 with branch dropout and drop-path (the unmerged branch path).
fn model(method: &str, memory: MemoryOptions) -> Model {
    let cfg = tiny_layer_scale();
    let method = match method {
        "snella8-reg" => match Method::parse("snella8", 0.5).unwrap() {
            Method::Kernel(k) => Method::Kernel(KernelMethod { dropout: 0.1, drop_path: 0.1, ..k }),
            _ => unreachable!(),
        },
        m => Method::parse(m, 0.5).unwrap(),
    };
    let mut m = Model::new(test_backend(), &cfg, method, 3, memory).unwrap();
    deterministic_params(&m);
    let per = 3 * 32 * 32;
    let images: Vec<f32> = (0..3 * per).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect();
    m.set_batch(&images, &[1, 4, 7]).unwrap();
    m
}

fn step(m: &mut Model) -> (f32, Vec<Vec<f32>>) {
    let loss = m.forward().unwrap();
    m.backward().unwrap();
    (loss, m.trainable_names().iter().map(|n| m.get_grad(n).unwrap()).collect())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-30)
}

#[test]
fn bf16_saves_exactly_the_frozen_block_weights_and_the_kept_stream() {
    let cfg = ViTConfig::by_name("vit_b16", 100).unwrap();
    let (d, f, l) = (cfg.embed_dim, cfg.mlp_hidden, cfg.depth);
    let bt = 8 * cfg.tokens();
    for name in ["snella32", "lora8", "linear"] {
        let method = Method::parse(name, 0.5).unwrap();
        let p32 = plan(&cfg, &method, 8, Recompute::Block).unwrap();
        let p16 = plan(&cfg, &method, 8, bf16(Recompute::Block)).unwrap();
        // Frozen: the four block Linear weights at 2 bytes instead of 4 (sizes are multiples of 256 bytes).
        let block_weights = l * (3 * d * d + d * d + 2 * d * f);
        assert_eq!(p32.pool_bytes(Pool::Frozen) - p16.pool_bytes(Pool::Frozen), 2 * block_weights, "{name}");
        // Activations: the L + 1 block inputs (at `Block` the mid-block sums are recomputed, not kept).
        let stream = (l + 1) * bt * d;
        assert_eq!(p32.pool_bytes(Pool::Activations) - p16.pool_bytes(Pool::Activations), 2 * stream, "{name}");
        for t in p16.tensors() {
            let is_block_weight = t.pool == Pool::Frozen && t.name.starts_with("blocks.") && t.shape.len() == 2;
            let is_stream = t.name.starts_with("act.resid.") || t.name.ends_with(".x_mid");
            assert_eq!(t.dtype == DType::BF16, is_block_weight || is_stream, "{name}: {} is {:?}", t.name, t.dtype);
        }
        // Nothing trainable changes.
        for pool in [Pool::Trainable, Pool::Grads, Pool::Optimizer] {
            assert_eq!(p32.pool_bytes(pool), p16.pool_bytes(pool), "{name}: {pool:?}");
        }
    }
    // Full fine-tuning trains the block weights: they stay fp32 masters.
    let full = Method::Full;
    let (a, b) =
        (plan(&cfg, &full, 8, Recompute::Block).unwrap(), plan(&cfg, &full, 8, bf16(Recompute::Block)).unwrap());
    assert_eq!(a.pool_bytes(Pool::Frozen), b.pool_bytes(Pool::Frozen));
}

/// The memory targets of issue #15: SNELLA-32 as `snella train --recompute block` plans it, at batch 8,
/// 224 px, at most 0.40× (fp32) and 0.25× (bf16 storage) the paper's SNELL-32 figure on each of ViT-B/L/H.
/// These are plan bytes, the same on every machine.
#[test]
fn snella32_at_block_is_within_040_fp32_and_025_bf16_of_the_papers_snell32() {
    for (precision, target) in [(Precision::Fp32, 0.40), (Precision::Bf16, 0.25)] {
        for (model, paper_mb) in [("vit_b16", 1673.0), ("vit_l16", 4519.0), ("vit_h14", 9692.0)] {
            let cfg = ViTConfig::by_name(model, 100).unwrap();
            let memory = MemoryOptions::for_training(Recompute::Block, precision);
            let p = plan(&cfg, &Method::parse("snella32", 0.5).unwrap(), 8, memory).unwrap();
            let ratio = mib(p.total_bytes()) / paper_mb;
            let total = mib(p.total_bytes());
            assert!(ratio <= target, "{model} {precision:?}: {total:.1} MiB = {ratio:.3} of the paper's SNELL-32");
        }
    }
}

#[test]
fn bf16_stays_close_to_fp32_for_every_method() {
    for name in METHODS {
        let (l32, g32) = step(&mut model(name, Recompute::Attention.into()));
        let (l16, g16) = step(&mut model(name, bf16(Recompute::Attention)));
        assert!((l16 - l32).abs() <= 1e-2 * l32.abs(), "{name}: loss {l16} (bf16) vs {l32} (fp32)");
        assert_eq!(g32.len(), g16.len());
        let all = |g: &[Vec<f32>]| g.concat();
        let c = cosine(&all(&g32), &all(&g16));
        assert!(c >= 0.999, "{name}: the whole gradient has cosine {c} to fp32");
        // Tensor by tensor, except those whose gradient is rounding noise next to the largest (e.g. a mixture
        // scalar at 1e-9 when the factors' gradients are 1e-2).
        let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let top = g32.iter().map(|g| norm(g)).fold(0.0, f64::max);
        for (k, (a, b)) in g32.iter().zip(&g16).enumerate() {
            if norm(a) < 1e-4 * top {
                continue;
            }
            let c = cosine(a, b);
            assert!(c >= 0.99, "{name}: gradient {k} has cosine {c} to fp32");
        }
    }
}

#[test]
fn bf16_recompute_levels_are_bit_identical() {
    for name in ["snella8", "snella8-reg", "lora8", "linear"] {
        let base = step(&mut model(name, bf16(Recompute::None)));
        for rc in [Recompute::Norms, Recompute::Attention, Recompute::Block] {
            assert!(step(&mut model(name, bf16(rc))) == base, "{name}: bf16 gradients at {rc:?} differ from None");
        }
    }
}

#[test]
fn bf16_trains() {
    let mut m = model("snella8", bf16(Recompute::Block));
    let first = m.forward().unwrap();
    let mut last = first;
    for _ in 0..15 {
        m.backward().unwrap();
        m.adamw_step(5e-3, 0.0).unwrap();
        last = m.forward().unwrap();
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    // Frozen bf16 weights read back as the rounded values they hold.
    let w = m.get_param("blocks.0.mlp.fc1.weight").unwrap();
    assert!(w.iter().all(|x| x.to_bits() & 0xFFFF == 0), "bf16 weights read back with low mantissa bits");
}
