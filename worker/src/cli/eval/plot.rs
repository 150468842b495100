//! `roc.png` and `pr.png`, drawn by the worker itself (plotters' bitmap backend into an RGB
//! buffer, encoded by `image`), so the report needs no Python or browser to make.
//!
//! Text is set in DejaVu Sans embedded in the binary (the `dejavu` crate; the fonts' own
//! licence is the Bitstream Vera / DejaVu licence, free to embed and redistribute): nothing
//! depends on the fonts a machine or a container image happens to have. Every plot is
//! [`WIDTH`]×[`HEIGHT`] pixels on a white background; a curve that is undefined on the data
//! (one class only) is drawn as empty axes with the reason written on them.

use std::sync::Once;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::metrics::Undefined;
use super::EvalError;

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 600;
/// Every plot's font family, registered once with the embedded font.
const FAMILY: &str = "sans-serif";

const CURVE: RGBColor = RGBColor(31, 90, 180);
pub const MARK: RGBColor = RGBColor(210, 40, 40);
pub const SECOND_MARK: RGBColor = RGBColor(240, 150, 0);

/// The plots' font family, registered with the embedded font.
pub fn family() -> &'static str {
    register_font();
    FAMILY
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is a valid TrueType file; a failure would be a packaging bug.
        plotters::style::register_font(FAMILY, FontStyle::Normal, dejavu::sans::regular())
            .unwrap_or_else(|_| panic!("the embedded DejaVu Sans does not parse. This is a bug."));
    });
}

/// A curve to plot: its points (or why there are none), a point to mark, and the legend.
pub struct Plot<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub points: Result<Vec<(f64, f64)>, Undefined>,
    /// Drawn as a straight dashed reference line (the ROC's chance diagonal, PR's prevalence).
    pub reference: Option<[(f64, f64); 2]>,
    /// Draw the points as a step function (precision–recall), not straight segments.
    pub steps: bool,
    pub legend: String,
    /// (x, y, label, colour) marked with a dot: the operating point in [`MARK`] red.
    pub marks: Vec<(f64, f64, String, RGBColor)>,
}

/// The plot as a PNG file's bytes.
pub fn png(plot: &Plot) -> Result<Vec<u8>, EvalError> {
    register_font();
    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    draw(plot, &mut buf).map_err(|e| EvalError::Plot(format!("{}: {e}", plot.title)))?;
    let img = image::RgbImage::from_raw(WIDTH, HEIGHT, buf).expect("buffer of WIDTH × HEIGHT");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| EvalError::Plot(format!("{}: {e}", plot.title)))?;
    Ok(out.into_inner())
}

fn draw(plot: &Plot, buf: &mut [u8]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(plot.title, (FAMILY, 26))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..1.0f64, 0f64..1.02f64)?;
    chart
        .configure_mesh()
        .x_desc(plot.x_label)
        .y_desc(plot.y_label)
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 14))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    if let Some([a, b]) = plot.reference {
        chart.draw_series(DashedLineSeries::new(
            [a, b],
            6,
            4,
            RGBColor(150, 150, 150).stroke_width(1),
        ))?;
    }
    match &plot.points {
        Ok(points) => {
            let line: Vec<(f64, f64)> = if plot.steps {
                // Recall only grows along the list: hold each precision until the next recall.
                let mut v = Vec::with_capacity(points.len() * 2);
                let mut prev_r = 0.0;
                for &(r, p) in points {
                    v.push((prev_r, p));
                    v.push((r, p));
                    prev_r = r;
                }
                v
            } else {
                points.clone()
            };
            chart
                .draw_series(LineSeries::new(line, CURVE.stroke_width(3)))?
                .label(plot.legend.as_str())
                .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], CURVE.stroke_width(3)));
            for &(x, y, ref label, colour) in &plot.marks {
                chart
                    .draw_series([Circle::new((x, y), 7, colour.filled())])?
                    .label(label.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, colour.filled()));
            }
            chart
                .configure_series_labels()
                .position(if plot.steps {
                    SeriesLabelPosition::LowerLeft
                } else {
                    SeriesLabelPosition::LowerRight
                })
                .background_style(WHITE.mix(0.9))
                .border_style(BLACK)
                .label_font((FAMILY, 16))
                .draw()?;
        }
        Err(reason) => {
            root.draw_text(
                &format!("undefined: {reason}"),
                &(FAMILY, 16).into_font().color(&MARK),
                (90, (HEIGHT / 2) as i32),
            )?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plot(points: Result<Vec<(f64, f64)>, Undefined>) -> Plot<'static> {
        Plot {
            title: "ROC",
            x_label: "false-positive rate",
            y_label: "true-positive rate",
            points,
            reference: Some([(0.0, 0.0), (1.0, 1.0)]),
            steps: false,
            legend: "AUROC 0.75".into(),
            marks: vec![(0.5, 1.0, "operating point".into(), MARK)],
        }
    }

    #[test]
    fn a_curve_is_a_png_of_the_stated_size_with_the_curve_drawn() {
        let bytes = png(&plot(Ok(vec![
            (0.0, 0.0),
            (0.0, 0.5),
            (0.5, 1.0),
            (1.0, 1.0),
        ])))
        .unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let blue = img.pixels().filter(|p| p.0 == [31, 90, 180]).count();
        let red = img.pixels().filter(|p| p.0 == [210, 40, 40]).count();
        assert!(blue > 500 && red > 50, "blue {blue} red {red}");
        // Text was rendered: dark pixels outside the plotting area (title and labels).
        let dark_top = (0..WIDTH)
            .flat_map(|x| (0..40).map(move |y| (x, y)))
            .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
            .count();
        assert!(dark_top > 20, "no title drawn: {dark_top}");
    }

    #[test]
    fn an_undefined_curve_is_still_a_png() {
        let bytes = png(&plot(Err(Undefined("no normal images")))).unwrap();
        let img = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        assert!(img.pixels().any(|p| p.0 == [210, 40, 40]));
    }
}
