//! Checkpoint loading: synthetic checkpoints in every supported layout (timm / Hugging Face ViT / Hugging Face
//! DINOv2 safetensors, Google .npz) built from one reference backbone in timm names, read back and compared
//! tensor by tensor; position-table resizing; head re-initialisation; every error path.
use snella::model::load::{
    adapt_to_config, adapt_to_config_with, detect, infer_config, read_checkpoint, write_safetensors, Format, Weights,
};
use snella::model::posembed::{resize_pos_embed, PosResize};
use snella::model::ViTConfig;
use snella::Error;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

type Map = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

// ------------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------------

/// A fresh, empty folder under the system temp dir, unique per process and call; removed on drop.
struct TmpDir(PathBuf);

impl TmpDir {
    fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(tag: &str) -> TmpDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "snella-load-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    TmpDir(d)
}

fn tiny(classes: usize) -> ViTConfig {
    ViTConfig::by_name("tiny", classes).unwrap()
}

fn tiny_ls(classes: usize) -> ViTConfig {
    ViTConfig { layer_scale: true, ..tiny(classes) }
}

/// A backbone in timm names whose every value is distinct, so a misplaced element shows.
fn reference(cfg: &ViTConfig) -> Map {
    cfg.param_shapes()
        .into_iter()
        .enumerate()
        .map(|(t, (name, shape))| {
            let n: usize = shape.iter().product();
            let data = (0..n).map(|i| (((t * 100_003 + i) as f64) * 0.618_034).sin() as f32 * 0.5).collect();
            (name, (shape, data))
        })
        .collect()
}

fn st_bytes(tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, dt, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &None).unwrap()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes an F32 safetensors file with the `safetensors` crate.
fn write_st(path: &Path, m: &Map) {
    let t: Vec<_> = m.iter().map(|(n, (s, d))| (n.clone(), safetensors::Dtype::F32, s.clone(), f32_bytes(d))).collect();
    std::fs::write(path, st_bytes(&t)).unwrap();
}

/// Rows `[from, to)` of a row-major `(rows, cols)` matrix.
fn rows(data: &[f32], cols: usize, from: usize, to: usize) -> Vec<f32> {
    data[from * cols..to * cols].to_vec()
}

/// `(r, c)` → `(c, r)`.
fn transpose(r: usize, c: usize, a: &[f32]) -> Vec<f32> {
    let mut o = vec![0.0; a.len()];
    for i in 0..r {
        for j in 0..c {
            o[j * r + i] = a[i * c + j];
        }
    }
    o
}

