//! The forwarding policy run by the kernel on crafted frames
//! (`BPF_PROG_TEST_RUN`, Ethernet mode): for each row, the verdict, and the
//! packet that leaves, parsed and checksum-verified with etherparse (not our
//! code). Replies are crafted from what left, so NAT state is followed both
//! ways.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{PacketBuilder, PacketHeaders, TransportHeader};
use tailguard::datapath::Datapath;
use tailguard_common::{Device, Direction, Outcome, nat::NAT_PORT_FIRST};
use tailguard_tests::{
    crafted::*,
    packets::{MAC_A, MAC_B},
    require_root,
    topology::{CRAFTED_TAILNET_PEER_V6, CRAFTED_WG_CLIENT_V6, DEST4, DEST6, TS4, TS6, WG4, WG6},
};

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
            v6(CLIENT6).into(),
            v6(PEER6).into(),
            TS6.into(),
            || L4::Udp,
            || L4::Udp,
        ),
        (
            v6(CLIENT6).into(),
            v6(PEER6).into(),
            TS6.into(),
            || L4::Syn(1440),
            || L4::Ack,
        ),
        (
            v6(CLIENT6).into(),
            v6(PEER6).into(),
            TS6.into(),
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
        (v6(PEER6).into(), TS6.into(), DEST6.into(), WG6.into()),
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
        (v6(PEER6).into(), v6(CLIENT6).into(), WG6.into()),
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
        let client6: IpAddr = v6(CLIENT6).into();
        let peer6: IpAddr = v6(PEER6).into();
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
                frame(client6, DEST6.into(), 1, 2, L4::Udp, 64),
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
                frame(client6, WG6.into(), 1, 2, L4::Udp, 64),
                CONTINUE,
                Outcome::KernelLocal,
            ),
            (
                "ts -> the host's WireGuard address, IPv6",
                Device::Tailscale,
                frame(peer6, WG6.into(), 1, 2, L4::Udp, 64),
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
            v6(CLIENT6).into(),
            v6(PEER6).into(),
            TS6.into(),
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
        (v6(CLIENT6).into(), v6(PEER6).into(), TS6.into()),
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

/// Quotes of every kind the reader takes, each translated back with every
/// checksum valid and the quote as the client sent it: IPv6 behind
/// extension headers, an echo request, IPv4 UDP without a checksum (which
/// stays without), TCP cut to its first 8 bytes (its checksum not quoted).
#[test]
fn translated_icmp_errors_read_every_kind_of_quote() {
    let dp = datapath(false);
    // Sends `input` wg -> ts, quotes what left (edited by `edit`) in an
    // error from a tailnet router, and returns the error translated back.
    let translate = |input: &[u8], edit: &dyn Fn(&mut Vec<u8>)| {
        let ipv6 = input[12..14] == [0x86, 0xdd];
        let out = run(&dp, Device::WireGuard, input);
        assert_eq!(out.verdict, REDIRECT, "the flow's first packet");
        let mut q = out.frame[14..].to_vec();
        edit(&mut q);
        let (router, own): (IpAddr, IpAddr) = if ipv6 {
            (v6("fd7a:115c:a1e0::50").into(), TS6.into())
        } else {
            (Ipv4Addr::new(100, 64, 0, 50).into(), TS4.into())
        };
        let back = run(&dp, Device::Tailscale, &icmp_error(router, own, &q));
        assert_eq!(back.verdict, REDIRECT, "translated");
        back.assert_checksums();
        back
    };
    let (client6, peer6): (IpAddr, IpAddr) = (v6(CLIENT6).into(), v6(PEER6).into());

    // Hop-by-hop and destination options (each 8 bytes of padding) between
    // the quoted IPv6 header and its UDP header.
    let input = frame(client6, peer6, 43001, 443, L4::Udp, 64);
    let back = translate(&input, &|q| {
        let udp = q[6];
        q[6] = 0; // hop-by-hop
        q.splice(40..40, [60, 0, 1, 4, 0, 0, 0, 0, udp, 0, 1, 4, 0, 0, 0, 0]);
        let payload = u16::from_be_bytes([q[4], q[5]]) + 16;
        q[4..6].copy_from_slice(&payload.to_be_bytes());
    });
    let quote = quoted_frame(&back.frame, true);
    assert_eq!(
        (quote.ip().0, quote.ip().1, quote.ports()),
        (client6, peer6, (43001, 443)),
        "IPv6 with extension headers"
    );
    quote.assert_checksums();

    for (client, peer) in [(CLIENT4.into(), PEER4.into()), (client6, peer6)] {
        let input = frame(client, peer, 43002, 0, L4::Echo(false), 64);
        let quote = quoted_frame(&translate(&input, &|_| {}).frame, client.is_ipv6());
        assert_eq!(
            (quote.ip().0, quote.ip().1, quote.ports()),
            (client, peer, (43002, 43002)),
            "{client}: an echo request"
        );
        quote.assert_checksums();
    }

    let mut input = frame(CLIENT4.into(), PEER4.into(), 43003, 443, L4::Udp, 64);
    let udp_checksum = 14 + 20 + 6;
    input[udp_checksum..udp_checksum + 2].fill(0);
    let back = translate(&input, &|_| {});
    let (src, dst, sport, dport, header_valid) = quoted(&back.frame, false);
    assert_eq!(
        (src, dst, sport, dport, header_valid),
        (CLIENT4.into(), PEER4.into(), 43003, 443, true),
        "UDP without a checksum"
    );
    let quoted_udp_checksum = 14 + 20 + 8 + 20 + 6;
    assert_eq!(
        back.frame[quoted_udp_checksum..quoted_udp_checksum + 2],
        [0, 0],
        "still without one"
    );

    for (client, peer) in [(CLIENT4.into(), PEER4.into()), (client6, peer6)] {
        let ipv6 = client.is_ipv6();
        let header = if ipv6 { 40 } else { 20 };
        let input = frame(client, peer, 43004, 443, L4::Syn(1460), 64);
        let back = translate(&input, &|q| q.truncate(header + 8));
        assert_eq!(
            quoted(&back.frame, ipv6),
            (client, peer, 43004, 443, true),
            "{client}: TCP cut to 8 bytes"
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
    dp.insert_half(&misread, &reply_half_to(CLIENT4, 0), false)
        .unwrap();
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
    let out = run_hook(dp, device, Direction::Egress, frame);
    assert_eq!(out.verdict, CONTINUE, "egress only looks");
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
        (TS6.into(), v6(PEER6).into(), DEST6.into()),
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

/// A UDP frame of `len` IP bytes from `src` to `dst`; IPv4 with DF as `df`
/// says.
fn big_udp(src: IpAddr, dst: IpAddr, len: usize, df: bool) -> Vec<u8> {
    let header = if src.is_ipv4() { 20 } else { 40 };
    let payload: Vec<u8> = (0..len - header - 8).map(|i| i as u8).collect();
    let mut ip = udp_packet(src, dst, 40000, 443, &payload);
    if src.is_ipv4() {
        ip[6] = if df { 0x40 } else { 0 };
        fix_ipv4_checksum(&mut ip);
    }
    on_ethernet(&ip)
}

/// The `__sk_buff` a test run starts from, with `gso_size` set (at byte 176,
/// as the kernel's UAPI lays the structure out).
fn gso_context(gso_size: u32) -> Vec<u8> {
    let mut ctx = vec![0u8; 192];
    ctx[164..168].copy_from_slice(&2u32.to_ne_bytes()); // gso_segs
    ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
    ctx
}

/// Too big for the egress device (1400 bytes towards the 1280-byte
/// Tailscale device): answered, as the kernel answers it, with ICMP
/// "fragmentation needed" / ICMPv6 "packet too big" carrying the egress MTU,
/// from the node's address on the side it came in, to the sender, quoting
/// the packet untranslated and cut to 576 / 1280 bytes in all, TTL 64, valid
/// checksums; sent back where it came from; no flow recorded. Without DF the
/// kernel gets it (to fragment).
#[test]
fn packets_too_big_for_the_egress_device_are_answered() {
    let dp = datapath(false);
    let cases: [(IpAddr, IpAddr, IpAddr, usize); 2] = [
        (CLIENT4.into(), PEER4.into(), WG4.into(), 576),
        (v6(CLIENT6).into(), v6(PEER6).into(), WG6.into(), 1280),
    ];
    for (client, peer, own, answer_len) in cases {
        let ipv6 = client.is_ipv6();
        let sent = big_udp(client, peer, 1400, true);
        let flows = dp.halves().unwrap().len();
        let out = run(&dp, Device::WireGuard, &sent);
        assert_eq!(out.verdict, REDIRECT, "{client}: answered");
        out.assert_checksums();
        assert_eq!(out.ip(), (own, client, 64), "{client}: outer header");
        assert_eq!(out.frame.len(), 14 + answer_len, "{client}: length");
        let h = PacketHeaders::from_ethernet_slice(&out.frame).unwrap();
        match h.transport.unwrap() {
            TransportHeader::Icmpv4(i) => assert_eq!(
                i.icmp_type,
                etherparse::Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: 1280
                    }
                )
            ),
            TransportHeader::Icmpv6(i) => assert_eq!(
                i.icmp_type,
                etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 }
            ),
            other => panic!("{other:?}"),
        }
        let header = if ipv6 { 40 } else { 20 };
        assert_eq!(
            &out.frame[14 + header + 8..],
            &sent[14..14 + answer_len - header - 8],
            "{client}: the quote is the packet as sent"
        );
        assert_eq!(dp.halves().unwrap().len(), flows, "no flow recorded");
        assert!(outcome_count(&dp, Device::WireGuard, Outcome::TooBigAnswered) > 0);
    }
    // IPv4 without DF: the kernel's, untouched.
    let sent = big_udp(CLIENT4.into(), PEER4.into(), 1400, false);
    let out = run(&dp, Device::WireGuard, &sent);
    assert_eq!((out.verdict, &out.frame), (CONTINUE, &sent));
}

/// A GSO packet fits when each packet it is cut into does: IP header, the
/// transport header as it is, `gso_size` bytes. UDP (8-byte header) with
/// 1244 bytes a segment makes 1272-byte IPv4 packets, which fit the 1280-byte
/// Tailscale device (a fixed 40-byte guess would call 1244 too big); 1253
/// bytes make 1281, which do not.
#[test]
fn gso_packets_are_sized_by_their_real_headers() {
    let dp = datapath(false);
    let sent = big_udp(CLIENT4.into(), PEER4.into(), 2 * 1272, true);
    let out = run_with_context(&dp, Device::WireGuard, &sent, &gso_context(1244));
    assert_eq!(out.verdict, REDIRECT);
    assert_eq!(out.ip().0, IpAddr::from(TS4), "forwarded, masqueraded");
    let sent = big_udp(CLIENT4.into(), PEER4.into(), 2 * 1281, true);
    let out = run_with_context(&dp, Device::WireGuard, &sent, &gso_context(1253));
    assert_eq!(out.verdict, REDIRECT);
    assert_eq!(
        out.ip(),
        (WG4.into(), CLIENT4.into(), 64),
        "answered too big"
    );
    out.assert_checksums();
    // A GSO packet's transport checksum may still be "partial": whatever
    // fills it in when the answer leaves (over the quoted UDP header and
    // payload) must write the value already there, or the ICMP checksum
    // breaks.
    let udp = &out.frame[14 + 28 + 20..];
    let mut sum: u32 = udp
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let filled = match !(sum as u16) {
        0 => 0xffff,
        v => v,
    };
    assert_eq!(filled, u16::from_be_bytes([udp[6], udp[7]]));
}

// Fragments, IPv4 options, IPv6 extension headers, IPv6 UDP checksum 0.

const CLIENT6: &str = CRAFTED_WG_CLIENT_V6;
const PEER6: &str = CRAFTED_TAILNET_PEER_V6;

/// A UDP packet from `src:sport` to `dst:dport` (no link layer), TTL 64.
fn udp_packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => PacketBuilder::ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => PacketBuilder::ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let mut out = Vec::new();
    ip.udp(sport, dport).write(&mut out, payload).unwrap();
    out
}

