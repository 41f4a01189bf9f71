//! Training data: image folders, IDX files, subsets, the loader and its determinism.
//! All inputs are synthetic and written to a unique folder under the system temp dir.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{GrayAlphaImage, GrayImage, ImageBuffer, Luma, Rgb, RgbImage, RgbaImage};
use snella::train::augment::{Transform, IMAGENET_MEAN, IMAGENET_STD};
use snella::train::data::{subset, Dataset, Example, Idx, ImageFolder};
use snella::train::loader::{Batch, Loader};
use snella::{Error, Result};

/// A fresh, empty folder unique to this process and call.
fn temp_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!(
        "snella-test-data-{}-{}-{nanos}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mkdir(p: &Path) {
    std::fs::create_dir_all(p).unwrap();
}

fn solid_rgb(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

fn gradient_rgb(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128]))
}

fn pixel(ex: &Example, c: usize, y: usize, x: usize) -> f32 {
    ex.image[c * ex.height * ex.width + y * ex.width + x]
}

#[test]
fn image_folder_loads_mixed_formats() {
    let root = temp_dir("folder");
    let _g = Cleanup(root.clone());
    for c in ["cat", "dog", "emu"] {
        mkdir(&root.join(c));
    }
    // cat: RGB PNG, RGB JPEG (upper-case extension), a text file that must be ignored.
    gradient_rgb(10, 12).save(root.join("cat/a.png")).unwrap();
    solid_rgb(20, 15, [200, 40, 90]).save_with_format(root.join("cat/b.JPG"), image::ImageFormat::Jpeg).unwrap();
    std::fs::write(root.join("cat/notes.txt"), "not an image").unwrap();
    // dog: grey PNG, RGBA PNG, a 16-bit grey PNG in a nested folder.
    GrayImage::from_fn(7, 9, |x, y| Luma([(x * 30 + y) as u8])).save(root.join("dog/grey.png")).unwrap();
    RgbaImage::from_pixel(8, 8, image::Rgba([10, 20, 30, 40])).save(root.join("dog/rgba.PNG")).unwrap();
    mkdir(&root.join("dog/sub"));
    ImageBuffer::<Luma<u16>, Vec<u16>>::from_pixel(5, 6, Luma([19661u16])).save(root.join("dog/sub/g16.png")).unwrap();
    // emu: grey+alpha PNG and a grey JPEG (.jpeg).
    GrayAlphaImage::from_pixel(4, 3, image::LumaA([77, 0])).save(root.join("emu/la.png")).unwrap();
    GrayImage::from_pixel(16, 16, Luma([100]))
        .save_with_format(root.join("emu/g.jpeg"), image::ImageFormat::Jpeg)
        .unwrap();
    // A file in the root and a hidden folder are ignored.
    std::fs::write(root.join("README"), "x").unwrap();
    mkdir(&root.join(".cache"));

    let ds = ImageFolder::open(&root).unwrap();
    assert_eq!(ds.class_names(), &["cat", "dog", "emu"]);
    assert_eq!(ds.num_classes(), 3);
    assert_eq!(ds.len(), 7);
    let want: Vec<(&str, usize, usize, usize)> = vec![
        ("a.png", 0, 12, 10),
        ("b.JPG", 0, 15, 20),
        ("grey.png", 1, 9, 7),
        ("rgba.PNG", 1, 8, 8),
        ("g16.png", 1, 6, 5),
        ("g.jpeg", 2, 16, 16),
        ("la.png", 2, 3, 4),
    ];
    for (i, (name, label, h, w)) in want.iter().enumerate() {
        let (path, l) = &ds.samples()[i];
        assert!(path.ends_with(name), "{i}: {}", path.display());
        assert_eq!(l, label);
        assert_eq!(ds.label(i).unwrap(), *label);
        let ex = ds.get(i).unwrap();
        assert_eq!((ex.label, ex.height, ex.width), (*label, *h, *w), "{name}");
        assert_eq!(ex.image.len(), 3 * h * w, "{name}");
        assert!(ex.image.iter().all(|v| (0.0..=1.0).contains(v)), "{name}");
    }
    // PNG values are exact; the RGB gradient keeps its channels.
    let a = ds.get(0).unwrap();
    assert_eq!(pixel(&a, 0, 3, 5), (5 * 255 / 10) as f32 / 255.0);
    assert_eq!(pixel(&a, 1, 3, 5), (3 * 255 / 12) as f32 / 255.0);
    assert_eq!(pixel(&a, 2, 3, 5), 128.0 / 255.0);
    // JPEG is lossy but a solid colour stays close.
    let b = ds.get(1).unwrap();
    for (c, v) in [200.0f32, 40.0, 90.0].iter().enumerate() {
        assert!((pixel(&b, c, 7, 9) - v / 255.0).abs() < 0.03, "jpeg channel {c}");
    }
    // Grey is replicated to 3 channels.
    let g = ds.get(2).unwrap();
    for y in 0..9 {
        for x in 0..7 {
            let v = (x * 30 + y) as f32 / 255.0;
            assert!(
                (0..3).all(|c| pixel(&g, c, y, x) == v),
                "{y},{x}: {} {} {} vs {v}",
                pixel(&g, 0, y, x),
                pixel(&g, 1, y, x),
                pixel(&g, 2, y, x)
            );
        }
    }
    // RGBA: alpha dropped.
    let r = ds.get(3).unwrap();
    assert_eq!(
        [pixel(&r, 0, 1, 1), pixel(&r, 1, 1, 1), pixel(&r, 2, 1, 1)],
        [10.0 / 255.0, 20.0 / 255.0, 30.0 / 255.0]
    );
    // 16-bit grey scaled by 1/65535.
    let s = ds.get(4).unwrap();
    assert!((0..3).all(|c| (pixel(&s, c, 2, 2) - 19661.0 / 65535.0).abs() < 1e-6));
    // Grey JPEG -> 3 equal channels near 100/255; grey+alpha -> grey.
    let gj = ds.get(5).unwrap();
    assert!((pixel(&gj, 0, 8, 8) - 100.0 / 255.0).abs() < 0.03);
    assert!((0..16 * 16).all(|p| gj.image[p] == gj.image[256 + p] && gj.image[p] == gj.image[512 + p]));
    let la = ds.get(6).unwrap();
    assert!(la.image.iter().all(|&v| v == 77.0 / 255.0));
    // Out of range index: an error, not a panic.
    assert!(ds.get(7).is_err());

    // open_split: root/<split>/<class>/...
    let split_root = temp_dir("split");
    let _g2 = Cleanup(split_root.clone());
    for (split, classes) in [("train", ["x", "y"]), ("test", ["x", "y"])] {
        for c in classes {
            mkdir(&split_root.join(split).join(c));
            solid_rgb(3, 3, [1, 2, 3]).save(split_root.join(split).join(c).join("1.png")).unwrap();
        }
    }
    let tr = ImageFolder::open_split(&split_root, "train").unwrap();
    assert_eq!((tr.len(), tr.class_names()), (2, &["x".to_string(), "y".to_string()][..]));
    let err = ImageFolder::open_split(&split_root, "val").unwrap_err().to_string();
    assert!(err.contains("val"), "{err}");
}

