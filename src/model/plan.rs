//! The plan of a model: every tensor a training step touches, with its pool, shape and dtype, laid out before
//! anything is allocated (llm.c's `fill_in_activation_sizes`), and the handles the step reads them by.
//! Shapes: B images, T = 1 + patches tokens, D width, F MLP width, H heads of hd, V classes, BT = B·T rows
//! of the residual stream, r/2 = `half_rank` the width of a kernel branch's factor pieces.
//!
//! [`plan_model`] adds the tensors in a fixed order (offsets depend on it): the shared work buffers
//! ([`plan_work`]), the backbone parameters ([`plan_params`]), the branches of the method and their scratch
//! ([`plan_branches`]), then the activations, block by block ([`plan_block`]).
use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::model::config::{Position, ViTConfig};
use crate::ops::attention::AttentionBuffers;
use crate::ops::colsum::partials_len;
use crate::ops::kmerge::{KernelKind, MergeScratch};
use crate::ops::sparsify::SparsifyScratch;
use crate::peft::{decays, Method};
use crate::runtime::{DType, Plan, Pool, Tensor};

/// How much of a block's forward the backward recomputes instead of keeping (each level includes the ones
/// before it). Recomputed tensors live in one shared scratch buffer instead of one per layer.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Recompute {
    /// Keep every activation.
    None,
    /// LayerNorm outputs (from the saved mean/rstd, bit-identical) and GELU outputs: elementwise, cheap.
    Norms,
    /// Also the attention probabilities and output, from the saved q|k|v (one batched GEMM pair + softmax).
    #[default]
    Attention,
    /// Also the qkv and fc1 projections (re-running those Linears) and the mid-block sum (re-running the
    /// attention half): only each block's input is kept. Each Linear's factor gradients are taken before its
    /// merged weight is built (one more merge per branch), so ∂L/∂M_s needs no buffer of its own. Training
    /// at this level also fuses the branch update into the backward ([`MemoryOptions::for_training`]).
    Block,
}

/// How the frozen backbone and the kept residual stream are stored. The arithmetic is fp32 either way.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything fp32 (what the golden vectors check).
    #[default]
    Fp32,
    /// bf16 storage of the frozen block Linear weights (qkv, proj, fc1, fc2: widened to fp32 in scratch
    /// where they are used, merged with the fp32 branches there) and of the residual-stream checkpoints the
    /// backward keeps (each block's input and mid-block sum, rounded in the forward itself, so the backward
    /// differentiates exactly the forward that ran). Factors, gradients, optimizer state, every other
    /// activation and all math stay fp32. Trainable weights (full fine-tuning, GPS) stay fp32.
    Bf16,
}

impl Precision {
    /// `fp32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The memory knobs of a model: what the backward recomputes, how the backbone is stored, and where the
/// branch factors are updated. A bare [`Recompute`] converts into options with fp32 storage and the update
/// after the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryOptions {
    /// What the backward recomputes instead of keeping.
    pub recompute: Recompute,
    /// Storage precision of the frozen weights and the residual stream.
    pub precision: Precision,
    /// The branch factors' AdamW step (and the SNELLA allocator's EMA update) runs inside the backward, one
    /// Linear at a time, as soon as that Linear's factor gradients are complete ([`Model::backward_step`]):
    /// their gradients then need one Linear's room, planned in its merge scratch, instead of a buffer for
    /// every factor. The numbers are the same bits as [`Model::backward`], [`Model::adamw_step`] and
    /// [`Allocator::update`] in turn (the update is element-wise and there is no gradient clipping); the
    /// price is that the branch gradients cannot be read ([`Model::get_grad`]). Methods without branches
    /// ignore it.
    ///
    /// [`Model::backward_step`]: crate::model::Model::backward_step
    /// [`Model::backward`]: crate::model::Model::backward
    /// [`Model::adamw_step`]: crate::model::Model::adamw_step
    /// [`Model::get_grad`]: crate::model::Model::get_grad
    /// [`Allocator::update`]: crate::peft::allocator::Allocator::update
    pub fused_update: bool,
}

impl MemoryOptions {
    /// The options a training run uses at `recompute` and `precision`: at [`Recompute::Block`], the level
    /// for the least memory, the branch factors are also updated inside the backward (`fused_update`);
    /// below it, after (where the gradients stay readable and the step is the library's plain cycle).
    pub fn for_training(recompute: Recompute, precision: Precision) -> MemoryOptions {
        MemoryOptions { recompute, precision, fused_update: recompute >= Recompute::Block }
    }
}

impl From<Recompute> for MemoryOptions {
    fn from(recompute: Recompute) -> MemoryOptions {
        MemoryOptions { recompute, precision: Precision::Fp32, fused_update: false }
    }
}

/// A parameter: its value, and for trainable ones the gradient and AdamW moments.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Param {
    pub(crate) value: Tensor,
    pub(crate) grad: Option<Tensor>,
    pub(crate) m: Option<Tensor>,
    pub(crate) v: Option<Tensor>,
    pub(crate) decay: bool,
    /// GPS: the fixed update mask (u8, same shape) of a block Linear weight.
    pub(crate) mask: Option<Tensor>,
}

