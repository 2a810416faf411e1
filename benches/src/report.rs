//! The results as JSON (everything measured) and as Markdown tables (what
//! README shows).

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    churn::{self, Churn},
    per_packet::{self, Row, ScalePoint},
    throughput::{Compared, ScaleRun, Spread},
};

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

    pub fn markdown(&self) -> String {
        let mut out = format!(
            "Machine: {}. Whole run: {} s (`cargo xtask bench`).\n\n",
            self.machine, self.seconds
        );
        out.push_str("### Forwarding hop over veth (programs in Ethernet mode)\n\n");
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
            "\n### Scale: established flow per packet, and the connection table's memory (fdinfo's memlock of the family's map, kernel overhead included)\n\n",
        );
        out.push_str("| family | routes | live flows | median ns | p90 ns | x first point | table entries | table memory | bytes per flow | one sweep |\n|---|---|---|---|---|---|---|---|---|---|\n");
        let scale = &self.per_packet_scale;
        for points in scale.chunks(3) {
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
        out.push_str("\n### Scale: the veth hop's CPU ns per small UDP datagram (1000 of the live flows measured)\n\n");
        out.push_str("| routes | live flows | eBPF ns | netfilter ns | eBPF / netfilter | eBPF x first point | netfilter x first point | eBPF datagrams/s | netfilter datagrams/s | eBPF table bytes per flow | conntrack entries |\n|---|---|---|---|---|---|---|---|---|---|---|\n");
        for points in [&self.scale[..3], &self.scale[3..]] {
            let Some(first) = points.first() else {
                continue;
            };
            for s in points {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} |",
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
                );
            }
        }
        out
    }
}

fn compared_table(out: &mut String, rows: &[Compared], with_direct: bool) {
    if with_direct {
        out.push_str("| measure | direct link (no hop) | eBPF | netfilter | eBPF / netfilter (median, min-max of rounds) | target |\n|---|---|---|---|---|---|\n");
    } else {
        out.push_str("| measure | eBPF | netfilter | eBPF / netfilter (median, min-max of rounds) | target |\n|---|---|---|---|---|\n");
    }
    for r in rows {
        let direct = if with_direct {
            format!(" {} |", r.direct.map_or("".into(), value))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {} |{direct} {} | {} | {:.2} ({:.2}-{:.2}) | {} |",
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
