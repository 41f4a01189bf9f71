//! The ViT training step, written out: [`Model::new`] plans and allocates every tensor (`plan.rs`),
//! `forward_logits` runs the layers in order, [`Model::backward`] walks them in reverse, and
//! [`Model::adamw_step`] updates the trainable set. Shapes: B images, T = 1 + patches tokens, D width,
//! F MLP width, H heads of hd, V classes, BT = B·T rows of the residual stream.
//!
//! Every block Linear goes through `linear.rs`, where the method's branches meet the model: they never keep
//! M or M_s between forward and backward (each Linear builds its merged weight W0 + M_sᵀ in scratch, uses
//! it, and the backward rebuilds it). Accessors are in `access.rs`.
use crate::error::{Error, Result};
use crate::model::access::ParamsSet;
use crate::model::config::ViTConfig;
use crate::model::linear::{adamw_param, update_emas, BranchDrop, FusedUpdate, Linears, MaskStream};
use crate::model::plan::{plan_model, LayerNorm, Layout, MemoryOptions, NormStats, Param, Recompute};
use crate::ops::add::{add_bias, axpy, bias_backward, mul_cols, mul_cols_backward_gamma, scale_copy};
use crate::ops::attention::{attention_backward, attention_forward, permute_heads, Heads};
use crate::ops::convert::{bf16_round, bf16_widen};
use crate::ops::dropout::drop_path;
use crate::ops::embed::{cls_gather, cls_scatter, embed_backward, embed_forward, patchify, PatchGeom};
use crate::ops::gelu::{gelu_backward, gelu_forward};
use crate::ops::importance::EmaBetas;
use crate::ops::layernorm::{layernorm_apply, layernorm_backward, layernorm_forward};
use crate::ops::loss::cross_entropy;
use crate::ops::mask::mask_grad;
use crate::ops::matmul::{matmul, Matmul};
use crate::peft::Method;
use crate::rng::GOLDEN_GAMMA;
use crate::runtime::{Backend, Pool, Runtime, Tensor};

/// A ViT with its fine-tuning method, planned for a batch size and allocated on a device: the unit a
/// caller trains. [`Model::builder`] makes one ready to train from a weights file; [`Model::new`] plans an
/// empty one, which refuses to run until its backbone is loaded ([`Model::load_backbone`]) and its branches
/// are initialised ([`Model::init_branches`]; [`Model::init_method`] also sets GPS's masks). The cycle of a step is [`Model::set_batch`],
/// [`Model::forward`] (the loss), [`Model::backward`] (the gradients of the trainable set),
/// [`Model::adamw_step`] (which refuses gradients that a step has already used).
///
/// # Parameter names
/// The backbone uses timm's names: `cls_token`, `pos_embed`, `patch_embed.proj.weight`,
/// `blocks.<l>.attn.qkv.weight` (q, k, v fused), `blocks.<l>.mlp.fc1.bias`, `blocks.<l>.ls1.gamma`
/// (LayerScale), `norm.weight`, `head.weight`, ... ([`ViTConfig::param_shapes`]). A branch is named after
/// the Linear it adapts, `branch.blocks.<l>.attn.<q|k|v|proj>` or `branch.blocks.<l>.mlp.<fc1|fc2>`
/// ([`Model::branch_names`]), and its parameters add a leaf: `.In_Qs`, `.Out_Qs` (kernel factors), `.alpha`,
/// `.gamma`, `.beta` (the mixture), `.A`, `.B` (LoRA). The plan adds `grad.<param>`, `adamw.m.<param>`,
/// `adamw.v.<param>` and, for the allocator, `alloc.ipt.<branch>.In_Qs` and `alloc.unc.<branch>.Out_Qs`
/// ([`Model::read_tensor`]). `tests/doc_names.rs` checks every such pattern in the docs against a model.
///
/// ```
/// # use snella::model::{Model, Recompute, ViTConfig};
/// # use snella::peft::Method;
/// # fn main() -> snella::Result<()> {
/// let cfg = ViTConfig::by_name("tiny", 10)?;
/// let model = Model::new(snella::Backend::Cpu, &cfg, Method::snella(8, 0.5), 1, Recompute::None)?;
/// let names = model.param_names();
/// for name in ["blocks.0.attn.qkv.weight", "branch.blocks.0.attn.q.In_Qs", "branch.blocks.1.mlp.fc2.beta"] {
///     assert!(names.iter().any(|n| n == name), "{name}");
/// }
/// assert_eq!(model.branch_names()[3], "branch.blocks.0.attn.proj");
/// assert!(model.read_tensor("alloc.ipt.branch.blocks.0.attn.q.In_Qs").is_ok());
/// # Ok(())
/// # }
/// ```
pub struct Model {
    // Fields are the model's own (pub(super)), except the device, which other modules run ops on (rt).
    pub(super) cfg: ViTConfig,
    pub(super) method: Method,
    /// Planned batch size; a step may use fewer images.
    pub(super) batch: usize,
    pub(crate) rt: Runtime,
    pub(super) layout: Layout,
    /// Fraction of entries zeroed per branch (sparse kernel methods), indexed by `Branch::id`.
    pub(super) sparsity: Vec<f32>,
    /// AdamW step count (1-based after the first step).
    pub(super) step: u64,
    /// Images in the last forward.
    pub(super) last_b: usize,
    /// Whether a forward ran on the current batch (the backward needs its activations).
    pub(super) forward_done: bool,
    /// Training mode: dropout and drop-path apply (evaluation turns it off).
    pub(super) training: bool,
    /// Stochastic depth of the blocks' residual branches: rate of the last block, linearly from 0 at the
    /// first (timm's `drop_path_rate`; the official recipe uses 0.1). 0 = off.
    pub(super) block_drop_path: f32,
    /// Seed of every dropout and drop-path mask (mixed with the step count, so each step draws new masks
    /// and its backward regenerates its forward's).
    pub(super) reg_seed: u64,
    /// Kept sets the passes use instead of |M| > t, by `Branch::id`: empty except while the golden trajectory
    /// parity replays a reference mask (`Model::replay_masks`).
    pub(super) replayed_masks: Vec<Option<Vec<bool>>>,
    /// Which parameters were given values: a pass refuses a model with one never set (see `access.rs`).
    pub(super) params_set: ParamsSet,
    /// Whether the gradients come from a backward that no AdamW step has used yet.
    pub(super) fresh_grads: bool,
}