#[test]
fn image_folder_structure_errors() {
    let root = temp_dir("empty-class");
    let _g = Cleanup(root.clone());
    mkdir(&root.join("ant"));
    mkdir(&root.join("zebra"));
    solid_rgb(4, 4, [9, 9, 9]).save(root.join("ant/1.png")).unwrap();
    std::fs::write(root.join("zebra/readme.txt"), "no images here").unwrap();
    let err = ImageFolder::open(&root).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("zebra"), "{msg}");

    // Missing folder: Io error naming it.
    let missing = root.join("does-not-exist");
    let err = ImageFolder::open(&missing).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("does-not-exist"));

    // No class folders at all.
    let flat = temp_dir("flat");
    let _g2 = Cleanup(flat.clone());
    solid_rgb(4, 4, [9, 9, 9]).save(flat.join("1.png")).unwrap();
    let err = ImageFolder::open(&flat).unwrap_err().to_string();
    assert!(err.contains("no class folders"), "{err}");
}

#[test]
fn corrupt_images_are_errors_naming_the_file() {
    let root = temp_dir("corrupt");
    let _g = Cleanup(root.clone());
    mkdir(&root.join("a"));
    // A valid JPEG, then the same cut in half.
    let good = root.join("a/0good.jpg");
    gradient_rgb(64, 48).save_with_format(&good, image::ImageFormat::Jpeg).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(root.join("a/1truncated.jpg"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(root.join("a/1truncated_tail.jpg"), &bytes[..bytes.len() - 2]).unwrap();
    // Garbage with a .png name.
    std::fs::write(root.join("a/2garbage.png"), b"this is certainly not a PNG file \x00\x01\x02\xff").unwrap();
    // A truncated PNG.
    let png = root.join("a/3full.png");
    gradient_rgb(40, 40).save(&png).unwrap();
    let pbytes = std::fs::read(&png).unwrap();
    std::fs::write(root.join("a/4truncated.png"), &pbytes[..pbytes.len() * 2 / 3]).unwrap();
    // An empty .jpeg.
    std::fs::write(root.join("a/5empty.jpeg"), b"").unwrap();

    let ds = ImageFolder::open(&root).unwrap();
    let names: Vec<String> =
        ds.samples().iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(
        names,
        [
            "0good.jpg",
            "1truncated.jpg",
            "1truncated_tail.jpg",
            "2garbage.png",
            "3full.png",
            "4truncated.png",
            "5empty.jpeg"
        ]
    );
    assert!(ds.get(0).is_ok());
    assert!(ds.get(4).is_ok());
    for i in [1, 2, 3, 5, 6] {
        let err = ds.get(i).expect_err(&names[i]);
        assert!(matches!(err, Error::Format { .. }), "{}: {err:?}", names[i]);
        let msg = err.to_string();
        assert!(msg.contains(&names[i]), "{msg}");
    }

    // Through the loader: the batch holding a bad file is an error naming it; the others are fine.
    let loader = Loader::new(&ds, Transform::DirectResize { size: 8 }, 1, false, 0, false).unwrap();
    let results: Vec<Result<Batch>> = loader.epoch(0).collect();
    assert_eq!(results.len(), 7);
    assert!(results[0].is_ok() && results[4].is_ok());
    let msg = results[3].as_ref().unwrap_err().to_string();
    assert!(msg.contains("2garbage.png"), "{msg}");
}

// ------------------------------------------------------------------------------------------------
// IDX
// ------------------------------------------------------------------------------------------------

fn idx_images(n: usize, h: usize, w: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        b.extend_from_slice(&(d as u32).to_be_bytes());
    }
    for i in 0..n {
        for p in 0..h * w {
            b.push(f(i, p));
        }
    }
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0, 8, 1];
    b.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    b.extend_from_slice(labels);
    b
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_round_trip_raw_and_gzipped() {
    let dir = temp_dir("idx");
    let _g = Cleanup(dir.clone());
    let (n, h, w) = (6, 4, 3);
    let pix = |i: usize, p: usize| (i * 40 + p * 3) as u8;
    let labels = [3u8, 0, 9, 1, 1, 7];
    let img = idx_images(n, h, w, pix);
    let lab = idx_labels(&labels);
    std::fs::write(dir.join("raw-images"), &img).unwrap();
    std::fs::write(dir.join("raw-labels"), &lab).unwrap();
    std::fs::write(dir.join("gz-images.gz"), gzip(&img)).unwrap();
    std::fs::write(dir.join("gz-labels.gz"), gzip(&lab)).unwrap();
    // Standard names: gzipped train, raw test.
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), gzip(&img)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), gzip(&lab)).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_images(2, h, w, pix)).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[5, 6])).unwrap();

    let raw = Idx::open(&dir.join("raw-images"), &dir.join("raw-labels"), 10).unwrap();
    let gz = Idx::open(&dir.join("gz-images.gz"), &dir.join("gz-labels.gz"), 10).unwrap();
    let train = Idx::open_standard(&dir, true).unwrap();
    let test = Idx::open_standard(&dir, false).unwrap();
    assert_eq!((raw.len(), gz.len(), train.len(), test.len()), (6, 6, 6, 2));
    assert_eq!(raw.num_classes(), 10);
    assert_eq!(raw.class_names()[7], "7");
    assert_eq!(raw.image_size(), (h, w));
    for (i, &label) in labels.iter().enumerate() {
        let a = raw.get(i).unwrap();
        assert_eq!(a, gz.get(i).unwrap());
        assert_eq!(a, train.get(i).unwrap());
        assert_eq!((a.label, a.height, a.width), (label as usize, h, w));
        assert_eq!(raw.label(i).unwrap(), label as usize);
        for p in 0..h * w {
            let v = pix(i, p) as f32 / 255.0;
            assert_eq!([a.image[p], a.image[h * w + p], a.image[2 * h * w + p]], [v, v, v]);
        }
    }
    assert_eq!(test.get(1).unwrap().label, 6);
    assert!(raw.get(6).is_err());

    let named = raw
        .with_class_names(snella::train::data::FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect())
        .unwrap();
    assert_eq!(named.class_names()[9], "Ankle boot");

    // A missing standard file is an Io error naming the expected file.
    let empty = temp_dir("idx-empty");
    let _g2 = Cleanup(empty.clone());
    let err = Idx::open_standard(&empty, true).unwrap_err();
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");
}

