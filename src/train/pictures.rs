//! The pictures of a run, drawn from its `metrics.jsonl` lines as PNG and SVG into the run folder:
//!
//! * `curves.{png,svg}`: training and test loss, top-1 accuracy and the learning rate over the epochs (test
//!   points only where the epoch was evaluated);
//! * `allocation.{png,svg}` (the sparse kernel methods, whose lines record per-branch sparsity: SNELL and
//!   SNELLA): the **allocation map**, one row per branch (block and position, in module order) and one column
//!   per epoch, the colour the fraction of the branch's entries kept (|M| > t) at the end of that epoch. For
//!   SNELLA it shows where the allocator moved the budget; SNELL's fixed ratio gives a flat map.
//!
//! The trainer draws them after every evaluated epoch and at the start of every session, from the lines the
//! checkpoint counts (the rule of `train/checkpoint.rs`); `snella plot RUN_DIR` redraws them from the file,
//! so a finished or copied run can be drawn again. They read the lines as the file format they are (one JSON
//! object per line, `trainer::EpochMetrics`), so a line of an older build still draws.
use std::path::{Path, PathBuf};

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::plot::{padded, text, write_both, Chart, Drawn, PALETTE};

/// The file stem of the curves (`curves.png`, `curves.svg`).
pub const CURVES: &str = "curves";
/// The file stem of the allocation map (`allocation.png`, `allocation.svg`).
pub const ALLOCATION: &str = "allocation";
/// Every picture file a run folder can hold.
pub const PICTURE_FILES: [&str; 4] = ["curves.png", "curves.svg", "allocation.png", "allocation.svg"];

/// The fields of a metrics line that the pictures show.
#[derive(Clone, Debug, serde::Deserialize)]
struct Line {
    epoch: usize,
    lr: Option<f64>,
    train_loss: Option<f64>,
    train_acc: Option<f64>,
    test_loss: Option<f64>,
    test_acc: Option<f64>,
    #[serde(default)]
    layers: Vec<LayerLine>,
    kept_total: Option<f64>,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct LayerLine {
    branch: String,
    kept: Option<f64>,
}

/// Draws the pictures of `lines` (metrics lines, as the trainer keeps them) into `dir`, each file written
/// atomically, and returns the paths written: the curves when there is a line, the allocation map when a line
/// records per-branch sparsity. `title` heads every picture (e.g. the method and the run folder).
///
/// # Errors
/// `Invalid { option: "metrics" }` for a line that is not a metrics line; `Invalid { option: "picture" }` when a
/// picture cannot be drawn; `Io` naming a file that cannot be written.
pub fn draw(dir: &Path, lines: &[String], title: &str) -> Result<Vec<PathBuf>> {
    let parsed = parse(lines.iter().map(String::as_str), |i, e| {
        Error::invalid("metrics", format!("line {} is not a metrics line: {e}", i + 1))
    })?;
    draw_parsed(dir, &parsed, title)
}

/// Reads a `metrics.jsonl` and draws its pictures into `dir` (see [`draw`]). Blank lines are skipped.
///
/// # Errors
/// `Io` naming the file when it cannot be read; `Format` naming it and the line that is not a metrics line (a
/// run killed mid-line leaves a torn last line: resuming it repairs the file); as [`draw`] otherwise.
pub fn redraw(metrics: &Path, dir: &Path, title: &str) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let parsed = parse(text.lines().filter(|l| !l.trim().is_empty()), |i, e| {
        Error::format(
            metrics,
            format!("line {} is not a metrics line ({e}); a torn last line is repaired by resuming the run", i + 1),
        )
    })?;
    if parsed.is_empty() {
        return Err(Error::format(metrics, "holds no metrics line: the run has not finished an epoch"));
    }
    draw_parsed(dir, &parsed, title)
}

fn parse<'a>(
    lines: impl Iterator<Item = &'a str>,
    bad: impl Fn(usize, serde_json::Error) -> Error,
) -> Result<Vec<Line>> {
    lines.enumerate().map(|(i, l)| serde_json::from_str::<Line>(l).map_err(|e| bad(i, e))).collect()
}

fn draw_parsed(dir: &Path, lines: &[Line], title: &str) -> Result<Vec<PathBuf>> {
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let mut written = write_both(&Curves::new(lines, title), dir, CURVES)?;
    if let Some(map) = AllocationMap::new(lines, title) {
        written.extend(write_both(&map, dir, ALLOCATION)?);
    }
    Ok(written)
}

