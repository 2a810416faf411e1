//! The forwarding policy run by the kernel on crafted frames
//! (`BPF_PROG_TEST_RUN`, Ethernet mode): for each row, the verdict, and the
//! packet that leaves, parsed and checksum-verified with etherparse (not our
//! code). Replies are crafted from what left, so NAT state is followed both
//! ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{
    Icmpv4Header, Icmpv6Header, NetHeaders, PacketBuilder, PacketHeaders, TcpOptionElement,
    TransportHeader,
};
use tailguard::datapath::{Datapath, LinkLayer, LoadOptions};
use tailguard_common::{
    Device, Direction, Outcome,
    nat::{FlowKey, NAT_PORT_FIRST, NatEntry},
};
use tailguard_tests::{
    node::{self, DEST4, TS4, WG4},
    packets::{MAC_A, MAC_B},
    require_root,
};

const CONTINUE: u32 = u32::MAX; // TC_ACT_UNSPEC
const SHOT: u32 = 2; // TC_ACT_SHOT
const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
const WG_IFINDEX: u32 = 11;
const TS_IFINDEX: u32 = 12;

const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 7);
const PEER4: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// The programs, configured as the daemon would for a bridge with
/// `TS_DEST_IP=10.66.0.1,fd66::1`.
fn datapath(isolate: bool) -> Datapath {
    require_root();
    let mut dp =
        Datapath::load(&LoadOptions::uniform(LinkLayer::Ethernet)).expect("loading programs");
    node::bridge(&mut dp, (WG_IFINDEX, TS_IFINDEX), isolate, []).expect("configuring");
    dp
}

/// What left: verdict, and the frame's headers with their checksums checked.
struct Out {
    verdict: u32,
    frame: Vec<u8>,
}

impl Out {
    fn ip(&self) -> (IpAddr, IpAddr, u8) {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).expect("a valid frame");
        match h.net.expect("an IP header") {
            NetHeaders::Ipv4(ip, _) => (ip.source.into(), ip.destination.into(), ip.time_to_live),
            NetHeaders::Ipv6(ip, _) => (ip.source.into(), ip.destination.into(), ip.hop_limit),
            NetHeaders::Arp(_) => panic!("ARP"),
        }
    }

    /// Source and destination port (the echo identifier twice for ICMP).
    fn ports(&self) -> (u16, u16) {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).unwrap();
        match h.transport.expect("a transport header") {
            TransportHeader::Udp(u) => (u.source_port, u.destination_port),
            TransportHeader::Tcp(t) => (t.source_port, t.destination_port),
            TransportHeader::Icmpv4(i) => match i.icmp_type {
                etherparse::Icmpv4Type::EchoRequest(e) | etherparse::Icmpv4Type::EchoReply(e) => {
                    (e.id, e.id)
                }
                other => panic!("{other:?}"),
            },
            TransportHeader::Icmpv6(i) => match i.icmp_type {
                etherparse::Icmpv6Type::EchoRequest(e) | etherparse::Icmpv6Type::EchoReply(e) => {
                    (e.id, e.id)
                }
                other => panic!("{other:?}"),
            },
            TransportHeader::Igmp(_) => panic!("IGMP"),
        }
    }

    fn mss(&self) -> Option<u16> {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).unwrap();
        let Some(TransportHeader::Tcp(t)) = h.transport else {
            return None;
        };
        t.options_iterator().find_map(|o| match o {
            Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        })
    }

    /// Every checksum in the frame is what etherparse computes for it.
    fn assert_checksums(&self) {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).expect("a valid frame");
        let payload = h.payload.slice();
        match (h.net.unwrap(), h.transport.unwrap()) {
            (NetHeaders::Ipv4(ip, _), transport) => {
                assert_eq!(ip.header_checksum, ip.calc_header_checksum(), "IPv4 header");
                match transport {
                    TransportHeader::Udp(u) => {
                        assert_eq!(
                            u.checksum,
                            u.calc_checksum_ipv4(&ip, payload).unwrap(),
                            "UDP"
                        )
                    }
                    TransportHeader::Tcp(t) => {
                        assert_eq!(
                            t.checksum,
                            t.calc_checksum_ipv4(&ip, payload).unwrap(),
                            "TCP"
                        )
                    }
                    TransportHeader::Icmpv4(i) => assert_eq!(
                        i.checksum,
                        Icmpv4Header::with_checksum(i.icmp_type.clone(), payload).checksum,
                        "ICMP"
                    ),
                    other => panic!("{other:?}"),
                }
            }
            (NetHeaders::Ipv6(ip, _), transport) => match transport {
                TransportHeader::Udp(u) => {
                    assert_eq!(
                        u.checksum,
                        u.calc_checksum_ipv6(&ip, payload).unwrap(),
                        "UDP"
                    )
                }
                TransportHeader::Tcp(t) => {
                    assert_eq!(
                        t.checksum,
                        t.calc_checksum_ipv6(&ip, payload).unwrap(),
                        "TCP"
                    )
                }
                TransportHeader::Icmpv6(i) => assert_eq!(
                    i.checksum,
                    Icmpv6Header::with_checksum(i.icmp_type, ip.source, ip.destination, payload)
                        .unwrap()
                        .checksum,
                    "ICMPv6"
                ),
                other => panic!("{other:?}"),
            },
            (net, _) => panic!("{net:?}"),
        }
    }
}

