//! Parity of SNELLA's bi-level allocator with the reference: the cubic budget per epoch, the layer scores,
//! the integer allocations and the ratios (exactly), every mask along the run (a tie inside the reference's
//! tie band is replayed, anything else fails: `golden::MaskCheck`), the losses along the run, the final EMA
//! importance and parameters, and the manifest's allocator unit vectors (budget → allocation from the final
//! EMA state).
use snella::golden::{
    assert_parity, compare, compare_adamw, golden_dir, list_cases, test_backend, Compare, GoldenCase, MaskCheck,
};
use snella::model::{Model, Recompute};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::{KernelMethod, Method};
use snella::KernelKind;

fn model_with_allocator(case: &GoldenCase) -> Model {
    let m = &case.manifest["method"];
    let r = m["r"].as_u64().unwrap() as usize;
    let mixture = m["kind"].as_str() == Some("snella");
    let method = Method::Kernel(KernelMethod {
        kernel: KernelKind::PiecewiseLinear,
        r,
        mixture,
        sparse: true,
        sparsity: 0.0,
        allocator: true,
        dropout: 0.0,
        drop_path: 0.0,
    });
    let cfg = case.vit_config();
    let mut model = Model::new(test_backend(), &cfg, method, case.labels.len(), Recompute::default()).unwrap();
    for name in model.param_names() {
        let key = if case.tensors.contains_key(&format!("param.{name}")) {
            format!("param.{name}")
        } else {
            format!("frozen.{name}")
        };
        model.set_param(&name, case.get(&key).unwrap()).unwrap();
    }
    model.set_batch(case.get("input.images").unwrap(), &case.labels).unwrap();
    model
}

fn check(case: &GoldenCase, out: &mut Vec<Compare>, key: &str, got: &[f32]) {
    let atol = case.atol(key).unwrap_or_else(|| panic!("{}: no suggested_atol for {key}", case.name));
    let c = compare(key, got, case.get(key).unwrap(), atol, &[]);
    println!("{:<16} {}", case.name, c.line());
    out.push(c);
}

#[test]
fn allocator_run_matches_the_reference() {
    let dir = golden_dir();
    let (mut all, mut mask_failures) = (Vec::new(), Vec::new());
    let mut ran = 0;
    for name in list_cases(&dir).unwrap() {
        let case = GoldenCase::load(&dir, &name).unwrap();
        let rec = &case.manifest["alloc"];
        if rec.is_null() {
            continue;
        }
        ran += 1;
        let st = &rec["settings"];
        let f = |k: &str| st[k].as_f64().unwrap();
        let cfg = AllocatorConfig {
            init_ratio: f("init_ratio"),
            target_ratio: f("target_ratio"),
            init_warmup: f("init_warmup") as usize,
            final_warmup: f("final_warmup") as usize,
            mask_interval: f("mask_interval") as usize,
            beta1: f("beta1"),
            beta2: f("beta2"),
            total_epochs: f("epochs") as usize,
        };
        let mut model = model_with_allocator(&case);
        let alloc = Allocator::new(&model, cfg).unwrap();
        assert_eq!(alloc.init_nonzero, f("I_tot"), "{name}: I_tot");
        assert_eq!(alloc.target_nonzero, f("T_tot"), "{name}: T_tot");
        alloc.reset(&mut model);
        let mut masks = MaskCheck::new(&case).unwrap();
        let mut losses = Vec::new();
        for (e, ep) in rec["epochs"].as_array().unwrap().iter().enumerate() {
            let (budget, re) = alloc.schedule(e);
            assert_eq!(budget, ep["budget"].as_f64().unwrap(), "{name}: budget of epoch {e}");
            assert_eq!(re, ep["reallocated"].as_bool().unwrap(), "{name}: reallocation at epoch {e}");
            if re {
                let r = alloc.reallocate(&mut model, budget).unwrap();
                check(&case, &mut all, &format!("alloc.epoch{e}.scores"), &r.scores);
                let want: Vec<i32> =
                    ep["alloc"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
                assert_eq!(r.alloc, want, "{name}: integer allocation of epoch {e}");
            }
            let want_sp: Vec<f64> = ep["sparsity"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got_sp: Vec<f64> = model.sparsity().iter().map(|&s| s as f64).collect();
            for (g, w) in got_sp.iter().zip(&want_sp) {
                assert_eq!(*g as f32, *w as f32, "{name}: sparsity of epoch {e}: {got_sp:?} vs {want_sp:?}");
            }
            for s in 0..st["steps_per_epoch"].as_u64().unwrap() {
                losses.push(masks.forward_backward(&mut model, &format!("alloc_e{e}s{s}")).unwrap());
                model.adamw_step(f("lr"), f("weight_decay")).unwrap();
                alloc.update(&model).unwrap();
            }
        }
        check(&case, &mut all, "alloc.loss", &losses);
        println!("{name:<16} {}", masks.summary());
        mask_failures.extend(std::mem::take(&mut masks.failures));
        for prefix in model.branch_names() {
            for leaf in ["In_Qs", "Out_Qs"] {
                for (ema, key) in [("ipt", "exp_avg_ipt"), ("unc", "exp_avg_unc")] {
                    let got = model.read_tensor(&format!("alloc.{ema}.{prefix}.{leaf}")).unwrap();
                    check(&case, &mut all, &format!("alloc.final.{key}.{prefix}.{leaf}"), &got);
                }
            }
        }
        let steps = losses.len();
        for n in case.manifest["trainable"].as_array().unwrap() {
            let n = n.as_str().unwrap();
            let key = format!("alloc.final.param.{n}");
            let c = compare_adamw(
                &key,
                &model.get_param(n).unwrap(),
                case.get(&key).unwrap(),
                case.atol(&key).unwrap(),
                &[],
                f("lr"),
                steps,
            );
            println!("{:<16} {}", case.name, c.line());
            all.push(c);
        }
        // Unit vectors: budgets → integer allocations and ratios from the final EMA state, exactly.
        for u in rec["unit"].as_array().unwrap() {
            let budget = u["budget"].as_f64().unwrap();
            let r = alloc.reallocate(&mut model, budget).unwrap();
            let want: Vec<i32> = u["alloc"].as_array().unwrap().iter().map(|v| v.as_i64().unwrap() as i32).collect();
            assert_eq!(r.alloc, want, "{name}: unit allocation for budget {budget}");
            let want_sp: Vec<f64> = u["sparsity"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(r.sparsity, want_sp, "{name}: unit ratios for budget {budget}");
            println!("{name:<16} unit budget {budget}: allocation and ratios identical");
        }
    }
    assert!(ran > 0, "no golden case with an allocator run in {}", dir.display());
    assert_parity(&all, &mask_failures);
}
