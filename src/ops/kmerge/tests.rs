//! Tests of the CPU merge against f64 and finite differences (the CUDA twin is compared with it by the selftest).
use super::reference::mix_grads_f64;
use super::*;
use crate::ops::lanes::{exp_lanes, sum_lanes};
use crate::ops::testing::*;

const KINDS: [KernelKind; 5] =
    [KernelKind::PiecewiseLinear, KernelKind::Linear, KernelKind::Rbf, KernelKind::Sigmoid, KernelKind::Poly];

/// The merge in f64 from the definitions (direct distances, no expanded form).
fn merge_f64(
    kind: KernelKind,
    a: &[f64],
    b: &[f64],
    mix: Option<[f64; 3]>,
    n_in: usize,
    n_out: usize,
    d: usize,
) -> Vec<f64> {
    let r = (2 * d) as f64;
    let mut m = vec![0f64; n_in * n_out];
    for i in 0..n_in {
        for j in 0..n_out {
            let (mut sq, mut p) = ([0f64; 2], 0f64);
            for h in 0..2 {
                for k in 0..d {
                    let (x, y) = (a[(h * n_in + i) * d + k], b[(h * n_out + j) * d + k]);
                    sq[h] += (x - y) * (x - y);
                    p += x * y;
                }
            }
            m[i * n_out + j] = match kind {
                KernelKind::PiecewiseLinear => 0.1 * sq[0].sqrt() - 0.1 * sq[1].sqrt(),
                KernelKind::Linear => p,
                KernelKind::Rbf => (-(sq[0] + sq[1]) / r).exp() - 1.0,
                KernelKind::Sigmoid => p.tanh(),
                KernelKind::Poly => (p + 1.0) * (p + 1.0) - 1.0,
            };
        }
    }
    if let Some([al, gm, be]) = mix {
        for row in m.chunks_mut(n_out) {
            let mx = row.iter().fold(f64::MIN, |x, &k| x.max(k / gm));
            let z: f64 = row.iter().map(|&k| (k / gm - mx).exp()).sum();
            for k in row.iter_mut() {
                *k += al * (*k / gm - mx).exp() / z + be;
            }
        }
    }
    m
}

struct Setup {
    rt: Runtime,
    f: Factors,
    m: Tensor,
    g: Tensor,
    da: Tensor,
    db: Tensor,
    dmix: [Tensor; 3],
    s: MergeScratch,
}

