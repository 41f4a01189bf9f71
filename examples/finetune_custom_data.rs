//! Fine-tunes a ViT with SNELLA from the caller's own batches: any iterator of (images, labels) works.
//! Here the source is an image folder (one subfolder per class) when a path is given, otherwise a
//! synthetic two-class problem (bright vs dark images) so the example runs anywhere:
//!   cargo run --release --example finetune_custom_data [-- path/to/folder]
use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::allocator::{Allocator, AllocatorConfig};
use snella::peft::Method;
use snella::train::augment::Transform;
use snella::train::data::{Dataset, ImageFolder};
use snella::train::loader::Loader;
use snella::{Backend, Device};

/// The caller's data source: batches of (images (b, 3, H, W), labels).
fn synthetic(batches: usize, b: usize, px: usize) -> impl Iterator<Item = (Vec<f32>, Vec<i32>)> {
    (0..batches).map(move |k| {
        let labels: Vec<i32> = (0..b).map(|i| ((i + k) % 2) as i32).collect();
        let images = labels
            .iter()
            .enumerate()
            .flat_map(|(i, &y)| {
                (0..3 * px * px)
                    .map(move |j| if y == 1 { 0.8 } else { -0.8 } + 0.1 * (((i * 31 + j * 7) % 11) as f32 / 5.0 - 1.0))
            })
            .collect();
        (images, labels)
    })
}

fn main() -> snella::Result<()> {
    let folder = std::env::args().nth(1);
    let classes = match &folder {
        Some(p) => ImageFolder::open(std::path::Path::new(p))?.num_classes(),
        None => 2,
    };
    let cfg = ViTConfig { img_size: (32, 32), ..ViTConfig::by_name("tiny", classes)? };
    let (b, epochs) = (8, 3);
    let mut model = Model::new(Backend::new(Device::auto())?, &cfg, Method::snella(8, 0.0), b, Recompute::Attention)?;
    // A real run loads a backbone (snella::model::load); this one starts from small deterministic weights.
    for (i, name) in model.param_names().iter().enumerate() {
        let n = model.param_len(name)?;
        let ones = name.ends_with("norm1.weight") || name.ends_with("norm2.weight") || name == "norm.weight";
        let v: Vec<f32> = if ones {
            vec![1.0; n]
        } else {
            (0..n).map(|j| 0.02 * (((j * 7919 + i) % 2001) as f32 / 1000.0 - 1.0)).collect()
        };
        model.set_param(name, &v)?;
    }
    model.init_branches(0)?;
    let alloc = Allocator::new(&model, AllocatorConfig { target_ratio: 0.5, ..AllocatorConfig::by_epochs(epochs) })?;
    for epoch in 0..epochs {
        alloc.begin(&mut model, epoch)?; // reallocates the per-layer ratios when the schedule says so
        let batches: Box<dyn Iterator<Item = (Vec<f32>, Vec<i32>)>> = match &folder {
            Some(p) => {
                let data = ImageFolder::open(std::path::Path::new(p))?;
                let loader = Loader::new(data, Transform::DirectResize { size: 32 }, b, true, 0, false)?;
                Box::new(
                    loader.epoch(epoch).collect::<snella::Result<Vec<_>>>()?.into_iter().map(|x| (x.images, x.labels)),
                )
            }
            None => Box::new(synthetic(8, b, 32)),
        };
        let (mut sum, mut n) = (0.0, 0);
        for (images, labels) in batches {
            model.set_batch(&images, &labels)?;
            sum += model.forward()?;
            n += 1;
            model.backward()?;
            model.adamw_step(1e-3, 0.05)?;
            alloc.update(&model)?;
        }
        let sp: Vec<String> = model.sparsity().iter().map(|s| format!("{s:.2}")).collect();
        println!("epoch {epoch}: mean loss {:.4}, per-layer sparsity [{}]", sum / n as f32, sp.join(" "));
    }
    Ok(())
}
