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
