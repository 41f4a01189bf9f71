//! `snella memory`: the peak training memory of each model × method, straight from the plan the engine
//! allocates, beside the SNELL paper's published figures (Tables A8(b) and A12: fp32, batch 8, 224 px,
//! MB = torch.cuda.max_memory_allocated / 2^20).
use std::fmt::Write;

use crate::error::Result;
use crate::model::{plan_model, MemoryOptions, Precision, Recompute, ViTConfig};
use crate::peft::Method;
use crate::runtime::{mib, Pool};

/// The paper's figures in MB (= MiB) at batch 8, fp32: (model, method, MB).
pub(crate) const PAPER_MB: &[(&str, &str, f64)] = &[
    ("vit_b16", "gps", 2428.0),
    ("vit_l16", "gps", 7522.0),
    ("vit_h14", "gps", 16119.0),
    ("vit_b16", "snell32", 1673.0),
    ("vit_l16", "snell32", 4519.0),
    ("vit_h14", "snell32", 9692.0),
    ("vit_b16", "lora8", 1546.0),
    ("vit_l16", "lora8", 4325.0),
    ("vit_h14", "lora8", 9325.0),
];

/// The paper's figure for a model and method. SNELLA's own memory table was not available: a SNELLA-r row
/// is compared with the published SNELL-r figure (the targets are set against it).
pub(crate) fn paper_mb(model: &str, method: &str) -> Option<f64> {
    let method = method.strip_prefix("snella").map(|r| format!("snell{r}")).unwrap_or_else(|| method.to_string());
    PAPER_MB.iter().find(|(m, me, _)| *m == model && *me == method).map(|r| r.2)
}

/// One row of the table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryRow {
    /// Model name (`vit_b16`, ...).
    pub model: String,
    /// Method name (`snella32`, ...).
    pub method: String,
    /// Images per step the plan is sized for.
    pub batch: usize,
    /// Storage precision of the frozen weights and the kept residual stream.
    pub precision: Precision,
    /// MiB per pool, in `Pool::ALL` order.
    pub pools_mib: Vec<(String, f64)>,
    /// MiB over all pools.
    pub total_mib: f64,
    /// The paper's figure in MB (= MiB), where it publishes one.
    pub paper_mb: Option<f64>,
    /// Ours / paper.
    pub ratio_to_paper: Option<f64>,
    /// Where the memory is measured rather than planned, the measurement (MiB) — filled by a GPU run.
    pub measured_mib: Option<f64>,
    /// What the backward recomputes instead of keeping.
    pub recompute: Recompute,
    /// Input resolution (pixels, square).
    pub resolution: usize,
}

/// Plans every (model, method) at `batch` and returns the rows. `num_classes` sizes the head (100, as the
/// PyTorch benchmark); `sparsity` is the initial ratio of the sparse methods. Nothing is allocated.
///
/// # Errors
/// `Invalid` for an unknown model or method name, a zero batch or class count, a sparsity outside [0, 1].
pub fn memory_rows(
    models: &[String],
    methods: &[String],
    batch: usize,
    sparsity: f32,
    num_classes: usize,
    memory: impl Into<MemoryOptions>,
) -> Result<Vec<MemoryRow>> {
    memory_rows_at(models, methods, batch, sparsity, num_classes, memory, None)
}

/// [`memory_rows`] at another input resolution (square, in pixels; the position table is resized).
///
/// # Errors
/// As [`memory_rows`], and `Invalid { option: "model config" }` for a resolution that is 0 or not a
/// multiple of the patch size.
pub fn memory_rows_at(
    models: &[String],
    methods: &[String],
    batch: usize,
    sparsity: f32,
    num_classes: usize,
    memory: impl Into<MemoryOptions>,
    resolution: Option<usize>,
) -> Result<Vec<MemoryRow>> {
    let memory = memory.into();
    let mut rows = Vec::new();
    for model in models {
        let mut cfg = ViTConfig::by_name(model, num_classes)?;
        if let Some(px) = resolution {
            cfg.img_size = (px, px);
            cfg.validate()?;
        }
        for name in methods {
            let method = Method::parse(name, sparsity)?;
            let (plan, _) = plan_model(&cfg, &method, batch, memory)?;
            let pools_mib = Pool::ALL.iter().map(|&p| (p.name().to_string(), mib(plan.pool_bytes(p)))).collect();
            let total_mib = mib(plan.total_bytes());
            let paper = paper_mb(model, &method.name());
            rows.push(MemoryRow {
                model: model.clone(),
                method: method.name(),
                batch,
                precision: memory.precision,
                pools_mib,
                total_mib,
                paper_mb: paper,
                ratio_to_paper: paper.map(|p| total_mib / p),
                measured_mib: None,
                recompute: memory.recompute,
                resolution: cfg.img_size.0,
            });
        }
    }
    Ok(rows)
}