fn run(dp: &Datapath, device: Device, frame: &[u8]) -> Out {
    let program = dp.program(device, Direction::Ingress).unwrap();
    let mut output = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    output.truncate(result.data_size_out as usize);
    Out {
        verdict: result.return_value,
        frame: output,
    }
}

enum L4 {
    Udp,
    Syn(u16),
    Ack,
    Echo(bool),
}

/// A frame from `src:sport` to `dst:dport` with `ttl`.
fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, l4: L4, ttl: u8) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => panic!("mixed families"),
    };
    let payload = b"tailguard policy test";
    let mut out = Vec::new();
    match l4 {
        L4::Udp => ip.udp(sport, dport).write(&mut out, payload),
        L4::Syn(mss) => ip
            .tcp(sport, dport, 1000, 64240)
            .syn()
            .options(&[TcpOptionElement::MaximumSegmentSize(mss)])
            .unwrap()
            .write(&mut out, &[]),
        L4::Ack => ip
            .tcp(sport, dport, 1000, 64240)
            .ack(1)
            .write(&mut out, payload),
        L4::Echo(reply) => match (src, reply) {
            (IpAddr::V4(_), false) => ip.icmpv4_echo_request(sport, 1).write(&mut out, payload),
            (IpAddr::V4(_), true) => ip.icmpv4_echo_reply(sport, 1).write(&mut out, payload),
            (IpAddr::V6(_), false) => ip.icmpv6_echo_request(sport, 1).write(&mut out, payload),
            (IpAddr::V6(_), true) => ip.icmpv6_echo_reply(sport, 1).write(&mut out, payload),
        },
    }
    .unwrap();
    out
}

fn outcome_count(dp: &Datapath, device: Device, outcome: Outcome) -> u64 {
    dp.outcomes().unwrap().get(device, outcome).packets
}

/// Client, tailnet peer, the node's tailnet address, the first packet and
/// the reply's kind.
type Case = (IpAddr, IpAddr, IpAddr, fn() -> L4, fn() -> L4);