/// Hugging Face names built from timm ones (the inverse of the loader's map, written independently).
fn hf_from_timm(r: &Map, cfg: &ViTConfig, dinov2: bool, prefix: &str) -> Map {
    let d = cfg.embed_dim;
    let mut m = Map::new();
    let mut put = |n: String, t: (Vec<usize>, Vec<f32>)| {
        m.insert(n, t);
    };
    let g = |n: &str| r[n].clone();
    put(format!("{prefix}embeddings.cls_token"), g("cls_token"));
    put(format!("{prefix}embeddings.position_embeddings"), g("pos_embed"));
    put(format!("{prefix}embeddings.patch_embeddings.projection.weight"), g("patch_embed.proj.weight"));
    put(format!("{prefix}embeddings.patch_embeddings.projection.bias"), g("patch_embed.proj.bias"));
    for i in 0..cfg.depth {
        let l = format!("{prefix}encoder.layer.{i}.");
        let b = format!("blocks.{i}.");
        let (qw, qb) = (&r[&format!("{b}attn.qkv.weight")].1, &r[&format!("{b}attn.qkv.bias")].1);
        for (k, x) in ["query", "key", "value"].iter().enumerate() {
            put(format!("{l}attention.attention.{x}.weight"), (vec![d, d], rows(qw, d, k * d, (k + 1) * d)));
            put(format!("{l}attention.attention.{x}.bias"), (vec![d], qb[k * d..(k + 1) * d].to_vec()));
        }
        let names: &[(&str, &str)] = if dinov2 {
            &[
                ("norm1", "norm1"),
                ("norm2", "norm2"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
                ("attention.output.dense", "attn.proj"),
            ]
        } else {
            &[
                ("layernorm_before", "norm1"),
                ("layernorm_after", "norm2"),
                ("intermediate.dense", "mlp.fc1"),
                ("output.dense", "mlp.fc2"),
                ("attention.output.dense", "attn.proj"),
            ]
        };
        for (hf, timm) in names {
            for p in ["weight", "bias"] {
                put(format!("{l}{hf}.{p}"), g(&format!("{b}{timm}.{p}")));
            }
        }
        if dinov2 {
            put(format!("{l}layer_scale1.lambda1"), g(&format!("{b}ls1.gamma")));
            put(format!("{l}layer_scale2.lambda1"), g(&format!("{b}ls2.gamma")));
        }
    }
    put(format!("{prefix}layernorm.weight"), g("norm.weight"));
    put(format!("{prefix}layernorm.bias"), g("norm.bias"));
    m
}

/// Google .npz arrays (flax names, flax layouts) built from timm ones.
fn npz_from_timm(r: &Map, cfg: &ViTConfig) -> Map {
    let (d, h, f, p, c) = (cfg.embed_dim, cfg.num_heads, cfg.mlp_hidden, cfg.patch_size, cfg.in_chans);
    let hd = d / h;
    let mut m = Map::new();
    let g = |n: &str| r[n].clone();
    m.insert("cls".into(), g("cls_token"));
    // OIHW (D, C, P, P) -> HWIO (P, P, C, D).
    let w = &r["patch_embed.proj.weight"].1;
    let mut k = vec![0.0; w.len()];
    for o in 0..d {
        for i in 0..c {
            for y in 0..p {
                for x in 0..p {
                    k[((y * p + x) * c + i) * d + o] = w[((o * c + i) * p + y) * p + x];
                }
            }
        }
    }
    m.insert("embedding/kernel".into(), (vec![p, p, c, d], k));
    m.insert("embedding/bias".into(), g("patch_embed.proj.bias"));
    m.insert("Transformer/posembed_input/pos_embedding".into(), g("pos_embed"));
    for i in 0..cfg.depth {
        let e = format!("Transformer/encoderblock_{i}/");
        let b = format!("blocks.{i}.");
        m.insert(format!("{e}LayerNorm_0/scale"), g(&format!("{b}norm1.weight")));
        m.insert(format!("{e}LayerNorm_0/bias"), g(&format!("{b}norm1.bias")));
        m.insert(format!("{e}LayerNorm_2/scale"), g(&format!("{b}norm2.weight")));
        m.insert(format!("{e}LayerNorm_2/bias"), g(&format!("{b}norm2.bias")));
        let (qw, qb) = (&r[&format!("{b}attn.qkv.weight")].1, &r[&format!("{b}attn.qkv.bias")].1);
        for (j, x) in ["query", "key", "value"].iter().enumerate() {
            // kernel[dd][hh][kk] = W[j*D + hh*hd + kk][dd]
            let mut ker = vec![0.0; d * d];
            for dd in 0..d {
                for hh in 0..h {
                    for kk in 0..hd {
                        ker[(dd * h + hh) * hd + kk] = qw[(j * d + hh * hd + kk) * d + dd];
                    }
                }
            }
            let a = format!("{e}MultiHeadDotProductAttention_1/{x}/");
            m.insert(format!("{a}kernel"), (vec![d, h, hd], ker));
            m.insert(format!("{a}bias"), (vec![h, hd], qb[j * d..(j + 1) * d].to_vec()));
        }
        // out/kernel[hh][kk][dd] = Wproj[dd][hh*hd + kk]
        let pw = &r[&format!("{b}attn.proj.weight")].1;
        let mut ker = vec![0.0; d * d];
        for hh in 0..h {
            for kk in 0..hd {
                for dd in 0..d {
                    ker[(hh * hd + kk) * d + dd] = pw[dd * d + hh * hd + kk];
                }
            }
        }
        m.insert(format!("{e}MultiHeadDotProductAttention_1/out/kernel"), (vec![h, hd, d], ker));
        m.insert(format!("{e}MultiHeadDotProductAttention_1/out/bias"), g(&format!("{b}attn.proj.bias")));
        m.insert(
            format!("{e}MlpBlock_3/Dense_0/kernel"),
            (vec![d, f], transpose(f, d, &r[&format!("{b}mlp.fc1.weight")].1)),
        );
        m.insert(format!("{e}MlpBlock_3/Dense_0/bias"), g(&format!("{b}mlp.fc1.bias")));
        m.insert(
            format!("{e}MlpBlock_3/Dense_1/kernel"),
            (vec![f, d], transpose(d, f, &r[&format!("{b}mlp.fc2.weight")].1)),
        );
        m.insert(format!("{e}MlpBlock_3/Dense_1/bias"), g(&format!("{b}mlp.fc2.bias")));
    }
    m.insert("Transformer/encoder_norm/scale".into(), g("norm.weight"));
    m.insert("Transformer/encoder_norm/bias".into(), g("norm.bias"));
    let nc = cfg.num_classes;
    m.insert("head/kernel".into(), (vec![d, nc], transpose(nc, d, &r["head.weight"].1)));
    m.insert("head/bias".into(), g("head.bias"));
    m
}

/// A .npy (format 1.0) of `descr` with the given raw little-endian data.
fn npy(descr: &str, shape: &[usize], data: &[u8], fortran: bool) -> Vec<u8> {
    let shape_s = match shape.len() {
        0 => "()".to_string(),
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let fo = if fortran { "True" } else { "False" };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': {fo}, 'shape': {shape_s}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((header.len() as u16).to_le_bytes());
    out.extend(header.as_bytes());
    out.extend(data);
    out
}

/// Writes a .npz with the zip crate: f32 arrays, except those in `as_f64` (float64), deflated unless `stored`.
fn write_npz(path: &Path, arrays: &Map, as_f64: &[&str], stored: &[&str]) {
    let f = std::fs::File::create(path).unwrap();
    let mut z = zip::ZipWriter::new(f);
    for (name, (shape, data)) in arrays {
        let method = if stored.contains(&name.as_str()) {
            zip::CompressionMethod::Stored
        } else {
            zip::CompressionMethod::Deflated
        };
        let opts = zip::write::SimpleFileOptions::default().compression_method(method);
        z.start_file(format!("{name}.npy"), opts).unwrap();
        let bytes = if as_f64.contains(&name.as_str()) {
            npy("<f8", shape, &data.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect::<Vec<_>>(), false)
        } else {
            npy("<f4", shape, &f32_bytes(data), false)
        };
        z.write_all(&bytes).unwrap();
    }
    z.finish().unwrap();
}

fn assert_same(got: &Map, want: &Map) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    assert_eq!(gk, wk, "tensor names differ");
    for (n, (s, d)) in want {
        let (gs, gd) = &got[n];
        assert_eq!(gs, s, "shape of {n}");
        assert!(gd == d, "values of {n} differ");
    }
}

// ------------------------------------------------------------------------------------------------
// Formats
// ------------------------------------------------------------------------------------------------

#[test]
fn timm_safetensors_reads_back_identically() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("timm");
    let p = dir.join("vit.safetensors");
    write_st(&p, &r);
    assert_eq!(detect(&p).unwrap(), Format::Timm);
    let w = read_checkpoint(&p).unwrap();
    assert_eq!(w.source, p);
    assert_same(&w.tensors, &r);
    let (a, notes) = adapt_to_config(w, &cfg, 0).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_same(&a.tensors, &r);
}