/// Every parameter by name, in plan order.
#[derive(Default)]
pub(crate) struct Params {
    pub(crate) names: Vec<String>,
    pub(crate) list: Vec<Param>,
    index: HashMap<String, usize>,
}

/// A trainable fp32 parameter: its value, AdamW moments, and the gradient `grad` plans (planned in between,
/// so the plan's tensor order is value, gradient, m, v).
fn trainable_param(plan: &mut Plan, name: &str, shape: &[usize], grad: impl FnOnce(&mut Plan) -> Tensor) -> Param {
    let value = plan.f32(name, shape, Pool::Trainable);
    let grad = Some(grad(plan));
    let m = Some(plan.f32(format!("adamw.m.{name}"), shape, Pool::Optimizer));
    let v = Some(plan.f32(format!("adamw.v.{name}"), shape, Pool::Optimizer));
    Param { value, grad, m, v, decay: decays(name, shape), mask: None }
}

impl Params {
    /// A trainable branch factor whose gradient is `grad` (a slot of the merge scratch, under the fused
    /// update) or, when None, a tensor of its own in the gradient pool.
    fn add_factor(&mut self, plan: &mut Plan, name: &str, shape: &[usize], grad: Option<Tensor>) -> Param {
        let Some(grad) = grad else { return self.add_stored(plan, name, shape, true, DType::F32) };
        assert_eq!(grad.numel, shape.iter().product::<usize>(), "{name}: gradient slot size");
        let p = trainable_param(plan, name, shape, |_| grad);
        self.push(name, p)
    }

    /// A parameter whose frozen value is stored as `frozen_dtype` (trainable ones are always fp32 masters).
    fn add_stored(
        &mut self,
        plan: &mut Plan,
        name: &str,
        shape: &[usize],
        trainable: bool,
        frozen_dtype: DType,
    ) -> Param {
        let p = if trainable {
            trainable_param(plan, name, shape, |plan| plan.f32(format!("grad.{name}"), shape, Pool::Grads))
        } else {
            let value = plan.add(name, shape, frozen_dtype, Pool::Frozen);
            Param { value, grad: None, m: None, v: None, decay: false, mask: None }
        };
        self.push(name, p)
    }

    fn push(&mut self, name: &str, p: Param) -> Param {
        self.index.insert(name.to_string(), self.list.len());
        self.names.push(name.to_string());
        self.list.push(p);
        p
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Param> {
        self.index.get(name).map(|&i| &self.list[i])
    }

    /// (name, param) of the trainable set.
    pub(crate) fn trainable(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.names.iter().map(String::as_str).zip(&self.list).filter(|(_, p)| p.grad.is_some())
    }
}

/// The trainable tensors of one branch (plan handles: copied once per Linear call, so size is no concern).
#[derive(Clone, Copy, Debug)]
#[allow(clippy::large_enum_variant)]
pub(crate) enum BranchParams {
    /// W = W0 + B·A: A (r, in), B (out, r).
    Lora { a: Param, b: Param, r: usize },
    /// M from the factors In_Qs (2, in, r/2) and Out_Qs (2, out, r/2) (the official names) and, for the
    /// mixture, α, γ, β; `ema` holds the allocator's EMAs of In_Qs and Out_Qs when the allocator runs.
    Kernel {
        in_qs: Param,
        out_qs: Param,
        mix: Option<[Param; 3]>,
        kind: KernelKind,
        sparse: bool,
        half_rank: usize,
        ema: Option<[FactorEma; 2]>,
    },
}

impl BranchParams {
    /// The branch's trainable parameters, plan order.
    pub(crate) fn trainables(&self) -> Vec<Param> {
        match *self {
            BranchParams::Lora { a, b, .. } => vec![a, b],
            BranchParams::Kernel { in_qs, out_qs, mix, .. } => {
                let mut v = vec![in_qs, out_qs];
                v.extend(mix.into_iter().flatten());
                v
            }
        }
    }
}

/// The allocator's EMAs of one factor tensor, shaped like it: importance Ī and uncertainty Ū.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FactorEma {
    pub(crate) ipt: Tensor,
    pub(crate) unc: Tensor,
}

/// The branch on one Linear (q, k and v have one each on the fused qkv Linear).
#[derive(Clone, Debug)]
pub(crate) struct Branch {
    pub(crate) prefix: String,
    pub(crate) block: usize,
    pub(crate) pos: Position,
    /// Index among all branches (module order); indexes `Model::sparsity` and the threshold table.
    pub(crate) id: usize,
    /// First output row of the Linear's weight that this branch adapts (q: 0, k: D, v: 2D).
    pub(crate) row0: usize,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    pub(crate) params: BranchParams,
}

impl Branch {
    /// Whether the branch sparsifies its M (SNELL, SNELLA): it has a threshold t.
    pub(crate) fn is_sparse(&self) -> bool {
        matches!(self.params, BranchParams::Kernel { sparse: true, .. })
    }
}

