//! The adapted Linear, y = x·(W0 + ΔW)ᵀ + b: the one place where a fine-tuning method meets the model.
//!
//! Merged (the default): each branch builds its update in scratch and adds it into a copy of W0 there
//! (the kernel family: M from the factors (`ops::kmerge`, method.md §2–§3), sparsified to M_s
//! (`ops::sparsify`, §4–§5), added transposed; LoRA: B·A), and the Linear is one GEMM with that W (§6). M is
//! never kept: the backward rebuilds it, with the threshold its forward selected, and takes each branch's
//! factor gradients (§7) while its M is in scratch, before the input gradient goes through the same W.
//!
//! Unmerged (training with the official recipe's branch dropout or drop-path): y = x·W0ᵀ + b +
//! Σ_branches DropPath(Dropout(x)·M_s), one dropout mask shared by q, k and v, none on proj's input. The
//! masks are hashes of (seed, stream, index), never stored (§15); [`MaskStream`] names the streams of a block.
use crate::error::Result;
use crate::model::config::Position;
use crate::model::plan::{Branch, BranchParams, BranchScratch, Layout, Linear, Param};
use crate::ops::adamw::{adamw, AdamWStep};
use crate::ops::add::{add_bias, axpy, bias_backward, scale_copy};
use crate::ops::convert::bf16_widen;
use crate::ops::dropout::{drop_path, dropout};
use crate::ops::importance::{importance_update, EmaBetas};
use crate::ops::kmerge::{merge_backward, merge_forward, Along, Factors};
use crate::ops::matmul::{matmul, Matmul};
use crate::ops::sparsify::{add_transposed, sparsify_apply, sparsify_backward, sparsify_select};
use crate::runtime::{DType, Runtime, Tensor};

/// The dropout and drop-path masks of one block. Each is a stream of hashed keep decisions (`ops::dropout`);
/// a block owns the stream ids `16·block .. 16·block + 15`, so no two masks of a step share one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MaskStream {
    /// Dropout on the input of the q, k and v branches (one mask for the three).
    QkvDropout,
    /// Dropout on fc1's branch input.
    Fc1Dropout,
    /// Dropout on fc2's branch input.
    Fc2Dropout,
    /// Drop-path on the output of one branch.
    BranchPath(Position),
    /// Stochastic depth of the attention residual branch.
    AttnResidual,
    /// Stochastic depth of the MLP residual branch.
    MlpResidual,
}

impl MaskStream {
    /// The stream id of this mask in block `block` (slot 1 would be proj's input dropout, which the official
    /// code does not have).
    pub(crate) fn id(self, block: usize) -> u64 {
        let slot = match self {
            MaskStream::QkvDropout => 0,
            MaskStream::Fc1Dropout => 2,
            MaskStream::Fc2Dropout => 3,
            MaskStream::BranchPath(pos) => 4 + pos as u64,
            MaskStream::AttnResidual => 10,
            MaskStream::MlpResidual => 11,
        };
        block as u64 * 16 + slot
    }
}

/// Branch dropout and drop-path of a training pass (the official TuningModule's), and the seed of its masks.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BranchDrop {
    /// Dropout rate of the branch inputs (q, k, v share one mask; proj has none).
    pub(crate) dropout: f32,
    /// Drop-path rate of every branch output.
    pub(crate) drop_path: f32,
    /// This step's seed (the backward regenerates the forward's masks from it).
    pub(crate) seed: u64,
}

/// What every adapted Linear of a pass reads besides its own tensors.
pub(crate) struct Linears<'a> {
    pub(crate) rt: &'a Runtime,
    pub(crate) layout: &'a Layout,
    /// Fraction of entries zeroed per branch, by `Branch::id`.
    pub(crate) sparsity: &'a [f32],
    /// Training with branch dropout or drop-path: the branches run unmerged.
    pub(crate) drop: Option<BranchDrop>,
    /// Tokens per image: drop-path keeps or drops an image's rows together.
    pub(crate) tokens: usize,
    /// Kept sets that replace |M| > t, by `Branch::id`: empty in every real run (test support, see
    /// `Model::replay_masks`).
    pub(crate) replayed: &'a [Option<Vec<bool>>],
    /// The fused update of a `Model::backward_step` on a model planned with it: each Linear's backward ends
    /// with its branches' AdamW step (and allocator EMAs).
    pub(crate) update: Option<FusedUpdate>,
    /// A forward selects each sparse branch's threshold; the backward's recomputation of a forward (at
    /// `Recompute::Block`) reuses the thresholds its forward selected from the same factors (same bits, one
    /// quantile select per branch and step).
    pub(crate) select: bool,
}

