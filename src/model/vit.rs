//! The ViT training step, written out: the plan of every tensor, the forward, the backward in reverse,
//! AdamW on the trainable set. Shapes: B images, T = 1 + patches tokens, D width, F MLP width,
//! H heads of hd, V classes, BT = B·T rows of the residual stream.
//!
//! The branches of a method (LoRA, the kernelized sparse branches) never keep M or M_s between forward
//! and backward: each Linear builds its merged weight W0 + M_sᵀ in scratch, uses it, and the backward
//! rebuilds it. Scratch is shared between layers through scopes of the plan (see `runtime::plan`).
use crate::error::{Error, Result};
use crate::model::config::ViTConfig;
use crate::model::linear::{BranchDrop, Linears, MaskStream};
use crate::model::plan::{plan_model, BranchParams, Layout, MemoryOptions, Param, Recompute};
use crate::ops::adamw::{adamw, AdamWStep};
use crate::ops::add::{add_bias, axpy, bias_backward, mul_cols, mul_cols_backward_gamma, scale_copy};
use crate::ops::attention::{attention_backward, attention_forward, permute_heads, Heads};
use crate::ops::convert::{bf16_round, bf16_widen};
use crate::ops::dropout::drop_path;
use crate::ops::embed::{cls_gather, cls_scatter, embed_backward, embed_forward, patchify, PatchGeom};
use crate::ops::gelu::{gelu_backward, gelu_forward};
use crate::ops::layernorm::{layernorm_apply, layernorm_backward, layernorm_forward};
use crate::ops::loss::cross_entropy;
use crate::ops::mask::mask_grad;
use crate::ops::matmul::{matmul, Matmul};
use crate::ops::GemmPrecision;
use crate::peft::Method;
use crate::rng::GOLDEN_GAMMA;
use crate::runtime::{Backend, DType, Device, Plan, Pool, PoolUsage, Runtime, Tensor};

/// A ViT with its fine-tuning method, planned for a batch size and allocated on a device: the unit a
/// caller trains. The cycle of a step is [`Model::set_batch`], [`Model::forward`] (the loss),
/// [`Model::backward`] (the gradients of the trainable set), [`Model::adamw_step`]. Parameters use timm's
/// names (`blocks.0.attn.qkv.weight`, ...); branch factors are `<linear>[.q|.k|.v].<leaf>` (see
/// [`Model::param_names`]).
pub struct Model {
    pub(crate) cfg: ViTConfig,
    pub(crate) method: Method,
    /// Planned batch size; a step may use fewer images.
    pub(crate) batch: usize,
    pub(crate) rt: Runtime,
    pub(crate) layout: Layout,
    /// Fraction of entries zeroed per branch (sparse kernel methods), indexed by `Branch::id`.
    pub(crate) sparsity: Vec<f32>,
    /// AdamW step count (1-based after the first step).
    pub(crate) step: u64,
    /// Images in the last forward.
    last_b: usize,
    /// Whether a forward ran on the current batch (the backward needs its activations).
    forward_done: bool,
    /// Training mode: dropout and drop-path apply (evaluation turns it off).
    pub(crate) training: bool,
    /// Stochastic depth of the blocks' residual branches: rate of the last block, linearly from 0 at the
    /// first (timm's `drop_path_rate`; the official recipe uses 0.1). 0 = off.
    pub(crate) block_drop_path: f32,
    /// Seed of every dropout and drop-path mask (mixed with the step count, so each step draws new masks
    /// and its backward regenerates its forward's).
    pub(crate) reg_seed: u64,
}

impl Model {
    /// Plans and allocates the model for steps of up to `batch` images; every parameter starts at zero
    /// (load a backbone with [`Model::load_backbone`], then [`Model::init_branches`]). `memory` is a
    /// [`Recompute`] level (fp32 storage) or [`MemoryOptions`] (recompute level and storage precision).
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
        let rt = match Runtime::new(backend, plan) {
            Err(Error::OutOfMemory { need_mib, free_mib, .. }) => {
                // The plan grows with the batch: binary search for the largest that fits (12 MiB of slack
                // for the per-pool allocation granularity).
                let fits = |bb: usize| {
                    plan_model(cfg, &method, bb, memory)
                        .map(|(p, _)| crate::runtime::mib(p.total_bytes()) + 12.0 < free_mib)
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
        })
    }

