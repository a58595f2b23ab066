//! The SVG chart of a simulation: demand and each policy's serving capacity (instances × their
//! capacity, in the trace's unit) over time, drawn with plotters.

use plotters::prelude::*;

use super::Report;

/// Points per line at most: a long trace is summarised per bucket (its mean demand, its least capacity,
/// so that a shortfall stays visible).
const MAX_POINTS: usize = 1_500;

/// One colour per line: demand black, then the policies.
const COLOURS: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
];

pub fn draw(report: &Report) -> Result<String, String> {
    let timelines = &report.timelines;
    let steps = timelines.demand.len();
    let bucket = steps.div_ceil(MAX_POINTS).max(1);
    let hours = |k: usize| (k * timelines.step_ms as usize) as f64 / 3_600_000.0;
    let demand: Vec<(f64, f64)> = timelines
        .demand
        .chunks(bucket)
        .enumerate()
        .map(|(b, chunk)| (hours(b * bucket), chunk.iter().sum::<f64>() / chunk.len() as f64))
        .collect();
    let capacity: Vec<Vec<(f64, f64)>> = timelines
        .serving
        .iter()
        .map(|serving| {
            serving
                .chunks(bucket)
                .enumerate()
                .map(|(b, chunk)| {
                    let least = chunk.iter().copied().min().unwrap_or(0);
                    (hours(b * bucket), f64::from(least) * report.member_capacity)
                })
                .collect()
        })
        .collect();
    let top = demand
        .iter()
        .chain(capacity.iter().flatten())
        .map(|(_, y)| *y)
        .fold(1.0, f64::max)
        * 1.05;
    let right = hours(steps.saturating_sub(1)).max(1e-3);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1200, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(chart_error)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("group {}: demand and serving capacity", report.group),
                ("sans-serif", 20),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..right, 0.0..top)
            .map_err(chart_error)?;
        chart
            .configure_mesh()
            .x_desc("hours")
            .y_desc("demand, capacity (the trace's unit)")
            .draw()
            .map_err(chart_error)?;
        chart
            .draw_series(LineSeries::new(demand, BLACK.stroke_width(2)))
            .map_err(chart_error)?
            .label("demand")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK));
        for (index, (line, figures)) in capacity.into_iter().zip(&report.policies).enumerate() {
            let colour = COLOURS[index % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(line, colour))
                .map_err(chart_error)?
                .label(figures.policy.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(chart_error)?;
        root.present().map_err(chart_error)?;
    }
    Ok(svg)
}

fn chart_error(e: impl std::fmt::Display) -> String {
    format!("cannot draw the chart: {e}")
}
