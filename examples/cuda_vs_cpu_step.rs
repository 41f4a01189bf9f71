//! One SNELLA training step on CUDA and on the CPU from the same weights and batch; prints both losses and
//! their difference. Without a GPU the CUDA step runs on the emulated CUDA device (the same kernels and
//! launches, compiled for the host), and says so.
//!   cargo run --release --example cuda_vs_cpu_step
use snella::model::{Model, Recompute, ViTConfig};
use snella::peft::Method;
use snella::{Backend, Device};

fn step(device: Device, cfg: &ViTConfig) -> snella::Result<f32> {
    let mut model = Model::new(Backend::new(device)?, cfg, Method::snella(8, 0.5), 4, Recompute::Attention)?;
    // The same deterministic weights on both devices.
    for (i, name) in model.param_names().iter().enumerate() {
        let n = model.param_len(name)?;
        let v: Vec<f32> = (0..n).map(|j| 0.05 * (((j * 7919 + i * 31) % 2001) as f32 / 1000.0 - 1.0)).collect();
        model.set_param(name, &v)?;
    }
    model.init_branches(7)?;
    let per = 3 * cfg.img_size.0 * cfg.img_size.1;
    let images: Vec<f32> = (0..4 * per).map(|i| ((i * 13) % 255) as f32 / 127.5 - 1.0).collect();
    model.set_batch(&images, &[1, 2, 3, 4])?;
    let loss = model.forward()?;
    model.backward()?;
    model.adamw_step(1e-3, 0.05)?;
    Ok(loss)
}

fn main() -> snella::Result<()> {
    let cfg = ViTConfig::by_name("tiny", 10)?;
    let cpu = step(Device::Cpu, &cfg)?;
    println!("cpu  loss {cpu:.7}");
    let device = match snella::cuda_available() {
        Ok(name) => {
            println!("GPU: {name}");
            Device::Cuda
        }
        Err(why) => {
            println!("no GPU ({why}): the CUDA step runs on the emulated device");
            Device::CudaEmu
        }
    };
    let cuda = step(device, &cfg)?;
    println!("{:<9} loss {cuda:.7}   |cuda - cpu| = {:.2e}", device.name(), (cuda - cpu).abs());
    Ok(())
}
