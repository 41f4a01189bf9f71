//! The learning-rate schedule of the paper's recipe (method.md §14): timm 0.5.4's `CosineLRScheduler` with a
//! linear warm-up, stepped once per **epoch** after the epoch (`lr_scheduler.step(epoch)`).
//!
//! The rate used *during* epoch `e` is therefore:
//!  * epoch 0: `warmup_lr` (the scheduler's initial value, before any step);
//!  * epoch `e ≥ 1`: `f(e − 1)` with
//!    `f(t) = warmup_lr + t·(base_lr − warmup_lr)/warmup_epochs` for `t < warmup_epochs`, else
//!    `min_lr + ½·(base_lr − min_lr)·(1 + cos(π·t/epochs))`.
//!
//! So epochs 0 and 1 both run at `warmup_lr`. This is `cosine_lr` of the PyTorch reference
//! (`shared/reference/snella.py`), evaluated with the same f64 operations in the same order, so the values
//! are bit-identical to the reference's (the golden vector `lr_schedule_lr1e-3_100ep`).

/// Learning rate used during `epoch` (0-based) by the recipe's warm-up + cosine schedule.
///
/// * `base_lr` — the peak rate (the recipe's `lr`, e.g. 1e-3);
/// * `epochs` — the cosine period `t_initial` in epochs (the run length, e.g. 100); must be ≥ 1;
/// * `warmup_epochs` — linear warm-up length in epochs (e.g. 10; 0 disables the warm-up ramp, but epoch 0
///   still runs at `warmup_lr`, as timm does);
/// * `warmup_lr` — the rate of epoch 0 and the start of the ramp (e.g. 1e-6);
/// * `min_lr` — the floor of the cosine (e.g. 1e-5).
///
/// Epochs past `epochs` keep following the cosine formula (timm with `cycle_limit = 1` would return `min_lr`
/// there; runs never go past `epochs`, so this is not reached by the trainer). Pure function; no errors.
pub fn cosine_lr(epoch: usize, base_lr: f64, epochs: usize, warmup_epochs: usize, warmup_lr: f64, min_lr: f64) -> f64 {
    if epoch == 0 {
        return warmup_lr;
    }
    let t = (epoch - 1) as f64;
    if epoch - 1 < warmup_epochs {
        // Python: warmup_lr + t * (base_lr - warmup_lr) / warmup  →  (t·Δ)/warmup, left to right.
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs as f64;
    }
    // Python: min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
    min_lr + 0.5 * (base_lr - min_lr) * (1.0 + (std::f64::consts::PI * t / epochs.max(1) as f64).cos())
}

/// The whole schedule: `cosine_lr(e, ...)` for `e` in `0..epochs`.
pub fn lr_schedule(base_lr: f64, epochs: usize, warmup_epochs: usize, warmup_lr: f64, min_lr: f64) -> Vec<f64> {
    (0..epochs).map(|e| cosine_lr(e, base_lr, epochs, warmup_epochs, warmup_lr, min_lr)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        assert_eq!(cosine_lr(0, 1e-3, 100, 10, 1e-6, 1e-5), 1e-6);
        assert_eq!(cosine_lr(1, 1e-3, 100, 10, 1e-6, 1e-5), 1e-6);
        assert!(
            (cosine_lr(11, 1e-3, 100, 10, 1e-6, 1e-5)
                - (1e-5 + 0.5 * (1e-3 - 1e-5) * (1.0 + (0.1 * std::f64::consts::PI).cos())))
            .abs()
                < 1e-18
        );
        // No warm-up: epoch 1 is the peak.
        assert_eq!(cosine_lr(1, 1e-3, 10, 0, 1e-6, 1e-5), 1e-3);
    }
}
