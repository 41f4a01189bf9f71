//! The trajectory masks of a golden case, and the check that steps a model along the reference's trajectory
//! with every mask compared. The reference records every mask of its AdamW and allocator runs (the forward
//! of each step) in `<case>.masks.safetensors`, and per mask, in the manifest's `trajectory_masks`, its t,
//! kept count, decisive gap and tie band: the flat indices with ||M| − t| ≤ 1e-5·t.
//!
//! Along a trajectory the decisive gaps go down to ~5e-7 relative, below the ~1.5e-6 by which two valid fp32
//! implementations differ near t, so a correct engine may keep another entry of the tie band than the
//! reference did. Outside the band the masks must be identical, and inside it the rank fixes the kept
//! count: the one allowed difference is a swap, a tie. After a tie the branch's trajectory legitimately
//! leaves the reference's (by up to ~1e-2 relative in the final factors), so [`MaskCheck`] replays the
//! reference's mask for that step, and every later tensor is still compared with its `suggested_atol`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::GoldenCase;
use crate::error::{Error, Result};
use crate::io::safetensors::{u8_values, File};
use crate::model::Model;

/// One mask of the reference's trajectory, with its manifest record.
#[derive(Clone, Debug)]
pub struct MaskRecord {
    /// `adamw<k>` (the forward of AdamW step k, 1-based) or `alloc_e<e>s<s>` (allocator epoch e, step s).
    pub phase: String,
    /// The branch prefix, e.g. `branch.blocks.0.attn.q`.
    pub branch: String,
    /// The reference's threshold.
    pub t: f64,
    /// The reference's decisive relative gap (None when it keeps nothing or everything).
    pub decisive_rel_gap: Option<f64>,
    /// Flat indices of the entries with ||M| − t| ≤ 1e-5·t, ascending.
    pub tie_band: Vec<usize>,
    /// The kept set, row-major over M (in × out).
    pub mask: Vec<bool>,
}

/// Every trajectory mask of a case, by phase and branch.
pub struct TrajectoryMasks {
    /// The masks file (named in messages).
    pub file: PathBuf,
    records: BTreeMap<(String, String), MaskRecord>,
}

impl TrajectoryMasks {
    /// The trajectory masks of a case; None when its manifest records none (`trajectory_masks` is null for a
    /// case without sparse branches, and absent from a case written before they were recorded).
    ///
    /// # Errors
    /// A masks file that is missing or unreadable, or that disagrees with the manifest: a mask absent, of
    /// another size, or with another kept count; a record without its fields or with a tie-band index
    /// outside the mask.
    pub fn load(case: &GoldenCase) -> Result<Option<TrajectoryMasks>> {
        let block = &case.manifest["trajectory_masks"];
        if block.is_null() {
            return Ok(None);
        }
        let manifest = case.path.with_extension("json");
        let bad = |msg: String| Error::format(&manifest, format!("trajectory_masks: {msg}"));
        let name = block["file"].as_str().ok_or_else(|| bad("no file".into()))?;
        let file = case.path.parent().unwrap_or(Path::new(".")).join(name);
        let st = File::read(&file)?;
        let tensors = st.tensors()?;
        let mut records = BTreeMap::new();
        for (key, r) in block["masks"].as_object().ok_or_else(|| bad("no masks".into()))? {
            let field = |k: &str| bad(format!("{key}: no {k}"));
            let text = |k: &str| r[k].as_str().map(str::to_string).ok_or_else(|| field(k));
            let count = |k: &str| r[k].as_u64().map(|v| v as usize).ok_or_else(|| field(k));
            let (phase, branch, kept, numel) = (text("phase")?, text("branch")?, count("kept")?, count("numel")?);
            let band = r["tie_band"].as_array().ok_or_else(|| field("tie_band"))?;
            let mut tie_band: Vec<usize> = band.iter().filter_map(|i| i.as_u64().map(|i| i as usize)).collect();
            tie_band.sort_unstable();
            if tie_band.len() != band.len() || tie_band.last().is_some_and(|&i| i >= numel) {
                return Err(bad(format!("{key}: tie band {band:?} is not a list of indices below {numel}")));
            }
            let view = tensors
                .tensor(key)
                .map_err(|_| Error::MissingTensor { file: file.display().to_string(), name: key.clone() })?;
            let bytes = u8_values(&file, key, &view)?;
            if bytes.len() != numel.div_ceil(8) {
                return Err(Error::format(&file, format!("{key}: {} bytes for {numel} bits", bytes.len())));
            }
            let mask: Vec<bool> = (0..numel).map(|i| bytes[i / 8] >> (i % 8) & 1 == 1).collect();
            let set = mask.iter().filter(|&&k| k).count();
            if set != kept {
                return Err(Error::format(&file, format!("{key}: {set} entries kept, the manifest says {kept}")));
            }
            let t = r["t"].as_f64().ok_or_else(|| field("t"))?;
            let decisive_rel_gap = r["decisive_rel_gap"].as_f64();
            let rec = MaskRecord { phase: phase.clone(), branch: branch.clone(), t, decisive_rel_gap, tie_band, mask };
            records.insert((phase, branch), rec);
        }
        Ok(Some(TrajectoryMasks { file, records }))
    }

