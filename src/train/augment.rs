//! The paper's image pipelines (method.md §16), each a [`Transform`] applied to an [`Example`] with an RNG.
//!
//! * [`Transform::TrainFgvc`] — FGVC training (timm `create_transform(224, is_training=True,
//!   interpolation='bicubic', hflip=0.5, scale=(0.08,1), ratio=(3/4,4/3))`): RandomResizedCrop (bicubic),
//!   horizontal flip with p = 0.5, ColorJitter(0.4, 0.4, 0.4), ImageNet normalisation.
//! * [`Transform::DirectResize`] — VTAB (`--no_aug --direct_resize`), train and test:
//!   Resize((size, size), bicubic) (+ CenterCrop(size), an identity here) + ImageNet normalisation.
//! * [`Transform::EvalCenterCrop`] — FGVC evaluation: Resize(shorter side to size·256/224, bilinear)
//!   + CenterCrop(size) + ImageNet normalisation.
//!
//! Every output is a `(3, size, size)` CHW `Vec<f32>`.
//!
//! ## Differences from torchvision-on-PIL
//! torchvision applies these steps to 8-bit PIL images; here they run on `f32` images in `[0, 1]`.
//! The arithmetic is the same but nothing is quantised to 8 bits between steps. Where PIL's 8-bit
//! bicubic would clip its overshoot to `[0, 255]`, the pipelines here clamp the bicubic output to
//! `[0, 1]` (the bare resampler does not clamp). ColorJitter follows torchvision's *tensor* formulas
//! (contrast blends with the float mean of the greyscale image; PIL rounds that mean to an integer).
use rand::Rng;

use super::data::Example;
use crate::error::{Error, Result};

/// ImageNet channel means (timm `IMAGENET_DEFAULT_MEAN`), used by every pipeline.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (timm `IMAGENET_DEFAULT_STD`).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// RandomResizedCrop scale range (fraction of the image area), as in method.md §16.
pub(crate) const RRC_SCALE: (f64, f64) = (0.08, 1.0);
/// RandomResizedCrop aspect-ratio range (width / height), as in method.md §16.
pub(crate) const RRC_RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
/// ColorJitter strengths (brightness, contrast, saturation), as in method.md §16; hue is not jittered.
pub(crate) const JITTER: [f32; 3] = [0.4, 0.4, 0.4];

/// Resampling filter of [`resize`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Filter {
    /// Triangle filter, support 1 (PIL `BILINEAR`).
    Bilinear,
    /// Keys cubic with a = -0.5, support 2 (PIL `BICUBIC`).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => {
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Per-output-sample taps along one axis: input start index, tap count and normalised weights.
struct Taps {
    start: Vec<usize>,
    count: Vec<usize>,
    /// `out_size * ksize` weights, row `o` holding the `count[o]` taps of output `o`.
    weights: Vec<f32>,
    ksize: usize,
}

/// PIL's `precompute_coeffs` (Resample.c) for a full-extent box: output sample `o` is centred at
/// input coordinate `(o + 0.5) * in/out` (pixel centres aligned, so corners map onto corners); when
/// downscaling the kernel is stretched by `in/out` (antialiasing); taps falling outside the image
/// are dropped and the remaining weights renormalised to sum to 1.
fn taps(in_size: usize, out_size: usize, filter: Filter) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut t = Taps {
        start: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        weights: vec![0.0; out_size * ksize],
        ksize,
    };
    let ss = 1.0 / filterscale;
    let mut ws = vec![0.0f64; ksize];
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5).floor().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).floor() as usize).min(in_size);
        let n = xmax.saturating_sub(xmin).min(ksize);
        let row = &mut t.weights[o * ksize..o * ksize + n];
        let mut sum = 0.0f64;
        let ws = &mut ws[..n];
        for (k, w) in ws.iter_mut().enumerate() {
            *w = filter.eval(((xmin + k) as f64 - center + 0.5) * ss);
            sum += *w;
        }
        for (dst, &w) in row.iter_mut().zip(ws.iter()) {
            *dst = if sum != 0.0 { (w / sum) as f32 } else { 0.0 };
        }
        t.start.push(xmin);
        t.count.push(n);
    }
    t
}