    /// Sets a parameter (or a branch parameter) by name; `data` is row-major with the parameter's shape.
    ///
    /// # Errors
    /// No parameter of that name, or `data` of the wrong length (both named in the message).
    pub fn set_param(&self, name: &str, data: &[f32]) -> Result<()> {
        let p = self.param(name)?;
        self.rt.upload(p.value, data)
    }

    pub(crate) fn param(&self, name: &str) -> Result<&Param> {
        self.layout
            .params
            .get(name)
            .ok_or_else(|| Error::invalid("parameter", format!("the model has no parameter '{name}'")))
    }

    /// The current value of a parameter, row-major.
    ///
    /// # Errors
    /// No parameter of that name; a failed device copy.
    pub fn get_param(&self, name: &str) -> Result<Vec<f32>> {
        self.rt.download(self.param(name)?.value)
    }

    /// ∂loss/∂parameter from the last [`Model::backward`] (same shape as the parameter).
    ///
    /// # Errors
    /// No parameter of that name, or a frozen one (it has no gradient).
    pub fn get_grad(&self, name: &str) -> Result<Vec<f32>> {
        let p = self.param(name)?;
        let g = p.grad.ok_or_else(|| Error::invalid("parameter", format!("'{name}' is frozen and has no gradient")))?;
        self.rt.download(g)
    }

    /// Sets every backbone tensor from `w` (timm names, adapted to this model's configuration by
    /// [`crate::model::load::adapt_to_config`]).
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor and the file.
    pub fn load_backbone(&self, w: &crate::model::load::Weights) -> Result<()> {
        for (name, shape) in self.cfg.param_shapes() {
            let file = w.source.display().to_string();
            let (got, data) =
                w.tensors.get(&name).ok_or_else(|| Error::MissingTensor { file: file.clone(), name: name.clone() })?;
            if *got != shape {
                return Err(Error::ShapeMismatch { file, name, got: got.clone(), want: shape });
            }
            self.set_param(&name, data)?;
        }
        Ok(())
    }

