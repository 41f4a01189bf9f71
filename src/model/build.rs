//! [`Model::builder`]: from a weights file (or Hub id), a method and a few options to a model ready to train,
//! in one call, with what it inferred said in notes. It strings together the low-level pieces, which stay
//! public: [`load::read_checkpoint`], [`load::identify`], [`load::infer_config`], [`load::adapt_to_config_with`],
//! [`Model::new`], [`Model::load_backbone`], [`Model::init_method`].
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::load::{self, PosResize, Weights};
use crate::model::plan::{MemoryOptions, Precision, Recompute};
use crate::model::vit::Model;
use crate::peft::Method;
use crate::runtime::{Backend, Device};

/// Where the backbone comes from.
enum Source {
    /// A file or a Hugging Face Hub id, read by [`load::read_checkpoint`].
    File(PathBuf),
    /// Weights already read (timm names).
    Weights(Weights),
}

/// Where the model runs.
enum Target {
    /// [`Device::auto`], probed at [`ModelBuilder::build`].
    Auto,
    /// A device opened at [`ModelBuilder::build`].
    Device(Device),
    /// A backend the caller already holds (shared with its other models).
    Backend(Backend),
}

/// The options of [`Model::builder`]; [`ModelBuilder::build`] makes the model.
pub struct ModelBuilder {
    source: Source,
    method: Method,
    classes: Option<usize>,
    image_size: Option<usize>,
    batch: usize,
    memory: MemoryOptions,
    target: Target,
    num_heads: Option<usize>,
    pos_resize: Option<PosResize>,
    seed: u64,
}

impl Model {
    /// A model ready to train from `weights` (a timm / Hugging Face ViT or DINOv2 safetensors file, a Google
    /// `.npz`, or a Hugging Face Hub id in the local cache) and `method`: set the options on the builder, then
    /// [`ModelBuilder::build`]. The defaults: the checkpoint's classes (a headless backbone such as DINOv2
    /// needs [`ModelBuilder::classes`]), its native image size, batch 8, [`Recompute::default`], fp32
    /// storage, [`Device::auto`], seed 0.
    ///
    /// ```no_run
    /// use snella::model::{Model, Recompute};
    /// use snella::peft::Method;
    /// # fn main() -> snella::Result<()> {
    /// let (mut model, notes) = Model::builder("assets/dinov2_vits14.safetensors", Method::snella(8, 0.0))
    ///     .classes(10)
    ///     .image_size(56)
    ///     .batch(32)
    ///     .recompute(Recompute::Block)
    ///     .build()?;
    /// notes.iter().for_each(|n| println!("{n}")); // "DINOv2 ViT-S/14 (...): 6 heads, ...", the table resize
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(weights: impl AsRef<Path>, method: Method) -> ModelBuilder {
        ModelBuilder::new(Source::File(weights.as_ref().to_path_buf()), method)
    }
}

impl ModelBuilder {
    fn new(source: Source, method: Method) -> ModelBuilder {
        ModelBuilder {
            source,
            method,
            classes: None,
            image_size: None,
            batch: 8,
            memory: MemoryOptions::default(),
            target: Target::Auto,
            num_heads: None,
            pos_resize: None,
            seed: 0,
        }
    }

    /// [`Model::builder`] from weights already read (timm names, e.g. [`load::read_checkpoint`]'s or a random
    /// backbone's).
    pub fn from_weights(weights: Weights, method: Method) -> ModelBuilder {
        ModelBuilder::new(Source::Weights(weights), method)
    }

    /// Classes of the task: the head is re-initialised for them when the checkpoint's has another count.
    pub fn classes(mut self, n: usize) -> ModelBuilder {
        self.classes = Some(n);
        self
    }

    /// Side of the square input in pixels (a multiple of the patch size); the position table is resized to
    /// it the way the checkpoint's family does ([`load::identify`]).
    pub fn image_size(mut self, px: usize) -> ModelBuilder {
        self.image_size = Some(px);
        self
    }

    /// The largest batch a step takes (the memory plan is sized for it).
    pub fn batch(mut self, b: usize) -> ModelBuilder {
        self.batch = b;
        self
    }

    /// What the backward recomputes instead of keeping.
    pub fn recompute(mut self, r: Recompute) -> ModelBuilder {
        self.memory.recompute = r;
        self
    }

    /// Storage precision of the frozen block weights and the kept residual stream.
    pub fn precision(mut self, p: Precision) -> ModelBuilder {
        self.memory.precision = p;
        self
    }