#[test]
fn timm_f16_and_bf16_are_converted() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("half");
    let p = dir.join("half.safetensors");
    let t: Vec<_> = r
        .iter()
        .map(|(n, (s, d))| {
            if n == "norm.weight" {
                (
                    n.clone(),
                    safetensors::Dtype::F16,
                    s.clone(),
                    d.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
                )
            } else if n.starts_with("blocks.1.") {
                (
                    n.clone(),
                    safetensors::Dtype::BF16,
                    s.clone(),
                    d.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
                )
            } else {
                (n.clone(), safetensors::Dtype::F32, s.clone(), f32_bytes(d))
            }
        })
        .collect();
    std::fs::write(&p, st_bytes(&t)).unwrap();
    let w = read_checkpoint(&p).unwrap();
    for (n, (s, d)) in &r {
        let (gs, gd) = &w.tensors[n];
        assert_eq!(gs, s);
        let want: Vec<f32> = if n == "norm.weight" {
            d.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect()
        } else if n.starts_with("blocks.1.") {
            d.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect()
        } else {
            d.clone()
        };
        assert!(*gd == want, "{n}");
    }
    // A rounded copy is still close to the original.
    let diff =
        r["norm.weight"].1.iter().zip(&w.tensors["norm.weight"].1).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 0.0 && diff < 1e-3);
}

#[test]
fn hf_vit_fuses_qkv_and_renames() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("hfvit");
    // ViTForImageClassification: `vit.` prefix, classifier.
    let mut hf = hf_from_timm(&r, &cfg, false, "vit.");
    hf.insert("classifier.weight".into(), r["head.weight"].clone());
    hf.insert("classifier.bias".into(), r["head.bias"].clone());
    let p = dir.join("model.safetensors");
    write_st(&p, &hf);
    assert_eq!(detect(&p).unwrap(), Format::HfVit);
    let w = read_checkpoint(&p).unwrap();
    assert_same(&w.tensors, &r);
    // The fused rows are [q; k; v] in that order.
    let d = cfg.embed_dim;
    let qkv = &w.tensors["blocks.1.attn.qkv.weight"];
    assert_eq!(qkv.0, vec![3 * d, d]);
    assert_eq!(rows(&qkv.1, d, d, 2 * d), hf["vit.encoder.layer.1.attention.attention.key.weight"].1);
    assert_eq!(qkv.1[2 * d * d..], hf["vit.encoder.layer.1.attention.attention.value.weight"].1[..]);

    // ViTModel: no prefix, a pooler (dropped with a note), a mask token (dropped), no head (re-initialised).
    let mut hf = hf_from_timm(&r, &cfg, false, "");
    hf.insert("pooler.dense.weight".into(), (vec![d, d], vec![0.5; d * d]));
    hf.insert("pooler.dense.bias".into(), (vec![d], vec![0.5; d]));
    hf.insert("embeddings.mask_token".into(), (vec![1, 1, d], vec![0.25; d]));
    let p = dir.join("vitmodel.safetensors");
    write_st(&p, &hf);
    assert_eq!(detect(&p).unwrap(), Format::HfVit);
    let (a, notes) = adapt_to_config(read_checkpoint(&p).unwrap(), &cfg, 1).unwrap();
    let joined = notes.join("\n");
    assert!(joined.contains("pooler.dense.weight") && joined.contains("mask_token"), "{joined}");
    assert!(joined.contains("head re-initialised"), "{joined}");
    for (n, (s, v)) in &r {
        if !n.starts_with("head.") {
            assert_eq!(&a.tensors[n].0, s);
            assert!(a.tensors[n].1 == *v, "{n}");
        }
    }
    assert_eq!(a.tensors.len(), cfg.param_shapes().len());
}

