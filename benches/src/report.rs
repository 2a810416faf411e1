//! The results as JSON (everything measured) and as Markdown tables (what
//! README shows).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    churn::{self, Churn},
    per_packet::{self, Row, ScalePoint},
    throughput::{Compared, ScaleRun, Spread},
};

/// Issue 17's targets: each a ratio of figures measured side by side in
/// one run, never a time.
pub mod target {
    /// An established flow's per-packet cost over the floor's (each family).
    pub const ESTABLISHED_X_FLOOR: f64 = 2.5;
    /// A new flow's per-packet cost over the floor's (each family).
    pub const NEW_FLOW_X_FLOOR: f64 = 5.0;
    /// The veth hop's CPU per datagram: what eBPF adds to the floor over
    /// what netfilter adds to it.
    pub const HOP_ADDED: f64 = 0.25;
    /// The veth hop's CPU per datagram, eBPF over netfilter.
    pub const HOP_RAW: f64 = 0.6;
    /// A scale series' greatest cost over its least, less one, in percent.
    pub const FLAT_PERCENT: f64 = 10.0;
}

pub struct Results {
    pub machine: String,
    pub seconds: u64,
    pub per_packet: Vec<Row>,
    pub per_packet_scale: Vec<ScalePoint>,
    pub churn: Vec<Churn>,
    pub veth: Vec<Compared>,
    pub scale: Vec<ScaleRun>,
    pub wireguard: Vec<Compared>,
}

/// The CPU model, how many, and the kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} x {model}, Linux {}", kernel.trim())
}

impl Results {
    pub fn to_json(&self) -> Value {
        json!({
            "machine": self.machine,
            "seconds": self.seconds,
            "per_packet": self.per_packet.iter().map(Row::to_json).collect::<Vec<_>>(),
            "per_packet_scale": self.per_packet_scale.iter().map(ScalePoint::to_json).collect::<Vec<_>>(),
            "churn": self.churn.iter().map(Churn::to_json).collect::<Vec<_>>(),
            "veth": self.veth.iter().map(Compared::to_json).collect::<Vec<_>>(),
            "veth_scale": self.scale.iter().map(ScaleRun::to_json).collect::<Vec<_>>(),
            "wireguard": self.wireguard.iter().map(Compared::to_json).collect::<Vec<_>>(),
        })
    }

    /// The per-packet scale points as series, one size varied each: routes
    /// (IPv4), then flows in IPv4 and in IPv6.
    fn per_packet_series(&self) -> Vec<&[ScalePoint]> {
        let routes = crate::ROUTE_POINTS.len();
        let (by_routes, by_flows) = self.per_packet_scale.split_at(routes);
        std::iter::once(by_routes)
            .chain(by_flows.chunks(crate::FLOW_POINTS.len()))
            .collect()
    }

    /// The veth scale runs as series: routes, then flows.
    fn veth_series(&self) -> [&[ScaleRun]; 2] {
        let (by_routes, by_flows) = self.scale.split_at(crate::ROUTE_POINTS.len());
        [by_routes, by_flows]
    }