fn setup(n_in: usize, n_out: usize, d: usize, mix: bool) -> Setup {
    let mut plan = Plan::new();
    let a = plan.f32("a", &[2, n_in, d], Pool::Trainable);
    let b = plan.f32("b", &[2, n_out, d], Pool::Trainable);
    let mixt = [0, 1, 2].map(|c| plan.f32(format!("mix{c}"), &[1], Pool::Trainable));
    let da = plan.f32("da", &[2, n_in, d], Pool::Grads);
    let db = plan.f32("db", &[2, n_out, d], Pool::Grads);
    let dmix = [0, 1, 2].map(|c| plan.f32(format!("dmix{c}"), &[1], Pool::Grads));
    let m = plan.f32("m", &[n_in, n_out], Pool::Scratch);
    let g = plan.f32("g", &[n_in, n_out], Pool::Scratch);
    let s = MergeScratch::plan(&mut plan, "t", n_in, n_out, d);
    let rt = Runtime::cpu(plan);
    let f = Factors { in_qs: a, out_qs: b, mix: mix.then_some(mixt), n_in, n_out, half_rank: d };
    Setup { rt, f, m, g, da, db, dmix, s }
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

const MIX: [f32; 3] = [1.3, 0.7, -0.2];

#[test]
fn forward_matches_f64_for_every_kind() {
    let (n_in, n_out, d) = (13, 11, 3);
    for kind in KINDS {
        for mix in [false, true] {
            for scale in [0.6f32, 0.02] {
                let st = setup(n_in, n_out, d, mix);
                let a = randn(2 * n_in * d, 1, scale);
                let b = randn(2 * n_out * d, 2, scale);
                st.rt.upload(st.f.in_qs, &a).unwrap();
                st.rt.upload(st.f.out_qs, &b).unwrap();
                if let Some(mt) = st.f.mix {
                    for c in 0..3 {
                        st.rt.upload(mt[c], &[MIX[c]]).unwrap();
                    }
                }
                merge_forward(&st.rt, st.m, &st.f, kind, &st.s).unwrap();
                let want = merge_f64(kind, &to64(&a), &to64(&b), mix.then_some(MIX.map(|x| x as f64)), n_in, n_out, d);
                // The expanded distance cancels: its error is ~eps·‖a‖², relative to K ~ ‖a‖.
                let tol = if kind.is_distance() { 2e-6 } else { 1e-6 };
                assert_close(
                    &format!("{kind:?} mix={mix} scale={scale} M"),
                    &st.rt.download(st.m).unwrap(),
                    &want,
                    tol,
                );
            }
        }
    }
}

/// Analytic gradients (f32) against central differences of the f64 merge, for L = Σ G ⊙ M.
fn check_backward(kind: KernelKind, mix: bool, scale: f32) {
    let (n_in, n_out, d) = (7, 9, 3);
    let st = setup(n_in, n_out, d, mix);
    let a = randn(2 * n_in * d, 11, scale);
    let b = randn(2 * n_out * d, 12, scale);
    let gv = randn(n_in * n_out, 13, 1.0);
    let da0 = randn(2 * n_in * d, 14, 1.0);
    let db0 = randn(2 * n_out * d, 15, 1.0);
    st.rt.upload(st.f.in_qs, &a).unwrap();
    st.rt.upload(st.f.out_qs, &b).unwrap();
    st.rt.upload(st.g, &gv).unwrap();
    // Start from non-zero gradients: the backward accumulates.
    st.rt.upload(st.da, &da0).unwrap();
    st.rt.upload(st.db, &db0).unwrap();
    for c in 0..3 {
        st.rt.upload(st.dmix[c], &[0.5]).unwrap();
        if let Some(mt) = st.f.mix {
            st.rt.upload(mt[c], &[MIX[c]]).unwrap();
        }
    }
    merge_backward(&st.rt, st.da, st.db, mix.then_some(st.dmix), st.g, &st.f, kind, &st.s, Along::default()).unwrap();

    let (a64, b64, g64) = (to64(&a), to64(&b), to64(&gv));
    let mix64 = MIX.map(|x| x as f64);
    let loss = |a: &[f64], b: &[f64], mx: [f64; 3]| -> f64 {
        merge_f64(kind, a, b, mix.then_some(mx), n_in, n_out, d).iter().zip(&g64).map(|(m, g)| m * g).sum()
    };
    let h = 1e-6 * scale as f64;
    let fd = |x: &[f64], which: usize| -> Vec<f64> {
        (0..x.len())
            .map(|e| {
                let (mut p, mut q) = (x.to_vec(), x.to_vec());
                p[e] += h;
                q[e] -= h;
                let (lp, lq) = match which {
                    0 => (loss(&p, &b64, mix64), loss(&q, &b64, mix64)),
                    _ => (loss(&a64, &p, mix64), loss(&a64, &q, mix64)),
                };
                (lp - lq) / (2.0 * h)
            })
            .collect()
    };
    let sub = |got: Vec<f32>, base: &[f32]| -> Vec<f32> { got.iter().zip(base).map(|(g, b)| g - b).collect() };
    let name = format!("{kind:?} mix={mix} scale={scale}");
    let tol = 5e-6;
    assert_close(&format!("{name} dIn_Qs"), &sub(st.rt.download(st.da).unwrap(), &da0), &fd(&a64, 0), tol);
    assert_close(&format!("{name} dOut_Qs"), &sub(st.rt.download(st.db).unwrap(), &db0), &fd(&b64, 1), tol);
    if mix {
        let (closed, scale) = mix_grads_f64(&merge_f64(kind, &a64, &b64, None, n_in, n_out, d), &g64, mix64, n_out);
        for c in 0..3 {
            let got = (st.rt.download(st.dmix[c]).unwrap()[0] - 0.5) as f64;
            assert!((got - closed[c]).abs() <= 1e-6 * scale[c].max(1.0), "{name} dmix[{c}] closed form");
        }
        for c in 0..3 {
            let hh = 1e-6;
            let (mut p, mut q) = (mix64, mix64);
            p[c] += hh;
            q[c] -= hh;
            let want = (loss(&a64, &b64, p) - loss(&a64, &b64, q)) / (2.0 * hh);
            let got = (st.rt.download(st.dmix[c]).unwrap()[0] - 0.5) as f64;
            // Σ over cancelling terms of size ~1 (and the += into 0.5): absolute floor 1e-6.
            assert!((got - want).abs() <= 1e-6 + 2e-5 * want.abs(), "{name} dmix[{c}]: got {got}, want {want}");
        }
    }
}

#[test]
fn backward_matches_finite_differences_for_every_kind() {
    for kind in KINDS {
        for mix in [false, true] {
            check_backward(kind, mix, 0.5);
        }
    }
    // Kaiming-like scale for the official kernel.
    check_backward(KernelKind::PiecewiseLinear, true, 0.05);
    check_backward(KernelKind::PiecewiseLinear, false, 0.05);
}

/// Rows that coincide up to the last bits: cdist's expanded distance is then rounding noise (0 or a tiny
/// positive value, depending on the last bit of a sum), so the ratio must be 0 rather than 0.1·g/noise.
#[test]
fn nearly_coincident_rows_have_zero_ratio() {
    let (n, d) = (1, 8);
    let base = randn(2 * d, 31, 0.7);
    let expanded = |a: &[f32], b: &[f32]| {
        let (an, bn) = (cpu::row_norms(a, n, d), cpu::row_norms(b, n, d));
        let q = cpu::pair(a, b, &an, &bn, 0, 0, n, n, d);
        (-2.0 * q.p[0] + q.a2[0]) + q.b2[0]
    };
    // b = a with one entry a few ulps away, chosen so that the expanded form leaves a positive residue.
    let (a, b) = (1..200u32)
        .map(|k| {
            let mut b = base.clone();
            b[k as usize % d] = f32::from_bits(b[k as usize % d].to_bits() + k % 7 + 1);
            (base.clone(), b)
        })
        .find(|(a, b)| expanded(a, b) > 0.0)
        .expect("some near-coincident pair leaves a positive expanded distance");
    let d2 = expanded(&a, &b);
    assert!(d2 < 1e-5, "the pair is not near-coincident: {d2}");
    let (mut g, mut r0) = (vec![1.0f32], vec![f32::NAN]);
    cpu::ratio(&mut g, &mut r0, &a, &b, n, n, d, KernelKind::PiecewiseLinear);
    assert_eq!((r0[0], g[0]), (0.0, 0.0), "0.1·g/sqrt({d2}) would be {}", 0.1 / d2.sqrt());
    // Rows apart keep their ratio.
    let far: Vec<f32> = b.iter().map(|x| x + 0.5).collect();
    let (mut g, mut r0) = (vec![1.0f32], vec![f32::NAN]);
    cpu::ratio(&mut g, &mut r0, &a, &far, n, n, d, KernelKind::PiecewiseLinear);
    assert!(r0[0] > 0.0 && r0[0].is_finite(), "{r0:?}");
}

/// The distance backward is 0 where D == 0 (torch `_euclidean_dist_backward`), not NaN.
#[test]
fn zero_distance_has_zero_ratio() {
    let (n_in, n_out, d) = (2, 2, 2);
    let st = setup(n_in, n_out, d, false);
    let a = vec![1.0, 2.0, 0.5, 0.5, 3.0, 1.0, 0.0, 0.0];
    st.rt.upload(st.f.in_qs, &a).unwrap();
    st.rt.upload(st.f.out_qs, &a).unwrap(); // b == a: D_h[i,i] = 0
    st.rt.upload(st.g, &[1.0; 4]).unwrap();
    merge_backward(&st.rt, st.da, st.db, None, st.g, &st.f, KernelKind::PiecewiseLinear, &st.s, Along::default())
        .unwrap();
    assert!(st.rt.download(st.da).unwrap().iter().all(|x| x.is_finite()));
    assert!(st.rt.download(st.db).unwrap().iter().all(|x| x.is_finite()));
}

/// The row-wise evaluation (dot products across j in vector lanes, the mixture fused on each row) gives the
/// bits of the pair-by-pair definition, for rows longer and shorter than the lane block, in groups of rows
/// and alone.
#[test]
fn rows_give_the_bits_of_the_pairwise_definition() {
    for (n_in, n_out, d) in [(3, 130, 16), (5, 7, 3), (9, 70, 5)] {
        let (a, b) = (randn(2 * n_in * d, 41, 0.3), randn(2 * n_out * d, 42, 0.3));
        let (an, bn) = (cpu::row_norms(&a, n_in, d), cpu::row_norms(&b, n_out, d));
        for kind in KINDS {
            let (al, gm, be) = (0.7f32, 1.3f32, 0.05f32);
            let mut want = vec![0f32; n_in * n_out];
            for (i, row) in want.chunks_mut(n_out).enumerate() {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = cpu::value(kind, &cpu::pair(&a, &b, &an, &bn, i, j, n_in, n_out, d), d);
                }
                let mx = row.iter().fold(f32::NEG_INFINITY, |m, &k| m.max(k / gm));
                let e: Vec<f32> = row.iter().map(|&k| exp_lanes(k / gm - mx)).collect();
                let inv = 1.0 / sum_lanes(&e);
                for (k, &e) in row.iter_mut().zip(&e) {
                    *k = (*k + al * (e * inv)) + be;
                }
            }
            let mut got = vec![0f32; n_in * n_out];
            cpu::forward(&mut got, &a, &b, n_in, n_out, d, kind, Some([al, gm, be]));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{kind:?} ({n_in}, {n_out}, {d})");
        }
    }
}

