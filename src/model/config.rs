//! ViT configurations by name, and the timm parameter names and shapes they imply.
use crate::error::{Error, Result};

/// Pre-LN ViT sizes. Names follow timm's VisionTransformer, and so does [`Default`]: ViT-B/16 at 224 px
/// with 1000 classes, so a custom size is `ViTConfig { embed_dim: 384, num_heads: 6, mlp_hidden: 1536,
/// ..Default::default() }`. [`ViTConfig::by_name`] gives the known sizes; [`crate::model::load::infer_config`]
/// reads one from a checkpoint.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViTConfig {
    /// (height, width) in pixels.
    pub img_size: (usize, usize),
    /// Side of the square patches in pixels; divides both image sides.
    pub patch_size: usize,
    /// Input channels (3 for RGB).
    pub in_chans: usize,
    /// Token width D.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; divides `embed_dim`.
    pub num_heads: usize,
    /// Hidden width of the MLP (fc1 outputs).
    pub mlp_hidden: usize,
    /// Classes of the head (rows of `head.weight`).
    pub num_classes: usize,
    /// DINOv2-style LayerScale (`ls1.gamma`, `ls2.gamma`).
    pub layer_scale: bool,
    /// LayerNorm epsilon (timm: 1e-6).
    pub eps: f32,
}

/// The Linear layers of a block that a method can adapt, in the official module order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Position {
    /// The query rows `[0, D)` of the fused `attn.qkv`.
    Q,
    /// The key rows `[D, 2D)` of `attn.qkv`.
    K,
    /// The value rows `[2D, 3D)` of `attn.qkv`.
    V,
    /// The attention output projection `attn.proj`.
    Proj,
    /// The first MLP Linear `mlp.fc1` (D → hidden).
    Fc1,
    /// The second MLP Linear `mlp.fc2` (hidden → D).
    Fc2,
}

impl Position {
    /// Every position, in the official module order.
    pub const ALL: [Position; 6] =
        [Position::Q, Position::K, Position::V, Position::Proj, Position::Fc1, Position::Fc2];
    /// Short name: `q`, `k`, `v`, `proj`, `fc1`, `fc2`.
    pub fn name(self) -> &'static str {
        match self {
            Position::Q => "q",
            Position::K => "k",
            Position::V => "v",
            Position::Proj => "proj",
            Position::Fc1 => "fc1",
            Position::Fc2 => "fc2",
        }
    }
    /// Parameter prefix of the branch on this Linear: `branch.blocks.{i}.attn.q`, `branch.blocks.{i}.mlp.fc1`, ...
    pub fn branch_prefix(self, block: usize) -> String {
        let group = if matches!(self, Position::Fc1 | Position::Fc2) { "mlp" } else { "attn" };
        format!("branch.blocks.{block}.{group}.{}", self.name())
    }
}

impl Default for ViTConfig {
    /// timm's `VisionTransformer()` defaults: ViT-B/16, 224 px, 1000 classes, no LayerScale.
    fn default() -> ViTConfig {
        ViTConfig {
            img_size: (224, 224),
            patch_size: 16,
            in_chans: 3,
            embed_dim: 768,
            depth: 12,
            num_heads: 12,
            mlp_hidden: 3072,
            num_classes: 1000,
            layer_scale: false,
            eps: 1e-6,
        }
    }
}

impl ViTConfig {
    /// A configuration by name: vit_b16, vit_l16, vit_h14 (timm sizes, 224 px), dinov2_s14, dinov2_b14,
    /// dinov2_l14 (224 px; their checkpoints' 518-px position table is interpolated), and `tiny` for tests.
    ///
    /// # Errors
    /// `Invalid { option: "model" }` for an unknown name.
    pub fn by_name(name: &str, num_classes: usize) -> Result<ViTConfig> {
        let base = |img, p, d, depth, h, mlp, ls| ViTConfig {
            img_size: (img, img),
            patch_size: p,
            in_chans: 3,
            embed_dim: d,
            depth,
            num_heads: h,
            mlp_hidden: mlp,
            num_classes,
            layer_scale: ls,
            eps: 1e-6,
        };
        Ok(match name {
            "vit_b16" | "vit_base_patch16_224" => base(224, 16, 768, 12, 12, 3072, false),
            "vit_l16" | "vit_large_patch16_224" => base(224, 16, 1024, 24, 16, 4096, false),
            "vit_h14" | "vit_huge_patch14_224" => base(224, 14, 1280, 32, 16, 5120, false),
            "dinov2_s14" | "vit_small_patch14_dinov2" => base(224, 14, 384, 12, 6, 1536, true),
            "dinov2_b14" | "vit_base_patch14_dinov2" => base(224, 14, 768, 12, 12, 3072, true),
            "dinov2_l14" | "vit_large_patch14_dinov2" => base(224, 14, 1024, 24, 16, 4096, true),
            "tiny" => base(32, 8, 64, 2, 4, 256, false),
            _ => {
                return Err(Error::invalid(
                    "model",
                    format!(
                        "unknown model '{name}' (known: vit_b16, vit_l16, vit_h14, dinov2_s14, dinov2_b14, \
                         dinov2_l14, tiny)"
                    ),
                ))
            }
        })
    }

