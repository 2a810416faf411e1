//! The throughput runs: each datapath in turn, round after round, so that
//! whatever else the machine does falls on both alike; medians, and the
//! spread of the per-round ratios.

use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use crate::{
    hop::{Hop, Path},
    load, wireguard,
};

/// Median, least and greatest of some measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        Self {
            median: v[v.len() / 2],
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    pub fn to_json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max})
    }
}

/// A measurement's name, its chart label, and whether less is better.
type Metric = (&'static str, &'static str, bool);

/// One measurement compared across datapaths.
pub struct Compared {
    pub metric: &'static str,
    /// The chart's label.
    pub short: &'static str,
    /// CPU time: less is better (rates: more is).
    pub lower_is_better: bool,
    pub direct: Option<Spread>,
    /// The floor program on the same hop (the veth runs' UDP flood).
    pub floor: Option<Spread>,
    pub ebpf: Spread,
    pub netfilter: Spread,
    /// eBPF / netfilter, per round.
    pub ratio: Spread,
    pub target: String,
    /// The cost eBPF adds to the floor over what netfilter adds to it,
    /// (eBPF - floor) / (netfilter - floor) per round.
    pub added_cost: Option<Spread>,
}

impl Compared {
    fn new(
        (metric, short, lower_is_better): Metric,
        target: &str,
        ebpf: &[f64],
        netfilter: &[f64],
    ) -> Self {
        let ratios: Vec<f64> = ebpf.iter().zip(netfilter).map(|(e, n)| e / n).collect();
        Self {
            metric,
            short,
            lower_is_better,
            direct: None,
            floor: None,
            ebpf: Spread::of(ebpf),
            netfilter: Spread::of(netfilter),
            ratio: Spread::of(&ratios),
            target: target.to_string(),
            added_cost: None,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "metric": self.metric,
            "direct": self.direct.map(Spread::to_json),
            "floor": self.floor.map(Spread::to_json),
            "ebpf": self.ebpf.to_json(),
            "netfilter": self.netfilter.to_json(),
            "ratio_ebpf_to_netfilter": self.ratio.to_json(),
            "target": self.target,
            "added_cost_over_floor": self.added_cost.map(Spread::to_json),
        })
    }
}

/// Flows of the small-packet floods (1000: each translated once, then
/// established).
const FLOWS: usize = 1000;
const UDP_SECONDS: Duration = Duration::from_secs(2);
const TCP_SECONDS: Duration = Duration::from_secs(3);

/// The forwarding hop over veth, each path in turn for `rounds` rounds.
/// The floor carries only the UDP flood: it forwards one way and
/// translates nothing, so no TCP connection can cross it.
pub fn veth(rounds: usize) -> Result<Vec<Compared>> {
    load::settle();
    let hop = Hop::new(10, 0)?;
    let paths = [Path::Direct, Path::Floor, Path::Ebpf, Path::Netfilter];
    let [direct, floor, ebpf, netfilter] = [0, 1, 2, 3];
    // Per path: datagrams/s, hop ns per datagram, Gbit/s, hop CPU s per GB.
    let mut m: [[Vec<f64>; 4]; 4] = Default::default();
    for round in 0..rounds {
        crate::interrupted()?;
        // A different order each round, so none always goes first.
        for k in 0..paths.len() {
            let i = (k + round) % paths.len();
            let path = paths[i];
            let frames = hop.frames(path, (0..FLOWS).map(load::flow));
            let ((pps, ns), tcp) = hop.with(path, |h| {
                h.open_flows(path, &frames);
                (
                    h.udp_rate(path, &frames, UDP_SECONDS),
                    (path != Path::Floor).then(|| h.tcp(path, TCP_SECONDS)),
                )
            })?;
            eprint!(
                "  veth round {round} {:9}: {pps:>10.0} datagrams/s ({ns:4.0} hop CPU ns each)",
                path.name(),
            );
            m[i][0].push(pps);
            m[i][1].push(ns);
            if let Some((gbps, hop_cpu)) = tcp {
                eprint!(", {gbps:6.2} Gbit/s ({hop_cpu:5.3} hop CPU s/GB)");
                m[i][2].push(gbps);
                m[i][3].push(hop_cpu);
            }
            eprintln!();
        }
    }
    // The hop's CPU per datagram over the floor's, per round.
    let added: Vec<f64> = (0..rounds)
        .map(|r| {
            let f = m[floor][1][r];
            (m[ebpf][1][r] - f) / (m[netfilter][1][r] - f)
        })
        .collect();
    let metrics: [(Metric, &str); 4] = [
        (
            (
                "small UDP datagrams per second, 1000 flows (one sending CPU)",
                "veth: UDP datagrams/s",
                false,
            ),
            "",
        ),
        (
            (
                "the hop's CPU ns per datagram",
                "veth: hop CPU per datagram",
                true,
            ),
            &format!("<= {}x", crate::report::target::HOP_RAW),
        ),
        (
            ("bulk TCP Gbit/s, one stream", "veth: TCP Gbit/s", false),
            "",
        ),
        (
            (
                "the hop's CPU s per GB, bulk TCP",
                "veth: hop CPU per GB (TCP)",
                true,
            ),
            "<= 0.5x",
        ),
    ];
    Ok(metrics
        .iter()
        .enumerate()
        .map(|(k, (metric, target))| Compared {
            direct: Some(Spread::of(&m[direct][k])),
            floor: (!m[floor][k].is_empty()).then(|| Spread::of(&m[floor][k])),
            added_cost: (k == 1).then(|| Spread::of(&added)),
            ..Compared::new(*metric, target, &m[ebpf][k], &m[netfilter][k])
        })
        .collect())
}

