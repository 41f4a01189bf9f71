//! The engine's device-memory arithmetic, proved on the emulated CUDA device (which models the context's and
//! cuBLAS's own memory): the largest batch the engine says fits does run its steps, one more does not, and
//! what a step uses above the baseline is exactly the plan.
use snella::model::{plan, Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::report::memory;
use snella::{Backend, Error};

const MIB: usize = 1 << 20;

fn oom_of(r: snella::Result<Model>) -> (f64, usize) {
    match r {
        Err(Error::OutOfMemory { free_mib, max_batch, .. }) => (free_mib, max_batch),
        Err(e) => panic!("expected OutOfMemory, got {e}"),
        Ok(_) => panic!("expected OutOfMemory, the model fitted"),
    }
}

#[test]
fn the_largest_batch_that_fits_runs_its_steps_and_one_more_does_not_fit() {
    let cfg = ViTConfig::by_name("tiny", 10).unwrap();
    let method = Method::snella(8, 0.5);
    let rc = Recompute::Attention;
    // What setup leaves free on a 2 GiB device: the context's and cuBLAS's share is the rest.
    let (free, _) = oom_of(Model::new(Backend::emulated(2 << 30).unwrap(), &cfg, method, 1 << 20, rc));
    let setup = (2 << 30) - (free * MIB as f64) as usize;
    // A device that holds the headroom and a plan of about 12 images.
    let total = setup + 80 * MIB + plan(&cfg, &method, 12, rc).unwrap().total_bytes();
    let (_, max_batch) = oom_of(Model::new(Backend::emulated(total).unwrap(), &cfg, method, 1000, rc));
    assert!((1..1000).contains(&max_batch), "max_batch {max_batch}");
    let mut m = Model::new(Backend::emulated(total).unwrap(), &cfg, method, max_batch, rc).unwrap();
    // A step needs a loaded backbone (a random one: this test measures bytes, not values).
    for (name, (_, v)) in snella::train::trainer::random_backbone(&cfg, 0) {
        m.set_param(&name, &v).unwrap();
    }
    m.init_branches(0).unwrap();
    let per = 3 * cfg.img_size.0 * cfg.img_size.1;
    let images: Vec<f32> = (0..max_batch * per).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
    let labels: Vec<i32> = (0..max_batch as i32).map(|i| i % 10).collect();
    m.set_batch(&images, &labels).unwrap();
    for _ in 0..2 {
        assert!(m.forward().unwrap().is_finite());
        m.backward().unwrap();
        m.adamw_step(1e-3, 0.05).unwrap();
    }
    drop(m);
    oom_of(Model::new(Backend::emulated(total).unwrap(), &cfg, method, max_batch + 1, rc));
}

#[test]
fn measured_device_memory_equals_the_plan() {
    for method in ["snella8", "lora8", "full"] {
        let rows = memory::memory_rows(&["tiny".into()], &[method.into()], 2, 0.5, 10, Recompute::Block).unwrap();
        let (_, device) = memory::measure(&rows[0], Backend::emulated(4 << 30).unwrap(), 2, 0.5, 10).unwrap();
        assert_eq!(device, Some(rows[0].total_mib), "{method}: measured {device:?} MiB, planned {}", rows[0].total_mib);
    }
}