impl Model {
    /// Plans and allocates the model for steps of up to `batch` images; every parameter starts at zero, and
    /// [`Model::forward`] refuses to run until the backbone is loaded ([`Model::load_backbone`], or every
    /// tensor set with [`Model::set_param`]) and the branches are initialised ([`Model::init_branches`], or
    /// [`Model::init_method`], which also sets GPS's masks).
    /// [`Model::builder`] does all of it in one call. `memory` is a [`Recompute`] level (fp32 storage) or
    /// [`MemoryOptions`] (recompute level and storage precision).
    ///
    /// # Errors
    /// An invalid configuration, method or batch (`Invalid` naming it); [`Error::OutOfMemory`] with the
    /// largest batch that fits when the plan exceeds free device memory; CUDA errors.
    pub fn new(
        backend: Backend,
        cfg: &ViTConfig,
        method: Method,
        batch: usize,
        memory: impl Into<MemoryOptions>,
    ) -> Result<Model> {
        let memory = memory.into();
        let (plan, layout) = plan_model(cfg, &method, batch, memory)?;
        let on_device = matches!(backend, Backend::Cuda(_));
        let rt = match Runtime::new(backend, plan) {
            Err(Error::OutOfMemory { need_mib, free_mib, .. }) => {
                // The plan grows with the batch: binary search for the largest that fits, by the rule
                // Runtime::new applies (on a GPU, the plan plus the headroom for the pools' rounding and cuBLAS).
                let free = (free_mib * (1u64 << 20) as f64) as usize;
                let fits = |bb: usize| {
                    plan_model(cfg, &method, bb, memory)
                        .map(|(p, _)| {
                            let bytes = p.total_bytes();
                            (if on_device { crate::runtime::device_bytes_needed(bytes) } else { bytes }) <= free
                        })
                        .unwrap_or(false)
                };
                let (mut lo, mut hi) = (0, batch); // fits(lo) (or lo = 0), !fits(hi)
                while hi - lo > 1 {
                    let mid = lo + (hi - lo) / 2;
                    if fits(mid) {
                        lo = mid;
                    } else {
                        hi = mid;
                    }
                }
                let max_batch = lo;
                return Err(Error::OutOfMemory { need_mib, free_mib, max_batch });
            }
            r => r?,
        };
        let sparsity = match &method {
            Method::Kernel(k) if k.sparse => vec![k.sparsity; layout.branches.len()],
            _ => vec![0.0; layout.branches.len()],
        };
        let masked = layout.params.names.iter().zip(&layout.params.list).filter(|(_, p)| p.mask.is_some());
        let params_set = ParamsSet::new(&layout.params.names, masked.map(|(n, _)| n.clone()));
        Ok(Model {
            cfg: cfg.clone(),
            method,
            batch,
            rt,
            layout,
            sparsity,
            step: 0,
            last_b: 0,
            forward_done: false,
            training: true,
            block_drop_path: 0.0,
            reg_seed: 0,
            replayed_masks: Vec::new(),
            params_set,
            fresh_grads: false,
        })
    }