/// Scratch of the branches of one Linear shape; the scopes of the three shapes alias each other.
pub(crate) struct BranchScratch {
    /// The merged weight W0 + M_sᵀ of the whole Linear (out_total, in).
    pub(crate) w: Tensor,
    /// M (in, out) of one kernel branch, sparsified into M_s in place once its last use as M is over; the
    /// merge backward's K and R_0 then go in the same buffer (None for LoRA, which adds B·A into W directly).
    pub(crate) m: Option<Tensor>,
    /// Kernel: ∂L/∂M_s (in, out), then ∂L/∂M in place (at `Recompute::Block`, in W's buffer: see
    /// `grads_first`). LoRA: x·Aᵀ and dy·B of one branch (2, rows, r).
    pub(crate) dms: Tensor,
    pub(crate) merge: Option<MergeScratch>,
    pub(crate) sparsify: Option<SparsifyScratch>,
    /// `dms` is W's buffer: the backward takes every kernel branch's factor gradients first, then builds W.
    pub(crate) grads_first: bool,
}

/// A block Linear: y = x·Wᵀ + b (+ branches).  w: (out, in)  b: (out)
pub(crate) struct Linear {
    pub(crate) w: Param,
    pub(crate) b: Param,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    pub(crate) branches: Vec<Branch>,
    /// Which `Layout::branch_scratch` entry serves this Linear.
    pub(crate) scratch: usize,
}

/// A LayerNorm's affine parameters (its forward, recompute and backward calls are in `vit.rs`).  w, b: (D)
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerNorm {
    pub(crate) w: Param,
    pub(crate) b: Param,
}

/// The per-row statistics a LayerNorm forward saves for its backward.       mean, rstd: (rows)
#[derive(Clone, Copy, Debug)]
pub(crate) struct NormStats {
    pub(crate) mean: Tensor,
    pub(crate) rstd: Tensor,
}

/// What the backward needs from one block's forward.
pub(crate) struct BlockActs {
    /// LayerNorm 1 output and statistics.                (BT, D), (BT) each
    pub(crate) ln1: Tensor,
    pub(crate) ln1_stats: NormStats,
    /// Fused q|k|v projection.                            (BT, 3D)
    pub(crate) qkv: Tensor,
    /// Attention probabilities.                           (B, H, T, T)
    pub(crate) probs: Tensor,
    /// Merged heads (input of proj).                      (BT, D)
    pub(crate) attn: Tensor,
    /// Residual stream after attention: kept (stored like the stream), or at `Recompute::Block` fp32 scratch
    /// that the backward refills from the block input.      (BT, D)
    pub(crate) x_mid: Tensor,
    /// LayerNorm 2 output and statistics.                (BT, D), (BT) each
    pub(crate) ln2: Tensor,
    pub(crate) ln2_stats: NormStats,
    /// fc1 output before GELU, and after.                  (BT, F), (BT, F)
    pub(crate) fc1: Tensor,
    pub(crate) gelu: Tensor,
    /// Outputs of proj and fc2 before LayerScale, kept only when γ trains.   (BT, D)
    pub(crate) proj_out: Option<Tensor>,
    pub(crate) fc2_out: Option<Tensor>,
}

pub(crate) struct Block {
    pub(crate) norm1: LayerNorm,
    pub(crate) qkv: Linear,
    pub(crate) proj: Linear,
    pub(crate) ls1: Option<Param>,
    pub(crate) norm2: LayerNorm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) ls2: Option<Param>,
    pub(crate) acts: BlockActs,
}

/// Buffers reused by every layer (persistent scratch, scope 0).
pub(crate) struct Work {
    /// ∂L/∂ residual stream, running from the head down.  (BT, D)
    pub(crate) dres: Tensor,
    /// A Linear output (forward: proj, fc2, the patch projection), the input gradient of a Linear, or the MLP
    /// branch's output gradient (the attention branch's goes in `dqkv`'s buffer).   (BT, D)
    pub(crate) dh: Tensor,
    pub(crate) dqkv: Tensor,
    /// (BT, F): ∂L/∂(GELU output), then ∂L/∂(fc1 output) in place.
    pub(crate) du: Tensor,
    /// Head-major q, k, v and attention output.             (B, H, T, hd) each
    pub(crate) q: Tensor,
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
    pub(crate) o: Tensor,
    pub(crate) dscores: Tensor,
    pub(crate) dtmp: Tensor,
    /// Images per attention call: at `Recompute::Attention` and above the probabilities are scratch, and the
    /// attention runs over chunks of about B/8 images, so q, k, v, o, the probabilities and their gradient
    /// are planned for one chunk; below, the whole batch (the kept probabilities are per layer anyway).
    pub(crate) attn_chunk: usize,
    /// Branch dropout/drop-path (kernel methods with those rates only): the dropped-out branch input and a
    /// per-branch copy (drop-path, then the input gradient through the branch).   (BT, max(D, F)) each
    pub(crate) reg_x: Option<Tensor>,
    pub(crate) reg_xb: Option<Tensor>,
    /// bf16 storage: the fp32 residual stream of the block being run (its input, then its output) and, below
    /// `Recompute::Block`, its mid-block sum; the kept bf16 copies are widened into them in the backward.
    ///                                                                     (BT, D) each
    pub(crate) x: Option<Tensor>,
    pub(crate) xm: Option<Tensor>,
    /// bf16 storage without branches (linear probe): a frozen Linear weight widened to fp32.  (max(3D·D, F·D))
    pub(crate) w0: Option<Tensor>,
    /// Head: final-norm cls rows, gradients.                (B, D), (B, V)
    pub(crate) dfeat: Tensor,
    pub(crate) dcls: Tensor,
    pub(crate) dlogits: Tensor,
    /// The partial column sums of the bias, LayerScale and LayerNorm gradients (`ops::colsum`): the widest of
    /// LayerNorm's two planes over (BT, D), a bias over (BT, max(3D, F)) and the head's over (B, V).
    pub(crate) colsum: Tensor,
}

