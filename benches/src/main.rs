//! `tailguard-bench` (run by `cargo xtask bench`, as root): the eBPF fast
//! path against the kernel path (the original's design: the kernel forwards,
//! netfilter translates), measured side by side in one run. It measures and
//! writes `benches/results/`; it asserts nothing.
//!
//! 1. Per-packet cost by `BPF_PROG_TEST_RUN` (`per_packet`), next to a
//!    program that only redirects (the floor).
//! 2. Forwarding throughput through a TailGuard namespace, both datapaths in
//!    turn: over veth (`hop`), and as users run it, the daemon between
//!    userspace WireGuard on both sides (`wireguard`).
//! 3. Scale: the same with 10, 10,000, 100,000 and 1,000,000 routes and
//!    1,000, 100,000 and 1,000,000 live flows (each run or datagram a
//!    different one of them), and the memory their tables take.

mod chart;
mod churn;
mod hop;
mod load;
mod per_packet;
mod report;
mod throughput;
mod wireguard;

use std::time::Instant;

use anyhow::{Result, bail};

/// Rounds of each throughput comparison (medians of these).
const ROUNDS: usize = 5;
const SCALE_ROUNDS: usize = 3;
const WIREGUARD_ROUNDS: usize = 3;
const ROUTE_POINTS: [usize; 4] = [10, 10_000, 100_000, 1_000_000];
const FLOW_POINTS: [usize; 3] = [1_000, 100_000, 1_000_000];
/// Live flows at the route points, routes at the flow points.
const BASE_FLOWS: usize = 1_000;
const BASE_ROUTES: usize = 10;
/// conntrack's limit for the run: the million-flow point's, with room.
const CONNTRACK_ROOM: u64 = 1 << 21;

/// Set by SIGINT/SIGTERM: the runs stop at the next round and everything
/// they made is taken down as usual (namespaces, programs, conntrack's
/// limit), rather than left behind by a killed process.
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_signal(_: i32) {
    STOP.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// An error once a stop was asked for.
pub fn interrupted() -> Result<()> {
    if STOP.load(std::sync::atomic::Ordering::Relaxed) {
        bail!("interrupted: stopped after cleaning up");
    }
    Ok(())
}

fn main() -> Result<()> {
    for signal in [nix::sys::signal::SIGINT, nix::sys::signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic.
        unsafe {
            nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::Handler(on_signal))
        }?;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the benchmarks load eBPF programs and make namespaces: run them as root (cargo xtask bench does)"
        );
    }
    // `tailguard-bench veth` (or any of the sections' names) runs only
    // those and writes nothing: for looking at one part, e.g. under perf.
    let only: Vec<String> = std::env::args().skip(1).collect();
    if !only.is_empty() {
        return sections(&only);
    }
    let started = Instant::now();
    let _conntrack = load::KernelSetting::at_least(load::CONNTRACK_MAX, CONNTRACK_ROOM)?;

    eprintln!("per-packet cost (BPF_PROG_TEST_RUN)");
    let per_packet = per_packet::run()?;
    let mut per_packet_scale = Vec::new();
    for routes in ROUTE_POINTS {
        per_packet_scale.push(per_packet::scale_point(routes, BASE_FLOWS, false)?);
    }
    for ipv6 in [false, true] {
        for flows in FLOW_POINTS {
            per_packet_scale.push(per_packet::scale_point(BASE_ROUTES, flows, ipv6)?);
        }
    }

    eprintln!("the connection table under churn, with and without the source budget");
    let churn = vec![churn::run(4096)?, churn::run(0)?];

    eprintln!("forwarding over veth: direct, eBPF, netfilter in turn");
    let veth = throughput::veth(ROUNDS)?;
    eprintln!("scale over veth");
    let mut scale = Vec::new();
    for routes in ROUTE_POINTS {
        scale.push(throughput::veth_scale(routes, BASE_FLOWS, SCALE_ROUNDS)?);
    }
    for flows in FLOW_POINTS {
        scale.push(throughput::veth_scale(BASE_ROUTES, flows, SCALE_ROUNDS)?);
    }
    eprintln!("forwarding between userspace WireGuard: the daemon with each datapath in turn");
    let wireguard = throughput::wireguard(WIREGUARD_ROUNDS)?;

    let results = report::Results {
        machine: report::machine(),
        seconds: started.elapsed().as_secs(),
        per_packet,
        per_packet_scale,
        churn,
        veth,
        scale,
        wireguard,
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("results.json"),
        format!("{:#}\n", results.to_json()),
    )?;
    let table = results.markdown();
    std::fs::write(dir.join("results.md"), &table)?;
    chart::draw(&results, &dir.join("results.png"))?;
    report::into_readme(&dir.join("../../README.md"), &table)?;
    print!("{table}");
    println!(
        "\n(written to {}: results.json, results.md, results.png; and README.md)",
        dir.display()
    );
    Ok(())
}