#[test]
fn idx_errors_name_file_and_index() {
    let dir = temp_dir("idx-bad");
    let _g = Cleanup(dir.clone());
    let img = idx_images(5, 2, 2, |i, p| (i + p) as u8);
    let lab = idx_labels(&[0, 1, 2, 3, 4]);
    let write = |name: &str, data: &[u8]| -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let images = write("images", &img);
    let labels = write("labels", &lab);
    assert!(Idx::open(&images, &labels, 5).is_ok());

    let check = |r: Result<Idx>, file: &str, words: &[&str]| {
        let err = r.unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(file), "{msg} should name {file}");
        for w in words {
            assert!(msg.contains(w), "{msg} should contain {w}");
        }
    };

    // Wrong magic: labels passed as images, and a bogus magic.
    check(Idx::open(&labels, &images, 5), "labels", &["magic", "0x00000801"]);
    let mut bad = img.clone();
    bad[3] = 4;
    let bad_magic = write("bad-magic", &bad);
    check(Idx::open(&bad_magic, &labels, 5), "bad-magic", &["magic"]);

    // Truncated images (raw and gzipped) and labels.
    let trunc = write("trunc-images", &img[..img.len() - 3]);
    check(Idx::open(&trunc, &labels, 5), "trunc-images", &["truncated"]);
    let trunc_gz = write("trunc-images.gz", &gzip(&img[..img.len() - 3]));
    check(Idx::open(&trunc_gz, &labels, 5), "trunc-images.gz", &["truncated"]);
    let gz = gzip(&img);
    let cut_gz = write("cut-stream.gz", &gz[..gz.len() / 2]);
    check(Idx::open(&cut_gz, &labels, 5), "cut-stream.gz", &["gzip"]);
    let header_only = write("header-only", &img[..10]);
    check(Idx::open(&header_only, &labels, 5), "header-only", &["truncated"]);
    let trunc_lab = write("trunc-labels", &lab[..lab.len() - 1]);
    check(Idx::open(&images, &trunc_lab, 5), "trunc-labels", &["truncated"]);
    let mut long = img.clone();
    long.push(0);
    let trailing = write("trailing", &long);
    check(Idx::open(&trailing, &labels, 5), "trailing", &["trailing"]);

    // Count mismatch.
    let four = write("four-labels", &idx_labels(&[0, 1, 2, 3]));
    check(Idx::open(&images, &four, 5), "four-labels", &["4 labels", "5 images"]);

    // Label out of range: names the file, the index and the value.
    let oor = write("oor-labels", &idx_labels(&[0, 1, 9, 3, 4]));
    check(Idx::open(&images, &oor, 5), "oor-labels", &["label 9", "index 2", "5 classes"]);

    // No classes.
    assert!(matches!(Idx::open(&images, &labels, 0), Err(Error::Invalid { .. })));
}

