//! Path MTU through the node, once per datapath: a packet too big for the
//! device it would leave by (IPv4 with DF, or IPv6) gets ICMP
//! "fragmentation needed" / ICMPv6 "packet too big" back, as the sender
//! receives it on its own device: the egress MTU, from the node's address on
//! the side the packet came in, quoting the packet as the sender sent it,
//! checksums valid. Every translation kind and family, on README.md's
//! "WireGuard as exit node" pattern (`tests/src/bridge.rs` draws it), and the
//! bulk download that stalls without it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::Command,
    thread::JoinHandle,
    time::{Duration, Instant},
};
use tailguard::report::StatusReport;

use etherparse::{Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type, IpHeaders, IpPayloadSlice};
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DATAPATHS, DaemonUnderTest},
    netns::{NetNs, run},
    topology::*,
    traffic::*,
};

const DOWNLOAD: usize = 2 << 20;

/// The bridge as pattern 1 runs it: TailGuard a client of the WireGuard
/// server (everything routed to it, its LAN behind it), `TS_DEST_IP` the
/// server, and both peers on 1500-byte links.
fn exit_node_bridge(purpose: &str, datapath: &str) -> (Bridge, DaemonUnderTest) {
    let b = Bridge::with_ethernet_peers(purpose, WG_SERVER_EXIT);
    let env = [("TG_DATAPATH", datapath), ("TS_DEST_IP", WG_SERVER_BOTH)];
    let node = b
        .bed
        .ours
        .run(|| DaemonUnderTest::builder(&b).envs(&env).start_healthy());
    (b, node)
}

/// A device's MTU, read in the calling thread's namespace.
fn mtu_of(device: &str) -> u32 {
    let shown = run(Command::new("ip").args(["-o", "link", "show", "dev", device]));
    let mut words = shown.split_whitespace();
    words
        .find(|w| *w == "mtu")
        .and_then(|_| words.next())
        .and_then(|mtu| mtu.parse().ok())
        .unwrap_or_else(|| panic!("no MTU for {device} in {shown:?}"))
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big": the whole IP
/// packet, as a [`Tap`] captures it.
fn is_too_big(packet: &[u8]) -> bool {
    match packet[0] >> 4 {
        4 => packet.len() > 21 && packet[9] == 1 && packet[20] == 3 && packet[21] == 4,
        6 => packet.len() > 40 && packet[6] == 58 && packet[40] == 2,
        _ => false,
    }
}

/// The next "too big" error that arrives at `tap` within 5 s.
fn too_big(tap: &Tap) -> Option<Vec<u8>> {
    tap.next_where(Duration::from_secs(5), is_too_big)
}

/// A UDP socket that sends with DF (IPv4) and never fragments (IPv6).
fn df_socket(ipv6: bool) -> UdpSocket {
    let socket = UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
    let (level, name, value) = if ipv6 {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_DO,
        )
    } else {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DO,
        )
    };
    // SAFETY: a plain setsockopt with an int.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    socket
}

/// What the sender must receive.
struct Expected<'a> {
    what: &'a str,
    /// The node's address the error comes from.
    from: IpAddr,
    /// The sender, as it sent.
    sender: SocketAddr,
    /// The destination, as the sender addressed it.
    target: SocketAddr,
    mtu: u32,
    ttl: u8,
}