fn sections(only: &[String]) -> Result<()> {
    for section in only {
        match section.as_str() {
            "per-packet" => print!("{}", per_packet::markdown(&per_packet::run()?)),
            // The connection table: its memory per family at a million
            // flows, and churn with and without the source budget.
            "table" => {
                for ipv6 in [false, true] {
                    let p = per_packet::scale_point(10, 1_000_000, ipv6)?;
                    println!("{}", p.to_json());
                }
                print!("{}", churn::markdown(&[churn::run(4096)?, churn::run(0)?]));
            }
            "veth" => {
                for c in throughput::veth(ROUNDS)? {
                    print!("{}: ratio {:.2}", c.metric, c.ratio.median);
                    if let Some(added) = c.added_cost {
                        print!(", added cost over the floor {:.2}", added.median);
                    }
                    println!();
                }
            }
            // One scale point, e.g. `scale:10:1000000` (routes, flows):
            // per packet in both families, then over veth.
            scale if scale.starts_with("scale:") => {
                let mut sizes = scale["scale:".len()..].split(':').map(str::parse::<usize>);
                let (Some(Ok(routes)), Some(Ok(flows)), None) =
                    (sizes.next(), sizes.next(), sizes.next())
                else {
                    bail!("{scale:?}: say scale:ROUTES:FLOWS");
                };
                let _conntrack =
                    load::KernelSetting::at_least(load::CONNTRACK_MAX, CONNTRACK_ROOM)?;
                for ipv6 in [false, true] {
                    println!(
                        "{}",
                        per_packet::scale_point(routes, flows, ipv6)?.to_json()
                    );
                }
                let run = throughput::veth_scale(routes, flows, SCALE_ROUNDS)?;
                println!("{}", run.to_json());
            }
            "wireguard" => {
                for c in throughput::wireguard(WIREGUARD_ROUNDS)? {
                    println!("{}: ratio {:.2}", c.metric, c.ratio.median);
                }
            }
            // One path's flood for 10 s, to profile (`perf record -C 1`).
            "flood-floor" | "flood-ebpf" | "flood-netfilter" => {
                let path = match section.as_str() {
                    "flood-floor" => hop::Path::Floor,
                    "flood-ebpf" => hop::Path::Ebpf,
                    _ => hop::Path::Netfilter,
                };
                let hop = hop::Hop::new(10, 0)?;
                let frames = hop.frames(path, (0..1000).map(load::flow));
                let (pps, ns) = hop.with(path, |h| {
                    h.open_flows(path, &frames);
                    h.udp_rate(path, &frames, std::time::Duration::from_secs(10))
                })?;
                println!("{section}: {pps:.0} datagrams/s, {ns:.0} hop CPU ns each");
            }
            other => bail!(
                "no section {other:?}: per-packet, table, veth, scale:ROUTES:FLOWS, wireguard, flood-floor, flood-ebpf or flood-netfilter"
            ),
        }
    }
    Ok(())
}
