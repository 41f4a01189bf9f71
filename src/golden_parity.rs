//! Parity tests that drive internals directly (they moved here from tests/ when `ops` and `runtime` became
//! private): the kernelized merge and competition branch by branch, and AdamW on the golden gradients.
//!
//! Branch parity: the kernelized merge and the magnitude competition with the PyTorch golden cases, branch
//! by branch, on the CPU: for every kernel case (snella / mixk / snell / klora) and every branch of its
//! manifest, M is built from `param.<branch>.{In_Qs, Out_Qs, alpha, gamma, beta}` and compared with
//! `merged.<branch>.M`; for the sparse kinds, t and M_s are compared for each stored s (0.00, 0.50, 0.90)
//! and the kept count must equal the manifest's exactly. The manifest also records t and the kept count
//! of every branch (including blocks whose tensors are not stored, and each branch's own s): those are
//! checked too, t against the manifest value with the atol of the branch's M.
use crate::golden::{compare, golden_dir, list_cases, Compare, GoldenCase};
use crate::ops::kmerge::{merge_forward, Factors, KernelKind, MergeScratch};
use crate::ops::sparsify::{kept_count, sparsify_forward, SparsifyScratch};
use crate::runtime::{Plan, Pool, Runtime};

/// Outcome of one branch: compare lines and kept-count mismatches.
#[derive(Default)]
struct Outcome {
    compares: Vec<Compare>,
    kept_errors: Vec<String>,
}

fn atol_or_floor(case: &GoldenCase, key: &str, reference: &[f32]) -> f64 {
    case.atol(key).unwrap_or_else(|| {
        println!("{}: no suggested_atol for {key}; using 2e-6 * max|ref|", case.name);
        2e-6 * reference.iter().fold(0f64, |m, &x| m.max(x.abs() as f64))
    })
}

