//! Labelled image sources (the batches of them are `loader.rs`'s).
//!
//! * [`ImageFolder`] — one subfolder per class, JPEG/PNG files inside (torchvision `ImageFolder`).
//! * [`Idx`] — MNIST / Fashion-MNIST IDX files, gzipped or not.
//! * [`Subset`] / [`subset`] — a deterministic (optionally stratified) subset of another dataset.
//!
//! Items are decoded lazily by index; errors name the file at fault.
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::rng::{example_seed, permutation, splitmix64, SplitMix64};

/// One decoded example: an RGB image as f32 in `[0, 1]`, CHW, and its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// `(3, height, width)` row-major values in `[0, 1]`.
    pub image: Vec<f32>,
    /// Rows in pixels.
    pub height: usize,
    /// Columns in pixels.
    pub width: usize,
    /// Class index in `0..num_classes`.
    pub label: usize,
}

/// A labelled image source. Implementors: [`ImageFolder`], [`Idx`], [`Subset`]. Items are decoded
/// lazily by index.
pub trait Dataset: Send + Sync {
    /// Number of items.
    fn len(&self) -> usize;
    /// Whether there are no items.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of classes (labels are `0..num_classes`).
    fn num_classes(&self) -> usize;
    /// Class names in label order.
    fn class_names(&self) -> &[String];
    /// Decodes item `i`.
    ///
    /// # Errors
    /// `Invalid { option: "dataset index" }` for `i >= len()`; decoding errors naming the file.
    fn get(&self, i: usize) -> Result<Example>;
    /// The label of item `i` without decoding the image where the source allows it.
    ///
    /// # Errors
    /// As [`Dataset::get`].
    fn label(&self, i: usize) -> Result<usize> {
        self.get(i).map(|e| e.label)
    }
}

/// References and smart pointers to a dataset are datasets (a loader can borrow or share one).
macro_rules! forward_dataset {
    ($($ptr:ty),*) => {$(
        impl<D: Dataset + ?Sized> Dataset for $ptr {
            fn len(&self) -> usize {
                (**self).len()
            }
            fn num_classes(&self) -> usize {
                (**self).num_classes()
            }
            fn class_names(&self) -> &[String] {
                (**self).class_names()
            }
            fn get(&self, i: usize) -> Result<Example> {
                (**self).get(i)
            }
            fn label(&self, i: usize) -> Result<usize> {
                (**self).label(i)
            }
        }
    )*};
}
forward_dataset!(&D, Arc<D>, Box<D>);

fn out_of_range(i: usize, len: usize) -> Error {
    Error::invalid("dataset index", format!("{i} is out of range for a dataset of {len} items"))
}

// ---------------------------------------------------------------------------------------------
// Image decoding
// ---------------------------------------------------------------------------------------------

fn is_image_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

/// Checks the marker structure of a JPEG stream up to its EOI marker: every segment complete and
/// every entropy-coded scan terminated by a marker. The decoder (zune-jpeg in lenient mode) would
/// silently grey-fill a truncated scan; PIL refuses such files ("image file is truncated").
fn check_jpeg_structure(b: &[u8]) -> std::result::Result<(), String> {
    const TRUNC: &str = "truncated JPEG: the data ends before the end-of-image marker";
    if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return Err("not a JPEG stream (no start-of-image marker)".into());
    }
    let mut pos = 2;
    loop {
        // Find the next marker, skipping stray bytes and fill bytes (as libjpeg does).
        while pos < b.len() && b[pos] != 0xFF {
            pos += 1;
        }
        while pos < b.len() && b[pos] == 0xFF {
            pos += 1;
        }
        if pos >= b.len() {
            return Err(TRUNC.into());
        }
        let marker = b[pos];
        pos += 1;
        match marker {
            0xD9 => return Ok(()),
            0x00 | 0x01 | 0xD0..=0xD8 => continue, // no payload
            _ => {}
        }
        if pos + 2 > b.len() {
            return Err(TRUNC.into());
        }
        let len = u16::from_be_bytes([b[pos], b[pos + 1]]) as usize;
        if len < 2 {
            return Err(format!("corrupt JPEG: marker 0xFF{marker:02X} at byte {} has length {len}", pos - 2));
        }
        if pos + len > b.len() {
            return Err(TRUNC.into());
        }
        pos += len;
        if marker == 0xDA {
            // Entropy-coded data: runs until a marker other than a stuffed 0xFF00 or a restart marker.
            loop {
                if pos + 1 >= b.len() {
                    return Err(TRUNC.into());
                }
                if b[pos] == 0xFF {
                    match b[pos + 1] {
                        0x00 | 0xD0..=0xD7 => pos += 2,
                        0xFF => pos += 1,
                        _ => break,
                    }
                } else {
                    pos += 1;
                }
            }
        }
    }
}

