//! The programs attached for real: two L3 (TUN) devices in a namespace of
//! their own, a known set of packets in and out of each, and counters that
//! must match exactly. Then detaching must leave the devices as they were.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr},
    process::Command,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType, loaded_programs};
use tailguard::config::settings::AttachMode;
use tailguard::datapath::{Backend, Counters, Datapath, LoadOptions};
use tailguard_common::{Counter, Device, Direction, PacketClass};
use tailguard_tests::{
    netns::{NetNs, run},
    packets, require_root,
    topology::*,
    tun::{EgressInjector, Tun},
};

const WG: &str = "tgwg0";
const TS: &str = "tgts0";

#[test]
fn tcx_counts_exactly_the_packets_that_cross_and_detaches_cleanly() {
    counts_exactly(AttachMode::Auto, Backend::Tcx);
}

#[test]
fn clsact_fallback_counts_exactly_and_removes_its_qdisc() {
    counts_exactly(AttachMode::Clsact, Backend::Clsact);
}

/// One packet the test sends, and where the program must count it.
struct Sent {
    device: Device,
    direction: Direction,
    class: PacketClass,
    packet: Vec<u8>,
}

fn traffic() -> Vec<Sent> {
    let v4 = |n: u8, len: usize| {
        packets::ipv4_udp(
            Ipv4Addr::new(10, 1, 0, n),
            Ipv4Addr::new(100, 64, 0, 9),
            5000,
            6000,
            &vec![n; len],
        )
    };
    let v6 = |n: u8, len: usize| {
        let src: Ipv6Addr = format!("fd00:1::{n}").parse().unwrap();
        packets::ipv6_udp(
            src,
            CRAFTED_TAILNET_PEER_V6.parse().unwrap(),
            5000,
            6000,
            &vec![n; len],
        )
    };
    // Headers cut short: BPF_PROG_TEST_RUN refuses these, a TUN device
    // takes them.
    let mut cut4 = v4(9, 40);
    cut4.truncate(12);
    let mut cut6 = v6(9, 40);
    cut6.truncate(30);
    let mut sent = Vec::new();
    let mut add = |device, direction, class, packets: Vec<Vec<u8>>| {
        for packet in packets {
            sent.push(Sent {
                device,
                direction,
                class,
                packet,
            });
        }
    };
    use Device::{Tailscale, WireGuard};
    use Direction::{Egress, Ingress};
    use PacketClass::{Ipv4, Ipv6, Malformed};
    add(
        WireGuard,
        Ingress,
        Ipv4,
        vec![v4(1, 10), v4(2, 200), v4(3, 1300)],
    );
    add(WireGuard, Ingress, Ipv6, vec![v6(1, 10), v6(2, 1000)]);
    add(WireGuard, Ingress, Malformed, vec![cut4, cut6]);
    add(Tailscale, Ingress, Ipv4, vec![v4(4, 64), v4(5, 65)]);
    add(
        Tailscale,
        Ingress,
        Ipv6,
        vec![v6(3, 1), v6(4, 2), v6(5, 1200)],
    );
    add(
        WireGuard,
        Egress,
        Ipv4,
        vec![v4(6, 1), v4(7, 2), v4(8, 3), v4(9, 4)],
    );
    add(WireGuard, Egress, Ipv6, vec![v6(6, 100)]);
    add(Tailscale, Egress, Ipv4, vec![v4(10, 500)]);
    add(Tailscale, Egress, Ipv6, vec![v6(7, 7), v6(8, 8)]);
    sent
}