/// The veth hop's small-packet rate at one size of the route tables or the
/// connection tables.
pub struct ScaleRun {
    pub routes: usize,
    pub nat_flows: usize,
    pub ebpf_pps: Spread,
    pub netfilter_pps: Spread,
    /// The hop's CPU ns per datagram.
    pub ebpf_ns: Spread,
    pub netfilter_ns: Spread,
    /// Kernel memory of the eBPF connection table per flow it was sized
    /// for, and the entries it held.
    pub ebpf_bytes_per_flow: f64,
    pub ebpf_entries: usize,
    /// Connections in the router's conntrack after filling, and its hash
    /// table's buckets.
    pub conntrack: u64,
    pub conntrack_buckets: u64,
}

impl ScaleRun {
    pub fn to_json(&self) -> Value {
        json!({
            "routes": self.routes, "nat_flows": self.nat_flows,
            "ebpf_pps": self.ebpf_pps.to_json(), "netfilter_pps": self.netfilter_pps.to_json(),
            "ebpf_hop_ns": self.ebpf_ns.to_json(), "netfilter_hop_ns": self.netfilter_ns.to_json(),
            "ebpf_nat_bytes_per_flow": self.ebpf_bytes_per_flow, "ebpf_nat_entries": self.ebpf_entries,
            "conntrack_entries": self.conntrack, "conntrack_buckets": self.conntrack_buckets,
        })
    }
}

