//! The training loop of a [`TrainConfig`]: weights, model, data, optimizer schedule, SNELLA allocator,
//! per-epoch evaluation, metrics, checkpoints and resume.
//!
//! One epoch `e`:
//!  1. `lr = cosine_lr(e, ...)` (constant over the epoch, as the recipe steps the scheduler per epoch);
//!  2. SNELLA: `allocator.begin(e)` before the epoch's first batch: when the schedule says so, the per-layer
//!     ratios are reallocated from the EMA scores for the epoch's budget;
//!  3. for every batch (order and augmentation fixed by `(seed, e)`): `set_batch`, `forward` (the loss must
//!     be finite, else the run stops), `backward_step(lr, weight_decay, allocator's EMA rates)`: the backward,
//!     AdamW and the allocator's EMA update (at recompute `block`, the branch factors' part inside the backward);
//!  4. evaluation on the test split (every `eval_every` epochs and at the last), one JSON line in
//!     `<out_dir>/metrics.jsonl`, a checkpoint in `<out_dir>/checkpoint.safetensors`, then (evaluated epochs)
//!     the pictures of the run, `<out_dir>/curves.{png,svg}` and, for SNELL/SNELLA, `allocation.{png,svg}`.
//!
//! Checkpoints are also written every `checkpoint_every` steps inside an epoch, and once before the first
//! step, so a last good state always exists. [`Trainer::resume_from`] continues a run exactly; every session
//! starts by bringing the run's outputs back to its checkpoint (the rule is stated in `train/checkpoint.rs`).
//! [`Trainer::run_until`] stops at the next step boundary when asked (Ctrl-C), writing a checkpoint first.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};
use crate::io::{append, remove_files, remove_temporaries, write_atomic};
use crate::model::load::{adapt_to_config, infer_config, read_checkpoint, TensorMap, Weights};
use crate::model::vit::top1_correct;
use crate::model::{Model, ViTConfig};
use crate::peft::allocator::Allocator;
use crate::peft::Method;
use crate::rng::{example_seed, trunc_normal, SplitMix64};
use crate::runtime::Backend;
use crate::train::checkpoint::{
    checkpoint_path, load_checkpoint, read_checkpoint_meta, save_checkpoint, TrainState, CHECKPOINT_FILE,
};
use crate::train::data::{subset, Dataset, Idx, ImageFolder};
use crate::train::export::{export_all, kept_stats, EXPORT_FILES};
use crate::train::loader::Loader;
use crate::train::pictures::{self, PICTURE_FILES};
use crate::train::recipe::{parse_device, DataFormat, TrainConfig};
use crate::train::schedule::cosine_lr;

/// The metrics file of a run folder: one JSON [`EpochMetrics`] line per epoch done.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// A boxed dataset, as the trainer's loaders hold them.
pub type BoxDataset = Box<dyn Dataset>;

/// Per-layer sparsity of one branch in a metrics line.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerSparsity {
    /// Branch prefix, e.g. `branch.blocks.0.attn.q`.
    pub branch: String,
    /// Ratio s of zeroed entries in effect this epoch.
    pub sparsity: f32,
    /// Fraction of entries kept (|M| > t) at the end of the epoch.
    pub kept: f64,
}

/// One line of `metrics.jsonl`: the epoch's numbers.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    /// 0-based epoch.
    pub epoch: usize,
    /// Optimizer steps over the run at the end of the epoch.
    pub step: u64,
    /// Learning rate used during the epoch.
    pub lr: f64,
    /// Mean cross-entropy and top-1 accuracy (fraction) over the epoch's training images (each measured
    /// on the batch before its update).
    pub train_loss: f64,
    /// Training top-1 accuracy (fraction).
    pub train_acc: f64,
    /// Test mean cross-entropy and top-1 accuracy (absent when the epoch was not evaluated).
    pub test_loss: Option<f64>,
    /// Test top-1 accuracy (fraction).
    pub test_acc: Option<f64>,
    /// Wall-clock seconds of the epoch (training + evaluation).
    pub seconds: f64,
    /// Sparse methods: per-branch ratio and kept fraction; empty otherwise.
    pub layers: Vec<LayerSparsity>,
    /// Sparse methods: kept entries over all branches / all entries.
    pub kept_total: Option<f64>,
}

