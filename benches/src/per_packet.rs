//! Per-packet cost of the fast path's main paths, IPv4 and IPv6.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context as _, Result, bail};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use etherparse::PacketBuilder;
use ipnet::IpNet;
use tailguard::datapath::{BenchFloor, Datapath, LinkLayer, LoadOptions};
use tailguard_common::{
    Device, Direction,
    config::{FloorHop, LinkAddresses},
    nat::{NAT_MIN_FLOWS, TableSize},
};

/// Runs per path: enough for a stable median on 2 cores in seconds.
const RUNS: usize = 20_000;

/// The rows issue 17's targets are about.
pub const NEW_FLOW: &str = "new flow (wg->ts, masquerade)";
pub const ESTABLISHED: &str = "established (wg->ts, masquerade)";

pub struct Row {
    pub path: &'static str,
    pub family: &'static str,
    pub verdict: u32,
    pub median_ns: u64,
    pub p90_ns: u64,
    /// The median over the floor's.
    pub ratio: f64,
}

impl Row {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path, "family": self.family, "verdict": self.verdict,
            "median_ns": self.median_ns, "p90_ns": self.p90_ns, "ratio_to_floor": self.ratio,
        })
    }
}

pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| path | family | verdict | median ns | p90 ns | x floor |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} |\n",
            r.path, r.family, r.verdict, r.median_ns, r.p90_ns, r.ratio
        ));
    }
    out
}

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

/// The Ethernet addresses every program under test writes into the frames
/// it redirects (ours on both devices, the floor's), so that the floor
/// does the same frame write as the fast path and the ratio compares the
/// policy alone. Any addresses do: test runs never send.
const LINK: LinkAddresses = LinkAddresses::new([2, 0, 0, 0, 0, 2], MAC);

pub(crate) fn udp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC, MAC);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family per packet"),
    };
    let mut out = Vec::new();
    ip.udp(sport, dport)
        .write(&mut out, &[0u8; 18])
        .expect("writing to a Vec");
    out
}

/// Kernel-measured ns of single runs of `program` on `frames` (cycled).
fn time(program: &SchedClassifier, frames: &[Vec<u8>]) -> Result<(u32, Vec<u64>)> {
    let mut out = vec![0u8; 256];
    let mut verdict = 0;
    let mut samples = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let frame = &frames[i % frames.len()];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat: 1,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        verdict = result.return_value;
        samples.push(result.duration.as_nanos() as u64);
    }
    samples.sort_unstable();
    Ok((verdict, samples))
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("a valid address")
}

/// The programs loaded with a connection table of `nat` (0: the default),
/// configured as a node with both families, and their routes (the sides'
/// networks, and `extra_routes` more to the tailnet).
pub(crate) fn loaded(nat: TableSize, extra_routes: usize) -> Result<Datapath> {
    let mut dp = Datapath::load(&LoadOptions {
        nat,
        ..LoadOptions::uniform(LinkLayer::Ethernet)
    })
    .context("loading the programs")?;
    // The ifindexes only name the redirect's target: test runs never send.
    tailguard_tests::node::bridge(
        &mut dp,
        (1, 1),
        true,
        crate::load::unused_routes(extra_routes).map(IpNet::V4),
    )?;
    crate::load::check_unused_routes(&dp, extra_routes)?;
    for device in Device::ALL {
        dp.set_link_addresses(device, LINK)?;
    }
    Ok(dp)
}

pub fn run() -> Result<Vec<Row>> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load eBPF programs: run them as root (cargo xtask bench does)");
    }
    // Room in both families for every new flow the runs make.
    let room = TableSize {
        v4_flows: 2 * RUNS as u32,
        v6_flows: 2 * RUNS as u32,
        unreplied_per_source: 0,
    };
    let dp = loaded(room, 0)?;
    let mut floor_program = BenchFloor::load().context("loading the floor program")?;
    // Redirecting to the loopback device (ifindex 0), as ours do to the
    // ifindex 1 they are configured with.
    floor_program.set_hop(&FloorHop {
        link: LINK,
        ifindex: 0,
    })?;

    struct Family {
        name: &'static str,
        client: IpAddr,
        peer: IpAddr,
        own_ts: IpAddr,
        other_client: IpAddr,
    }
    let families = [
        Family {
            name: "IPv4",
            client: Ipv4Addr::new(10, 66, 0, 7).into(),
            peer: Ipv4Addr::new(100, 64, 0, 9).into(),
            own_ts: Ipv4Addr::new(100, 64, 0, 1).into(),
            other_client: Ipv4Addr::new(10, 66, 0, 8).into(),
        },
        Family {
            name: "IPv6",
            client: v6("fd66::7").into(),
            peer: v6("fd7a:115c:a1e0::9").into(),
            own_ts: v6("fd7a:115c:a1e0::1").into(),
            other_client: v6("fd66::8").into(),
        },
    ];
    let mut rows = Vec::new();
    for f in families {
        let established = vec![udp(f.client, f.peer, 40000, 443)];
        // One packet first, so the flow exists; its reply is the packet the
        // peer would send back to the port it was given.
        let first = run_once(&dp, Device::WireGuard, &established[0])?;
        let nat_port = u16::from_be_bytes(
            first[14 + if f.own_ts.is_ipv4() { 20 } else { 40 }..][..2].try_into()?,
        );
        let reply = vec![udp(f.peer, f.own_ts, 443, nat_port)];
        let dest_ip = vec![udp(f.peer, f.own_ts, 5000, 80)];
        run_once(&dp, Device::Tailscale, &dest_ip[0])?;
        // New flows: a different source and destination port each run (one
        // peer address and port can hold only as many flows as the
        // translation range has ports).
        let new: Vec<Vec<u8>> = (0..RUNS as u16)
            .map(|i| udp(f.client, f.peer, 1024 + i, 20000 + i))
            .collect();
        let drop = vec![udp(f.client, f.other_client, 1, 2)];

        let floor = time(floor_program.program()?, &established)?;
        let floor_median = floor.1[floor.1.len() / 2].max(1);
        let row = |path, (verdict, s): (u32, Vec<u64>)| Row {
            path,
            family: f.name,
            verdict,
            median_ns: s[s.len() / 2],
            p90_ns: s[s.len() * 9 / 10],
            ratio: s[s.len() / 2] as f64 / floor_median as f64,
        };
        rows.push(row("floor: Ethernet addresses, redirect", floor));
        let wg = dp.program(Device::WireGuard, Direction::Ingress)?;
        rows.push(row(NEW_FLOW, time(wg, &new)?));
        rows.push(row(ESTABLISHED, time(wg, &established)?));
        rows.push(row("drop (wg->wg, isolated)", time(wg, &drop)?));
        let ts = dp.program(Device::Tailscale, Direction::Ingress)?;
        rows.push(row("reply (ts->wg, translated back)", time(ts, &reply)?));
        rows.push(row("TS_DEST_IP (ts->own address)", time(ts, &dest_ip)?));
    }
    Ok(rows)
}

