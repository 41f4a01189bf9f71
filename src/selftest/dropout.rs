//! Checks of `ops::dropout`: dropout and drop-path, out of place and in place.
use super::Case;
use crate::error::Result;
use crate::ops::dropout as op;
use crate::runtime::{Plan, Pool};

/// Dropout (group 1) or drop-path (one decision per `group` elements), out of place and in place.
pub(super) fn check(cx: &mut Case, group: usize) -> Result<()> {
    let n = if group == 1 { 37 * 1013 } else { 37 * group };
    let mut p = Plan::new();
    let x = p.f32("x", &[n], Pool::Activations);
    let y = p.f32("y", &[n], Pool::Activations);
    let z = p.f32("z (in place)", &[n], Pool::Activations);
    let tw = cx.twin(p)?;
    let v = cx.input(&tw, x, 1.0)?;
    tw.upload(z, &v)?;
    tw.poison(&[y])?;
    let seed = cx.below(1 << 30) as u64;
    tw.run(|rt| {
        if group == 1 {
            op::dropout(rt, y, x, 0.3, seed, 5)?;
            op::dropout(rt, z, z, 0.3, seed, 5)
        } else {
            op::drop_path(rt, y, x, group, 0.3, seed, 5)?;
            op::drop_path(rt, z, z, group, 0.3, seed, 5)
        }
    })?;
    cx.compare(&tw, y)?;
    cx.compare(&tw, z)
}