fn counts_exactly(mode: AttachMode, expected_backend: Backend) {
    require_root();
    let ns = NetNs::new("counters");
    ns.run(|| {
        let mut wg = Tun::create(WG);
        let mut ts = Tun::create(TS);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();

        let mut datapath = Datapath::load(&LoadOptions::default()).expect("loading programs");
        let ids: Vec<u32> = datapath.programs().unwrap().iter().map(|p| p.id).collect();
        for (device, name) in [(Device::WireGuard, WG), (Device::Tailscale, TS)] {
            let backend = runtime
                .block_on(datapath.attach(device, name, mode))
                .expect("attach");
            assert_eq!(backend, expected_backend, "backend on {name}");
            // A second attach is harmless and changes nothing.
            let again = runtime
                .block_on(datapath.attach(device, name, mode))
                .expect("attach twice");
            assert_eq!(again, expected_backend);
            assert_attached(&datapath, device, name, expected_backend);
        }

        // With IPv6 off and no addresses, the kernel sends nothing by itself:
        // every count below comes from this test's packets.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            datapath.counters().unwrap(),
            Counters::zero(),
            "counters before any traffic"
        );

        let sent = traffic();
        let injector = EgressInjector::new();
        for s in &sent {
            match (s.device, s.direction) {
                (Device::WireGuard, Direction::Ingress) => wg.inject(&s.packet),
                (Device::Tailscale, Direction::Ingress) => ts.inject(&s.packet),
                (Device::WireGuard, Direction::Egress) => injector.send(wg.ifindex(), &s.packet),
                (Device::Tailscale, Direction::Egress) => injector.send(ts.ifindex(), &s.packet),
            }
        }

        // What left each device is exactly what we sent out of it, unchanged.
        for (tun, device) in [(&mut wg, Device::WireGuard), (&mut ts, Device::Tailscale)] {
            let expected: Vec<&Vec<u8>> = sent
                .iter()
                .filter(|s| s.device == device && s.direction == Direction::Egress)
                .map(|s| &s.packet)
                .collect();
            let out = tun.read_sent(expected.len(), Duration::from_secs(3));
            assert_eq!(
                out.iter().collect::<Vec<_>>(),
                expected,
                "packets sent out of {}",
                tun.name()
            );
        }

        let mut expected: HashMap<(Device, Direction, PacketClass), Counter> = HashMap::new();
        for s in &sent {
            let c = expected
                .entry((s.device, s.direction, s.class))
                .or_default();
            *c = c.add(Counter {
                packets: 1,
                bytes: s.packet.len() as u64,
            });
        }
        let counters = wait_for(&datapath, |c| {
            c.slots().all(|(slot, count)| {
                count
                    == expected
                        .get(&(slot.device, slot.direction, slot.class))
                        .copied()
                        .unwrap_or_default()
            })
        });
        for (slot, count) in counters.slots() {
            let want = expected
                .get(&(slot.device, slot.direction, slot.class))
                .copied()
                .unwrap_or_default();
            assert_eq!(count, want, "counter {slot:?}");
        }

        runtime.block_on(datapath.detach()).expect("detach");
        for name in [WG, TS] {
            assert_nothing_attached(name);
        }
        assert_programs_unloaded(&ids);
    });
}

/// Polls the counters until `done` or two seconds pass: packets written to a
/// TUN device are processed in softirq context, shortly after the write.
fn wait_for(datapath: &Datapath, done: impl Fn(&Counters) -> bool) -> Counters {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let counters = datapath.counters().unwrap();
        if done(&counters) || Instant::now() > deadline {
            return counters;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_attached(datapath: &Datapath, device: Device, name: &str, backend: Backend) {
    for (direction, hook) in [
        (Direction::Ingress, TcAttachType::Ingress),
        (Direction::Egress, TcAttachType::Egress),
    ] {
        let ours = datapath
            .program(device, direction)
            .unwrap()
            .info()
            .unwrap()
            .id();
        match backend {
            Backend::Tcx => {
                let (_, programs) =
                    SchedClassifier::query_tcx(ifindex(name), hook).expect("TCX query");
                let ids: Vec<u32> = programs.iter().map(|p| p.id()).collect();
                assert_eq!(ids, vec![ours], "TCX {hook:?} programs on {name}");
            }
            Backend::Clsact => {
                let hook = if direction == Direction::Ingress {
                    "ingress"
                } else {
                    "egress"
                };
                let filters = run(Command::new("tc").args(["filter", "show", "dev", name, hook]));
                assert_eq!(
                    filters.matches("direct-action").count(),
                    1,
                    "one {hook} filter on {name}:\n{filters}"
                );
                assert!(
                    filters.contains(&format!("id {ours}")),
                    "our program on {name} {hook}:\n{filters}"
                );
            }
        }
    }
}

/// Nothing of ours left on `name`. Polled briefly: a link dies when its last
/// file descriptor closes, and a process forked meanwhile (the parallel test
/// runs `tc`) holds copies of every descriptor until it execs.
fn assert_nothing_attached(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left: usize = [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .map(|hook| {
                SchedClassifier::query_tcx(ifindex(name), hook)
                    .expect("TCX query")
                    .1
                    .len()
            })
            .sum();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TCX hooks of {name} still hold {left} program(s)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let qdiscs = run(Command::new("tc").args(["qdisc", "show", "dev", name]));
    assert!(
        !qdiscs.contains("clsact"),
        "clsact qdisc left on {name}:\n{qdiscs}"
    );
}

/// The kernel frees programs shortly after their last reference goes.
fn assert_programs_unloaded(ids: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let alive: Vec<u32> = loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.contains(id))
            .collect();
        if alive.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "programs {alive:?} still loaded after detach"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or_else(|e| panic!("{name}: {e}"))
}