/// wg -> ts, both families, UDP, TCP and echo: masqueraded to the node's
/// tailnet address from the fast path's port range, TTL less one, and the
/// reply translated back.
#[test]
fn wireguard_to_tailnet_is_masqueraded_and_replies_come_back() {
    let dp = datapath(false);
    let cases: [Case; 6] = [
        (
            CLIENT4.into(),
            PEER4.into(),
            TS4.into(),
            || L4::Udp,
            || L4::Udp,
        ),
        (
            CLIENT4.into(),
            PEER4.into(),
            TS4.into(),
            || L4::Syn(1460),
            || L4::Ack,
        ),
        (
            CLIENT4.into(),
            PEER4.into(),
            TS4.into(),
            || L4::Echo(false),
            || L4::Echo(true),
        ),
        (
            v6("fd66::7").into(),
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
            || L4::Udp,
            || L4::Udp,
        ),
        (
            v6("fd66::7").into(),
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
            || L4::Syn(1440),
            || L4::Ack,
        ),
        (
            v6("fd66::7").into(),
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
            || L4::Echo(false),
            || L4::Echo(true),
        ),
    ];
    for (i, (client, peer, own, first, reply)) in cases.into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let out = run(
            &dp,
            Device::WireGuard,
            &frame(client, peer, sport, 443, first(), 64),
        );
        assert_eq!(out.verdict, REDIRECT, "case {i}");
        out.assert_checksums();
        let (src, dst, ttl) = out.ip();
        assert_eq!((src, dst, ttl), (own, peer, 63), "case {i}");
        let (nat_port, dport) = out.ports();
        assert!(
            nat_port >= 61000,
            "case {i}: port {nat_port} from the fast path's range"
        );
        if let Some(mss) = out.mss() {
            let limit = if client.is_ipv4() { 1240 } else { 1220 };
            assert_eq!(mss, limit, "case {i}: MSS clamped to the 1280-byte tailnet");
        }
        // The reply, as the peer would send it.
        let (reply_sport, reply_dport) = if dport == nat_port {
            (nat_port, 0)
        } else {
            (dport, nat_port)
        };
        let back = run(
            &dp,
            Device::Tailscale,
            &frame(peer, own, reply_sport, reply_dport, reply(), 64),
        );
        assert_eq!(back.verdict, REDIRECT, "case {i}: the reply");
        back.assert_checksums();
        assert_eq!(back.ip(), (peer, client, 63), "case {i}: the reply");
        let expected = if dport == nat_port {
            (sport, sport)
        } else {
            (443, sport)
        };
        assert_eq!(back.ports(), expected, "case {i}: the reply's ports");
    }
    assert!(outcome_count(&dp, Device::WireGuard, Outcome::Redirected) >= 6);
}

/// ts -> own tailnet address: translated to TS_DEST_IP and source-NATed to
/// the node's WireGuard address; the reply comes from the tailnet address.
#[test]
fn dest_ip_translation_both_families() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr, IpAddr); 2] = [
        (PEER4.into(), TS4.into(), DEST4.into(), WG4.into()),
        (
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
            v6("fd66::1").into(),
            v6("fd66::2").into(),
        ),
    ];
    for (peer, own_ts, dest, own_wg) in cases {
        let out = run(
            &dp,
            Device::Tailscale,
            &frame(peer, own_ts, 5000, 80, L4::Syn(1240), 64),
        );
        assert_eq!(out.verdict, REDIRECT);
        out.assert_checksums();
        assert_eq!(out.ip(), (own_wg, dest, 63));
        let (nat_port, dport) = out.ports();
        assert!(nat_port >= 61000 && dport == 80);
        let back = run(
            &dp,
            Device::WireGuard,
            &frame(dest, own_wg, 80, nat_port, L4::Ack, 64),
        );
        assert_eq!(back.verdict, REDIRECT);
        back.assert_checksums();
        assert_eq!(back.ip(), (own_ts, peer, 63));
        assert_eq!(back.ports(), (80, 5000));
    }
}

/// ts -> wg (a WireGuard-side host, not the node): source-NATed to the
/// node's WireGuard address, both families, and the reply comes back.
#[test]
fn tailnet_to_wireguard_is_source_natted() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr); 2] = [
        (PEER4.into(), CLIENT4.into(), WG4.into()),
        (
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd66::7").into(),
            v6("fd66::2").into(),
        ),
    ];
    for (peer, host, own_wg) in cases {
        let out = run(
            &dp,
            Device::Tailscale,
            &frame(peer, host, 5000, 22, L4::Syn(1240), 64),
        );
        assert_eq!(out.verdict, REDIRECT);
        out.assert_checksums();
        assert_eq!(out.ip(), (own_wg, host, 63));
        let (nat_port, dport) = out.ports();
        assert!(nat_port >= 61000 && dport == 22);
        let back = run(
            &dp,
            Device::WireGuard,
            &frame(host, own_wg, 22, nat_port, L4::Ack, 64),
        );
        assert_eq!(back.verdict, REDIRECT);
        back.assert_checksums();
        assert_eq!((back.ip(), back.ports()), ((host, peer, 63), (22, 5000)));
    }
}