/// What a run achieved.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Method name, e.g. `snella32`.
    pub method: String,
    /// Whether every epoch ran (false when `max_steps` or a stop request ended the session early).
    pub completed: bool,
    /// Whether a stop request ([`Trainer::run_until`], Ctrl-C in the CLI) ended the session; the checkpoint
    /// holds where it stopped.
    pub interrupted: bool,
    /// Epochs fully run (over all sessions of the run).
    pub epochs_done: usize,
    /// Optimizer steps over the run.
    pub steps: u64,
    /// Best and last test top-1 accuracy (fractions), the best one's epoch, last test loss.
    pub best_test_acc: Option<f64>,
    /// Epoch (0-based) of `best_test_acc`.
    pub best_epoch: Option<usize>,
    /// Test accuracy of the last evaluation.
    pub last_test_acc: Option<f64>,
    /// Test loss of the last evaluation.
    pub last_test_loss: Option<f64>,
    /// Mean training loss of the last finished epoch.
    pub last_train_loss: Option<f64>,
    /// Wall-clock seconds of training over all sessions of the run (evaluation included).
    pub seconds: f64,
    /// Trainable scalars (the set AdamW updates).
    pub trainable_params: usize,
    /// `<out_dir>/checkpoint.safetensors`.
    pub checkpoint: PathBuf,
    /// `<out_dir>/metrics.jsonl`.
    pub metrics: PathBuf,
    /// Why the pictures of the run could not be drawn the last time the trainer tried (see
    /// [`Trainer::pictures_failed`]); absent when they were.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pictures_failed: Option<String>,
}

/// A training run, ready to [`Trainer::run`].
pub struct Trainer {
    /// The recipe of the run (validated).
    pub config: TrainConfig,
    /// The model, planned for `config.batch`, on the configured device.
    pub model: Model,
    /// SNELLA's bi-level allocator (None for other methods).
    pub allocator: Option<Allocator>,
    /// Shuffled, augmented training batches (not dropping the last partial batch, as the recipe).
    pub train_loader: Loader<BoxDataset>,
    /// Test batches in dataset order, evaluation transform.
    pub test_loader: Loader<BoxDataset>,
    /// Where the run stands (restored by [`Trainer::resume_from`]).
    pub state: TrainState,
    /// What loading did (position table resized, head re-initialised, ...).
    pub notes: Vec<String>,
    /// Why the pictures of the run (`train/pictures.rs`) could not be drawn the last time the trainer tried,
    /// or None. Not an error: the pictures are drawn from `metrics.jsonl` after the checkpoint that counts its
    /// lines, so a failure loses nothing, and `snella plot <out_dir>` redraws them; a run is not stopped for a
    /// picture (a full disk stops it at its next checkpoint anyway).
    pub pictures_failed: Option<String>,
}

/// Mean cross-entropy and top-1 accuracy (fraction in [0, 1]) of `model` over every batch of `loader`
/// (its epoch 0; use an unshuffled loader with a deterministic transform). The model's batch must be at
/// least the loader's. No parameter or optimizer state changes. [`Model::evaluate`] takes any batches.
///
/// # Errors
/// Data decoding errors naming the file, a batch or label that does not fit the model (`Invalid { option:
/// "batch" | "labels" }`), an empty dataset (`Invalid { option: "evaluation" }`), device failures.
pub fn evaluate<D: Dataset>(model: &mut Model, loader: &Loader<D>) -> Result<(f64, f64)> {
    let never = AtomicBool::new(false);
    // Nothing sets `never`, so the evaluation runs to its end and the error below is not reached.
    evaluate_with(model, loader, &ProgressBar::hidden(), &never)?
        .ok_or_else(|| Error::invalid("evaluation", "stopped before its end"))
}

