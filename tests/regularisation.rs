//! Branch dropout, branch drop-path and block drop-path (stochastic depth), as the official recipe has them:
//! with vanishing rates the unmerged branch path reproduces the golden cases; with real rates the masks
//! are regenerated in the backward (the gradient matches the loss's directional derivative), they change
//! from step to step, and evaluation turns them off.
use snella::golden::{compare, golden_dir, list_cases, test_backend, GoldenCase};
use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::{KernelMethod, Method};
use snella::KernelKind;

fn with_rates(method: Method, dropout: f32, drop_path: f32) -> Method {
    match method {
        Method::Kernel(k) => Method::Kernel(KernelMethod { dropout, drop_path, ..k }),
        m => m,
    }
}

/// Every case with kernel branches in `$SNELLA_GOLDEN` (default tests/golden), through the unmerged path.
#[test]
fn the_unmerged_branch_path_matches_the_golden_cases() {
    let dir = golden_dir();
    let mut tested = 0;
    for name in list_cases(&dir).unwrap() {
        let case = GoldenCase::load(&dir, &name).unwrap();
        if !matches!(case.method().unwrap(), Method::Kernel(_)) {
            continue;
        }
        tested += 1;
        // Rates below 2^-24 keep every entry with scale 1 but force x·W0ᵀ + b + Dropout(x)·M_s, branch by
        // branch (the reference's own op layout) instead of the merged weight.
        let method = with_rates(case.method().unwrap(), 1e-12, 1e-12);
        let mut m = case.build_model_with(test_backend(), Recompute::Attention, method).unwrap();
        let loss = m.forward().unwrap();
        for (key, got) in [("fwd.loss", vec![loss]), ("fwd.logits", m.logits().unwrap())] {
            let c = compare(key, &got, case.get(key).unwrap(), case.atol(key).unwrap(), &[]);
            assert!(c.ok(), "{name}: {}", c.line());
        }
        m.backward().unwrap();
        for n in case.trainable() {
            let key = format!("grad.{n}");
            let noise = case.noise_ranges(&n);
            let g = m.get_grad(&n).unwrap();
            let want = case.get(&key).unwrap();
            // β of a key branch: ∂L/∂β_k = Σ ∂L/∂M over the key slice, which softmax's shift invariance drives
            // to ~0 as it does the key bias (listed as noise by the manifest); compared as noise: 1e-6 absolute.
            let key_beta = n.ends_with("attn.k.beta");
            if key_beta || noise.iter().map(|(a, b)| b - a).sum::<usize>() == g.len() {
                let c = compare(&key, &g, want, 1e-6, &[]);
                assert!(c.ok(), "{name}: {}", c.line());
                continue;
            }
            let c = compare(&key, &g, want, case.atol(&key).unwrap(), &noise);
            assert!(c.ok(), "{name}: {}", c.line());
        }
    }
    assert!(tested > 0, "no case with kernel branches in {}", dir.display());
}

fn tiny_ls() -> ViTConfig {
    ViTConfig { layer_scale: true, ..ViTConfig::by_name("tiny", 10).unwrap() }
}

fn model(method: Method, block_drop_path: f32) -> Model {
    let cfg = tiny_ls();
    let mut m = Model::new(test_backend(), &cfg, method, 3, Recompute::Attention).unwrap();
    for (i, name) in m.param_names().iter().enumerate() {
        let n = m.param_len(name).unwrap();
        let one = name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name == "norm.weight";
        let v: Vec<f32> = if one {
            vec![1.0; n]
        } else {
            (0..n).map(|j| 0.08 * (((j * 7919 + i * 104729) % 2001) as f32 / 1000.0 - 1.0)).collect()
        };
        m.set_param(name, &v).unwrap();
    }
    m.init_branches(5).unwrap();
    // Factors scaled up so the branches matter at this size.
    for prefix in m.branch_names() {
        for leaf in ["In_Qs", "Out_Qs"] {
            let n = format!("{prefix}.{leaf}");
            let v: Vec<f32> = m.get_param(&n).unwrap().iter().map(|x| x * 20.0).collect();
            m.set_param(&n, &v).unwrap();
        }
    }
    m.set_block_drop_path(block_drop_path).unwrap();
    m.set_regularisation_seed(42);
    let per = 3 * 32 * 32;
    let x: Vec<f32> = (0..3 * per).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect();
    m.set_batch(&x, &[1, 4, 7]).unwrap();
    m
}