/// Checks a received too-big error against `e`: outer header, type, code,
/// MTU, checksums, quote length as the kernel cuts it, the quoted packet.
fn check(packet: &[u8], e: &Expected, context: &str) {
    let what = format!("{}: {context}", e.what);
    let (ip, payload) = IpHeaders::from_slice(packet).unwrap_or_else(|err| panic!("{what}: {err}"));
    let IpPayloadSlice {
        payload: message, ..
    } = payload;
    let (source, destination, ttl): (IpAddr, IpAddr, u8) = match &ip {
        IpHeaders::Ipv4(h, _) => {
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "{what}: IPv4 header checksum"
            );
            (h.source.into(), h.destination.into(), h.time_to_live)
        }
        IpHeaders::Ipv6(h, _) => (h.source.into(), h.destination.into(), h.hop_limit),
    };
    assert_eq!(
        (source, destination, ttl),
        (e.from, e.sender.ip(), e.ttl),
        "{what}: from, to, TTL"
    );
    let quote = &message[8..];
    match &ip {
        IpHeaders::Ipv4(..) => {
            let (header, _) = Icmpv4Header::from_slice(message).unwrap();
            assert_eq!(
                header.icmp_type,
                Icmpv4Type::DestinationUnreachable(
                    etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded {
                        next_hop_mtu: e.mtu as u16
                    }
                ),
                "{what}"
            );
            assert_eq!(
                header.checksum,
                Icmpv4Header::with_checksum(header.icmp_type.clone(), quote).checksum,
                "{what}: ICMP checksum"
            );
            assert_eq!(packet.len(), 576, "{what}: length");
        }
        IpHeaders::Ipv6(h, _) => {
            let (header, _) = Icmpv6Header::from_slice(message).unwrap();
            assert_eq!(
                header.icmp_type,
                Icmpv6Type::PacketTooBig { mtu: e.mtu },
                "{what}"
            );
            let valid =
                Icmpv6Header::with_checksum(header.icmp_type, h.source, h.destination, quote)
                    .unwrap()
                    .checksum;
            assert_eq!(header.checksum, valid, "{what}: ICMPv6 checksum");
            assert_eq!(packet.len(), 1280, "{what}: length");
        }
    }
    // The quote is cut short: read its headers by hand.
    let (qs, qd, udp): (IpAddr, IpAddr, &[u8]) = if quote[0] >> 4 == 4 {
        let src: [u8; 4] = quote[12..16].try_into().unwrap();
        let dst: [u8; 4] = quote[16..20].try_into().unwrap();
        (
            src.into(),
            dst.into(),
            &quote[usize::from(quote[0] & 0xf) * 4..],
        )
    } else {
        let src: [u8; 16] = quote[8..24].try_into().unwrap();
        let dst: [u8; 16] = quote[24..40].try_into().unwrap();
        (src.into(), dst.into(), &quote[40..])
    };
    let ports = (
        u16::from_be_bytes([udp[0], udp[1]]),
        u16::from_be_bytes([udp[2], udp[3]]),
    );
    assert_eq!(
        (SocketAddr::new(qs, ports.0), SocketAddr::new(qd, ports.1)),
        (e.sender, e.target),
        "{what}: the quoted packet, as the sender sent it"
    );
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Sends one DF datagram of `size` IP bytes from `ns` (through `device`) to
/// `target`: the too-big error it gets back, checked against what is
/// expected of it.
#[allow(clippy::too_many_arguments)]
fn datagram_too_big(
    ns: &NetNs,
    device: &str,
    what: &str,
    target: SocketAddr,
    size: usize,
    from: &str,
    mtu: u32,
    ttl: u8,
    context: &dyn Fn() -> String,
) {
    let ipv6 = target.is_ipv6();
    let (packet, sender) = ns.run(|| {
        let capture = Tap::open(device);
        let socket = df_socket(ipv6);
        let headers = if ipv6 { 48 } else { 28 };
        socket
            .send_to(&vec![0x5a; size - headers], target)
            .expect("sending");
        // The sender's address as the kernel chose it for this target.
        let probe = UdpSocket::bind(if ipv6 { "[::]:0" } else { "0.0.0.0:0" }).unwrap();
        probe.connect(target).unwrap();
        let local = SocketAddr::new(
            probe.local_addr().unwrap().ip(),
            socket.local_addr().unwrap().port(),
        );
        (too_big(&capture), local)
    });
    let Some(packet) = packet else {
        panic!("{what}: no too-big error came back\n{}", context());
    };
    let e = Expected {
        what,
        from: from.parse().unwrap(),
        sender,
        target,
        mtu,
        ttl,
    };
    check(&packet, &e, &context());
}

/// Sender's namespace and device, what it is, target, datagram size, the
/// node's address the error comes from, the MTU it says, its TTL on arrival.
type Case<'a> = (
    &'a NetNs,
    &'a str,
    &'a str,
    SocketAddr,
    usize,
    &'a str,
    u32,
    u8,
);

