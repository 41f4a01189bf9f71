//! LoRA runs as Hugging Face `peft` adapters: `adapter_config.json` and `adapter_model.safetensors`, in the
//! layout `PeftModel.from_pretrained(base, dir)` loads onto a timm `VisionTransformer` or a Hugging Face
//! `ViTForImageClassification` / `Dinov2ForImageClassification`. transformers 5 renamed those models' modules
//! (`attention.q_proj`, ...; ViT's blocks moved to `vit.layers`) and peft does not rename a LoRA's keys or
//! targets between the two, so `hf` follows transformers 5 and `hf4` transformers 4.
//!
//! snella's LoRA branch on a Linear adds `B·A` to its weight, `A` (r, in) and `B` (out, r), with no scaling
//! (`model/linear.rs`); peft adds `(lora_alpha / r)·lora_B·lora_A`, so `lora_alpha = r` and the factors go
//! over as they are: `lora_A.weight = A`, `lora_B.weight = B`. Where the branches sit:
//!
//! | snella branch                 | timm (`timm`)                        | transformers 5 (`hf`)              | transformers 4 (`hf4`)          |
//! |-------------------------------|--------------------------------------|------------------------------------|---------------------------------|
//! | `branch.blocks.<l>.attn.q`    | `blocks.<l>.attn.qkv` rows [0, D)    | `<layer>.attention.q_proj`         | `<layer>.attention.attention.query` |
//! | `branch.blocks.<l>.attn.k`    | `blocks.<l>.attn.qkv` rows [D, 2D)   | `<layer>.attention.k_proj`         | `<layer>.attention.attention.key`   |
//! | `branch.blocks.<l>.attn.v`    | `blocks.<l>.attn.qkv` rows [2D, 3D)  | `<layer>.attention.v_proj`         | `<layer>.attention.attention.value` |
//! | `branch.blocks.<l>.attn.proj` | `blocks.<l>.attn.proj`               | `<layer>.attention.o_proj`         | `<layer>.attention.output.dense`    |
//! | `branch.blocks.<l>.mlp.fc1`   | `blocks.<l>.mlp.fc1`                 | `<layer>.mlp.fc1`                  | ViT `<layer>.intermediate.dense`, DINOv2 `<layer>.mlp.fc1` |
//! | `branch.blocks.<l>.mlp.fc2`   | `blocks.<l>.mlp.fc2`                 | `<layer>.mlp.fc2`                  | ViT `<layer>.output.dense`, DINOv2 `<layer>.mlp.fc2`       |
//! | `head.weight`, `head.bias`    | `head` (`modules_to_save`)           | `classifier` (`modules_to_save`; DINOv2: see below) | as `hf`        |
//! | `cls_token`                   | `cls_token`                          | `<root>.embeddings.cls_token`      | as `hf`                         |
//!
//! `<root>` is `vit` or `dinov2`; `<layer>` is `vit.layers.<l>` (ViT, transformers 5), `vit.encoder.layer.<l>`
//! (ViT, transformers 4) or `dinov2.encoder.layer.<l>` (DINOv2, both).
//!
//! Every key of `adapter_model.safetensors` starts with `base_model.model.`, as peft saves them:
//! `base_model.model.<module>.lora_A.weight`, `….lora_B.weight`, `base_model.model.head.weight`.
//!
//! * **timm's fused qkv.** q, k and v are three rank-r branches on one Linear of timm. One LoRA of rank 3r on
//!   `attn.qkv` holds them exactly: `lora_A = [A_q; A_k; A_v]` (3r, D) and `lora_B = diag(B_q, B_k, B_v)`
//!   (3D, 3r, zero off the diagonal blocks), so `lora_B·lora_A = [B_q·A_q; B_k·A_k; B_v·A_v]`, the rows of the
//!   three updates. `rank_pattern` and `alpha_pattern` give `attn.qkv` rank and alpha 3r (scaling 1). Hugging
//!   Face keeps q, k and v as three Linears, so there each is its own rank-r LoRA.
//! * **The cls token** trains in snella (method.md §1) but is no module, so no LoRA or `modules_to_save` entry
//!   holds it: it is stored under the model's own parameter name, which peft passes through to
//!   `load_state_dict` unchanged (as it does for trained biases).
//! * **The head.** snella's head reads the final-norm cls token, as timm's `head` and HF ViT's `classifier`
//!   do. `Dinov2ForImageClassification`'s `classifier` reads `[cls, mean of the patch tokens]` (2D inputs), so
//!   its weight is snella's head with zero columns for the patch mean: the same logits.
//! * Which Hugging Face class: a backbone with LayerScale (`ViTConfig::layer_scale`, DINOv2) is
//!   `Dinov2ForImageClassification`, any other `ViTForImageClassification`.
//!
//! Only LoRA has a peft counterpart. SNELL and SNELLA add `M_sᵀ` with `M_s = M·|M|·1[|M| > t]` and `M` built by
//! a kernel from the factors (method.md §2-§5): a data-dependent threshold over a kernel matrix, which no
//! peft tuner computes (peft's adapters add low-rank products, scalings or fixed masks); their runs keep the
//! merged weights and the sparse delta of `train/export.rs`.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::safetensors::{serialize, RawTensor};
use crate::io::write_atomic;
use crate::model::load::TensorMap;
use crate::model::{Model, Position};
use crate::peft::Method;

