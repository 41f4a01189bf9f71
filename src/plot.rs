//! Pictures: every chart the engine draws (the curves and the allocation map of a run, the memory chart) is
//! drawn by one function on any plotters backend, so its SVG and its PNG come from the same code, and is written
//! atomically (`io::write_atomic`).
//!
//! Text is drawn with DejaVu Sans compiled into the binary (the `dejavu` crate, through plotters' `ab_glyph`
//! path): no system font or fontconfig is looked up, so a fresh machine and CI draw the same pixels. The SVG
//! names the family `sans-serif`, which a browser draws with its own font.
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::io::write_atomic;

/// The font family of every picture: DejaVu Sans, embedded (see [`ensure_font`]).
pub(crate) const FONT: &str = "sans-serif";

/// Tableau's ten colours, distinguishable for most forms of colour blindness; series take them in order.
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0xff, 0x9d, 0xa7),
    RGBColor(0x9c, 0x75, 0x5f),
    RGBColor(0xba, 0xb0, 0xac),
];

/// What a chart's drawing returns: plotters' error of the backend it draws on.
pub(crate) type Drawn<DB> = std::result::Result<(), DrawingAreaErrorKind<<DB as DrawingBackend>::ErrorType>>;

/// A chart that draws itself on any plotters backend.
pub(crate) trait Chart {
    /// Width and height in pixels.
    fn size(&self) -> (u32, u32);
    /// Draws on `area`, which is already filled white.
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Drawn<DB>;
}

/// Registers DejaVu Sans (regular and bold) as [`FONT`] for plotters' text, once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::invalid("picture", "the embedded DejaVu Sans font could not be read"))
    }
}

/// Runs a drawing, turning plotters' error, or a panic inside plotters, into `Invalid { option: "picture" }`
/// naming `what`.
fn drawing<E: std::fmt::Display>(what: &str, f: impl FnOnce() -> std::result::Result<(), E>) -> Result<()> {
    ensure_font()?;
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::invalid("picture", format!("{what}: {e}"))),
        Err(_) => Err(Error::invalid("picture", format!("{what}: the plotting library panicked"))),
    }
}

/// The chart as an SVG document.
///
/// # Errors
/// `Invalid { option: "picture" }` naming `what` when plotters cannot draw it.
pub(crate) fn svg(chart: &impl Chart, what: &str) -> Result<String> {
    let mut text = String::new();
    drawing(what, || {
        let area = SVGBackend::with_string(&mut text, chart.size()).into_drawing_area();
        area.fill(&WHITE)?;
        chart.draw(&area)?;
        area.present()
    })?;
    Ok(text)
}

/// The chart as a PNG file (8-bit RGB).
///
/// # Errors
/// `Invalid { option: "picture" }` naming `what` when plotters cannot draw it or the PNG cannot be encoded.
pub(crate) fn png(chart: &impl Chart, what: &str) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let (w, h) = chart.size();
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    drawing(what, || {
        let area = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        area.fill(&WHITE)?;
        chart.draw(&area)?;
        area.present()
    })?;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&rgb, w, h, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::invalid("picture", format!("{what}: PNG encoding failed: {e}")))?;
    Ok(out)
}

/// Writes `<dir>/<stem>.png` and `<dir>/<stem>.svg`, each atomically; returns their paths.
///
/// # Errors
/// As [`svg`] and [`png`]; `Io` naming the file that cannot be written (no partial file is left).
pub(crate) fn write_both(chart: &impl Chart, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let (png_path, svg_path) = (dir.join(format!("{stem}.png")), dir.join(format!("{stem}.svg")));
    let (png_bytes, svg_text) =
        (png(chart, &png_path.display().to_string())?, svg(chart, &svg_path.display().to_string())?);
    write_atomic(&png_path, &png_bytes)?;
    write_atomic(&svg_path, svg_text.as_bytes())?;
    Ok(vec![png_path, svg_path])
}

/// A text style of [`FONT`] at `size` pixels.
pub(crate) fn text(size: f64) -> TextStyle<'static> {
    (FONT, size).into_font().into()
}

/// `[lo, hi]` widened by `pad` of its span on both sides, and made non-empty (a flat series gets ±5%, or ±0.5 at 0).
pub(crate) fn padded(lo: f64, hi: f64, pad: f64) -> (f64, f64) {
    let span = hi - lo;
    if span > 1e-12 * hi.abs().max(lo.abs()) {
        (lo - pad * span, hi + pad * span)
    } else {
        let d = if hi == 0.0 { 0.5 } else { 0.05 * hi.abs() };
        (lo - d, hi + d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A red square on white: the PNG has its pixels where they should be, the SVG the same rectangle.
    struct Square;
    impl Chart for Square {
        fn size(&self) -> (u32, u32) {
            (40, 30)
        }
        fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Drawn<DB> {
            area.draw(&Rectangle::new([(10, 5), (20, 15)], RED.filled()))?;
            area.draw(&Text::new("x", (25, 20), text(10.0)))
        }
    }

    #[test]
    fn one_chart_draws_the_same_picture_as_png_and_svg() {
        let img = image::load_from_memory(&png(&Square, "square").unwrap()).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (40, 30));
        assert_eq!(img.get_pixel(15, 10).0, [255, 0, 0]);
        assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
        // The embedded font drew the glyph: some pixels right of the square are neither white nor red.
        let inked = (25..35).flat_map(|x| (12..30).map(move |y| (x, y))).any(|(x, y)| {
            let p = img.get_pixel(x, y).0;
            p != [255, 255, 255] && p != [255, 0, 0]
        });
        assert!(inked, "no text drawn");
        let s = svg(&Square, "square").unwrap();
        assert!(s.starts_with("<svg") && s.contains("#FF0000") && s.contains("\nx\n</text>"), "{s}");
    }

    #[test]
    fn padded_ranges_are_never_empty() {
        assert_eq!(padded(0.0, 10.0, 0.1), (-1.0, 11.0));
        assert_eq!(padded(2.0, 2.0, 0.1), (1.9, 2.1));
        assert_eq!(padded(0.0, 0.0, 0.1), (-0.5, 0.5));
    }
}