/// `packet` (IPv4 or IPv6) behind an Ethernet header.
fn on_ethernet(packet: &[u8]) -> Vec<u8> {
    let ethertype = if packet[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    tailguard_tests::packets::ethernet(ethertype, packet)
}

/// Recomputes the header checksum of the IPv4 packet `ip`.
fn fix_ipv4_checksum(ip: &mut [u8]) {
    ip[10..12].fill(0);
    let (h, _) = etherparse::Ipv4Header::from_slice(ip).expect("an IPv4 header");
    ip[10..12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
}

/// `packet` cut into fragments of `chunk` payload bytes with identification
/// `id`, as frames: IPv4 fragments, or IPv6 with a fragment header.
fn fragments(packet: &[u8], chunk: usize, id: u32) -> Vec<Vec<u8>> {
    assert_eq!(chunk % 8, 0);
    let ipv6 = packet[0] >> 4 == 6;
    let header_len = if ipv6 {
        40
    } else {
        usize::from(packet[0] & 15) * 4
    };
    let (header, payload) = packet.split_at(header_len);
    let parts: Vec<&[u8]> = payload.chunks(chunk).collect();
    let count = parts.len();
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            let offset = (i * chunk / 8) as u16;
            let more = i + 1 < count;
            let mut ip = header.to_vec();
            if ipv6 {
                ip[6] = 44;
                ip[4..6].copy_from_slice(&((8 + part.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[header[6], 0]);
                ip.extend_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
                ip.extend_from_slice(&id.to_be_bytes());
                ip.extend_from_slice(part);
            } else {
                ip[2..4].copy_from_slice(&((header_len + part.len()) as u16).to_be_bytes());
                ip[4..6].copy_from_slice(&(id as u16).to_be_bytes());
                let flags = if more { 0x2000 } else { 0 };
                ip[6..8].copy_from_slice(&(offset | flags).to_be_bytes());
                ip.extend_from_slice(part);
                fix_ipv4_checksum(&mut ip);
            }
            on_ethernet(&ip)
        })
        .collect()
}

/// The datagram the fragment `frames` make, as a frame, as the receiver's
/// kernel would reassemble it: every fragment must carry the same header
/// (each IPv4 one with a valid checksum) and the parts must fit together.
fn reassemble(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut parts = Vec::new();
    let mut headers = Vec::new();
    for frame in frames {
        let ip = &frame[14..];
        if ip[0] >> 4 == 6 {
            assert_eq!(ip[6], 44, "a fragment header");
            let field = u16::from_be_bytes([ip[42], ip[43]]);
            let end = 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            parts.push((usize::from(field >> 3) * 8, ip[48..end].to_vec()));
            let mut h = ip[..40].to_vec();
            h[6] = ip[40];
            h[4..6].fill(0);
            headers.push(h);
        } else {
            let (h, _) = etherparse::Ipv4Header::from_slice(ip).expect("an IPv4 fragment");
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "a fragment's header checksum"
            );
            let field = u16::from_be_bytes([ip[6], ip[7]]);
            parts.push((
                usize::from(field & 0x1fff) * 8,
                ip[h.header_len()..usize::from(h.total_len)].to_vec(),
            ));
            let mut header = ip[..h.header_len()].to_vec();
            header[2..4].fill(0);
            header[6..8].fill(0);
            header[10..12].fill(0);
            headers.push(header);
        }
    }
    assert!(
        headers.windows(2).all(|w| w[0] == w[1]),
        "every fragment has the same addresses and TTL: {headers:02x?}"
    );
    parts.sort();
    let mut payload = Vec::new();
    for (offset, part) in parts {
        assert_eq!(offset, payload.len(), "the fragments fit together");
        payload.extend_from_slice(&part);
    }
    let mut ip = headers.swap_remove(0);
    if ip[0] >> 4 == 6 {
        ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        ip.extend_from_slice(&payload);
    } else {
        let total = (ip.len() + payload.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&payload);
        fix_ipv4_checksum(&mut ip);
    }
    on_ethernet(&ip)
}

/// Runs each fragment of `packet` through `device`'s program; each must be
/// redirected. What left, reassembled.
fn forward_fragments(dp: &Datapath, device: Device, packet: &[u8], id: u32) -> Out {
    let frames = fragments(packet, 1000, id);
    assert!(frames.len() > 2);
    let out: Vec<Vec<u8>> = frames
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let out = run(dp, device, f);
            assert_eq!(out.verdict, REDIRECT, "fragment {i}");
            out.frame
        })
        .collect();
    Out {
        verdict: REDIRECT,
        frame: reassemble(&out),
    }
}

