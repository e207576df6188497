//! Loss curves from a run's `metrics.csv`, as `loss.png` and `loss.svg` in the run directory: pre- and
//! post-adaptation query loss of every meta-batch (thin) and of every evaluation on held-out tasks
//! (thick, with markers), on a log scale when the losses span more than a decade; a second panel shows
//! evaluation accuracy for classification runs. Labels use a bundled DejaVu Sans subset
//! (`assets/`), so plotting needs no system fonts.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const SIZE: (u32, u32) = (1000, 600);

/// The rows of `metrics.csv` a plot needs.
#[derive(Debug, Default, PartialEq)]
pub struct Curves {
    pub train_pre: Vec<(f64, f64)>,
    pub train_post: Vec<(f64, f64)>,
    pub eval_pre: Vec<(f64, f64)>,
    pub eval_post: Vec<(f64, f64)>,
    pub eval_accuracy: Vec<(f64, f64)>,
}

impl Curves {
    /// Parses `metrics.csv` text (header `kind,step,pre_adapt_loss,post_adapt_loss,…,accuracy,…`).
    /// Rows that do not parse, and non-finite values, are skipped.
    pub fn parse(csv: &str) -> Curves {
        let mut c = Curves::default();
        for line in csv.lines().skip(1) {
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).filter(|v| v.is_finite());
            let (Some(step), Some(pre), Some(post)) = (num(1), num(2), num(3)) else { continue };
            match f[0] {
                "train" => {
                    c.train_pre.push((step, pre));
                    c.train_post.push((step, post));
                }
                "eval" => {
                    c.eval_pre.push((step, pre));
                    c.eval_post.push((step, post));
                    if let Some(a) = num(5) {
                        c.eval_accuracy.push((step, a));
                    }
                }
                _ => {}
            }
        }
        c
    }

    fn losses(&self) -> impl Iterator<Item = f64> + '_ {
        [&self.train_pre, &self.train_post, &self.eval_pre, &self.eval_post].into_iter().flatten().map(|p| p.1)
    }
}

/// Writes `loss.png` and `loss.svg` into `dir` from `dir/metrics.csv`. `title` heads the plot.
pub fn write_loss_plots(dir: &Path, title: &str) -> Result<()> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).context("reading metrics.csv")?;
    let curves = Curves::parse(&csv);
    if curves.train_post.is_empty() && curves.eval_post.is_empty() {
        return Ok(());
    }
    register_font();
    let png = dir.join("loss.png");
    let svg = dir.join("loss.svg");
    draw(BitMapBackend::new(&png, SIZE).into_drawing_area(), &curves, title)
        .with_context(|| format!("drawing {}", png.display()))?;
    draw(SVGBackend::new(&svg, SIZE).into_drawing_area(), &curves, title)
        .with_context(|| format!("drawing {}", svg.display()))?;
    Ok(())
}

pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The bundled font is valid (checked by the tests); failure would only mean unlabelled plots.
            let _ = plotters::style::register_font("sans-serif", style, FONT);
        }
    });
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, c: &Curves, title: &str) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(title, ("sans-serif", 22)).map_err(err)?;
    let (loss_area, acc_area) = if c.eval_accuracy.is_empty() {
        (root, None)
    } else {
        let (a, b) = root.split_vertically(SIZE.1 * 3 / 5);
        (a, Some(b))
    };
    let x_max = c.train_post.iter().chain(&c.eval_post).map(|p| p.0).fold(1.0, f64::max);
    let (lo, hi) = c.losses().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let log = lo > 0.0 && hi / lo > 10.0;
    let palette = [RGBColor(150, 180, 230), RGBColor(31, 90, 200), RGBColor(240, 170, 120), RGBColor(215, 80, 20)];
    let series: [(&str, &Vec<(f64, f64)>, bool); 4] = [
        ("meta-train, before adaptation", &c.train_pre, false),
        ("meta-train, after adaptation", &c.train_post, false),
        ("held-out, before adaptation", &c.eval_pre, true),
        ("held-out, after adaptation", &c.eval_post, true),
    ];
    let mut chart = ChartBuilder::on(&loss_area);
    chart.margin(12).x_label_area_size(36).y_label_area_size(70);
    macro_rules! plot_losses {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc("meta-step")
                .y_desc("query loss")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| short(*y))
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(err)?;
            for ((name, points, eval), color) in series.iter().zip(palette) {
                if points.is_empty() {
                    continue;
                }
                let width = if *eval { 3 } else { 1 };
                chart
                    .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(width)))
                    .map_err(err)?
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(width)));
                if *eval {
                    chart.draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(err)?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperRight)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()
                .map_err(err)?;
        }};
    }
    if log {
        plot_losses!(chart.build_cartesian_2d(0.0..x_max, (lo * 0.8..hi * 1.25).log_scale()).map_err(err)?);
    } else {
        let pad = ((hi - lo) * 0.05).max(1e-6);
        plot_losses!(chart.build_cartesian_2d(0.0..x_max, (lo - pad).min(0.0)..hi + pad).map_err(err)?);
    }
    if let Some(area) = acc_area {
        let mut chart = ChartBuilder::on(&area)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..x_max, 0.0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("meta-step")
            .y_desc("held-out accuracy")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        let color = RGBColor(30, 140, 60);
        chart.draw_series(LineSeries::new(c.eval_accuracy.iter().copied(), color.stroke_width(3))).map_err(err)?;
        chart.draw_series(c.eval_accuracy.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(err)?;
    }
    Ok(())
}