fn check_branch(case: &GoldenCase, branch: &str, rec: &serde_json::Value, mix: bool, sparse: bool) -> Outcome {
    let mut out = Outcome::default();
    let a_key = format!("param.{branch}.In_Qs");
    let b_key = format!("param.{branch}.Out_Qs");
    let a_shape = case.shape(&a_key).unwrap_or_else(|| panic!("{}: missing {a_key}", case.name)).to_vec();
    let b_shape = case.shape(&b_key).unwrap_or_else(|| panic!("{}: missing {b_key}", case.name)).to_vec();
    assert!(a_shape.len() == 3 && a_shape[0] == 2 && b_shape.len() == 3 && b_shape[0] == 2 && a_shape[2] == b_shape[2]);
    let (n_in, n_out, d) = (a_shape[1], b_shape[1], a_shape[2]);
    assert_eq!(rec["in"].as_u64(), Some(n_in as u64), "{branch}: manifest in");
    assert_eq!(rec["out"].as_u64(), Some(n_out as u64), "{branch}: manifest out");

    let mut plan = Plan::new();
    let a = plan.f32("In_Qs", &[2, n_in, d], Pool::Trainable);
    let b = plan.f32("Out_Qs", &[2, n_out, d], Pool::Trainable);
    let mixt = [
        plan.f32("alpha", &[1], Pool::Trainable),
        plan.f32("gamma", &[1], Pool::Trainable),
        plan.f32("beta", &[1], Pool::Trainable),
    ];
    let m = plan.f32("M", &[n_in, n_out], Pool::Scratch);
    let ms = plan.f32("M_s", &[n_in, n_out], Pool::Scratch);
    let t = plan.f32("t", &[1], Pool::Scratch);
    let msc = MergeScratch::plan(&mut plan, branch, n_in, n_out, d);
    let csc = SparsifyScratch::plan(&mut plan, branch, n_in * n_out);
    let rt = Runtime::cpu(plan);
    rt.upload(a, case.get(&a_key).unwrap()).unwrap();
    rt.upload(b, case.get(&b_key).unwrap()).unwrap();
    if mix {
        for (tensor, leaf) in mixt.iter().zip(["alpha", "gamma", "beta"]) {
            rt.upload(*tensor, case.get(&format!("param.{branch}.{leaf}")).unwrap()).unwrap();
        }
    }
    let f = Factors { in_qs: a, out_qs: b, mix: mix.then_some(mixt), n_in, n_out, half_rank: d };
    merge_forward(&rt, m, &f, KernelKind::PiecewiseLinear, &msc).unwrap();

    let m_key = format!("merged.{branch}.M");
    let m_ref = case.get(&m_key).unwrap();
    let m_atol = atol_or_floor(case, &m_key, m_ref);
    out.compares.push(compare(&m_key, &rt.download(m).unwrap(), m_ref, m_atol, &[]));
    if !sparse {
        return out;
    }

    // Every recorded sparsification: the stored s values and the branch's own s.
    let mut records: Vec<(String, &serde_json::Value)> =
        rec["sparse"].as_object().expect("sparse record").iter().map(|(k, v)| (k.clone(), v)).collect();
    if let Some(own) = rec.get("own") {
        records.push(("own".into(), own));
    }
    for (s_name, srec) in records {
        let s = srec["s"].as_f64().expect("s") as f32;
        sparsify_forward(&rt, ms, t, m, s, &csc).unwrap();
        let t_got = rt.download(t).unwrap();
        let kept = kept_count(&rt, m, t).unwrap();
        let kept_want = srec["kept"].as_u64().expect("kept") as usize;
        let tag = format!("{branch} s={s} ({s_name})");
        if kept != kept_want {
            out.kept_errors.push(format!("{}: {tag}: kept {kept}, manifest {kept_want}", case.name));
        }
        let t_key = format!("sparse.s{s_name}.{branch}.t");
        let ms_key = format!("sparse.s{s_name}.{branch}.M_s");
        if case.tensors.contains_key(&t_key) {
            let t_ref = case.get(&t_key).unwrap();
            out.compares.push(compare(&t_key, &t_got, t_ref, atol_or_floor(case, &t_key, t_ref), &[]));
        } else {
            let t_ref = [srec["t"].as_f64().expect("t") as f32];
            out.compares.push(compare(&format!("manifest t {tag}"), &t_got, &t_ref, m_atol, &[]));
        }
        if case.tensors.contains_key(&ms_key) {
            let ms_ref = case.get(&ms_key).unwrap();
            let ms_got = rt.download(ms).unwrap();
            out.compares.push(compare(&ms_key, &ms_got, ms_ref, atol_or_floor(case, &ms_key, ms_ref), &[]));
            // The stored M_s carries the golden mask: zeros must coincide exactly.
            let mask_diff = ms_got.iter().zip(ms_ref).filter(|(g, r)| (**g == 0.0) != (**r == 0.0)).count();
            if mask_diff != 0 {
                out.kept_errors
                    .push(format!("{}: {tag}: {mask_diff} mask entries differ from the stored M_s", case.name));
            }
        }
        println!(
            "{:<60} kept {kept:>8} / {:<8} manifest {kept_want:>8}  {}",
            tag,
            n_in * n_out,
            if kept == kept_want { "OK" } else { "NOT OK" }
        );
    }
    out
}

