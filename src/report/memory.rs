//! `snella memory`: the peak training memory of each model × method, straight from the plan the engine
//! allocates, beside the SNELL paper's published figures (Tables A8(b) and A12: fp32, batch 8, 224 px,
//! MB = torch.cuda.max_memory_allocated / 2^20), as text, JSON, CSV and a bar chart (SVG or PNG, `crate::plot`).
use std::fmt::Write;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::Result;
use crate::model::{plan_model, MemoryOptions, Precision, Recompute, ViTConfig};
use crate::peft::Method;
use crate::plot::{self, text, Chart, Drawn, PALETTE};
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
    /// The branch factors are updated inside the backward ([`MemoryOptions::fused_update`]).
    pub fused_update: bool,
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
            let (plan, layout) = plan_model(&cfg, &method, batch, memory)?;
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
                fused_update: layout.fused_update,
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
    for m in distinct(rows.iter().map(|r| r.model.as_str())) {
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

/// The memory chart: one group of bars per model, one bar per (method, recompute, precision), the total planned
/// (or measured) MiB, and the paper's figure as a black tick on the bar it compares with.
struct MemoryChart<'a> {
    rows: &'a [MemoryRow],
    models: Vec<&'a str>,
    /// One legend entry per (method, recompute, precision), in row order, with its colour.
    series: Vec<(String, RGBColor)>,
}

/// A row's bar label: `snella32 (block, fp32)`.
fn series_label(r: &MemoryRow) -> String {
    format!("{} ({:?}, {})", r.method, r.recompute, r.precision.name()).to_lowercase()
}

/// The values in order of first appearance, once each.
fn distinct<T: PartialEq>(it: impl Iterator<Item = T>) -> Vec<T> {
    it.fold(Vec::new(), |mut v, x| {
        if !v.contains(&x) {
            v.push(x)
        }
        v
    })
}

impl<'a> MemoryChart<'a> {
    fn new(rows: &'a [MemoryRow]) -> Self {
        // A hue per method and a lighter shade per (recompute, precision), so that up to 40 bars stay apart
        // and a method's variants read as one family.
        let methods = distinct(rows.iter().map(|r| r.method.as_str()));
        let variants = distinct(rows.iter().map(|r| (r.recompute, r.precision)));
        let colour = |r: &MemoryRow| {
            let base = PALETTE[methods.iter().position(|m| *m == r.method).unwrap_or(0) % PALETTE.len()];
            let v = variants.iter().position(|v| *v == (r.recompute, r.precision)).unwrap_or(0);
            let t = 0.6 * v as f64 / variants.len().max(2) as f64;
            let lift = |c: u8| (c as f64 + (255.0 - c as f64) * t).round() as u8;
            RGBColor(lift(base.0), lift(base.1), lift(base.2))
        };
        MemoryChart {
            rows,
            models: distinct(rows.iter().map(|r| r.model.as_str())),
            series: distinct(rows.iter().map(|r| (series_label(r), colour(r)))),
        }
    }
}

