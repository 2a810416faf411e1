//! The TC programs run by the kernel on crafted packets (`BPF_PROG_TEST_RUN`):
//! verdict, output bytes and counters, for every program, both link layers.

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use tailguard::datapath::{Datapath, LinkLayer, LoadOptions};
use tailguard_common::{Counter, Device, Direction, PacketClass};
use tailguard_tests::{packets, require_root};

/// `TC_ACT_UNSPEC` (-1) as the kernel hands it back: "not mine, continue".
const CONTINUE: u32 = u32::MAX;

struct Run {
    verdict: u32,
    output: Vec<u8>,
}

fn run(datapath: &Datapath, device: Device, direction: Direction, input: &[u8]) -> Run {
    let program = datapath
        .program(device, direction)
        .expect("program is loaded");
    let mut output = vec![0u8; input.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(input),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    output.truncate(result.data_size_out as usize);
    Run {
        verdict: result.return_value,
        output,
    }
}

/// Runs `input` through one program and checks that exactly one counter
/// moved, by one packet of `input.len()` bytes, and that the packet went on
/// unchanged.
fn assert_counted(
    datapath: &Datapath,
    device: Device,
    direction: Direction,
    input: &[u8],
    class: PacketClass,
) {
    let before = datapath.counters().expect("reading counters");
    let run = run(datapath, device, direction, input);
    assert_eq!(run.verdict, CONTINUE, "{device:?} {direction:?}: verdict");
    assert_eq!(
        run.output, input,
        "{device:?} {direction:?}: the packet must pass unchanged"
    );
    let after = datapath.counters().expect("reading counters");
    for (slot, count) in after.slots() {
        let was = before.get(slot.device, slot.direction, slot.class);
        let expected = if (slot.device, slot.direction, slot.class) == (device, direction, class) {
            was.add(Counter {
                packets: 1,
                bytes: input.len() as u64,
            })
        } else {
            was
        };
        assert_eq!(
            count, expected,
            "slot {slot:?} after a {class:?} packet on {device:?} {direction:?}"
        );
    }
}

fn udp4() -> Vec<u8> {
    packets::ipv4_udp(
        Ipv4Addr::new(10, 1, 0, 2),
        Ipv4Addr::new(100, 64, 0, 7),
        40000,
        53,
        b"hello over IPv4",
    )
}

fn udp6() -> Vec<u8> {
    packets::ipv6_udp(
        "fd00:1::2".parse().unwrap(),
        "fd7a:115c:a1e0::7".parse::<Ipv6Addr>().unwrap(),
        40000,
        53,
        b"hello over IPv6, a little longer",
    )
}

const HOOKS: [(Device, Direction); 4] = [
    (Device::WireGuard, Direction::Ingress),
    (Device::WireGuard, Direction::Egress),
    (Device::Tailscale, Direction::Ingress),
    (Device::Tailscale, Direction::Egress),
];

#[test]
fn ethernet_mode_counts_each_family_on_every_hook() {
    require_root();
    let datapath =
        Datapath::load(&LoadOptions::uniform(LinkLayer::Ethernet)).expect("loading programs");
    for (device, direction) in HOOKS {
        assert_counted(
            &datapath,
            device,
            direction,
            &packets::ethernet(0x0800, &udp4()),
            PacketClass::Ipv4,
        );
        assert_counted(
            &datapath,
            device,
            direction,
            &packets::ethernet(0x86dd, &udp6()),
            PacketClass::Ipv6,
        );
        assert_counted(
            &datapath,
            device,
            direction,
            &packets::arp_request(),
            PacketClass::NotIp,
        );
    }
}

#[test]
fn ethernet_mode_flags_cut_or_inconsistent_ip_headers() {
    require_root();
    let datapath =
        Datapath::load(&LoadOptions::uniform(LinkLayer::Ethernet)).expect("loading programs");
    let (device, direction) = (Device::WireGuard, Direction::Ingress);

    // (Cut headers cannot be tried here: BPF_PROG_TEST_RUN itself refuses
    // an IPv4 or IPv6 frame whose header is incomplete, with EINVAL. The
    // namespace test sends them through a real device instead.)

    let mut long4 = udp4();
    long4[2..4].copy_from_slice(&1400u16.to_be_bytes());
    let mut short_ihl = udp4();
    short_ihl[0] = 0x44;
    let mut long6 = udp6();
    long6[4..6].copy_from_slice(&2000u16.to_be_bytes());
    let cases = [
        (
            "IPv4 total length beyond the packet",
            packets::ethernet(0x0800, &long4),
        ),
        (
            "IPv4 IHL below 5 words",
            packets::ethernet(0x0800, &short_ihl),
        ),
        (
            "IPv6 payload length beyond the packet",
            packets::ethernet(0x86dd, &long6),
        ),
        (
            "EtherType IPv6 carrying IPv4",
            packets::ethernet(0x86dd, &udp4()),
        ),
        (
            "EtherType IPv4 carrying IPv6",
            packets::ethernet(0x0800, &udp6()),
        ),
    ];
    for (what, frame) in cases {
        eprintln!("case: {what}");
        assert_counted(&datapath, device, direction, &frame, PacketClass::Malformed);
    }
}

/// In L3 mode the programs read the IP header at offset 0. The test harness
/// still treats the input as an Ethernet frame (and needs 14 bytes), but it
/// hands the program all of it, so a bare IP packet is seen as on wg0.
#[test]
fn l3_mode_reads_the_ip_header_at_offset_zero() {
    require_root();
    let datapath = Datapath::load(&LoadOptions::uniform(LinkLayer::Ip)).expect("loading programs");
    for (device, direction) in HOOKS {
        assert_counted(&datapath, device, direction, &udp4(), PacketClass::Ipv4);
        assert_counted(&datapath, device, direction, &udp6(), PacketClass::Ipv6);
    }
    // The same IPv4 packet behind an Ethernet header is not IP to an L3 program.
    let framed = packets::ethernet(0x0800, &udp4());
    assert_counted(
        &datapath,
        Device::WireGuard,
        Direction::Ingress,
        &framed,
        PacketClass::NotIp,
    );
}

/// The link layer is set per device: WireGuard on Ethernet (as on the
/// benchmarks' veth) while Tailscale stays L3.
#[test]
fn link_layer_is_chosen_per_device() {
    require_root();
    let options = LoadOptions {
        wireguard: LinkLayer::Ethernet,
        tailscale: LinkLayer::Ip,
        ..LoadOptions::default()
    };
    let datapath = Datapath::load(&options).expect("loading programs");
    let framed = packets::ethernet(0x0800, &udp4());
    assert_counted(
        &datapath,
        Device::WireGuard,
        Direction::Ingress,
        &framed,
        PacketClass::Ipv4,
    );
    assert_counted(
        &datapath,
        Device::Tailscale,
        Direction::Ingress,
        &framed,
        PacketClass::NotIp,
    );
    assert_counted(
        &datapath,
        Device::Tailscale,
        Direction::Ingress,
        &udp4(),
        PacketClass::Ipv4,
    );
}