    /// Uploads a batch of `b` images, 1 <= b <= [`Model::batch_size`]: `images` (b, C, H, W) row-major f32
    /// (normalised as the backbone expects), `labels` (b) in `0..num_classes`. Returns b.
    ///
    /// # Errors
    /// `Invalid { option: "batch" }` for a wrong count or length, `Invalid { option: "labels" }` for a label
    /// out of range.
    pub fn set_batch(&mut self, images: &[f32], labels: &[i32]) -> Result<usize> {
        let per = self.cfg.in_chans * self.cfg.img_size.0 * self.cfg.img_size.1;
        let b = labels.len();
        if b == 0 || b > self.batch || images.len() != b * per {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} labels and {} image values for a model planned for batch {} of {} values per image",
                    b,
                    images.len(),
                    self.batch,
                    per
                ),
            ));
        }
        if let Some(&bad) = labels.iter().find(|&&y| y < 0 || y as usize >= self.cfg.num_classes) {
            return Err(Error::invalid("labels", format!("label {bad} is outside 0..{}", self.cfg.num_classes)));
        }
        self.rt.upload(self.layout.images.slice(0, b * per), images)?;
        self.rt.upload_i32(self.layout.labels.slice(0, b), labels)?;
        self.last_b = b;
        self.forward_done = false;
        Ok(b)
    }

    /// Forward pass over the uploaded batch: returns the mean cross-entropy, keeps what the backward needs.
    ///
    /// # Errors
    /// No batch uploaded (`Invalid { option: "batch" }`); a backbone never loaded (`Invalid { option: "backbone" }`),
    /// branches never initialised (`Invalid { option: "branches" }`) or GPS masks never set (`Invalid { option:
    /// "gps masks" }`), each naming a parameter never set and the call that sets it; device failures.
    pub fn forward(&mut self) -> Result<f32> {
        let b = self.require_batch()?;
        self.forward_logits(b)?;
        let lo = &self.layout;
        cross_entropy(
            &self.rt,
            lo.losses.slice(0, b),
            Some(lo.work.dlogits.slice(0, b * self.cfg.num_classes)),
            lo.logits.slice(0, b * self.cfg.num_classes),
            lo.labels.slice(0, b),
            self.cfg.num_classes,
        )?;
        let losses = self.rt.download(lo.losses.slice(0, b))?;
        self.forward_done = true;
        Ok(losses.iter().sum::<f32>() / b as f32)
    }

    /// Inference: the logits (b, V) of `images` (b, C, H, W), 1 <= b <= [`Model::batch_size`], in evaluation
    /// mode (no dropout or drop-path) and without labels. Replaces the uploaded batch; a
    /// [`Model::backward`] needs a new [`Model::set_batch`] and [`Model::forward`] after it.
    ///
    /// # Errors
    /// `Invalid { option: "images" }` for an image buffer that is empty, not a whole number of images, or more
    /// images than planned; an uninitialised model as [`Model::forward`]; device failures.
    pub fn predict(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        let per = self.cfg.in_chans * self.cfg.img_size.0 * self.cfg.img_size.1;
        if images.is_empty() || !images.len().is_multiple_of(per) {
            return Err(Error::invalid(
                "images",
                format!("{} image values are not a whole number of images of {per} values", images.len()),
            ));
        }
        if images.len() / per > self.batch {
            return Err(Error::invalid(
                "images",
                format!("{} images for a model planned for batch {}", images.len() / per, self.batch),
            ));
        }
        let b = self.set_batch(images, &vec![0; images.len() / per])?;
        let training = std::mem::replace(&mut self.training, false);
        let r = self.forward_logits(b);
        self.training = training;
        r?;
        self.logits()
    }

    /// Mean cross-entropy and top-1 accuracy of the model over `batches`, any iterator of (images
    /// (b, C, H, W), labels (b)) pairs of 1 to [`Model::batch_size`] images each (`Vec`s, slices or arrays),
    /// in evaluation mode (no dropout or drop-path; the mode is restored afterwards). No parameter or
    /// optimizer state changes; the last batch stays uploaded.
    ///
    /// # Errors
    /// A batch that does not fit the model (`Invalid { option: "batch" | "labels" }`), no batch at all
    /// (`Invalid { option: "evaluation" }`), an uninitialised model as [`Model::forward`], device failures.
    pub fn evaluate<X: AsRef<[f32]>, Y: AsRef<[i32]>>(
        &mut self,
        batches: impl IntoIterator<Item = (X, Y)>,
    ) -> Result<Evaluation> {
        let never = std::sync::atomic::AtomicBool::new(false);
        // Nothing sets `never`, so the evaluation runs to its end and the error below is not reached.
        self.evaluate_until(batches.into_iter().map(Ok), &never, |_| {})?
            .ok_or_else(|| Error::invalid("evaluation", "stopped before its end"))
    }

    /// [`Model::evaluate`] over fallible batches (a loader's), abandoned (`None`) when `stop` is set before a
    /// batch; `done(b)` after each batch of b images.
    pub(crate) fn evaluate_until<X: AsRef<[f32]>, Y: AsRef<[i32]>>(
        &mut self,
        batches: impl IntoIterator<Item = Result<(X, Y)>>,
        stop: &std::sync::atomic::AtomicBool,
        mut done: impl FnMut(usize),
    ) -> Result<Option<Evaluation>> {
        // Evaluation mode: no dropout or drop-path (restored afterwards, also on error).
        let training = std::mem::replace(&mut self.training, false);
        let run = || -> Result<Option<Evaluation>> {
            let v = self.cfg.num_classes;
            let (mut loss, mut right, mut n) = (0.0f64, 0u64, 0u64);
            for batch in batches {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(None);
                }
                let (images, labels) = batch?;
                let b = self.set_batch(images.as_ref(), labels.as_ref())?;
                let l = self.forward()?;
                loss += l as f64 * b as f64;
                right += top1_correct(&self.logits()?, labels.as_ref(), v);
                n += b as u64;
                done(b);
            }
            if n == 0 {
                return Err(Error::invalid("evaluation", "there are no batches to evaluate"));
            }
            Ok(Some(Evaluation { loss: loss / n as f64, accuracy: right as f64 / n as f64, images: n as usize }))
        };
        let r = run();
        self.training = training;
        r
    }

    fn require_batch(&self) -> Result<usize> {
        if self.last_b == 0 {
            return Err(Error::invalid("batch", "no batch uploaded (call set_batch first)"));
        }
        Ok(self.last_b)
    }

    fn forward_logits(&mut self, b: usize) -> Result<()> {
        self.params_set.check()?;
        let (rt, lo, cfg) = (&self.rt, &self.layout, &self.cfg);
        let lins = self.linears();
        let (d, t, v) = (cfg.embed_dim, cfg.tokens(), cfg.num_classes);
        let bt = b * t;
        let np = cfg.num_patches();
        let pget = |n: &str| lo.params.get(n).expect("every backbone tensor is planned").value;
        // Patch embedding: patchify + GEMM + bias, then cls token and position table.
        let g = PatchGeom { b, c: cfg.in_chans, h: cfg.img_size.0, w: cfg.img_size.1, p: cfg.patch_size };
        patchify(rt, lo.patches, lo.images, g)?;
        // The patch projection (B·Np, D) goes through work.dh, which the forward uses only for Linear outputs.
        let pout = lo.work.dh.slice(0, b * np * d);
        matmul(
            rt,
            pout,
            lo.patches,
            pget("patch_embed.proj.weight"),
            Matmul::new(b * np, d, cfg.patch_dim(), false, true),
        )?;
        add_bias(rt, pout, pget("patch_embed.proj.bias"))?;
        // bf16 storage: the stream runs in fp32 through work.x (rounded where it is kept, see below).
        let x0 = lo.work.x.unwrap_or(lo.resid[0]);
        embed_forward(rt, x0, pout, pget("cls_token"), pget("pos_embed"), b, t, d)?;
        if lo.work.x.is_some() {
            bf16_round(rt, Some(lo.resid[0].slice(0, bt * d)), x0.slice(0, bt * d))?;
        }

        for (l, blk) in lo.blocks.iter().enumerate() {
            let ac = &blk.acts;
            let sl = |buf: Tensor, width: usize| buf.slice(0, bt * width);
            // The block's input x, mid-block sum xm and output xo: the kept tensors themselves, or (bf16 storage)
            // fp32 scratch whose values are rounded to bf16 as they are kept, so the forward goes on with
            // exactly what the backward will widen. At `Block` the mid-block sum is scratch (ac.x_mid), rounded
            // alike under bf16 storage, so that every recompute level computes the same numbers.
            let (x, xm, xo) = match lo.work.x {
                Some(x) => (sl(x, d), sl(lo.work.xm.unwrap_or(ac.x_mid), d), sl(x, d)),
                None => (sl(lo.resid[l], d), sl(ac.x_mid, d), sl(lo.resid[l + 1], d)),
            };
            let bf16 = lo.work.x.is_some();
            blk.norm1.forward(rt, sl(ac.ln1, d), ac.ln1_stats, x, cfg.eps)?;
            let y = self.attention_branch(&lins, l, b)?;
            residual(rt, xm, x, y, blk.ls1)?;
            if bf16 {
                bf16_round(rt, lo.work.xm.map(|_| sl(ac.x_mid, d)), xm)?;
            }
            blk.norm2.forward(rt, sl(ac.ln2, d), ac.ln2_stats, xm, cfg.eps)?;
            lins.forward(&blk.fc1, sl(ac.fc1, cfg.mlp_hidden), sl(ac.ln2, d), bt)?;
            gelu_forward(rt, sl(ac.gelu, cfg.mlp_hidden), sl(ac.fc1, cfg.mlp_hidden))?;
            let y = ac.fc2_out.map(|out| sl(out, d)).unwrap_or(sl(lo.work.dh, d));
            lins.forward(&blk.fc2, y, sl(ac.gelu, cfg.mlp_hidden), bt)?;
            if let Some(p) = self.block_drop(l) {
                drop_path(rt, y, y, t * d, p, self.step_seed(), MaskStream::MlpResidual.id(l))?;
            }
            residual(rt, xo, xm, y, blk.ls2)?;
            if bf16 {
                bf16_round(rt, Some(sl(lo.resid[l + 1], d)), xo)?;
            }
        }
        // Only the cls rows reach the loss: the final norm runs on them alone (LayerNorm is per row).
        let (cls_in, feats) = (lo.cls_in.slice(0, b * d), lo.feats.slice(0, b * d));
        cls_gather(rt, cls_in, lo.work.x.unwrap_or(lo.resid[cfg.depth]), b, t, d)?;
        lo.final_norm.forward(rt, feats, lo.lnf_stats, cls_in, cfg.eps)?;
        let logits = lo.logits.slice(0, b * v);
        matmul(rt, logits, feats, pget("head.weight"), Matmul::new(b, v, d, false, true))?;
        add_bias(rt, logits, pget("head.bias"))
    }

    /// Block `l`'s attention branch on its LN1 output (ac.ln1, rows of `b` images): qkv, the attention in
    /// chunks, proj and the block's drop-path; returns the branch output y, in ac.proj_out when LayerScale
    /// trains, else in work.dh. The forward runs it, and at `Block` the backward again for the mid-block sum.
    fn attention_branch(&self, lins: &Linears, l: usize, b: usize) -> Result<Tensor> {
        let (rt, lo, cfg) = (&self.rt, &self.layout, &self.cfg);
        let (blk, (d, t)) = (&lo.blocks[l], (cfg.embed_dim, cfg.tokens()));
        let (ac, bt) = (&blk.acts, b * t);
        let heads = Heads { b, n: t, h: cfg.num_heads, hd: cfg.head_dim() };
        lins.forward(&blk.qkv, ac.qkv.slice(0, bt * 3 * d), ac.ln1.slice(0, bt * d), bt)?;
        for (c0, cb) in attention_chunks(b, lo.work.attn_chunk) {
            let (hc, rows) = (Heads { b: cb, ..heads }, |x: Tensor, w: usize| x.slice(c0 * t * w, cb * t * w));
            let buf = lo.work.attention(ac.probs.slice(0, cb * cfg.num_heads * t * t));
            attention_forward(rt, rows(ac.attn, d), rows(ac.qkv, 3 * d), &buf, hc)?;
        }
        let y = ac.proj_out.unwrap_or(lo.work.dh).slice(0, bt * d);
        lins.forward(&blk.proj, y, ac.attn.slice(0, bt * d), bt)?;
        if let Some(p) = self.block_drop(l) {
            drop_path(rt, y, y, t * d, p, self.step_seed(), MaskStream::AttnResidual.id(l))?;
        }
        Ok(y)
    }

    /// Seed of this step's masks (the AdamW step count moves on after the backward, so forward and backward
    /// of one step share it; method.md §15).
    fn step_seed(&self) -> u64 {
        self.reg_seed ^ (self.step + 1).wrapping_mul(GOLDEN_GAMMA)
    }

    /// The adapted Linears of this pass: unmerged, with the step's masks, in training with branch dropout or
    /// drop-path; merged otherwise.
    pub(super) fn linears(&self) -> Linears<'_> {
        let drop = match self.method {
            Method::Kernel(k) if self.training && k.regularised() => {
                Some(BranchDrop { dropout: k.dropout, drop_path: k.drop_path, seed: self.step_seed() })
            }
            _ => None,
        };
        Linears {
            rt: &self.rt,
            layout: &self.layout,
            sparsity: &self.sparsity,
            drop,
            tokens: self.cfg.tokens(),
            replayed: &self.replayed_masks,
            update: None,
            select: true,
        }
    }

    /// Stochastic depth of block `l`'s residual branches: its rate (linear from 0 at the first block), or None.
    fn block_drop(&self, l: usize) -> Option<f32> {
        let rate = if self.cfg.depth > 1 { self.block_drop_path * l as f32 / (self.cfg.depth - 1) as f32 } else { 0.0 };
        (self.training && rate > 0.0).then_some(rate)
    }

    /// Backward pass of the last forward: gradients of the trainable set (zeroed first), read them with
    /// [`Model::get_grad`].
    ///
    /// # Errors
    /// No forward on the current batch; a model planned with the fused update
    /// ([`MemoryOptions::fused_update`]: its step is [`Model::backward_step`]); device failures.
    pub fn backward(&mut self) -> Result<()> {
        self.refuse_fused("backward")?;
        self.run_backward(None)
    }

    /// One training step after the forward: the backward, AdamW on the trainable set (as
    /// [`Model::adamw_step`]) and, with `ema` (SNELLA's allocator: [`Allocator::betas`]), the allocator's EMA
    /// update (as [`Allocator::update`]). On a model planned with [`MemoryOptions::fused_update`] the branch
    /// factors are updated inside the backward, one Linear at a time, with the same bits; elsewhere it is the
    /// three calls in turn. This is the step `snella train` runs.
    ///
    /// [`Allocator::betas`]: crate::peft::allocator::Allocator::betas
    /// [`Allocator::update`]: crate::peft::allocator::Allocator::update
    ///
    /// # Errors
    /// As [`Model::backward`] and [`Model::adamw_step`]; `Invalid { option: "allocator" }` for `ema` on a
    /// model without allocator state.
    pub fn backward_step(&mut self, lr: f64, weight_decay: f64, ema: Option<EmaBetas>) -> Result<()> {
        check_hyper(lr, weight_decay)?;
        if ema.is_some() && self.allocator_factors().is_none_or(|f| f.is_empty()) {
            return Err(Error::invalid(
                "allocator",
                format!("method {} has no sparse kernel branches with allocator state", self.method.name()),
            ));
        }
        if !self.layout.fused_update {
            self.backward()?;
            self.adamw_step(lr, weight_decay)?;
            if let Some(b) = ema {
                self.update_emas(b)?;
            }
            return Ok(());
        }
        self.run_backward(Some(FusedUpdate { lr, weight_decay, t: self.step + 1, ema }))?;
        self.fresh_grads = false;
        self.step += 1;
        self.adamw_params(lr, weight_decay)
    }

    /// The allocator's EMA update of every branch, from the values and gradients as they stand (after the
    /// AdamW step: method.md §8).
    pub(crate) fn update_emas(&self, b: EmaBetas) -> Result<()> {
        for br in &self.layout.branches {
            update_emas(&self.rt, br, b)?;
        }
        Ok(())
    }

    /// Refuses `what` on a model planned with the fused update, whose branch gradients do not outlive the
    /// backward.
    fn refuse_fused(&self, what: &str) -> Result<()> {
        if self.layout.fused_update {
            return Err(Error::invalid(
                what,
                "this model updates its branch factors inside the backward (MemoryOptions::fused_update): \
                 call backward_step",
            ));
        }
        Ok(())
    }

    fn run_backward(&mut self, update: Option<FusedUpdate>) -> Result<()> {
        if !self.forward_done {
            return Err(Error::invalid("backward", "no forward on the current batch (call forward first)"));
        }
        let b = self.require_batch()?;
        self.fresh_grads = false; // the gradients are overwritten from here on: only a completed backward counts
        let (rt, lo, cfg) = (&self.rt, &self.layout, &self.cfg);
        let lins = Linears { update, select: false, ..self.linears() };
        let (d, f, t, v) = (cfg.embed_dim, cfg.mlp_hidden, cfg.tokens(), cfg.num_classes);
        let bt = b * t;
        let np = cfg.num_patches();
        rt.zero_pool(Pool::Grads)?;
        let p = |n: &str| *lo.params.get(n).expect("every backbone tensor is planned");
        let w = &lo.work;
        let sl = |buf: Tensor, width: usize| buf.slice(0, bt * width);

        // Head: logits = feats·Whᵀ + bh.
        let (head_w, head_b) = (p("head.weight"), p("head.bias"));
        let dlogits = w.dlogits.slice(0, b * v);
        let feats = lo.feats.slice(0, b * d);
        if let Some(g) = head_w.grad {
            matmul(rt, g, dlogits, feats, Matmul::new(v, d, b, true, false).accumulate())?;
        }
        if let Some(g) = head_b.grad {
            bias_backward(rt, g, dlogits, w.colsum)?;
        }
        let dfeat = w.dfeat.slice(0, b * d);
        matmul(rt, dfeat, dlogits, head_w.value, Matmul::new(b, d, v, false, false))?;
        // Final norm on the cls rows, then scatter into the residual gradient (zero for the other rows).
        let dcls = w.dcls.slice(0, b * d);
        rt.zero(dcls)?;
        lo.final_norm.backward(rt, dcls, dfeat, lo.cls_in.slice(0, b * d), lo.lnf_stats, w.colsum)?;
        let dres = sl(w.dres, d);
        cls_scatter(rt, dres, dcls, b, t, d)?;

        let heads = Heads { b, n: t, h: cfg.num_heads, hd: cfg.head_dim() };
        let rc = lo.recompute;
        for (l, blk) in lo.blocks.iter().enumerate().rev() {
            let ac = &blk.acts;
            // The kept block input (bf16 storage: widened into fp32 scratch).
            let x_in = match w.x {
                Some(x) => {
                    bf16_widen(rt, sl(x, d), sl(lo.resid[l], d))?;
                    sl(x, d)
                }
                None => sl(lo.resid[l], d),
            };
            let drop = |which: MaskStream| self.block_drop(l).map(|p| (p, self.step_seed(), which.id(l), t * d));
            // The mid-block sum: kept (bf16 storage: widened into fp32 scratch), or at `Block` the attention half
            // of the forward again, into ac.x_mid (the bits of the forward: the same ops on the same input).
            let x_mid = if rc >= Recompute::Block {
                blk.norm1.apply(rt, sl(ac.ln1, d), x_in, ac.ln1_stats)?;
                let y = self.attention_branch(&lins, l, b)?;
                let xm = sl(ac.x_mid, d);
                residual(rt, xm, x_in, y, blk.ls1)?;
                if w.x.is_some() {
                    bf16_round(rt, None, xm)?;
                }
                xm
            } else if let Some(xm) = w.xm {
                bf16_widen(rt, sl(xm, d), sl(ac.x_mid, d))?;
                sl(xm, d)
            } else {
                sl(ac.x_mid, d)
            };
            // MLP: x_out = x_mid + ls2 ⊙ fc2(GELU(fc1(LN2(x_mid)))). First rebuild what was not kept.
            if rc >= Recompute::Norms {
                blk.norm2.apply(rt, sl(ac.ln2, d), x_mid, ac.ln2_stats)?;
            }
            if rc >= Recompute::Block {
                lins.forward(&blk.fc1, sl(ac.fc1, f), sl(ac.ln2, d), bt)?;
            }
            if rc >= Recompute::Norms {
                gelu_forward(rt, sl(ac.gelu, f), sl(ac.fc1, f))?;
            }
            let dy = residual_branch_backward(
                rt,
                sl(w.dh, d), // free until fc1's backward writes its input gradient there
                dres,
                blk.ls2,
                ac.fc2_out.map(|out| sl(out, d)),
                drop(MaskStream::MlpResidual),
                w.colsum,
            )?;
            let du = sl(w.du, f);
            lins.backward(&blk.fc2, du, dy, sl(ac.gelu, f), bt)?;
            gelu_backward(rt, du, sl(ac.fc1, f), du)?;
            let dh = sl(w.dh, d);
            lins.backward(&blk.fc1, dh, du, sl(ac.ln2, d), bt)?;
            blk.norm2.backward(rt, dres, dh, x_mid, ac.ln2_stats, w.colsum)?;
            // Attention: x_mid = x_in + ls1 ⊙ proj(attn(qkv(LN1(x_in)))).
            if rc >= Recompute::Norms {
                blk.norm1.apply(rt, sl(ac.ln1, d), x_in, ac.ln1_stats)?;
            }
            let qkv = sl(ac.qkv, 3 * d);
            if rc >= Recompute::Block {
                lins.forward(&blk.qkv, qkv, sl(ac.ln1, d), bt)?;
            }
            let chunks = attention_chunks(b, w.attn_chunk);
            let probs = |cb: usize| w.attention(ac.probs.slice(0, cb * cfg.num_heads * t * t));
            let rows = |x: Tensor, width: usize, c0: usize, cb: usize| x.slice(c0 * t * width, cb * t * width);
            if rc >= Recompute::Attention {
                // Rebuilds the merged heads (the proj input) in scratch.
                for &(c0, cb) in &chunks {
                    let (hc, buf) = (Heads { b: cb, ..heads }, probs(cb));
                    attention_forward(rt, rows(ac.attn, d, c0, cb), rows(qkv, 3 * d, c0, cb), &buf, hc)?;
                }
            } else {
                // The head-major q, k, v of this layer, from the saved qkv (the scratch held another layer's).
                let buf = probs(b);
                permute_heads(rt, buf.q, qkv, heads, 3 * d, true)?;
                permute_heads(rt, buf.k, qkv.slice(d, qkv.numel - d), heads, 3 * d, true)?;
                permute_heads(rt, buf.v, qkv.slice(2 * d, qkv.numel - 2 * d), heads, 3 * d, true)?;
            }
            let dy = residual_branch_backward(
                rt,
                w.dqkv.slice(0, bt * d), // free until the attention backward writes ∂L/∂qkv there
                dres,
                blk.ls1,
                ac.proj_out.map(|out| sl(out, d)),
                drop(MaskStream::AttnResidual),
                w.colsum,
            )?;
            lins.backward(&blk.proj, dh, dy, sl(ac.attn, d), bt)?;
            let dqkv = sl(w.dqkv, 3 * d);
            for &(c0, cb) in chunks.iter().rev() {
                let (hc, buf) = (Heads { b: cb, ..heads }, probs(cb));
                if rc >= Recompute::Attention {
                    // This chunk's q, k, v and probabilities again: their scratch is the merge scratch that the
                    // proj backward used in between (`plan_work`).
                    attention_forward(rt, rows(ac.attn, d, c0, cb), rows(qkv, 3 * d, c0, cb), &buf, hc)?;
                }
                let (dscores, dtmp) = (w.dscores.slice(0, cb * cfg.num_heads * t * t), w.dtmp.slice(0, cb * t * d));
                attention_backward(rt, rows(dqkv, 3 * d, c0, cb), rows(dh, d, c0, cb), &buf, dscores, dtmp, hc)?;
            }
            lins.backward(&blk.qkv, dh, dqkv, sl(ac.ln1, d), bt)?;
            blk.norm1.backward(rt, dres, dh, x_in, ac.ln1_stats, w.colsum)?;
        }
        // Embedding: cls token, position table and (full fine-tuning) the patch projection.
        let (cls, pos, pw, pb) =
            (p("cls_token"), p("pos_embed"), p("patch_embed.proj.weight"), p("patch_embed.proj.bias"));
        // ∂L/∂(patch projection) (B·Np, D) goes through work.dh, free once block 0 is done.
        let dpatch = pw.grad.map(|_| w.dh.slice(0, b * np * d));
        embed_backward(rt, cls.grad, pos.grad, dpatch, dres, b, t, d)?;
        if let (Some(dp), Some(gw)) = (dpatch, pw.grad) {
            matmul(rt, gw, dp, lo.patches, Matmul::new(d, cfg.patch_dim(), b * np, true, false).accumulate())?;
        }
        if let (Some(dp), Some(gb)) = (dpatch, pb.grad) {
            bias_backward(rt, gb, dp, w.colsum)?;
        }
        self.fresh_grads = true;
        Ok(())
    }

    /// One AdamW step on the trainable set with the gradients of the last backward (β = 0.9, 0.999,
    /// ε = 1e-8, torch's operation order; decay on tensors of ≥ 2 dimensions but biases, pos_embed and
    /// cls_token, as the official `set_weight_decay`: method.md §12). GPS masks the gradients; the
    /// masked-out entries do not decay either.
    ///
    /// # Errors
    /// A learning rate or weight decay that is negative or not finite; no [`Model::backward`] since the last
    /// step (`Invalid { option: "adamw_step" }`: its gradients were used already); device failures.
    pub fn adamw_step(&mut self, lr: f64, weight_decay: f64) -> Result<()> {
        check_hyper(lr, weight_decay)?;
        self.refuse_fused("adamw_step")?;
        if !self.fresh_grads {
            let why = if self.step == 0 { "no backward has run yet" } else { "no backward since the last step" };
            return Err(Error::invalid(
                "adamw_step",
                format!("{why}, so there are no fresh gradients to step with (call forward and backward first)"),
            ));
        }
        self.fresh_grads = false;
        self.step += 1;
        self.adamw_params(lr, weight_decay)
    }

    /// AdamW at step `self.step` on every trainable parameter whose gradient is in the gradient pool (all of
    /// them, but the branch factors under the fused update, which their Linear's backward stepped).
    fn adamw_params(&self, lr: f64, weight_decay: f64) -> Result<()> {
        for (_, p) in self.layout.params.trainable() {
            let g = p.grad.expect("trainable parameters have gradients");
            if g.pool == Pool::Scratch {
                continue;
            }
            if let Some(mask) = p.mask {
                mask_grad(&self.rt, g, mask)?;
            }
            adamw_param(&self.rt, p, lr, weight_decay, self.step)?;
        }
        Ok(())
    }
}