    /// Patch grid (rows, columns); (0, 0) when `patch_size` is 0 (an invalid configuration, see
    /// [`ViTConfig::validate`]).
    pub fn grid(&self) -> (usize, usize) {
        match self.patch_size {
            0 => (0, 0),
            p => (self.img_size.0 / p, self.img_size.1 / p),
        }
    }
    /// Patches per image: grid rows × columns.
    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }
    /// Tokens per image: patches plus the cls token.
    pub fn tokens(&self) -> usize {
        self.num_patches() + 1
    }
    /// Width of one attention head: `embed_dim / num_heads` (0 when `num_heads` is 0).
    pub fn head_dim(&self) -> usize {
        self.embed_dim.checked_div(self.num_heads).unwrap_or(0)
    }
    /// Elements of one patch: C·P·P.
    pub fn patch_dim(&self) -> usize {
        self.in_chans * self.patch_size * self.patch_size
    }

    /// (in, out) of the Linear at `pos`.
    pub fn linear_shape(&self, pos: Position) -> (usize, usize) {
        let (d, f) = (self.embed_dim, self.mlp_hidden);
        match pos {
            Position::Fc1 => (d, f),
            Position::Fc2 => (f, d),
            _ => (d, d),
        }
    }

    /// Checks that the sizes describe a buildable ViT.
    ///
    /// # Errors
    /// `Invalid { option: "model config" }` naming the field: an empty image, a patch size that does not
    /// divide the image, heads that do not divide `embed_dim`, a zero size or class count, or an `eps` that is
    /// negative or not finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("model config", m));
        if self.img_size.0 == 0 || self.img_size.1 == 0 {
            return bad(format!("img_size {:?} is empty", self.img_size));
        }
        if self.patch_size == 0
            || !self.img_size.0.is_multiple_of(self.patch_size)
            || !self.img_size.1.is_multiple_of(self.patch_size)
        {
            return bad(format!("image size {:?} is not a multiple of patch size {}", self.img_size, self.patch_size));
        }
        if self.embed_dim == 0 || self.depth == 0 || self.mlp_hidden == 0 || self.num_classes == 0 || self.in_chans == 0
        {
            return bad("embed_dim, depth, mlp_hidden, num_classes and in_chans must be positive".into());
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("embed_dim {} is not a multiple of num_heads {}", self.embed_dim, self.num_heads));
        }
        // Far beyond any real ViT; keeps every size product of the plan inside usize.
        let limits = [
            ("img_size", self.img_size.0.max(self.img_size.1), 1 << 16),
            ("embed_dim", self.embed_dim, 1 << 16),
            ("mlp_hidden", self.mlp_hidden, 1 << 18),
            ("depth", self.depth, 1 << 10),
            ("num_classes", self.num_classes, 1 << 24),
            ("in_chans", self.in_chans, 1 << 10),
        ];
        for (name, v, max) in limits {
            if v > max {
                return bad(format!("{name} {v} exceeds the supported maximum {max}"));
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad(format!("eps {} must be a finite non-negative number", self.eps));
        }
        Ok(())
    }

    /// timm names and shapes of every backbone tensor, in timm's state_dict order.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, p, c) = (self.embed_dim, self.mlp_hidden, self.patch_size, self.in_chans);
        let mut s: Vec<(String, Vec<usize>)> = vec![
            ("cls_token".into(), vec![1, 1, d]),
            ("pos_embed".into(), vec![1, self.tokens(), d]),
            ("patch_embed.proj.weight".into(), vec![d, c, p, p]),
            ("patch_embed.proj.bias".into(), vec![d]),
        ];
        for i in 0..self.depth {
            let b = format!("blocks.{i}.");
            let mut add = |n: &str, shape: Vec<usize>| s.push((format!("{b}{n}"), shape));
            add("norm1.weight", vec![d]);
            add("norm1.bias", vec![d]);
            add("attn.qkv.weight", vec![3 * d, d]);
            add("attn.qkv.bias", vec![3 * d]);
            add("attn.proj.weight", vec![d, d]);
            add("attn.proj.bias", vec![d]);
            if self.layer_scale {
                add("ls1.gamma", vec![d]);
            }
            add("norm2.weight", vec![d]);
            add("norm2.bias", vec![d]);
            add("mlp.fc1.weight", vec![f, d]);
            add("mlp.fc1.bias", vec![f]);
            add("mlp.fc2.weight", vec![d, f]);
            add("mlp.fc2.bias", vec![d]);
            if self.layer_scale {
                add("ls2.gamma", vec![d]);
            }
        }
        s.push(("norm.weight".into(), vec![d]));
        s.push(("norm.bias".into(), vec![d]));
        s.push(("head.weight".into(), vec![self.num_classes, d]));
        s.push(("head.bias".into(), vec![self.num_classes]));
        s
    }

    /// Number of backbone parameters (head included).
    pub fn num_params(&self) -> usize {
        self.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_b16_has_86m_parameters() {
        let c = ViTConfig::by_name("vit_b16", 1000).unwrap();
        assert_eq!(c.tokens(), 197);
        assert_eq!(c.num_params(), 86_567_656); // timm vit_base_patch16_224
        assert!(ViTConfig::by_name("vit_x", 10).is_err());
        assert_eq!(ViTConfig::default(), c);
    }
}