/// Resizes a CHW image `img` of `c` channels and size `h`×`w` to `nh`×`nw`.
///
/// What is implemented is PIL's `Image.resize` resampling (`Resample.c`) on float data: separable,
/// horizontal pass then vertical pass; pixel-centre alignment (output pixel `o` samples input coordinate
/// `(o + 0.5)·in/out − 0.5` in index space); the filter is [`Filter::Bicubic`] (a = −0.5, PIL's) or
/// [`Filter::Bilinear`] (triangle); when downscaling by a factor `s > 1` the kernel support is widened
/// by `s` (antialiasing, PIL's "support scaling"); taps outside the image are dropped and the weights
/// renormalised (edge behaviour as PIL). An axis whose size does not change is copied unfiltered (as
/// PIL skips that pass). The result is not clamped: bicubic may overshoot `[0, 1]` slightly.
///
/// Panics if `img.len() != c*h*w`, or if the input is empty but the output is not.
#[allow(clippy::too_many_arguments)] // the signature mirrors PIL: image, its shape, the new shape, the filter
pub(crate) fn resize(img: &[f32], c: usize, h: usize, w: usize, nh: usize, nw: usize, filter: Filter) -> Vec<f32> {
    assert_eq!(img.len(), c * h * w, "resize: image buffer length does not match {c}x{h}x{w}");
    if c * nh * nw == 0 {
        return Vec::new();
    }
    assert!(h > 0 && w > 0, "resize: cannot resize an empty {h}x{w} image to {nh}x{nw}");
    // Horizontal pass: (c, h, w) -> (c, h, nw).
    let horiz: Vec<f32> = if nw == w {
        img.to_vec()
    } else {
        let t = taps(w, nw, filter);
        let mut out = vec![0.0f32; c * h * nw];
        for (src, dst) in img.chunks_exact(w).zip(out.chunks_exact_mut(nw)) {
            for (o, d) in dst.iter_mut().enumerate() {
                let (s, n) = (t.start[o], t.count[o]);
                let wts = &t.weights[o * t.ksize..o * t.ksize + n];
                *d = src[s..s + n].iter().zip(wts).map(|(a, b)| a * b).sum();
            }
        }
        out
    };
    if nh == h {
        return horiz;
    }
    // Vertical pass: (c, h, nw) -> (c, nh, nw), row-wise accumulation.
    let t = taps(h, nh, filter);
    let mut out = vec![0.0f32; c * nh * nw];
    for (src, dst) in horiz.chunks_exact(h * nw).zip(out.chunks_exact_mut(nh * nw)) {
        for (o, drow) in dst.chunks_exact_mut(nw).enumerate() {
            let (s, n) = (t.start[o], t.count[o]);
            for k in 0..n {
                let wt = t.weights[o * t.ksize + k];
                let srow = &src[(s + k) * nw..(s + k + 1) * nw];
                for (d, &v) in drow.iter_mut().zip(srow) {
                    *d += wt * v;
                }
            }
        }
    }
    out
}

/// A crop window in pixels: rows `top..top+height`, columns `left..left+width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Crop {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