/// What the fast path leaves to the kernel, or drops. Run in a namespace
/// of its own with an uplink (198.51.100.1/24, default route) and
/// forwarding on, since the fast path asks the kernel's FIB about
/// destinations outside its routes.
#[test]
fn the_rest_goes_to_the_kernel_or_is_dropped() {
    require_root();
    let ns = tailguard_tests::netns::NetNs::new("policy-rest");
    ns.run(|| {
        for args in [
            "link set lo up",
            "link add up0 type veth peer name up1",
            "link set up1 up",
            "link set up0 up",
            "addr add 198.51.100.1/24 dev up0",
            "route add default via 198.51.100.254",
            "-6 addr add 2001:db8::1/64 dev up0 nodad",
            "-6 route add default via 2001:db8::fe",
        ] {
            tailguard_tests::netns::run(std::process::Command::new("ip").args(args.split(' ')));
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").unwrap();
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").unwrap();
        let dp = datapath(true);
        let uplink = Ipv4Addr::new(8, 8, 8, 8);
        let host = Ipv4Addr::new(198, 51, 100, 1);
        let client6: IpAddr = v6("fd66::7").into();
        let peer6: IpAddr = v6("fd7a:115c:a1e0::9").into();
        let uplink6: IpAddr = v6("2001:4860::8888").into();
        let cases: [(&str, Device, Vec<u8>, u32, Outcome); 17] = [
            (
                "wg -> uplink, IPv6",
                Device::WireGuard,
                frame(client6, uplink6, 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropNoRoute,
            ),
            (
                "ts -> uplink, IPv6",
                Device::Tailscale,
                frame(peer6, uplink6, 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropNoRoute,
            ),
            (
                "to the host's uplink address, IPv6",
                Device::WireGuard,
                frame(client6, v6("2001:db8::1").into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "wg -> wg, isolated, IPv6",
                Device::WireGuard,
                frame(client6, v6("fd66::1").into(), 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropIsolated,
            ),
            (
                "hop limit 1",
                Device::WireGuard,
                frame(client6, peer6, 1, 2, L4::Udp, 1),
                CONTINUE,
                Outcome::KernelTtl,
            ),
            (
                "to the host's WireGuard address, IPv6",
                Device::WireGuard,
                frame(client6, v6("fd66::2").into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "ts -> the host's WireGuard address, IPv6",
                Device::Tailscale,
                frame(peer6, v6("fd66::2").into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "TCP not from its start, IPv6",
                Device::WireGuard,
                frame(client6, peer6, 1, 2, L4::Ack, 64),
                CONTINUE,
                Outcome::KernelNotOurFlow,
            ),
            (
                "echo reply that answers nothing of ours",
                Device::Tailscale,
                frame(PEER4.into(), TS4.into(), 77, 77, L4::Echo(true), 64),
                CONTINUE,
                Outcome::KernelNotOurFlow,
            ),
            (
                "wg -> wg, isolated",
                Device::WireGuard,
                frame(CLIENT4.into(), DEST4.into(), 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropIsolated,
            ),
            (
                "TTL 1",
                Device::WireGuard,
                frame(CLIENT4.into(), PEER4.into(), 1, 2, L4::Udp, 1),
                CONTINUE,
                Outcome::KernelTtl,
            ),
            (
                "to the host's WireGuard address",
                Device::WireGuard,
                frame(CLIENT4.into(), WG4.into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "to the host's uplink address",
                Device::WireGuard,
                frame(CLIENT4.into(), host.into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "wg -> uplink",
                Device::WireGuard,
                frame(CLIENT4.into(), uplink.into(), 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropNoRoute,
            ),
            (
                "ts -> uplink",
                Device::Tailscale,
                frame(PEER4.into(), uplink.into(), 1, 2, L4::Udp, 64),
                SHOT,
                Outcome::DropNoRoute,
            ),
            (
                "ts -> the host's uplink address",
                Device::Tailscale,
                frame(PEER4.into(), host.into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "TCP not from its start",
                Device::WireGuard,
                frame(CLIENT4.into(), PEER4.into(), 1, 2, L4::Ack, 64),
                CONTINUE,
                Outcome::KernelNotOurFlow,
            ),
        ];
        for (what, device, input, verdict, outcome) in cases {
            let before = outcome_count(&dp, device, outcome);
            let out = run(&dp, device, &input);
            assert_eq!(out.verdict, verdict, "{what}");
            if verdict == CONTINUE {
                assert_eq!(out.frame, input, "{what}: the kernel gets it unchanged");
            }
            assert_eq!(
                outcome_count(&dp, device, outcome),
                before + 1,
                "{what}: counted as {outcome:?}"
            );
        }
    });
}

/// The reply key a masqueraded UDP flow from anywhere to PEER4:443 would
/// get with `port`.
fn reply_key(port: u16) -> FlowKey {
    let mut key = FlowKey {
        sport: 443u16.to_be(),
        dport: port.to_be(),
        proto: 17,
        ingress: Device::Tailscale as u8,
        family: 4,
        ..FlowKey::default()
    };
    key.src[..4].copy_from_slice(&PEER4.octets());
    key.dst[..4].copy_from_slice(&TS4.octets());
    key
}

/// Ports taken by live flows (here: inserted by hand) are never handed out
/// again; the port of a flow idle past its timeout is.
#[test]
fn translation_ports_never_collide_and_idle_ones_are_reused() {
    let mut dp = datapath(false);
    let live = NatEntry {
        last_seen: u64::MAX / 2,
        ..NatEntry::default()
    };
    {
        let mut nat = dp.nat().unwrap();
        for port in (NAT_PORT_FIRST..=u16::MAX).step_by(2) {
            nat.insert(&reply_key(port), &live, 0).unwrap();
        }
    }
    for i in 0..40u16 {
        let input = frame(CLIENT4.into(), PEER4.into(), 30000 + i, 443, L4::Udp, 64);
        let out = run(&dp, Device::WireGuard, &input);
        assert_eq!(out.verdict, REDIRECT, "flow {i}");
        let (port, _) = out.ports();
        assert!(
            port >= NAT_PORT_FIRST && (port - NAT_PORT_FIRST) % 2 == 1,
            "flow {i} got a taken port {port}"
        );
    }
    // Every port held by a flow that went idle long ago (last seen at
    // boot): their ports are handed out again, to the new flow's reply.
    {
        let mut nat = dp.nat().unwrap();
        for port in NAT_PORT_FIRST..=u16::MAX {
            nat.insert(&reply_key(port), &NatEntry::default(), 0)
                .unwrap();
        }
    }
    let out = run(
        &dp,
        Device::WireGuard,
        &frame(CLIENT4.into(), PEER4.into(), 31001, 443, L4::Udp, 64),
    );
    assert_eq!(out.verdict, REDIRECT, "an idle flow's port is free again");
    let reply = dp.nat().unwrap().get(&reply_key(out.ports().0), 0).unwrap();
    assert_eq!(
        reply.dst[..4],
        CLIENT4.octets(),
        "the port's reply now leads to the new flow"
    );
}

/// With every port held by a live flow, a new flow is left to the kernel.
#[test]
fn a_full_range_of_live_flows_leaves_new_ones_to_the_kernel() {
    let mut dp = datapath(false);
    let live = NatEntry {
        last_seen: u64::MAX / 2,
        ..NatEntry::default()
    };
    {
        let mut nat = dp.nat().unwrap();
        for port in NAT_PORT_FIRST..=u16::MAX {
            nat.insert(&reply_key(port), &live, 0).unwrap();
        }
    }
    let before = outcome_count(&dp, Device::WireGuard, Outcome::KernelNoPort);
    let input = frame(CLIENT4.into(), PEER4.into(), 31000, 443, L4::Udp, 64);
    let out = run(&dp, Device::WireGuard, &input);
    assert_eq!(
        (out.verdict, &out.frame),
        (CONTINUE, &input),
        "no port left: the kernel's"
    );
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelNoPort),
        before + 1
    );
    // The kernel has the flow now (its conntrack masquerades it): its next
    // datagrams stay the kernel's, even once ports are free again.
    {
        let mut nat = dp.nat().unwrap();
        for port in NAT_PORT_FIRST..=u16::MAX {
            nat.remove(&reply_key(port)).unwrap();
        }
    }
    let before = outcome_count(&dp, Device::WireGuard, Outcome::KernelTrackedFlow);
    let out = run(&dp, Device::WireGuard, &input);
    assert_eq!(
        (out.verdict, &out.frame),
        (CONTINUE, &input),
        "the next datagram: still the kernel's"
    );
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelTrackedFlow),
        before + 1
    );
    // While a new flow is the fast path's again.
    let other = frame(CLIENT4.into(), PEER4.into(), 31002, 443, L4::Udp, 64);
    assert_eq!(run(&dp, Device::WireGuard, &other).verdict, REDIRECT);
}

/// The IP packet (header and first 8 bytes after it) an ICMP error quotes.
fn quote(frame: &[u8], ipv6: bool) -> Vec<u8> {
    let header = if ipv6 { 40 } else { 20 };
    frame[14..14 + header + 8].to_vec()
}

/// An ICMP error sent from `from` to `to`: IPv4 "fragmentation needed"
/// (next-hop MTU 1000) or IPv6 "packet too big" (MTU 1200), quoting `quoted`.
fn icmp_error(from: IpAddr, to: IpAddr, quoted: &[u8]) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    let mut out = Vec::new();
    match (from, to) {
        (IpAddr::V4(f), IpAddr::V4(t)) => eth
            .ipv4(f.octets(), t.octets(), 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(
                etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                    next_hop_mtu: 1000,
                },
            ))
            .write(&mut out, quoted),
        (IpAddr::V6(f), IpAddr::V6(t)) => eth
            .ipv6(f.octets(), t.octets(), 64)
            .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1200 })
            .write(&mut out, quoted),
        _ => panic!("mixed families"),
    }
    .unwrap();
    out
}

/// The quoted packet in an ICMP error frame: addresses, ports, and for IPv4
/// whether its header checksum is valid.
fn quoted(frame: &[u8], ipv6: bool) -> (IpAddr, IpAddr, u16, u16, bool) {
    let header = if ipv6 { 40 } else { 20 };
    let q = &frame[14 + header + 8..];
    let ports = |at: usize| {
        (
            u16::from_be_bytes([q[at], q[at + 1]]),
            u16::from_be_bytes([q[at + 2], q[at + 3]]),
        )
    };
    if ipv6 {
        let ip = etherparse::Ipv6Header::from_slice(q).unwrap().0;
        let (s, d) = ports(40);
        (ip.source.into(), ip.destination.into(), s, d, true)
    } else {
        let ip = etherparse::Ipv4Header::from_slice(q).unwrap().0;
        let (s, d) = ports(20);
        let valid = ip.header_checksum == ip.calc_header_checksum();
        (ip.source.into(), ip.destination.into(), s, d, valid)
    }
}

/// A router on the tailnet side says a masqueraded packet was too big: the
/// error is translated back, quote and all, and sent to the WireGuard
/// client, with valid checksums (outer, ICMP, quoted IPv4 header).
#[test]
fn icmp_errors_about_our_flows_are_translated_back() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr, IpAddr); 2] = [
        (
            CLIENT4.into(),
            PEER4.into(),
            TS4.into(),
            Ipv4Addr::new(100, 64, 0, 50).into(),
        ),
        (
            v6("fd66::7").into(),
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
            v6("fd7a:115c:a1e0::50").into(),
        ),
    ];
    for (client, peer, own, router) in cases {
        let ipv6 = client.is_ipv6();
        let out = run(
            &dp,
            Device::WireGuard,
            &frame(client, peer, 40000, 443, L4::Udp, 64),
        );
        assert_eq!(out.verdict, REDIRECT);
        let (nat_port, _) = out.ports();
        let error = icmp_error(router, own, &quote(&out.frame, ipv6));
        let back = run(&dp, Device::Tailscale, &error);
        assert_eq!(
            back.verdict, REDIRECT,
            "{router}: the error goes to the client"
        );
        back.assert_checksums();
        assert_eq!(back.ip(), (router, client, 63), "outer header");
        let (src, dst, sport, dport, header_valid) = quoted(&back.frame, ipv6);
        assert_eq!(
            (src, dst, sport, dport),
            (client, peer, 40000, 443),
            "the quote, as the client sent it"
        );
        assert!(header_valid, "quoted IPv4 header checksum");
        assert_ne!(nat_port, 40000);
        assert!(outcome_count(&dp, Device::Tailscale, Outcome::ErrorTranslated) > 0);
    }
    // An error about a flow that is not ours is the kernel's.
    let stranger = frame(CLIENT4.into(), PEER4.into(), 9, 9, L4::Udp, 64);
    let error = icmp_error(
        Ipv4Addr::new(100, 64, 0, 50).into(),
        TS4.into(),
        &quote(&stranger, false),
    );
    let out = run(&dp, Device::Tailscale, &error);
    assert_eq!((out.verdict, &out.frame), (CONTINUE, &error));
}

/// The frame an ICMP error carries as its quote, given an Ethernet header
/// so it can be parsed and checked like any frame.
fn quoted_frame(error: &[u8], ipv6: bool) -> Out {
    let header = if ipv6 { 40 } else { 20 };
    let mut frame = error[..14].to_vec();
    frame.extend_from_slice(&error[14 + header + 8..]);
    Out { verdict: 0, frame }
}

/// A masqueraded UDP or TCP packet quoted whole by a router on the tailnet
/// side: translated back, the quote is the client's own packet again and
/// every checksum in it verifies (its IPv4 header and its TCP/UDP
/// checksum), the ICMP checksum too; quoted only up to 8 bytes after the
/// IP header, the UDP checksum there is the client's own.
#[test]
fn translated_icmp_errors_keep_the_quoted_checksums_valid() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr); 2] = [
        (CLIENT4.into(), PEER4.into(), TS4.into()),
        (
            v6("fd66::7").into(),
            v6("fd7a:115c:a1e0::9").into(),
            v6("fd7a:115c:a1e0::1").into(),
        ),
    ];
    let mut sport = 41000;
    for (client, peer, own) in cases {
        let ipv6 = client.is_ipv6();
        let router: IpAddr = if ipv6 {
            v6("fd7a:115c:a1e0::50").into()
        } else {
            Ipv4Addr::new(100, 64, 0, 50).into()
        };
        for (what, l4) in [("UDP", L4::Udp), ("TCP", L4::Syn(1460))] {
            sport += 1;
            let input = frame(client, peer, sport, 443, l4, 64);
            let out = run(&dp, Device::WireGuard, &input);
            assert_eq!(out.verdict, REDIRECT, "{what} {client}");
            let error = icmp_error(router, own, &out.frame[14..]);
            let back = run(&dp, Device::Tailscale, &error);
            assert_eq!(back.verdict, REDIRECT, "{what} {client}: translated");
            back.assert_checksums();
            let quote = quoted_frame(&back.frame, ipv6);
            assert_eq!(
                (quote.ip().0, quote.ip().1, quote.ports()),
                (client, peer, (sport, 443)),
                "{what} {client}: the quote, as the client sent it"
            );
            quote.assert_checksums();
        }
        // Only the first 8 bytes of UDP quoted: its checksum is in them.
        sport += 1;
        let input = frame(client, peer, sport, 443, L4::Udp, 64);
        let out = run(&dp, Device::WireGuard, &input);
        let error = icmp_error(router, own, &quote(&out.frame, ipv6));
        let back = run(&dp, Device::Tailscale, &error);
        assert_eq!(back.verdict, REDIRECT);
        back.assert_checksums();
        let header = if ipv6 { 40 } else { 20 };
        let udp_checksum = |f: &[u8], at: usize| f[at + 6..at + 8].to_vec();
        assert_eq!(
            udp_checksum(&back.frame, 14 + 2 * header + 8),
            udp_checksum(&input, 14 + header),
            "{client}: the quoted UDP checksum is the client's"
        );
    }
}

