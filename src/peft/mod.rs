//! Parameter-efficient methods: which tensors train, and the branches added to the block Linears.
//! The method itself (merge, competition) lives in `ops::kmerge` / `ops::sparsify` and meets the model in
//! `model/linear.rs`; the bi-level allocator in `allocator.rs`. Its equations: `docs/method.md`.
pub mod allocator;

use crate::error::{Error, Result};
use crate::ops::kmerge::KernelKind;

/// A kernelized sparse branch family: KLoRA (dense K), MixK (dense mixture), SNELL (sparse K),
/// SNELLA (sparse mixture with allocated per-layer ratios).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KernelMethod {
    /// The kernel K(a_i, b_j) that builds M from the factors.
    pub kernel: KernelKind,
    /// Rank r: the factors are (2, n, r/2).
    pub r: usize,
    /// M = K + α·softmax_out(K/γ) + β (SNELLA, MixK) instead of M = K.
    pub mixture: bool,
    /// Magnitude competition: M_s = M·|M|·1[|M| > quantile(|M|, s)] (SNELL, SNELLA).
    pub sparse: bool,
    /// Initial fraction of entries zeroed per layer (SNELL: the fixed ratio; SNELLA: before the first reallocation).
    pub sparsity: f32,
    /// Keep the bi-level allocator's EMA importance (SNELLA; optional for SNELL).
    pub allocator: bool,
    /// Dropout on the branch input (one mask shared by q, k, v; none on proj), as the official
    /// `additional_drop` (0.1 in the released scripts; 0 = off). With either rate > 0 a branch runs as its own
    /// product x_d·M_s instead of being merged into W0.
    #[serde(default)]
    pub dropout: f32,
    /// Drop-path on every branch output (official `TuningModule.drop_path`, 0.1 in the scripts; 0 = off).
    #[serde(default)]
    pub drop_path: f32,
}

impl KernelMethod {
    /// Whether the branches run unmerged (dropout or drop-path on them).
    pub fn regularised(&self) -> bool {
        self.dropout > 0.0 || self.drop_path > 0.0
    }
}

/// What a training run adapts.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Method {
    /// Every backbone tensor trains.
    Full,
    /// Linear probe: head and cls token only.
    Linear,
    /// LoRA-r on q, k, v, proj, fc1, fc2: Δy = x·Aᵀ·Bᵀ, A (r, in), B (out, r).
    Lora {
        /// Rank (≥ 1).
        r: usize,
    },
    /// The kernelized branches.
    Kernel(KernelMethod),
    /// GPS-like sparse tuning: gradients and AdamW state for every block weight, updates masked to a fixed
    /// random `density` of each block Linear weight (what the paper's memory tables compare against).
    Gps {
        /// Fraction of each block weight that is updated, in [0, 1].
        density: f32,
    },
}

impl Method {
    /// SNELLA-r: sparse mixture-kernel branches with the bi-level allocator; `sparsity` is the initial
    /// ratio of zeroed entries. Checked by [`Method::validate`] when a model is planned.
    pub fn snella(r: usize, sparsity: f32) -> Method {
        Method::Kernel(KernelMethod {
            kernel: KernelKind::PiecewiseLinear,
            r,
            mixture: true,
            sparse: true,
            sparsity,
            allocator: true,
            dropout: 0.0,
            drop_path: 0.0,
        })
    }
    /// SNELL-r: sparse plain-kernel branches at the fixed ratio `sparsity`.
    pub fn snell(r: usize, sparsity: f32) -> Method {
        Method::Kernel(KernelMethod {
            kernel: KernelKind::PiecewiseLinear,
            r,
            mixture: false,
            sparse: true,
            sparsity,
            allocator: false,
            dropout: 0.0,
            drop_path: 0.0,
        })
    }
    /// MixK-r: dense mixture-kernel branches.
    pub fn mixk(r: usize) -> Method {
        Method::Kernel(KernelMethod {
            kernel: KernelKind::PiecewiseLinear,
            r,
            mixture: true,
            sparse: false,
            sparsity: 0.0,
            allocator: false,
            dropout: 0.0,
            drop_path: 0.0,
        })
    }
    /// KLoRA-r: dense plain-kernel branches.
    pub fn klora(r: usize) -> Method {
        Method::Kernel(KernelMethod {
            kernel: KernelKind::PiecewiseLinear,
            r,
            mixture: false,
            sparse: false,
            sparsity: 0.0,
            allocator: false,
            dropout: 0.0,
            drop_path: 0.0,
        })
    }