/// torchvision's `RandomResizedCrop.get_params` for an image of `height`×`width`: up to 10 tries of
/// target area `U(scale)·H·W` and aspect ratio `exp(U(log ratio))`, `w = round(sqrt(area·ratio))`,
/// `h = round(sqrt(area/ratio))` (Python's round-half-even), accepted when `0 < w ≤ W` and `0 < h ≤ H`,
/// with the offset uniform over all positions; otherwise the central-crop fallback (the whole image
/// clipped to the ratio range).
pub(crate) fn random_resized_crop_params(
    height: usize,
    width: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> Crop {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.gen_range(scale.0..=scale.1);
        let aspect = rng.gen_range(lr0..=lr1).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= width as f64 && h > 0.0 && h <= height as f64 {
            let (h, w) = (h as usize, w as usize);
            let top = rng.gen_range(0..=height - h);
            let left = rng.gen_range(0..=width - w);
            return Crop { top, left, height: h, width: w };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (min_r, max_r) = (ratio.0.min(ratio.1), ratio.0.max(ratio.1));
    let (h, w) = if in_ratio < min_r {
        (((width as f64) / min_r).round_ties_even() as usize, width)
    } else if in_ratio > max_r {
        (height, ((height as f64) * max_r).round_ties_even() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    Crop { top: (height - h) / 2, left: (width - w) / 2, height: h, width: w }
}

/// Copies the window `crop` out of a CHW image.
pub(crate) fn crop(img: &[f32], c: usize, h: usize, w: usize, crop: Crop) -> Vec<f32> {
    assert_eq!(img.len(), c * h * w, "crop: image buffer length does not match {c}x{h}x{w}");
    assert!(
        crop.top + crop.height <= h && crop.left + crop.width <= w,
        "crop: window {crop:?} outside a {h}x{w} image"
    );
    let mut out = Vec::with_capacity(c * crop.height * crop.width);
    for ch in img.chunks_exact(h * w) {
        for y in crop.top..crop.top + crop.height {
            out.extend_from_slice(&ch[y * w + crop.left..y * w + crop.left + crop.width]);
        }
    }
    out
}

/// Mirrors a CHW image left-right in place.
pub(crate) fn hflip(img: &mut [f32], w: usize) {
    if w == 0 {
        return;
    }
    for row in img.chunks_exact_mut(w) {
        row.reverse();
    }
}

/// ITU-R 601-2 luma of a 3-channel CHW image: `0.299 R + 0.587 G + 0.114 B`, one plane.
pub(crate) fn grayscale(img: &[f32]) -> Vec<f32> {
    let hw = img.len() / 3;
    let (r, rest) = img.split_at(hw);
    let (g, b) = rest.split_at(hw);
    r.iter().zip(g).zip(b).map(|((&r, &g), &b)| 0.299 * r + 0.587 * g + 0.114 * b).collect()
}

/// torchvision's `ColorJitter(brightness, contrast, saturation)` (no hue) on a 3-channel CHW image in
/// `[0, 1]`: a random order of the adjustments (sampled first, as `torch.randperm`), then one factor
/// per adjustment uniform in `[max(0, 1 − s), 1 + s]` (in the order brightness, contrast, saturation;
/// an adjustment with strength 0 is skipped and draws nothing). Brightness multiplies; contrast blends
/// with the mean of the greyscale image; saturation blends with the greyscale image; the image is
/// clamped to `[0, 1]` after each.
pub(crate) fn color_jitter(img: &mut [f32], strength: [f32; 3], rng: &mut impl Rng) {
    assert_eq!(img.len() % 3, 0, "color_jitter: not a 3-channel image");
    let mut order = [0usize, 1, 2];
    for i in (1..3).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    let mut factor = [None; 3];
    for (f, &s) in factor.iter_mut().zip(&strength) {
        if s > 0.0 {
            let lo = (1.0 - s).max(0.0);
            *f = Some(rng.gen_range(lo..=1.0 + s));
        }
    }
    let hw = img.len() / 3;
    for &op in &order {
        let Some(f) = factor[op] else { continue };
        match op {
            0 => img.iter_mut().for_each(|v| *v = (*v * f).clamp(0.0, 1.0)),
            1 => {
                let mean = grayscale(img).iter().map(|&v| v as f64).sum::<f64>() / hw.max(1) as f64;
                let m = (1.0 - f) * mean as f32;
                img.iter_mut().for_each(|v| *v = (f * *v + m).clamp(0.0, 1.0));
            }
            _ => {
                let grey = grayscale(img);
                for ch in img.chunks_exact_mut(hw) {
                    for (v, &g) in ch.iter_mut().zip(&grey) {
                        *v = (f * *v + (1.0 - f) * g).clamp(0.0, 1.0);
                    }
                }
            }
        }
    }
}

/// `(x − mean) / std` per channel with the ImageNet statistics, in place (3-channel CHW).
pub(crate) fn normalize(img: &mut [f32]) {
    let hw = img.len() / 3;
    if hw == 0 {
        return;
    }
    for (ch, (&m, &s)) in img.chunks_exact_mut(hw).zip(IMAGENET_MEAN.iter().zip(&IMAGENET_STD)) {
        let inv = 1.0 / s;
        ch.iter_mut().for_each(|v| *v = (*v - m) * inv);
    }
}

/// The largest side of an image a pipeline reads or produces (a 16384² RGB image is 3 GiB of f32).
pub(crate) const MAX_SIZE: usize = super::data::MAX_SIDE;

fn check_size(size: usize) -> Result<()> {
    if size == 0 || size > MAX_SIZE {
        return Err(Error::invalid("transform size", format!("{size} is not in 1..={MAX_SIZE} pixels")));
    }
    Ok(())
}

fn clamp01(img: &mut [f32]) {
    img.iter_mut().for_each(|v| *v = v.clamp(0.0, 1.0));
}

/// One of the paper's image pipelines. Every variant yields a normalised `(3, size, size)` image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// FGVC training: RandomResizedCrop(size, scale=(0.08,1), ratio=(3/4,4/3), bicubic) + horizontal
    /// flip p=0.5 + ColorJitter(brightness 0.4, contrast 0.4, saturation 0.4) + ImageNet normalisation.
    /// RNG draws, in order: the crop parameters, the flip, the jitter order and factors.
    TrainFgvc {
        /// Side of the square output in pixels.
        size: usize,
    },
    /// VTAB: Resize((size,size), bicubic) + ImageNet normalisation (train and test). Draws nothing.
    DirectResize {
        /// Side of the square output in pixels.
        size: usize,
    },
    /// Evaluation: Resize(shorter side to size*256/224, bilinear) + CenterCrop(size) + normalisation.
    /// Draws nothing.
    EvalCenterCrop {
        /// Side of the square output in pixels.
        size: usize,
    },
}

impl Transform {
    /// The side of the square output.
    pub fn size(&self) -> usize {
        match *self {
            Transform::TrainFgvc { size } | Transform::DirectResize { size } | Transform::EvalCenterCrop { size } => {
                size
            }
        }
    }

    /// The canonical name accepted by [`Transform::parse`].
    pub fn name(&self) -> &'static str {
        match self {
            Transform::TrainFgvc { .. } => "train-fgvc",
            Transform::DirectResize { .. } => "direct-resize",
            Transform::EvalCenterCrop { .. } => "eval-center-crop",
        }
    }

    /// Parses a pipeline name (case-insensitive, `-` or `_`): `train-fgvc` (alias `fgvc`),
    /// `direct-resize` (alias `vtab`), `eval-center-crop` (aliases `center-crop`, `eval`), with a square
    /// output of `size` pixels.
    ///
    /// # Errors
    /// `Invalid { option: "transform size" }` for a size of 0 or above 16384, `Invalid { option: "transform" }`
    /// for an unknown name.
    pub fn parse(s: &str, size: usize) -> Result<Transform> {
        check_size(size)?;
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        match key.as_str() {
            "train-fgvc" | "fgvc" => Ok(Transform::TrainFgvc { size }),
            "direct-resize" | "vtab" => Ok(Transform::DirectResize { size }),
            "eval-center-crop" | "center-crop" | "eval" => Ok(Transform::EvalCenterCrop { size }),
            _ => Err(Error::invalid(
                "transform",
                format!("unknown pipeline '{s}' (expected train-fgvc, direct-resize or eval-center-crop)"),
            )),
        }
    }

    /// Applies the pipeline to `ex` (3-channel CHW in `[0, 1]`); returns `(3, size, size)` normalised values.
    ///
    /// # Errors
    /// `Invalid { option: "image" }` when `ex.image` is not `3 × height × width` values, is empty, has a side
    /// above 16384 pixels, or (evaluation crop) is so elongated that the resized image would; `Invalid {
    /// option: "transform size" }` for a size of 0 or above 16384.
    pub fn apply(&self, ex: &Example, rng: &mut impl Rng) -> Result<Vec<f32>> {
        let (h, w) = (ex.height, ex.width);
        if h == 0 || w == 0 || h.checked_mul(w).and_then(|n| n.checked_mul(3)) != Some(ex.image.len()) {
            return Err(Error::invalid(
                "image",
                format!("{} values do not form a non-empty 3x{h}x{w} image", ex.image.len()),
            ));
        }
        if h > MAX_SIZE || w > MAX_SIZE {
            return Err(Error::invalid(
                "image",
                format!("a {h}x{w} image: sides above {MAX_SIZE} pixels are not supported"),
            ));
        }
        check_size(self.size())?;
        let mut out = match *self {
            Transform::TrainFgvc { size } => {
                let c = random_resized_crop_params(h, w, RRC_SCALE, RRC_RATIO, rng);
                let cropped = crop(&ex.image, 3, h, w, c);
                let mut img = resize(&cropped, 3, c.height, c.width, size, size, Filter::Bicubic);
                clamp01(&mut img);
                if rng.gen::<f64>() < 0.5 {
                    hflip(&mut img, size);
                }
                color_jitter(&mut img, JITTER, rng);
                img
            }
            Transform::DirectResize { size } => {
                let mut img = resize(&ex.image, 3, h, w, size, size, Filter::Bicubic);
                clamp01(&mut img);
                img
            }
            Transform::EvalCenterCrop { size } => {
                let short = size * 256 / 224;
                let (nh, nw) = if w <= h { (short * h / w, short) } else { (short, short * w / h) };
                // A thin image would resize to a huge one (a 1x16384 image at 224 px: 256x4194304x3 values).
                if nh.max(nw) > MAX_SIZE {
                    return Err(Error::invalid(
                        "image",
                        format!(
                            "a {h}x{w} image is too elongated for the evaluation crop: resizing its shorter side to \
                             {short} makes the longer {} pixels (at most {MAX_SIZE})",
                            nh.max(nw)
                        ),
                    ));
                }
                let img = resize(&ex.image, 3, h, w, nh, nw, Filter::Bilinear);
                let top = ((nh - size) as f64 / 2.0).round_ties_even() as usize;
                let left = ((nw - size) as f64 / 2.0).round_ties_even() as usize;
                crop(&img, 3, nh, nw, Crop { top, left, height: size, width: size })
            }
        };
        normalize(&mut out);
        Ok(out)
    }
}

impl std::fmt::Display for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name(), self.size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use rand::SeedableRng;

    fn ex(h: usize, w: usize, f: impl Fn(usize, usize, usize) -> f32) -> Example {
        let mut image = Vec::with_capacity(3 * h * w);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    image.push(f(c, y, x));
                }
            }
        }
        Example { image, height: h, width: w, label: 0 }
    }

    #[test]
    fn output_shapes() {
        let e = ex(37, 53, |c, y, x| ((c + y + x) % 7) as f32 / 7.0);
        let mut rng = SplitMix64::seed_from_u64(1);
        for t in [
            Transform::TrainFgvc { size: 24 },
            Transform::DirectResize { size: 24 },
            Transform::EvalCenterCrop { size: 24 },
        ] {
            assert_eq!(t.apply(&e, &mut rng).unwrap().len(), 3 * 24 * 24, "{t}");
        }
        // Tiny inputs upscale.
        let e = ex(3, 2, |_, _, _| 0.5);
        for t in [
            Transform::TrainFgvc { size: 16 },
            Transform::DirectResize { size: 16 },
            Transform::EvalCenterCrop { size: 16 },
        ] {
            assert_eq!(t.apply(&e, &mut rng).unwrap().len(), 3 * 16 * 16, "{t}");
        }
    }

    #[test]
    fn direct_resize_constant_stays_constant() {
        let vals = [0.2f32, 0.7, 0.9];
        let e = ex(41, 29, |c, _, _| vals[c]);
        let out = Transform::DirectResize { size: 16 }.apply(&e, &mut SplitMix64::seed_from_u64(0)).unwrap();
        for c in 0..3 {
            let want = (vals[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            for &v in &out[c * 256..(c + 1) * 256] {
                assert!((v - want).abs() < 1e-5, "channel {c}: {v} vs {want}");
            }
        }
        // Also when upscaling, and for the eval pipeline.
        let e = ex(5, 7, |c, _, _| vals[c]);
        for t in [Transform::DirectResize { size: 19 }, Transform::EvalCenterCrop { size: 19 }] {
            let out = t.apply(&e, &mut SplitMix64::seed_from_u64(0)).unwrap();
            for c in 0..3 {
                let want = (vals[c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                assert!(out[c * 361..(c + 1) * 361].iter().all(|v| (v - want).abs() < 1e-5), "{t}");
            }
        }
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn resize_ramp_is_ramp() {
        // Value = x-coordinate of the pixel centre in [0,1]; resampling must keep it a ramp in the interior.
        for (w, nw) in [(64usize, 16usize), (16, 64), (50, 37), (37, 50)] {
            let h = 3;
            let img: Vec<f32> = (0..h * w).map(|i| ((i % w) as f32 + 0.5) / w as f32).collect();
            for filter in [Filter::Bilinear, Filter::Bicubic] {
                let out = resize(&img, 1, h, w, h, nw, filter);
                let margin = (2.0 * (w as f64 / nw as f64).max(1.0) * nw as f64 / w as f64).ceil() as usize + 1;
                for x in margin..nw - margin {
                    let want = (x as f32 + 0.5) / nw as f32;
                    // Exact for integer factors; within 10% of an input pixel otherwise (the sampled
                    // kernel's first moment is not exactly zero for fractional scales, as in PIL).
                    let tol = if w % nw == 0 || nw % w == 0 { 1e-4 } else { 0.1 / w as f32 };
                    assert!((out[x] - want).abs() < tol, "{w}->{nw} {filter:?} x={x}: {} vs {want}", out[x]);
                }
                // Monotone everywhere for the ramp (bilinear); range preserved.
                if filter == Filter::Bilinear {
                    assert!(out[..nw].windows(2).all(|p| p[1] >= p[0]));
                }
            }
            // Vertical ramp too.
            let img_v: Vec<f32> = (0..w * 3).map(|i| ((i / 3) as f32 + 0.5) / w as f32).collect();
            let out = resize(&img_v, 1, w, 3, nw, 3, Filter::Bicubic);
            let x = nw / 2;
            let want = (x as f32 + 0.5) / nw as f32;
            assert!((out[x * 3] - want).abs() < 1e-4);
        }
    }

    #[test]
    #[allow(clippy::excessive_precision)] // reference values printed by Pillow
    fn resize_matches_pil() {
        // Reference: Pillow 13 `Image.fromarray(a, mode='F').resize((w, h), filter)`.
        let a: Vec<f32> = (0..35).map(|i| ((i * 37) % 17) as f32 / 16.0).collect();
        let bic_4x3 = [
            0.16309337, 0.51686323, 0.79995674, 0.34969258, 0.61911345, 0.54897362, 0.31659204, 0.48883697, 0.71280742,
            0.26254326, 0.56874865, 0.55693299,
        ];
        let out = resize(&a, 1, 5, 7, 3, 4, Filter::Bicubic);
        assert!(out.iter().zip(&bic_4x3).all(|(x, y)| (x - y).abs() < 1e-5), "{out:?}");
        let bil_11x9_row0 = [
            0.0, 0.08522727, 0.20454545, 0.32386363, 0.44318181, 0.5625, 0.68181819, 0.80113637, 0.92045456,
            0.46022728, 0.0625,
        ];
        let out = resize(&a, 1, 5, 7, 9, 11, Filter::Bilinear);
        assert!(out[..11].iter().zip(&bil_11x9_row0).all(|(x, y)| (x - y).abs() < 1e-5), "{out:?}");
        let bic_11x9_row1 = [
            0.04716123, 0.12829874, 0.26475266, 0.3815659, 0.51569343, 0.65948278, 0.80462092, 0.84386414, 0.73542708,
            0.35694113, 0.08193023,
        ];
        let out = resize(&a, 1, 5, 7, 9, 11, Filter::Bicubic);
        assert!(out[11..22].iter().zip(&bic_11x9_row1).all(|(x, y)| (x - y).abs() < 1e-5), "{out:?}");
        assert!((out[0] + 0.03353243).abs() < 1e-5 && (out[8] - 1.02481246).abs() < 1e-5);
    }

    #[test]
    fn resize_antialias_downscale() {
        // A 1-pixel checkerboard downscaled 4x must come out near its mean 0.5 (no aliasing).
        let (h, w) = (32, 32);
        let img: Vec<f32> = (0..h * w).map(|i| ((i / w + i % w) % 2) as f32).collect();
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            let out = resize(&img, 1, h, w, 8, 8, filter);
            assert!(out.iter().all(|v| (v - 0.5).abs() < 0.05), "{filter:?}: {out:?}");
        }
        // Identity when the size is unchanged.
        assert_eq!(resize(&img, 1, h, w, h, w, Filter::Bicubic), img);
        // Upscale by integer factor with bilinear keeps values between neighbours.
        let small = [0.0f32, 1.0];
        let up = resize(&small, 1, 1, 2, 1, 4, Filter::Bilinear);
        assert_eq!(up, vec![0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn flip_flips() {
        let mut img: Vec<f32> = (0..2 * 2 * 3).map(|i| i as f32).collect();
        hflip(&mut img, 3);
        assert_eq!(img, vec![2., 1., 0., 5., 4., 3., 8., 7., 6., 11., 10., 9.]);
    }

    #[test]
    fn rrc_params_within_bounds() {
        let mut rng = SplitMix64::seed_from_u64(7);
        for &(h, w) in &[(224usize, 224usize), (375, 500), (500, 120), (10, 300), (1, 1), (2, 3), (600, 7)] {
            for _ in 0..500 {
                let c = random_resized_crop_params(h, w, RRC_SCALE, RRC_RATIO, &mut rng);
                assert!(c.height >= 1 && c.width >= 1, "{c:?}");
                assert!(c.top + c.height <= h && c.left + c.width <= w, "{c:?} in {h}x{w}");
            }
        }
        // Sampled (non-fallback) crops respect the area and ratio ranges up to rounding.
        for _ in 0..500 {
            let c = random_resized_crop_params(400, 400, RRC_SCALE, RRC_RATIO, &mut rng);
            let area = (c.height * c.width) as f64 / 160000.0;
            let ratio = c.width as f64 / c.height as f64;
            assert!(area > 0.07 && area <= 1.0, "{c:?}");
            assert!(ratio > 0.7 && ratio < 1.4, "{c:?}");
        }
        // The fallback for an extreme aspect ratio: a central crop clipped to the ratio range.
        let c = random_resized_crop_params(1000, 10, (0.9, 1.0), RRC_RATIO, &mut rng);
        assert_eq!(c, Crop { top: (1000 - 13) / 2, left: 0, height: 13, width: 10 });
        let c = random_resized_crop_params(10, 1000, (0.9, 1.0), RRC_RATIO, &mut rng);
        assert_eq!(c, Crop { top: 0, left: (1000 - 13) / 2, height: 10, width: 13 });
    }

    #[test]
    fn jitter_keeps_range_and_grey_stays_grey() {
        let mut rng = SplitMix64::seed_from_u64(3);
        for _ in 0..50 {
            let mut img: Vec<f32> = (0..3 * 64).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
            color_jitter(&mut img, JITTER, &mut rng);
            assert!(img.iter().all(|v| (0.0..=1.0).contains(v)));
            // A grey image stays grey (saturation is a no-op; brightness/contrast act per value).
            let mut grey: Vec<f32> = (0..64).map(|i| i as f32 / 63.0).cycle().take(192).collect();
            color_jitter(&mut grey, JITTER, &mut rng);
            assert!((0..64).all(|i| (grey[i] - grey[64 + i]).abs() < 1e-6 && (grey[i] - grey[128 + i]).abs() < 1e-6));
        }
    }

    #[test]
    fn parse_names() {
        assert_eq!(Transform::parse("train_fgvc", 224).unwrap(), Transform::TrainFgvc { size: 224 });
        assert_eq!(Transform::parse("VTAB", 32).unwrap(), Transform::DirectResize { size: 32 });
        assert_eq!(Transform::parse("eval-center-crop", 224).unwrap(), Transform::EvalCenterCrop { size: 224 });
        let e = Transform::parse("mixup", 224).unwrap_err().to_string();
        assert!(e.contains("mixup") && e.contains("transform"), "{e}");
        assert!(Transform::parse("fgvc", 0).is_err());
    }

    #[test]
    fn eval_center_crop_geometry() {
        // 224 -> shorter side 256: a 100x200 image becomes 256x512, centre crop 224 at (16, 144).
        // Put a marker column in the centre: it must land in the centre of the output.
        let e = ex(100, 200, |_, _, x| if (99..=100).contains(&x) { 1.0 } else { 0.0 });
        let out = Transform::EvalCenterCrop { size: 224 }.apply(&e, &mut SplitMix64::seed_from_u64(0)).unwrap();
        let row = &out[100 * 224..101 * 224];
        let (argmax, _) = row.iter().enumerate().fold((0, f32::MIN), |a, (i, &v)| if v > a.1 { (i, v) } else { a });
        assert!((110..=113).contains(&argmax), "{argmax}");
        // Mirror symmetry of the marker around the centre.
        assert!((row[111] - row[112]).abs() < 1e-5);
    }
}