/// `routes` unused routes more, `nat_flows` live flows opened through each
/// datapath (the eBPF table sized for them, and conntrack's hash table as
/// big), then floods over all of them, each datapath in turn.
pub fn veth_scale(routes: usize, nat_flows: usize, rounds: usize) -> Result<ScaleRun> {
    load::settle();
    // As many buckets per entry in conntrack's hash table as in the eBPF
    // table (a power of two at least its two entries per flow), so that
    // the comparison measures the datapaths, not conntrack's default
    // bucket count. The setting is global: set before the router's
    // entries exist, put back after its namespace is gone (declared first,
    // dropped last).
    let buckets = (2 * nat_flows as u64).next_power_of_two();
    let _buckets = load::KernelSetting::at_least(load::CONNTRACK_HASHSIZE, buckets)?;
    let hop = Hop::new(routes, u32::try_from(nat_flows)?)?;
    let room = hop.conntrack("max");
    anyhow::ensure!(
        room >= nat_flows as u64,
        "conntrack holds at most {room} connections in the router's namespace, fewer than the {nat_flows} flows (raise net.netfilter.nf_conntrack_max)"
    );
    let mut all = hop.frames(Path::Ebpf, (0..nat_flows).map(load::flow));
    for path in [Path::Ebpf, Path::Netfilter] {
        hop.with(path, |h| h.open_flows(path, &all))?;
    }
    // The flood goes over every live flow, one after the other in an order
    // spread over the whole table.
    load::shuffle(&mut all);
    let (ebpf_bytes, ebpf_entries) = hop.ebpf_nat_memory()?;
    let conntrack = hop.conntrack("count");
    let conntrack_buckets = hop.conntrack("buckets");
    // Per datapath: datagrams/s and the hop's ns per datagram.
    let (mut ebpf, mut netfilter) = ((vec![], vec![]), (vec![], vec![]));
    for round in 0..rounds {
        crate::interrupted()?;
        let order = if round % 2 == 0 {
            [Path::Ebpf, Path::Netfilter]
        } else {
            [Path::Netfilter, Path::Ebpf]
        };
        for path in order {
            let (rate, ns) = hop.with(path, |h| h.udp_rate(path, &all, UDP_SECONDS))?;
            let into = if path == Path::Ebpf {
                &mut ebpf
            } else {
                &mut netfilter
            };
            into.0.push(rate);
            into.1.push(ns);
        }
    }
    let run = ScaleRun {
        routes,
        nat_flows,
        ebpf_pps: Spread::of(&ebpf.0),
        netfilter_pps: Spread::of(&netfilter.0),
        ebpf_ns: Spread::of(&ebpf.1),
        netfilter_ns: Spread::of(&netfilter.1),
        ebpf_bytes_per_flow: ebpf_bytes as f64 / nat_flows as f64,
        ebpf_entries,
        conntrack,
        conntrack_buckets,
    };
    eprintln!(
        "  scale: {routes} routes, {nat_flows} flows: eBPF {:.0}/s, {:.0} hop ns ({} entries, {:.0} B/flow), netfilter {:.0}/s, {:.0} hop ns ({} conntrack entries, {} buckets)",
        run.ebpf_pps.median,
        run.ebpf_ns.median,
        run.ebpf_entries,
        run.ebpf_bytes_per_flow,
        run.netfilter_pps.median,
        run.netfilter_ns.median,
        run.conntrack,
        run.conntrack_buckets,
    );
    Ok(run)
}

/// The daemon between userspace WireGuard on both sides, each datapath in
/// turn.
pub fn wireguard(rounds: usize) -> Result<Vec<Compared>> {
    let (mut ebpf, mut netfilter) = (vec![], vec![]);
    for round in 0..rounds {
        crate::interrupted()?;
        let order = if round % 2 == 0 {
            ["ebpf", "netfilter"]
        } else {
            ["netfilter", "ebpf"]
        };
        for datapath in order {
            let r = wireguard::round(datapath, TCP_SECONDS);
            eprintln!(
                "  wireguard round {round} {datapath:9}: {:>8.0} datagrams/s, {:5.2} Gbit/s, {:5.2} CPU s/GB in TailGuard's namespace",
                r.udp_pps, r.tcp_gbps, r.namespace_cpu_per_gb
            );
            if datapath == "ebpf" {
                ebpf.push(r);
            } else {
                netfilter.push(r);
            }
        }
    }
    let field = |rounds: &[wireguard::Round], f: fn(&wireguard::Round) -> f64| -> Vec<f64> {
        rounds.iter().map(f).collect()
    };
    Ok(vec![
        Compared::new(
            (
                "small UDP datagrams per second, 64 flows",
                "WireGuard: UDP datagrams/s",
                false,
            ),
            ">= 1x",
            &field(&ebpf, |r| r.udp_pps),
            &field(&netfilter, |r| r.udp_pps),
        ),
        Compared::new(
            (
                "bulk TCP Gbit/s, one stream",
                "WireGuard: TCP Gbit/s",
                false,
            ),
            ">= 1x",
            &field(&ebpf, |r| r.tcp_gbps),
            &field(&netfilter, |r| r.tcp_gbps),
        ),
        Compared::new(
            (
                "CPU s per GB in TailGuard's namespace (processes and its devices' kernel work), bulk TCP",
                "WireGuard: TailGuard's CPU per GB (TCP)",
                true,
            ),
            "< 1x",
            &field(&ebpf, |r| r.namespace_cpu_per_gb),
            &field(&netfilter, |r| r.namespace_cpu_per_gb),
        ),
    ])
}
