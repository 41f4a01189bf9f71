//! SNELLA's bi-level sparsity allocation (official `sparse_allocator.Allocator`, metric 'ipt'):
//! layers compete for a global non-zero budget by EMA importance × uncertainty (inter-layer, method.md
//! §8–§11), and inside each layer the magnitude quantile decides which entries survive (intra-layer,
//! `ops::sparsify`, §4–§5).
//! The schedule counts in whatever unit the caller drives it with: epochs, as the official code and the
//! trainer do ([`AllocatorConfig::by_epochs`]), or optimizer steps for a loop over the caller's own batches
//! ([`AllocatorConfig::by_steps`]). Either way a loop makes two calls per step: [`Allocator::begin`] with the
//! index of the epoch or step it starts (the schedule, and the reallocation when it says so), then
//! [`Allocator::update`] after the AdamW step (the EMAs). Numerics follow the official code: EMAs in fp32 on
//! the device, layer scores and the budget split in fp32, the ratios s_l in double.
//!
//! ```
//! use snella::model::{Model, Recompute, ViTConfig};
//! use snella::peft::allocator::{Allocator, AllocatorConfig};
//! use snella::peft::Method;
//! # fn main() -> snella::Result<()> {
//! let cfg = ViTConfig::by_name("tiny", 10)?;
//! let mut model = Model::new(snella::Backend::Cpu, &cfg, Method::snella(8, 0.0), 2, Recompute::None)?;
//! let alloc = Allocator::new(&model, AllocatorConfig { target_ratio: 0.5, ..AllocatorConfig::by_steps(4, 1) })?;
//! let mut kept = Vec::new();
//! for step in 0..4 {
//!     if let Some(r) = alloc.begin(&mut model, step)? {
//!         kept.push(r.kept_fraction);
//!     }
//!     // set_batch, forward, backward, adamw_step; then alloc.update(&model)?
//! }
//! assert_eq!(kept.len(), 3, "steps 1, 2 and 3 (step 0 keeps the initial budget)");
//! assert!(kept.windows(2).all(|k| k[1] < k[0]) && kept[2] > 0.5, "decaying towards the target: {kept:?}");
//! # Ok(())
//! # }
//! ```
use crate::error::{Error, Result};
use crate::model::{Model, TrackedFactor};
use crate::ops::importance::importance_sum;
pub use crate::ops::importance::EmaBetas;

/// The knobs of the allocator, with the released scripts' values as defaults. The schedule's lengths count
/// the unit [`Allocator::begin`] is called with: epochs (the official code, [`AllocatorConfig::by_epochs`]) or
/// optimizer steps ([`AllocatorConfig::by_steps`]).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AllocatorConfig {
    /// Uniform ratio of zeroed entries before the first reallocation (FGVC scripts 0, VTAB 0.01).
    pub init_ratio: f64,
    /// Ratio the global budget decays to (per task, e.g. CUB 0.30).
    pub target_ratio: f64,
    /// Epochs (or steps) at the initial budget.
    pub init_warmup: usize,
    /// Epochs (or steps) at the target budget at the end.
    pub final_warmup: usize,
    /// Reallocate every this many epochs (or steps).
    pub mask_interval: usize,
    /// EMA factor of the importance, in [0, 1).
    pub beta1: f64,
    /// EMA factor of the uncertainty, in [0, 1).
    pub beta2: f64,
    /// Length of the schedule in epochs (or steps, for a schedule [`AllocatorConfig::by_steps`]).
    pub total_epochs: usize,
}

impl AllocatorConfig {
    /// The released scripts' settings over `epochs` epochs, reallocating at the start of every epoch: call
    /// [`Allocator::begin`] with the epoch index before its first step.
    pub fn by_epochs(epochs: usize) -> AllocatorConfig {
        AllocatorConfig { total_epochs: epochs, ..AllocatorConfig::default() }
    }

    /// The released scripts' settings over `total_steps` optimizer steps, reallocating every
    /// `steps_per_reallocation` steps (the budget decays over the steps instead of the epochs): call
    /// [`Allocator::begin`] with the step index before every step. The warm-ups also count steps; as in the
    /// official schedule, the target budget itself is reached only inside `final_warmup`.
    pub fn by_steps(total_steps: usize, steps_per_reallocation: usize) -> AllocatorConfig {
        AllocatorConfig {
            total_epochs: total_steps,
            mask_interval: steps_per_reallocation,
            ..AllocatorConfig::default()
        }
    }
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig {
            init_ratio: 0.0,
            target_ratio: 0.9,
            init_warmup: 0,
            final_warmup: 0,
            mask_interval: 1,
            beta1: 0.85,
            beta2: 0.85,
            total_epochs: 100,
        }
    }
}