/// Errors that quote one of our flows but are addressed to someone else
/// than the flow's translated address, or whose quote is not a well-formed
/// packet, are not translated: the kernel gets them unchanged.
#[test]
fn icmp_errors_to_another_address_or_with_a_bad_quote_are_the_kernels() {
    let mut dp = datapath(false);
    let router: IpAddr = Ipv4Addr::new(100, 64, 0, 50).into();
    let out = run(
        &dp,
        Device::WireGuard,
        &frame(CLIENT4.into(), PEER4.into(), 42000, 443, L4::Udp, 64),
    );
    assert_eq!(out.verdict, REDIRECT);
    let good = quote(&out.frame, false);
    let translated = run(
        &dp,
        Device::Tailscale,
        &icmp_error(router, TS4.into(), &good),
    );
    assert_eq!(
        translated.verdict, REDIRECT,
        "the well-formed error is ours"
    );
    // Read with IHL 4, the quote's "ports" would be its destination address
    // (100.64 and 0.9): a live flow with those makes that misreading show.
    let mut misread = reply_key(0);
    misread.sport = 9u16.to_be();
    misread.dport = u16::from_be_bytes([100, 64]).to_be();
    let live = NatEntry {
        egress: Device::WireGuard as u32,
        last_seen: u64::MAX / 2,
        ..NatEntry::default()
    };
    dp.nat().unwrap().insert(&misread, &live, 0).unwrap();
    let with = |edit: fn(&mut Vec<u8>)| {
        let mut q = good.clone();
        edit(&mut q);
        q
    };
    let cases: [(&str, IpAddr, Vec<u8>); 5] = [
        (
            "to another tailnet address",
            Ipv4Addr::new(100, 64, 0, 77).into(),
            good.clone(),
        ),
        ("to the node's WireGuard address", WG4.into(), good.clone()),
        ("a quote with IHL 4", TS4.into(), with(|q| q[0] = 0x44)),
        (
            "a quote whose total length is shorter than its header",
            TS4.into(),
            with(|q| q[2..4].copy_from_slice(&16u16.to_be_bytes())),
        ),
        (
            "a quote whose UDP length is below 8",
            TS4.into(),
            with(|q| q[24..26].copy_from_slice(&4u16.to_be_bytes())),
        ),
    ];
    for (what, to, quoted) in cases {
        let error = icmp_error(router, to, &quoted);
        let out = run(&dp, Device::Tailscale, &error);
        assert_eq!((out.verdict, &out.frame), (CONTINUE, &error), "{what}");
    }
}

