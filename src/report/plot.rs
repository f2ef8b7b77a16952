//! SVG line charts (plotters' SVG backend: no fonts or system libraries needed).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

#[derive(Debug, Clone, Default)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    /// Vertical bars `(x, low, high)` in the series' colour: an interval or the spread
    /// over seeds at a point.
    pub bars: Vec<(f64, f64, f64)>,
}

/// How x values are placed and labelled.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum XAxis {
    #[default]
    Linear,
    /// Evenly spaced powers of two (adapter ranks); x must be positive.
    Log2,
    /// Categories at x = 0, 1, 2...: the labels are written at those positions.
    Labels(Vec<String>),
}

impl XAxis {
    /// Where `x` is drawn.
    fn position(&self, x: f64) -> f64 {
        match self {
            XAxis::Log2 => x.log2(),
            _ => x,
        }
    }

    /// The tick label at position `p` of a log2 or category axis; ticks between its
    /// values stay blank.
    fn label(&self, p: f64) -> String {
        let whole = (p - p.round()).abs() < 1e-9;
        match self {
            XAxis::Log2 if whole => format!("{}", 2f64.powf(p.round())),
            XAxis::Labels(labels) if whole && p >= 0.0 => {
                labels.get(p.round() as usize).cloned().unwrap_or_default()
            }
            _ => String::new(),
        }
    }
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draws `series` into an SVG file written atomically at `path`.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    line_chart_on(path, title, x_label, &XAxis::Linear, y_label, series)
}

/// [`line_chart`] with the x axis placed and labelled by `x_axis`. On a log2 or category
/// axis the points are marked too: there are few of them.
pub fn line_chart_on(
    path: &Path,
    title: &str,
    x_label: &str,
    x_axis: &XAxis,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let placed: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (x_axis.position(x), y))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let bars: Vec<Vec<(f64, f64, f64)>> = series
        .iter()
        .map(|s| {
            s.bars
                .iter()
                .map(|&(x, lo, hi)| (x_axis.position(x), lo, hi))
                .filter(|(x, lo, hi)| x.is_finite() && lo.is_finite() && hi.is_finite())
                .collect()
        })
        .collect();
    let bar_ends = bars
        .iter()
        .flatten()
        .flat_map(|&(x, lo, hi)| [(x, lo), (x, hi)]);
    let pts = placed.iter().flatten().copied().chain(bar_ends);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return Err(anyhow!("nothing to plot for {title}"));
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if *x_axis != XAxis::Linear {
        // Room for the first and last value's label.
        (x0, x1) = (x0 - 0.25, x1 + 0.25);
    }
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
            .map_err(|e| anyhow!("{e}"))?;
        let x_tick = |x: &f64| x_axis.label(*x);
        let mut mesh = chart.configure_mesh();
        if *x_axis != XAxis::Linear {
            mesh.x_label_formatter(&x_tick);
        }
        mesh.x_desc(x_label)
            .y_desc(y_label)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (s, points)) in series.iter().zip(&placed).enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| anyhow!("{e}"))?
                .label(s.name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            if *x_axis != XAxis::Linear {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(|e| anyhow!("{e}"))?;
            }
            // A bar: its stem and a cap at each end, one percent of the x range wide.
            let cap = 0.01 * (x1 - x0);
            let strokes = bars[i].iter().flat_map(|&(x, lo, hi)| {
                [
                    vec![(x, lo), (x, hi)],
                    vec![(x - cap, lo), (x + cap, lo)],
                    vec![(x - cap, hi), (x + cap, hi)],
                ]
            });
            chart
                .draw_series(strokes.map(|line| PathElement::new(line, color.stroke_width(1))))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    crate::fsx::atomic_write(path, svg.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bar is three strokes (the stem and two caps) per point, and its ends widen the
    /// y range: a chart whose bars reach beyond its points still shows them.
    #[test]
    fn bars_are_drawn_and_fit_the_axes() {
        let dir = tempfile::tempdir().unwrap();
        let draw = |bars: Vec<(f64, f64, f64)>| {
            let path = dir.path().join("c.svg");
            let series = [Series {
                name: "s".into(),
                points: vec![(8.0, 50.0), (32.0, 52.0), (128.0, 51.0)],
                bars,
            }];
            line_chart_on(&path, "t", "rank", &XAxis::Log2, "acc", &series).unwrap();
            std::fs::read_to_string(&path).unwrap()
        };
        let plain = draw(Vec::new());
        let with = draw(vec![
            (8.0, 40.0, 60.0),
            (32.0, 45.0, 58.0),
            (128.0, 49.0, 53.0),
        ]);
        let strokes = |svg: &str| svg.matches("<line").count() + svg.matches("<polyline").count();
        assert!(
            strokes(&with) >= strokes(&plain) + 9,
            "{} vs {}",
            strokes(&with),
            strokes(&plain)
        );
        // The y axis reaches the lowest bar end (40), below every point (≥ 50).
        let has_tick = |svg: &str, tick: &str| svg.lines().any(|l| l.trim() == tick);
        assert!(
            has_tick(&with, "40.0") && !has_tick(&plain, "40.0"),
            "{with}"
        );
    }
}
