//! Batches of a dataset: shuffled by `(seed, epoch)`, decoded and transformed in parallel with rayon. Every
//! example's augmentation RNG is derived from `(seed, epoch, dataset index)` only, so batches do not depend
//! on the number of threads. Reads `data` (the sources) through `augment` (the pipelines).
use rayon::prelude::*;

use super::augment::Transform;
use super::data::Dataset;
use crate::error::{Error, Result};
use crate::rng::{example_seed, permutation, SplitMix64};

/// A batch of transformed examples.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// `(b, 3, height, width)` row-major, after the transform.
    pub images: Vec<f32>,
    /// Class of every example.
    pub labels: Vec<i32>,
    /// The dataset index of every example.
    pub indices: Vec<usize>,
    /// Image rows in pixels (the transform's size).
    pub height: usize,
    /// Image columns in pixels (the transform's size).
    pub width: usize,
}

impl Batch {
    /// The number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Batches of a dataset: `Loader::new(dataset, transform, batch, shuffle, seed, drop_last)`;
/// [`Loader::epoch`] yields `Result<Batch>`.
///
/// The epoch's order is `0..len`, or with `shuffle` a permutation drawn from
/// `SplitMix64(example_seed(seed, epoch, u64::MAX))`. Each batch is decoded and transformed in
/// parallel (rayon, on the current pool); example `i` is transformed with
/// `SplitMix64(example_seed(seed, epoch, i))`, so the batches depend on `(seed, epoch)` only, never on
/// the thread count. A failing example ends that batch with the error of the first failing example
/// in batch order.
pub struct Loader<D: Dataset> {
    dataset: D,
    transform: Transform,
    batch: usize,
    shuffle: bool,
    seed: u64,
    drop_last: bool,
}

impl<D: Dataset> Loader<D> {
    /// A loader of `batch`-image batches of `dataset` through `transform`; `shuffle` draws a new order per
    /// epoch from `seed`; `drop_last` drops a final partial batch.
    ///
    /// # Errors
    /// `Invalid { option: "batch size" }` for `batch == 0`.
    pub fn new(
        dataset: D,
        transform: Transform,
        batch: usize,
        shuffle: bool,
        seed: u64,
        drop_last: bool,
    ) -> Result<Self> {
        if batch == 0 {
            return Err(Error::invalid("batch size", "must be at least 1"));
        }
        Ok(Loader { dataset, transform, batch, shuffle, seed, drop_last })
    }

    /// The dataset it reads.
    pub fn dataset(&self) -> &D {
        &self.dataset
    }
    /// The pipeline applied to every example.
    pub fn transform(&self) -> Transform {
        self.transform
    }
    /// Examples per batch (the last one may be smaller unless `drop_last`).
    pub fn batch_size(&self) -> usize {
        self.batch
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch
        } else {
            n.div_ceil(self.batch)
        }
    }

    /// The dataset indices in the order epoch `epoch` visits them.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let n = self.dataset.len();
        if self.shuffle {
            let mut rng = SplitMix64::new(example_seed(self.seed, epoch as u64, u64::MAX));
            permutation(n, &mut rng)
        } else {
            (0..n).collect()
        }
    }

    /// The batches of epoch `epoch`.
    pub fn epoch(&self, epoch: usize) -> Epoch<'_, D> {
        let order = self.order(epoch);
        Epoch { loader: self, order, pos: 0, epoch, left: self.num_batches() }
    }

    /// Decodes and transforms the given dataset indices as epoch `epoch` would.
    ///
    /// # Errors
    /// The first failing example's error in `indices` order: an index out of range, a decoding error naming
    /// the file, an example whose image is not `3 × height × width` values (`Invalid { option: "dataset" }`),
    /// a label that does not fit in i32.
    pub fn make_batch(&self, epoch: usize, indices: &[usize]) -> Result<Batch> {
        let results: Vec<Result<(Vec<f32>, usize)>> = indices
            .par_iter()
            .map(|&i| {
                let ex = self.dataset.get(i)?;
                let mut rng = SplitMix64::new(example_seed(self.seed, epoch as u64, i as u64));
                let img = self.transform.apply(&ex, &mut rng).map_err(|e| match e {
                    Error::Invalid { msg, .. } => Error::invalid("dataset", format!("item {i}: {msg}")),
                    e => e,
                })?;
                Ok((img, ex.label))
            })
            .collect();
        let size = self.transform.size();
        let mut images = Vec::with_capacity(indices.len() * 3 * size * size);
        let mut labels = Vec::with_capacity(indices.len());
        for r in results {
            let (img, label) = r?;
            images.extend_from_slice(&img);
            labels.push(
                i32::try_from(label).map_err(|_| Error::invalid("label", format!("{label} does not fit in i32")))?,
            );
        }
        Ok(Batch { images, labels, indices: indices.to_vec(), height: size, width: size })
    }
}

/// The batches of one epoch (see [`Loader::epoch`]).
pub struct Epoch<'a, D: Dataset> {
    loader: &'a Loader<D>,
    order: Vec<usize>,
    pos: usize,
    epoch: usize,
    left: usize,
}

impl<D: Dataset> Iterator for Epoch<'_, D> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let end = (self.pos + self.loader.batch).min(self.order.len());
        let idx = &self.order[self.pos..end];
        self.pos = end;
        Some(self.loader.make_batch(self.epoch, idx))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<D: Dataset> ExactSizeIterator for Epoch<'_, D> {}