/// Refuses a learning rate or weight decay that is negative or not finite.
fn check_hyper(lr: f64, weight_decay: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::invalid("learning rate", format!("{lr} is not a finite number >= 0")));
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return Err(Error::invalid("weight decay", format!("{weight_decay} is not a finite number >= 0")));
    }
    Ok(())
}

/// What [`Model::evaluate`] measured.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Mean cross-entropy over the images.
    pub loss: f64,
    /// Top-1 accuracy, a fraction in [0, 1].
    pub accuracy: f64,
    /// Images evaluated.
    pub images: usize,
}

/// Top-1 correct predictions among the rows of `logits` (b rows of `v`), one per label (the first maximum
/// wins a tie).
pub(crate) fn top1_correct(logits: &[f32], labels: &[i32], v: usize) -> u64 {
    labels
        .iter()
        .enumerate()
        .filter(|(r, &y)| {
            let row = &logits[r * v..(r + 1) * v];
            let mut best = 0;
            for (j, &x) in row.iter().enumerate() {
                if x > row[best] {
                    best = j;
                }
            }
            best == y as usize
        })
        .count() as u64
}

impl LayerNorm {
    /// out = LN(x) per row, saving the statistics.                          out, x: (rows, D)
    fn forward(&self, rt: &Runtime, out: Tensor, stats: NormStats, x: Tensor, eps: f32) -> Result<()> {
        let (w, b) = (self.w.value, self.b.value);
        layernorm_forward(rt, out, stats.mean, stats.rstd, x, w, b, w.numel, eps)
    }