/// A DF (or IPv6) UDP datagram too big for the device it would leave by,
/// for every translation kind and family: masquerade wg -> ts, source NAT
/// ts -> wg, `TS_DEST_IP`, exit-node traffic both ways (a reply among it),
/// wg -> wg untranslated.
#[test]
fn too_big_datagrams_get_the_kernels_answer() {
    for datapath in DATAPATHS {
        let (b, node) = exit_node_bridge(&format!("pmtu-{datapath}"), datapath);
        let context = || format!("{datapath}\n{}", node.log());
        let ts_mtu = b.bed.ours.run(|| mtu_of(&node.standin().ts_device));
        let wg_mtu = b.bed.ours.run(|| mtu_of(&b.bed.device));
        let tailnet_device = b.tailnet_peer.name.clone();
        let client_device = b.client.device_starting_with("wgc");
        let lan_device = b.lan.device_starting_with("vb");
        let client = &b.client;
        let tailnet = &b.tailnet;
        // Bigger than the egress device, smaller than the sender's link.
        let over_ts = ts_mtu as usize + 100;
        let over_wg = wg_mtu as usize + 30;
        let cases: [Case; 12] = [
            (
                client,
                &client_device,
                "masquerade wg -> ts",
                addr(TAILNET_PEER, 9),
                over_ts,
                NODE_WG,
                ts_mtu,
                64,
            ),
            (
                client,
                &client_device,
                "masquerade wg -> ts, IPv6",
                addr(TAILNET_PEER_V6, 9),
                over_ts,
                NODE_WG_V6,
                ts_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "SNAT ts -> wg",
                addr(WG_CLIENT, 9),
                over_wg,
                NODE_TS,
                wg_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "SNAT ts -> wg, IPv6",
                addr(WG_CLIENT_V6, 9),
                over_wg,
                NODE_TS_V6,
                wg_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "TS_DEST_IP",
                addr(NODE_TS, 9),
                over_wg,
                NODE_TS,
                wg_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "TS_DEST_IP, IPv6",
                addr(NODE_TS_V6, 9),
                over_wg,
                NODE_TS_V6,
                wg_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "exit node ts -> wg",
                addr(LAN_HOST, 9),
                over_wg,
                NODE_TS,
                wg_mtu,
                64,
            ),
            (
                tailnet,
                &tailnet_device,
                "exit node ts -> wg, IPv6",
                addr(WG_SERVER_V6, 9),
                over_wg,
                NODE_TS_V6,
                wg_mtu,
                64,
            ),
            (
                &b.lan,
                &lan_device,
                "exit node wg -> ts",
                addr(TAILNET_PEER, 9),
                over_ts,
                NODE_WG,
                ts_mtu,
                63,
            ),
            (
                &b.bed.theirs,
                &b.bed.peer.name,
                "exit node wg -> ts, IPv6",
                addr(TAILNET_PEER_V6, 9),
                over_ts,
                NODE_WG_V6,
                ts_mtu,
                64,
            ),
            (
                client,
                &client_device,
                "wg -> wg",
                addr(WG_SERVER, 9),
                over_wg,
                NODE_WG,
                wg_mtu,
                64,
            ),
            (
                client,
                &client_device,
                "wg -> wg, IPv6",
                addr(WG_SERVER_V6, 9),
                over_wg,
                NODE_WG_V6,
                wg_mtu,
                64,
            ),
        ];
        for (ns, device, what, target, size, from, mtu, ttl) in cases {
            let before = answered(&b);
            datagram_too_big(ns, device, what, target, size, from, mtu, ttl, &context);
            assert_answered_by(datapath, &b, before, what);
        }
        let before = answered(&b);
        reply_too_big(&b, &lan_device, ts_mtu, &context);
        assert_answered_by(datapath, &b, before, "exit node reply wg -> ts");
        b.bed.ours.run(|| node.stop());
    }
}

/// Too-big packets the fast path answered, both devices together.
fn answered(b: &Bridge) -> u64 {
    let s: StatusReport = serde_json::from_str(&b.tailguard("status")).expect("the report");
    ["wireguard", "tailscale"]
        .iter()
        .map(|d| s.counted(d, "too-big-answered"))
        .sum()
}