/// A finite value, or nothing.
fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

/// At most ten epoch ticks: plotters picks steps of 1, 2, 5, 10, ... epochs, so they fall on whole epochs.
fn epoch_labels(epochs: usize) -> usize {
    epochs.clamp(1, 10)
}

/// A tick label of a whole number; other ticks get none.
fn whole(v: &f64) -> String {
    if (v - v.round()).abs() < 1e-6 {
        format!("{v:.0}")
    } else {
        String::new()
    }
}

/// One series of a panel: its name, colour and points (epoch, value).
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

/// Loss, accuracy and learning rate over the epochs, in three panels side by side.
struct Curves {
    title: String,
    epochs: usize,
    loss: Vec<Series>,
    acc: Vec<Series>,
    lr: Vec<Series>,
    /// The learning rate is drawn as log10 (every value positive).
    lr_log: bool,
}

impl Curves {
    fn new(lines: &[Line], title: &str) -> Curves {
        let epochs = lines.iter().map(|l| l.epoch + 1).max().unwrap_or(1);
        let pts = |f: &dyn Fn(&Line) -> Option<f64>| -> Vec<(f64, f64)> {
            lines.iter().filter_map(|l| finite(f(l)).map(|v| ((l.epoch + 1) as f64, v))).collect()
        };
        let (train, test) = (PALETTE[0], PALETTE[1]);
        let lr_pts = pts(&|l| l.lr);
        // A log scale when the rate spans a decade or more (warm-up from 1e-6, cosine to 1e-5), else linear.
        let (lo, hi) = lr_pts.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
        let lr_log = !lr_pts.is_empty() && lo > 0.0 && hi / lo >= 10.0;
        let lr = if lr_log { lr_pts.iter().map(|&(e, v)| (e, v.log10())).collect() } else { lr_pts };
        Curves {
            title: format!("{title}: training curves"),
            epochs,
            loss: vec![("train", train, pts(&|l| l.train_loss)), ("test", test, pts(&|l| l.test_loss))],
            acc: vec![
                ("train", train, pts(&|l| l.train_acc.map(|a| 100.0 * a))),
                ("test", test, pts(&|l| l.test_acc.map(|a| 100.0 * a))),
            ],
            lr: vec![("learning rate", PALETTE[4], lr)],
            lr_log,
        }
    }

    /// One panel: line (and, for short runs, point) series over the epochs, with a legend.
    fn panel<DB: DrawingBackend>(
        &self,
        area: &DrawingArea<DB, Shift>,
        caption: &str,
        series: &[Series],
        y_range: (f64, f64),
        y_fmt: &dyn Fn(&f64) -> String,
        legend: SeriesLabelPosition,
    ) -> Drawn<DB> {
        let x = (0.5, self.epochs as f64 + 0.5);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, text(17.0))
            .margin(10)
            .x_label_area_size(42)
            .y_label_area_size(62)
            .build_cartesian_2d(x.0..x.1, y_range.0..y_range.1)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .x_labels(epoch_labels(self.epochs))
            .x_label_formatter(&whole)
            .y_label_formatter(y_fmt)
            .label_style(text(13.0))
            .axis_desc_style(text(14.0))
            .light_line_style(TRANSPARENT)
            .bold_line_style(BLACK.mix(0.12))
            .draw()?;
        let mut labelled = false;
        for (name, color, pts) in series {
            if pts.is_empty() {
                continue;
            }
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(*name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], color.stroke_width(2)));
            labelled = true;
            if pts.len() <= 40 {
                chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
            }
        }
        if labelled && series.len() > 1 {
            chart
                .configure_series_labels()
                .position(legend)
                .label_font(text(13.0))
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.3))
                .draw()?;
        }
        Ok(())
    }
}

/// The lowest and highest value over the series, if any.
fn bounds(series: &[Series]) -> Option<(f64, f64)> {
    let mut it = series.iter().flat_map(|s| s.2.iter().map(|p| p.1));
    let first = it.next()?;
    Some(it.fold((first, first), |(lo, hi), v| (lo.min(v), hi.max(v))))
}