    /// The reference's mask of a branch at a phase.
    pub fn get(&self, phase: &str, branch: &str) -> Option<&MaskRecord> {
        self.records.get(&(phase.to_string(), branch.to_string()))
    }

    /// The reference's mask of a branch at a phase, to change (the tests plant ties and bugs with it).
    #[cfg(test)]
    pub(crate) fn get_mut(&mut self, phase: &str, branch: &str) -> Option<&mut MaskRecord> {
        self.records.get_mut(&(phase.to_string(), branch.to_string()))
    }

    /// How many masks the reference recorded at a phase.
    pub fn in_phase(&self, phase: &str) -> usize {
        self.records.keys().filter(|(p, _)| p == phase).count()
    }

    /// How many masks the reference recorded.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the reference recorded no mask.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// How the engine's mask at one step compares with the reference's.
#[derive(Clone, Debug, PartialEq)]
pub enum MaskVerdict {
    /// The same kept set.
    Equal,
    /// Only swaps inside the tie band: allowed, and the reference's mask is to be replayed.
    Tie(Tie),
    /// Any other difference (outside the tie band, or a kept count that changed), as a message naming the
    /// phase, the branch, and each entry's flat index, |M| and t: a bug.
    Mismatch(String),
}

/// Entries of a tie band that the engine and the reference decided differently, in equal numbers each way.
#[derive(Clone, Debug, PartialEq)]
pub struct Tie {
    /// The step, as the manifest names it.
    pub phase: String,
    /// The branch prefix.
    pub branch: String,
    /// The entries decided differently (flat indices, ascending).
    pub entries: Vec<usize>,
    /// max ||M| − t| / t over those entries, with the engine's M and t.
    pub rel_gap: f64,
}

impl Tie {
    /// `tie at <phase> <branch>: entries i, j within <gap>·t of t; reference mask replayed`.
    pub fn line(&self) -> String {
        let entries: Vec<String> = self.entries.iter().map(|i| i.to_string()).collect();
        format!(
            "tie at {} {}: entries {} within {:.1e}·t of t; reference mask replayed",
            self.phase,
            self.branch,
            entries.join(", "),
            self.rel_gap
        )
    }
}

/// Compares the engine's kept set |M| > t (its M and t at one step) with the reference's record.
/// m: (in·out), row-major over M
pub fn compare_mask(rec: &MaskRecord, m: &[f32], t: f32) -> MaskVerdict {
    let at = format!("mask at {} {}", rec.phase, rec.branch);
    if m.len() != rec.mask.len() {
        return MaskVerdict::Mismatch(format!(
            "{at}: M has {} entries, the reference's mask {}",
            m.len(),
            rec.mask.len()
        ));
    }
    let differ: Vec<usize> = (0..m.len()).filter(|&i| (m[i].abs() > t) != rec.mask[i]).collect();
    if differ.is_empty() {
        return MaskVerdict::Equal;
    }
    let entries = |idx: &[usize]| {
        let mut parts: Vec<String> = idx
            .iter()
            .take(4)
            .map(|&i| {
                let who = if rec.mask[i] { "kept by the reference only" } else { "kept by the engine only" };
                format!("entry {i} (|M| {:.7e}, t {t:.7e}, reference t {:.7e}) {who}", m[i].abs(), rec.t)
            })
            .collect();
        if idx.len() > 4 {
            parts.push(format!("{} more", idx.len() - 4));
        }
        parts.join("; ")
    };
    let outside: Vec<usize> = differ.iter().copied().filter(|i| rec.tie_band.binary_search(i).is_err()).collect();
    if !outside.is_empty() {
        let counts = format!("{} of {} differing entries", outside.len(), differ.len());
        return MaskVerdict::Mismatch(format!("{at}: {counts} outside the tie band: {}", entries(&outside)));
    }
    let engine_only = differ.iter().filter(|&&i| !rec.mask[i]).count();
    if 2 * engine_only != differ.len() {
        let reference = rec.mask.iter().filter(|&&k| k).count();
        let engine = reference + engine_only - (differ.len() - engine_only);
        return MaskVerdict::Mismatch(format!(
            "{at}: inside the tie band but not a swap: the engine keeps {engine}, the reference {reference}: {}",
            entries(&differ)
        ));
    }
    let gap = |i: usize| (m[i].abs() as f64 - t as f64).abs() / t as f64;
    let rel_gap = differ.iter().map(|&i| gap(i)).fold(0.0, f64::max);
    MaskVerdict::Tie(Tie { phase: rec.phase.clone(), branch: rec.branch.clone(), entries: differ, rel_gap })
}

/// Steps a model along a golden trajectory with every mask compared with the reference's, replaying the
/// reference's mask where the engine's differs by a tie (see the module docs). A case without trajectory
/// masks runs its steps unchecked, as before they were recorded.
pub struct MaskCheck {
    case: String,
    masks: Option<TrajectoryMasks>,
    /// Why no mask is compared, for a case without trajectory masks.
    unchecked: &'static str,
    /// The steps taken, as the manifest names them.
    phases: Vec<String>,
    /// Masks compared so far.
    pub compared: usize,
    /// The ties found, each replayed.
    pub ties: Vec<Tie>,
    /// Every failed mask (a difference outside the tie band or a changed kept count, a mask the reference
    /// did not record or the engine did not make), as a message naming the case.
    pub failures: Vec<String>,
}

impl MaskCheck {
    /// The check of a case, with its trajectory masks if it has them.
    ///
    /// # Errors
    /// As [`TrajectoryMasks::load`].
    pub fn new(case: &GoldenCase) -> Result<MaskCheck> {
        let unchecked = match case.manifest.get("trajectory_masks") {
            Some(_) => "none recorded (no sparse branch)",
            None => "none in this case (written before they were recorded)",
        };
        Ok(MaskCheck { unchecked, ..MaskCheck::with_masks(&case.name, TrajectoryMasks::load(case)?) })
    }