/// A fragmented UDP datagram of a flow is translated the way the flow's
/// whole datagrams are (the same translated port), whether the flow starts
/// with it or not; reassembled, it has the right checksum, and so have the
/// replies, fragmented too. Both families, masqueraded (wg -> ts) and
/// source-NATed (ts -> wg).
#[test]
fn fragmented_udp_is_translated_as_its_flow() {
    let dp = datapath(false);
    let cases: [(Device, IpAddr, IpAddr, IpAddr); 4] = [
        (Device::WireGuard, CLIENT4.into(), PEER4.into(), TS4.into()),
        (
            Device::WireGuard,
            v6(CLIENT6).into(),
            v6(PEER6).into(),
            TS6.into(),
        ),
        (Device::Tailscale, PEER4.into(), CLIENT4.into(), WG4.into()),
        (
            Device::Tailscale,
            v6(PEER6).into(),
            v6(CLIENT6).into(),
            WG6.into(),
        ),
    ];
    let big: Vec<u8> = (0..2500u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let mut id = 0x4711;
    for (i, (from, sender, receiver, own)) in cases.into_iter().enumerate() {
        for fragments_first in [false, true] {
            let what = format!("case {i}, fragments first: {fragments_first}");
            let sport = 42000 + 2 * i as u16 + u16::from(fragments_first);
            id += 2;
            let whole = || {
                let packet = udp_packet(sender, receiver, sport, 4500, b"one whole datagram");
                run(&dp, from, &on_ethernet(&packet))
            };
            let datagram = udp_packet(sender, receiver, sport, 4500, &big);
            let (a, b) = if fragments_first {
                let f = forward_fragments(&dp, from, &datagram, id);
                (f, whole())
            } else {
                let w = whole();
                (w, forward_fragments(&dp, from, &datagram, id))
            };
            for out in [&a, &b] {
                assert_eq!(out.verdict, REDIRECT, "{what}");
                out.assert_checksums();
                assert_eq!(out.ip(), (own, receiver, 63), "{what}");
            }
            let nat_port = a.ports().0;
            assert!(nat_port >= NAT_PORT_FIRST, "{what}: {nat_port}");
            assert_eq!(a.ports(), (nat_port, 4500), "{what}");
            assert_eq!(b.ports(), (nat_port, 4500), "{what}: the same port");
            let fragmented = if fragments_first { &a } else { &b };
            assert_eq!(fragmented.l4_payload(), big, "{what}: the payload");

            let reply = udp_packet(receiver, own, 4500, nat_port, &big);
            let back = forward_fragments(&dp, from.other(), &reply, id + 1);
            back.assert_checksums();
            assert_eq!(back.ip(), (receiver, sender, 63), "{what}: the reply");
            assert_eq!(back.ports(), (4500, sport), "{what}: the reply");
            assert_eq!(back.l4_payload(), big, "{what}: the reply's payload");
        }
    }
}

/// A later fragment whose first fragment the fast path has not seen is
/// dropped and counted when the fast path would forward it (it must not
/// reach the kernel's rules as a new connection), and the kernel's when it
/// is the host's own; a datagram whose first fragment the kernel got stays
/// the kernel's, to reassemble.
#[test]
fn unknown_later_fragments_are_dropped_unless_the_hosts() {
    let dp = datapath(false);
    let payload = [7u8; 2100];
    let later = |src: IpAddr, dst: IpAddr, id| {
        fragments(&udp_packet(src, dst, 5000, 6000, &payload), 1000, id).swap_remove(1)
    };
    let cases: [(&str, Device, Vec<u8>, u32, Outcome); 5] = [
        (
            "wg -> ts",
            Device::WireGuard,
            later(CLIENT4.into(), PEER4.into(), 1),
            SHOT,
            Outcome::DropFragmentUnknown,
        ),
        (
            "wg -> ts, IPv6",
            Device::WireGuard,
            later(v6(CLIENT6).into(), v6(PEER6).into(), 2),
            SHOT,
            Outcome::DropFragmentUnknown,
        ),
        (
            "ts -> TS_DEST_IP",
            Device::Tailscale,
            later(PEER4.into(), TS4.into(), 3),
            SHOT,
            Outcome::DropFragmentUnknown,
        ),
        (
            "to the host's WireGuard address",
            Device::WireGuard,
            later(CLIENT4.into(), WG4.into(), 4),
            CONTINUE,
            Outcome::KernelNotHandled,
        ),
        (
            "to the host's WireGuard address, IPv6",
            Device::WireGuard,
            later(v6(CLIENT6).into(), WG6.into(), 5),
            CONTINUE,
            Outcome::KernelNotHandled,
        ),
    ];
    for (what, device, input, verdict, outcome) in cases {
        let before = outcome_count(&dp, device, outcome);
        let out = run(&dp, device, &input);
        assert_eq!(out.verdict, verdict, "{what}");
        assert_eq!(
            outcome_count(&dp, device, outcome),
            before + 1,
            "{what}: counted as {outcome:?}"
        );
    }

    // The first fragment went to the kernel (to the host): so do the rest.
    for (src, dst) in [
        (IpAddr::from(CLIENT4), IpAddr::from(WG4)),
        (v6(CLIENT6).into(), WG6.into()),
    ] {
        let frames = fragments(&udp_packet(src, dst, 5000, 53, &payload), 1000, 99);
        for (i, f) in frames.iter().enumerate() {
            let out = run(&dp, Device::WireGuard, f);
            assert_eq!(
                (out.verdict, &out.frame),
                (CONTINUE, f),
                "{dst}: fragment {i}"
            );
        }
    }

    // Out of order: the later fragment is dropped, the first still starts
    // the flow.
    let frames = fragments(
        &udp_packet(CLIENT4.into(), PEER4.into(), 5001, 6000, &payload),
        1000,
        100,
    );
    assert_eq!(run(&dp, Device::WireGuard, &frames[2]).verdict, SHOT);
    assert_eq!(run(&dp, Device::WireGuard, &frames[0]).verdict, REDIRECT);
    assert_eq!(run(&dp, Device::WireGuard, &frames[1]).verdict, REDIRECT);
}

/// `packet` (IPv4, no options) with `options` (a multiple of 4 bytes).
fn with_ipv4_options(packet: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut ip = packet[..20].to_vec();
    ip[0] = 0x40 | (5 + options.len() / 4) as u8;
    ip[2..4].copy_from_slice(&((packet.len() + options.len()) as u16).to_be_bytes());
    ip.extend_from_slice(options);
    ip.extend_from_slice(&packet[20..]);
    fix_ipv4_checksum(&mut ip);
    ip
}

/// Loose source routing via 192.0.2.1 (RFC 791), and a NOP to fill the word.
const LSRR: [u8; 8] = [131, 7, 4, 192, 0, 2, 1, 1];
/// Record route with room for one address.
const RECORD_ROUTE: [u8; 8] = [7, 7, 4, 0, 0, 0, 0, 1];

/// IPv4 with options is the kernel's (its option processing and
/// `accept_source_route` decide), and a packet with options of a flow the
/// fast path owns is dropped, not left to the kernel to translate anew.
#[test]
fn ipv4_options_are_the_kernels_but_never_of_our_flows() {
    let dp = datapath(false);
    // A flow of its own each: the first packet makes its flow the kernel's.
    for (sport, what, options) in [(43010, "LSRR", LSRR), (43011, "record route", RECORD_ROUTE)] {
        let new = on_ethernet(&with_ipv4_options(
            &udp_packet(CLIENT4.into(), PEER4.into(), sport, 53, b"new"),
            &options,
        ));
        let before = outcome_count(&dp, Device::WireGuard, Outcome::KernelIpOptions);
        let out = run(&dp, Device::WireGuard, &new);
        assert_eq!((out.verdict, &out.frame), (CONTINUE, &new), "{what}");
        assert_eq!(
            outcome_count(&dp, Device::WireGuard, Outcome::KernelIpOptions),
            before + 1,
            "{what}"
        );
    }

    let plain = udp_packet(CLIENT4.into(), PEER4.into(), 43001, 53, b"ours");
    let out = run(&dp, Device::WireGuard, &on_ethernet(&plain));
    assert_eq!(out.verdict, REDIRECT);
    let (nat_port, _) = out.ports();
    let reply = udp_packet(PEER4.into(), TS4.into(), 53, nat_port, b"answer");
    for (what, device, packet) in [
        ("from the client", Device::WireGuard, &plain),
        ("the reply", Device::Tailscale, &reply),
    ] {
        for options in [LSRR, RECORD_ROUTE] {
            let before = outcome_count(&dp, device, Outcome::DropOptionsOfOurFlow);
            let out = run(
                &dp,
                device,
                &on_ethernet(&with_ipv4_options(packet, &options)),
            );
            assert_eq!(out.verdict, SHOT, "{what}");
            assert_eq!(
                outcome_count(&dp, device, Outcome::DropOptionsOfOurFlow),
                before + 1,
                "{what}"
            );
        }
        let out = run(&dp, device, &on_ethernet(packet));
        assert_eq!(out.verdict, REDIRECT, "{what} without options");
    }
}

const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const DEST_OPTIONS: u8 = 60;

/// An options header (hop-by-hop or destination) of 8 bytes: one PadN.
fn padding_header() -> Vec<u8> {
    vec![0, 0, 1, 4, 0, 0, 0, 0]
}

/// A type 0 routing header through `via`, `left` segments left.
fn routing_header(left: u8, via: Ipv6Addr) -> Vec<u8> {
    let mut h = vec![0, 2, 0, left, 0, 0, 0, 0];
    h.extend_from_slice(&via.octets());
    h
}

/// Extension headers: each one's type and body.
type Extensions = Vec<(u8, Vec<u8>)>;

/// `packet` (IPv6, none yet) with `headers` (type and body, whose first byte
/// is set to the next header's type) between its header and its payload.
fn with_ipv6_extensions(packet: &[u8], headers: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut ip = packet[..40].to_vec();
    let upper = packet[6];
    let mut added = 0;
    for (i, (kind, body)) in headers.iter().enumerate() {
        if i == 0 {
            ip[6] = *kind;
        }
        let mut body = body.clone();
        body[0] = headers.get(i + 1).map_or(upper, |(next, _)| *next);
        added += body.len();
        ip.extend_from_slice(&body);
    }
    let payload = u16::from_be_bytes([packet[4], packet[5]]) as usize + added;
    ip[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    ip.extend_from_slice(&packet[40..]);
    ip
}

/// IPv6 extension headers: packets of our flows behind hop-by-hop,
/// destination options or a spent routing header are translated (checksums
/// checked by etherparse, which walks the chain itself); a routing header
/// with segments left is the kernel's (dropped for a flow of ours); a chain
/// longer than the fast path walks is dropped when it would forward it.
#[test]
fn ipv6_extension_headers_are_walked() {
    let dp = datapath(false);
    let (client, peer, own): (IpAddr, IpAddr, IpAddr) =
        (v6(CLIENT6).into(), v6(PEER6).into(), TS6.into());
    let plain = udp_packet(client, peer, 44000, 53, b"ours");
    let out = run(&dp, Device::WireGuard, &on_ethernet(&plain));
    assert_eq!(out.verdict, REDIRECT);
    let (nat_port, _) = out.ports();
    let reply = udp_packet(peer, own, 53, nat_port, b"answer");
    let via = v6("fd7a:115c:a1e0::77");

    let translated: [(&str, Extensions); 3] = [
        ("hop-by-hop", vec![(HOP_BY_HOP, padding_header())]),
        (
            "hop-by-hop and destination options",
            vec![
                (HOP_BY_HOP, padding_header()),
                (DEST_OPTIONS, padding_header()),
            ],
        ),
        (
            "routing, no segments left",
            vec![(ROUTING, routing_header(0, via))],
        ),
    ];
    for (what, headers) in &translated {
        let out = run(
            &dp,
            Device::WireGuard,
            &on_ethernet(&with_ipv6_extensions(&plain, headers)),
        );
        assert_eq!(out.verdict, REDIRECT, "{what}");
        out.assert_checksums();
        assert_eq!(
            (out.ip(), out.ports()),
            ((own, peer, 63), (nat_port, 53)),
            "{what}"
        );
        let back = run(
            &dp,
            Device::Tailscale,
            &on_ethernet(&with_ipv6_extensions(&reply, headers)),
        );
        assert_eq!(back.verdict, REDIRECT, "{what}: the reply");
        back.assert_checksums();
        assert_eq!(
            (back.ip(), back.ports()),
            ((peer, client, 63), (53, 44000)),
            "{what}: the reply"
        );
    }

    let source_routed = vec![(ROUTING, routing_header(1, via))];
    let new = udp_packet(client, peer, 44001, 53, b"new");
    let seven = vec![(DEST_OPTIONS, padding_header()); 7];
    let to_host = udp_packet(client, WG6.into(), 44002, 53, b"host");
    let cases: [(&str, Device, Vec<u8>, u32, Outcome); 5] = [
        (
            "source-routed, new",
            Device::WireGuard,
            with_ipv6_extensions(&new, &source_routed),
            CONTINUE,
            Outcome::KernelIpOptions,
        ),
        (
            "source-routed, ours",
            Device::WireGuard,
            with_ipv6_extensions(&plain, &source_routed),
            SHOT,
            Outcome::DropOptionsOfOurFlow,
        ),
        (
            "source-routed reply",
            Device::Tailscale,
            with_ipv6_extensions(&reply, &source_routed),
            SHOT,
            Outcome::DropOptionsOfOurFlow,
        ),
        (
            "seven headers",
            Device::WireGuard,
            with_ipv6_extensions(&plain, &seven),
            SHOT,
            Outcome::DropExtHeaders,
        ),
        (
            "seven headers, to the host",
            Device::WireGuard,
            with_ipv6_extensions(&to_host, &seven),
            CONTINUE,
            Outcome::KernelNotHandled,
        ),
    ];
    for (what, device, packet, verdict, outcome) in cases {
        let input = on_ethernet(&packet);
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
}

/// IPv6 UDP with checksum 0 is dropped and counted, new or of our flow;
/// IPv4's "no checksum" is fine; to the host, the kernel decides.
#[test]
fn ipv6_udp_without_checksum_is_dropped() {
    let dp = datapath(false);
    let zero = |mut packet: Vec<u8>| {
        let at = if packet[0] >> 4 == 6 { 46 } else { 26 };
        packet[at..at + 2].fill(0);
        on_ethernet(&packet)
    };
    let (client, peer): (IpAddr, IpAddr) = (v6(CLIENT6).into(), v6(PEER6).into());
    let ours = udp_packet(client, peer, 45000, 53, b"ours");
    assert_eq!(
        run(&dp, Device::WireGuard, &on_ethernet(&ours)).verdict,
        REDIRECT
    );
    for (what, packet) in [
        ("new", udp_packet(client, peer, 45001, 53, b"new")),
        ("of our flow", ours),
    ] {
        let before = outcome_count(&dp, Device::WireGuard, Outcome::DropUdpZeroChecksum);
        assert_eq!(
            run(&dp, Device::WireGuard, &zero(packet)).verdict,
            SHOT,
            "{what}"
        );
        assert_eq!(
            outcome_count(&dp, Device::WireGuard, Outcome::DropUdpZeroChecksum),
            before + 1,
            "{what}"
        );
    }
    let v4 = zero(udp_packet(CLIENT4.into(), PEER4.into(), 45002, 53, b"v4"));
    let out = run(&dp, Device::WireGuard, &v4);
    assert_eq!(out.verdict, REDIRECT, "IPv4 UDP may go without a checksum");
    let h = PacketHeaders::from_ethernet_slice(&out.frame).unwrap();
    let Some(TransportHeader::Udp(u)) = h.transport else {
        panic!("UDP")
    };
    assert_eq!(u.checksum, 0, "and stays without one");
    let to_host = zero(udp_packet(client, WG6.into(), 45003, 53, b"host"));
    let out = run(&dp, Device::WireGuard, &to_host);
    assert_eq!(
        (out.verdict, &out.frame),
        (CONTINUE, &to_host),
        "to the host"
    );
}

/// A TCP SYN cut into fragments inside its header (RFC 1858's tiny
/// fragments): the first fragment is dropped and counted, since its ports
/// cannot be judged.
#[test]
fn tiny_first_fragments_are_dropped() {
    let dp = datapath(false);
    let mut syn = Vec::new();
    PacketBuilder::ipv4(CLIENT4.octets(), PEER4.octets(), 64)
        .tcp(40000, 443, 1, 64240)
        .syn()
        .write(&mut syn, &[])
        .unwrap();
    // 16 of the header's 20 bytes: the ports and flags, not the checksum.
    let frames = fragments(&syn, 16, 0x77);
    let before = outcome_count(&dp, Device::WireGuard, Outcome::DropTinyFragment);
    assert_eq!(run(&dp, Device::WireGuard, &frames[0]).verdict, SHOT);
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::DropTinyFragment),
        before + 1
    );
}