// ------------------------------------------------------------------------------------------------
// Loader, Subset, transforms end to end
// ------------------------------------------------------------------------------------------------

/// An in-memory dataset of images of varying size; label = i % classes.
struct Synthetic {
    n: usize,
    classes: usize,
    names: Vec<String>,
}

impl Synthetic {
    fn new(n: usize, classes: usize) -> Synthetic {
        Synthetic { n, classes, names: (0..classes).map(|c| format!("c{c}")).collect() }
    }
}

impl Dataset for Synthetic {
    fn len(&self) -> usize {
        self.n
    }
    fn num_classes(&self) -> usize {
        self.classes
    }
    fn class_names(&self) -> &[String] {
        &self.names
    }
    fn get(&self, i: usize) -> Result<Example> {
        let (h, w) = (20 + i % 7, 24 + (i * 3) % 11);
        let image = (0..3 * h * w).map(|p| ((p * 31 + i * 17) % 97) as f32 / 96.0).collect();
        Ok(Example { image, height: h, width: w, label: i % self.classes })
    }
}

fn run_epoch<D: Dataset>(loader: &Loader<D>, epoch: usize, threads: usize) -> Vec<Batch> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| loader.epoch(epoch).collect::<Result<Vec<_>>>().unwrap())
}

#[test]
fn loader_is_deterministic_across_thread_counts() {
    for t in [Transform::TrainFgvc { size: 16 }, Transform::DirectResize { size: 12 }] {
        let loader = Loader::new(Synthetic::new(23, 4), t, 5, true, 42, false).unwrap();
        let one = run_epoch(&loader, 0, 1);
        let two = run_epoch(&loader, 0, 2);
        assert_eq!(one, two, "{t}");
        let again = run_epoch(&loader, 0, 2);
        assert_eq!(one, again);
        // A different epoch: a different order (and, for the training pipeline, different pixels).
        let next = run_epoch(&loader, 1, 2);
        assert_ne!(
            one.iter().map(|b| b.indices.clone()).collect::<Vec<_>>(),
            next.iter().map(|b| b.indices.clone()).collect::<Vec<_>>()
        );
        if let Transform::TrainFgvc { .. } = t {
            // Same example, different epoch -> different augmentation.
            let i = one[0].indices[0];
            let s = 3 * 16 * 16;
            let (bj, pj) = next
                .iter()
                .enumerate()
                .find_map(|(b, bt)| bt.indices.iter().position(|&x| x == i).map(|p| (b, p)))
                .unwrap();
            assert_ne!(&one[0].images[..s], &next[bj].images[pj * s..(pj + 1) * s]);
        }
        // A different seed: a different order.
        let other = Loader::new(Synthetic::new(23, 4), t, 5, true, 43, false).unwrap();
        assert_ne!(run_epoch(&other, 0, 1)[0].indices, one[0].indices);
    }
}