#[test]
fn hf_dinov2_maps_layer_scale_and_drops_mask_token() {
    let cfg = tiny_ls(10);
    let r = reference(&cfg);
    let dir = tmpdir("hfdino");
    let mut hf = hf_from_timm(&r, &cfg, true, "");
    let d = cfg.embed_dim;
    hf.insert("embeddings.mask_token".into(), (vec![1, d], vec![0.0; d]));
    let p = dir.join("dinov2.safetensors");
    write_st(&p, &hf);
    assert_eq!(detect(&p).unwrap(), Format::HfDinov2);
    let w = read_checkpoint(&p).unwrap();
    let mut want = r.clone();
    want.remove("head.weight");
    want.remove("head.bias");
    want.insert("mask_token".into(), (vec![1, d], vec![0.0; d]));
    assert_same(&w.tensors, &want);
    assert_eq!(w.tensors["blocks.0.ls2.gamma"].1, hf["encoder.layer.0.layer_scale2.lambda1"].1);

    let (a, notes) = adapt_to_config(w, &cfg, 3).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().any(|n| n.contains("head re-initialised") && n.contains("no head")));
    assert!(notes.iter().any(|n| n.contains("mask_token")));
    assert_eq!(a.tensors["head.bias"].1, vec![0.0; 10]);

    // Dinov2ForImageClassification: `dinov2.` prefix, a classifier over [cls; mean patch] (2D inputs): re-initialised.
    let mut hf = hf_from_timm(&r, &cfg, true, "dinov2.");
    hf.insert("classifier.weight".into(), (vec![10, 2 * d], vec![0.1; 20 * d]));
    hf.insert("classifier.bias".into(), (vec![10], vec![0.1; 10]));
    let p = dir.join("dinov2cls.safetensors");
    write_st(&p, &hf);
    assert_eq!(detect(&p).unwrap(), Format::HfDinov2);
    let (a, notes) = adapt_to_config(read_checkpoint(&p).unwrap(), &cfg, 3).unwrap();
    assert!(
        notes.iter().any(|n| n.contains("head re-initialised") && n.contains(&format!("[10, {}]", 2 * d))),
        "{notes:?}"
    );
    assert_eq!(a.tensors["head.weight"].0, vec![10, d]);
}

#[test]
fn google_npz_transposes_kernels_and_fuses_qkv() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("npz");
    let mut arrays = npz_from_timm(&r, &cfg);
    let d = cfg.embed_dim;
    arrays.insert("pre_logits/kernel".into(), (vec![d, d], vec![0.5; d * d]));
    arrays.insert("pre_logits/bias".into(), (vec![d], vec![0.5; d]));
    let p = dir.join("ViT-tiny.npz");
    // One member in float64 (converted), two stored rather than deflated.
    write_npz(&p, &arrays, &["Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel", "cls"], &["cls", "head/bias"]);
    assert_eq!(detect(&p).unwrap(), Format::GoogleNpz);
    let w = read_checkpoint(&p).unwrap();
    let mut want = r.clone();
    want.insert("pre_logits.fc.weight".into(), (vec![d, d], vec![0.5; d * d]));
    want.insert("pre_logits.fc.bias".into(), (vec![d], vec![0.5; d]));
    assert_same(&w.tensors, &want);
    // Spot checks of the layouts: q row h*hd+k, column dd is kernel[dd][h][k].
    let hd = cfg.head_dim();
    let qk = &arrays["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"].1;
    let (hh, kk, dd) = (2, 5, 7);
    assert_eq!(
        w.tensors["blocks.0.attn.qkv.weight"].1[(hh * hd + kk) * d + dd],
        qk[(dd * cfg.num_heads + hh) * hd + kk]
    );
    let ek = &arrays["embedding/kernel"].1;
    let (o, c, y, x, pp) = (9, 2, 3, 6, cfg.patch_size);
    assert_eq!(
        w.tensors["patch_embed.proj.weight"].1[((o * 3 + c) * pp + y) * pp + x],
        ek[((y * pp + x) * 3 + c) * d + o]
    );

    let (a, notes) = adapt_to_config(w, &cfg, 0).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("pre_logits.fc.weight") && notes[0].contains("pre_logits.fc.bias"));
    assert_same(&a.tensors, &r);

    // The IN-21k situation: the checkpoint's head has other classes -> re-initialised.
    let (a, notes) = adapt_to_config(read_checkpoint(&p).unwrap(), &tiny(7), 0).unwrap();
    assert!(notes.iter().any(|n| n.contains("head re-initialised for 7 classes")), "{notes:?}");
    assert_eq!(a.tensors["head.weight"].0, vec![7, d]);
}