/// [`evaluate`], abandoned (`None`) as soon as `stop` is set.
fn evaluate_with<D: Dataset>(
    model: &mut Model,
    loader: &Loader<D>,
    bar: &ProgressBar,
    stop: &AtomicBool,
) -> Result<Option<(f64, f64)>> {
    let batches = loader.epoch(0).map(|b| b.map(|b| (b.images, b.labels)));
    let e = model.evaluate_until(batches, stop, |b| bar.inc(b as u64))?;
    Ok(e.map(|e| (e.loss, e.accuracy)))
}

/// A random (untrained) backbone in timm names for `cfg`: Linear/patch weights, position table and head
/// ~ trunc_normal(0.02), cls token ~ N(0, 1e-6²), biases 0, LayerNorm weights 1, LayerScale γ = 0.1.
/// For tests and smoke runs without a checkpoint; deterministic in `seed`.
pub fn random_backbone(cfg: &ViTConfig, seed: u64) -> TensorMap {
    let mut out = TensorMap::new();
    for (k, (name, shape)) in cfg.param_shapes().into_iter().enumerate() {
        let n: usize = shape.iter().product();
        let mut rng = SplitMix64::new(example_seed(seed, 0xBAC4_B0AE, k as u64));
        let data = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name == "norm.weight" {
            vec![1.0; n]
        } else if name.ends_with(".gamma") {
            vec![0.1; n]
        } else if name == "cls_token" {
            trunc_normal(&mut rng, n, 1e-6)
        } else {
            trunc_normal(&mut rng, n, 0.02)
        };
        out.insert(name, (shape, data));
    }
    out
}

/// Initialises what the method adds to the backbone: [`Model::init_method`] (the branches as the official
/// code does, and for GPS a fixed random `density` of every block weight as its update mask).
/// Deterministic in `seed`.
///
/// # Errors
/// Device failures only.
pub fn init_method(model: &Model, seed: u64) -> Result<()> {
    model.init_method(seed)
}

/// Opens the train and test splits of `cfg.data`, with the configured subsets (class-stratified, seeded).
pub(crate) fn open_data(cfg: &TrainConfig) -> Result<(BoxDataset, BoxDataset)> {
    let (train, test): (BoxDataset, BoxDataset) = match cfg.resolved_data_format() {
        DataFormat::Idx => {
            (Box::new(Idx::open_standard(&cfg.data, true)?), Box::new(Idx::open_standard(&cfg.data, false)?))
        }
        _ => (
            Box::new(ImageFolder::open_split(&cfg.data, &cfg.train_split)?),
            Box::new(ImageFolder::open_split(&cfg.data, &cfg.test_split)?),
        ),
    };
    if train.class_names() != test.class_names() {
        return Err(Error::invalid(
            "data",
            format!(
                "the '{}' split has classes {:?} but the '{}' split has {:?}",
                cfg.train_split,
                train.class_names(),
                cfg.test_split,
                test.class_names()
            ),
        ));
    }
    let train: BoxDataset = match cfg.train_subset {
        Some(n) => Box::new(subset(train, n, cfg.seed, true)),
        None => train,
    };
    let test: BoxDataset = match cfg.test_subset {
        Some(n) => Box::new(subset(test, n, cfg.seed ^ 0x7E57, true)),
        None => test,
    };
    if train.is_empty() || test.is_empty() {
        return Err(Error::invalid("data", format!("{} has an empty split", cfg.data.display())));
    }
    Ok((train, test))
}

