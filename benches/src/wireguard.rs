//! Forwarding as users run it: the whole daemon between real userspace
//! WireGuard on both sides (the scenario suite's bridge: a WireGuard client
//! namespace, TailGuard's namespace with its wireguard-go and the Tailscale
//! stand-in's tailnet link, a tailnet peer namespace), restarted with
//! `TG_DATAPATH=ebpf` and `TG_DATAPATH=netfilter` in turn.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use tailguard_tests::bridge::{Bridge, TAILNET_PEER};

use crate::load::{self, CpuTime, UdpCounter};

/// What one round measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Round {
    /// Datagrams per second reaching the tailnet peer.
    pub udp_pps: f64,
    pub tcp_gbps: f64,
    /// CPU seconds per GB of the processes in TailGuard's namespace (the
    /// daemon, its wireguard-go, the stand-in's tailnet link).
    pub namespace_cpu_per_gb: f64,
    /// The machine's CPU seconds per GB (all namespaces and softirq).
    pub machine_cpu_per_gb: f64,
}

pub struct Bed {
    // The counter goes before the namespaces it lives in.
    counter: UdpCounter,
    bridge: Bridge,
    discard_port: u16,
}

impl Bed {
    pub fn new() -> Self {
        let bridge = Bridge::new("bench-wg");
        let counter = UdpCounter::install(&bridge.tailnet, &[&bridge.tailnet_peer.name]);
        let discard_port = bridge.tailnet.run(load::tcp_discard);
        Self {
            counter,
            bridge,
            discard_port,
        }
    }

    /// Starts the daemon with `datapath`, measures, stops it.
    pub fn round(&self, datapath: &str, duration: Duration) -> Round {
        let b = &self.bridge;
        let node = b
            .bed
            .ours
            .run(|| b.start_healthy(&[("TG_DATAPATH", datapath)]));
        let before = self.counter.count();
        let start = Instant::now();
        b.client.run(|| udp_flood(duration));
        let elapsed = start.elapsed().as_secs_f64();
        // wireguard-go queues much of a flood: let it drain before the
        // count and the next measurement.
        std::thread::sleep(Duration::from_secs(1));
        let udp_pps = (self.counter.count() - before) as f64 / elapsed;

        let target = SocketAddr::new(TAILNET_PEER.parse().expect("an address"), self.discard_port);
        let (cpu, ns_cpu) = (CpuTime::now(), load::namespace_cpu(&b.bed.ours));
        let start = Instant::now();
        let bytes = b.client.run(|| load::tcp_stream(target, duration));
        let elapsed = start.elapsed().as_secs_f64();
        let ns_used = load::namespace_cpu(&b.bed.ours) - ns_cpu;
        let used = CpuTime::now().since(cpu);
        b.bed.ours.run(|| node.daemon.stop());
        let gb = bytes as f64 / 1e9;
        Round {
            udp_pps,
            tcp_gbps: gb * 8.0 / elapsed,
            namespace_cpu_per_gb: ns_used / gb,
            machine_cpu_per_gb: used.machine / gb,
        }
    }
}

/// Small datagrams to the tailnet peer over 64 flows (one socket each),
/// as fast as one thread sends them, for `duration`.
fn udp_flood(duration: Duration) {
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