impl Work {
    /// The attention buffers of one layer: the shared head-major scratch and that layer's probabilities.
    pub(crate) fn attention(&self, probs: Tensor) -> AttentionBuffers {
        AttentionBuffers { q: self.q, k: self.k, v: self.v, o: self.o, probs }
    }
}

/// Every tensor handle of a planned model.
pub(crate) struct Layout {
    pub(crate) params: Params,
    pub(crate) blocks: Vec<Block>,
    pub(crate) branch_scratch: Vec<BranchScratch>,
    pub(crate) work: Work,
    /// Images (B, C, H, W), labels (B) i32, per-sample losses (B), logits (B, V).
    pub(crate) images: Tensor,
    pub(crate) labels: Tensor,
    pub(crate) losses: Tensor,
    pub(crate) logits: Tensor,
    /// Patches (B·Np, C·P·P): an activation when the patch embedding trains, scratch otherwise.
    pub(crate) patches: Tensor,
    /// Residual stream entering each block and after the last: (L+1) × (BT, D).
    pub(crate) resid: Vec<Tensor>,
    /// Final norm: its parameters, the cls rows in, normalised out, statistics.  (B, D), (B, D), (B) each
    pub(crate) final_norm: LayerNorm,
    pub(crate) cls_in: Tensor,
    pub(crate) feats: Tensor,
    pub(crate) lnf_stats: NormStats,
    /// Threshold t of every sparse branch from the last forward.   (branches)
    pub(crate) thresholds: Tensor,
    pub(crate) branches: Vec<Branch>,
    pub(crate) recompute: Recompute,
    pub(crate) precision: Precision,
    /// The branch factors are updated inside the backward; their gradients are slots of the merge scratch.
    pub(crate) fused_update: bool,
}

/// Buffers of the activations that the backward recomputes instead of keeping: one for all layers, each
/// present from its recompute level on (`ln` serves LN1 and LN2, which are never needed at the same time).
struct Recomputed {
    ln: Option<Tensor>,
    gelu: Option<Tensor>,
    probs: Option<Tensor>,
    attn: Option<Tensor>,
    qkv: Option<Tensor>,
    fc1: Option<Tensor>,
    /// At `Block`, the mid-block sum too: it lives in `attn`'s buffer, which is free from the proj GEMM (which
    /// reads the merged heads before the sum is written) until the attention is recomputed.
    x_mid: Option<Tensor>,
}