// `write!` into a String cannot fail (its fmt::Write never returns an error), hence the unwraps below.

/// The aligned text table.
pub fn table(rows: &[MemoryRow]) -> String {
    let mut s = String::new();
    let pools: Vec<&str> = Pool::ALL.iter().map(|p| p.name()).collect();
    write!(s, "{:<9} {:<9} {:<9} {:<5} {:>5}", "model", "method", "recompute", "store", "batch").unwrap();
    for p in &pools {
        write!(s, " {:>11}", p).unwrap();
    }
    writeln!(s, " {:>10} {:>10} {:>8} {:>12}", "total MiB", "paper MB", "ours/pap", "measured MiB").unwrap();
    for r in rows {
        let rc = format!("{:?}", r.recompute).to_lowercase();
        write!(s, "{:<9} {:<9} {:<9} {:<5} {:>5}", r.model, r.method, rc, r.precision.name(), r.batch).unwrap();
        for (_, v) in &r.pools_mib {
            write!(s, " {:>11.1}", v).unwrap();
        }
        let paper = r.paper_mb.map(|p| format!("{p:.0}")).unwrap_or_else(|| "-".into());
        let ratio = r.ratio_to_paper.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
        let measured = r.measured_mib.map(|m| format!("{m:.1}")).unwrap_or_else(|| "-".into());
        writeln!(s, " {:>10.1} {:>10} {:>8} {:>12}", r.total_mib, paper, ratio, measured).unwrap();
    }
    s
}

/// Reductions the paper states, recomputed from our rows: for each model, 1 − ours(method)/ours(gps) and the
/// paper's 1 − SNELL/GPS (its "31.1%–39.9%").
pub fn reductions(rows: &[MemoryRow]) -> String {
    let mut s = String::new();
    let models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).fold(Vec::new(), |mut v, m| {
        if !v.contains(&m) {
            v.push(m)
        }
        v
    });
    for m in models {
        let Some(gps) = rows
            .iter()
            .find(|r| {
                r.model == m && r.method == "gps" && r.recompute == Recompute::None && r.precision == Precision::Fp32
            })
            .or_else(|| rows.iter().find(|r| r.model == m && r.method == "gps"))
        else {
            continue;
        };
        for r in rows.iter().filter(|r| r.model == m && r.method != "gps") {
            let paper = match (paper_mb(m, "gps"), PAPER_MB.iter().find(|x| x.0 == m && x.1 == r.method).map(|x| x.2)) {
                (Some(g), Some(x)) => format!("  (paper {}: {:.1}%)", r.method, 100.0 * (1.0 - x / g)),
                _ => String::new(),
            };
            let rc = |r: &MemoryRow| format!("{:?}, {}", r.recompute, r.precision.name()).to_lowercase();
            writeln!(
                s,
                "{m} {:<9} {:<15} uses {:5.1}% less than gps ({}){paper}",
                r.method,
                rc(r),
                100.0 * (1.0 - r.total_mib / gps.total_mib),
                rc(gps)
            )
            .unwrap();
        }
    }
    s
}

/// The rows as CSV with a header line (MiB per pool, total, paper figure, ratio, measurement).
pub fn csv(rows: &[MemoryRow]) -> String {
    let mut s = String::from("model,method,recompute,resolution,batch,precision");
    for p in Pool::ALL {
        write!(s, ",{}_mib", p.name()).unwrap();
    }
    s.push_str(",total_mib,paper_mb,ratio_to_paper,measured_mib\n");
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.3}")).unwrap_or_default();
    for r in rows {
        write!(s, "{},{},{:?},{},{},{}", r.model, r.method, r.recompute, r.resolution, r.batch, r.precision.name())
            .unwrap();
        for (_, v) in &r.pools_mib {
            write!(s, ",{v:.3}").unwrap();
        }
        writeln!(s, ",{:.3},{},{},{}", r.total_mib, opt(r.paper_mb), opt(r.ratio_to_paper), opt(r.measured_mib))
            .unwrap();
    }
    s
}