/// The files of an adapter folder.
pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// The `__metadata__` key of `adapter_model.safetensors` that says where the adapter came from (method,
/// layout, model configuration); peft reads only the tensors.
pub(crate) const ADAPTER_META_KEY: &str = "snella_peft";

/// The model class whose module names the adapter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeftLayout {
    /// timm's `VisionTransformer` (fused `attn.qkv`).
    Timm,
    /// Hugging Face transformers 5 `ViTForImageClassification`, or `Dinov2ForImageClassification` for a
    /// LayerScale backbone.
    Hf,
    /// The same classes with transformers 4's module names.
    Hf4,
}

impl PeftLayout {
    /// `timm`, `hf` (transformers 5) or `hf4` (transformers 4).
    ///
    /// # Errors
    /// `Invalid { option: "--peft" }` for another name.
    pub fn parse(s: &str) -> Result<PeftLayout> {
        match s {
            "timm" => Ok(PeftLayout::Timm),
            "hf" => Ok(PeftLayout::Hf),
            "hf4" => Ok(PeftLayout::Hf4),
            _ => Err(Error::invalid("--peft", format!("unknown layout '{s}' (timm, hf or hf4)"))),
        }
    }
}

/// An adapter: the contents of `adapter_config.json` and the tensors of `adapter_model.safetensors`.
#[derive(Clone, Debug, PartialEq)]
pub struct PeftAdapter {
    /// `adapter_config.json` (a peft `LoraConfig`).
    pub config: serde_json::Value,
    /// The adapter's tensors by key (`base_model.model.…`).
    pub tensors: TensorMap,
    /// What the safetensors metadata records: method, layout, model configuration.
    pub meta: serde_json::Value,
}

/// The Hugging Face class of a backbone: DINOv2 when it has LayerScale.
fn hf_dinov2(model: &Model) -> bool {
    model.config().layer_scale
}

/// The module a branch at `pos` of block `l` sits on, in `layout` (timm: q, k and v all on `attn.qkv`).
fn module(layout: PeftLayout, dinov2: bool, l: usize, pos: Position) -> String {
    let root = if dinov2 { "dinov2" } else { "vit" };
    let leaf = match (layout, pos) {
        (PeftLayout::Timm, Position::Q | Position::K | Position::V) => return format!("blocks.{l}.attn.qkv"),
        (PeftLayout::Timm, Position::Proj) => return format!("blocks.{l}.attn.proj"),
        (PeftLayout::Timm, p) => return format!("blocks.{l}.mlp.{}", p.name()),
        (PeftLayout::Hf, Position::Q) => "attention.q_proj",
        (PeftLayout::Hf, Position::K) => "attention.k_proj",
        (PeftLayout::Hf, Position::V) => "attention.v_proj",
        (PeftLayout::Hf, Position::Proj) => "attention.o_proj",
        (PeftLayout::Hf4, Position::Q) => "attention.attention.query",
        (PeftLayout::Hf4, Position::K) => "attention.attention.key",
        (PeftLayout::Hf4, Position::V) => "attention.attention.value",
        (PeftLayout::Hf4, Position::Proj) => "attention.output.dense",
        (PeftLayout::Hf4, Position::Fc1) if !dinov2 => "intermediate.dense",
        (PeftLayout::Hf4, Position::Fc2) if !dinov2 => "output.dense",
        (_, Position::Fc1) => "mlp.fc1",
        (_, Position::Fc2) => "mlp.fc2",
    };
    // transformers 5 moved ViT's blocks from `vit.encoder.layer` to `vit.layers` (DINOv2's stayed).
    let blocks = if layout == PeftLayout::Hf && !dinov2 { "layers" } else { "encoder.layer" };
    format!("{root}.{blocks}.{l}.{leaf}")
}