    /// Initialises every branch as the official code does: kernel factors (2, n, r/2) ~ kaiming_uniform(a=√5),
    /// i.e. U(±1/√(n·r/2)); α = γ = 1, β = 0; LoRA A (r, in) and B (out, r) ~ N(0, 0.02²) (the official model
    /// re-initialises every Linear, LoRA's included, with trunc_normal(0.02)). Deterministic by `seed`.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn init_branches(&self, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for br in &self.layout.branches {
            match br.params {
                BranchParams::Kernel { a, b, mix, d, .. } => {
                    for (p, n) in [(a, br.n_in), (b, br.n_out)] {
                        let bound = 1.0 / ((n * d) as f64).sqrt();
                        let v: Vec<f32> = (0..p.value.numel).map(|_| rng.gen_range(-bound..bound) as f32).collect();
                        self.rt.upload(p.value, &v)?;
                    }
                    if let Some([alpha, gamma, beta]) = mix {
                        self.rt.upload(alpha.value, &[1.0])?;
                        self.rt.upload(gamma.value, &[1.0])?;
                        self.rt.upload(beta.value, &[0.0])?;
                    }
                }
                BranchParams::Lora { a, b, .. } => {
                    for p in [a, b] {
                        let v: Vec<f32> = (0..p.value.numel)
                            .map(|_| 0.02 * rng.sample::<f32, _>(rand_distr::StandardNormal))
                            .collect();
                        self.rt.upload(p.value, &v)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The final-norm cls features (b, D) of the last forward (what the head reads); empty before one.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn features(&self) -> Result<Vec<f32>> {
        self.rt.download(self.layout.feats.slice(0, self.last_b * self.cfg.embed_dim))
    }

    /// Sets the GPS update mask of a weight: one byte per entry, row-major, 1 = updated (see
    /// [`Model::gps_mask_names`]).
    ///
    /// # Errors
    /// No parameter of that name, one without a mask, or a mask of the wrong length.
    pub fn set_gps_mask(&self, name: &str, mask: &[u8]) -> Result<()> {
        let p = self.param(name)?;
        let m = p.mask.ok_or_else(|| Error::invalid("parameter", format!("'{name}' has no GPS mask")))?;
        if mask.len() != m.numel {
            return Err(Error::invalid(
                "gps mask",
                format!("{} values for {name} of {} elements", mask.len(), m.numel),
            ));
        }
        match &self.rt.backend {
            Backend::Cpu => self.rt.u8_mut(m).copy_from_slice(mask),
            Backend::Cuda(c) => c.upload(self.rt.ptr(m), mask)?,
        }
        Ok(())
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
    /// No batch uploaded; device failures.
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

    /// Logits (b, V) of the last forward; empty before one.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.rt.download(self.layout.logits.slice(0, self.last_b * self.cfg.num_classes))
    }

    /// Inference: the logits (b, V) of `images` (b, C, H, W), 1 <= b <= [`Model::batch_size`], in evaluation
    /// mode (no dropout or drop-path) and without labels. Replaces the uploaded batch; a
    /// [`Model::backward`] needs a new [`Model::set_batch`] and [`Model::forward`] after it.
    ///
    /// # Errors
    /// `Invalid { option: "batch" }` for an image buffer that is empty, not a whole number of images, or more
    /// images than planned; device failures.
    pub fn predict(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        let per = self.cfg.in_chans * self.cfg.img_size.0 * self.cfg.img_size.1;
        if images.is_empty() || !images.len().is_multiple_of(per) {
            return Err(Error::invalid(
                "batch",
                format!("{} image values are not a whole number of images of {per} values", images.len()),
            ));
        }
        let b = self.set_batch(images, &vec![0; images.len() / per])?;
        let training = std::mem::replace(&mut self.training, false);
        let r = self.forward_logits(b);
        self.training = training;
        r?;
        self.logits()
    }

    fn require_batch(&self) -> Result<usize> {
        if self.last_b == 0 {
            return Err(Error::invalid("batch", "no batch uploaded (call set_batch first)"));
        }
        Ok(self.last_b)
    }

    fn forward_logits(&mut self, b: usize) -> Result<()> {
        let (rt, lo, cfg) = (&self.rt, &self.layout, &self.cfg);
        let lins = self.linears();
        let (d, t, v) = (cfg.embed_dim, cfg.tokens(), cfg.num_classes);
        let bt = b * t;
        let np = cfg.num_patches();
        let pget = |n: &str| lo.params.get(n).expect("every backbone tensor is planned").value;
        // Patch embedding: patchify + GEMM + bias, then cls token and position table.
        let g = PatchGeom { b, c: cfg.in_chans, h: cfg.img_size.0, w: cfg.img_size.1, p: cfg.patch_size };
        patchify(rt, lo.patches, lo.images, g)?;
        // The patch projection (B·Np, D) goes through work.dy, free until block 0's proj.
        let pout = lo.work.dy.slice(0, b * np * d);
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
            bf16_round(rt, lo.resid[0].slice(0, bt * d), x0.slice(0, bt * d))?;
        }

        let heads = Heads { b, n: t, h: cfg.num_heads, hd: cfg.head_dim() };
        for (l, blk) in lo.blocks.iter().enumerate() {
            let ac = &blk.acts;
            let sl = |t: Tensor, w: usize| t.slice(0, bt * w);
            // The block's input x, mid-block sum xm and output xo: the kept tensors themselves, or (bf16 storage)
            // fp32 scratch whose values are rounded to bf16 as they are kept, so the forward goes on with
            // exactly what the backward will widen.
            let (x, xm, xo) = match (lo.work.x, lo.work.xm) {
                (Some(x), Some(xm)) => (sl(x, d), sl(xm, d), sl(x, d)),
                _ => (sl(lo.resid[l], d), sl(ac.x_mid, d), sl(lo.resid[l + 1], d)),
            };
            let bf16 = lo.work.x.is_some();
            layernorm_forward(
                rt,
                sl(ac.ln1, d),
                ac.ln1_mean,
                ac.ln1_rstd,
                x,
                blk.norm1.0.value,
                blk.norm1.1.value,
                d,
                cfg.eps,
            )?;
            lins.forward(&blk.qkv, sl(ac.qkv, 3 * d), sl(ac.ln1, d), bt)?;
            let buf = lo.work.attention(ac.probs.slice(0, b * cfg.num_heads * t * t));
            attention_forward(rt, sl(ac.attn, d), sl(ac.qkv, 3 * d), &buf, heads)?;
            let y = ac.proj_out.map(|t| sl(t, d)).unwrap_or(sl(lo.work.dy, d));
            lins.forward(&blk.proj, y, sl(ac.attn, d), bt)?;
            if let Some(p) = self.block_drop(l) {
                drop_path(rt, y, y, t * d, p, self.step_seed(), MaskStream::AttnResidual.id(l))?;
            }
            residual(rt, xm, x, y, blk.ls1)?;
            if bf16 {
                bf16_round(rt, sl(ac.x_mid, d), xm)?;
            }
            layernorm_forward(
                rt,
                sl(ac.ln2, d),
                ac.ln2_mean,
                ac.ln2_rstd,
                xm,
                blk.norm2.0.value,
                blk.norm2.1.value,
                d,
                cfg.eps,
            )?;
            lins.forward(&blk.fc1, sl(ac.fc1, cfg.mlp_hidden), sl(ac.ln2, d), bt)?;
            gelu_forward(rt, sl(ac.gelu, cfg.mlp_hidden), sl(ac.fc1, cfg.mlp_hidden))?;
            let y = ac.fc2_out.map(|t| sl(t, d)).unwrap_or(sl(lo.work.dy, d));
            lins.forward(&blk.fc2, y, sl(ac.gelu, cfg.mlp_hidden), bt)?;
            if let Some(p) = self.block_drop(l) {
                drop_path(rt, y, y, t * d, p, self.step_seed(), MaskStream::MlpResidual.id(l))?;
            }
            residual(rt, xo, xm, y, blk.ls2)?;
            if bf16 {
                bf16_round(rt, sl(lo.resid[l + 1], d), xo)?;
            }
        }
        // Only the cls rows reach the loss: the final norm runs on them alone (LayerNorm is per row).
        let (cls_in, feats) = (lo.cls_in.slice(0, b * d), lo.feats.slice(0, b * d));
        cls_gather(rt, cls_in, lo.work.x.unwrap_or(lo.resid[cfg.depth]), b, t, d)?;
        layernorm_forward(
            rt,
            feats,
            lo.lnf_mean,
            lo.lnf_rstd,
            cls_in,
            pget("norm.weight"),
            pget("norm.bias"),
            d,
            cfg.eps,
        )?;
        let logits = lo.logits.slice(0, b * v);
        matmul(rt, logits, feats, pget("head.weight"), Matmul::new(b, v, d, false, true))?;
        add_bias(rt, logits, pget("head.bias"))
    }

    /// Seed of this step's masks (the AdamW step count moves on after the backward, so forward and backward
    /// of one step share it).
    fn step_seed(&self) -> u64 {
        self.reg_seed ^ (self.step + 1).wrapping_mul(GOLDEN_GAMMA)
    }

    /// The adapted Linears of this pass: unmerged, with the step's masks, in training with branch dropout or
    /// drop-path; merged otherwise.
    pub(crate) fn linears(&self) -> Linears<'_> {
        let drop = match self.method {
            Method::Kernel(k) if self.training && k.regularised() => {
                Some(BranchDrop { dropout: k.dropout, drop_path: k.drop_path, seed: self.step_seed() })
            }
            _ => None,
        };
        Linears { rt: &self.rt, layout: &self.layout, sparsity: &self.sparsity, drop, tokens: self.cfg.tokens() }
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
    /// No forward on the current batch; device failures.
    pub fn backward(&mut self) -> Result<()> {
        if !self.forward_done {
            return Err(Error::invalid("backward", "no forward on the current batch (call forward first)"));
        }
        let b = self.require_batch()?;
        let (rt, lo, cfg) = (&self.rt, &self.layout, &self.cfg);
        let lins = self.linears();
        let (d, t, v, fh) = (cfg.embed_dim, cfg.tokens(), cfg.num_classes, cfg.mlp_hidden);
        let bt = b * t;
        let np = cfg.num_patches();
        rt.zero_pool(Pool::Grads)?;
        let p = |n: &str| *lo.params.get(n).expect("every backbone tensor is planned");
        let w = &lo.work;
        let sl = |t: Tensor, width: usize| t.slice(0, bt * width);

        // Head: logits = feats·Whᵀ + bh.
        let (head_w, head_b) = (p("head.weight"), p("head.bias"));
        let dlogits = w.dlogits.slice(0, b * v);
        let feats = lo.feats.slice(0, b * d);
        if let Some(g) = head_w.grad {
            matmul(rt, g, dlogits, feats, Matmul::new(v, d, b, true, false).accumulate())?;
        }
        if let Some(g) = head_b.grad {
            bias_backward(rt, g, dlogits)?;
        }
        let dfeat = w.dfeat.slice(0, b * d);
        matmul(rt, dfeat, dlogits, head_w.value, Matmul::new(b, d, v, false, false))?;
        // Final norm on the cls rows, then scatter into the residual gradient (zero for the other rows).
        let dcls = w.dcls.slice(0, b * d);
        rt.zero(dcls)?;
        let (nw, nb) = (p("norm.weight"), p("norm.bias"));
        layernorm_backward(
            rt,
            dcls,
            nw.grad,
            nb.grad,
            dfeat,
            lo.cls_in.slice(0, b * d),
            nw.value,
            lo.lnf_mean,
            lo.lnf_rstd,
            d,
        )?;
        let dres = sl(w.dres, d);
        cls_scatter(rt, dres, dcls, b, t, d)?;

        let heads = Heads { b, n: t, h: cfg.num_heads, hd: cfg.head_dim() };
        let rc = lo.recompute;
        for (l, blk) in lo.blocks.iter().enumerate().rev() {
            let ac = &blk.acts;
            // The kept block input and mid-block sum (bf16 storage: widened into fp32 scratch).
            let (x_in, x_mid) = match (w.x, w.xm) {
                (Some(x), Some(xm)) => {
                    bf16_widen(rt, sl(x, d), sl(lo.resid[l], d))?;
                    bf16_widen(rt, sl(xm, d), sl(ac.x_mid, d))?;
                    (sl(x, d), sl(xm, d))
                }
                _ => (sl(lo.resid[l], d), sl(ac.x_mid, d)),
            };
            // MLP: x_out = x_mid + ls2 ⊙ fc2(GELU(fc1(LN2(x_mid)))). First rebuild what was not kept.
            if rc >= Recompute::Norms {
                layernorm_apply(
                    rt,
                    sl(ac.ln2, d),
                    x_mid,
                    ac.ln2_mean,
                    ac.ln2_rstd,
                    blk.norm2.0.value,
                    blk.norm2.1.value,
                    d,
                )?;
            }
            if rc >= Recompute::Block {
                lins.forward(&blk.fc1, sl(ac.fc1, fh), sl(ac.ln2, d), bt)?;
            }
            if rc >= Recompute::Norms {
                gelu_forward(rt, sl(ac.gelu, fh), sl(ac.fc1, fh))?;
            }
            let drop = |which: MaskStream| self.block_drop(l).map(|p| (p, self.step_seed(), which.id(l), t * d));
            let dy = residual_branch_backward(
                rt,
                sl(w.dy, d),
                dres,
                blk.ls2,
                ac.fc2_out.map(|t| sl(t, d)),
                drop(MaskStream::MlpResidual),
            )?;
            let du = sl(w.du, fh);
            lins.backward(&blk.fc2, du, dy, sl(ac.gelu, fh), bt)?;
            gelu_backward(rt, du, sl(ac.fc1, fh), du)?;
            let dh = sl(w.dh, d);
            lins.backward(&blk.fc1, dh, du, sl(ac.ln2, d), bt)?;
            layernorm_backward(
                rt,
                dres,
                blk.norm2.0.grad,
                blk.norm2.1.grad,
                dh,
                x_mid,
                blk.norm2.0.value,
                ac.ln2_mean,
                ac.ln2_rstd,
                d,
            )?;
            // Attention: x_mid = x_in + ls1 ⊙ proj(attn(qkv(LN1(x_in)))).
            if rc >= Recompute::Norms {
                layernorm_apply(
                    rt,
                    sl(ac.ln1, d),
                    x_in,
                    ac.ln1_mean,
                    ac.ln1_rstd,
                    blk.norm1.0.value,
                    blk.norm1.1.value,
                    d,
                )?;
            }
            let qkv = sl(ac.qkv, 3 * d);
            if rc >= Recompute::Block {
                lins.forward(&blk.qkv, qkv, sl(ac.ln1, d), bt)?;
            }
            let buf = w.attention(ac.probs.slice(0, b * cfg.num_heads * t * t));
            if rc >= Recompute::Attention {
                // Rebuilds q, k, v, the probabilities and the merged output (the proj input) in scratch.
                attention_forward(rt, sl(ac.attn, d), qkv, &buf, heads)?;
            } else {
                // The head-major q, k, v of this layer, from the saved qkv (the scratch held another layer's).
                permute_heads(rt, buf.q, qkv, heads, 3 * d, true)?;
                permute_heads(rt, buf.k, qkv.slice(d, qkv.numel - d), heads, 3 * d, true)?;
                permute_heads(rt, buf.v, qkv.slice(2 * d, qkv.numel - 2 * d), heads, 3 * d, true)?;
            }
            let dy = residual_branch_backward(
                rt,
                sl(w.dy, d),
                dres,
                blk.ls1,
                ac.proj_out.map(|t| sl(t, d)),
                drop(MaskStream::AttnResidual),
            )?;
            lins.backward(&blk.proj, dh, dy, sl(ac.attn, d), bt)?;
            let dqkv = sl(w.dqkv, 3 * d);
            let (dscores, dtmp) = (w.dscores.slice(0, b * cfg.num_heads * t * t), w.dtmp.slice(0, bt * d));
            attention_backward(rt, dqkv, dh, &buf, dscores, dtmp, heads)?;
            lins.backward(&blk.qkv, dh, dqkv, sl(ac.ln1, d), bt)?;
            layernorm_backward(
                rt,
                dres,
                blk.norm1.0.grad,
                blk.norm1.1.grad,
                dh,
                x_in,
                blk.norm1.0.value,
                ac.ln1_mean,
                ac.ln1_rstd,
                d,
            )?;
        }
        // Embedding: cls token, position table and (full fine-tuning) the patch projection.
        let (cls, pos, pw, pb) =
            (p("cls_token"), p("pos_embed"), p("patch_embed.proj.weight"), p("patch_embed.proj.bias"));
        // ∂L/∂(patch projection) (B·Np, D) goes through work.dy, free once block 0 is done.
        let dpatch = pw.grad.map(|_| w.dy.slice(0, b * np * d));
        embed_backward(rt, cls.grad, pos.grad, dpatch, dres, b, t, d)?;
        if let (Some(dp), Some(gw)) = (dpatch, pw.grad) {
            matmul(rt, gw, dp, lo.patches, Matmul::new(d, cfg.patch_dim(), b * np, true, false).accumulate())?;
        }
        if let (Some(dp), Some(gb)) = (dpatch, pb.grad) {
            bias_backward(rt, gb, dp)?;
        }
        Ok(())
    }

    /// One AdamW step on the trainable set with the gradients of the last backward (β = 0.9, 0.999,
    /// ε = 1e-8, torch's operation order; decay on tensors of ≥ 2 dimensions but biases, pos_embed and
    /// cls_token, as the official `set_weight_decay`). GPS masks
    /// the gradients; the masked-out entries do not decay either.
    ///
    /// # Errors
    /// A learning rate or weight decay that is negative or not finite; device failures.
    pub fn adamw_step(&mut self, lr: f64, weight_decay: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("learning rate", format!("{lr} is not a finite number >= 0")));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::invalid("weight decay", format!("{weight_decay} is not a finite number >= 0")));
        }
        self.step += 1;
        for (_, p) in self.layout.params.trainable() {
            let g = p.grad.expect("trainable parameters have gradients");
            if let Some(mask) = p.mask {
                mask_grad(&self.rt, g, mask)?;
            }
            let st = AdamWStep {
                lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: if p.decay { weight_decay } else { 0.0 },
                t: self.step,
            };
            adamw(&self.rt, p.value, g, p.m.expect("trainable: AdamW m"), p.v.expect("trainable: AdamW v"), st)?;
        }
        Ok(())
    }

    /// Thresholds t of every branch from the last forward (0 for dense branches), indexed like
    /// [`Model::branch_names`].
    ///
    /// # Errors
    /// A failed device copy.
    pub fn thresholds(&self) -> Result<Vec<f32>> {
        let n = self.layout.branches.len();
        Ok(if n == 0 { vec![] } else { self.rt.download(self.layout.thresholds.slice(0, n))? })
    }

    /// The architecture this model was planned for.
    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// The fine-tuning method.
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// What the backward recomputes and how the backbone is stored.
    pub fn memory_options(&self) -> MemoryOptions {
        MemoryOptions { recompute: self.layout.recompute, precision: self.layout.precision }
    }

    /// The planned batch size: a step takes 1 to this many images.
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Where the ops run.
    pub fn device(&self) -> Device {
        self.rt.device()
    }

    /// The memory plan: every tensor of a training step with its pool, shape and offset.
    pub fn plan(&self) -> &Plan {
        &self.rt.plan
    }

    /// Per pool: bytes planned, allocated, and the high-water mark touched by the ops so far.
    pub fn pool_report(&self) -> Vec<(Pool, PoolUsage)> {
        self.rt.pool_report()
    }

    /// CUDA: device bytes in use above the level measured before the pools were allocated (the whole
    /// footprint of this model, the CUDA context excluded). `None` on the CPU.
    ///
    /// # Errors
    /// The driver's memory query failed.
    pub fn device_used_above_baseline(&self) -> Result<Option<usize>> {
        self.rt.device_used_above_baseline()
    }

    /// Precision of the CUDA matrix products (exact fp32 by default; the CPU always computes in fp32).
    pub fn set_gemm_precision(&self, p: GemmPrecision) {
        self.rt.set_gemm_precision(p)
    }

    /// Every parameter name (timm names for the backbone, `<linear>.<q|k|v|>.<leaf>` for branches), in plan
    /// order.
    pub fn param_names(&self) -> Vec<String> {
        self.layout.params.names.clone()
    }

    /// The names of the parameters the method trains (the ones with gradients and AdamW state).
    pub fn trainable_names(&self) -> Vec<String> {
        self.layout.params.trainable().map(|(n, _)| n.to_string()).collect()
    }

    /// Number of f32 values of a parameter.
    ///
    /// # Errors
    /// No parameter has that name.
    pub fn param_len(&self, name: &str) -> Result<usize> {
        Ok(self.param(name)?.value.numel)
    }

    /// GPS: the weights that have an update mask (set it with [`Model::set_gps_mask`]); empty for other
    /// methods.
    pub fn gps_mask_names(&self) -> Vec<String> {
        let lp = &self.layout.params;
        lp.names.iter().zip(&lp.list).filter(|(_, p)| p.mask.is_some()).map(|(n, _)| n.clone()).collect()
    }

    /// Whether a parameter trains.
    ///
    /// # Errors
    /// No parameter has that name.
    pub fn is_trainable(&self, name: &str) -> Result<bool> {
        Ok(self.param(name)?.grad.is_some())
    }

    /// The branch prefixes (`blocks.<l>.attn.qkv.q`, ..., `blocks.<l>.mlp.fc2`), in the order that indexes
    /// [`Model::sparsity`] and [`Model::thresholds`].
    pub fn branch_names(&self) -> Vec<String> {
        self.layout.branches.iter().map(|b| b.prefix.clone()).collect()
    }

    /// Fraction of entries each sparse branch zeroes (0 for dense branches), indexed like
    /// [`Model::branch_names`]. The allocator changes it during training.
    pub fn sparsity(&self) -> &[f32] {
        &self.sparsity
    }

    /// Sets the sparsity of every branch (each in [0, 1]).
    ///
    /// # Errors
    /// The wrong number of values, or a value outside [0, 1].
    pub fn set_sparsity(&mut self, sparsity: &[f32]) -> Result<()> {
        if sparsity.len() != self.sparsity.len() {
            return Err(Error::invalid(
                "sparsity",
                format!("{} values for {} branches", sparsity.len(), self.sparsity.len()),
            ));
        }
        if let Some(bad) = sparsity.iter().find(|s| !(0.0..=1.0).contains(*s)) {
            return Err(Error::invalid("sparsity", format!("{bad} is outside [0, 1]")));
        }
        self.sparsity.copy_from_slice(sparsity);
        Ok(())
    }

    /// Reads any planned f32 tensor by its plan name (see [`Plan::table`] / [`Plan::tensor_table`]), e.g. a
    /// gradient `grad.<param>` or an allocator EMA `alloc.ipt.<branch>.In_Qs`. Scratch tensors hold whatever
    /// the last op left there.
    ///
    /// # Errors
    /// No f32 tensor has that name.
    pub fn read_tensor(&self, name: &str) -> Result<Vec<f32>> {
        match self.rt.plan.find(name) {
            Some(t) if t.dtype == DType::F32 => self.rt.download(t),
            _ => Err(Error::invalid("tensor", format!("the plan has no f32 tensor '{name}'"))),
        }
    }

    /// Training mode (the default) applies dropout and drop-path; evaluation turns it off.
    pub fn set_training(&mut self, on: bool) {
        self.training = on;
    }

    /// Whether dropout and drop-path apply.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// AdamW steps taken (the bias correction's t; also mixed into every dropout mask's seed).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Sets the step count, as a resumed run does from its checkpoint.
    pub fn set_step_count(&mut self, step: u64) {
        self.step = step;
    }

    /// Stochastic depth of the blocks' residual branches: the rate of the last block, rising linearly from 0
    /// at the first (timm's `drop_path_rate`; the official recipe uses 0.1). 0 turns it off.
    ///
    /// # Errors
    /// A rate outside [0, 1).
    pub fn set_block_drop_path(&mut self, rate: f32) -> Result<()> {
        if !(0.0..1.0).contains(&rate) {
            return Err(Error::invalid("block drop-path", format!("rate {rate} is outside [0, 1)")));
        }
        self.block_drop_path = rate;
        Ok(())
    }

    /// Seed of every dropout and drop-path mask (mixed with the step count, so each step draws new masks).
    pub fn set_regularisation_seed(&mut self, seed: u64) {
        self.reg_seed = seed;
    }
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
) -> Result<Tensor> {
    let out = match ls {
        None if drop.is_none() => return Ok(dres),
        None => {
            scale_copy(rt, dy, dres, 1.0)?;
            dy
        }
        Some(g) => {
            if let (Some(gg), Some(y)) = (g.grad, y) {
                mul_cols_backward_gamma(rt, gg, dres, y)?;
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