/// Plans every tensor of a training step of `cfg` under `method` at batch `b`, keeping activations as
/// `mem.recompute` says and storing them as `mem.precision` says.
pub(crate) fn plan_model(cfg: &ViTConfig, method: &Method, b: usize, mem: MemoryOptions) -> Result<(Plan, Layout)> {
    let MemoryOptions { recompute, precision, fused_update } = mem;
    cfg.validate()?;
    method.validate()?;
    if b == 0 {
        return Err(Error::invalid("batch", "must be at least 1"));
    }
    // The largest tensor of a step (a (B, H, T, T) score block or a (BT, max(3D, F)) activation) must be
    // addressable; f64 cannot overflow where usize products could.
    let (tf, hf) = (cfg.tokens() as f64, cfg.num_heads as f64);
    let widest = (3.0 * cfg.embed_dim as f64).max(cfg.mlp_hidden as f64).max(hf * tf);
    if b as f64 * tf * widest * 4.0 > (1u64 << 48) as f64 {
        return Err(Error::invalid("batch", format!("batch {b} makes a tensor of this model exceed 2^48 bytes")));
    }
    let (d, v, bt) = (cfg.embed_dim, cfg.num_classes, b * cfg.tokens());
    let mut plan = Plan::new();
    let (work, patches, recomputed) = plan_work(&mut plan, cfg, method, b, mem);
    let mut params = plan_params(&mut plan, cfg, method, precision);
    let (branches, branch_scratch) = plan_branches(&mut plan, &mut params, cfg, method, bt, mem);

    // Activations.
    let a = Pool::Activations;
    let images = plan.f32("input.images", &[b, cfg.in_chans, cfg.img_size.0, cfg.img_size.1], a);
    let labels = plan.add("input.labels", &[b], DType::I32, a);
    // The residual stream checkpoints: block inputs and (below `Block`) mid-block sums (bf16 storage: rounded
    // to bf16).
    let stream = if precision == Precision::Bf16 { DType::BF16 } else { DType::F32 };
    let mut resid = vec![plan.add("act.resid.0", &[bt, d], stream, a)];
    let mut blocks = Vec::new();
    for l in 0..cfg.depth {
        blocks.push(plan_block(&mut plan, cfg, method, b, l, &params, &branches, &recomputed, stream));
        resid.push(plan.add(format!("act.resid.{}", l + 1), &[bt, d], stream, a));
    }
    let cls_in = plan.f32("act.head.cls_in", &[b, d], a);
    let feats = plan.f32("act.head.feats", &[b, d], a);
    let lnf_stats =
        NormStats { mean: plan.f32("act.head.lnf_mean", &[b], a), rstd: plan.f32("act.head.lnf_rstd", &[b], a) };
    let norm = |n: &str| *params.get(n).expect("every backbone tensor is planned");
    let final_norm = LayerNorm { w: norm("norm.weight"), b: norm("norm.bias") };
    let logits = plan.f32("act.head.logits", &[b, v], a);
    let losses = plan.f32("act.head.losses", &[b], a);
    let thresholds = plan.f32("act.branch.thresholds", &[branches.len().max(1)], a);
    let layout = Layout {
        params,
        blocks,
        branch_scratch,
        work,
        images,
        labels,
        losses,
        logits,
        patches,
        resid,
        final_norm,
        cls_in,
        feats,
        lnf_stats,
        thresholds,
        branches,
        recompute,
        precision,
        fused_update: fused_update && method.has_branches(),
    };
    Ok((plan, layout))
}