#[test]
fn loader_batches_and_final_short_batch() {
    let ds = Synthetic::new(23, 4);
    let size = 8;
    let loader = Loader::new(&ds, Transform::DirectResize { size }, 5, false, 0, false).unwrap();
    assert_eq!(loader.num_batches(), 5);
    let batches: Vec<Batch> = loader.epoch(0).collect::<Result<_>>().unwrap();
    assert_eq!(batches.iter().map(|b| b.len()).collect::<Vec<_>>(), [5, 5, 5, 5, 3]);
    let all: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(all, (0..23).collect::<Vec<_>>());
    for b in &batches {
        assert_eq!(b.images.len(), b.len() * 3 * size * size);
        assert_eq!((b.height, b.width), (size, size));
        for (k, &i) in b.indices.iter().enumerate() {
            assert_eq!(b.labels[k], (i % 4) as i32);
        }
    }
    // The batch equals the transform applied to each example (DirectResize draws nothing).
    let ex = ds.get(21).unwrap();
    let want = Transform::DirectResize { size }.apply(&ex, &mut rand::thread_rng()).unwrap();
    let last = &batches[4];
    assert_eq!(&last.images[192..384], &want[..]);

    let dropping = Loader::new(&ds, Transform::DirectResize { size }, 5, true, 0, true).unwrap();
    assert_eq!(dropping.num_batches(), 4);
    let b: Vec<Batch> = dropping.epoch(3).collect::<Result<_>>().unwrap();
    assert_eq!(b.len(), 4);
    assert!(b.iter().all(|b| b.len() == 5));
    // Shuffled epoch still visits every index at most once.
    let mut seen: Vec<usize> = b.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 20);

    assert!(matches!(
        Loader::new(&ds, Transform::DirectResize { size }, 0, false, 0, false),
        Err(Error::Invalid { .. })
    ));
}