    /// The check of case `case` against `masks` (the tests plant ties and bugs in them).
    pub(crate) fn with_masks(case: &str, masks: Option<TrajectoryMasks>) -> MaskCheck {
        let (compared, ties, failures, phases) = (0, Vec::new(), Vec::new(), Vec::new());
        MaskCheck { case: case.into(), masks, unchecked: "none given", phases, compared, ties, failures }
    }

    /// The forward and backward of the trajectory step `phase` (`adamw<k>` or `alloc_e<e>s<s>`, as the
    /// manifest names them). The forward; the engine's mask of every sparse branch compared with the
    /// reference's (a failure is recorded and printed); where the difference is a tie, one line printed and
    /// the forward run again with the reference's mask replayed on the branches that tied; the backward, with
    /// the same masks; the replay ended. Returns the loss of the forward that the gradients belong to.
    ///
    /// # Errors
    /// The model's.
    pub fn forward_backward(&mut self, model: &mut Model, phase: &str) -> Result<f32> {
        let loss = model.forward()?;
        let Some(masks) = &self.masks else {
            model.backward()?;
            return Ok(loss);
        };
        self.phases.push(phase.to_string());
        let (mut replay, mut failures, mut compared) = (Vec::new(), Vec::new(), 0);
        for (branch, m, t) in model.sparse_branch_matrices()? {
            let Some(rec) = masks.get(phase, &branch) else {
                failures.push(format!("no reference mask for {phase} {branch} in {}", masks.file.display()));
                continue;
            };
            compared += 1;
            match compare_mask(rec, &m, t) {
                MaskVerdict::Equal => {}
                MaskVerdict::Tie(tie) => {
                    println!("{:<16} {}", self.case, tie.line());
                    replay.push((branch, rec.mask.clone()));
                    self.ties.push(tie);
                }
                MaskVerdict::Mismatch(msg) => failures.push(msg),
            }
        }
        let recorded = masks.in_phase(phase);
        if compared != recorded {
            failures.push(format!("{phase}: {compared} masks compared, the reference recorded {recorded}"));
        }
        self.compared += compared;
        for msg in failures {
            println!("{:<16} MASK NOT OK {msg}", self.case);
            self.failures.push(format!("{}: {msg}", self.case));
        }
        if replay.is_empty() {
            model.backward()?;
            return Ok(loss);
        }
        model.replay_masks(replay)?;
        let replayed = model.forward().and_then(|loss| model.backward().map(|_| loss));
        model.replay_masks(Vec::new())?;
        replayed
    }

