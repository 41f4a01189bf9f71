//! ViT configurations by name, and the timm parameter names and shapes they imply.
use crate::error::{Error, Result};

/// Pre-LN ViT sizes. Names follow timm's VisionTransformer.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViTConfig {
    /// (height, width) in pixels.
    pub img_size: (usize, usize),
    pub patch_size: usize,
    pub in_chans: usize,
    pub embed_dim: usize,
    pub depth: usize,
    pub num_heads: usize,
    pub mlp_hidden: usize,
    pub num_classes: usize,
    /// DINOv2-style LayerScale (`ls1.gamma`, `ls2.gamma`).
    pub layer_scale: bool,
    pub eps: f32,
}

/// The Linear layers of a block that a method can adapt, in the official module order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Position {
    Q,
    K,
    V,
    Proj,
    Fc1,
    Fc2,
}

impl Position {
    pub const ALL: [Position; 6] =
        [Position::Q, Position::K, Position::V, Position::Proj, Position::Fc1, Position::Fc2];
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

impl ViTConfig {
    /// A configuration by name: vit_b16, vit_l16, vit_h14 (timm sizes, 224 px), dinov2_s14 (224 px; its
    /// checkpoint's 518-px position table is interpolated), and `tiny` for tests.
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
            "tiny" => base(32, 8, 64, 2, 4, 256, false),
            _ => {
                return Err(Error::invalid(
                    "model",
                    format!("unknown model '{name}' (known: vit_b16, vit_l16, vit_h14, dinov2_s14, tiny)"),
                ))
            }
        })
    }

    pub fn grid(&self) -> (usize, usize) {
        (self.img_size.0 / self.patch_size, self.img_size.1 / self.patch_size)
    }
    pub fn num_patches(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }
    /// Tokens per image: patches plus the cls token.
    pub fn tokens(&self) -> usize {
        self.num_patches() + 1
    }
    pub fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
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

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("model config", m));
        if self.patch_size == 0
            || !self.img_size.0.is_multiple_of(self.patch_size)
            || !self.img_size.1.is_multiple_of(self.patch_size)
        {
            return bad(format!("image size {:?} is not a multiple of patch size {}", self.img_size, self.patch_size));
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(format!("embed_dim {} is not a multiple of num_heads {}", self.embed_dim, self.num_heads));
        }
        if self.depth == 0 || self.mlp_hidden == 0 || self.num_classes == 0 || self.in_chans == 0 {
            return bad("depth, mlp_hidden, num_classes and in_chans must be positive".into());
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
    }
}
