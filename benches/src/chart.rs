//! The chart README shows: each comparison's eBPF / netfilter ratio (median,
//! with the rounds' least and greatest as a whisker), against 1 (a tie).

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use crate::{report::Results, throughput::Compared};

/// Debian's fonts-dejavu-core (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn draw(results: &Results, file: &Path) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading the chart's font {FONT}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;

    let rows: Vec<(String, &Compared)> = results
        .veth
        .iter()
        .map(|c| (format!("veth: {}", c.metric), c))
        .chain(
            results
                .wireguard
                .iter()
                .map(|c| (format!("WireGuard: {}", c.metric), c)),
        )
        .collect();
    let top = rows
        .iter()
        .map(|(_, c)| c.ratio.max)
        .fold(2.0_f64, f64::max)
        .ceil();

    let root = BitMapBackend::new(file, (1400, 80 + 56 * rows.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("eBPF / netfilter (1 = a tie) - {}", results.machine),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(36)
        .y_label_area_size(560)
        .build_cartesian_2d(0.0..top, -0.5..(rows.len() as f64 - 0.5))?;
    let labels: Vec<String> = rows.iter().map(|(l, _)| l.clone()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows.len())
        .y_label_formatter(&|y| {
            let i = y.round();
            if (y - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("ratio eBPF / netfilter (higher is better for rates, lower for CPU)")
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, c))| {
        let y = i as f64;
        let colour = if c.metric.contains("CPU") {
            RGBColor(214, 120, 40)
        } else {
            RGBColor(40, 110, 200)
        };
        Rectangle::new([(0.0, y - 0.3), (c.ratio.median, y + 0.3)], colour.filled())
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, c))| {
        let y = i as f64;
        PathElement::new(
            vec![(c.ratio.min, y), (c.ratio.max, y)],
            BLACK.stroke_width(2),
        )
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, c))| {
        Text::new(
            format!("{:.2}", c.ratio.median),
            (c.ratio.max + 0.03 * top, i as f64 + 0.1),
            ("sans-serif", 15),
        )
    }))?;
    chart.draw_series(std::iter::once(PathElement::new(
        vec![(1.0, -0.5), (1.0, rows.len() as f64 - 0.5)],
        RED.stroke_width(2),
    )))?;
    root.present()?;
    Ok(())
}