/// (loss(θ + εv) − loss(θ − εv)) / 2ε against ∇loss·v along v = ∇/|∇| for the named parameters: the
/// masks of a step are fixed by (seed, step), so the loss is a smooth function of θ for this check.
fn directional_check(m: &mut Model, names: &[&str]) {
    m.forward().unwrap();
    m.backward().unwrap();
    for &n in names {
        let (p0, g) = (m.get_param(n).unwrap(), m.get_grad(n).unwrap());
        let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!(norm > 0.0, "{n}: zero gradient");
        // A step of 0.5% of the parameter's norm along the gradient.
        let pnorm = p0.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt().max(1e-3);
        let eps = 5e-3 * pnorm;
        let at = |s: f64, m: &mut Model| {
            let p: Vec<f32> = p0.iter().zip(&g).map(|(&p, &g)| p + (s * eps * g as f64 / norm) as f32).collect();
            m.set_param(n, &p).unwrap();
            m.forward().unwrap() as f64
        };
        let numeric = (at(1.0, m) - at(-1.0, m)) / (2.0 * eps);
        m.set_param(n, &p0).unwrap();
        assert!(
            (numeric - norm).abs() <= 0.02 * norm,
            "{n}: directional derivative {numeric:.6e} vs |grad| {norm:.6e}"
        );
    }
}

#[test]
fn masks_are_regenerated_exactly_in_the_backward() {
    // Dense mixture (no magnitude threshold, so the loss is smooth), branch dropout 0.3, drop-path 0.3,
    // block drop-path 0.4.
    let k = KernelMethod {
        kernel: KernelKind::PiecewiseLinear,
        r: 8,
        mixture: true,
        sparse: false,
        sparsity: 0.0,
        allocator: false,
        dropout: 0.3,
        drop_path: 0.3,
    };
    let mut m = model(Method::Kernel(k), 0.4);
    directional_check(
        &mut m,
        &[
            "cls_token",
            "branch.blocks.0.attn.q.In_Qs",
            "branch.blocks.1.mlp.fc2.Out_Qs",
            "branch.blocks.0.mlp.fc1.alpha",
        ],
    );
    // Full fine-tuning with LayerScale and block drop-path: the γ gradient sees the dropped samples.
    let mut m = model(Method::Full, 0.5);
    directional_check(&mut m, &["blocks.1.ls1.gamma", "blocks.1.ls2.gamma", "blocks.0.mlp.fc1.weight"]);
}

#[test]
fn masks_change_each_step_and_evaluation_turns_them_off() {
    let k = KernelMethod {
        kernel: KernelKind::PiecewiseLinear,
        r: 8,
        mixture: true,
        sparse: true,
        sparsity: 0.5,
        allocator: false,
        dropout: 0.5,
        drop_path: 0.5,
    };
    let mut m = model(Method::Kernel(k), 0.5);
    let a = m.forward().unwrap();
    assert_eq!(a, m.forward().unwrap(), "the same step draws the same masks");
    m.set_step_count(m.step_count() + 1);
    let b = m.forward().unwrap();
    assert_ne!(a, b, "a new step draws new masks");
    m.set_training(false);
    let e1 = m.forward().unwrap();
    m.set_step_count(m.step_count() + 1);
    assert_eq!(e1, m.forward().unwrap(), "evaluation is deterministic: no masks");
    // Evaluation equals the same model without regularisation (the merged path).
    let mut plain = model(Method::Kernel(KernelMethod { dropout: 0.0, drop_path: 0.0, ..k }), 0.0);
    let e2 = plain.forward().unwrap();
    assert!((e1 - e2).abs() <= 1e-6 * e2.abs(), "eval {e1} vs unregularised {e2}");
}