#[test]
fn npz_errors() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("npzerr");
    let arrays = npz_from_timm(&r, &cfg);

    // Fortran order is refused.
    let p = dir.join("fortran.npz");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        z.start_file("cls.npy", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(&npy("<f4", &[1, 1, 4], &f32_bytes(&[1.0; 4]), true)).unwrap();
        z.finish().unwrap();
    }
    match read_checkpoint(&p) {
        Err(Error::Format { path, msg }) => {
            assert_eq!(path, p);
            assert!(msg.contains("fortran_order"), "{msg}");
        }
        other => panic!("{other:?}"),
    }

    // An integer array is refused, naming it.
    let p = dir.join("int.npz");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        z.start_file("cls.npy", zip::write::SimpleFileOptions::default()).unwrap();
        z.write_all(&npy("<i8", &[2], &[0u8; 16], false)).unwrap();
        z.finish().unwrap();
    }
    let e = read_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("cls.npy") && e.contains("<i8"), "{e}");

    // A missing key of the q/k/v triple names the npz tensor and the file.
    let mut a2 = arrays.clone();
    a2.remove("Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel");
    let p = dir.join("nokey.npz");
    write_npz(&p, &a2, &[], &[]);
    match read_checkpoint(&p) {
        Err(Error::MissingTensor { file, name }) => {
            assert_eq!(name, "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel");
            assert!(file.contains("nokey.npz"));
        }
        other => panic!("{other:?}"),
    }

    // Truncated archive.
    let p = dir.join("full.npz");
    write_npz(&p, &arrays, &[], &[]);
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() / 2, bytes.len() - 10, 30] {
        let t = dir.join(format!("trunc{cut}.npz"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        match read_checkpoint(&t) {
            Err(Error::Format { path, .. }) => assert_eq!(path, t),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // A truncated .npy inside a valid zip.
    let p = dir.join("shortnpy.npz");
    {
        let mut z = zip::ZipWriter::new(std::fs::File::create(&p).unwrap());
        z.start_file("cls.npy", zip::write::SimpleFileOptions::default()).unwrap();
        let full = npy("<f4", &[1, 1, 4], &f32_bytes(&[1.0; 4]), false);
        z.write_all(&full[..full.len() - 3]).unwrap();
        z.finish().unwrap();
    }
    let e = read_checkpoint(&p).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("truncated"), "{e}");
}

#[test]
fn write_safetensors_round_trips_atomically() {
    let cfg = tiny_ls(5);
    let r = reference(&cfg);
    let dir = tmpdir("write");
    let p = dir.join("export.safetensors");
    write_safetensors(&p, &r).unwrap();
    assert!(!dir.join("export.safetensors.tmp").exists());
    let w = read_checkpoint(&p).unwrap();
    assert_eq!(detect(&p).unwrap(), Format::Timm);
    assert_same(&w.tensors, &r);
    // The file is plain safetensors (F32) that other readers accept.
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("blocks.0.ls1.gamma").unwrap().dtype(), safetensors::Dtype::F32);
    drop(st);
    // Overwriting replaces the file.
    let mut r2 = r.clone();
    r2.get_mut("norm.bias").unwrap().1[0] = 42.0;
    write_safetensors(&p, &r2).unwrap();
    assert_eq!(read_checkpoint(&p).unwrap().tensors["norm.bias"].1[0], 42.0);

    // Errors leave nothing behind.
    let bad_dir = dir.join("no/such/dir/x.safetensors");
    assert!(matches!(write_safetensors(&bad_dir, &r), Err(Error::Io { .. })));
    let mut bad = r.clone();
    bad.insert("oops".into(), (vec![2, 3], vec![0.0; 5]));
    let q = dir.join("bad.safetensors");
    assert!(write_safetensors(&q, &bad).is_err());
    assert!(!q.exists());
    assert!(!dir.join("bad.safetensors.tmp").exists());
    // A failed write does not touch an existing file.
    assert!(write_safetensors(&p, &bad).is_err());
    assert_eq!(read_checkpoint(&p).unwrap().tensors["norm.bias"].1[0], 42.0);
}

#[test]
fn infer_config_recovers_the_configuration() {
    for cfg in [tiny(10), tiny_ls(3)] {
        let w = Weights { tensors: reference(&cfg), source: "mem".into() };
        assert_eq!(infer_config(&w, cfg.num_heads, cfg.img_size).unwrap(), cfg);
    }
    // No head: classes 0, to be set by the caller.
    let mut t = reference(&tiny(10));
    t.remove("head.weight");
    t.remove("head.bias");
    let w = Weights { tensors: t, source: "mem".into() };
    let c = infer_config(&w, 4, (48, 48)).unwrap();
    assert_eq!((c.num_classes, c.img_size, c.depth, c.embed_dim, c.patch_size), (0, (48, 48), 2, 64, 8));
    // Heads that do not divide the width, or an image not a multiple of the patch, are refused.
    assert!(infer_config(&w, 5, (32, 32)).is_err());
    assert!(infer_config(&w, 4, (30, 32)).is_err());
}

// ------------------------------------------------------------------------------------------------
// Position tables
// ------------------------------------------------------------------------------------------------

/// Keys' cubic convolution kernel, A = -0.75 (torch's plain bicubic).
fn keys(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        (a + 2.0) * x * x * x - (a + 3.0) * x * x + 1.0
    } else if x < 2.0 {
        a * x * x * x - 5.0 * a * x * x + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// float64 reference of `F.interpolate(mode="bicubic", align_corners=False)` on a (D, gh, gw) grid, written
/// as a direct 2-D sum over the 4x4 neighbourhood with clamped indices.
fn torch_bicubic_ref(table: &[f32], d: usize, (gh, gw): (usize, usize), (th, tw): (usize, usize)) -> Vec<f64> {
    let mut out: Vec<f64> = table[..d].iter().map(|&x| x as f64).collect();
    let (sy, sx) = (gh as f64 / th as f64, gw as f64 / tw as f64);
    for y in 0..th {
        for x in 0..tw {
            let fy = (y as f64 + 0.5) * sy - 0.5;
            let fx = (x as f64 + 0.5) * sx - 0.5;
            let (y0, x0) = (fy.floor() as i64, fx.floor() as i64);
            for ch in 0..d {
                let mut acc = 0.0;
                for m in -1..=2 {
                    for n in -1..=2 {
                        let (iy, ix) = (y0 + m, x0 + n);
                        let w = keys(fy - iy as f64) * keys(fx - ix as f64);
                        let cy = iy.clamp(0, gh as i64 - 1) as usize;
                        let cx = ix.clamp(0, gw as i64 - 1) as usize;
                        acc += w * table[d + (cy * gw + cx) * d + ch] as f64;
                    }
                }
                out.push(acc);
            }
        }
    }
    out
}

fn random_table(d: usize, g: (usize, usize), seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..(1 + g.0 * g.1) * d)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 2.0 - 1.0) as f32
        })
        .collect()
}