/// The backward with its threshold and merged weight taken on the way (one pass over M, `Along`) gives the
/// bits of the separate steps it replaces: M, the gradient's mask, M_s, W = W0 + M_sᵀ, then the backward from
/// the masked gradient. Every kind, with and without the mixture, with and without a threshold; shapes whose
/// rows do not fill the groups and tiles, one task or many, W apart from W0 or (bf16 storage) in place.
#[test]
fn backward_along_matches_the_separate_steps() {
    for ((n_in, n_out, d), in_place) in [((37, 29, 5), false), ((133, 1000, 4), true)] {
        backward_along_case(n_in, n_out, d, in_place);
    }
}

fn backward_along_case(n_in: usize, n_out: usize, d: usize, in_place: bool) {
    use crate::ops::sparsify::{add_transposed, sparsify_apply, sparsify_backward, sparsify_select, SparsifyScratch};
    for kind in KINDS {
        for (mix, sparse) in [(false, true), (true, true), (true, false)] {
            let mut plan = Plan::new();
            let a = plan.f32("a", &[2, n_in, d], Pool::Trainable);
            let b = plan.f32("b", &[2, n_out, d], Pool::Trainable);
            let mixt = [0, 1, 2].map(|c| plan.f32(format!("mix{c}"), &[1], Pool::Trainable));
            let grads = [0, 1].map(|side| {
                let da = plan.f32(format!("da{side}"), &[2, n_in, d], Pool::Grads);
                let db = plan.f32(format!("db{side}"), &[2, n_out, d], Pool::Grads);
                let dmix = [0, 1, 2].map(|c| plan.f32(format!("dmix{side}{c}"), &[1], Pool::Grads));
                let w = plan.f32(format!("w{side}"), &[n_out, n_in], Pool::Scratch);
                (da, db, dmix, w)
            });
            let w0 = plan.f32("w0", &[n_out, n_in], Pool::Scratch);
            let (m, g, t) = (
                plan.f32("m", &[n_in, n_out], Pool::Scratch),
                plan.f32("g", &[n_in, n_out], Pool::Scratch),
                plan.f32("t", &[1], Pool::Scratch),
            );
            let sp = SparsifyScratch::plan(&mut plan, "sp", n_in * n_out);
            let s = MergeScratch::plan_with_k(&mut plan, "s", n_in, n_out, d, m);
            let rt = Runtime::cpu(plan);
            let f = Factors { in_qs: a, out_qs: b, mix: mix.then_some(mixt), n_in, n_out, half_rank: d };
            rt.upload(a, &randn(a.numel, 1, 0.4)).unwrap();
            rt.upload(b, &randn(b.numel, 2, 0.4)).unwrap();
            for (c, v) in [0.7f32, 0.3, 0.02].iter().enumerate() {
                rt.upload(mixt[c], &[*v]).unwrap();
            }
            rt.upload(w0, &randn(w0.numel, 3, 0.02)).unwrap();
            let gv = randn(g.numel, 4, 1.0);
            for (da, db, dmix, _) in grads {
                rt.upload(da, &randn(da.numel, 5, 1.0)).unwrap();
                rt.upload(db, &randn(db.numel, 6, 1.0)).unwrap();
                dmix.iter().for_each(|&x| rt.upload(x, &[0.25]).unwrap());
            }
            merge_forward(&rt, m, &f, kind, &s).unwrap();
            sparsify_select(&rt, t, m, 0.6, &sp).unwrap();
            let threshold = sparse.then_some(t);
            // Fused.
            let (da, db, dmix, w) = grads[0];
            rt.upload(g, &gv).unwrap();
            let src = if in_place {
                rt.upload(w, &rt.download(w0).unwrap()).unwrap();
                w
            } else {
                w0
            };
            merge_backward(
                &rt,
                da,
                db,
                mix.then_some(dmix),
                g,
                &f,
                kind,
                &s,
                Along { threshold, weight: Some((w, src)) },
            )
            .unwrap();
            // Separate.
            let (da, db, dmix, w) = grads[1];
            rt.upload(g, &gv).unwrap();
            merge_forward(&rt, m, &f, kind, &s).unwrap();
            if sparse {
                sparsify_backward(&rt, g, g, m, t).unwrap();
                sparsify_apply(&rt, m, m, t).unwrap();
            }
            add_transposed(&rt, w, w0, m, n_in, n_out).unwrap();
            merge_backward(&rt, da, db, mix.then_some(dmix), g, &f, kind, &s, Along::default()).unwrap();
            let (x, y) = (grads[0], grads[1]);
            let mut pairs = vec![("d_in_qs", x.0, y.0), ("d_out_qs", x.1, y.1), ("W", x.3, y.3)];
            if mix {
                pairs.extend([("d_alpha", x.2[0], y.2[0]), ("d_gamma", x.2[1], y.2[1]), ("d_beta", x.2[2], y.2[2])]);
            }
            for (name, p, q) in pairs {
                let (p, q) = (rt.download(p).unwrap(), rt.download(q).unwrap());
                let diff = p.iter().zip(&q).filter(|(u, v)| u.to_bits() != v.to_bits()).count();
                assert_eq!(
                    diff,
                    0,
                    "{n_in}x{n_out} {kind:?} mix {mix} sparse {sparse}: {name} differs in {diff} of {} entries",
                    p.len()
                );
            }
        }
    }
}