/// The eBPF datapath answered the last one itself (the kernel did with
/// netfilter). The daemon publishes its counters every second or so: this
/// waits for the next publication that shows it, up to 5 s.
fn assert_answered_by(datapath: &str, b: &Bridge, before: u64, what: &str) {
    let expected = if datapath == "ebpf" {
        before + 1
    } else {
        before
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = answered(b);
    while now < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        now = answered(b);
    }
    assert_eq!(
        now, expected,
        "{datapath}: {what}: answered by the fast path"
    );
}

/// A reply too big: the tailnet peer starts a UDP flow to the LAN host, which
/// answers with a DF datagram the Tailscale device cannot take. The error
/// goes to the LAN host about the packet it sent, to the node's WireGuard
/// address and the port it saw the flow come from.
fn reply_too_big(b: &Bridge, lan_device: &str, ts_mtu: u32, context: &dyn Fn() -> String) {
    let server = b.lan.run(|| df_socket(false));
    let port = server.local_addr().unwrap().port();
    let tailnet_socket = b.tailnet.run(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    tailnet_socket
        .send_to(b"hello", addr(LAN_HOST, port))
        .unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut buffer = [0u8; 64];
    let (_, peer) = server
        .recv_from(&mut buffer)
        .unwrap_or_else(|e| panic!("exit node reply: the first datagram: {e}\n{}", context()));
    let packet = b.lan.run(|| {
        let capture = Tap::open(lan_device);
        server
            .send_to(&vec![0x5a; ts_mtu as usize + 100 - 28], peer)
            .expect("replying");
        too_big(&capture)
    });
    let Some(packet) = packet else {
        panic!(
            "exit node reply wg -> ts: no too-big error came back\n{}",
            context()
        );
    };
    let e = Expected {
        what: "exit node reply wg -> ts",
        from: NODE_WG.parse().unwrap(),
        sender: addr(LAN_HOST, port),
        target: peer,
        mtu: ts_mtu,
        ttl: 63,
    };
    check(&packet, &e, &context());
}

/// A server that sends `bytes` to each client, then closes.
struct Source {
    port: u16,
    _thread: JoinHandle<()>,
}

impl Source {
    fn listen(bytes: usize) -> Self {
        let listener = TcpListener::bind("0.0.0.0:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let chunk = vec![0xa5u8; 65536];
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(chunk.len());
                    if stream.write_all(&chunk[..n]).is_err() {
                        break;
                    }
                    left -= n;
                }
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// Downloads from `addr:port` to the end: the byte count, or why not.
fn download(addr: &str, port: u16) -> Result<usize, String> {
    let target = SocketAddr::new(addr.parse().unwrap(), port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = vec![0u8; 65536];
    let mut total = 0;
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) => return Err(format!("after {total} bytes: {e}")),
        }
    }
}

/// The stall: a tailnet client (1500-byte link) downloads 2 MB from a
/// host behind the WireGuard server through the node as exit node. The
/// host's 1420-byte segments do not fit the 1280-byte Tailscale device; they
/// are replies to the node's translation port, so only the fast path can
/// tell the host the path MTU.
#[test]
fn bulk_download_through_the_exit_node_completes() {
    for datapath in DATAPATHS {
        let (b, node) = exit_node_bridge(&format!("pmtu-dl-{datapath}"), datapath);
        let source = b.lan.run(|| Source::listen(DOWNLOAD));
        let got = b.tailnet.run(|| download(LAN_HOST, source.port));
        assert_eq!(
            got,
            Ok(DOWNLOAD),
            "{datapath}: LAN host -> tailnet client download\n{}",
            node.log()
        );
        b.bed.ours.run(|| node.stop());
    }
}

/// A UDP socket that sends IPv4 without DF (routers may fragment it).
fn no_df_socket() -> UdpSocket {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    let value = libc::IP_PMTUDISC_DONT;
    // SAFETY: a plain setsockopt with an int.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            (&raw const value).cast(),
            std::mem::size_of::<i32>() as u32,
        )
    };
    assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    socket
}