/// The persistent scratch (scope 0: cuBLAS workspace and the per-layer gradient buffers), the patches, and
/// the shared buffers of what the backward recomputes.
fn plan_work(
    plan: &mut Plan,
    cfg: &ViTConfig,
    method: &Method,
    b: usize,
    mem: MemoryOptions,
) -> (Work, Tensor, Recomputed) {
    let (d, f, h, t, v) = (cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads, cfg.tokens(), cfg.num_classes);
    let (bt, np, hd) = (b * t, cfg.num_patches(), cfg.head_dim());
    let (recompute, bf16) = (mem.recompute, mem.precision == Precision::Bf16);
    let full = method.trains_backbone();
    plan.add_cublas_workspace();
    let s = Pool::Scratch;
    // Buffers that are never live at the same time share storage (hand-placed, llm.c style):
    //  - `heads` holds q|k|v|o of one attention chunk (forward, and backward's attention part), and, when the
    //    GELU output is kept per layer (`Recompute::None`), ∂L/∂u during the backward's MLP part, which ends
    //    before the attention part starts;
    //  - `wide_a` holds ∂L/∂(proj output) and then ∂L/∂qkv (attention part of the backward), the recomputed GELU
    //    output (forward MLP and
    //    backward MLP part) and then ∂L/∂u in its place (fc2's backward reads its input before it writes its
    //    input gradient, and GELU's backward reads the fc1 output), and the patches before block 0 when the
    //    patch embedding is frozen;
    //  - `wide_b` holds the recomputed qkv (attention part) and fc1 output (MLP part) at `Recompute::Block`.
    let patches_len = if full { 0 } else { b * np * cfg.patch_dim() };
    let regularised = matches!(method, Method::Kernel(k) if k.regularised());
    let chunk = if recompute >= Recompute::Attention { b.div_ceil(8) } else { b };
    let du_in_heads = recompute < Recompute::Norms;
    let wide_a = plan.f32("work.wide_a", &[(bt * 3 * d).max(bt * f).max(patches_len)], s);
    let wide_b = (recompute >= Recompute::Block).then(|| plan.f32("work.wide_b", &[(bt * 3 * d).max(bt * f)], s));
    // The attention's own scratch (q|k|v|o, the probabilities' gradient, and from `Attention` on the
    // probabilities): from `Attention` on nothing in it outlives the attention, so it takes a scope of its own,
    // aliasing the branches' merge scratch (no Linear runs inside an attention call; the backward recomputes
    // every chunk it differentiates). Below, the kept probabilities or ∂L/∂u share its lifetime with a Linear.
    let scoped = recompute >= Recompute::Attention;
    let attention_scratch = |plan: &mut Plan| {
        let heads = plan.f32("work.heads", &[(4 * chunk * h * t * hd).max(if du_in_heads { bt * f } else { 0 })], s);
        let dscores = plan.f32("work.attn.dscores", &[chunk, h, t, t], s);
        let dtmp = plan.f32("work.attn.dtmp", &[chunk, h, t, hd], s);
        let probs = scoped.then(|| plan.f32("work.recompute.probs", &[chunk, h, t, t], s));
        (heads, dscores, dtmp, probs)
    };
    let early = (!scoped).then(|| attention_scratch(plan));
    let dres = plan.f32("work.dres", &[bt, d], s);
    let dh = plan.f32("work.dh", &[bt, d], s);
    let reg_x = regularised.then(|| plan.f32("work.reg_x", &[bt, d.max(f)], s));
    let reg_xb = regularised.then(|| plan.f32("work.reg_xb", &[bt, d.max(f)], s));
    let x = bf16.then(|| plan.f32("work.x", &[bt, d], s));
    // The mid-block sum needs its own fp32 buffer only while it is kept (at `Block` it is recomputed in the
    // shared work.recompute.attn).
    let xm = (bf16 && recompute < Recompute::Block).then(|| plan.f32("work.xm", &[bt, d], s));
    let w0 = (bf16 && !full && !method.has_branches()).then(|| plan.f32("work.w0", &[(3 * d * d).max(f * d)], s));
    let dfeat = plan.f32("work.dfeat", &[b, d], s);
    let dcls = plan.f32("work.dcls", &[b, d], s);
    let dlogits = plan.f32("work.dlogits", &[b, v], s);
    let colsum_len = partials_len(bt, d, 2).max(partials_len(bt, (3 * d).max(f), 1)).max(partials_len(b, v, 1));
    let colsum = plan.f32("work.colsum", &[colsum_len], s);
    let patches = if full {
        plan.f32("act.patches", &[b * np, cfg.patch_dim()], Pool::Activations)
    } else {
        wide_a.slice(0, b * np * cfg.patch_dim())
    };
    let mut shared = |level: Recompute, name: &str, shape: &[usize]| {
        (recompute >= level).then(|| plan.f32(format!("work.recompute.{name}"), shape, s))
    };
    let ln = shared(Recompute::Norms, "ln", &[bt, d]);
    let gelu = (recompute >= Recompute::Norms).then(|| wide_a.slice(0, bt * f));
    let attn = shared(Recompute::Attention, "attn", &[bt, d]);
    // Scope 0 ends here; the attention's scope, when it has one, is the first of the others.
    let (heads, dscores, dtmp, probs) = early.unwrap_or_else(|| {
        plan.scope();
        attention_scratch(plan)
    });
    let quarter = chunk * h * t * hd;
    let work = Work {
        dres,
        dh,
        dqkv: wide_a.slice(0, bt * 3 * d),
        du: if du_in_heads { heads } else { wide_a }.slice(0, bt * f),
        q: heads.slice(0, quarter),
        k: heads.slice(quarter, quarter),
        v: heads.slice(2 * quarter, quarter),
        o: heads.slice(3 * quarter, quarter),
        dscores,
        dtmp,
        attn_chunk: chunk,
        reg_x,
        reg_xb,
        x,
        xm,
        w0,
        dfeat,
        dcls,
        dlogits,
        colsum,
    };
    let recomputed = Recomputed {
        ln,
        gelu,
        probs,
        attn,
        qkv: wide_b.map(|w| w.slice(0, bt * 3 * d)),
        fc1: wide_b.map(|w| w.slice(0, bt * f)),
        x_mid: if recompute >= Recompute::Block { attn } else { None },
    };
    (work, patches, recomputed)
}

/// The backbone parameters in timm order: trainable ones with gradient and AdamW moments, frozen block
/// Linear weights in bf16 under bf16 storage, and GPS's update masks.
fn plan_params(plan: &mut Plan, cfg: &ViTConfig, method: &Method, precision: Precision) -> Params {
    let full = method.trains_backbone();
    let trainable = |name: &str| full || matches!(name, "cls_token" | "head.weight" | "head.bias");
    // bf16 storage: the four block Linear weights, the bulk of the backbone (the rest is small).
    let block_linear = |name: &str| {
        name.starts_with("blocks.")
            && ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
                .iter()
                .any(|w| name.ends_with(w))
    };
    let mut params = Params::default();
    let shapes = cfg.param_shapes();
    for (name, shape) in &shapes {
        let dtype = if precision == Precision::Bf16 && block_linear(name) { DType::BF16 } else { DType::F32 };
        params.add_stored(plan, name, shape, trainable(name), dtype);
    }
    if let Method::Gps { .. } = method {
        for (name, shape) in &shapes {
            if name.starts_with("blocks.") && name.ends_with("weight") && shape.len() == 2 {
                let i = params.index[name.as_str()];
                params.list[i].mask = Some(plan.add(format!("gps.mask.{name}"), shape, DType::U8, Pool::Optimizer));
                params.list[i].decay = false; // the official GPS groups do not decay the masked weights
            }
        }
    }
    params
}