/// `target_modules` of the config: suffixes that match exactly the adapted Linears of the layout's model.
fn target_modules(layout: PeftLayout, dinov2: bool) -> Vec<String> {
    let mut v: Vec<String> = Position::ALL
        .iter()
        .map(|&p| {
            let m = module(layout, dinov2, 0, p);
            m.split_once(".0.").map(|(_, leaf)| leaf.to_string()).unwrap_or(m)
        })
        .collect();
    v.dedup();
    v
}

/// The error for a method without a peft counterpart.
fn not_lora(method: &Method) -> Error {
    let name = method.name();
    let why = match method {
        Method::Kernel(k) if k.sparse => format!(
            "{name} trains a kernelized sparse delta (M_s = M·|M|·1[|M| > t], M built by a kernel from the factors), \
             which no peft adapter type computes; export the merged weights or the sparse delta instead (snella \
             export without --peft)"
        ),
        Method::Kernel(_) => format!(
            "{name} builds its update with a kernel from the factors, which no peft adapter type computes; export the \
             merged weights or the sparse delta instead (snella export without --peft)"
        ),
        _ => format!("{name} has no LoRA branches; export the merged weights instead (snella export without --peft)"),
    };
    Error::invalid("--peft", format!("only LoRA runs become peft adapters: {why}"))
}