#[test]
fn golden_branches_merge_and_sparsify() {
    let dir = golden_dir();
    let cases = list_cases(&dir).unwrap();
    assert!(!cases.is_empty(), "no golden cases in {}", dir.display());
    let (mut compares, mut kept_errors, mut branches) = (Vec::new(), Vec::new(), 0);
    for name in &cases {
        let case = GoldenCase::load(&dir, name).unwrap();
        let method = &case.manifest["method"];
        let kind = method["kind"].as_str().unwrap_or("?").to_string();
        let (mix, sparse) = match kind.as_str() {
            "snella" => (true, true),
            "mixk" => (true, false),
            "snell" => (false, true),
            "klora" => (false, false),
            other => {
                println!("{name}: method {other}, no kernelized branch; skipped");
                continue;
            }
        };
        if let Some(k) = method["kernel"].as_str() {
            assert_eq!(k, "piecewise_linear", "{name}: kernel {k} is not the official one");
        }
        if let Some(c) = method["coeff"].as_array() {
            assert_eq!(c.iter().map(|v| v.as_f64().unwrap() as f32).collect::<Vec<_>>(), vec![0.1f32, -0.1]);
        }
        let recs = case.manifest["branches"].as_object().expect("branches");
        println!("== {name}: {kind}, {} branches", recs.len());
        for (branch, rec) in recs {
            let o = check_branch(&case, branch, rec, mix, sparse);
            branches += 1;
            for c in &o.compares {
                println!("{name}: {}", c.line());
            }
            compares.extend(o.compares.into_iter().map(|c| (name.clone(), c)));
            kept_errors.extend(o.kept_errors);
        }
        // Per case: the worst tensor of each family, as max|diff|, max|diff|/max|ref| and max|diff|/atol.
        for (family, suffix) in [("M", ".M"), ("t", ".t"), ("M_s", ".M_s")] {
            let worst = compares
                .iter()
                .filter(|(n, c)| n == name && c.key.ends_with(suffix) && !c.key.starts_with("manifest"))
                .max_by(|a, b| (a.1.max_abs / a.1.atol).total_cmp(&(b.1.max_abs / b.1.atol)));
            if let Some((_, c)) = worst {
                println!(
                    "SUMMARY {name:<18} {family:<4} worst {:<52} max|diff| {:.3e}  rel {:.2e}  diff/atol {:.3}",
                    c.key,
                    c.max_abs,
                    c.max_abs / c.ref_max.max(1e-30),
                    c.max_abs / c.atol
                );
            }
        }
    }
    let worst = compares.iter().map(|(_, c)| c.max_abs / c.atol.max(1e-30)).fold(0f64, f64::max);
    println!("{branches} branches, {} tensors compared; worst max|diff|/atol = {worst:.3}", compares.len());
    let bad: Vec<String> =
        compares.iter().filter(|(_, c)| !c.ok()).map(|(n, c)| format!("{n}: {}", c.line())).collect();
    assert!(branches > 0, "no kernelized branch found in {}", dir.display());
    assert!(
        bad.is_empty() && kept_errors.is_empty(),
        "golden mismatches:\n{}\n{}",
        bad.join("\n"),
        kept_errors.join("\n")
    );
}

/// The optimizer alone, as the reference README suggests: the golden gradients fed into our AdamW must give
/// the golden first step to about one ulp (no forward/backward error to amplify here).
#[test]
fn adamw_on_golden_gradients_matches_step1() {
    use crate::ops::adamw::{adamw, AdamWStep};
    let dir = golden_dir();
    for name in list_cases(&dir).unwrap() {
        let case = GoldenCase::load(&dir, &name).unwrap();
        let lr = case.manifest["adamw"]["lr"].as_f64().unwrap();
        let wd = case.manifest["adamw"]["weight_decay"].as_f64().unwrap();
        for n in case.trainable() {
            let p0 = case.get(&format!("param.{n}")).unwrap();
            let mut plan = Plan::new();
            let [p, g, m, v] = ["p", "g", "m", "v"].map(|k| plan.f32(k, &[p0.len()], Pool::Trainable));
            let rt = Runtime::cpu(plan);
            rt.upload(p, p0).unwrap();
            rt.upload(g, case.get(&format!("grad.{n}")).unwrap()).unwrap();
            let decay = case.manifest["weight_decay"][&n].as_bool().unwrap();
            let st =
                AdamWStep { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: if decay { wd } else { 0.0 }, t: 1 };
            adamw(&rt, p, g, m, v, st).unwrap();
            let got = rt.download(p).unwrap();
            let want = case.get(&format!("adamw.step1.{n}")).unwrap();
            // "About one ulp": of the largest operand of the final p + step (the parameter or the step),
            // since the reference's step-1 gradient may differ from grad.* by rounding (threaded GEMMs).
            let ulp = |x: f32| f32::from_bits(x.abs().to_bits() + 1) - x.abs();
            for (i, ((&a, &b), &x0)) in got.iter().zip(want).zip(p0).enumerate() {
                let scale = b.abs().max(x0.abs()).max((b - x0).abs());
                assert!(
                    (a - b).abs() <= 2.0 * ulp(scale),
                    "{name}: adamw.step1.{n}[{i}]: {a} vs {b} (1 ulp = {:e})",
                    ulp(scale)
                );
            }
        }
    }
}