    /// Parses `full`, `linear`, `lora8`, `snell32`, `snella32`, `mixk8`, `klora8`, `gps` (rank suffix
    /// optional: default 8 for lora/klora/mixk, 32 for snell/snella). `sparsity` applies to snell/snella.
    ///
    /// # Errors
    /// `Invalid { option: "method" }` for an unknown name, a zero or odd kernel rank, or a `sparsity`
    /// outside [0, 1].
    pub fn parse(s: &str, sparsity: f32) -> Result<Method> {
        let (name, digits) = s.split_at(s.find(|c: char| c.is_ascii_digit()).unwrap_or(s.len()));
        let rank = |default: usize| -> Result<usize> {
            if digits.is_empty() {
                return Ok(default);
            }
            let r: usize = digits.parse().map_err(|_| Error::invalid("method", format!("bad rank in '{s}'")))?;
            if r == 0 {
                return Err(Error::invalid("method", format!("rank must be positive in '{s}'")));
            }
            Ok(r)
        };
        let even = |r: usize| -> Result<usize> {
            if !r.is_multiple_of(2) {
                return Err(Error::invalid("method", format!("kernel rank must be even (two pieces of r/2), got {r}")));
            }
            Ok(r)
        };
        Ok(match name {
            "full" if digits.is_empty() => Method::Full,
            "linear" if digits.is_empty() => Method::Linear,
            "gps" if digits.is_empty() => Method::Gps { density: 0.01 },
            "lora" => Method::Lora { r: rank(8)? },
            "snella" => Method::snella(even(rank(32)?)?, sparsity),
            "snell" => Method::snell(even(rank(32)?)?, sparsity),
            "mixk" => Method::mixk(even(rank(8)?)?),
            "klora" => Method::klora(even(rank(8)?)?),
            _ => {
                return Err(Error::invalid(
                    "method",
                    format!("unknown method '{s}' (full, linear, gps, loraR, snellR, snellaR, mixkR, kloraR)"),
                ))
            }
        })
        .and_then(|m| m.validate().map(|()| m))
    }

    /// Checks the numbers of a method built by hand: LoRA rank ≥ 1; kernel rank even, ≥ 2 and at most
    /// 2·`MAX_D` (256); sparsity in [0, 1]; branch dropout and drop-path in [0, 1); GPS density in [0, 1].
    ///
    /// # Errors
    /// `Invalid { option: "method" }` naming the field and the method.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid("method", format!("{}: {m}", self.name())));
        match *self {
            Method::Full | Method::Linear => Ok(()),
            Method::Lora { r: 0 } => bad("LoRA rank must be at least 1".into()),
            Method::Lora { .. } => Ok(()),
            Method::Gps { density } if !(0.0..=1.0).contains(&density) => {
                bad(format!("GPS density {density} is not in [0, 1]"))
            }
            Method::Gps { .. } => Ok(()),
            Method::Kernel(k) => {
                let max = 2 * crate::ops::kmerge::MAX_D;
                if k.r < 2 || !k.r.is_multiple_of(2) || k.r > max {
                    return bad(format!("kernel rank {} must be even, between 2 and {max}", k.r));
                }
                if !(0.0..=1.0).contains(&k.sparsity) {
                    return bad(format!("sparsity {} is not in [0, 1]", k.sparsity));
                }
                for (what, v) in [("branch dropout", k.dropout), ("branch drop-path", k.drop_path)] {
                    if !(0.0..1.0).contains(&v) {
                        return bad(format!("{what} {v} is not in [0, 1)"));
                    }
                }
                Ok(())
            }
        }
    }

    /// Short name, e.g. `snella32`.
    pub fn name(&self) -> String {
        match self {
            Method::Full => "full".into(),
            Method::Linear => "linear".into(),
            Method::Gps { .. } => "gps".into(),
            Method::Lora { r } => format!("lora{r}"),
            Method::Kernel(k) => {
                let base = match (k.mixture, k.sparse) {
                    (true, true) => "snella",
                    (false, true) => "snell",
                    (true, false) => "mixk",
                    (false, false) => "klora",
                };
                let kern = if k.kernel == KernelKind::PiecewiseLinear {
                    String::new()
                } else {
                    format!("-{:?}", k.kernel).to_lowercase()
                };
                format!("{base}{}{kern}", k.r)
            }
        }
    }

    /// Whether the backbone weights train (full fine-tuning and GPS).
    pub fn trains_backbone(&self) -> bool {
        matches!(self, Method::Full | Method::Gps { .. })
    }

    /// Whether the block Linears get branches.
    pub fn has_branches(&self) -> bool {
        matches!(self, Method::Lora { .. } | Method::Kernel(_))
    }
}

/// Decoupled weight decay applies to tensors with ≥ 2 dimensions, except biases, pos_embed and cls_token
/// (the official `set_weight_decay`; method.md §12).
pub(crate) fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.ends_with(".bias") && !matches!(name, "pos_embed" | "cls_token" | "dist_token")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_round_trip() {
        for s in ["full", "linear", "gps", "lora8", "snell32", "snella32", "mixk8", "klora16"] {
            assert_eq!(Method::parse(s, 0.5).unwrap().name(), s);
        }
        assert!(Method::parse("snella7", 0.0).is_err());
        assert!(Method::parse("adapter", 0.0).is_err());
        assert!(decays("head.weight", &[10, 64]) && !decays("head.bias", &[10]) && !decays("cls_token", &[1, 1, 64]));
    }
}
