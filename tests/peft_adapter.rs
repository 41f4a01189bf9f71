//! LoRA runs as peft adapters: the layout peft loads (keys, shapes, `adapter_config.json`) for timm and for
//! Hugging Face ViT and DINOv2, and its meaning: the weights peft builds from the base model and the adapter
//! (`W + (lora_alpha / r)·lora_B·lora_A` per target, rank and alpha from `rank_pattern`/`alpha_pattern`) are
//! the merged weights of the snella model. SNELL/SNELLA and the other methods are refused.
mod common;
use common::*;

use std::collections::BTreeMap;

use snella::model::load::{TensorMap, Weights};
use snella::model::{Model, Recompute};
use snella::peft::Method;
use snella::train::export::merged_weights;
use snella::train::peft_adapter::{peft_adapter, write_peft_adapter, PeftAdapter, PeftLayout, ADAPTER_FILES};
use snella::{Backend, Device, Error};

/// A LoRA-`r` model of `cfg` on a random backbone, with random (non-zero) factors, head and cls token.
fn lora_model(cfg: &ViTConfig, r: usize) -> Model {
    let model = Model::new(Backend::new(Device::Cpu).unwrap(), cfg, Method::Lora { r }, 1, Recompute::None).unwrap();
    let weights = Weights { tensors: random_backbone(cfg, 11), source: PathBuf::from("<random>") };
    model.load_backbone(&weights).unwrap();
    model.init_branches(5).unwrap();
    let bias: Vec<f32> = (0..cfg.num_classes).map(|k| 0.1 * k as f32).collect();
    model.set_param("head.bias", &bias).unwrap();
    model
}

/// A ViT without LayerScale (Hugging Face `ViTForImageClassification`): the small config, LayerScale off.
fn plain_cfg() -> ViTConfig {
    ViTConfig { layer_scale: false, ..small_cfg() }
}

/// `adapter["base_model.model.<name>"]`.
fn get<'a>(a: &'a PeftAdapter, name: &str) -> &'a (Vec<usize>, Vec<f32>) {
    a.tensors.get(&format!("base_model.model.{name}")).unwrap_or_else(|| panic!("no tensor {name}"))
}

/// The weight peft computes for a target module: base + (alpha / r)·B·A, with r and alpha of the module.
fn peft_weight(a: &PeftAdapter, module: &str, base: &[f32]) -> Vec<f32> {
    let (sa, va) = get(a, &format!("{module}.lora_A.weight"));
    let (sb, vb) = get(a, &format!("{module}.lora_B.weight"));
    let (r, n_in, n_out) = (sa[0], sa[1], sb[0]);
    assert_eq!(sb[1], r, "{module}: lora_B's columns are lora_A's rows");
    let pattern = |key: &str, default: &serde_json::Value| {
        let p = &a.config[key];
        p.as_object()
            .unwrap()
            .iter()
            .find(|(k, _)| module.ends_with(k.as_str()))
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| default.clone())
    };
    let (rank, alpha) = (pattern("rank_pattern", &a.config["r"]), pattern("alpha_pattern", &a.config["lora_alpha"]));
    assert_eq!(rank.as_u64(), Some(r as u64), "{module}: the config's rank is the tensors'");
    let scale = alpha.as_f64().unwrap() / r as f64;
    assert_eq!(base.len(), n_out * n_in, "{module}");
    (0..n_out * n_in)
        .map(|idx| {
            let (o, i) = (idx / n_in, idx % n_in);
            let ba: f64 = (0..r).map(|j| vb[o * r + j] as f64 * va[j * n_in + i] as f64).sum();
            (base[idx] as f64 + scale * ba) as f32
        })
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn keys(a: &PeftAdapter) -> Vec<String> {
    a.tensors.keys().map(|k| k.strip_prefix("base_model.model.").unwrap_or_else(|| panic!("{k}")).to_string()).collect()
}