#[test]
fn subset_is_deterministic_and_stratified() {
    // Labels: 50 of class 0, 30 of class 1, 20 of class 2.
    struct ByRange;
    static NAMES: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    impl Dataset for ByRange {
        fn len(&self) -> usize {
            100
        }
        fn num_classes(&self) -> usize {
            3
        }
        fn class_names(&self) -> &[String] {
            NAMES.get_or_init(|| vec!["a".into(), "b".into(), "c".into()])
        }
        fn get(&self, i: usize) -> Result<Example> {
            let label = if i < 50 {
                0
            } else if i < 80 {
                1
            } else {
                2
            };
            Ok(Example { image: vec![0.5; 3], height: 1, width: 1, label })
        }
    }
    let counts = |s: &dyn Dataset| {
        let mut c = [0usize; 3];
        for i in 0..s.len() {
            c[s.label(i).unwrap()] += 1;
        }
        c
    };

    let a = subset(ByRange, 10, 7, false);
    let b = subset(ByRange, 10, 7, false);
    let c = subset(ByRange, 10, 8, false);
    assert_eq!(a.indices(), b.indices());
    assert_ne!(a.indices(), c.indices());
    assert_eq!(a.len(), 10);
    assert!(a.indices().windows(2).all(|w| w[0] < w[1]));
    assert_eq!(a.get(3).unwrap().label, ByRange.get(a.indices()[3]).unwrap().label);

    let s = subset(ByRange, 10, 7, true);
    assert_eq!(counts(&s), [5, 3, 2]);
    assert_eq!(s.indices(), subset(ByRange, 10, 7, true).indices());
    assert_ne!(s.indices(), subset(ByRange, 10, 9, true).indices());
    // 7 items: shares 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the largest remainder (class 0) gets the 7th.
    assert_eq!(counts(&subset(ByRange, 7, 1, true)), [4, 2, 1]);
    // Every class within one of its proportional share, for many sizes.
    for n in 1..100 {
        let s = subset(ByRange, n, n as u64, true);
        let c = counts(&s);
        assert_eq!(c.iter().sum::<usize>(), n);
        for (k, share) in [0.5, 0.3, 0.2].iter().enumerate() {
            assert!((c[k] as f64 - share * n as f64).abs() < 1.0, "n={n} {c:?}");
        }
    }
    // n >= len: everything.
    assert_eq!(subset(ByRange, 500, 0, true).len(), 100);
    assert_eq!(subset(ByRange, 100, 0, false).indices(), (0..100).collect::<Vec<_>>());
}

#[test]
fn transforms_on_folder_images_end_to_end() {
    let root = temp_dir("e2e");
    let _g = Cleanup(root.clone());
    mkdir(&root.join("k"));
    solid_rgb(30, 17, [51, 102, 204]).save(root.join("k/1.png")).unwrap();
    let ds = ImageFolder::open(&root).unwrap();
    for t in [
        Transform::TrainFgvc { size: 10 },
        Transform::DirectResize { size: 10 },
        Transform::EvalCenterCrop { size: 10 },
    ] {
        let loader = Loader::new(&ds, t, 4, true, 1, false).unwrap();
        let b = loader.epoch(0).next().unwrap().unwrap();
        assert_eq!(b.images.len(), 300);
        if !matches!(t, Transform::TrainFgvc { .. }) {
            // A constant image stays constant after resizing; normalised (c - mean) / std.
            for (c, v) in [51.0f32, 102.0, 204.0].iter().enumerate() {
                let want = (v / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
                assert!(b.images[c * 100..(c + 1) * 100].iter().all(|x| (x - want).abs() < 1e-5), "{t}");
            }
        } else {
            // Colour jitter keeps a constant image constant per channel.
            for c in 0..3 {
                let ch = &b.images[c * 100..(c + 1) * 100];
                assert!(ch.iter().all(|x| (x - ch[0]).abs() < 1e-5));
            }
        }
    }
}

/// A few kilobytes of PNG can describe a 3000000x1 image, and a thin image resizes to a huge one in the
/// evaluation crop (shorter side to 256 at 224 px): both are errors, never gigabytes of allocation (the first
/// is also kept as an input of the `image` fuzz target: fuzz/regressions/image/).
#[test]
fn huge_or_thin_images_are_errors_not_allocations() {
    let dir = temp_dir("huge-images");
    let _cleanup = Cleanup(dir.clone());
    let p = dir.join("wide.png");
    RgbImage::from_pixel(20_000, 1, Rgb([9, 9, 9])).save(&p).unwrap();
    let e = snella::train::data::decode_image(&p).unwrap_err().to_string();
    assert!(e.contains("wide.png") && e.contains("20000x1") && e.contains("16384"), "{e}");
    let thin = Example { image: vec![0.5; 3 * 8000], height: 1, width: 8000, label: 0 };
    let e = Transform::parse("eval", 224)
        .unwrap()
        .apply(&thin, &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0))
        .unwrap_err();
    assert!(e.to_string().contains("too elongated"), "{e}");
    // The other pipelines make a size x size image of it.
    for t in ["vtab", "fgvc"] {
        let out = Transform::parse(t, 16)
            .unwrap()
            .apply(&thin, &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0))
            .unwrap();
        assert_eq!(out.len(), 3 * 16 * 16);
    }
}
