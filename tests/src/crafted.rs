//! Crafted frames for the programs run by the kernel
//! (`BPF_PROG_TEST_RUN`, Ethernet mode): the programs configured as a
//! bridge node, frames built with etherparse, and what left parsed and
//! checksum-verified with etherparse (not our code).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun as _, TestRunOptions};
use etherparse::{
    Icmpv4Header, Icmpv6Header, NetHeaders, PacketBuilder, PacketHeaders, TcpOptionElement,
    TransportHeader,
};
use tailguard::datapath::{Datapath, LinkLayer, LoadOptions, sweeper};
use tailguard_common::{
    Device, Direction, Outcome,
    nat::{FlowKey, Half, Meta},
    wire::tcp,
};

use crate::{
    node,
    packets::{MAC_A, MAC_B},
    require_root,
    topology::{CRAFTED_TAILNET_PEER, CRAFTED_WG_CLIENT, TS4},
};

pub const CONTINUE: u32 = u32::MAX; // TC_ACT_UNSPEC
pub const SHOT: u32 = 2; // TC_ACT_SHOT
pub const REDIRECT: u32 = 7; // TC_ACT_REDIRECT
pub const WG_IFINDEX: u32 = 11;
pub const TS_IFINDEX: u32 = 12;

pub const CLIENT4: Ipv4Addr = CRAFTED_WG_CLIENT;
pub const PEER4: Ipv4Addr = CRAFTED_TAILNET_PEER;

pub fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// The programs, configured as the daemon would for a bridge with
/// `TS_DEST_IP` the WireGuard server ([`DEST4`], [`DEST6`]).
pub fn datapath(isolate: bool) -> Datapath {
    datapath_with(LoadOptions::uniform(LinkLayer::Ethernet), isolate)
}

/// [`datapath`] loaded with `options` (a connection table of another size).
pub fn datapath_with(options: LoadOptions, isolate: bool) -> Datapath {
    require_root();
    let mut dp = Datapath::load(&options).expect("loading programs");
    node::bridge(&mut dp, (WG_IFINDEX, TS_IFINDEX), isolate, []).expect("configuring");
    dp
}

/// What left: verdict, and the frame's headers with their checksums checked.
pub struct Out {
    pub verdict: u32,
    pub frame: Vec<u8>,
}

impl Out {
    pub fn ip(&self) -> (IpAddr, IpAddr, u8) {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).expect("a valid frame");
        match h.net.expect("an IP header") {
            NetHeaders::Ipv4(ip, _) => (ip.source.into(), ip.destination.into(), ip.time_to_live),
            NetHeaders::Ipv6(ip, _) => (ip.source.into(), ip.destination.into(), ip.hop_limit),
            NetHeaders::Arp(_) => panic!("ARP"),
        }
    }

    /// Source and destination port (the echo identifier twice for ICMP).
    pub fn ports(&self) -> (u16, u16) {
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

    /// What the transport header carries.
    pub fn l4_payload(&self) -> Vec<u8> {
        let h = PacketHeaders::from_ethernet_slice(&self.frame).expect("a valid frame");
        h.payload.slice().to_vec()
    }

    pub fn mss(&self) -> Option<u16> {
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
    pub fn assert_checksums(&self) {
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

/// Runs `device`'s ingress program on `frame`.
pub fn run(dp: &Datapath, device: Device, frame: &[u8]) -> Out {
    run_hook(dp, device, Direction::Ingress, frame)
}

/// Runs the program of `device`'s `direction` on `frame`.
pub fn run_hook(dp: &Datapath, device: Device, direction: Direction, frame: &[u8]) -> Out {
    run_full(dp, device, direction, frame, None)
}

/// Runs `device`'s ingress program on `frame` with `context` as its
/// `__sk_buff` (GSO fields and the like).
pub fn run_with_context(dp: &Datapath, device: Device, frame: &[u8], context: &[u8]) -> Out {
    run_full(dp, device, Direction::Ingress, frame, Some(context))
}

fn run_full(
    dp: &Datapath,
    device: Device,
    direction: Direction,
    frame: &[u8],
    context: Option<&[u8]>,
) -> Out {
    let program = dp.program(device, direction).unwrap();
    let mut output = vec![0u8; frame.len() + 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut output),
            ctx_in: context,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    output.truncate(result.data_size_out as usize);
    Out {
        verdict: result.return_value,
        frame: output,
    }
}

pub enum L4 {
    Udp,
    Syn(u16),
    Ack,
    Echo(bool),
    /// TCP with these flags (`tailguard_common::wire::tcp`), no options.
    Tcp(u8),
}

/// A frame from `src:sport` to `dst:dport` with `ttl`.
pub fn frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, l4: L4, ttl: u8) -> Vec<u8> {
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
        L4::Tcp(flags) => {
            let mut tcp = ip.tcp(sport, dport, 1000, 64240);
            if flags & tcp::SYN != 0 {
                tcp = tcp.syn();
            }
            if flags & tcp::ACK != 0 {
                tcp = tcp.ack(1);
            }
            if flags & tcp::FIN != 0 {
                tcp = tcp.fin();
            }
            if flags & tcp::RST != 0 {
                tcp = tcp.rst();
            }
            tcp.write(&mut out, payload)
        }
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

pub fn outcome_count(dp: &Datapath, device: Device, outcome: Outcome) -> u64 {
    dp.outcomes().unwrap().get(device, outcome).packets
}

/// The reply key a masqueraded UDP flow from anywhere to PEER4:443 would
/// get with `port`.
pub fn reply_key(port: u16) -> FlowKey {
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

/// A reply half that turns packets back to `client:port`, stamped now.
pub fn reply_half_to(client: Ipv4Addr, port: u16) -> Half {
    let mut addr = [0; 16];
    addr[..4].copy_from_slice(&client.octets());
    Half {
        addr,
        meta: Meta {
            port: port.to_be(),
            kind: 0,
            state: 0,
        },
        last_seen: sweeper::now(),
    }
}