/// `<stem>.png` and `<stem>.svg`: one horizontal bar per run with its 95 % confidence interval, e.g. the
/// held-out post-adaptation loss of each run of a sweep. `bars`: (label, value, ci95).
pub fn write_comparison_plot(stem: &Path, title: &str, x_desc: &str, bars: &[(String, f64, f64)]) -> Result<()> {
    let bars: Vec<&(String, f64, f64)> = bars.iter().filter(|b| b.1.is_finite() && b.2.is_finite()).collect();
    if bars.is_empty() {
        return Ok(());
    }
    register_font();
    let size = (1000, 110 + 34 * bars.len() as u32);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    draw_bars(BitMapBackend::new(&png, size).into_drawing_area(), title, x_desc, &bars)
        .with_context(|| format!("drawing {}", png.display()))?;
    draw_bars(SVGBackend::new(&svg, size).into_drawing_area(), title, x_desc, &bars)
        .with_context(|| format!("drawing {}", svg.display()))?;
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_desc: &str,
    bars: &[&(String, f64, f64)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(err)?;
    let x_max = bars.iter().map(|b| b.1 + b.2).fold(0.0, f64::max) * 1.1 + 1e-12;
    let x_min = bars.iter().map(|b| b.1).filter(|v| *v > 0.0).fold(f64::INFINITY, f64::min);
    let n = bars.len();
    let label_width = bars.iter().map(|b| b.0.len()).max().unwrap_or(4).min(48) as u32 * 8 + 10;
    // First run at the top.
    let names: Vec<String> = bars.iter().rev().map(|b| b.0.clone()).collect();
    let y_label = |y: &f64| {
        let i = y.round();
        if (y - i).abs() < 1e-6 && i >= 0.0 {
            names.get(i as usize).cloned().unwrap_or_default()
        } else {
            String::new()
        }
    };
    let mut builder = ChartBuilder::on(&root);
    builder.caption(title, ("sans-serif", 20)).margin(12).x_label_area_size(36).y_label_area_size(label_width);
    macro_rules! bars_on {
        ($chart:expr, $floor:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .disable_y_mesh()
                .x_desc(x_desc)
                .y_labels(n)
                .y_label_formatter(&y_label)
                .x_label_formatter(&|x| short(*x))
                .label_style(("sans-serif", 13))
                .draw()
                .map_err(err)?;
            let fill = RGBColor(31, 90, 200);
            for (i, b) in bars.iter().enumerate() {
                let (v, ci) = (b.1, b.2);
                let y = (n - 1 - i) as f64;
                let bar = Rectangle::new([($floor, y - 0.3), (v.max($floor), y + 0.3)], fill.mix(0.7).filled());
                chart.draw_series(std::iter::once(bar)).map_err(err)?;
                let (lo, hi) = ((v - ci).max($floor), v + ci);
                let whisker = PathElement::new(vec![(lo, y), (hi, y)], BLACK.stroke_width(2));
                chart.draw_series(std::iter::once(whisker)).map_err(err)?;
                let caps = [vec![(lo, y - 0.15), (lo, y + 0.15)], vec![(hi, y - 0.15), (hi, y + 0.15)]];
                chart.draw_series(caps.into_iter().map(|c| PathElement::new(c, BLACK.stroke_width(2)))).map_err(err)?;
            }
        }};
    }
    let y_range = -0.5..n as f64 - 0.5;
    // A log scale when the values span more than 20× (a diverged run next to good ones).
    if x_min.is_finite() && x_max / x_min > 20.0 {
        let floor = x_min * 0.5;
        bars_on!(builder.build_cartesian_2d((floor..x_max).log_scale(), y_range).map_err(err)?, floor);
    } else {
        bars_on!(builder.build_cartesian_2d(0.0..x_max, y_range).map_err(err)?, 0.0);
    }
    Ok(())
}

/// A tick label with as many digits as its size needs: 250, 12.5, 0.125, 1.2e-4.
fn short(v: f64) -> String {
    match v.abs() {
        a if a >= 100.0 => format!("{v:.0}"),
        a if a >= 1.0 || a == 0.0 => format!("{v:.1}"),
        a if a >= 0.1 => format!("{v:.2}"),
        a if a >= 1e-3 => format!("{v:.3}"),
        _ => format!("{v:.1e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "kind,step,pre_adapt_loss,post_adapt_loss,post_adapt_loss_ci95,accuracy,accuracy_ci95,grad_norm,clipped,step_seconds,wall_seconds
train,1,4.0,3.0,,,,1.0,0,0.1,0.1
train,2,3.5,0.2,,,,1.0,0,0.1,0.2
eval,2,3.9,0.3,0.01,0.6,0.02,,,0.5,0.7
train,3,NaN,oops,,,,1.0,0,0.1,0.8
";

    #[test]
    fn parses_train_and_eval_rows_and_skips_bad_ones() {
        let c = Curves::parse(CSV);
        assert_eq!(c.train_post, vec![(1.0, 3.0), (2.0, 0.2)]);
        assert_eq!(c.eval_pre, vec![(2.0, 3.9)]);
        assert_eq!(c.eval_accuracy, vec![(2.0, 0.6)]);
    }

    #[test]
    fn writes_a_png_and_an_svg_with_labels() {
        let dir = std::env::temp_dir().join(format!("metatrain-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.csv"), CSV).unwrap();
        write_loss_plots(&dir, "test run").unwrap();
        let png = std::fs::read(dir.join("loss.png")).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(dir.join("loss.svg")).unwrap();
        assert!(svg.contains("held-out, after adaptation") && svg.contains("meta-step"), "labels drawn");
        assert!(svg.contains("held-out accuracy"), "accuracy panel for classification");
        std::fs::remove_dir_all(&dir).ok();
    }
}