#[test]
fn pos_embed_identity_when_grid_unchanged() {
    let t = random_table(5, (4, 4), 1);
    for mode in [PosResize::Torch, PosResize::TorchAntialias, PosResize::Dinov2Offset] {
        assert_eq!(resize_pos_embed(&t, 5, (4, 4), (4, 4), mode).unwrap(), t);
    }
}

#[test]
fn pos_embed_matches_float64_torch_bicubic_reference() {
    for (from, to) in [((3, 3), (5, 5)), ((6, 6), (4, 4)), ((4, 5), (7, 3)), ((37, 37), (16, 16)), ((2, 2), (1, 3))] {
        let d = 3;
        let t = random_table(d, from, 7);
        let got = resize_pos_embed(&t, d, from, to, PosResize::Torch).unwrap();
        let want = torch_bicubic_ref(&t, d, from, to);
        assert_eq!(got.len(), want.len());
        assert_eq!(&got[..d], &t[..d], "cls row kept");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((*g as f64 - w).abs() < 1e-5, "{from:?}->{to:?} [{i}]: {g} vs {w}");
        }
    }
}

#[test]
fn pos_embed_matches_torch_goldens_for_every_mode() {
    // Values printed by PyTorch 2.x (float32) for grid[i][j] = sin(0.7*i*w + 1.3*j) + 0.1*(i*w + j), cls 9.
    let grid = |h: usize, w: usize| -> Vec<f32> {
        let mut t = vec![9.0f32]; // cls
        for i in 0..h {
            for j in 0..w {
                t.push(((0.7 * (i * w) as f64 + 1.3 * j as f64).sin() + 0.1 * (i * w + j) as f64) as f32);
            }
        }
        t
    };
    let check = |table: &[f32], from, to, mode, want: &[f32]| {
        let got = resize_pos_embed(table, 1, from, to, mode).unwrap();
        assert_eq!(got[0], 9.0);
        for (i, (g, w)) in got[1..].iter().zip(want).enumerate() {
            assert!((g - w).abs() < 2e-5, "{mode:?} {from:?}->{to:?} [{i}]: {g} vs {w}");
        }
        assert_eq!(got.len(), 1 + want.len());
    };
    let (g3, g5) = (grid(3, 3), grid(5, 5));
    // F.interpolate(size=(2,3), mode='bicubic', align_corners=False)
    check(&g5, (5, 5), (2, 3), PosResize::Torch, &[-0.17608814, 0.5090599, 1.2711551, 1.0247108, 2.155122, 2.392998]);
    // F.interpolate(size=(5,4), mode='bicubic', antialias=True)
    check(
        &g3,
        (3, 3),
        (5, 4),
        PosResize::TorchAntialias,
        &[
            -0.15155797,
            0.700148,
            1.0970048,
            0.79021776,
            0.4578349,
            0.6828302,
            0.5660507,
            0.180707,
            1.2164277,
            0.5699127,
            -0.1675287,
            -0.533585,
            0.29826733,
            0.06720609,
            0.21206054,
            0.64201957,
            -0.39882413,
            -0.2538256,
            0.5484598,
            1.5050691,
        ],
    );
    // F.interpolate(size=(2,3), mode='bicubic', antialias=True): downsampling widens the kernel.
    check(
        &g5,
        (5, 5),
        (2, 3),
        PosResize::TorchAntialias,
        &[0.48522276, 0.70660734, 0.6930725, 1.6852325, 1.6768692, 1.9530516],
    );
    // DINOv2: F.interpolate(scale_factor=((t+0.1)/g,)*2, mode='bicubic')
    check(&g5, (5, 5), (2, 2), PosResize::Dinov2Offset, &[-0.27174786, 1.2707894, 0.7370766, 2.7869592]);
    check(
        &g3,
        (3, 3),
        (5, 5),
        PosResize::Dinov2Offset,
        &[
            -0.23657797,
            0.3749399,
            1.1309502,
            1.0756654,
            0.8082417,
            0.5053835,
            0.64276475,
            0.7425517,
            0.4187791,
            0.09891537,
            1.2638253,
            0.8447508,
            0.2051783,
            -0.29682317,
            -0.5640276,
            0.4908257,
            0.24667051,
            -0.01393355,
            0.19143452,
            0.4511436,
            -0.42264742,
            -0.34927407,
            -0.05620227,
            0.8365388,
            1.5548694,
        ],
    );
}

#[test]
fn pos_embed_preserves_a_constant_table() {
    let d = 4;
    for mode in [PosResize::Torch, PosResize::TorchAntialias, PosResize::Dinov2Offset] {
        for (from, to) in [((3, 3), (7, 7)), ((7, 7), (3, 3)), ((5, 4), (2, 9))] {
            let mut t = vec![0.3f32; (1 + from.0 * from.1) * d];
            t[..d].copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
            let out = resize_pos_embed(&t, d, from, to, mode).unwrap();
            assert_eq!(out.len(), (1 + to.0 * to.1) * d);
            assert_eq!(&out[..d], &[1.0, 2.0, 3.0, 4.0]);
            assert!(out[d..].iter().all(|&x| (x - 0.3).abs() < 1e-6), "{mode:?} {from:?}->{to:?}");
        }
    }
}