    /// Each target, what this run measured for it, and whether it is met.
    fn targets(&self, out: &mut String) {
        out.push_str("| target (issue 17) | measured | limit | |\n|---|---|---|---|\n");
        let mut row = |what: String, measured: Option<f64>, limit: f64, unit: &str| {
            let (value, verdict) = match measured {
                Some(m) if m.is_finite() => (
                    format!("{m:.2}{unit}"),
                    if m <= limit { "met" } else { "**missed**" },
                ),
                _ => ("not measured".to_string(), "**missed**"),
            };
            let _ = writeln!(out, "| {what} | {value} | <= {limit}{unit} | {verdict} |");
        };
        for family in ["IPv4", "IPv6"] {
            let x_floor = |path: &str| {
                self.per_packet
                    .iter()
                    .find(|r| r.path == path && r.family == family)
                    .map(|r| r.ratio)
            };
            row(
                format!("established flow per packet, {family}, x the floor program"),
                x_floor(per_packet::ESTABLISHED),
                target::ESTABLISHED_X_FLOOR,
                "x",
            );
            row(
                format!("new flow per packet, {family}, x the floor program"),
                x_floor(per_packet::NEW_FLOW),
                target::NEW_FLOW_X_FLOOR,
                "x",
            );
        }
        let hop = self.veth.iter().find(|c| c.added_cost.is_some());
        row(
            "veth hop CPU per datagram, added cost (eBPF - floor) / (netfilter - floor)".into(),
            hop.and_then(|c| c.added_cost).map(|a| a.median),
            target::HOP_ADDED,
            "",
        );
        row(
            "veth hop CPU per datagram, eBPF / netfilter".into(),
            hop.map(|c| c.ratio.median),
            target::HOP_RAW,
            "x",
        );
        let series = self.per_packet_series();
        for (points, what) in series.iter().zip([
            "per packet, IPv4, established flow over 10 to 1M routes",
            "per packet, IPv4, established flow over 1k to 1M flows",
            "per packet, IPv6, established flow over 1k to 1M flows",
        ]) {
            let spread = spread_percent(points.iter().map(|p| p.median_ns as f64));
            row(what.into(), spread, target::FLAT_PERCENT, " %");
        }
        for (runs, what) in self.veth_series().iter().zip([
            "veth hop CPU per datagram (eBPF) over 10 to 1M routes",
            "veth hop CPU per datagram (eBPF) over 1k to 1M flows",
        ]) {
            let spread = spread_percent(runs.iter().map(|s| s.ebpf_ns.median));
            row(what.into(), spread, target::FLAT_PERCENT, " %");
        }
    }

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Machine: {}. Whole run: {} s (`cargo xtask bench`).\n\n",
            self.machine, self.seconds
        );
        out.push_str("### Targets (ratios measured side by side in this run; flatness: a series' greatest over its least, less one)\n\n");
        self.targets(&mut out);
        out.push_str("\n### Forwarding hop over veth (programs in Ethernet mode; the floor: a program that only writes the Ethernet addresses and redirects, on the same hop)\n\n");
        compared_table(&mut out, &self.veth, true);
        out.push_str(
            "\n### Between userspace WireGuard on both sides (the daemon as users run it)\n\n",
        );
        compared_table(&mut out, &self.wireguard, false);
        out.push_str(
            "\n### Per packet (`BPF_PROG_TEST_RUN`, one fresh packet per run, kernel-timed)\n\n",
        );
        out.push_str(&per_packet::markdown(&self.per_packet));
        out.push_str(
            "\n### Scale: established flow per packet (each run a different live flow, spread over the whole table, in shuffled order), and the connection table's memory (fdinfo's memlock of the family's map, kernel overhead included)\n\n",
        );
        out.push_str("| family | routes | live flows | median ns | p90 ns | x first point | table entries | table memory | bytes per flow | one sweep |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for points in self.per_packet_series() {
            let first = points.first().map_or(1, |p| p.median_ns.max(1));
            for p in points {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.2} | {} | {:.1} MiB | {:.0} | {} ms |",
                    if p.ipv6 { "IPv6" } else { "IPv4" },
                    p.routes,
                    p.nat_flows,
                    p.median_ns,
                    p.p90_ns,
                    p.median_ns as f64 / first as f64,
                    p.nat_entries,
                    p.nat_bytes as f64 / 1048576.0,
                    p.nat_bytes as f64 / p.nat_flows.max(1) as f64,
                    p.sweep_ms,
                );
            }
        }
        out.push_str("\n### The connection table under churn (`BPF_PROG_TEST_RUN`): 1000 answered flows of 200 clients, then one client's flood\n\n");
        out.push_str(&churn::markdown(&self.churn));
        out.push_str("\n### Scale: the veth hop's CPU ns per small UDP datagram (the flood over all live flows in shuffled order; conntrack's hash table with as many buckets per entry as the eBPF table)\n\n");
        out.push_str("| routes | live flows | eBPF ns | netfilter ns | eBPF / netfilter | eBPF x first point | netfilter x first point | eBPF datagrams/s | netfilter datagrams/s | eBPF table bytes per flow | conntrack entries | conntrack buckets |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for points in self.veth_series() {
            let Some(first) = points.first() else {
                continue;
            };
            for s in points {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} |",
                    s.routes,
                    s.nat_flows,
                    s.ebpf_ns.median,
                    s.netfilter_ns.median,
                    s.ebpf_ns.median / s.netfilter_ns.median,
                    s.ebpf_ns.median / first.ebpf_ns.median,
                    s.netfilter_ns.median / first.netfilter_ns.median,
                    s.ebpf_pps.median,
                    s.netfilter_pps.median,
                    s.ebpf_bytes_per_flow,
                    s.conntrack,
                    s.conntrack_buckets,
                );
            }
        }
        out
    }
}

/// The comparisons; `on_veth` adds the columns only the veth hop has: the
/// direct link, the floor and the cost added to it.
fn compared_table(out: &mut String, rows: &[Compared], on_veth: bool) {
    if on_veth {
        out.push_str("| measure | direct link (no hop) | floor | eBPF | netfilter | eBPF / netfilter (median, min-max of rounds) | target | added cost (eBPF - floor) / (netfilter - floor) (median, min-max) |\n|---|---|---|---|---|---|---|---|\n");
    } else {
        out.push_str("| measure | eBPF | netfilter | eBPF / netfilter (median, min-max of rounds) | target |\n|---|---|---|---|---|\n");
    }
    for r in rows {
        let optional = |s: Option<Spread>| s.map_or(String::new(), value);
        let (before, after) = if on_veth {
            (
                format!(" {} | {} |", optional(r.direct), optional(r.floor)),
                format!(
                    " {} |",
                    r.added_cost.map_or(String::new(), |a| format!(
                        "{:.2} ({:.2}-{:.2}), target <= {}",
                        a.median,
                        a.min,
                        a.max,
                        target::HOP_ADDED
                    ))
                ),
            )
        } else {
            (String::new(), String::new())
        };
        let _ = writeln!(
            out,
            "| {} |{before} {} | {} | {:.2} ({:.2}-{:.2}) | {} |{after}",
            r.metric,
            value(r.ebpf),
            value(r.netfilter),
            r.ratio.median,
            r.ratio.min,
            r.ratio.max,
            r.target
        );
    }
}

/// A series' greatest value over its least, less one, in percent (none for
/// an empty series).
fn spread_percent(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (least, greatest) = values.fold((f64::INFINITY, 0.0_f64), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    (least.is_finite() && least > 0.0).then(|| (greatest / least - 1.0) * 100.0)
}

fn value(s: Spread) -> String {
    if s.median.abs() >= 1000.0 {
        format!("{:.0}", s.median)
    } else {
        format!("{:.2}", s.median)
    }
}

const BEGIN: &str = "<!-- benchmark results: begin (written by cargo xtask bench) -->";
const END: &str = "<!-- benchmark results: end -->";

/// Puts `table` between README's markers, so that it shows the latest run.
pub fn into_readme(readme: &std::path::Path, table: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        anyhow::bail!("{} has no benchmark markers ({BEGIN})", readme.display());
    };
    let updated = format!("{}{BEGIN}\n{table}{}", &text[..begin], &text[end..]);
    std::fs::write(readme, updated)?;
    Ok(())
}