impl Chart for MemoryChart<'_> {
    fn size(&self) -> (u32, u32) {
        // Tall enough for the legend: about 19 px an entry.
        (1200, 560.max(140 + 19 * self.series.len() as u32))
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let measured = self.rows.iter().any(|r| r.measured_mib.is_some());
        let value = |r: &MemoryRow| r.measured_mib.unwrap_or(r.total_mib);
        let top = self.rows.iter().map(|r| value(r).max(r.paper_mb.unwrap_or(0.0))).fold(1.0, f64::max) * 1.12;
        let caption = format!(
            "Peak training memory (MiB), {}; black ticks: SNELL paper (MB)",
            if measured { "measured" } else { "planned" }
        );
        // Group g is centred on x = g, so the group centres are the whole numbers plotters puts ticks on.
        let groups = self.models.len().max(1);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, text(19.0))
            .margin(14)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..groups as f64 - 0.5, 0.0..top)?;
        let models = &self.models;
        let model_at = |x: &f64| match (x - x.round()).abs() < 1e-6 && *x >= 0.0 {
            true => models.get(x.round() as usize).map(|m| m.to_string()).unwrap_or_default(),
            false => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("MiB")
            .x_labels(groups)
            .x_label_formatter(&model_at)
            .y_label_formatter(&|y: &f64| format!("{y:.0}"))
            .label_style(text(14.0))
            .axis_desc_style(text(14.0))
            .light_line_style(BLACK.mix(0.04))
            .bold_line_style(BLACK.mix(0.12))
            .draw()?;
        let width = 0.84 / self.series.len().max(1) as f64;
        for (si, (label, colour)) in self.series.iter().enumerate() {
            let colour = *colour;
            let bars = self.models.iter().enumerate().filter_map(|(gi, m)| {
                let r = self.rows.iter().find(|r| r.model == *m && series_label(r) == *label)?;
                let x = gi as f64 - 0.42 + si as f64 * width;
                Some(Rectangle::new([(x, 0.0), (x + width * 0.9, value(r))], colour.filled()))
            });
            chart
                .draw_series(bars)?
                .label(label.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
            let ticks = self.models.iter().enumerate().filter_map(|(gi, m)| {
                let r = self.rows.iter().find(|r| r.model == *m && series_label(r) == *label)?;
                let x = gi as f64 - 0.42 + si as f64 * width;
                r.paper_mb.map(|p| PathElement::new(vec![(x, p), (x + width * 0.9, p)], BLACK.stroke_width(3)))
            });
            chart.draw_series(ticks)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(text(13.0))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.3))
            .draw()
    }
}

/// The memory chart as SVG: one group of bars per model, one bar per method (with its recompute level and
/// precision), the measured MiB where measured, else the planned; the paper's figure as a black tick.
///
/// # Errors
/// `Invalid { option: "picture" }` when the chart cannot be drawn.
pub fn svg(rows: &[MemoryRow]) -> Result<String> {
    plot::svg(&MemoryChart::new(rows), "the memory chart")
}

/// The memory chart of [`svg`] as a PNG file.
///
/// # Errors
/// `Invalid { option: "picture" }` when the chart cannot be drawn or encoded.
pub fn png(rows: &[MemoryRow]) -> Result<Vec<u8>> {
    plot::png(&MemoryChart::new(rows), "the memory chart")
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
    let memory = MemoryOptions { recompute: row.recompute, precision: row.precision, fused_update: row.fused_update };
    let mut model = crate::model::Model::new(backend, &cfg, method, row.batch, memory)?;
    model.init_branches(0)?; // α = γ = 1: zero factors would make the mixture 0/0 (the backbone may stay 0)
    model.waive_params_check(); // bytes, not values: the zero backbone may step here
    let per = cfg.in_chans * cfg.img_size.0 * cfg.img_size.1;
    let images: Vec<f32> = (0..row.batch * per).map(|i| ((i % 251) as f32) / 125.0 - 1.0).collect();
    let labels: Vec<i32> = (0..row.batch).map(|i| (i % num_classes) as i32).collect();
    model.set_batch(&images, &labels)?;
    for _ in 0..steps {
        model.forward()?;
        model.backward_step(1e-4, 0.05, None)?;
    }
    model.rt.sync()?;
    let touched: usize = model.rt.pool_report().iter().map(|(_, u)| u.peak).sum();
    let device = model.rt.device_used_above_baseline()?.map(mib);
    Ok((mib(touched), device))
}

/// Writes `bytes` (a table, a chart) to `path` atomically (temporary file, then rename), so no partial output
/// is left.
///
/// # Errors
/// `Io` naming the path that could not be written; `Invalid { option: "output path" }` for a path without a
/// file name.
pub fn write_atomic(path: &std::path::Path, bytes: impl AsRef<[u8]>) -> Result<()> {
    crate::io::write_atomic(path, bytes.as_ref())
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
        let chart = svg(&rows).unwrap();
        assert!(chart.starts_with("<svg") && chart.contains("snella8 (attention, fp32)"), "{chart}");
        let png = image::load_from_memory(&png(&rows).unwrap()).unwrap();
        assert_eq!((png.width(), png.height()), (1200, 560));
        assert_eq!(paper_mb("vit_b16", "snell32"), Some(1673.0));
        assert_eq!(paper_mb("vit_b16", "snella32"), Some(1673.0));
        assert_eq!(paper_mb("vit_b16", "full"), None);
    }
}