impl Chart for Curves {
    fn size(&self) -> (u32, u32) {
        (1500, 460)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let area = area.titled(&self.title, text(20.0))?;
        let panels = area.split_evenly((1, 3));
        let (lo, hi) = bounds(&self.loss).unwrap_or((0.0, 1.0));
        let loss_range = padded(lo.min(0.0), hi, 0.06);
        let fmt2 = |v: &f64| format!("{v:.2}");
        self.panel(&panels[0], "loss (cross-entropy)", &self.loss, loss_range, &fmt2, SeriesLabelPosition::UpperRight)?;
        let pct = |v: &f64| format!("{v:.0}%");
        self.panel(&panels[1], "top-1 accuracy", &self.acc, (0.0, 100.0), &pct, SeriesLabelPosition::LowerRight)?;
        let (lo, hi) = bounds(&self.lr).unwrap_or((0.0, 1.0));
        if self.lr_log {
            let range = padded(lo, hi, 0.08);
            let exp = |v: &f64| format!("{:.1e}", 10f64.powf(*v));
            self.panel(&panels[2], "learning rate (log scale)", &self.lr, range, &exp, SeriesLabelPosition::UpperRight)
        } else {
            let range = padded(lo.min(0.0), hi, 0.08);
            let sci = |v: &f64| if *v == 0.0 { "0".into() } else { format!("{v:.1e}") };
            self.panel(&panels[2], "learning rate", &self.lr, range, &sci, SeriesLabelPosition::UpperRight)
        }
    }
}

/// Layers × epochs, the colour the kept fraction.
struct AllocationMap {
    title: String,
    /// Row labels, module order (`3 q`: block 3, branch q).
    rows: Vec<String>,
    /// Rows where a new block starts (a separator is drawn above them).
    block_starts: Vec<usize>,
    /// 1-based epochs of the columns.
    epochs: Vec<usize>,
    /// kept[c][r]: kept fraction of row r at the end of column c's epoch (None: not recorded).
    kept: Vec<Vec<Option<f64>>>,
    /// The colour scale: lowest and highest kept fraction shown.
    scale: (f64, f64),
}

/// `branch.blocks.3.attn.q` → (block 3, `3 q`); another name is its own label.
fn row_label(branch: &str) -> (Option<usize>, String) {
    let rest = branch.strip_prefix("branch.blocks.").unwrap_or(branch);
    let parts: Vec<&str> = rest.split('.').collect();
    match (parts.first().and_then(|b| b.parse::<usize>().ok()), parts.last()) {
        (Some(b), Some(pos)) if parts.len() >= 2 => (Some(b), format!("{b} {pos}")),
        _ => (None, rest.to_string()),
    }
}

/// Cell height in pixels for `n` rows: every row labelled up to 90 rows, else thin rows and block labels only.
fn row_px(n: usize) -> u32 {
    if n <= 90 {
        13
    } else {
        (1100 / n as u32).clamp(3, 8)
    }
}

impl AllocationMap {
    /// The map of the lines that record per-branch sparsity; None when none does.
    fn new(lines: &[Line], title: &str) -> Option<AllocationMap> {
        let first = lines.iter().find(|l| !l.layers.is_empty())?;
        let names: Vec<&str> = first.layers.iter().map(|l| l.branch.as_str()).collect();
        let mut rows = Vec::new();
        let mut block_starts = Vec::new();
        let mut last_block = None;
        for (r, name) in names.iter().enumerate() {
            let (block, label) = row_label(name);
            if r > 0 && block != last_block {
                block_starts.push(r);
            }
            last_block = block;
            rows.push(label);
        }
        let (mut epochs, mut kept) = (Vec::new(), Vec::new());
        for l in lines.iter().filter(|l| !l.layers.is_empty()) {
            epochs.push(l.epoch + 1);
            let col = names
                .iter()
                .map(|n| finite(l.layers.iter().find(|x| x.branch == *n).and_then(|x| x.kept)))
                .collect::<Vec<_>>();
            kept.push(col);
        }
        let all: Vec<f64> = kept.iter().flatten().flatten().copied().collect();
        let lo = all.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = all.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let scale = if all.is_empty() {
            (0.0, 1.0)
        } else if hi - lo < 1e-3 {
            ((lo - 0.05).max(0.0), (hi + 0.05).min(1.0).max(lo + 1e-3))
        } else {
            (lo, hi)
        };
        let overall: Vec<String> = lines
            .iter()
            .filter(|l| !l.layers.is_empty())
            .filter_map(|l| finite(l.kept_total))
            .map(|k| format!("{k:.2}"))
            .collect();
        let summary = match overall.as_slice() {
            [] => String::new(),
            [one] => format!(" (overall {one})"),
            [a, .., b] => format!(" (overall {a} → {b})"),
        };
        let title = format!("{title}: kept fraction per branch{summary}");
        Some(AllocationMap { title, rows, block_starts, epochs, kept, scale })
    }