/// A grouped bar chart (one group per model, one bar per method, the paper's figure as a tick).
pub fn svg(rows: &[MemoryRow]) -> String {
    let (w, h, pad) = (1200.0, 460.0, 60.0);
    let max = rows.iter().map(|r| r.total_mib.max(r.paper_mb.unwrap_or(0.0))).fold(1.0, f64::max) * 1.1;
    let models: Vec<&str> = rows.iter().map(|r| r.model.as_str()).fold(Vec::new(), |mut v, m| {
        if !v.contains(&m) {
            v.push(m)
        }
        v
    });
    let label = |r: &MemoryRow| format!("{} ({:?}, {})", r.method, r.recompute, r.precision.name()).to_lowercase();
    let methods: Vec<String> = rows.iter().map(label).fold(Vec::new(), |mut v, m| {
        if !v.contains(&m) {
            v.push(m)
        }
        v
    });
    let colors = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1"];
    let gw = (w - 2.0 * pad) / models.len().max(1) as f64;
    let bw = gw * 0.8 / methods.len().max(1) as f64;
    let y = |v: f64| h - pad - (h - 2.0 * pad) * v / max;
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n");
    writeln!(s, "<text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">Peak training memory (MiB), planned; ticks: SNELL paper</text>", w / 2.0).unwrap();
    writeln!(s, "<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", h - pad, w - pad, h - pad)
        .unwrap();
    for (gi, m) in models.iter().enumerate() {
        let x0 = pad + gi as f64 * gw + gw * 0.1;
        writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{m}</text>", x0 + gw * 0.4, h - pad + 18.0)
            .unwrap();
        for (mi, me) in methods.iter().enumerate() {
            let Some(r) = rows.iter().find(|r| r.model == *m && label(r) == *me) else { continue };
            let x = x0 + mi as f64 * bw;
            let c = colors[mi % colors.len()];
            writeln!(s, "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{c}\"><title>{m} {me}: {:.0} MiB</title></rect>",
                y(r.total_mib), bw * 0.9, h - pad - y(r.total_mib), r.total_mib).unwrap();
            if let Some(p) = r.paper_mb {
                writeln!(
                    s,
                    "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\" stroke-width=\"2\"/>",
                    y(p),
                    x + bw * 0.9,
                    y(p)
                )
                .unwrap();
            }
        }
    }
    for (mi, me) in methods.iter().enumerate() {
        let x = pad + mi as f64 * 150.0;
        writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{me}</text>",
            h - 25.0,
            colors[mi % colors.len()],
            x + 16.0,
            h - 15.0
        )
        .unwrap();
    }
    s.push_str("</svg>\n");
    s
}

/// Runs `steps` real training steps of a row's configuration on `backend` and returns (touched MiB: the
/// pools' high-water marks, device MiB above the post-setup baseline — None on the CPU). On a GPU the
/// second number is what the plan claims to be: every byte of the step comes from the pools.
///
/// # Errors
/// `Invalid` for a row that names an unknown model or method or an impossible size; `OutOfMemory`, `Cuda`
/// from the device.
pub fn measure(
    row: &MemoryRow,
    backend: crate::runtime::Backend,
    steps: usize,
    sparsity: f32,
    num_classes: usize,
) -> Result<(f64, Option<f64>)> {
    let mut cfg = ViTConfig::by_name(&row.model, num_classes)?;
    cfg.img_size = (row.resolution, row.resolution);
    let method = Method::parse(&row.method, sparsity)?;
    let memory = MemoryOptions { recompute: row.recompute, precision: row.precision };
    let mut model = crate::model::Model::new(backend, &cfg, method, row.batch, memory)?;
    model.init_branches(0)?; // α = γ = 1: zero factors would make the mixture 0/0 (the backbone may stay 0)
    let per = cfg.in_chans * cfg.img_size.0 * cfg.img_size.1;
    let images: Vec<f32> = (0..row.batch * per).map(|i| ((i % 251) as f32) / 125.0 - 1.0).collect();
    let labels: Vec<i32> = (0..row.batch).map(|i| (i % num_classes) as i32).collect();
    model.set_batch(&images, &labels)?;
    for _ in 0..steps {
        model.forward()?;
        model.backward()?;
        model.adamw_step(1e-4, 0.05)?;
    }
    model.rt.sync()?;
    let touched: usize = model.rt.pool_report().iter().map(|(_, u)| u.peak).sum();
    let device = model.rt.device_used_above_baseline()?.map(mib);
    Ok((mib(touched), device))
}

/// Writes `text` to `path` atomically (temporary file, then rename), so no partial output is left.
///
/// # Errors
/// `Io` naming the path that could not be written; `Invalid { option: "output path" }` for a path without a
/// file name.
pub fn write_atomic(path: &std::path::Path, text: &str) -> Result<()> {
    crate::io::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_the_paper_columns() {
        let rows = memory_rows(
            &["tiny".into()],
            &["lora8".into(), "snella8".into(), "gps".into()],
            2,
            0.5,
            10,
            Recompute::Attention,
        )
        .unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.total_mib > 0.0 && r.paper_mb.is_none()));
        assert!(table(&rows).contains("snella8"));
        assert_eq!(csv(&rows).lines().count(), 4);
        assert!(svg(&rows).starts_with("<svg"));
        assert_eq!(paper_mb("vit_b16", "snell32"), Some(1673.0));
        assert_eq!(paper_mb("vit_b16", "snella32"), Some(1673.0));
        assert_eq!(paper_mb("vit_b16", "full"), None);
    }
}