/// The branch factors' update that a Linear's backward runs once their gradients are complete (the fused
/// update, `MemoryOptions::fused_update`): AdamW at step `t`, then the allocator's EMAs when `ema` is set.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FusedUpdate {
    pub(crate) lr: f64,
    pub(crate) weight_decay: f64,
    pub(crate) t: u64,
    pub(crate) ema: Option<EmaBetas>,
}

impl Linears<'_> {
    /// y = x·Wᵀ + b with W = W0 + the branches' updates.                   y: (rows, out)  x: (rows, in)
    pub(crate) fn forward(&self, lin: &Linear, y: Tensor, x: Tensor, rows: usize) -> Result<()> {
        if let (Some(drop), false) = (self.drop, lin.branches.is_empty()) {
            return self.unmerged_forward(lin, drop, y, x, rows);
        }
        let w = if lin.branches.is_empty() { self.weight_f32(lin)? } else { self.merge(lin, |_, _| Ok(()))? };
        matmul(self.rt, y, x, w, Matmul::new(rows, lin.n_out, lin.n_in, false, true))?;
        add_bias(self.rt, y, lin.b.value)
    }

    /// Backward: dx = dy·W (overwrites dx, after the last read of x: dx may be x's buffer); the gradients of
    /// W0 and b (when they train) and of the branch factors accumulated. Under the fused update the branch
    /// gradients are this Linear's slots of the merge scratch: zeroed first, and used by the update at the end.
    ///                                                                  dy: (rows, out)  x, dx: (rows, in)
    pub(crate) fn backward(&self, lin: &Linear, dx: Tensor, dy: Tensor, x: Tensor, rows: usize) -> Result<()> {
        let fused = self.layout.fused_update && !lin.branches.is_empty();
        if fused {
            for p in lin.branches.iter().flat_map(|br| br.params.trainables()) {
                self.rt.zero(p.grad.expect("branch factors train"))?;
            }
        }
        self.backward_pass(lin, dx, dy, x, rows)?;
        match (fused, self.update) {
            (true, Some(u)) => self.update_branches(lin, u),
            _ => Ok(()),
        }
    }

    /// The fused update of a Linear's branches: the same AdamW step as `Model::adamw_step` and the same EMA
    /// update as `Allocator::update`, on this Linear's factors only (both are element-wise).
    fn update_branches(&self, lin: &Linear, u: FusedUpdate) -> Result<()> {
        for br in &lin.branches {
            for p in br.params.trainables() {
                adamw_param(self.rt, &p, u.lr, u.weight_decay, u.t)?;
            }
            if let Some(b) = u.ema {
                update_emas(self.rt, br, b)?;
            }
        }
        Ok(())
    }

    fn backward_pass(&self, lin: &Linear, dx: Tensor, dy: Tensor, x: Tensor, rows: usize) -> Result<()> {
        if let (Some(drop), false) = (self.drop, lin.branches.is_empty()) {
            return self.unmerged_backward(lin, drop, dx, dy, x, rows);
        }
        let grad = Grad { x, dy, rows };
        let w = if lin.branches.is_empty() {
            self.weight_f32(lin)?
        } else if self.layout.branch_scratch[lin.scratch].grads_first {
            // ∂L/∂M_s lives in W's buffer (`Recompute::Block`): every branch's factor gradients first, each
            // with its own M, then W from a second merge.
            for br in &lin.branches {
                self.kernel_grads(lin, br, grad)?;
            }
            self.merge_with(lin, Pass::Rebuild, |_, _| Ok(()))?
        } else {
            // The forward's W again, with the thresholds its forward selected from the same factors (the
            // quantile select, 4 passes over M on CUDA, runs once per step instead of twice; same bits); each
            // branch's factor gradients are taken while its M is in scratch.
            self.merge_with(lin, Pass::Backward(grad), |_, _| Ok(()))?
        };
        if let Some(gw) = lin.w.grad {
            matmul(self.rt, gw, dy, x, Matmul::new(lin.n_out, lin.n_in, rows, true, false).accumulate())?;
        }
        if let Some(gb) = lin.b.grad {
            bias_backward(self.rt, gb, dy, self.layout.work.colsum)?;
        }
        matmul(self.rt, dx, dy, w, Matmul::new(rows, lin.n_in, lin.n_out, false, false))
    }

    /// The Linear's own weight W0 as fp32 (out, in): the parameter itself, or (bf16 storage) widened into the
    /// Linear's branch scratch W (free on the unmerged path) or, without branches, into work.w0.
    fn weight_f32(&self, lin: &Linear) -> Result<Tensor> {
        let w0 = lin.w.value;
        if w0.dtype != DType::BF16 {
            return Ok(w0);
        }
        let into = match lin.branches.is_empty() {
            true => self.layout.work.w0.expect("bf16 storage without branches plans work.w0"),
            false => self.layout.branch_scratch[lin.scratch].w,
        };
        let w = into.slice(0, w0.numel);
        bf16_widen(self.rt, w, w0)?;
        Ok(w)
    }

    /// The forward's merge: W0 + Σ branch updates in the Linear's scratch W (out_total, in), each sparse
    /// branch selecting its threshold t = quantile(|M|, s) and writing it to the table (with `select` off,
    /// reading it from there). `after(branch, m)` runs for each branch while its matrix is in scratch (`m`:
    /// M of a kernel branch, before it is sparsified, with t already selected; None for LoRA, after B·A is
    /// added to W). The export builds through here.
    pub(crate) fn merge(
        &self,
        lin: &Linear,
        after: impl FnMut(&Branch, Option<Tensor>) -> Result<()>,
    ) -> Result<Tensor> {
        self.merge_with(lin, if self.select { Pass::Forward } else { Pass::Rebuild }, after)
    }

    /// W0 + Σ branch updates; returns W. In the forward each sparse branch selects its threshold; in the
    /// backward each kernel branch's factor gradients are taken on the way (method.md §7), with the threshold
    /// of this step's forward, by one merge backward that also masks ∂L/∂M_s and adds M_sᵀ into W
    /// ([`Along`]); `after` runs in the forward and rebuild passes only. Per kernel branch the one (in, out)
    /// buffer `m` holds M, then M_s (sparsified in place); in the backward it is the merge backward's
    /// scratch (M_s on the CPU, M_s then K and R_0 on CUDA).
    fn merge_with(
        &self,
        lin: &Linear,
        pass: Pass,
        mut after: impl FnMut(&Branch, Option<Tensor>) -> Result<()>,
    ) -> Result<Tensor> {
        let grad = match pass {
            Pass::Backward(g) => Some(g),
            _ => None,
        };
        let rt = self.rt;
        let sc = &self.layout.branch_scratch[lin.scratch];
        let w = sc.w.slice(0, lin.n_out * lin.n_in);
        for br in &lin.branches {
            let (n_in, n_out) = (br.n_in, br.n_out);
            let dst = w.slice(br.row0 * n_in, n_out * n_in);
            let w0 = lin.w.value.slice(br.row0 * n_in, n_out * n_in);
            match br.params {
                BranchParams::Lora { .. } => {
                    // W = W0 + B·A                                    (out, in)
                    let BranchParams::Lora { a, b, r } = br.params else { unreachable!() };
                    copy_frozen(rt, dst, w0)?;
                    matmul(rt, dst, b.value, a.value, Matmul::new(n_out, n_in, r, false, false).accumulate())?;
                    after(br, None)?;
                    if let Some(g) = grad {
                        self.lora_backward(lin, br, sc, g)?;
                    }
                }
                BranchParams::Kernel { .. } => match grad {
                    Some(g) if self.replayed(br).is_none() => {
                        // One pass over M: ∂L/∂M_s masked, the factor gradients and W = W0 + M_sᵀ together.
                        let dms = self.grad_ms(lin, br, sc, g.x, g.dy, g.rows)?;
                        let src = match w0.dtype {
                            DType::BF16 => bf16_widen(rt, dst, w0).map(|_| dst)?,
                            _ => w0,
                        };
                        self.kernel_backward(br, sc, dms, Some((dst, src)))?;
                    }
                    _ => {
                        let dms = grad.map(|g| self.grad_ms(lin, br, sc, g.x, g.dy, g.rows)).transpose()?;
                        let m = self.kernel_m(br, sc, matches!(pass, Pass::Forward))?;
                        after(br, Some(m))?;
                        self.sparsify_in_place(br, m, dms)?;
                        add_frozen_transposed(rt, dst, w0, m, n_in, n_out)?;
                        if let Some(dms) = dms {
                            self.kernel_backward_masked(br, sc, dms)?;
                        }
                    }
                },
            }
        }
        Ok(w)
    }

    /// The factor gradients of one kernel branch (method.md §7), accumulated, without building W: ∂L/∂M_s,
    /// masked with this step's M, through the merge backward.
    fn kernel_grads(&self, lin: &Linear, br: &Branch, g: Grad) -> Result<()> {
        let sc = &self.layout.branch_scratch[lin.scratch];
        let dms = self.grad_ms(lin, br, sc, g.x, g.dy, g.rows)?;
        if self.replayed(br).is_none() {
            return self.kernel_backward(br, sc, dms, None);
        }
        let m = self.kernel_m(br, sc, false)?;
        self.sparsify_in_place(br, m, Some(dms))?;
        self.kernel_backward_masked(br, sc, dms)
    }

    /// M of a kernel branch in its scratch; in the forward (`select`) a sparse branch also selects its
    /// threshold t = quantile(|M|, s) into the table.                        (in, out)
    fn kernel_m(&self, br: &Branch, sc: &BranchScratch, select: bool) -> Result<Tensor> {
        let BranchParams::Kernel { kind, .. } = br.params else { unreachable!("LoRA branches are merged as B·A") };
        let m = sc.m.expect("kernel branch scratch").slice(0, br.n_in * br.n_out);
        merge_forward(self.rt, m, &kernel_factors(br), kind, sc.merge.as_ref().expect("kernel branch scratch"))?;
        if select && br.is_sparse() {
            let scratch = sc.sparsify.as_ref().expect("sparsify scratch");
            sparsify_select(self.rt, self.threshold(br), m, self.sparsity[br.id], scratch)?;
        }
        Ok(m)
    }

    /// A sparse branch's M → M_s in place (the threshold of this step's forward, or the replayed kept set);
    /// first, in the backward, ∂L/∂M_s → ∂L/∂M with the same mask (method.md §5, §7). Dense kinds keep M.
    fn sparsify_in_place(&self, br: &Branch, m: Tensor, dms: Option<Tensor>) -> Result<()> {
        if !br.is_sparse() {
            return Ok(());
        }
        let rt = self.rt;
        match self.replayed(br) {
            Some(kept) => {
                if let Some(dms) = dms {
                    replay_kept(rt, dms, dms, m, kept)?;
                }
                replay_kept(rt, m, m, m, kept)
            }
            None => {
                if let Some(dms) = dms {
                    sparsify_backward(rt, dms, dms, m, self.threshold(br))?;
                }
                sparsify_apply(rt, m, m, self.threshold(br))
            }
        }
    }

    /// The threshold t of a sparse branch, from its last forward.             (1)
    fn threshold(&self, br: &Branch) -> Tensor {
        self.layout.thresholds.slice(br.id, 1)
    }

    /// The kept set replayed for a sparse branch in place of |M| > t, if any (never in a real run).
    fn replayed(&self, br: &Branch) -> Option<&[bool]> {
        self.replayed.get(br.id)?.as_deref()
    }

    /// ∂L/∂M_s = xᵀ·dy of a kernel branch, into its scratch (method.md §7).   (in, out)
    /// x: (rows, in) the branch input   dy: the Linear's output gradient (rows, out_total), this branch's columns
    fn grad_ms(
        &self,
        lin: &Linear,
        br: &Branch,
        sc: &BranchScratch,
        x: Tensor,
        dy: Tensor,
        rows: usize,
    ) -> Result<Tensor> {
        let (n_in, n_out) = (br.n_in, br.n_out);
        let dy = dy.slice(br.row0, dy.numel - br.row0);
        let dms = sc.dms.slice(0, n_in * n_out);
        matmul(self.rt, dms, x, dy, Matmul::new(n_in, n_out, rows, true, false).ld(0, lin.n_out, 0))?;
        Ok(dms)
    }

    /// The factor gradients of a kernel branch from ∂L/∂M_s, accumulated: ∂In_Qs, ∂Out_Qs and α, γ, β
    /// (method.md §7), with ∂L/∂M_s masked by this step's threshold on the way (sparse branches) and, with
    /// `weight` = (W's rows of this branch, W0's as fp32), W := W0 + M_sᵀ there: one pass over M.
    fn kernel_backward(
        &self,
        br: &Branch,
        sc: &BranchScratch,
        dms: Tensor,
        weight: Option<(Tensor, Tensor)>,
    ) -> Result<()> {
        let along = Along { threshold: br.is_sparse().then(|| self.threshold(br)), weight };
        self.merge_backward(br, sc, dms, along)
    }

    /// The factor gradients of a kernel branch from ∂L/∂M (dms, masked already): the unmerged path and the
    /// replayed masks, which build M_s themselves. Its K goes to the branch's M buffer, which holds nothing
    /// needed any more.
    fn kernel_backward_masked(&self, br: &Branch, sc: &BranchScratch, dms: Tensor) -> Result<()> {
        self.merge_backward(br, sc, dms, Along::default())
    }

    fn merge_backward(&self, br: &Branch, sc: &BranchScratch, dms: Tensor, along: Along) -> Result<()> {
        let BranchParams::Kernel { in_qs, out_qs, mix, kind, .. } = br.params else { unreachable!("kernel branch") };
        let dmix = mix.map(|m| m.map(|p| p.grad.expect("branch factors train")));
        merge_backward(
            self.rt,
            in_qs.grad.expect("branch factors train"),
            out_qs.grad.expect("branch factors train"),
            dmix,
            dms,
            &kernel_factors(br),
            kind,
            sc.merge.as_ref().expect("merge scratch"),
            along,
        )
    }

    /// LoRA's factor gradients, accumulated: ∂L/∂B += dyᵀ·(x·Aᵀ) and ∂L/∂A += (dy·B)ᵀ·x, through (rows, r)
    /// products only, as autograd does for x·Aᵀ·Bᵀ: never the (out, in) ∂L/∂W, whose product would cost as
    /// much as a full fine-tuning weight gradient.
    fn lora_backward(&self, lin: &Linear, br: &Branch, sc: &BranchScratch, g: Grad) -> Result<()> {
        let BranchParams::Lora { a, b, r } = br.params else { unreachable!("LoRA branch") };
        let (rt, rows, x) = (self.rt, g.rows, g.x);
        let dy = g.dy.slice(br.row0, g.dy.numel - br.row0);
        let (xa, dyb) = (sc.dms.slice(0, rows * r), sc.dms.slice(rows * r, rows * r)); // (rows, r) each
        let (ga, gb) = (a.grad.expect("branch factors train"), b.grad.expect("branch factors train"));
        matmul(rt, xa, x, a.value, Matmul::new(rows, r, br.n_in, false, true))?;
        matmul(rt, gb, dy, xa, Matmul::new(br.n_out, r, rows, true, false).ld(lin.n_out, 0, 0).accumulate())?;
        matmul(rt, dyb, dy, b.value, Matmul::new(rows, r, br.n_out, false, false).ld(lin.n_out, 0, 0))?;
        matmul(rt, ga, dyb, x, Matmul::new(r, br.n_in, rows, true, false).accumulate())
    }

    /// The dropout mask of a Linear's branch input, None for proj's (the official code drops out no proj
    /// input) or when the rate is 0.
    fn input_mask(lin: &Linear, drop: BranchDrop) -> Option<u64> {
        let first = &lin.branches[0];
        let stream = match first.pos {
            Position::Q | Position::K | Position::V => MaskStream::QkvDropout,
            Position::Proj => return None,
            Position::Fc1 => MaskStream::Fc1Dropout,
            Position::Fc2 => MaskStream::Fc2Dropout,
        };
        (drop.dropout > 0.0).then_some(stream.id(first.block))
    }

    /// x_d = Dropout(x), the input every branch of the Linear reads, in work.reg_x.      (rows, in)
    fn dropped_input(&self, lin: &Linear, drop: BranchDrop, x: Tensor, rows: usize) -> Result<Tensor> {
        let xd = self.layout.work.reg_x.expect("regularisation scratch").slice(0, rows * lin.n_in);
        match Linears::input_mask(lin, drop) {
            Some(stream) => dropout(self.rt, xd, x, drop.dropout, drop.seed, stream)?,
            None => scale_copy(self.rt, xd, x, 1.0)?,
        }
        Ok(xd)
    }

    /// One branch's input DropPath(x_d), in work.reg_xb: drop-path scales whole images, which is the same as
    /// scaling the branch's output.                                            (rows, in)
    fn branch_input(&self, lin: &Linear, br: &Branch, drop: BranchDrop, xd: Tensor, rows: usize) -> Result<Tensor> {
        let xb = self.layout.work.reg_xb.expect("regularisation scratch").slice(0, rows * lin.n_in);
        if drop.drop_path > 0.0 {
            let stream = MaskStream::BranchPath(br.pos).id(br.block);
            drop_path(self.rt, xb, xd, self.tokens * lin.n_in, drop.drop_path, drop.seed, stream)?;
        } else {
            scale_copy(self.rt, xb, xd, 1.0)?;
        }
        Ok(xb)
    }

    /// y = x·W0ᵀ + b + Σ_branches DropPath(Dropout(x)·M_s).                y: (rows, out)  x: (rows, in)
    fn unmerged_forward(&self, lin: &Linear, drop: BranchDrop, y: Tensor, x: Tensor, rows: usize) -> Result<()> {
        let (rt, sc) = (self.rt, &self.layout.branch_scratch[lin.scratch]);
        let w0 = self.weight_f32(lin)?;
        matmul(rt, y, x, w0, Matmul::new(rows, lin.n_out, lin.n_in, false, true))?;
        add_bias(rt, y, lin.b.value)?;
        let xd = self.dropped_input(lin, drop, x, rows)?;
        for br in &lin.branches {
            let applied = self.kernel_m(br, sc, self.select)?;
            self.sparsify_in_place(br, applied, None)?;
            let xb = self.branch_input(lin, br, drop, xd, rows)?;
            let cols = Matmul::new(rows, br.n_out, br.n_in, false, false).ld(0, 0, lin.n_out).accumulate();
            matmul(rt, y.slice(br.row0, y.numel - br.row0), xb, applied, cols)?;
        }
        Ok(())
    }

    /// The backward of [`Linears::unmerged_forward`]: dx = dy·W0 + Σ_branches Dropout'(DropPath'(dy·M_sᵀ))
    /// (overwrites dx, after the last read of x), the factor gradients accumulated; the masks are regenerated
    /// from their streams.                                      dy: (rows, out)  x, dx: (rows, in)
    fn unmerged_backward(
        &self,
        lin: &Linear,
        drop: BranchDrop,
        dx: Tensor,
        dy: Tensor,
        x: Tensor,
        rows: usize,
    ) -> Result<()> {
        let (rt, sc) = (self.rt, &self.layout.branch_scratch[lin.scratch]);
        let xd = self.dropped_input(lin, drop, x, rows)?;
        let w0 = self.weight_f32(lin)?;
        matmul(rt, dx, dy, w0, Matmul::new(rows, lin.n_in, lin.n_out, false, false))?;
        for br in &lin.branches {
            let xb = self.branch_input(lin, br, drop, xd, rows)?;
            let dms = self.grad_ms(lin, br, sc, xb, dy, rows)?;
            let applied = self.kernel_m(br, sc, false)?;
            self.sparsify_in_place(br, applied, Some(dms))?;
            // ∂L/∂x through the branch: dy·M_sᵀ, then the drop-path and dropout masks, added to ∂L/∂x.
            let g = dy.slice(br.row0, dy.numel - br.row0);
            matmul(rt, xb, g, applied, Matmul::new(rows, br.n_in, br.n_out, false, true).ld(lin.n_out, 0, 0))?;
            if drop.drop_path > 0.0 {
                let stream = MaskStream::BranchPath(br.pos).id(br.block);
                drop_path(rt, xb, xb, self.tokens * lin.n_in, drop.drop_path, drop.seed, stream)?;
            }
            if let Some(stream) = Linears::input_mask(lin, drop) {
                dropout(rt, xb, xb, drop.dropout, drop.seed, stream)?;
            }
            axpy(rt, dx, xb, 1.0)?;
            self.kernel_backward_masked(br, sc, dms)?;
        }
        Ok(())
    }
}