/// The repository's own cases (the planted tests below need these exact cases, whatever `SNELLA_GOLDEN` says).
fn repository_case(name: &str) -> GoldenCase {
    GoldenCase::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden"), name).unwrap()
}

/// The mask replay takes exactly the threshold path: a model that replays the kept sets another model selected
/// with |M| > t at other ratios gives that model's loss, logits and gradients bit for bit, at the recompute
/// levels that rebuild nothing (None) and the most (Block: the qkv and fc1 Linears run again in the backward).
#[test]
fn mask_replay_is_the_threshold_path_bit_for_bit() {
    let case = repository_case("snella_tiny");
    let replayed = ["branch.blocks.0.attn.v", "branch.blocks.1.mlp.fc1", "branch.blocks.1.attn.proj"];
    for rc in [crate::model::Recompute::None, crate::model::Recompute::Block] {
        let run = |model: &mut crate::model::Model| {
            let loss = model.forward().unwrap();
            model.backward().unwrap();
            let grads: Vec<Vec<f32>> = case.trainable().iter().map(|n| model.get_grad(n).unwrap()).collect();
            (loss, model.logits().unwrap(), grads)
        };
        let kept_sets = |model: &crate::model::Model| -> Vec<(String, Vec<bool>)> {
            let mats = model.sparse_branch_matrices().unwrap();
            let kept = |(b, m, t): (String, Vec<f32>, f32)| (b, m.iter().map(|x| x.abs() > t).collect());
            mats.into_iter().filter(|(b, _, _)| replayed.contains(&b.as_str())).map(kept).collect()
        };
        let mut want = case.build_model(crate::golden::test_backend(), rc).unwrap();
        let expected = run(&mut want);
        let masks = kept_sets(&want);
        assert_eq!(masks.len(), replayed.len());

        // The same case with other ratios on those branches: other kept sets, until the replay restores them.
        let mut got = case.build_model(crate::golden::test_backend(), rc).unwrap();
        let names = got.branch_names();
        for b in replayed {
            let i = names.iter().position(|n| n == b).unwrap();
            got.sparsity_mut()[i] = if got.sparsity()[i] > 0.5 { 0.2 } else { 0.8 };
        }
        got.forward().unwrap();
        for ((b, own), (_, theirs)) in kept_sets(&got).iter().zip(&masks) {
            assert_ne!(own, theirs, "{b}: the other ratio keeps the same set; the test would prove nothing");
        }
        got.replay_masks(masks).unwrap();
        let replay = run(&mut got);
        assert!(replay.0 == expected.0, "{rc:?}: loss {} with the replay, {} by threshold", replay.0, expected.0);
        assert!(replay.1 == expected.1, "{rc:?}: logits differ between the replay and the threshold path");
        for ((n, g), w) in case.trainable().iter().zip(&replay.2).zip(&expected.2) {
            assert!(g == w, "{rc:?}: grad.{n} differs between the replay and the threshold path");
        }
        got.replay_masks(Vec::new()).unwrap();
        assert!(run(&mut got).0 != expected.0, "{rc:?}: the replay did not end");
    }
}