/// The branches of the method, in the official module order (q, k, v, proj, fc1, fc2 per block), with their
/// trainable factors, and the scratch they are merged in: one scope per Linear shape, aliasing each other
/// (one Linear runs at a time). `bt`: the rows of a Linear's input (B·T). Under the fused update the factor
/// gradients of one Linear live in its shape's scope too (one slot per branch: q, k, v on qkv), since they
/// are complete, used and dead within that Linear's backward.
fn plan_branches(
    plan: &mut Plan,
    params: &mut Params,
    cfg: &ViTConfig,
    method: &Method,
    bt: usize,
    mem: MemoryOptions,
) -> (Vec<Branch>, Vec<BranchScratch>) {
    let (d, f) = (cfg.embed_dim, cfg.mlp_hidden);
    let mut branches = Vec::new();
    let mut branch_scratch = Vec::new();
    if !method.has_branches() {
        return (branches, branch_scratch);
    }
    // The trainable leaves of one branch of an (n_in → n_out) Linear, in plan order.
    let leaves = |n_in: usize, n_out: usize| -> Vec<(&'static str, Vec<usize>)> {
        match method {
            Method::Lora { r } => vec![("A", vec![*r, n_in]), ("B", vec![n_out, *r])],
            Method::Kernel(k) => {
                let mut v = vec![("In_Qs", vec![2, n_in, k.r / 2]), ("Out_Qs", vec![2, n_out, k.r / 2])];
                if k.mixture {
                    v.extend(["alpha", "gamma", "beta"].map(|leaf| (leaf, vec![1])));
                }
                v
            }
            _ => unreachable!("only LoRA and the kernel family have branches"),
        }
    };
    // (tag, in, out of one branch, out of the whole Linear, branches per Linear); `Linear::scratch` indexes it.
    let shape_scopes: [(&str, usize, usize, usize, usize); 3] =
        [("attn", d, d, 3 * d, 3), ("fc1", d, f, f, 1), ("fc2", f, d, d, 1)];
    // Per scope, per slot, the gradient of each leaf (fused update only).
    let mut slots: Vec<Vec<Vec<Tensor>>> = Vec::new();
    for (tag, n_in, n_out, w_out, per_linear) in shape_scopes {
        plan.scope();
        let pre = format!("branch.scratch.{tag}");
        let s = Pool::Scratch;
        let w = plan.f32(format!("{pre}.W"), &[w_out, n_in], s);
        let mut grads_first = false;
        let (m, dms, merge, sparsify) = match method {
            Method::Kernel(k) => {
                // M, then M_s in place, then K and R_0 of the merge backward: one buffer (linear.rs says when
                // each is live).
                let m = plan.f32(format!("{pre}.M"), &[n_in, n_out], s);
                // At `Block` (merged branches only: the unmerged path holds W0 in W) the backward takes the factor
                // gradients before it builds W, so ∂L/∂M_s goes in W's buffer, at the price of a second merge.
                grads_first = mem.recompute >= Recompute::Block && !k.regularised();
                let dms = match grads_first {
                    true => w.slice(0, n_in * n_out),
                    false => plan.f32(format!("{pre}.dM_s"), &[n_in, n_out], s),
                };
                let merge = MergeScratch::plan_with_k(plan, &pre, n_in, n_out, k.r / 2, m); // r/2: half_rank
                (Some(m), dms, Some(merge), k.sparse.then(|| SparsifyScratch::plan(plan, &pre, n_in * n_out)))
            }
            Method::Lora { r } => (None, plan.f32(format!("{pre}.lora_xa_dyb"), &[2, bt, *r], s), None, None),
            _ => unreachable!("only LoRA and the kernel family have branches"),
        };
        branch_scratch.push(BranchScratch { w, m, dms, merge, sparsify, grads_first });
        let slot = |i: usize| {
            leaves(n_in, n_out)
                .iter()
                .map(|(leaf, shape)| plan.f32(format!("{pre}.grad{i}.{leaf}"), shape, s))
                .collect()
        };
        slots.push(if mem.fused_update { (0..per_linear).map(slot).collect() } else { Vec::new() });
    }
    for blk in 0..cfg.depth {
        for pos in Position::ALL {
            let (n_in, n_out) = cfg.linear_shape(pos);
            let prefix = pos.branch_prefix(blk);
            let (row0, scope, slot) = match pos {
                Position::Q => (0, 0, 0),
                Position::K => (d, 0, 1),
                Position::V => (2 * d, 0, 2),
                Position::Proj => (0, 0, 0),
                Position::Fc1 => (0, 1, 0),
                Position::Fc2 => (0, 2, 0),
            };
            let mut factors = leaves(n_in, n_out)
                .into_iter()
                .enumerate()
                .map(|(i, (leaf, shape))| {
                    let grad = slots[scope].get(slot).map(|g| g[i]);
                    params.add_factor(plan, &format!("{prefix}.{leaf}"), &shape, grad)
                })
                .collect::<Vec<_>>()
                .into_iter();
            let mut next = || factors.next().expect("one Param per leaf");
            let bp = match method {
                Method::Lora { r } => BranchParams::Lora { a: next(), b: next(), r: *r },
                Method::Kernel(k) => {
                    let half_rank = k.r / 2;
                    let (in_qs, out_qs) = (next(), next());
                    let mix = k.mixture.then(|| [next(), next(), next()]);
                    let ema = (k.sparse && k.allocator).then(|| {
                        let mut ema = |leaf: &str, n: usize| FactorEma {
                            ipt: plan.f32(format!("alloc.ipt.{prefix}.{leaf}"), &[2, n, half_rank], Pool::Optimizer),
                            unc: plan.f32(format!("alloc.unc.{prefix}.{leaf}"), &[2, n, half_rank], Pool::Optimizer),
                        };
                        [ema("In_Qs", n_in), ema("Out_Qs", n_out)]
                    });
                    BranchParams::Kernel { in_qs, out_qs, mix, kind: k.kernel, sparse: k.sparse, half_rank, ema }
                }
                _ => unreachable!("only LoRA and the kernel family have branches"),
            };
            let id = branches.len();
            branches.push(Branch { prefix, block: blk, pos, id, row0, n_in, n_out, params: bp });
        }
    }
    (branches, branch_scratch)
}

