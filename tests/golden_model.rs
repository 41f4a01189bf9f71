//! Parity of the whole training step with the PyTorch reference: logits, loss, every gradient of the
//! trainable set, the parameters after three AdamW steps, and every mask along them (SNELL/SNELLA cases;
//! a tie inside the reference's tie band is replayed, anything else fails: `golden::MaskCheck`).
//! Walks every case in `$SNELLA_GOLDEN` (default: tests/golden), so a new case needs no code change.
//! Tolerances are the manifest's `suggested_atol` (10× the measured fp32 rounding spread).
use snella::golden::{
    assert_parity, compare, compare_adamw, golden_dir, list_cases, test_backend, Compare, GoldenCase, MaskCheck,
};
use snella::model::{Model, Recompute};

/// A model of the case with its initial parameters, per-branch sparsity and input batch loaded.
pub fn load_case(case: &GoldenCase, recompute: Recompute) -> Model {
    case.build_model(test_backend(), recompute).unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

fn check(case: &GoldenCase, out: &mut Vec<Compare>, key: &str, got: &[f32], skip: &[(usize, usize)]) {
    let noise: usize = skip.iter().map(|(a, b)| b - a).sum();
    if noise == got.len() {
        return; // every entry is rounding noise: only `check_noise` applies (the manifest has no atol)
    }
    let atol = case.atol(key).unwrap_or_else(|| panic!("{}: no suggested_atol for {key}", case.name));
    let c = compare(key, got, case.get(key).unwrap(), atol, skip);
    println!("{:<16} {}", case.name, c.line());
    out.push(c);
}

/// Noise elements (exactly zero in exact arithmetic) compared on their own, with the manifest's rule:
/// gradients to ~1e-6 absolute, AdamW results to 2·lr per step.
fn check_noise(
    case: &GoldenCase,
    out: &mut Vec<Compare>,
    key: &str,
    got: &[f32],
    ranges: &[(usize, usize)],
    atol: f64,
) {
    let want = case.get(key).unwrap();
    for &(a, b) in ranges {
        let c = compare(&format!("{key}[{a}..{b}] (noise)"), &got[a..b], &want[a..b], atol, &[]);
        println!("{:<16} {}", case.name, c.line());
        out.push(c);
    }
}

fn trainable(case: &GoldenCase) -> Vec<String> {
    case.trainable()
}

#[test]
fn forward_backward_and_adamw_match_the_reference() {
    let dir = golden_dir();
    let cases = list_cases(&dir).unwrap();
    assert!(!cases.is_empty(), "no golden cases in {}", dir.display());
    let (mut all, mut mask_failures) = (Vec::new(), Vec::new());
    // Every recompute level must reproduce the reference: recomputation changes memory, never numbers.
    let levels = [Recompute::None, Recompute::Norms, Recompute::Attention, Recompute::Block];
    for (name, rc) in cases.iter().flat_map(|n| levels.iter().map(move |&r| (n, r))) {
        println!("== {name} recompute {rc:?}");
        let case = GoldenCase::load(&dir, name).unwrap();
        let mut model = load_case(&case, rc);
        let names = trainable(&case);

        let loss = model.forward().unwrap();
        check(&case, &mut all, "fwd.loss", &[loss], &[]);
        check(&case, &mut all, "fwd.logits", &model.logits().unwrap(), &[]);
        model.backward().unwrap();
        for n in &names {
            let g = model.get_grad(n).unwrap();
            let noise = case.noise_ranges(n);
            check(&case, &mut all, &format!("grad.{n}"), &g, &noise);
            check_noise(&case, &mut all, &format!("grad.{n}"), &g, &noise, 1e-6);
        }

        // Three AdamW steps on the same batch (lr 1e-3, wd 0.05), as the reference, every mask compared.
        let lr = case.manifest["adamw"]["lr"].as_f64().unwrap();
        let wd = case.manifest["adamw"]["weight_decay"].as_f64().unwrap();
        let mut model = load_case(&case, rc);
        let mut masks = MaskCheck::new(&case).unwrap();
        let mut losses = Vec::new();
        for k in 1..=3 {
            losses.push(masks.forward_backward(&mut model, &format!("adamw{k}")).unwrap());
            model.adamw_step(lr, wd).unwrap();
            for n in &names {
                let p = model.get_param(n).unwrap();
                let key = format!("adamw.step{k}.{n}");
                let noise = case.noise_ranges(n);
                if noise.iter().map(|(a, b)| b - a).sum::<usize>() < p.len() {
                    let c = compare_adamw(&key, &p, case.get(&key).unwrap(), case.atol(&key).unwrap(), &noise, lr, k);
                    println!("{:<16} {}", case.name, c.line());
                    all.push(c);
                }
                check_noise(&case, &mut all, &key, &p, &noise, 2.0 * lr * k as f64);
            }
        }
        check(&case, &mut all, "adamw.loss", &losses, &[]);
        println!("{:<16} {}", case.name, masks.summary());
        mask_failures.extend(masks.failures);
    }
    assert_parity(&all, &mask_failures);
}

/// Recomputation changes memory, never numbers: every level gives bit-identical gradients. On the repository's
/// LayerScale case whatever `SNELLA_GOLDEN` names: another directory of cases need not have it.
#[test]
fn recompute_levels_are_bit_identical() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let case = GoldenCase::load(&dir, "snella_dinov2_ls").unwrap();
    let grads = |rc: Recompute| {
        let mut m = load_case(&case, rc);
        m.forward().unwrap();
        m.backward().unwrap();
        trainable(&case).iter().map(|n| m.get_grad(n).unwrap()).collect::<Vec<_>>()
    };
    let base = grads(Recompute::None);
    for rc in [Recompute::Norms, Recompute::Attention, Recompute::Block] {
        assert!(grads(rc) == base, "gradients at recompute {rc:?} differ from keeping every activation");
    }
}