#[test]
fn adapt_resizes_pos_embed_of_another_grid() {
    // A DINOv2-like checkpoint whose table is for a larger image (here 7x7 patches; the model wants 4x4).
    let cfg = tiny_ls(10);
    let mut r = reference(&cfg);
    let d = cfg.embed_dim;
    let big = random_table(d, (7, 7), 11);
    r.insert("pos_embed".into(), (vec![1, 50, d], big.clone()));
    let w = Weights { tensors: r.clone(), source: "dino.safetensors".into() };
    let (a, notes) = adapt_to_config(w.clone(), &cfg, 0).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("7x7") && notes[0].contains("4x4"), "{}", notes[0]);
    let (shape, got) = &a.tensors["pos_embed"];
    assert_eq!(shape, &vec![1, 17, d]);
    let want = torch_bicubic_ref(&big, d, (7, 7), (4, 4));
    assert!(got.iter().zip(&want).all(|(g, w)| (*g as f64 - w).abs() < 1e-5));
    // The other variants are selectable.
    let (b, _) = adapt_to_config_with(w, &cfg, 0, PosResize::Dinov2Offset).unwrap();
    assert_eq!(b.tensors["pos_embed"].1, resize_pos_embed(&big, d, (7, 7), (4, 4), PosResize::Dinov2Offset).unwrap());
    assert_ne!(b.tensors["pos_embed"].1, *got);

    // A table that is not (1, 1+g*g, D) is a shape mismatch.
    r.insert("pos_embed".into(), (vec![1, 20, d], vec![0.0; 20 * d]));
    let e = adapt_to_config(Weights { tensors: r, source: "x".into() }, &cfg, 0).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { ref name, .. } if name == "pos_embed"), "{e}");
}

// ------------------------------------------------------------------------------------------------
// Head re-initialisation
// ------------------------------------------------------------------------------------------------

#[test]
fn head_reinit_is_truncated_normal_and_deterministic() {
    let src = tiny(10);
    let cfg = tiny(100);
    let r = reference(&src);
    let w = Weights { tensors: r.clone(), source: "in21k.safetensors".into() };
    let (a, notes) = adapt_to_config(w.clone(), &cfg, 42).unwrap();
    assert_eq!(notes.len(), 1);
    assert!(notes[0].contains("head re-initialised for 100 classes") && notes[0].contains("[10, 64]"), "{}", notes[0]);
    let (hs, hw) = &a.tensors["head.weight"];
    assert_eq!(hs, &vec![100, 64]);
    let n = hw.len() as f64;
    let mean = hw.iter().map(|&x| x as f64).sum::<f64>() / n;
    let std = (hw.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.002, "mean {mean}");
    assert!((std - 0.02).abs() < 0.001, "std {std}");
    assert!(hw.iter().all(|x| x.abs() <= 2.0));
    assert!(hw.iter().any(|&x| x != hw[0]));
    assert_eq!(a.tensors["head.bias"], (vec![100], vec![0.0; 100]));
    // The backbone is untouched.
    assert_eq!(a.tensors["blocks.1.mlp.fc2.weight"], r["blocks.1.mlp.fc2.weight"]);
    // Same seed, same head; another seed, another head.
    let (b, _) = adapt_to_config(w.clone(), &cfg, 42).unwrap();
    assert_eq!(b.tensors["head.weight"], a.tensors["head.weight"]);
    let (c, _) = adapt_to_config(w, &cfg, 43).unwrap();
    assert_ne!(c.tensors["head.weight"], a.tensors["head.weight"]);
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------

#[test]
fn missing_tensor_names_tensor_and_file() {
    let cfg = tiny(10);
    let mut r = reference(&cfg);
    r.remove("blocks.1.norm2.bias");
    let dir = tmpdir("missing");
    let p = dir.join("missing.safetensors");
    write_st(&p, &r);
    let e = adapt_to_config(read_checkpoint(&p).unwrap(), &cfg, 0).unwrap_err();
    match &e {
        Error::MissingTensor { file, name } => {
            assert_eq!(name, "blocks.1.norm2.bias");
            assert_eq!(file, &p.display().to_string());
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("blocks.1.norm2.bias") && msg.contains("missing.safetensors"), "{msg}");
    // A config with LayerScale wants the gammas.
    let e = adapt_to_config(Weights { tensors: reference(&cfg), source: p.clone() }, &tiny_ls(10), 0).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { ref name, .. } if name == "blocks.0.ls1.gamma"), "{e}");
    // Head bias without weight.
    let mut r = reference(&cfg);
    r.remove("head.weight");
    let e = adapt_to_config(Weights { tensors: r, source: p }, &cfg, 0).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { ref name, .. } if name == "head.weight"), "{e}");
}

