//! What each method trains and keeps: the plan holds optimizer state for the trainable set only, no merged
//! matrix outlives its layer, GPS updates only its mask, a linear probe moves only the head and cls token,
//! and a step never touches more memory than the plan.
mod common;
use common::{deterministic_params, tiny_layer_scale};
use snella::golden::test_backend;
use snella::model::{plan, Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::Pool;

const METHODS: [&str; 8] = ["full", "linear", "gps", "lora8", "klora8", "mixk8", "snell8", "snella8"];

fn batch(cfg: &ViTConfig, b: usize) -> (Vec<f32>, Vec<i32>) {
    let per = cfg.in_chans * cfg.img_size.0 * cfg.img_size.1;
    ((0..b * per).map(|i| ((i * 31) % 97) as f32 / 48.0 - 1.0).collect(), (0..b as i32).map(|i| i % 10).collect())
}

#[test]
fn optimizer_state_exists_only_for_the_trainable_set_and_no_merged_matrix_is_kept() {
    let cfg = ViTConfig::by_name("vit_b16", 100).unwrap();
    let mut peft_activations = None;
    for name in METHODS {
        let method = Method::parse(name, 0.5).unwrap();
        let plan = plan(&cfg, &method, 8, Recompute::Attention).unwrap();
        let trainable: Vec<&str> =
            plan.tensors().iter().filter(|t| t.pool == Pool::Trainable).map(|t| t.name.as_str()).collect();
        for t in plan.tensors() {
            match t.pool {
                Pool::Grads => assert!(
                    trainable.iter().any(|n| t.name == format!("grad.{n}")),
                    "{name}: gradient {} of a frozen tensor",
                    t.name
                ),
                Pool::Optimizer => {
                    let owner = ["adamw.m.", "adamw.v.", "alloc.ipt.", "alloc.unc.", "gps.mask."]
                        .iter()
                        .find_map(|p| t.name.strip_prefix(p));
                    let owner = owner.unwrap_or_else(|| panic!("{name}: unexpected optimizer tensor {}", t.name));
                    assert!(trainable.contains(&owner), "{name}: optimizer state {} of a frozen tensor", t.name);
                }
                Pool::Activations => assert!(
                    !t.name.contains(".M") && !t.name.contains("branch.scratch"),
                    "{name}: {} kept between forward and backward",
                    t.name
                ),
                _ => {}
            }
        }
        if method.has_branches() || matches!(method, Method::Linear) {
            // The kept activations do not depend on the PEFT method: branches add nothing to them (but the
            // table of per-branch thresholds, one float each).
            let act: usize = plan
                .tensors()
                .iter()
                .filter(|t| t.pool == Pool::Activations && t.name != "act.branch.thresholds")
                .map(|t| t.bytes())
                .sum();
            assert_eq!(
                *peft_activations.get_or_insert(act),
                act,
                "{name}: activations differ from the other PEFT methods"
            );
        }
        let counts = [Pool::Trainable, Pool::Grads].map(|p| plan.pool_bytes(p));
        assert_eq!(counts[0], counts[1], "{name}: one gradient per trainable tensor");
    }
}

#[test]
fn a_step_touches_no_more_than_the_plan() {
    let cfg = tiny_layer_scale();
    for name in METHODS {
        let mut model =
            Model::new(test_backend(), &cfg, Method::parse(name, 0.5).unwrap(), 3, Recompute::Block).unwrap();
        deterministic_params(&model);
        let (x, y) = batch(&cfg, 3);
        model.set_batch(&x, &y).unwrap();
        let loss = model.forward().unwrap();
        assert!(loss.is_finite(), "{name}: loss {loss}");
        model.backward().unwrap();
        model.adamw_step(1e-3, 0.05).unwrap();
        for (pool, u) in model.pool_report() {
            assert!(
                u.peak <= u.planned && u.allocated == u.planned,
                "{name}: {} peak {} > planned {}",
                pool.name(),
                u.peak,
                u.planned
            );
        }
    }
}

#[test]
fn gps_updates_only_its_mask_and_the_linear_probe_only_the_head() {
    let cfg = tiny_layer_scale();
    let (x, y) = batch(&cfg, 2);
    // GPS: a fixed mask on a block weight; unmasked entries must not move (no decay there either).
    let mut model = Model::new(test_backend(), &cfg, Method::Gps { density: 0.1 }, 2, Recompute::None).unwrap();
    deterministic_params(&model);
    let w = "blocks.0.mlp.fc1.weight";
    let before = model.get_param(w).unwrap();
    let mask: Vec<u8> = (0..before.len()).map(|i| (i % 10 == 3) as u8).collect();
    for name in model.gps_mask_names() {
        let v: Vec<u8> = if name == w { mask.clone() } else { vec![0; model.param_len(&name).unwrap()] };
        model.set_gps_mask(&name, &v).unwrap();
    }
    model.set_batch(&x, &y).unwrap();
    model.forward().unwrap();
    model.backward().unwrap();
    model.adamw_step(1e-2, 0.05).unwrap();
    let after = model.get_param(w).unwrap();
    let moved = before.iter().zip(&after).zip(&mask).filter(|((a, b), _)| a != b).map(|(_, &m)| m).collect::<Vec<_>>();
    assert!(!moved.is_empty() && moved.iter().all(|&m| m == 1), "GPS moved entries outside its mask");
    let other = "blocks.1.attn.proj.weight";
    let mut probe = Model::new(test_backend(), &cfg, Method::Gps { density: 0.1 }, 2, Recompute::None).unwrap();
    deterministic_params(&probe);
    assert_eq!(probe.get_param(other).unwrap(), model.get_param(other).unwrap(), "a fully masked weight moved");

    // Linear probe: only head and cls token train.
    probe = Model::new(test_backend(), &cfg, Method::Linear, 2, Recompute::None).unwrap();
    deterministic_params(&probe);
    let names: Vec<String> = probe.trainable_names();
    assert_eq!(names, ["cls_token", "head.weight", "head.bias"]);
    let before = probe.get_param("blocks.0.attn.qkv.weight").unwrap();
    probe.set_batch(&x, &y).unwrap();
    probe.forward().unwrap();
    probe.backward().unwrap();
    probe.adamw_step(1e-2, 0.05).unwrap();
    assert_eq!(before, probe.get_param("blocks.0.attn.qkv.weight").unwrap());
}

#[test]
fn bad_batches_are_errors_not_panics() {
    let cfg = tiny_layer_scale();
    let mut model = Model::new(test_backend(), &cfg, Method::snella(8, 0.5), 2, Recompute::Attention).unwrap();
    let (x, y) = batch(&cfg, 3);
    assert!(model.set_batch(&x, &y).unwrap_err().to_string().contains("batch"));
    let (x, _) = batch(&cfg, 2);
    let err = model.set_batch(&x, &[0, 10]).unwrap_err().to_string();
    assert!(err.contains("label 10"), "{err}");
    assert!(model.forward().unwrap_err().to_string().contains("no batch"));
    assert!(Model::new(test_backend(), &cfg, Method::Full, 0, Recompute::None).is_err());
    assert!(model.set_param("blocks.0.nope", &[1.0]).unwrap_err().to_string().contains("blocks.0.nope"));
    assert!(model.set_param("head.bias", &[1.0]).unwrap_err().to_string().contains("head.bias"));
}

#[test]
fn a_partial_batch_gives_the_same_gradients_as_a_model_planned_for_it() {
    let cfg = tiny_layer_scale();
    let (x, y) = batch(&cfg, 2);
    for name in METHODS {
        let grads = |planned: usize| {
            let mut m =
                Model::new(test_backend(), &cfg, Method::parse(name, 0.5).unwrap(), planned, Recompute::Attention)
                    .unwrap();
            deterministic_params(&m);
            m.set_batch(&x, &y).unwrap();
            let loss = m.forward().unwrap();
            m.backward().unwrap();
            let names: Vec<String> = m.trainable_names();
            (loss, names.iter().map(|n| m.get_grad(n).unwrap()).collect::<Vec<_>>())
        };
        assert!(grads(5) == grads(2), "{name}: a batch of 2 in a model planned for 5 differs");
    }
}