/// The model configuration and the backbone weights (adapted to it) a recipe asks for, and notes.
pub(crate) fn load_backbone(cfg: &TrainConfig, num_classes: usize) -> Result<(ViTConfig, Weights, Vec<String>)> {
    let img = (cfg.image_size, cfg.image_size);
    match &cfg.weights {
        Some(path) => {
            let w = read_checkpoint(path)?;
            let mut vc = if cfg.model == "infer" {
                infer_config(&w, cfg.num_heads.unwrap_or(0), img)?
            } else {
                let mut c = ViTConfig::by_name(&cfg.model, num_classes)?;
                if let Some(h) = cfg.num_heads {
                    c.num_heads = h;
                }
                c
            };
            vc.img_size = img;
            vc.num_classes = num_classes;
            vc.validate().map_err(|e| Error::invalid("image_size", e.to_string()))?;
            let (w, notes) = adapt_to_config(w, &vc, cfg.seed)?;
            Ok((vc, w, notes))
        }
        None => {
            if cfg.model == "infer" {
                return Err(Error::invalid("model", "'infer' needs weights"));
            }
            let mut vc = ViTConfig::by_name(&cfg.model, num_classes)?;
            if let Some(h) = cfg.num_heads {
                vc.num_heads = h;
            }
            vc.img_size = img;
            vc.validate().map_err(|e| Error::invalid("image_size", e.to_string()))?;
            let t = random_backbone(&vc, cfg.seed);
            let note = format!("no weights given: random backbone (seed {})", cfg.seed);
            Ok((vc, Weights { tensors: t, source: PathBuf::from("<random>") }, vec![note]))
        }
    }
}

fn bar(progress: bool, len: u64, prefix: String) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>14} [{bar:30}] {pos}/{len} img  {per_sec:>12}  {elapsed_precise} ETA {eta_precise}  {msg}",
        )
        // Cannot fail: the template is a constant, parsed the same way on every run.
        .expect("a valid progress template")
        .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

impl Trainer {
    /// Builds everything a run needs: checks the recipe (values and paths), sets the CPU thread count,
    /// opens the data, loads and adapts the backbone (position table resized the way its family does, see
    /// [`crate::model::load::identify`]; head re-initialised for the dataset's classes), plans the model for
    /// `batch` on the device, initialises the branches, and creates `out_dir`.
    ///
    /// # Errors
    /// `Invalid` for bad options (naming them), `Io`/`Format` for unreadable data or weights,
    /// `NoCuda` / `OutOfMemory` from the device.
    pub fn new(config: TrainConfig) -> Result<Trainer> {
        config.validate()?;
        config.validate_paths()?;
        if config.threads > 0 {
            // The global pool can be set once per process; later runs keep the first setting.
            let _ = rayon::ThreadPoolBuilder::new().num_threads(config.threads).build_global();
        }
        let method = config.method()?;
        let (train, test) = open_data(&config)?;
        let (vc, weights, mut notes) = load_backbone(&config, train.num_classes())?;
        let backend = Backend::new(parse_device(&config.device)?)?;
        let mut model = Model::new(backend, &vc, method, config.batch, config.memory()?)?;
        model.rt.set_gemm_precision(config.gemm()?);
        model.set_block_drop_path(config.drop_path as f32)?;
        model.set_regularisation_seed(config.seed);
        model.load_backbone(&weights)?;
        drop(weights);
        init_method(&model, config.seed)?;
        let allocator = match method {
            Method::Kernel(k) if k.sparse && k.allocator => Some(Allocator::new(&model, config.allocator())?),
            _ => None,
        };
        let train_loader = Loader::new(train, config.train_transform()?, config.batch, true, config.seed, false)?;
        let test_loader = Loader::new(test, config.eval_transform()?, config.batch, false, config.seed, false)?;
        std::fs::create_dir_all(&config.out_dir).map_err(|e| Error::io(&config.out_dir, e))?;
        notes.push(format!(
            "{} on {:?}: {} train / {} test images, {} classes, {} trainable parameters",
            model.method().name(),
            model.device(),
            train_loader.dataset().len(),
            test_loader.dataset().len(),
            vc.num_classes,
            Trainer::count_trainable(&model)
        ));
        Ok(Trainer {
            config,
            model,
            allocator,
            train_loader,
            test_loader,
            state: TrainState::default(),
            notes,
            pictures_failed: None,
        })
    }

    fn count_trainable(model: &Model) -> usize {
        model.trainable_len()
    }

    /// Trainable scalars of the model.
    pub fn trainable_params(&self) -> usize {
        Trainer::count_trainable(&self.model)
    }