    /// One line: the masks compared, the ties replayed and the masks failed, or why no mask was compared.
    pub fn summary(&self) -> String {
        let Some(masks) = &self.masks else {
            return format!("trajectory masks: {}; masks not compared", self.unchecked);
        };
        let steps = match (self.phases.first(), self.phases.last()) {
            (Some(a), Some(b)) if a != b => format!("{} steps, {a}..{b}", self.phases.len()),
            (Some(a), _) => format!("1 step, {a}"),
            _ => "no step".into(),
        };
        format!(
            "trajectory masks: {} compared ({steps}; {} recorded in all), ties replayed: {}, failed: {}",
            self.compared,
            masks.len(),
            self.ties.len(),
            self.failures.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose kept set is |m| > t, with the given tie band.
    fn record(m: &[f32], t: f32, tie_band: Vec<usize>) -> MaskRecord {
        MaskRecord {
            phase: "alloc_e2s1".into(),
            branch: "branch.blocks.0.mlp.fc1".into(),
            t: t as f64,
            decisive_rel_gap: None,
            tie_band,
            mask: m.iter().map(|x| x.abs() > t).collect(),
        }
    }

    /// Entries 1 and 2 straddle t = 1 within 1e-7·t (the tie band), 0 and 3 are far from it.
    const M: [f32; 4] = [0.5, -1.000_000_1, 0.999_999_9, -2.0];

    #[test]
    fn a_swap_inside_the_tie_band_is_a_tie() {
        let mut rec = record(&M, 1.0, vec![1, 2]);
        assert_eq!(compare_mask(&rec, &M, 1.0), MaskVerdict::Equal);
        rec.mask.swap(1, 2);
        let MaskVerdict::Tie(tie) = compare_mask(&rec, &M, 1.0) else { panic!("a swap inside the band is a tie") };
        assert_eq!(tie.entries, vec![1, 2]);
        assert!(tie.rel_gap > 0.0 && tie.rel_gap < 2e-7, "{}", tie.rel_gap);
        assert_eq!(
            tie.line(),
            "tie at alloc_e2s1 branch.blocks.0.mlp.fc1: entries 1, 2 within 1.2e-7·t of t; reference mask replayed"
        );
    }

    #[test]
    fn a_difference_outside_the_band_or_a_changed_count_is_a_bug() {
        // A swap of two entries, one of them outside the band (entry 3 keeps |M| = 2 > t = 1).
        let mut rec = record(&M, 1.0, vec![1, 2]);
        rec.mask.swap(2, 3);
        let MaskVerdict::Mismatch(msg) = compare_mask(&rec, &M, 1.0) else { panic!("outside the band: a bug") };
        assert!(msg.starts_with("mask at alloc_e2s1 branch.blocks.0.mlp.fc1: 1 of 2 differing entries outside"));
        assert!(msg.contains("entry 3 (|M| 2.0000000e0, t 1.0000000e0, reference t 1.0000000e0) kept by the engine"));
        // The same swap with the band empty: both entries are named.
        let mut rec = record(&M, 1.0, vec![]);
        rec.mask.swap(1, 2);
        let MaskVerdict::Mismatch(msg) = compare_mask(&rec, &M, 1.0) else { panic!("no band: a bug") };
        assert!(msg.contains("2 of 2 differing entries") && msg.contains("entry 1 (") && msg.contains("entry 2 ("));
        // One entry of the band flipped: the count changes, no swap.
        let mut rec = record(&M, 1.0, vec![1, 2]);
        rec.mask[2] = true;
        let MaskVerdict::Mismatch(msg) = compare_mask(&rec, &M, 1.0) else { panic!("a changed count is a bug") };
        assert!(msg.contains("not a swap: the engine keeps 2, the reference 3"), "{msg}");
        assert!(msg.contains("entry 2 (|M| 9.9999988e-1, t 1.0000000e0"), "{msg}");
        // A mask of another size.
        assert!(matches!(compare_mask(&rec, &M[..3], 1.0), MaskVerdict::Mismatch(_)));
    }
}