/// Which pass builds a merged W: the forward (a sparse branch selects its threshold), the backward (each
/// branch's factor gradients taken on the way), or a rebuild with the forward's thresholds (after the
/// factor gradients, or the backward's recomputation of a forward).
#[derive(Clone, Copy)]
enum Pass {
    Forward,
    Backward(Grad),
    Rebuild,
}

/// What a Linear's backward differentiates with: its input x (rows, in) and output gradient dy (rows, out).
#[derive(Clone, Copy)]
struct Grad {
    x: Tensor,
    dy: Tensor,
    rows: usize,
}

/// AdamW at step `t` on one trainable parameter with its gradient as it stands (decayed by `weight_decay`
/// only where the parameter decays): the step of `Model::adamw_step` and of the fused update.
pub(crate) fn adamw_param(rt: &Runtime, p: &Param, lr: f64, weight_decay: f64, t: u64) -> Result<()> {
    let st = AdamWStep::torch(lr, if p.decay { weight_decay } else { 0.0 }, t);
    let g = p.grad.expect("trainable parameters have gradients");
    adamw(rt, p.value, g, p.m.expect("trainable: AdamW m"), p.v.expect("trainable: AdamW v"), st)
}

/// The allocator's EMA update of one branch (method.md §8: In_Qs and Out_Qs, from their values and
/// gradients as they stand); nothing for a branch without allocator state. `Allocator::update`, the plain
/// `Model::backward_step` and the fused update all run it.
pub(crate) fn update_emas(rt: &Runtime, br: &Branch, b: EmaBetas) -> Result<()> {
    if let BranchParams::Kernel { in_qs, out_qs, ema: Some(ema), .. } = &br.params {
        for (p, e) in [(in_qs, &ema[0]), (out_qs, &ema[1])] {
            let g = p.grad.expect("branch factors train");
            importance_update(rt, e.ipt, e.unc, p.value, g, b.beta1, b.beta2)?;
        }
    }
    Ok(())
}