#[test]
fn timm_layout_holds_q_k_v_in_one_rank_3r_lora_on_the_fused_qkv() {
    let cfg = small_cfg();
    let r = 3;
    let model = lora_model(&cfg, r);
    let a = peft_adapter(&model, PeftLayout::Timm, Some("timm/some_vit")).unwrap();
    let c = &a.config;
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!((c["r"].as_u64(), c["lora_alpha"].as_u64()), (Some(3), Some(3)));
    assert_eq!(c["target_modules"], serde_json::json!(["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]));
    assert_eq!(c["rank_pattern"], serde_json::json!({"attn.qkv": 9}));
    assert_eq!(c["alpha_pattern"], serde_json::json!({"attn.qkv": 9}));
    assert_eq!(c["modules_to_save"], serde_json::json!(["head"]));
    assert_eq!(c["base_model_name_or_path"], "timm/some_vit");
    let mut want = vec!["cls_token".to_string(), "head.bias".into(), "head.weight".into()];
    for l in 0..cfg.depth {
        for m in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] {
            for f in ["lora_A", "lora_B"] {
                want.push(format!("blocks.{l}.{m}.{f}.weight"));
            }
        }
    }
    want.sort();
    assert_eq!(keys(&a), want);
    let (d, f) = (cfg.embed_dim, cfg.mlp_hidden);
    assert_eq!(get(&a, "blocks.0.attn.qkv.lora_A.weight").0, [3 * r, d]);
    assert_eq!(get(&a, "blocks.0.attn.qkv.lora_B.weight").0, [3 * d, 3 * r]);
    assert_eq!(get(&a, "blocks.1.mlp.fc1.lora_B.weight").0, [f, r]);
    assert_eq!(get(&a, "blocks.1.mlp.fc2.lora_A.weight").0, [r, f]);
    // What peft builds from the base model and the adapter is the merged model, Linear by Linear.
    let merged = merged_weights(&model).unwrap();
    for l in 0..cfg.depth {
        for m in ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"] {
            let name = format!("blocks.{l}.{m}.weight");
            let base = model.get_param(&name).unwrap();
            let got = peft_weight(&a, &format!("blocks.{l}.{m}"), &base);
            let err = max_abs(&got, &merged[&name].1);
            assert!(err < 1e-6, "{name}: peft's weight differs from the merged one by {err}");
            assert!(max_abs(&base, &merged[&name].1) > 1e-4, "{name}: the update is not trivial");
        }
    }
    for name in ["head.weight", "head.bias", "cls_token"] {
        assert_eq!(get(&a, name), &merged[name], "{name}");
    }
}

#[test]
fn hf_layouts_keep_q_k_v_apart_and_pad_dinov2_s_classifier() {
    // (layout, config, root, the blocks' container, the targets in snella's position order)
    let v5 = ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2"];
    let v4 =
        ["attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense"];
    let cases = [
        (PeftLayout::Hf, plain_cfg(), "vit", "vit.layers", v5),
        (PeftLayout::Hf, small_cfg(), "dinov2", "dinov2.encoder.layer", v5),
        (
            PeftLayout::Hf4,
            plain_cfg(),
            "vit",
            "vit.encoder.layer",
            [v4[0], v4[1], v4[2], v4[3], "intermediate.dense", "output.dense"],
        ),
        (
            PeftLayout::Hf4,
            small_cfg(),
            "dinov2",
            "dinov2.encoder.layer",
            [v4[0], v4[1], v4[2], v4[3], "mlp.fc1", "mlp.fc2"],
        ),
    ];
    for (layout, cfg, root, blocks, targets) in cases {
        let r = 2;
        let model = lora_model(&cfg, r);
        let a = peft_adapter(&model, layout, None).unwrap();
        assert_eq!(a.config["target_modules"], serde_json::json!(targets), "{layout:?} {root}");
        assert_eq!(a.config["modules_to_save"], serde_json::json!(["classifier"]));
        assert_eq!(a.config["rank_pattern"], serde_json::json!({}));
        assert!(a.config["base_model_name_or_path"].is_null());
        assert_eq!(keys(&a).len(), cfg.depth * 6 * 2 + 3, "{layout:?} {root}");
        let (d, c) = (cfg.embed_dim, cfg.num_classes);
        let merged = merged_weights(&model).unwrap();
        for l in 0..cfg.depth {
            let layer = format!("{blocks}.{l}");
            let qkv = model.get_param(&format!("blocks.{l}.attn.qkv.weight")).unwrap();
            let mqkv = &merged[&format!("blocks.{l}.attn.qkv.weight")].1;
            for (j, t) in targets[..3].iter().enumerate() {
                let rows = j * d * d..(j + 1) * d * d;
                let got = peft_weight(&a, &format!("{layer}.{t}"), &qkv[rows.clone()]);
                assert!(max_abs(&got, &mqkv[rows]) < 1e-6, "{layer}.{t}");
            }
            for (t, timm) in targets[3..].iter().zip(["attn.proj", "mlp.fc1", "mlp.fc2"]) {
                let name = format!("blocks.{l}.{timm}.weight");
                let got = peft_weight(&a, &format!("{layer}.{t}"), &model.get_param(&name).unwrap());
                assert!(max_abs(&got, &merged[&name].1) < 1e-6, "{layer}.{t}");
            }
        }
        assert_eq!(get(&a, &format!("{root}.embeddings.cls_token")), &merged["cls_token"]);
        assert_eq!(get(&a, "classifier.bias"), &merged["head.bias"]);
        let (shape, w) = get(&a, "classifier.weight");
        let head = &merged["head.weight"].1;
        if root == "dinov2" {
            // [cls | patch mean] inputs: the cls half is the head, the patch-mean half zero.
            assert_eq!(shape, &[c, 2 * d]);
            for k in 0..c {
                assert_eq!(&w[k * 2 * d..k * 2 * d + d], &head[k * d..(k + 1) * d]);
                assert!(w[k * 2 * d + d..(k + 1) * 2 * d].iter().all(|&x| x == 0.0));
            }
        } else {
            assert_eq!((shape.as_slice(), w), ([c, d].as_slice(), head));
        }
    }
}

#[test]
fn the_adapter_files_read_back_as_written() {
    let model = lora_model(&small_cfg(), 2);
    let a = peft_adapter(&model, PeftLayout::Timm, None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let written = write_peft_adapter(dir.path(), &a).unwrap();
    assert_eq!(written, ADAPTER_FILES.map(|f| dir.path().join(f)));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config, a.config);
    let bytes = std::fs::read(dir.path().join("adapter_model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["format"], "pt");
    assert!(meta["snella_peft"].contains("\"method\":\"lora2\""), "{meta:?}");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read: TensorMap = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let vals = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect::<BTreeMap<_, _>>();
    assert_eq!(read, a.tensors);
}

#[test]
fn methods_without_a_peft_counterpart_are_refused_with_the_reason() {
    let cfg = small_cfg();
    for (method, needle) in [
        (Method::snella(4, 0.3), "kernelized sparse delta"),
        (Method::snell(4, 0.3), "kernelized sparse delta"),
        (Method::mixk(4), "kernel"),
        (Method::Linear, "no LoRA branches"),
        (Method::Full, "no LoRA branches"),
    ] {
        let model = Model::new(Backend::new(Device::Cpu).unwrap(), &cfg, method, 1, Recompute::None).unwrap();
        let e = peft_adapter(&model, PeftLayout::Timm, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(&e, Error::Invalid { option, .. } if option == "--peft"), "{msg}");
        assert!(msg.contains(needle) && msg.contains(&method.name()), "{msg}");
    }
    assert!(PeftLayout::parse("diffusers").unwrap_err().to_string().contains("timm, hf or hf4"));
}