pub(crate) fn run_once(dp: &Datapath, device: Device, frame: &[u8]) -> Result<Vec<u8>> {
    run_verdict(dp, device, frame).map(|(_, out)| out)
}

/// Runs `device`'s ingress program on `frame` once: the verdict and what
/// left.
pub(crate) fn run_verdict(dp: &Datapath, device: Device, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; 256];
    let result = dp
        .program(device, Direction::Ingress)?
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// One point of the scale runs: established flows' cost with the route
/// tries or the connection table at a size (each run a different live flow
/// of the whole table).
pub struct ScalePoint {
    pub ipv6: bool,
    pub routes: usize,
    pub nat_flows: usize,
    /// Entries found in the table after filling it (two per flow).
    pub nat_entries: usize,
    pub median_ns: u64,
    pub p90_ns: u64,
    /// Kernel memory of the family's connection table (the whole
    /// preallocated map, as its fdinfo's `memlock` says).
    pub nat_bytes: u64,
    /// How long the daemon's sweeper takes to go through the full table.
    pub sweep_ms: u64,
}

impl ScalePoint {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "family": if self.ipv6 { "IPv6" } else { "IPv4" },
            "routes": self.routes, "nat_flows": self.nat_flows, "nat_entries": self.nat_entries,
            "median_ns": self.median_ns, "p90_ns": self.p90_ns, "nat_bytes": self.nat_bytes,
            "nat_bytes_per_flow": self.nat_bytes as f64 / self.nat_flows.max(1) as f64,
            "sweep_ms": self.sweep_ms,
        })
    }
}

/// Established-flow cost with `routes` routes and `nat_flows` live flows
/// of one family (a table sized for them, filled by the programs
/// themselves: each flow's first packet run once, from one WireGuard client
/// to one tailnet peer; the budget of unreplied flows is off in the test
/// configuration).
pub fn scale_point(routes: usize, nat_flows: usize, ipv6: bool) -> Result<ScalePoint> {
    let flows = u32::try_from(nat_flows)?;
    let size = TableSize {
        v4_flows: if ipv6 { NAT_MIN_FLOWS } else { flows },
        v6_flows: if ipv6 { flows } else { NAT_MIN_FLOWS },
        unreplied_per_source: 0,
    };
    let mut dp = loaded(size, routes)?;
    let (client, peer): (IpAddr, IpAddr) = if ipv6 {
        (v6("fd66::7").into(), v6("fd7a:115c:a1e0::9").into())
    } else {
        (
            Ipv4Addr::new(10, 66, 0, 7).into(),
            Ipv4Addr::new(100, 64, 0, 9).into(),
        )
    };
    let frame = |i: usize| {
        let f = crate::load::flow(i);
        udp(client, peer, f.sport, f.dport)
    };
    for i in 0..nat_flows {
        run_once(&dp, Device::WireGuard, &frame(i))?;
    }
    // Every run a flow of its own (as many as the runs, or every flow of a
    // smaller table), spread over the whole table and in shuffled order:
    // lookups hit the table as traffic over all its flows would, not a few
    // hot cache lines.
    let measured = nat_flows.min(RUNS);
    let mut sample: Vec<Vec<u8>> = (0..measured)
        .map(|k| frame(k * nat_flows / measured))
        .collect();
    crate::load::shuffle(&mut sample);
    let (_, s) = time(dp.program(Device::WireGuard, Direction::Ingress)?, &sample)?;
    let table = if ipv6 { "NAT6" } else { "NAT4" };
    let nat_bytes = dp.map_memory()?.get(table).copied().unwrap_or(0);
    let nat_entries = dp
        .halves()?
        .iter()
        .filter(|(k, _)| k.is_ipv6() == ipv6)
        .count();
    let mut swept = tailguard::datapath::sweeper::Totals::default();
    tailguard::datapath::sweeper::sweep(&mut dp, &mut swept)?;
    Ok(ScalePoint {
        ipv6,
        routes,
        nat_flows,
        nat_entries,
        median_ns: s[s.len() / 2],
        p90_ns: s[s.len() * 9 / 10],
        nat_bytes,
        sweep_ms: swept.last_duration.as_millis() as u64,
    })
}