    /// Update the branch factors inside the backward ([`MemoryOptions::fused_update`]; the step is then
    /// [`Model::backward_step`]). Default off: the gradients stay readable.
    pub fn fused_update(mut self, on: bool) -> ModelBuilder {
        self.memory.fused_update = on;
        self
    }

    /// The device to open (default [`Device::auto`]: a GPU when one is usable, else the CPU).
    pub fn device(mut self, d: Device) -> ModelBuilder {
        self.target = Target::Device(d);
        self
    }

    /// Runs on `backend`, a clone of one the caller already holds (its other models share the context).
    pub fn backend(mut self, backend: Backend) -> ModelBuilder {
        self.target = Target::Backend(backend);
        self
    }

    /// Attention heads, for a backbone whose size the library does not recognise (a recognised one has its
    /// count looked up, and another count is refused: see [`load::infer_config`]).
    pub fn num_heads(mut self, h: usize) -> ModelBuilder {
        self.num_heads = Some(h);
        self
    }

    /// Resizes the position table with `mode` instead of the family's own interpolation.
    pub fn pos_resize(mut self, mode: PosResize) -> ModelBuilder {
        self.pos_resize = Some(mode);
        self
    }

    /// Seed of the head's re-initialisation, the branches' initialisation and GPS's masks.
    pub fn seed(mut self, seed: u64) -> ModelBuilder {
        self.seed = seed;
        self
    }

    /// Reads the weights, recognises their family and infers the configuration, adapts the weights to it
    /// (position table, head), plans and allocates the model, loads the backbone and initialises what the
    /// method adds. Returns the model and notes saying what was inferred and changed.
    ///
    /// # Errors
    /// As [`load::read_checkpoint`], [`load::infer_config`] (a head count that disagrees with the recognised
    /// size, or none for an unknown size), [`load::adapt_to_config_with`] and [`Model::new`];
    /// `Invalid { option: "classes" }` for a backbone without a head and no [`ModelBuilder::classes`], or 0
    /// classes; `Invalid { option: "model config" }` for an image size that is not a multiple of the patch;
    /// `Invalid { option: "image_size" }` for none given with a checkpoint without a square position table.
    pub fn build(self) -> Result<(Model, Vec<String>)> {
        let weights = match self.source {
            Source::File(path) => load::read_checkpoint(&path)?,
            Source::Weights(w) => w,
        };
        let file = weights.source.display().to_string();
        let family = load::identify(&weights);
        let native = load::native_image_size(&weights);
        let px = match (self.image_size, native) {
            (Some(px), _) | (None, Some(px)) => px,
            (None, None) => {
                return Err(Error::invalid(
                    "image_size",
                    format!("{file} has no square position table to take the image size from: set image_size"),
                ))
            }
        };
        let mut cfg = load::infer_config(&weights, self.num_heads.unwrap_or(0), (px, px))?;
        let head_classes = cfg.num_classes;
        cfg.num_classes = match (self.classes, head_classes) {
            (Some(0), _) => return Err(Error::invalid("classes", "the task needs at least 1 class")),
            (Some(n), _) => n,
            (None, n) if n > 0 => n,
            (None, _) => {
                return Err(Error::invalid(
                    "classes",
                    format!("{file} has no classification head: set the task's class count with classes(n)"),
                ))
            }
        };
        cfg.validate()?;
        let heads = if self.num_heads.is_some() { "given" } else { "looked up: checkpoints do not store it" };
        let mut notes = vec![format!(
            "{file}: {}; {} blocks of width {}, {} heads ({heads}), MLP {}, patch {}{}; {px}x{px} px ({}x{} patches), \
             {} classes",
            family.name,
            cfg.depth,
            cfg.embed_dim,
            cfg.num_heads,
            cfg.mlp_hidden,
            cfg.patch_size,
            if cfg.layer_scale { ", LayerScale" } else { "" },
            cfg.grid().0,
            cfg.grid().1,
            cfg.num_classes
        )];
        let mode = self.pos_resize.unwrap_or(family.pos_resize);
        let (weights, adapted) = load::adapt_to_config_with(weights, &cfg, self.seed, mode)?;
        notes.extend(adapted);
        let backend = match self.target {
            Target::Auto => Backend::new(Device::auto())?,
            Target::Device(d) => Backend::new(d)?,
            Target::Backend(b) => b,
        };
        let model = Model::new(backend, &cfg, self.method, self.batch, self.memory)?;
        model.load_backbone(&weights)?;
        model.init_method(self.seed)?;
        if self.method.has_branches() || matches!(self.method, Method::Gps { .. }) {
            notes.push(format!("{} initialised with seed {}", self.method.name(), self.seed));
        }
        Ok((model, notes))
    }
}