/// The longest image side read (a 16384² RGB image is 3 GiB of f32); the pipelines take it as their bound too.
pub(crate) const MAX_SIDE: usize = 16384;

/// Reads and decodes a JPEG or PNG file to a 3-channel CHW `f32` image in `[0, 1]`: grey is
/// replicated, alpha dropped (as PIL's `convert('RGB')`), 16-bit samples scaled by 1/65535.
/// The format is detected from the content, falling back to the extension. Returns (image, height, width).
///
/// # Errors
/// `Io` (unreadable), `Format` (not JPEG/PNG, truncated or corrupt, empty, a side above 16384 pixels), naming
/// the file.
pub fn decode_image(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    use image::ImageFormat;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let format = match image::guess_format(&bytes).ok() {
        Some(f) => f,
        None => match ImageFormat::from_path(path).ok() {
            Some(f @ (ImageFormat::Jpeg | ImageFormat::Png)) => f,
            _ => return Err(Error::format(path, "not a JPEG or PNG image (unrecognised content)")),
        },
    };
    if format == ImageFormat::Jpeg {
        check_jpeg_structure(&bytes).map_err(|m| Error::format(path, m))?;
    }
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| Error::format(path, format!("cannot decode the {format:?} image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        return Err(Error::format(path, format!("empty {w}x{h} image")));
    }
    if w > MAX_SIDE || h > MAX_SIDE {
        return Err(Error::format(path, format!("{w}x{h} image: sides above {MAX_SIDE} pixels are not supported")));
    }
    let hw = h * w;
    let mut chw = vec![0.0f32; 3 * hw];
    let mut put = |p: usize, px: [f32; 3]| {
        chw[p] = px[0];
        chw[hw + p] = px[1];
        chw[2 * hw + p] = px[2];
    };
    // 8-bit samples become v / 255 exactly (as torchvision's ToTensor), wider ones v / 65535.
    if img.color().bytes_per_pixel() / img.color().channel_count() <= 1 {
        for (p, px) in img.to_rgb8().as_raw().chunks_exact(3).enumerate() {
            put(p, [px[0] as f32 / 255.0, px[1] as f32 / 255.0, px[2] as f32 / 255.0]);
        }
    } else {
        for (p, px) in img.to_rgb16().as_raw().chunks_exact(3).enumerate() {
            put(p, [px[0] as f32 / 65535.0, px[1] as f32 / 65535.0, px[2] as f32 / 65535.0]);
        }
    }
    Ok((chw, h, w))
}

// ---------------------------------------------------------------------------------------------
// ImageFolder
// ---------------------------------------------------------------------------------------------

/// A folder with one subfolder per class (sorted by name = label order), JPEG/PNG files inside
/// (`.jpg`, `.jpeg`, `.png`, case-insensitive; other files ignored; subfolders of a class folder are
/// searched too, in sorted order, as torchvision does). Names starting with `.` (hidden files and
/// folders, e.g. macOS `._x.jpg`) are skipped. Files in the root itself are ignored.
///
/// Errors at [`ImageFolder::open`]: a missing or unreadable folder (`Error::Io`), no class folders,
/// a class folder without any image (`Error::Format` naming it). A corrupt or truncated image is an
/// `Error::Format` naming the file, raised when that image is decoded by [`Dataset::get`].
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, usize)>,
}

const MAX_DEPTH: usize = 32;