/// The factors of a kernel branch as the merge reads them (ops' a, b, d are In_Qs, Out_Qs and r/2).
fn kernel_factors(br: &Branch) -> Factors {
    let BranchParams::Kernel { in_qs, out_qs, mix, half_rank, .. } = br.params else {
        unreachable!("only kernel branches have In_Qs and Out_Qs")
    };
    let mix = mix.map(|m| m.map(|p| p.value));
    Factors { in_qs: in_qs.value, out_qs: out_qs.value, mix, n_in: br.n_in, n_out: br.n_out, half_rank }
}

/// out = x·|M| on the entries of `kept` and 0 elsewhere: the forward (x = M, out = M_s) and the backward
/// (x = out = ∂L/∂M_s → ∂L/∂M) of sparsify with a given kept set in place of |M| > t (§5, §7). The same fp32
/// product as `ops::sparsify`, so a kept set equal to |M| > t gives the same bits. Test support only
/// (`Model::replay_masks`), so it runs on the host, through the runtime's download and upload: no kernel and
/// no planned memory.                                                x, out, m: (in, out)   kept: (in·out)
fn replay_kept(rt: &Runtime, out: Tensor, x: Tensor, m: Tensor, kept: &[bool]) -> Result<()> {
    let (x, m) = (rt.download(x)?, rt.download(m)?);
    let v: Vec<f32> = x.iter().zip(&m).zip(kept).map(|((&x, &m), &k)| x * if k { m.abs() } else { 0.0 }).collect();
    rt.upload(out, &v)
}

/// dst (fp32) = w0, a frozen weight stored as fp32 or bf16.                        dst, w0: (n)
fn copy_frozen(rt: &Runtime, dst: Tensor, w0: Tensor) -> Result<()> {
    match w0.dtype {
        DType::BF16 => bf16_widen(rt, dst, w0),
        _ => scale_copy(rt, dst, w0, 1.0),
    }
}

/// dst (out, in) = w0 + msᵀ with ms (in, out), w0 stored as fp32 or bf16 (then widened into dst first).
fn add_frozen_transposed(rt: &Runtime, dst: Tensor, w0: Tensor, ms: Tensor, n_in: usize, n_out: usize) -> Result<()> {
    match w0.dtype {
        DType::BF16 => {
            bf16_widen(rt, dst, w0)?;
            add_transposed(rt, dst, dst, ms, n_in, n_out)
        }
        _ => add_transposed(rt, dst, w0, ms, n_in, n_out),
    }
}
