//! What a caller reads and sets on a [`Model`] besides the step itself: parameters by name, the last
//! forward's outputs, the memory plan and pools, the per-branch ratios, training knobs; and, for the
//! allocator, the export and the checkpoint inside the crate, views of the branches that do not expose
//! the plan's types (so a change of layout stays inside `model`).
use crate::error::{Error, Result};
use crate::model::config::ViTConfig;
use crate::model::plan::{BranchParams, Linear, MemoryOptions, Param};
use crate::model::vit::Model;
use crate::ops::sparsify::kept_count;
use crate::peft::Method;
use crate::rng::{example_seed, unit_f64, SplitMix64};
use crate::runtime::GemmPrecision;
use crate::runtime::{Backend, DType, Device, Plan, Pool, PoolUsage, Runtime, Tensor};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

impl Model {
    /// Sets a parameter (or a branch parameter) by name; `data` is row-major with the parameter's shape.
    ///
    /// # Errors
    /// No parameter of that name, or `data` of the wrong length (both named in the message).
    pub fn set_param(&self, name: &str, data: &[f32]) -> Result<()> {
        let p = self.param(name)?;
        self.rt.upload(p.value, data)?;
        self.params_set.mark(name);
        Ok(())
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
    /// No parameter of that name, a frozen one (it has no gradient), or a branch factor under the fused update
    /// ([`MemoryOptions::fused_update`]).
    pub fn get_grad(&self, name: &str) -> Result<Vec<f32>> {
        let p = self.param(name)?;
        let g = p.grad.ok_or_else(|| Error::invalid("parameter", format!("'{name}' is frozen and has no gradient")))?;
        if g.pool == Pool::Scratch {
            return Err(Error::invalid(
                "parameter",
                format!(
                    "'{name}' is a branch factor of a model planned with the fused update \
                     (MemoryOptions::fused_update): its gradient lives only inside backward_step"
                ),
            ));
        }
        self.rt.download(g)
    }

    /// Sets every backbone tensor from `w` (timm names, adapted to this model's configuration by
    /// [`crate::model::load::adapt_to_config`]). [`Model::builder`] reads, adapts and loads in one call.
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

    /// Initialises every branch as the official code does (method.md §13): kernel factors (2, n, r/2) ~ kaiming_uniform(a=√5),
    /// i.e. U(±1/√(n·r/2)); α = γ = 1, β = 0; LoRA A (r, in) and B (out, r) ~ N(0, 0.02²) (the official model
    /// re-initialises every Linear, LoRA's included, with trunc_normal(0.02)). Deterministic by `seed`.
    /// A method without branches has nothing to initialise.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn init_branches(&self, seed: u64) -> Result<()> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for br in &self.layout.branches {
            match br.params {
                BranchParams::Kernel { in_qs, out_qs, mix, half_rank, .. } => {
                    for (p, n) in [(in_qs, br.n_in), (out_qs, br.n_out)] {
                        let bound = 1.0 / ((n * half_rank) as f64).sqrt();
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
        // Every branch parameter was just written (kernel factors and mixture, or LoRA's A and B).
        for name in self.layout.params.names.iter().filter(|n| n.starts_with("branch.")) {
            self.params_set.mark(name);
        }
        Ok(())
    }

    /// Initialises what the method adds to the backbone: the branches ([`Model::init_branches`]) and, for
    /// GPS, a fixed random `density` of every block weight as its update mask. Deterministic in `seed`.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn init_method(&self, seed: u64) -> Result<()> {
        self.init_branches(seed)?;
        if let Method::Gps { density } = self.method {
            let masked = self.gps_mask_names();
            for (k, name) in self.layout.params.names.iter().enumerate() {
                if masked.contains(name) {
                    let mut rng = SplitMix64::new(example_seed(seed, 0x6E5_3A5C, k as u64));
                    let mask: Vec<u8> =
                        (0..self.param_len(name)?).map(|_| unit_f64(&mut rng) < density as f64).map(u8::from).collect();
                    self.set_gps_mask(name, &mask)?;
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
        self.params_set.mark(&format!("gps_mask.{name}"));
        Ok(())
    }

    /// Logits (b, V) of the last forward; empty before one.
    ///
    /// # Errors
    /// A failed device copy.
    pub fn logits(&self) -> Result<Vec<f32>> {
        self.rt.download(self.layout.logits.slice(0, self.last_b * self.cfg.num_classes))
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
        MemoryOptions {
            recompute: self.layout.recompute,
            precision: self.layout.precision,
            fused_update: self.layout.fused_update,
        }
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

    /// Every parameter name, in plan order: timm names for the backbone, `branch.<linear>.<leaf>` for the
    /// branches (see [the naming rule](Model#parameter-names)), e.g. `branch.blocks.0.attn.q.In_Qs`.
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

    /// The branch prefixes (`branch.blocks.<l>.attn.q`, `.k`, `.v`, `.proj`, `branch.blocks.<l>.mlp.fc1`,
    /// `.fc2`), in the order that indexes [`Model::sparsity`] and [`Model::thresholds`].
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

    // --- Inside the crate: the allocator, the export and the checkpoint read the branches through these ---

    /// (in, out) of every branch, in module order (the order of [`Model::branch_names`]).
    pub(crate) fn branch_shapes(&self) -> Vec<(usize, usize)> {
        self.layout.branches.iter().map(|b| (b.n_in, b.n_out)).collect()
    }

    /// The allocator's EMAs of In_Qs and Out_Qs of every branch, module order; None when the
    /// method keeps no allocator state (a sparse kernel method planned with the allocator keeps it on every
    /// branch).
    pub(crate) fn allocator_factors(&self) -> Option<Vec<[TrackedFactor; 2]>> {
        let tracked = |ema: crate::model::plan::FactorEma| TrackedFactor { ipt: ema.ipt, unc: ema.unc };
        self.layout
            .branches
            .iter()
            .map(|br| match br.params {
                BranchParams::Kernel { ema: Some([e_in, e_out]), .. } => Some([tracked(e_in), tracked(e_out)]),
                _ => None,
            })
            .collect()
    }

    /// The per-branch ratios, for the allocator, a resumed checkpoint and the golden cases (which hold valid
    /// ratios, so [`Model::set_sparsity`]'s checks are not needed).
    pub(crate) fn sparsity_mut(&mut self) -> &mut [f32] {
        &mut self.sparsity
    }

    /// The trainable parameters (name, value, gradient, AdamW moments), plan order.
    pub(crate) fn trainable_params(&self) -> impl Iterator<Item = (&str, &Param)> {
        self.layout.params.trainable()
    }

    /// Scalars of the trainable set.
    pub(crate) fn trainable_len(&self) -> usize {
        self.trainable_params().map(|(_, p)| p.value.numel).sum()
    }

    /// The merged weight W0 + ΔW of every Linear with branches, by its timm name, built on the device by the
    /// forward's own path (so they are bit-identical to what the model computes with).
    ///
    /// # Errors
    /// Device failures.
    pub(crate) fn merged_linear_weights(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        let per_linear = |name: &str, w: Tensor| {
            out.push((name.to_string(), self.rt.download(w)?));
            Ok(())
        };
        self.merge_adapted(per_linear, |_| Ok(()))?;
        Ok(out)
    }

    /// Calls `f` with every branch's update in module order, each while its Linear's merged weight (and its
    /// M) is in scratch.
    ///
    /// # Errors
    /// Device failures, or `f`'s error.
    pub(crate) fn for_each_branch_update(&self, f: impl FnMut(BranchUpdate<'_>) -> Result<()>) -> Result<()> {
        self.merge_adapted(|_, _| Ok(()), f)
    }

    /// M and its threshold t of every sparse kernel branch, module order: (prefix, M (in, out) row-major, t),
    /// rebuilt by the forward's own merge from the current factors. Between a forward and the next AdamW step
    /// the factors are that forward's, so `|M| > t` is the kept set it used, bit for bit (the golden
    /// trajectory parity reads the engine's masks through this).
    ///
    /// # Errors
    /// Device failures.
    pub(crate) fn sparse_branch_matrices(&self) -> Result<Vec<(String, Vec<f32>, f32)>> {
        let mut out = Vec::new();
        self.for_each_branch_update(|u| {
            if let Some((m, t)) = u.m_and_t {
                out.push((u.prefix.to_string(), self.rt.download(m)?, self.rt.download(t)?[0]));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// Replays kept sets, test support for the golden trajectory parity (`golden::MaskCheck`): until the next
    /// call, every pass uses `kept` in place of |M| > t for each branch named (the forward, the backward and
    /// the backward's recomputation alike; t is still selected). An empty list ends the replay. It runs on the
    /// host, through the runtime's download and upload, and plans no memory; a real run never sets it and
    /// pays one `None` check per sparse branch and pass.
    ///
    /// # Errors
    /// A name that is not a sparse kernel branch, or a kept set whose length is not the branch's in·out.
    pub(crate) fn replay_masks(&mut self, masks: Vec<(String, Vec<bool>)>) -> Result<()> {
        let mut replayed = vec![None; self.layout.branches.len()];
        for (prefix, kept) in masks {
            let br = self.layout.branches.iter().find(|b| b.prefix == prefix && b.is_sparse());
            let br = br.ok_or_else(|| Error::invalid("mask replay", format!("no sparse branch '{prefix}'")))?;
            if kept.len() != br.n_in * br.n_out {
                let shape = format!("{}x{}", br.n_in, br.n_out);
                return Err(Error::invalid("mask replay", format!("{} entries for {prefix} ({shape})", kept.len())));
            }
            replayed[br.id] = Some(kept);
        }
        self.replayed_masks = if replayed.iter().any(Option::is_some) { replayed } else { Vec::new() };
        Ok(())
    }

    /// Merges every Linear with branches, in block order (qkv, proj, fc1, fc2), handing each branch's update
    /// to `per_branch` as it is built and then the Linear's merged weight to `per_linear`.
    fn merge_adapted(
        &self,
        mut per_linear: impl FnMut(&str, Tensor) -> Result<()>,
        mut per_branch: impl FnMut(BranchUpdate<'_>) -> Result<()>,
    ) -> Result<()> {
        let lins = self.linears();
        for (l, blk) in self.layout.blocks.iter().enumerate() {
            let named: [(&str, &Linear); 4] = [
                ("attn.qkv.weight", &blk.qkv),
                ("attn.proj.weight", &blk.proj),
                ("mlp.fc1.weight", &blk.fc1),
                ("mlp.fc2.weight", &blk.fc2),
            ];
            for (leaf, lin) in named {
                if lin.branches.is_empty() {
                    continue;
                }
                let target = format!("blocks.{l}.{leaf}");
                let sc = &self.layout.branch_scratch[lin.scratch];
                let w = lins.merge(lin, |br, applied| {
                    let (n_in, n_out) = (br.n_in, br.n_out);
                    let rows = |t: Tensor| t.slice(br.row0 * n_in, n_out * n_in);
                    per_branch(BranchUpdate {
                        prefix: &br.prefix,
                        target: &target,
                        row0: br.row0,
                        n_in,
                        n_out,
                        sparsity: self.sparsity[br.id],
                        rt: &self.rt,
                        m_and_t: br.is_sparse().then(|| {
                            (
                                sc.m.expect("kernel branch scratch").slice(0, n_in * n_out),
                                self.layout.thresholds.slice(br.id, 1),
                            )
                        }),
                        update: match applied {
                            Some(m) => Update::Kernel(m),
                            None => Update::Rows { merged: rows(sc.w), w0: rows(lin.w.value) },
                        },
                    })
                })?;
                per_linear(&target, w)?;
            }
        }
        Ok(())
    }
}

/// The allocator's EMAs of a factor tensor (In_Qs or Out_Qs): importance and uncertainty.   both (2, n, r/2)
#[derive(Clone, Copy, Debug)]
pub(crate) struct TrackedFactor {
    pub(crate) ipt: Tensor,
    pub(crate) unc: Tensor,
}

/// Where a branch's update lies while its Linear is merged.
enum Update {
    /// A kernel branch: its M (sparse kinds apply M_s = M·|M|·1[|M| > t] of it).   (in, out)
    Kernel(Tensor),
    /// LoRA: the branch's rows of the merged weight and of W0.                   (out, in) each
    Rows { merged: Tensor, w0: Tensor },
}

/// One branch's update, read while its Linear's merged weight is in scratch (see
/// [`Model::for_each_branch_update`]).
pub(crate) struct BranchUpdate<'a> {
    /// Branch prefix, e.g. `branch.blocks.3.attn.q`.
    pub(crate) prefix: &'a str,
    /// The weight it updates, e.g. `blocks.3.attn.qkv.weight`.
    pub(crate) target: &'a str,
    /// First row of `target` it covers (q: 0, k: D, v: 2D; others 0).
    pub(crate) row0: usize,
    pub(crate) n_in: usize,
    pub(crate) n_out: usize,
    /// Its ratio s of zeroed entries.
    pub(crate) sparsity: f32,
    rt: &'a Runtime,
    /// M and its threshold t, for a sparse kernel branch.
    m_and_t: Option<(Tensor, Tensor)>,
    update: Update,
}

impl BranchUpdate<'_> {
    /// Entries with |M| > t (sparse kernel branches), else all in·out.
    ///
    /// # Errors
    /// Device failures.
    pub(crate) fn kept(&self) -> Result<usize> {
        match self.m_and_t {
            Some((m, t)) => kept_count(self.rt, m, t),
            None => Ok(self.n_in * self.n_out),
        }
    }

    /// ΔW of the branch as its `(n_out, n_in)` block of the target weight, row-major: M_sᵀ (M for dense
    /// kinds), or for LoRA the merged rows minus W0 (what W0 must gain to equal the merged weight).
    ///
    /// # Errors
    /// Device failures.
    pub(crate) fn delta(&self) -> Result<Vec<f32>> {
        let (n_in, n_out) = (self.n_in, self.n_out);
        match self.update {
            Update::Kernel(m) => {
                let mut v = self.rt.download(m)?;
                if let Some((_, t)) = self.m_and_t {
                    // M_s by the CPU twin of the step's own sparsify (the same fp32 products, the same bits).
                    let t = self.rt.download(t)?[0];
                    crate::ops::sparsify::cpu::apply_inplace(&mut v, t);
                }
                let mut out = vec![0.0; n_out * n_in];
                for o in 0..n_out {
                    for i in 0..n_in {
                        out[o * n_in + i] = v[i * n_out + o];
                    }
                }
                Ok(out)
            }
            Update::Rows { merged, w0 } => {
                let (w, w0) = (self.rt.download(merged)?, self.rt.download(w0)?);
                Ok(w.iter().zip(&w0).map(|(a, b)| a - b).collect())
            }
        }
    }
}

/// Which parameters (and GPS masks) have been given values since the model was planned. Every one starts at
/// zero, and a zero backbone (loss exactly ln V), zero branch factors (their gradients exactly 0: a silent
/// linear probe) or zero GPS masks (nothing but the head trains) run without any error to a wrong result, so a
/// pass refuses a model with one never set. Set by [`Model::set_param`] (and so [`Model::load_backbone`]),
/// [`Model::init_branches`], [`Model::set_gps_mask`] (and so [`Model::init_method`]) and a loaded trainable
/// set. Atomic flags: the setters take `&self`.
pub(crate) struct ParamsSet {
    index: HashMap<String, usize>,
    /// Parameter names, then `gps_mask.<param>` for each GPS mask.
    names: Vec<String>,
    set: Vec<AtomicBool>,
    /// `report::memory::measure` steps a zero backbone on purpose: it measures bytes, not values.
    waived: AtomicBool,
}

/// What a pass needs set, in the order it is reported: (name prefix, option, what is wrong, the call to make).
const UNSET: [(&str, &str, &str, &str); 3] = [
    (
        "",
        "backbone",
        "the backbone was never loaded",
        "call Model::load_backbone with weights from model::load (or set each tensor with Model::set_param)",
    ),
    (
        "branch.",
        "branches",
        "the branches were never initialised",
        "call Model::init_branches (or Model::load_trainable to continue a saved run)",
    ),
    ("gps_mask.", "gps masks", "the GPS masks were never set", "call Model::init_method (or Model::set_gps_mask)"),
];

impl ParamsSet {
    pub(crate) fn new(params: &[String], masked: impl IntoIterator<Item = String>) -> ParamsSet {
        let names: Vec<String> =
            params.iter().cloned().chain(masked.into_iter().map(|n| format!("gps_mask.{n}"))).collect();
        ParamsSet {
            index: names.iter().enumerate().map(|(i, n)| (n.clone(), i)).collect(),
            set: names.iter().map(|_| AtomicBool::new(false)).collect(),
            names,
            waived: AtomicBool::new(false),
        }
    }

    pub(crate) fn mark(&self, name: &str) {
        if let Some(&i) = self.index.get(name) {
            self.set[i].store(true, Ordering::Relaxed);
        }
    }

    /// An error naming a parameter never set and the call that sets it: backbone, then branches, then masks.
    pub(crate) fn check(&self) -> Result<()> {
        if self.waived.load(Ordering::Relaxed) {
            return Ok(());
        }
        let kind = |n: &str| UNSET.iter().rposition(|u| n.starts_with(u.0)).unwrap_or(0);
        for (k, &(_, option, what, call)) in UNSET.iter().enumerate() {
            let unset: Vec<&str> = (self.names.iter().zip(&self.set))
                .filter(|(n, s)| kind(n) == k && !s.load(Ordering::Relaxed))
                .map(|(n, _)| n.strip_prefix("gps_mask.").unwrap_or(n)) // the mask of that weight
                .collect();
            let which = match unset.len() {
                0 => continue,
                1 => format!("'{}' was never set", unset[0]),
                n => format!("'{}' and {} more were never set", unset[0], n - 1),
            };
            return Err(Error::invalid(
                option,
                format!("{what} ({which}): {call}, or build the model with Model::builder"),
            ));
        }
        Ok(())
    }
}

impl Model {
    /// Lets a model with parameters never set run (`report::memory::measure`: the bytes a step touches do not
    /// depend on the values).
    pub(crate) fn waive_params_check(&self) {
        self.params_set.waived.store(true, Ordering::Relaxed);
    }

    /// Records that `name` was written other than through [`Model::set_param`] (a loaded trainable set).
    pub(crate) fn note_param_set(&self, name: &str) {
        self.params_set.mark(name);
    }
}