fn sorted_entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_dir = path.is_dir(); // follows symlinks
        out.push((name, path, is_dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn collect_images(dir: &Path, label: usize, depth: usize, out: &mut Vec<(PathBuf, usize)>) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::format(dir, format!("folders nested more than {MAX_DEPTH} deep (a symlink loop?)")));
    }
    for (_, path, is_dir) in sorted_entries(dir)? {
        if is_dir {
            collect_images(&path, label, depth + 1, out)?;
        } else if is_image_file(&path) {
            out.push((path, label));
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Indexes `root/<class>/...` (reads the folder listing only, no image).
    ///
    /// # Errors
    /// `Io` (missing or unreadable folder), `Format` (not a folder, no class folders, a class folder without
    /// images, folders nested too deep), naming the path.
    pub fn open(root: &Path) -> Result<ImageFolder> {
        let meta = std::fs::metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() {
            return Err(Error::format(root, "is not a folder (expected one subfolder per class)"));
        }
        let mut classes = Vec::new();
        let mut samples = Vec::new();
        for (name, path, is_dir) in sorted_entries(root)? {
            if !is_dir {
                continue;
            }
            let label = classes.len();
            let before = samples.len();
            collect_images(&path, label, 1, &mut samples)?;
            if samples.len() == before {
                return Err(Error::format(
                    &path,
                    format!("class folder '{name}' holds no JPEG or PNG images (.jpg, .jpeg, .png)"),
                ));
            }
            classes.push(name);
        }
        if classes.is_empty() {
            return Err(Error::format(root, "no class folders (expected one subfolder per class)"));
        }
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples })
    }

    /// With `split`: `root/<split>/<class>/...`, e.g. "train"/"test".
    ///
    /// # Errors
    /// As [`ImageFolder::open`] for `root/<split>`.
    pub fn open_split(root: &Path, split: &str) -> Result<ImageFolder> {
        ImageFolder::open(&root.join(split))
    }

    /// The folder holding the class folders.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `(file, label)` for every item, in index order (class by class, files sorted by path).
    pub fn samples(&self) -> &[(PathBuf, usize)] {
        &self.samples
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
    fn get(&self, i: usize) -> Result<Example> {
        let (path, label) = self.samples.get(i).ok_or_else(|| out_of_range(i, self.samples.len()))?;
        let (image, height, width) = decode_image(path)?;
        Ok(Example { image, height, width, label: *label })
    }
    fn label(&self, i: usize) -> Result<usize> {
        self.samples.get(i).map(|s| s.1).ok_or_else(|| out_of_range(i, self.samples.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// IDX (MNIST / Fashion-MNIST)
// ---------------------------------------------------------------------------------------------

/// Fashion-MNIST's class names, in label order (for [`Idx::with_class_names`]).
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;

/// Reads a whole file, gunzipping it when it starts with the gzip magic `1f 8b`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1F && raw[1] == 0x8B {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::format(path, format!("truncated or corrupt gzip stream: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX header: checks the magic and returns (dims, payload offset). `what` names the file kind.
fn idx_header(path: &Path, b: &[u8], magic: u32, ndim: usize, what: &str) -> Result<(Vec<usize>, usize)> {
    let head = 4 + 4 * ndim;
    if b.len() < 4 {
        return Err(Error::format(path, format!("truncated IDX {what} file: {} bytes, no header", b.len())));
    }
    let got = be_u32(b, 0);
    if got != magic {
        return Err(Error::format(
            path,
            format!(
                "bad IDX magic 0x{got:08X}, expected 0x{magic:08X} (IDX {what}: unsigned bytes, {ndim} dimension(s))"
            ),
        ));
    }
    if b.len() < head {
        return Err(Error::format(
            path,
            format!("truncated IDX {what} file: header needs {head} bytes, file has {}", b.len()),
        ));
    }
    let dims = (0..ndim).map(|d| be_u32(b, 4 + 4 * d) as usize).collect();
    Ok((dims, head))
}

fn check_payload(path: &Path, b: &[u8], head: usize, want: u64, what: &str) -> Result<()> {
    let have = (b.len() - head) as u64;
    if have < want {
        return Err(Error::format(
            path,
            format!("truncated IDX {what} file: the header promises {want} data bytes but only {have} follow"),
        ));
    }
    if have > want {
        return Err(Error::format(
            path,
            format!("IDX {what} file has {} unexpected trailing bytes after the {want} data bytes", have - want),
        ));
    }
    Ok(())
}

/// IDX files (MNIST/Fashion-MNIST format; gzipped or not, detected by the gzip magic): images u8
/// (N, H, W) magic 0x00000803, labels u8 (N) magic 0x00000801. Both files are read into memory and
/// validated at [`Idx::open`]: magic, non-zero image dimensions, exact file length (truncated or with
/// trailing bytes -> an error naming the file), equal counts, and every label < `num_classes` (else an
/// error naming the file, the index and the value). Grey images are replicated to 3 channels.
#[derive(Clone, Debug)]
pub struct Idx {
    images: Vec<u8>,
    labels: Vec<u8>,
    n: usize,
    height: usize,
    width: usize,
    classes: Vec<String>,
}

impl Idx {
    /// Reads and validates an images file and a labels file (see the type's documentation).
    ///
    /// # Errors
    /// `Invalid { option: "num_classes" }` for 0 classes; `Io` (unreadable); `Format` naming the file (bad
    /// magic, truncated or trailing data, zero image size, mismatched counts, a label `>= num_classes`).
    pub fn open(images: &Path, labels: &Path, num_classes: usize) -> Result<Idx> {
        if num_classes == 0 {
            return Err(Error::invalid("num_classes", "an IDX dataset needs at least one class"));
        }
        let ib = read_maybe_gz(images)?;
        let (dims, ihead) = idx_header(images, &ib, IDX_IMAGES_MAGIC, 3, "images")?;
        let (n, height, width) = (dims[0], dims[1], dims[2]);
        if height == 0 || width == 0 {
            return Err(Error::format(images, format!("IDX images of size {height}x{width}")));
        }
        let want = (n as u64).checked_mul(height as u64).and_then(|v| v.checked_mul(width as u64));
        let want =
            want.ok_or_else(|| Error::format(images, format!("impossible IDX dimensions {n}x{height}x{width}")))?;
        check_payload(images, &ib, ihead, want, "images")?;

        let lb = read_maybe_gz(labels)?;
        let (ldims, lhead) = idx_header(labels, &lb, IDX_LABELS_MAGIC, 1, "labels")?;
        check_payload(labels, &lb, lhead, ldims[0] as u64, "labels")?;
        if ldims[0] != n {
            return Err(Error::format(
                labels,
                format!("holds {} labels but {} holds {n} images", ldims[0], images.display()),
            ));
        }
        let label_bytes = lb[lhead..].to_vec();
        if let Some((i, &v)) = label_bytes.iter().enumerate().find(|(_, &v)| v as usize >= num_classes) {
            return Err(Error::format(
                labels,
                format!("label {v} at index {i} is out of range for {num_classes} classes"),
            ));
        }
        let image_bytes = ib[ihead..].to_vec();
        Ok(Idx {
            images: image_bytes,
            labels: label_bytes,
            n,
            height,
            width,
            classes: (0..num_classes).map(|c| c.to_string()).collect(),
        })
    }

    /// Fashion-MNIST / MNIST standard names in a folder: `train-images-idx3-ubyte(.gz)`,
    /// `train-labels-idx1-ubyte(.gz)`, `t10k-images-idx3-ubyte(.gz)`, `t10k-labels-idx1-ubyte(.gz)`
    /// (the variant `train-images.idx3-ubyte` is accepted too). 10 classes, named "0".."9".
    ///
    /// # Errors
    /// `Io` naming the missing file; otherwise as [`Idx::open`].
    pub fn open_standard(dir: &Path, train: bool) -> Result<Idx> {
        let prefix = if train { "train" } else { "t10k" };
        let find = |kind: &str, idx: &str| -> Result<PathBuf> {
            let names = [
                format!("{prefix}-{kind}-{idx}-ubyte"),
                format!("{prefix}-{kind}-{idx}-ubyte.gz"),
                format!("{prefix}-{kind}.{idx}-ubyte"),
                format!("{prefix}-{kind}.{idx}-ubyte.gz"),
            ];
            names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| {
                Error::io(
                    dir.join(&names[0]),
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("neither {0} nor {0}.gz exists", names[0]),
                    ),
                )
            })
        };
        let images = find("images", "idx3")?;
        let labels = find("labels", "idx1")?;
        Idx::open(&images, &labels, 10)
    }

    /// Replaces the default class names ("0", "1", ...).
    ///
    /// # Errors
    /// `Invalid { option: "class names" }` unless `names.len()` equals the number of classes given at `open`.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self> {
        if names.len() != self.classes.len() {
            return Err(Error::invalid(
                "class names",
                format!("{} names for an IDX dataset of {} classes", names.len(), self.classes.len()),
            ));
        }
        self.classes = names;
        Ok(self)
    }

    /// Image height and width.
    pub fn image_size(&self) -> (usize, usize) {
        (self.height, self.width)
    }
}

impl Dataset for Idx {
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        self.classes.len()
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
    fn get(&self, i: usize) -> Result<Example> {
        if i >= self.n {
            return Err(out_of_range(i, self.n));
        }
        let hw = self.height * self.width;
        let plane: Vec<f32> = self.images[i * hw..(i + 1) * hw].iter().map(|&v| v as f32 / 255.0).collect();
        let mut image = Vec::with_capacity(3 * hw);
        for _ in 0..3 {
            image.extend_from_slice(&plane);
        }
        Ok(Example { image, height: self.height, width: self.width, label: self.labels[i] as usize })
    }
    fn label(&self, i: usize) -> Result<usize> {
        self.labels.get(i).map(|&v| v as usize).ok_or_else(|| out_of_range(i, self.n))
    }
}

// ---------------------------------------------------------------------------------------------
// Subset
// ---------------------------------------------------------------------------------------------

/// A deterministic subset of another dataset; see [`subset`]. Item `i` is item `indices()[i]` of
/// the inner dataset (indices ascending).
#[derive(Clone, Debug)]
pub struct Subset<D> {
    inner: D,
    indices: Vec<usize>,
}

impl<D> Subset<D> {
    /// The inner dataset's index of every item, ascending.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }
    /// The dataset it draws from.
    pub fn inner(&self) -> &D {
        &self.inner
    }
    /// Gives the inner dataset back.
    pub fn into_inner(self) -> D {
        self.inner
    }
}

/// A deterministic subset of `n` items of `d` (all of them if `n >= d.len()`), fixed by `seed`:
///
/// * `stratified == false`: the first `n` of a seeded permutation of `0..len`.
/// * `stratified == true`: class `c`, holding `n_c` of the `len` items, contributes `floor(n·n_c/len)`
///   items plus one for the classes with the largest remainders `n·n_c mod len` (ties: lower class first)
///   until `n` are taken — so every class count is within one of its proportional share; within a class
///   the items are the first of a seeded permutation of that class's items. Labels are read with
///   [`Dataset::label`] (no decoding for ImageFolder/Idx); an item whose label cannot be read forms a
///   stratum of its own (its error surfaces when it is decoded).
///
/// The chosen indices are sorted ascending.
pub fn subset<D: Dataset>(d: D, n: usize, seed: u64, stratified: bool) -> Subset<D> {
    let len = d.len();
    let mut indices: Vec<usize> = if n >= len {
        (0..len).collect()
    } else if !stratified {
        let mut rng = SplitMix64::new(splitmix64(seed));
        let mut p = permutation(len, &mut rng);
        p.truncate(n);
        p
    } else {
        let mut strata: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for i in 0..len {
            strata.entry(d.label(i).unwrap_or(usize::MAX)).or_default().push(i);
        }
        let mut quota: Vec<(usize, usize, usize)> = Vec::new(); // (class, floor share, remainder)
        for (&c, items) in &strata {
            let num = n as u128 * items.len() as u128;
            quota.push((c, (num / len as u128) as usize, (num % len as u128) as usize));
        }
        let taken: usize = quota.iter().map(|q| q.1).sum();
        let mut by_rem: Vec<usize> = (0..quota.len()).collect();
        by_rem.sort_by(|&a, &b| quota[b].2.cmp(&quota[a].2).then(quota[a].0.cmp(&quota[b].0)));
        for &k in by_rem.iter().take(n - taken) {
            quota[k].1 += 1;
        }
        let mut out = Vec::with_capacity(n);
        for (c, k, _) in quota {
            let items = &strata[&c];
            let mut rng = SplitMix64::new(example_seed(seed, 0x5354_5241_5441, c as u64));
            let p = permutation(items.len(), &mut rng);
            out.extend(p.into_iter().take(k).map(|j| items[j]));
        }
        out
    };
    indices.sort_unstable();
    Subset { inner: d, indices }
}

impl<D: Dataset> Dataset for Subset<D> {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }
    fn class_names(&self) -> &[String] {
        self.inner.class_names()
    }
    fn get(&self, i: usize) -> Result<Example> {
        let j = *self.indices.get(i).ok_or_else(|| out_of_range(i, self.indices.len()))?;
        self.inner.get(j)
    }
    fn label(&self, i: usize) -> Result<usize> {
        let j = *self.indices.get(i).ok_or_else(|| out_of_range(i, self.indices.len()))?;
        self.inner.label(j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jpeg_structure() {
        // SOI, APP0 (len 4), SOS (len 3 + 1 byte), entropy data with stuffing and RST, EOI.
        let good = [
            0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x04, 1, 2, 0xFF, 0xDA, 0x00, 0x03, 7, 0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD0,
            0x56, 0xFF, 0xD9,
        ];
        assert!(check_jpeg_structure(&good).is_ok());
        for cut in 2..good.len() - 1 {
            assert!(check_jpeg_structure(&good[..cut]).is_err(), "cut at {cut}");
        }
        assert!(check_jpeg_structure(b"GIF89a").is_err());
        // Trailing junk after EOI is fine.
        let mut junk = good.to_vec();
        junk.extend_from_slice(&[0, 1, 2]);
        assert!(check_jpeg_structure(&junk).is_ok());
    }
}