/// The peft adapter of a LoRA model in `layout` (see the module docs for the mapping). `base_model` is written
/// as `base_model_name_or_path` (e.g. the recipe's `weights`: a Hub id or a file).
///
/// # Errors
/// `Invalid { option: "--peft" }` for a model that is not LoRA (SNELL/SNELLA: their delta has no peft type);
/// device transfer failures.
pub fn peft_adapter(model: &Model, layout: PeftLayout, base_model: Option<&str>) -> Result<PeftAdapter> {
    let &Method::Lora { r } = model.method() else { return Err(not_lora(model.method())) };
    let cfg = model.config();
    let dinov2 = hf_dinov2(model);
    let (d, c) = (cfg.embed_dim, cfg.num_classes);
    let key = |module: &str, leaf: &str| format!("base_model.model.{module}.{leaf}");
    let mut tensors = TensorMap::new();
    for l in 0..cfg.depth {
        let factors = |pos: Position| -> Result<(Vec<f32>, Vec<f32>)> {
            let p = pos.branch_prefix(l);
            Ok((model.get_param(&format!("{p}.A"))?, model.get_param(&format!("{p}.B"))?))
        };
        let mut single = Vec::from(Position::ALL);
        if layout == PeftLayout::Timm {
            // q, k, v: one rank-3r LoRA on the fused qkv, A stacked and B block-diagonal.
            let (mut a, mut b) = (Vec::with_capacity(3 * r * d), vec![0.0f32; 3 * d * 3 * r]);
            for (j, pos) in [Position::Q, Position::K, Position::V].into_iter().enumerate() {
                let (pa, pb) = factors(pos)?;
                a.extend_from_slice(&pa);
                for o in 0..d {
                    let row = (j * d + o) * 3 * r + j * r;
                    b[row..row + r].copy_from_slice(&pb[o * r..(o + 1) * r]);
                }
            }
            let m = module(layout, dinov2, l, Position::Q);
            tensors.insert(key(&m, "lora_A.weight"), (vec![3 * r, d], a));
            tensors.insert(key(&m, "lora_B.weight"), (vec![3 * d, 3 * r], b));
            single.retain(|p| !matches!(p, Position::Q | Position::K | Position::V));
        }
        for pos in single {
            let (n_in, n_out) = cfg.linear_shape(pos);
            let (a, b) = factors(pos)?;
            let m = module(layout, dinov2, l, pos);
            tensors.insert(key(&m, "lora_A.weight"), (vec![r, n_in], a));
            tensors.insert(key(&m, "lora_B.weight"), (vec![n_out, r], b));
        }
    }
    let (head_w, head_b, cls) =
        (model.get_param("head.weight")?, model.get_param("head.bias")?, model.get_param("cls_token")?);
    let (head, cls_key) = match (layout, dinov2) {
        (PeftLayout::Timm, _) => ("head", "cls_token".to_string()),
        (_, true) => ("classifier", "dinov2.embeddings.cls_token".to_string()),
        (_, false) => ("classifier", "vit.embeddings.cls_token".to_string()),
    };
    let head_w = if layout != PeftLayout::Timm && dinov2 {
        // [cls | patch mean] inputs: the patch-mean columns are zero.
        let mut w = vec![0.0f32; c * 2 * d];
        for k in 0..c {
            w[k * 2 * d..k * 2 * d + d].copy_from_slice(&head_w[k * d..(k + 1) * d]);
        }
        (vec![c, 2 * d], w)
    } else {
        (vec![c, d], head_w)
    };
    tensors.insert(key(head, "weight"), head_w);
    tensors.insert(key(head, "bias"), (vec![c], head_b));
    tensors.insert(format!("base_model.model.{cls_key}"), (vec![1, 1, d], cls));
    let mut config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": null,
        "base_model_name_or_path": base_model,
        "revision": null,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "target_modules": target_modules(layout, dinov2),
        "modules_to_save": [head],
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    if layout == PeftLayout::Timm {
        config["rank_pattern"] = serde_json::json!({ "attn.qkv": 3 * r });
        config["alpha_pattern"] = serde_json::json!({ "attn.qkv": 3 * r });
    }
    let class = match (layout, dinov2) {
        (PeftLayout::Timm, _) => "timm VisionTransformer",
        (PeftLayout::Hf, true) => "transformers 5 Dinov2ForImageClassification",
        (PeftLayout::Hf, false) => "transformers 5 ViTForImageClassification",
        (PeftLayout::Hf4, true) => "transformers 4 Dinov2ForImageClassification",
        (PeftLayout::Hf4, false) => "transformers 4 ViTForImageClassification",
    };
    let meta = serde_json::json!({
        "format": "snella-peft-adapter",
        "version": 1,
        "method": model.method().name(),
        "layout": layout,
        "base_class": class,
        "model": cfg,
    });
    Ok(PeftAdapter { config, tensors, meta })
}

/// Writes an adapter into `dir` (which must exist): `adapter_config.json` and `adapter_model.safetensors`
/// (F32, metadata `format: pt` and `snella_peft`: method, layout, model configuration), each atomically.
/// Returns the paths written.
///
/// # Errors
/// `Invalid { option: "tensor" }` for a tensor whose values do not fill its shape; `Io` naming a file that
/// cannot be written (no partial file is left).
pub fn write_peft_adapter(dir: &Path, adapter: &PeftAdapter) -> Result<Vec<PathBuf>> {
    let [config_name, weights_name] = ADAPTER_FILES;
    let (config_path, weights_path) = (dir.join(config_name), dir.join(weights_name));
    let mut raw = BTreeMap::new();
    for (name, (shape, data)) in &adapter.tensors {
        raw.insert(name.clone(), RawTensor::f32(shape.clone(), data));
    }
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (ADAPTER_META_KEY.to_string(), adapter.meta.to_string()),
    ]);
    let bytes = serialize(&raw, meta, &weights_path)?;
    drop(raw);
    write_atomic(&weights_path, &bytes)?;
    let mut json =
        serde_json::to_string_pretty(&adapter.config).map_err(|e| Error::invalid("--peft", e.to_string()))?;
    json.push('\n');
    write_atomic(&config_path, json.as_bytes())?;
    Ok(vec![config_path, weights_path])
}
