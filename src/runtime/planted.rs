//! Launches the kernels with planted bugs (`cuda/emu/planted_bugs.cu`) on a fresh emulated device, for
//! `tests/emu_sanitizer.rs`, which proves that each sanitizer check reports its bug. Kernel names and argument
//! lists come from the test, so the launch-site check skips this file.
use cudarc::driver::LaunchConfig;

use super::cuda::KArg;
use super::{Backend, Plan, Pool, Runtime, Tensor};
use crate::error::Result;

/// One argument of a planted-bug launch.
#[derive(Clone, Copy, Debug)]
pub enum PlantedArg {
    /// A fresh f32 tensor of this many elements, zeroed; its final contents are returned.
    Floats(usize),
    /// A 32-bit integer.
    I32(i32),
    /// A 64-bit integer.
    I64(i64),
    /// A 32-bit float.
    F32(f32),
}

/// Runs `kernel` on a fresh emulated device (1 GiB) with `grid` x `block` threads and `shared` bytes of dynamic
/// shared memory, and returns the final contents of its `Floats` arguments. The buffers lie next to each other
/// in one pool, followed by another tensor, so an overrun lands in memory the process owns.
///
/// # Errors
/// The sanitizer's or the launch check's error, naming the kernel, block, thread and address.
pub fn launch_planted(
    kernel: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared: u32,
    args: &[PlantedArg],
) -> Result<Vec<Vec<f32>>> {
    let mut plan = Plan::new();
    let buffers: Vec<Option<Tensor>> = args
        .iter()
        .enumerate()
        .map(|(i, a)| match a {
            PlantedArg::Floats(n) => Some(plan.f32(format!("buffer{i}"), &[*n], Pool::Scratch)),
            _ => None,
        })
        .collect();
    plan.f32("neighbour", &[4096], Pool::Scratch);
    let rt = Runtime::new(Backend::emulated(1 << 30)?, plan)?;
    for t in buffers.iter().flatten() {
        rt.zero(*t)?;
    }
    let kargs: Vec<KArg> = args
        .iter()
        .zip(&buffers)
        .map(|(a, t)| match (a, t) {
            (_, Some(t)) => KArg::Ptr(rt.ptr(*t)),
            (PlantedArg::I32(v), _) => KArg::I32(*v),
            (PlantedArg::I64(v), _) => KArg::I64(*v),
            (PlantedArg::F32(v), _) => KArg::F32(*v),
            (PlantedArg::Floats(_), None) => unreachable!("every Floats argument has a buffer"),
        })
        .collect();
    let cfg = LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: shared };
    rt.cuda().launch(kernel, cfg, &kargs)?;
    buffers.iter().flatten().map(|t| rt.download(*t)).collect()
}
