//! Forwarding as users run it: the whole daemon between real userspace
//! WireGuard on both sides (the scenario suite's bridge: a WireGuard client
//! namespace, TailGuard's namespace with its wireguard-go and the Tailscale
//! stand-in's tailnet link, a tailnet peer namespace), with
//! `TG_DATAPATH=ebpf` and `TG_DATAPATH=netfilter` in turn. Each round has
//! a bridge of its own, so no WireGuard session outlives its daemon.
//!
//! CPU in TailGuard's namespace is its processes' time plus the kernel's
//! work on what arrives on its devices: that is steered to a CPU of its own
//! ([`load::HOP_CPU`]), where nothing else runs but a soaker; every process
//! of the bridge runs on the other.

use std::{
    net::{SocketAddr, UdpSocket},
    process::Command,
    time::{Duration, Instant},
};

use tailguard_tests::{
    bridge::Bridge,
    daemon::DaemonUnderTest,
    netns::{NetNs, run},
    topology::*,
};

use crate::load::{self, CpuTime, UdpCounter};

/// What one round measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    /// Datagrams per second reaching the tailnet peer.
    pub udp_pps: f64,
    pub tcp_gbps: f64,
    /// CPU seconds per GB in TailGuard's namespace: its processes (the
    /// daemon, its wireguard-go, the stand-in's tailnet link) and the
    /// kernel's work on its devices.
    pub namespace_cpu_per_gb: f64,
}

/// One round with a fresh bridge: starts the daemon with `datapath`,
/// measures, stops it.
pub fn round(datapath: &str, duration: Duration) -> Round {
    load::settle();
    let b = Bridge::new("bench-wg");
    let counter = UdpCounter::install(&b.tailnet, &[&b.tailnet_peer.name]);
    let discard_port = b.tailnet.run(load::tcp_discard);
    let node = b.bed.ours.run(|| {
        DaemonUnderTest::builder(&b)
            .datapath(datapath)
            .start_healthy()
    });
    for device in b.bed.ours.devices().iter().filter(|d| *d != "lo") {
        load::steer(&b.bed.ours, device, load::HOP_CPU);
    }
    for ns in [&b.bed.ours, &b.bed.theirs, &b.client, &b.tailnet] {
        keep_on_endpoint_cpu(ns);
    }
    let soaker = load::Soaker::start(load::HOP_CPU);

    let before = counter.count();
    let start = Instant::now();
    b.client.run(|| udp_flood(duration));
    let elapsed = start.elapsed().as_secs_f64();
    // wireguard-go queues much of a flood: let it drain before the count
    // and the next measurement.
    std::thread::sleep(Duration::from_secs(1));
    let udp_pps = (counter.count() - before) as f64 / elapsed;

    let target = SocketAddr::new(TAILNET_PEER.parse().expect("an address"), discard_port);
    let (cpu, ns_cpu) = (CpuTime::now(), load::namespace_cpu(&b.bed.ours));
    let start = Instant::now();
    let bytes = b.client.run(|| load::tcp_stream(target, duration));
    let elapsed = start.elapsed().as_secs_f64();
    let ns_used = load::namespace_cpu(&b.bed.ours) - ns_cpu;
    let used = CpuTime::now().since(cpu);
    drop(soaker);
    b.bed.ours.run(|| node.stop());
    drop(counter);
    let gb = bytes as f64 / 1e9;
    Round {
        udp_pps,
        tcp_gbps: gb * 8.0 / elapsed,
        namespace_cpu_per_gb: (ns_used + used.hop) / gb,
    }
}

/// Every thread of every process in `ns` onto [`load::ENDPOINT_CPU`].
fn keep_on_endpoint_cpu(ns: &NetNs) {
    let mask = format!("{:x}", 1u64 << load::ENDPOINT_CPU);
    for pid in run(Command::new("ip").args(["netns", "pids", ns.name()])).split_whitespace() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", &mask, pid])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Small datagrams to the tailnet peer over 64 flows (one socket each),
/// as fast as one thread sends them, for `duration`.
fn udp_flood(duration: Duration) {
    load::pin_to_cpu(load::ENDPOINT_CPU);
    let sockets: Vec<UdpSocket> = (0..64)
        .map(|i| {
            let socket = UdpSocket::bind("0.0.0.0:0").expect("binding");
            socket
                .connect((TAILNET_PEER, 3000 + i))
                .expect("connecting");
            socket
        })
        .collect();
    let payload = [0u8; 18];
    let deadline = Instant::now() + duration;
    while Instant::now() < deadline {
        for socket in &sockets {
            // A full queue is the load doing its job; keep going.
            let _ = socket.send(&payload);
        }
    }
}