    /// `<out_dir>/checkpoint.safetensors`.
    pub fn checkpoint_path(&self) -> PathBuf {
        checkpoint_path(&self.config.out_dir)
    }

    /// `<out_dir>/metrics.jsonl`.
    pub fn metrics_path(&self) -> PathBuf {
        self.config.out_dir.join(METRICS_FILE)
    }

    /// `<out_dir>/export`, where [`Trainer::export`] writes.
    pub fn export_dir(&self) -> PathBuf {
        self.config.out_dir.join("export")
    }

    /// Restores a checkpoint written by a run of the same recipe (see `checkpoint::load_checkpoint` for the
    /// checks). [`Trainer::run`] then brings the run's outputs back to it (`metrics.jsonl` to the epochs it
    /// counts, exports removed unless it is final) and continues from the saved epoch and batch.
    ///
    /// # Errors
    /// As [`crate::train::checkpoint::load_checkpoint`] with this run's recipe.
    pub fn resume_from(&mut self, path: &Path) -> Result<()> {
        let meta = load_checkpoint(path, &mut self.model, Some(&self.config))?;
        self.state = meta.state;
        self.notes.push(format!(
            "resumed from {} at epoch {} batch {} (step {})",
            path.display(),
            self.state.epoch,
            self.state.step_in_epoch,
            self.state.global_step
        ));
        Ok(())
    }