    /// out = LN(x) again from the saved statistics, bit-identical to the forward (what recomputation reads).
    fn apply(&self, rt: &Runtime, out: Tensor, x: Tensor, stats: NormStats) -> Result<()> {
        let (w, b) = (self.w.value, self.b.value);
        layernorm_apply(rt, out, x, stats.mean, stats.rstd, w, b, w.numel)
    }

    /// dx += LN'(x)ᵀ·dy; the gradients of w and b accumulated when they train.   dx, dy, x: (rows, D)
    /// part: the column-sum scratch (`Work::colsum`)
    fn backward(&self, rt: &Runtime, dx: Tensor, dy: Tensor, x: Tensor, stats: NormStats, part: Tensor) -> Result<()> {
        let w = self.w.value;
        layernorm_backward(rt, dx, self.w.grad, self.b.grad, dy, x, w, stats.mean, stats.rstd, w.numel, part)
    }
}

/// (first image, images) of each attention call over `b` images in chunks of `chunk` (`Work::attn_chunk`).
fn attention_chunks(b: usize, chunk: usize) -> Vec<(usize, usize)> {
    (0..b).step_by(chunk.max(1)).map(|c0| (c0, chunk.min(b - c0))).collect()
}

/// out = x + y, or x + y ⊙ γ with LayerScale.                           out, x, y: (BT, D)
fn residual(rt: &Runtime, out: Tensor, x: Tensor, y: Tensor, ls: Option<Param>) -> Result<()> {
    scale_copy(rt, out, x, 1.0)?;
    match ls {
        Some(g) => mul_cols(rt, out, y, g.value, true),
        None => axpy(rt, out, y, 1.0),
    }
}

/// Gradient into a residual branch x_out = x + DropPath(γ ⊙ y): dy = DropPath(dres ⊙ γ) (or dres itself);
/// dγ += Σ dres ⊙ y when γ trains (y as saved: after the drop-path, which the forward applied to it).
/// `drop` = (rate, seed, stream, elements per sample) of the forward's drop-path.
fn residual_branch_backward(
    rt: &Runtime,
    dy: Tensor,
    dres: Tensor,
    ls: Option<Param>,
    y: Option<Tensor>,
    drop: Option<(f32, u64, u64, usize)>,
    part: Tensor,
) -> Result<Tensor> {
    let out = match ls {
        None if drop.is_none() => return Ok(dres),
        None => {
            scale_copy(rt, dy, dres, 1.0)?;
            dy
        }
        Some(g) => {
            if let (Some(gg), Some(y)) = (g.grad, y) {
                mul_cols_backward_gamma(rt, gg, dres, y, part)?;
            }
            mul_cols(rt, dy, dres, g.value, false)?;
            dy
        }
    };
    if let Some((p, seed, stream, per_sample)) = drop {
        drop_path(rt, out, out, per_sample, p, seed, stream)?;
    }
    Ok(out)
}
