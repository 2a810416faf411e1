//! The chart README shows: each comparison's eBPF / netfilter ratio (median,
//! with the rounds' least and greatest as a whisker), against 1 (a tie).

use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use crate::{report::Results, throughput::Spread};

/// Debian's fonts-dejavu-core (installed by `cargo xtask setup`).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn draw(results: &Results, file: &Path) -> Result<()> {
    let font = std::fs::read(FONT).with_context(|| format!("reading the chart's font {FONT}"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into()))
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;

    // Bars: label, ratio, and whether less is better.
    let mut rows: Vec<(String, Spread, bool)> = Vec::new();
    for c in results.veth.iter().chain(&results.wireguard) {
        rows.push((c.short.to_string(), c.ratio, c.lower_is_better));
    }
    if let Some(big) = results.scale.last() {
        let ratio = big.ebpf_ns.median / big.netfilter_ns.median;
        rows.push((
            format!("veth: hop CPU per datagram, {} flows", big.nat_flows),
            Spread {
                median: ratio,
                min: ratio,
                max: ratio,
            },
            true,
        ));
    }
    let top = rows
        .iter()
        .map(|(_, s, _)| s.max)
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
        .y_label_area_size(380)
        .build_cartesian_2d(0.0..top, -0.5..(rows.len() as f64 - 0.5))?;
    let labels: Vec<String> = rows.iter().map(|(l, _, _)| l.clone()).collect();
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
        .x_desc("eBPF / netfilter: blue, rates (more is better); orange, CPU time (less is better)")
        .label_style(("sans-serif", 15))
        .draw()?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, s, lower))| {
        let y = i as f64;
        let colour = if *lower {
            RGBColor(214, 120, 40)
        } else {
            RGBColor(40, 110, 200)
        };
        Rectangle::new([(0.0, y - 0.3), (s.median, y + 0.3)], colour.filled())
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, s, _))| {
        let y = i as f64;
        PathElement::new(vec![(s.min, y), (s.max, y)], BLACK.stroke_width(2))
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, (_, s, _))| {
        Text::new(
            format!("{:.2}", s.median),
            (s.max + 0.03 * top, i as f64 + 0.1),
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