/// What one reallocation decided.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reallocation {
    /// The global budget of non-zero entries it split.
    pub budget: f64,
    /// Normalised layer scores (fp32), module order.
    pub scores: Vec<f32>,
    /// Non-zero entries granted per layer.
    pub alloc: Vec<i32>,
    /// The resulting per-layer ratios of zeroed entries.
    pub sparsity: Vec<f64>,
    /// Entries granted over all layers / all entries of the branches: the fraction of M the model now keeps
    /// (the quantile of each layer keeps this many, give or take ties at its threshold).
    pub kept_fraction: f64,
}

/// SNELLA's bi-level allocator over the branches of one model: the budget schedule, the EMA update after
/// each step, and the per-epoch reallocation of the per-layer ratios.
pub struct Allocator {
    /// The settings it was built with (validated).
    pub cfg: AllocatorConfig,
    /// in·out of every branch, module order.
    caps: Vec<f64>,
    /// Non-zero entries over all branches at `init_ratio` (the initial budget).
    pub init_nonzero: f64,
    /// Non-zero entries over all branches at `target_ratio` (the final budget).
    pub target_nonzero: f64,
}

impl Allocator {
    /// An allocator over the branches of `model` (a sparse kernel method planned with the allocator).
    ///
    /// # Errors
    /// `Invalid` when the model has no sparse kernel branches with allocator state, a ratio is outside
    /// [0, 1], a β is outside [0, 1), or `mask_interval` / `total_epochs` is 0 (each naming the field).
    pub fn new(model: &Model, cfg: AllocatorConfig) -> Result<Allocator> {
        if model.allocator_factors().is_none_or(|f| f.is_empty()) {
            return Err(Error::invalid(
                "allocator",
                format!("method {} has no sparse kernel branches with allocator state", model.method().name()),
            ));
        }
        for (name, v) in [("init_ratio", cfg.init_ratio), ("target_ratio", cfg.target_ratio)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Error::invalid(name, format!("{v} is not in [0, 1]")));
            }
        }
        for (name, v) in [("beta1", cfg.beta1), ("beta2", cfg.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(Error::invalid(name, format!("{v} is not in [0, 1)")));
            }
        }
        if cfg.mask_interval == 0 || cfg.total_epochs == 0 {
            return Err(Error::invalid("allocator", "mask_interval and total_epochs must be positive"));
        }
        let shapes = model.branch_shapes();
        let caps: Vec<f64> = shapes.iter().map(|&(n_in, n_out)| (n_in * n_out) as f64).collect();
        let (mut init_nonzero, mut target_nonzero) = (0.0, 0.0);
        for &(n_in, n_out) in &shapes {
            // ((1 − ratio)·in)·out, in this order, as the official Python sums it.
            init_nonzero += (1.0 - cfg.init_ratio) * n_in as f64 * n_out as f64;
            target_nonzero += (1.0 - cfg.target_ratio) * n_in as f64 * n_out as f64;
        }
        Ok(Allocator { cfg, caps, init_nonzero, target_nonzero })
    }

    /// Starts epoch (or step) `t` of the schedule: when [`Allocator::schedule`] says so, reallocates the
    /// per-layer ratios of `model` for that point's budget and returns what it decided. Call it before the
    /// first step of every epoch, or before every step for a schedule by steps; the EMAs it reads are those
    /// [`Allocator::update`] kept after each step.
    ///
    /// # Errors
    /// As [`Allocator::reallocate`].
    pub fn begin(&self, model: &mut Model, t: usize) -> Result<Option<Reallocation>> {
        match self.schedule(t) {
            (budget, true) => self.reallocate(model, budget).map(Some),
            (_, false) => Ok(None),
        }
    }

    /// (budget in non-zero entries, reallocate?) at the start of `epoch` (or step: the schedule's unit; cubic
    /// decay from the initial to the target budget, method.md §10).
    pub fn schedule(&self, epoch: usize) -> (f64, bool) {
        let c = &self.cfg;
        if epoch <= c.init_warmup {
            return (self.init_nonzero, false);
        }
        if epoch.saturating_add(c.final_warmup) > c.total_epochs {
            return (self.target_nonzero, true);
        }
        let span = c.total_epochs.saturating_sub(c.final_warmup.saturating_add(c.init_warmup)).max(1);
        let mul = 1.0 - (epoch - c.init_warmup) as f64 / span as f64;
        let v = (self.target_nonzero + (self.init_nonzero - self.target_nonzero) * mul.powi(3)).trunc();
        (v, epoch.is_multiple_of(c.mask_interval))
    }

    /// The EMA rates, for [`Model::backward_step`] (which runs the EMA update itself).
    pub fn betas(&self) -> EmaBetas {
        EmaBetas { beta1: self.cfg.beta1, beta2: self.cfg.beta2 }
    }

    /// The EMA update (method.md §8), after every optimizer step, from the updated parameters and that step's
    /// gradients.
    ///
    /// # Errors
    /// `Invalid { option: "allocator" }` when `model` is not the model it was built for; a failed device op.
    pub fn update(&self, model: &Model) -> Result<()> {
        if model.memory_options().fused_update {
            return Err(Error::invalid(
                "allocator",
                "this model updates the EMAs inside the backward (MemoryOptions::fused_update): pass \
                 Allocator::betas to Model::backward_step instead of calling update",
            ));
        }
        self.factors_of(model)?; // the model this allocator was built for
        model.update_emas(self.betas())
    }

    /// Normalised layer scores (method.md §9): mean(Ī·Ū) of In_Qs plus that of Out_Qs, divided by their total
    /// (uniform when all are 0).
    ///
    /// # Errors
    /// `Invalid { option: "allocator" }` when `model` is not the model it was built for; a failed device op.
    pub fn scores(&self, model: &Model) -> Result<Vec<f32>> {
        let mut raw = Vec::with_capacity(self.caps.len());
        for [a, b] in self.factors_of(model)? {
            let sa = (importance_sum(&model.rt, a.ipt, a.unc)? / a.ipt.numel as f64) as f32;
            let sb = (importance_sum(&model.rt, b.ipt, b.unc)? / b.ipt.numel as f64) as f32;
            raw.push(sa + sb);
        }
        let total: f32 = raw.iter().sum();
        if total == 0.0 {
            return Ok(vec![1.0 / raw.len() as f32; raw.len()]);
        }
        Ok(raw.iter().map(|&r| r / total).collect())
    }

    /// Integer non-zero counts per layer: alloc = min(cap, trunc(V·p)), then what capped layers could not
    /// take is redistributed over the others in proportion to p, all in fp32 as the official loop
    /// (method.md §11).
    pub(crate) fn split_budget(scores: &[f32], volume: f64, caps: &[f64]) -> Result<Vec<i32>> {
        let vol = volume as f32;
        let caps: Vec<f32> = caps.iter().map(|&c| c as f32).collect();
        let mut alloc: Vec<f32> = scores.iter().zip(&caps).map(|(&p, &c)| c.min((vol * p) as i32 as f32)).collect();
        let sum = |v: &[f32]| v.iter().sum::<f32>();
        let mut delta = vol - sum(&alloc);
        let mut it = 0;
        while delta > 0.0 {
            let open: Vec<usize> = (0..alloc.len()).filter(|&i| caps[i] - alloc[i] != 0.0).collect();
            if open.is_empty() {
                break; // every layer is full: the budget exceeds the total size
            }
            let ps: f32 = open.iter().map(|&i| scores[i]).sum();
            for &i in &open {
                alloc[i] += (delta * scores[i] / ps).min(caps[i] - alloc[i]);
            }
            delta = vol - sum(&alloc);
            it += 1;
            if it > 10_000 {
                return Err(Error::invalid("allocator", "budget redistribution does not converge"));
            }
        }
        Ok(alloc.iter().map(|&a| a as i32).collect())
    }

    /// Reallocates the per-layer ratios of `model` for the budget `volume` (non-zero entries over all
    /// branches, as [`Allocator::schedule`] returns it).
    ///
    /// # Errors
    /// `Invalid` when `model` is not the model it was built for or `volume` is negative or not finite; a
    /// failed device op.
    pub fn reallocate(&self, model: &mut Model, volume: f64) -> Result<Reallocation> {
        if !(volume.is_finite() && volume >= 0.0) {
            return Err(Error::invalid("allocator", format!("budget {volume} must be a finite non-negative count")));
        }
        let scores = self.scores(model)?;
        let alloc = Allocator::split_budget(&scores, volume, &self.caps)?;
        let sparsity: Vec<f64> =
            alloc.iter().zip(&self.caps).map(|(&a, &c)| (1.0 - a as f64 / c).clamp(0.0, 1.0)).collect();
        for (dst, &s) in model.sparsity_mut().iter_mut().zip(&sparsity) {
            *dst = s as f32;
        }
        let kept = alloc.iter().map(|&a| a as f64).sum::<f64>() / self.caps.iter().sum::<f64>();
        Ok(Reallocation { budget: volume, scores, alloc, sparsity, kept_fraction: kept })
    }

    /// Sets every layer of `model` to the initial ratio (the state before the first reallocation).
    pub fn reset(&self, model: &mut Model) {
        model.sparsity_mut().iter_mut().for_each(|s| *s = self.cfg.init_ratio as f32);
    }

    /// The tracked factors of `model`, which must have the branches this allocator was built for (same count
    /// and sizes, with allocator state).
    fn factors_of(&self, model: &Model) -> Result<Vec<[TrackedFactor; 2]>> {
        let caps = model.branch_shapes().into_iter().map(|(n_in, n_out)| (n_in * n_out) as f64);
        match model.allocator_factors() {
            Some(f) if model.sparsity().len() == self.caps.len() && caps.eq(self.caps.iter().copied()) => Ok(f),
            _ => Err(Error::invalid(
                "allocator",
                format!(
                    "the model ({} with {} branches) is not the one this allocator was built for ({} branches)",
                    model.method().name(),
                    model.branch_shapes().len(),
                    self.caps.len()
                ),
            )),
        }
    }
}