    /// The metrics lines the current state counts. A checkpoint of an older build counts its epochs without
    /// carrying their lines: then the first line of each of those epochs in `metrics.jsonl` (by its `epoch`
    /// stamp) is kept.
    fn counted_metrics(&self) -> Vec<String> {
        let done = self.state.epoch;
        if self.state.metrics.len() == done {
            return self.state.metrics.clone();
        }
        let text = std::fs::read_to_string(self.metrics_path()).unwrap_or_default();
        let mut next = 0;
        let mut kept = Vec::new();
        for line in text.lines() {
            let stamp = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["epoch"].as_u64());
            if next < done && stamp == Some(next as u64) {
                kept.push(line.to_string());
                next += 1;
            }
        }
        kept
    }

    /// Brings every output of the run back to what the state (fresh, or restored from a checkpoint) counts,
    /// as the rule of `train/checkpoint.rs` says: temporaries of killed writers removed, `metrics.jsonl`
    /// rewritten to exactly the counted lines (left alone when it already holds them), the pictures redrawn
    /// from those lines, exports removed unless the run is complete.
    fn restore_outputs(&mut self) -> Result<()> {
        let out = self.config.out_dir.clone();
        let export = self.export_dir();
        let mut ours = vec![CHECKPOINT_FILE, METRICS_FILE];
        ours.extend(PICTURE_FILES);
        remove_temporaries(&out, &ours)?;
        remove_temporaries(&export, &EXPORT_FILES)?;
        self.state.metrics = self.counted_metrics();
        let mut text = self.state.metrics.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        let mp = self.metrics_path();
        if std::fs::read(&mp).ok().as_deref() != Some(text.as_bytes()) {
            write_atomic(&mp, text.as_bytes())?;
        }
        remove_files(&out, &PICTURE_FILES)?;
        self.draw_pictures(false);
        if self.state.epoch < self.config.epochs {
            remove_files(&export, &EXPORT_FILES)?;
        }
        Ok(())
    }

    /// Writes the exports of a complete run into [`Trainer::export_dir`] (created): merged weights and, for
    /// branch methods and the linear probe, the sparse delta. Returns the paths written.
    ///
    /// # Errors
    /// `Invalid { option: "export" }` when the run has epochs left (an export must match the final checkpoint);
    /// `Io` naming a file that cannot be written; device failures.
    pub fn export(&self) -> Result<Vec<PathBuf>> {
        if self.state.epoch < self.config.epochs {
            return Err(Error::invalid(
                "export",
                format!(
                    "the run has done {} of {} epochs; its exports are written once it is complete (resume it)",
                    self.state.epoch, self.config.epochs
                ),
            ));
        }
        let dir = self.export_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        export_all(&self.model, &dir)
    }

    /// Draws the pictures of the epochs the state counts into `out_dir` (`train/pictures.rs`). A failure is
    /// kept in [`Trainer::pictures_failed`] (and printed with `progress`), not returned: see that field.
    fn draw_pictures(&mut self, progress: bool) {
        let title = self.model.method().name();
        self.pictures_failed = match pictures::draw(&self.config.out_dir, &self.state.metrics, &title) {
            Ok(_) => None,
            Err(e) => {
                let why = format!("{e}; `snella plot {}` redraws them", self.config.out_dir.display());
                if progress {
                    eprintln!("snella: the pictures were not drawn: {why}");
                }
                Some(why)
            }
        };
    }

    fn save(&self) -> Result<()> {
        save_checkpoint(&self.checkpoint_path(), &self.model, &self.state, Some(&self.config))
    }

    fn nan_error(&self, what: &str, epoch: usize, step: u64) -> Error {
        Error::invalid(
            "training",
            format!(
                "{what} became NaN or infinite at epoch {epoch} step {step} (lr {:e}); the last good checkpoint is {}",
                cosine_lr(
                    epoch,
                    self.config.lr,
                    self.config.epochs,
                    self.config.warmup_epochs,
                    self.config.warmup_lr,
                    self.config.min_lr
                ),
                self.checkpoint_path().display()
            ),
        )
    }

    /// A file that could not be written (a full disk, a read-only or vanished folder), with what the last
    /// good checkpoint on disk holds: the writes are ordered so that it is intact (see `train/checkpoint.rs`).
    fn with_last_good(&self, e: Error) -> Error {
        let Error::Io { path, source } = e else { return e };
        let ck = self.checkpoint_path();
        let last = match read_checkpoint_meta(&ck) {
            Ok(m) => format!(
                "the last good checkpoint {} (step {}, {} epochs done) is intact and the run can resume from it",
                ck.display(),
                m.state.global_step,
                m.state.epoch
            ),
            Err(_) => format!("there is no good checkpoint at {} yet", ck.display()),
        };
        Error::io(path, std::io::Error::new(source.kind(), format!("{source}; {last}")))
    }

    /// Runs the remaining epochs (all of them for a fresh trainer), as [`Trainer::run_until`] without a stop
    /// request.
    ///
    /// # Errors
    /// As [`Trainer::run_until`].
    pub fn run(&mut self, progress: bool) -> Result<Summary> {
        self.run_until(progress, &AtomicBool::new(false))
    }

    /// Runs the remaining epochs (all of them for a fresh trainer). First brings the run's outputs back to
    /// the state (the rule of `train/checkpoint.rs`). When `stop` becomes true (a signal handler sets it), the
    /// session ends at the next step boundary or evaluation batch: the step in progress is finished, a
    /// checkpoint of that point is written, and the summary says `interrupted`. With `progress`, indicatif
    /// bars on stderr show images/s and the ETA of every epoch and evaluation.
    ///
    /// # Errors
    /// An invalid `config` (it is public and checked again here); a loss (or a parameter) that becomes NaN/inf
    /// stops the run with
    /// `Invalid { option: "training", msg: "loss became NaN ... at epoch E step S ...; the last good
    /// checkpoint is <path>" }`, leaving that checkpoint untouched; a file that cannot be written is `Io`
    /// naming it and saying what the last good checkpoint holds; data and device errors as they come.
    pub fn run_until(&mut self, progress: bool, stop: &AtomicBool) -> Result<Summary> {
        self.session(progress, stop).map_err(|e| self.with_last_good(e))
    }

    fn session(&mut self, progress: bool, stop: &AtomicBool) -> Result<Summary> {
        let c = self.config.clone();
        c.validate()?;
        let session = Instant::now();
        let base_elapsed = self.state.elapsed_s;
        let v = self.model.config().num_classes;
        let sparse = matches!(self.model.method(), Method::Kernel(k) if k.sparse);
        if self.state.global_step == 0 && self.state.step_in_epoch == 0 && self.state.epoch == 0 {
            // The state before any update, so that a last good checkpoint always exists; it goes first, so
            // that the outputs of an earlier run in this folder are never less than the checkpoint counts.
            self.save()?;
        }
        self.restore_outputs()?;
        let n_train = self.train_loader.dataset().len();
        let nb = self.train_loader.num_batches();
        let bs = self.train_loader.batch_size();
        let mut last_train_loss = None;
        // Ends the session at a step boundary: a checkpoint of where it stands, then the summary.
        let interrupt = |t: &mut Trainer, epoch: usize, last: Option<f64>| -> Result<Summary> {
            t.state.elapsed_s = base_elapsed + session.elapsed().as_secs_f64();
            t.save_or_nan(epoch)?;
            Ok(Summary { interrupted: true, ..t.summary(false, last) })
        };
        while self.state.epoch < c.epochs {
            let epoch = self.state.epoch;
            if stop.load(Ordering::Relaxed) {
                return interrupt(self, epoch, last_train_loss);
            }
            let t0 = Instant::now();
            let lr = cosine_lr(epoch, c.lr, c.epochs, c.warmup_epochs, c.warmup_lr, c.min_lr);
            if self.state.step_in_epoch == 0 {
                if let Some(a) = &self.allocator {
                    a.begin(&mut self.model, epoch)?;
                }
                self.state.train_loss_sum = 0.0;
                self.state.train_correct = 0;
                self.state.train_seen = 0;
            }
            let order = self.train_loader.order(epoch);
            let pb = bar(progress, n_train as u64, format!("epoch {}/{}", epoch + 1, c.epochs));
            pb.set_position(self.state.train_seen);
            pb.reset_eta();
            for bi in self.state.step_in_epoch..nb {
                let idx = &order[bi * bs..((bi + 1) * bs).min(n_train)];
                let batch = self.train_loader.make_batch(epoch, idx)?;
                let b = self.model.set_batch(&batch.images, &batch.labels)?;
                let loss = self.model.forward()?;
                if !loss.is_finite() {
                    pb.abandon();
                    return Err(self.nan_error("loss", epoch, self.state.global_step + 1));
                }
                let right = top1_correct(&self.model.logits()?, &batch.labels, v);
                self.model.backward_step(lr, c.weight_decay, self.allocator.as_ref().map(Allocator::betas))?;
                let s = &mut self.state;
                s.step_in_epoch = bi + 1;
                s.global_step += 1;
                s.train_loss_sum += loss as f64 * b as f64;
                s.train_correct += right;
                s.train_seen += b as u64;
                pb.inc(b as u64);
                pb.set_message(format!("loss {:.4} lr {lr:.2e}", s.train_loss_sum / s.train_seen as f64));
                if c.max_steps.is_some_and(|m| self.state.global_step >= m) {
                    pb.abandon();
                    self.state.elapsed_s = base_elapsed + session.elapsed().as_secs_f64();
                    return Ok(self.summary(false, last_train_loss));
                }
                if stop.load(Ordering::Relaxed) {
                    pb.abandon();
                    return interrupt(self, epoch, last_train_loss);
                }
                if c.checkpoint_every > 0 && self.state.global_step.is_multiple_of(c.checkpoint_every) && bi + 1 < nb {
                    self.state.elapsed_s = base_elapsed + session.elapsed().as_secs_f64();
                    self.save_or_nan(epoch)?;
                }
            }
            pb.finish_and_clear();
            let train_loss = self.state.train_loss_sum / self.state.train_seen.max(1) as f64;
            let train_acc = self.state.train_correct as f64 / self.state.train_seen.max(1) as f64;
            last_train_loss = Some(train_loss);
            let (test_loss, test_acc) = if (epoch + 1).is_multiple_of(c.eval_every) || epoch + 1 == c.epochs {
                let eb = bar(progress, self.test_loader.dataset().len() as u64, "eval".into());
                let evaluated = evaluate_with(&mut self.model, &self.test_loader, &eb, stop)?;
                eb.finish_and_clear();
                // Abandoned: the checkpoint holds the epoch's batches done, so a resume evaluates afresh.
                let Some((l, a)) = evaluated else { return interrupt(self, epoch, last_train_loss) };
                if !l.is_finite() {
                    return Err(self.nan_error("test loss", epoch, self.state.global_step));
                }
                self.state.last_loss = Some(l);
                self.state.last_acc = Some(a);
                if self.state.best_acc.is_none_or(|b| a > b) {
                    self.state.best_acc = Some(a);
                    self.state.best_epoch = Some(epoch);
                }
                (Some(l), Some(a))
            } else {
                (None, None)
            };
            let (layers, kept_total) = if sparse {
                let st = kept_stats(&self.model)?;
                let (k, t) = st.iter().fold((0usize, 0usize), |acc, r| (acc.0 + r.2, acc.1 + r.3));
                let layers = st
                    .into_iter()
                    .map(|(branch, s, k, t)| LayerSparsity { branch, sparsity: s, kept: k as f64 / t as f64 })
                    .collect();
                (layers, Some(k as f64 / t.max(1) as f64))
            } else {
                (Vec::new(), None)
            };
            let m = EpochMetrics {
                epoch,
                step: self.state.global_step,
                lr,
                train_loss,
                train_acc,
                test_loss,
                test_acc,
                seconds: t0.elapsed().as_secs_f64(),
                layers,
                kept_total,
            };
            // The line goes to disk before the checkpoint that counts it (the rule of train/checkpoint.rs).
            let line = serde_json::to_string(&m).map_err(|e| Error::invalid("metrics", e.to_string()))?;
            append(&self.metrics_path(), format!("{line}\n").as_bytes())?;
            if progress {
                eprintln!(
                    "epoch {:>3}/{}  lr {lr:.2e}  train loss {train_loss:.4} acc {:.2}%  {}  {:.1}s",
                    epoch + 1,
                    c.epochs,
                    100.0 * train_acc,
                    match (test_loss, test_acc) {
                        (Some(l), Some(a)) => format!("test loss {l:.4} acc {:.2}%", 100.0 * a),
                        _ => "not evaluated".into(),
                    },
                    m.seconds
                );
            }
            self.state.metrics.push(line);
            self.state.epoch = epoch + 1;
            self.state.step_in_epoch = 0;
            self.state.elapsed_s = base_elapsed + session.elapsed().as_secs_f64();
            self.save_or_nan(epoch)?;
            // After the checkpoint that counts the line: a picture never shows an epoch the checkpoint does not.
            if test_loss.is_some() {
                self.draw_pictures(progress);
            }
        }
        self.state.elapsed_s = base_elapsed + session.elapsed().as_secs_f64();
        Ok(self.summary(true, last_train_loss))
    }

    /// Saves a checkpoint; a non-finite parameter becomes the training NaN error (the file is untouched).
    fn save_or_nan(&self, epoch: usize) -> Result<()> {
        match self.save() {
            Err(Error::Invalid { option, msg }) if option == "checkpoint" => Err(Error::invalid(
                "training",
                format!(
                    "a parameter became NaN or infinite at epoch {epoch} step {} ({msg}); the last good checkpoint is {}",
                    self.state.global_step,
                    self.checkpoint_path().display()
                ),
            )),
            r => r,
        }
    }

    fn summary(&self, completed: bool, last_train_loss: Option<f64>) -> Summary {
        Summary {
            method: self.model.method().name(),
            completed,
            interrupted: false,
            epochs_done: self.state.epoch,
            steps: self.state.global_step,
            best_test_acc: self.state.best_acc,
            best_epoch: self.state.best_epoch,
            last_test_acc: self.state.last_acc,
            last_test_loss: self.state.last_loss,
            last_train_loss,
            seconds: self.state.elapsed_s,
            trainable_params: self.trainable_params(),
            checkpoint: self.checkpoint_path(),
            metrics: self.metrics_path(),
            pictures_failed: self.pictures_failed.clone(),
        }
    }
}