/// Runs the egress program of `device` on `frame` (the kernel sending it).
fn send_by_kernel(dp: &Datapath, device: Device, frame: &[u8]) {
    let program = dp.program(device, Direction::Egress).unwrap();
    let mut output = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    assert_eq!(result.return_value, CONTINUE, "egress only looks");
}

/// The host's own UDP from its tailnet address (its DNS, say), sent by the
/// kernel out of the Tailscale device: the replies reach the host (the
/// kernel), not `TS_DEST_IP`, while a datagram to a port the host sent
/// nothing from still goes there. Likewise a flow the kernel forwards: its
/// replies are the kernel's too.
#[test]
fn replies_to_udp_the_kernel_sent_are_the_kernels() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr); 2] = [
        (TS4.into(), PEER4.into(), DEST4.into()),
        (
            node::TS6.into(),
            v6("fd7a:115c:a1e0::9").into(),
            node::DEST6.into(),
        ),
    ];
    for (own, peer, dest) in cases {
        send_by_kernel(
            &dp,
            Device::Tailscale,
            &frame(own, peer, 5353, 53, L4::Udp, 64),
        );
        let before = outcome_count(&dp, Device::Tailscale, Outcome::KernelTrackedFlow);
        let reply = frame(peer, own, 53, 5353, L4::Udp, 64);
        let out = run(&dp, Device::Tailscale, &reply);
        assert_eq!(
            (out.verdict, &out.frame),
            (CONTINUE, &reply),
            "{own}: the reply is the host's"
        );
        assert_eq!(
            outcome_count(&dp, Device::Tailscale, Outcome::KernelTrackedFlow),
            before + 1
        );
        let stranger = frame(peer, own, 53, 5354, L4::Udp, 64);
        let out = run(&dp, Device::Tailscale, &stranger);
        assert_eq!(
            out.verdict, REDIRECT,
            "{own}: a new flow goes to TS_DEST_IP"
        );
        assert_eq!(out.ip().1, dest);
    }
    // wg -> ts forwarded (and masqueraded) by the kernel: the masqueraded
    // datagram leaves ts, the client's reply leaves wg; both directions are
    // the kernel's then.
    send_by_kernel(
        &dp,
        Device::Tailscale,
        &frame(TS4.into(), PEER4.into(), 40001, 443, L4::Udp, 64),
    );
    send_by_kernel(
        &dp,
        Device::WireGuard,
        &frame(PEER4.into(), CLIENT4.into(), 443, 50001, L4::Udp, 64),
    );
    for (device, input) in [
        (
            Device::WireGuard,
            frame(CLIENT4.into(), PEER4.into(), 50001, 443, L4::Udp, 64),
        ),
        (
            Device::Tailscale,
            frame(PEER4.into(), TS4.into(), 443, 40001, L4::Udp, 64),
        ),
    ] {
        let out = run(&dp, device, &input);
        assert_eq!((out.verdict, &out.frame), (CONTINUE, &input), "{device:?}");
    }
    // TCP has its SYN to tell: the kernel's TCP leaves nothing behind.
    send_by_kernel(
        &dp,
        Device::Tailscale,
        &frame(TS4.into(), PEER4.into(), 5355, 53, L4::Udp, 64),
    );
    let syn = frame(PEER4.into(), TS4.into(), 53, 5355, L4::Syn(1400), 64);
    assert_eq!(run(&dp, Device::Tailscale, &syn).verdict, REDIRECT);
}
