//! SVG plots of a run (plotters, SVG backend, no fonts needed): the
//! latency CDF, messages accepted and delivered over time with the fault
//! markers, and ad convergence.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use super::Error;

/// Size of every plot, pixels.
const SIZE: (u32, u32) = (1000, 600);
/// Marker labels are staggered over this many rows so they overlap less.
const LABEL_ROWS: usize = 6;

/// Everything the plots show.
#[derive(Debug, Default)]
pub struct PlotData {
    /// Scenario name (titles).
    pub name: String,
    /// Sorted latencies, ms.
    pub latencies_ms: Vec<f64>,
    /// Cumulative accepted messages at each second of the run.
    pub accepted: Vec<u64>,
    /// Cumulative delivered messages at each second.
    pub delivered: Vec<u64>,
    /// `(second, running nodes)`.
    pub running: Vec<(f64, f64)>,
    /// `(second, label)` of faults and phase changes.
    pub markers: Vec<(f64, String)>,
    /// `(label, [(seconds since registration, fraction of nodes)])`.
    pub curves: Vec<(String, Vec<(f64, f64)>)>,
}

fn err(path: &Path) -> impl Fn(String) -> Error + '_ {
    move |message| Error::Plot {
        path: path.to_path_buf(),
        message,
    }
}

/// Write the three plots into `dir`; returns their paths.
pub fn write_all(dir: &Path, d: &PlotData) -> Result<Vec<PathBuf>, Error> {
    let cdf = dir.join("latency_cdf.svg");
    latency_cdf(&cdf, d).map_err(err(&cdf))?;
    let over = dir.join("delivered_over_time.svg");
    delivered(&over, d).map_err(err(&over))?;
    let conv = dir.join("convergence.svg");
    convergence(&conv, d).map_err(err(&conv))?;
    Ok(vec![cdf, over, conv])
}

fn latency_cdf(path: &Path, d: &PlotData) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let pts = super::metrics::cdf(&d.latencies_ms, 2000);
    let lo = pts.first().map_or(1.0, |p| p.0).max(0.1);
    let hi = pts.last().map_or(10.0, |p| p.0).max(lo * 10.0);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: send → consumer latency CDF ({} messages)",
                d.name,
                d.latencies_ms.len()
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1.0)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("latency, ms (log scale)")
        .y_desc("fraction of delivered messages")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(LineSeries::new(
            pts.into_iter().map(|(x, y)| (x.max(lo), y)),
            &BLUE,
        ))
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn delivered(path: &Path, d: &PlotData) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let end = d.accepted.len().max(d.delivered.len()).max(2) as f64 - 1.0;
    let ymax = d.accepted.last().copied().unwrap_or(0).max(1) as f64 * 1.1;
    let nmax = d.running.iter().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: messages over time, with faults", d.name),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .right_y_label_area_size(60)
        .build_cartesian_2d(0f64..end, 0f64..ymax)
        .map_err(|e| e.to_string())?
        .set_secondary_coord(0f64..end, 0f64..nmax);
    chart
        .configure_mesh()
        .x_desc("timeline, s")
        .y_desc("messages (cumulative)")
        .draw()
        .map_err(|e| e.to_string())?;
    chart
        .configure_secondary_axes()
        .y_desc("running nodes")
        .draw()
        .map_err(|e| e.to_string())?;
    let series = |v: &[u64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, n)| (i as f64, *n as f64))
            .collect()
    };
    let green = RGBColor(0, 140, 0);
    chart
        .draw_series(LineSeries::new(series(&d.accepted), &BLUE))
        .map_err(|e| e.to_string())?
        .label("accepted by send()")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(series(&d.delivered), green.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label("delivered to a consumer")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], green));
    let grey = RGBColor(120, 120, 120);
    chart
        .draw_secondary_series(LineSeries::new(d.running.iter().copied(), &grey))
        .map_err(|e| e.to_string())?
        .label("running nodes (right axis)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    let red = RED.mix(0.45);
    chart
        .draw_series(
            d.markers
                .iter()
                .map(|(t, _)| PathElement::new(vec![(*t, 0.0), (*t, ymax)], red)),
        )
        .map_err(|e| e.to_string())?;
    chart
        .draw_series(d.markers.iter().enumerate().map(|(i, (t, label))| {
            let row = (i % LABEL_ROWS) as f64;
            Text::new(
                label.clone(),
                (*t, ymax * (0.97 - 0.04 * row)),
                ("sans-serif", 11).into_font().color(&RED),
            )
        }))
        .map_err(|e| e.to_string())?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}

fn convergence(path: &Path, d: &PlotData) -> Result<(), String> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let xmax = d
        .curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("{}: share of running nodes that see a new ad", d.name),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..1.05)
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc("seconds since registration")
        .y_desc("fraction of running nodes")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (label, curve)) in d.curves.iter().enumerate() {
        // A step function from the registration (no other node holds the
        // ad yet): the fraction holds until the next sample changes it.
        let mut pts = Vec::with_capacity(curve.len() * 2 + 1);
        if curve.first().is_some_and(|p| p.0 > 0.0) {
            pts.push((0.0, 0.0));
        }
        for p in curve {
            if let Some(&(_, y)) = pts.last() {
                pts.push((p.0, y));
            }
            pts.push(*p);
        }
        let color = Palette99::pick(i).to_rgba();
        let width = if i == 0 { 3 } else { 2 };
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(width)))
            .map_err(|e| e.to_string())?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if !d.curves.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_written_even_with_little_data() {
        let dir = tempfile::tempdir().unwrap();
        for d in [
            PlotData::default(),
            PlotData {
                name: "t".into(),
                latencies_ms: vec![3.0, 5.0, 8.0, 2000.0],
                accepted: vec![0, 2, 4, 4],
                delivered: vec![0, 1, 3, 4],
                running: vec![(0.0, 3.0), (3.0, 2.0)],
                markers: vec![(1.0, "crash 1".into()), (2.0, "heal".into())],
                curves: vec![("warm-up".into(), vec![(0.0, 0.2), (1.5, 1.0)])],
            },
        ] {
            let paths = write_all(dir.path(), &d).unwrap();
            for p in paths {
                let svg = std::fs::read_to_string(&p).unwrap();
                assert!(
                    svg.starts_with("<svg") && svg.len() > 500,
                    "{}",
                    p.display()
                );
            }
        }
    }
}