/// The datagrams `receiver` gets within 3 s each, `count` at most: their
/// sizes and where they came from.
fn received(receiver: &UdpSocket, count: usize) -> Vec<(usize, SocketAddr)> {
    let mut buffer = vec![0u8; 65536];
    (0..count)
        .map_while(|_| receiver.recv_from(&mut buffer).ok())
        .collect()
}

/// Fragments the fast path sent (both devices).
fn fragmented(b: &Bridge) -> u64 {
    let s: StatusReport = serde_json::from_str(&b.tailguard("status")).expect("the report");
    ["wireguard", "tailscale"]
        .iter()
        .map(|d| s.counted(d, "fragmented"))
        .sum()
}

/// IPv4 without DF, too big for the Tailscale device: it arrives whole, and
/// within its flow: the first datagram of a masqueraded flow (big), the
/// next ones (small, big) all come from the same translated address and
/// port; so does a big reply to a flow from the tailnet, from the address
/// the tailnet peer talked to.
#[test]
fn ipv4_without_df_is_fragmented_within_its_flow() {
    for datapath in DATAPATHS {
        let (b, node) = exit_node_bridge(&format!("pmtu-frag-{datapath}"), datapath);
        let context = || format!("{datapath}\n{}", node.log());
        let big = b.bed.ours.run(|| mtu_of(&node.standin().ts_device)) as usize + 100 - 28;
        let before = fragmented(&b);

        // Masquerade wg -> ts, from the WireGuard client and (exit node) from
        // the LAN behind the server.
        for (what, ns) in [("wg -> ts", &b.client), ("exit node wg -> ts", &b.lan)] {
            let receiver = b.tailnet.run(no_df_socket);
            let port = receiver.local_addr().unwrap().port();
            let sender = ns.run(no_df_socket);
            for size in [big, 100, big] {
                sender
                    .send_to(&vec![0x5a; size], addr(TAILNET_PEER, port))
                    .unwrap();
                // Apart, so that the node's userspace WireGuard does not
                // coalesce them into one UDP GSO packet (which the fast path
                // leaves to the kernel: it cannot cut GSO packets up).
                std::thread::sleep(Duration::from_millis(100));
            }
            let got = received(&receiver, 3);
            let sizes: Vec<usize> = got.iter().map(|(n, _)| *n).collect();
            assert_eq!(
                sizes,
                [big, 100, big],
                "{what}: arrived whole\n{}",
                context()
            );
            let from = got[0].1;
            assert_eq!(
                from.ip(),
                NODE_TS.parse::<IpAddr>().unwrap(),
                "{what}: masqueraded"
            );
            assert!(
                got.iter().all(|(_, f)| *f == from),
                "{what}: one flow, one translation: {got:?}\n{}\n{}",
                context(),
                b.tailguard("status")
            );
        }

        // A reply: the tailnet peer starts the flow, the WireGuard client
        // answers big.
        let tailnet_socket = b.tailnet.run(no_df_socket);
        let client_socket = b.client.run(no_df_socket);
        let client_port = client_socket.local_addr().unwrap().port();
        tailnet_socket
            .send_to(b"hello", addr(WG_CLIENT, client_port))
            .unwrap();
        let mut buffer = [0u8; 64];
        let (_, seen) = client_socket
            .recv_from(&mut buffer)
            .unwrap_or_else(|e| panic!("the first datagram: {e}\n{}", context()));
        client_socket.send_to(&vec![0x5a; big], seen).unwrap();
        let got = received(&tailnet_socket, 1);
        assert_eq!(
            got,
            [(big, addr(WG_CLIENT, client_port))],
            "reply wg -> ts: whole, from the address the peer talked to\n{}",
            context()
        );

        // Five big datagrams (two from each sender, the reply), each sent in
        // fragments by the fast path.
        let expected = if datapath == "ebpf" {
            before + 5
        } else {
            before
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut now = fragmented(&b);
        while now < expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            now = fragmented(&b);
        }
        assert_eq!(
            now,
            expected,
            "{datapath}: fragmented by the fast path\n{}",
            b.tailguard("status")
        );
        b.bed.ours.run(|| node.stop());
    }
}