#[test]
fn wrong_shape_names_both_shapes() {
    let cfg = tiny(10);
    let mut r = reference(&cfg);
    let fc1 = r.get_mut("blocks.0.mlp.fc1.weight").unwrap();
    fc1.0 = vec![64, 256];
    let e = adapt_to_config(Weights { tensors: r, source: "w.safetensors".into() }, &cfg, 0).unwrap_err();
    match &e {
        Error::ShapeMismatch { file, name, got, want } => {
            assert_eq!((file.as_str(), name.as_str()), ("w.safetensors", "blocks.0.mlp.fc1.weight"));
            assert_eq!((got.clone(), want.clone()), (vec![64, 256], vec![256, 64]));
        }
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(msg.contains("[64, 256]") && msg.contains("[256, 64]"), "{msg}");
    // Values that do not fill the shape are a format error, not a panic.
    let mut r = reference(&cfg);
    r.get_mut("pos_embed").unwrap().1.pop();
    let e = adapt_to_config(Weights { tensors: r, source: "w".into() }, &cfg, 0).unwrap_err();
    assert!(matches!(e, Error::Format { .. }) && e.to_string().contains("pos_embed"), "{e}");
    // A checkpoint for a wider model.
    let e = adapt_to_config(
        Weights { tensors: reference(&tiny(10)), source: "w".into() },
        &ViTConfig { embed_dim: 32, ..tiny(10) },
        0,
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");
}

#[test]
fn unexpected_tensors_are_listed() {
    let cfg = tiny(10);
    let mut r = reference(&cfg);
    r.insert("blocks.0.attn.q_norm.weight".into(), (vec![16], vec![1.0; 16]));
    r.insert("dist_token".into(), (vec![1, 1, 64], vec![0.0; 64]));
    r.insert("fc_norm.weight".into(), (vec![64], vec![1.0; 64])); // ignorable
    let e = adapt_to_config(Weights { tensors: r.clone(), source: "u.safetensors".into() }, &cfg, 0).unwrap_err();
    match &e {
        Error::UnexpectedTensors { file, names } => {
            assert_eq!(file, "u.safetensors");
            assert_eq!(names, &vec!["blocks.0.attn.q_norm.weight".to_string(), "dist_token".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    // A deeper checkpoint than the config: the extra blocks are unexpected.
    let deep = reference(&ViTConfig { depth: 3, ..cfg.clone() });
    let e = adapt_to_config(Weights { tensors: deep, source: "d".into() }, &cfg, 0).unwrap_err();
    assert!(
        matches!(e, Error::UnexpectedTensors { ref names, .. } if names.iter().all(|n| n.starts_with("blocks.2."))),
        "{e}"
    );
    // The ignorable one alone is dropped with a note.
    r.remove("blocks.0.attn.q_norm.weight");
    r.remove("dist_token");
    let (_, notes) = adapt_to_config(Weights { tensors: r, source: "u".into() }, &cfg, 0).unwrap();
    assert!(notes.len() == 1 && notes[0].contains("fc_norm.weight"), "{notes:?}");
}

#[test]
fn truncated_or_corrupt_safetensors_is_a_format_error() {
    let cfg = tiny(10);
    let dir = tmpdir("trunc");
    let p = dir.join("full.safetensors");
    write_st(&p, &reference(&cfg));
    let bytes = std::fs::read(&p).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 100, 7, 0] {
        let t = dir.join(format!("cut{cut}.safetensors"));
        std::fs::write(&t, &bytes[..cut]).unwrap();
        match read_checkpoint(&t) {
            Err(Error::Format { path, .. }) => assert_eq!(path, t),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    let t = dir.join("garbage.safetensors");
    std::fs::write(&t, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    assert!(matches!(read_checkpoint(&t), Err(Error::Format { .. })));
    // Missing file: an I/O error naming it.
    let t = dir.join("absent.safetensors");
    assert!(matches!(read_checkpoint(&t), Err(Error::Io { path, .. }) if path == t));
    // Pickles are refused with a hint.
    let t = dir.join("model.pth");
    std::fs::write(&t, b"PK\x03\x04").unwrap();
    let e = read_checkpoint(&t).unwrap_err().to_string();
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn unsupported_dtype_names_the_tensor() {
    let cfg = tiny(10);
    let r = reference(&cfg);
    let dir = tmpdir("dtype");
    let p = dir.join("i64.safetensors");
    let mut t: Vec<_> =
        r.iter().map(|(n, (s, d))| (n.clone(), safetensors::Dtype::F32, s.clone(), f32_bytes(d))).collect();
    t.push(("blocks.0.attn.relative_position_index".into(), safetensors::Dtype::I64, vec![2], vec![0u8; 16]));
    std::fs::write(&p, st_bytes(&t)).unwrap();
    match read_checkpoint(&p) {
        Err(Error::Format { path, msg }) => {
            assert_eq!(path, p);
            assert!(msg.contains("blocks.0.attn.relative_position_index") && msg.contains("I64"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn registers_are_refused() {
    let cfg = tiny_ls(10);
    let dir = tmpdir("reg");
    // timm `vit_small_patch14_reg4_dinov2` layout.
    let mut r = reference(&cfg);
    r.insert("reg_token".into(), (vec![1, 4, 64], vec![0.0; 256]));
    let p = dir.join("reg4.safetensors");
    write_st(&p, &r);
    let e = read_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("register") && e.contains("reg4.safetensors"), "{e}");
    let e = adapt_to_config(Weights { tensors: r.clone(), source: p }, &cfg, 0).unwrap_err().to_string();
    assert!(e.contains("register"), "{e}");
    // Hugging Face `Dinov2WithRegistersModel`.
    let mut hf = hf_from_timm(&reference(&cfg), &cfg, true, "");
    hf.insert("embeddings.register_tokens".into(), (vec![1, 4, 64], vec![0.0; 256]));
    let p = dir.join("hfreg.safetensors");
    write_st(&p, &hf);
    let e = read_checkpoint(&p).unwrap_err().to_string();
    assert!(e.contains("register"), "{e}");
}

#[test]
fn unknown_layout_is_refused() {
    let dir = tmpdir("unknown");
    let p = dir.join("other.safetensors");
    let mut m = Map::new();
    m.insert("features.0.weight".into(), (vec![2], vec![0.0; 2]));
    write_st(&p, &m);
    assert!(matches!(detect(&p), Err(Error::Format { .. })));
    assert!(matches!(read_checkpoint(&p), Err(Error::Format { .. })));
}