    fn colour(&self, v: Option<f64>) -> RGBColor {
        let Some(v) = v else { return RGBColor(0xdd, 0xdd, 0xdd) };
        let (lo, hi) = self.scale;
        let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
        ViridisRGB.get_color(t as f32)
    }

    fn label_rows(&self) -> Vec<usize> {
        if self.rows.len() <= 90 {
            (0..self.rows.len()).collect()
        } else {
            std::iter::once(0).chain(self.block_starts.iter().copied()).collect()
        }
    }
}

/// Pixel sizes of the map's parts.
const MAP_LABELS: u32 = 78;
const MAP_BAR: u32 = 150;

impl Chart for AllocationMap {
    fn size(&self) -> (u32, u32) {
        let col = (900 / self.epochs.len().max(1) as u32).clamp(8, 90);
        let w = (MAP_LABELS + 40 + col * self.epochs.len() as u32 + MAP_BAR).max(720);
        let h = 130 + row_px(self.rows.len()) * self.rows.len() as u32;
        (w, h)
    }

    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Drawn<DB> {
        let area = area.titled(&self.title, text(18.0))?;
        let (w, _) = area.dim_in_pixel();
        let (map_area, bar_area) = area.split_horizontally(w.saturating_sub(MAP_BAR));
        let n = self.rows.len();
        let last = *self.epochs.last().unwrap_or(&1);
        // Row r is centred on y = n-1-r, so the first branch is on top and every row centre is a whole number.
        let centre = |r: usize| (n - 1 - r) as f64;
        let mut chart = ChartBuilder::on(&map_area)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(MAP_LABELS)
            .build_cartesian_2d(0.5..last as f64 + 0.5, -0.5..n as f64 - 0.5)?;
        let labelled = self.label_rows();
        let label = |y: &f64| {
            let r = n as f64 - 1.0 - y.round();
            match (r >= 0.0 && (y - y.round()).abs() < 1e-6).then_some(r as usize) {
                Some(r) if labelled.contains(&r) => self.rows.get(r).cloned().unwrap_or_default(),
                _ => String::new(),
            }
        };
        chart
            .configure_mesh()
            .disable_mesh()
            .x_desc("epoch")
            .y_desc("block, branch")
            .x_labels(epoch_labels(last))
            .x_label_formatter(&whole)
            .y_labels(n)
            .y_label_formatter(&label)
            .x_label_style(text(13.0))
            .y_label_style(text(if n <= 90 { 11.0 } else { 12.0 }))
            .axis_desc_style(text(14.0))
            .draw()?;
        for (c, &e) in self.epochs.iter().enumerate() {
            let x = e as f64;
            chart.draw_series((0..n).map(|r| {
                let y = centre(r);
                Rectangle::new([(x - 0.5, y - 0.5), (x + 0.5, y + 0.5)], self.colour(self.kept[c][r]).filled())
            }))?;
        }
        // A white line between blocks.
        chart.draw_series(self.block_starts.iter().map(|&r| {
            let y = centre(r) + 0.5;
            PathElement::new(vec![(0.5, y), (last as f64 + 0.5, y)], WHITE.stroke_width(2))
        }))?;
        // The colour bar.
        let (lo, hi) = self.scale;
        let mut bar = ChartBuilder::on(&bar_area)
            .margin_top(10)
            .margin_bottom(50)
            .margin_right(40)
            .margin_left(6)
            .caption("kept", text(14.0))
            // Labels on the left: plotters mis-aligns right-hand labels with the embedded font.
            .y_label_area_size(52)
            .build_cartesian_2d(0.0..1.0, lo..hi)?;
        let steps = 128;
        bar.draw_series((0..steps).map(|i| {
            let (a, b) = (lo + (hi - lo) * i as f64 / steps as f64, lo + (hi - lo) * (i + 1) as f64 / steps as f64);
            Rectangle::new([(0.0, a), (1.0, b)], self.colour(Some((a + b) / 2.0)).filled())
        }))?;
        // The axis after the colours, so that no colour covers a label.
        bar.configure_mesh()
            .disable_mesh()
            .disable_x_axis()
            .y_labels(6)
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style(text(12.0))
            .draw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(epoch: usize, kept: &[f64], test: bool) -> String {
        line_lr(epoch, kept, test, 1e-3 * 0.1f64.powi(epoch as i32))
    }

    fn line_lr(epoch: usize, kept: &[f64], test: bool, lr: f64) -> String {
        let layers: Vec<String> = kept
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let pos = ["q", "k", "v", "proj", "fc1", "fc2"][i % 6];
                let group = if i % 6 >= 4 { "mlp" } else { "attn" };
                format!(r#"{{"branch":"branch.blocks.{}.{group}.{pos}","sparsity":{},"kept":{k}}}"#, i / 6, 1.0 - k)
            })
            .collect();
        let test = if test { format!("{:.3}", 1.0 / (epoch + 1) as f64) } else { "null".into() };
        format!(
            r#"{{"epoch":{epoch},"step":{},"lr":{},"train_loss":{},"train_acc":0.5,"test_loss":{test},"test_acc":{test},"seconds":1.0,"layers":[{}],"kept_total":0.5}}"#,
            10 * (epoch + 1),
            lr,
            2.0 / (epoch + 1) as f64,
            layers.join(",")
        )
    }