/// Ties and bugs planted in a reference mask along snell_tiny's AdamW run, at the branch and step where the
/// reference's tie band holds two entries (adamw2, branch.blocks.1.mlp.fc2: 4168 kept, 5375 dropped).
/// A swap of the two is a tie: reported, replayed (so step 2 then leaves the unplanted reference), not a
/// failure. A swap with an entry outside the band, or one entry flipped (the count changes), fails, naming
/// the phase, branch, index, |M| and t.
#[test]
fn planted_ties_are_replayed_and_planted_bugs_are_named() {
    use crate::golden::{compare_adamw, MaskCheck, TrajectoryMasks};
    let case = repository_case("snell_tiny");
    let (phase, branch) = ("adamw2", "branch.blocks.1.mlp.fc2");
    let lr = case.manifest["adamw"]["lr"].as_f64().unwrap();
    let wd = case.manifest["adamw"]["weight_decay"].as_f64().unwrap();
    // Two AdamW steps with the reference's masks changed by `plant`; the check, and whether the branch's In_Qs
    // after step 2 is within tolerance of the reference's.
    let run = |what: &str, plant: &dyn Fn(&mut Vec<bool>)| {
        println!("-- {what}, planted in the reference's mask at {phase} {branch}");
        let mut masks = TrajectoryMasks::load(&case).unwrap().unwrap();
        let rec = masks.get_mut(phase, branch).unwrap();
        assert_eq!((rec.tie_band.clone(), rec.mask[4168], rec.mask[5375]), (vec![4168, 5375], true, false));
        plant(&mut rec.mask);
        let mut check = MaskCheck::with_masks(&case.name, Some(masks));
        let mut model = case.build_model(crate::golden::test_backend(), crate::model::Recompute::None).unwrap();
        for k in 1..=2 {
            check.forward_backward(&mut model, &format!("adamw{k}")).unwrap();
            model.adamw_step(lr, wd).unwrap();
        }
        let key = format!("adamw.step2.{branch}.In_Qs");
        let got = model.get_param(&format!("{branch}.In_Qs")).unwrap();
        let c = compare_adamw(&key, &got, case.get(&key).unwrap(), case.atol(&key).unwrap(), &[], lr, 2);
        println!("{} {}\n{}", case.name, check.summary(), c.line());
        (check, c.ok())
    };

    let (unplanted, ok) = run("nothing", &|_| {});
    assert!(unplanted.failures.is_empty() && unplanted.ties.is_empty() && ok, "the unplanted run must pass");
    assert_eq!(unplanted.compared, 2 * 12);

    let (tie, ok) = run("a swap inside the band (a tie)", &|mask| mask.swap(4168, 5375));
    assert!(tie.failures.is_empty(), "a swap inside the band is a tie: {:?}", tie.failures);
    assert_eq!(tie.ties.len(), 1);
    let line = tie.ties[0].line();
    assert!(line.starts_with("tie at adamw2 branch.blocks.1.mlp.fc2: entries 4168, 5375 within "), "{line}");
    assert!(line.ends_with("·t of t; reference mask replayed"), "{line}");
    assert!(!ok, "the planted mask was replayed: the run leaves the unplanted reference's");

    // The first entry the reference drops outside the band, swapped with the band's kept one.
    let (outside, _) = run("a swap with an entry outside the band (must fail)", &|mask| {
        let j = (0..mask.len()).find(|&j| !mask[j] && j != 5375).unwrap();
        mask.swap(4168, j);
    });
    assert_eq!(outside.failures.len(), 1, "{:?}", outside.failures);
    let msg = &outside.failures[0];
    assert!(msg.starts_with("snell_tiny: mask at adamw2 branch.blocks.1.mlp.fc2: 1 of 2 differing entries outside"));
    assert!(msg.contains("(|M| ") && msg.contains(", t ") && msg.contains("kept by the reference only"), "{msg}");
    assert!(outside.ties.is_empty());

    let (flipped, _) = run("one band entry flipped (must fail)", &|mask| mask[5375] = true);
    assert_eq!(flipped.failures.len(), 1, "{:?}", flipped.failures);
    let msg = &flipped.failures[0];
    assert!(msg.contains("mask at adamw2 branch.blocks.1.mlp.fc2: inside the tie band but not a swap"), "{msg}");
    assert!(msg.contains("the engine keeps 820, the reference 821") && msg.contains("entry 5375 (|M| "), "{msg}");
}