/// Block `l`: its parameters and branches, and what its backward needs from its forward (kept per layer,
/// or the shared buffer of what the recompute level rebuilds).
#[allow(clippy::too_many_arguments)]
fn plan_block(
    plan: &mut Plan,
    cfg: &ViTConfig,
    method: &Method,
    b: usize,
    l: usize,
    params: &Params,
    branches: &[Branch],
    recomputed: &Recomputed,
    stream: DType,
) -> Block {
    let (d, f, h, t) = (cfg.embed_dim, cfg.mlp_hidden, cfg.num_heads, cfg.tokens());
    let bt = b * t;
    let a = Pool::Activations;
    let p = |n: &str| *params.get(&format!("blocks.{l}.{n}")).expect("every backbone tensor is planned");
    let bl = |pos: Position| branches.iter().filter(|br| br.block == l && br.pos == pos).cloned().collect::<Vec<_>>();
    let lin = |w: &str, bias: &str, n_in: usize, n_out: usize, br: Vec<Branch>, scratch: usize| Linear {
        w: p(w),
        b: p(bias),
        n_in,
        n_out,
        branches: br,
        scratch,
    };
    let mut qkv_br = bl(Position::Q);
    qkv_br.extend(bl(Position::K));
    qkv_br.extend(bl(Position::V));
    let pre = format!("act.blocks.{l}");
    let x_mid = recomputed.x_mid.unwrap_or_else(|| plan.add(format!("{pre}.x_mid"), &[bt, d], stream, a));
    let mut keep = |name: &str, shape: &[usize], shared: Option<Tensor>| {
        shared.unwrap_or_else(|| plan.f32(format!("{pre}.{name}"), shape, a))
    };
    let ls_trains = cfg.layer_scale && method.trains_backbone();
    let acts = BlockActs {
        ln1: keep("ln1", &[bt, d], recomputed.ln),
        ln1_stats: NormStats { mean: keep("ln1_mean", &[bt], None), rstd: keep("ln1_rstd", &[bt], None) },
        qkv: keep("qkv", &[bt, 3 * d], recomputed.qkv),
        probs: keep("probs", &[b, h, t, t], recomputed.probs),
        attn: keep("attn", &[bt, d], recomputed.attn),
        x_mid,
        ln2: keep("ln2", &[bt, d], recomputed.ln),
        ln2_stats: NormStats { mean: keep("ln2_mean", &[bt], None), rstd: keep("ln2_rstd", &[bt], None) },
        fc1: keep("fc1", &[bt, f], recomputed.fc1),
        gelu: keep("gelu", &[bt, f], recomputed.gelu),
        proj_out: ls_trains.then(|| plan.f32(format!("{pre}.proj_out"), &[bt, d], a)),
        fc2_out: ls_trains.then(|| plan.f32(format!("{pre}.fc2_out"), &[bt, d], a)),
    };
    Block {
        norm1: LayerNorm { w: p("norm1.weight"), b: p("norm1.bias") },
        qkv: lin("attn.qkv.weight", "attn.qkv.bias", d, 3 * d, qkv_br, 0),
        proj: lin("attn.proj.weight", "attn.proj.bias", d, d, bl(Position::Proj), 0),
        ls1: cfg.layer_scale.then(|| p("ls1.gamma")),
        norm2: LayerNorm { w: p("norm2.weight"), b: p("norm2.bias") },
        fc1: lin("mlp.fc1.weight", "mlp.fc1.bias", d, f, bl(Position::Fc1), 1),
        fc2: lin("mlp.fc2.weight", "mlp.fc2.bias", f, d, bl(Position::Fc2), 2),
        ls2: cfg.layer_scale.then(|| p("ls2.gamma")),
        acts,
    }
}

/// Plans every tensor of a training step without allocating anything: the same plan
/// [`Model::new`](crate::model::Model::new) allocates, so its sizes are exact on any machine.
///
/// # Errors
/// An invalid configuration or method (see [`Model::new`](crate::model::Model::new)).
pub fn plan(cfg: &ViTConfig, method: &Method, batch: usize, memory: impl Into<MemoryOptions>) -> Result<Plan> {
    Ok(plan_model(cfg, method, batch, memory.into())?.0)
}