    #[test]
    fn only_whole_epochs_are_labelled() {
        assert_eq!((whole(&3.0), whole(&2.5), whole(&-0.0)), ("3".into(), String::new(), "-0".into()));
        assert_eq!((epoch_labels(0), epoch_labels(3), epoch_labels(100)), (1, 3, 10));
    }

    #[test]
    fn the_map_has_one_row_per_branch_and_one_column_per_epoch_coloured_by_kept() {
        let kept = [1.0, 0.75, 0.5, 0.25, 0.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5];
        let lines = [line(0, &kept, true), line(1, &kept, false), line(2, &kept, true)];
        let parsed = parse(lines.iter().map(String::as_str), |_, e| Error::invalid("metrics", e.to_string())).unwrap();
        let map = AllocationMap::new(&parsed, "t").unwrap();
        assert_eq!(map.rows.len(), 12);
        assert_eq!(map.rows[3], "0 proj");
        assert_eq!(map.block_starts, [6]);
        assert_eq!(map.epochs, [1, 2, 3]);
        assert_eq!(map.scale, (0.0, 1.0));
        // The extremes get the ends of the colour scale, and the SVG has a cell of each.
        let (top, bottom) = (ViridisRGB.get_color(1.0f32), ViridisRGB.get_color(0.0f32));
        assert_eq!(map.colour(Some(1.0)), top);
        assert_eq!(map.colour(Some(0.0)), bottom);
        assert_ne!(map.colour(Some(0.25)), map.colour(Some(0.5)));
        let svg = crate::plot::svg(&map, "map").unwrap();
        let hex = |c: RGBColor| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2);
        // 3 epochs of the one cell at each end (the colour bar adds its own ends).
        assert!(svg.matches(&format!("fill=\"{}\"", hex(top))).count() >= 3, "no cell at the top of the scale");
        assert!(svg.matches(&format!("fill=\"{}\"", hex(bottom))).count() >= 3, "no cell at the bottom");
        assert!(svg.contains("0 proj") && svg.contains("1 fc2"), "row labels");
    }

    #[test]
    fn curves_show_test_points_only_where_evaluated_and_the_lr_on_a_log_scale() {
        let lines = [line(0, &[], true), line(1, &[], false), line(2, &[], true)];
        let parsed = parse(lines.iter().map(String::as_str), |_, e| Error::invalid("metrics", e.to_string())).unwrap();
        let c = Curves::new(&parsed, "t");
        assert_eq!(c.loss[0].2.len(), 3);
        assert_eq!(c.loss[1].2, [(1.0, 1.0), (3.0, 0.333)]);
        assert!(c.lr_log && (c.lr[0].2[0].1 - (-3.0)).abs() < 1e-12, "1e-3 to 1e-5: a log scale");
        let flat: Vec<String> = (0..3).map(|e| line_lr(e, &[], true, 1e-3)).collect();
        let parsed = parse(flat.iter().map(String::as_str), |_, e| Error::invalid("metrics", e.to_string())).unwrap();
        let c = Curves::new(&parsed, "t");
        assert!(!c.lr_log && c.lr[0].2.iter().all(|p| p.1 == 1e-3), "a constant rate on a linear scale: {:?}", c.lr);
        assert!(AllocationMap::new(&parsed, "t").is_none(), "no map without per-branch sparsity");
    }

    #[test]
    fn a_bad_line_is_named() {
        let e = draw(Path::new("/nonexistent"), &["{\"epoch\": 0}".into(), "not json".into()], "t").unwrap_err();
        assert!(e.to_string().contains("line 2 is not a metrics line"), "{e}");
    }
}
