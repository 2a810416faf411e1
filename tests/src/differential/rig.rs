//! The differential test's topology and its packet taps: the scenario
//! bridge (`crate::bridge`) as pattern 1 (TailGuard a client of a WireGuard
//! server that routes anything, `TS_DEST_IP` the server) with a tailnet
//! that also routes a prefix through an exit node, every endpoint sending
//! and capturing at its own device with packet sockets.
//!
//! The endpoints' own stacks never answer (their input from the tunnel is
//! dropped before anything else sees it), so all that comes back is what
//! the test sends or the node makes: the node's ICMP errors reach the
//! sender's capture but not its kernel, which learns no path MTU.

use std::{
    collections::HashMap,
    net::IpAddr,
    process::Command,
    time::{Duration, Instant},
};

use super::{
    cases::{Case, ErrorKind, Follow, Proto, Shape, Site, node_addrs},
    craft::{self, DEST_OPTS, HOP_BY_HOP, Ip, L4, TCP_ACK, TCP_PSH, TCP_SYN},
    fate::{self, PortNames},
};
use crate::{
    bridge::Bridge,
    daemon::DaemonUnderTest,
    netns::{NetNs, run, sysctl},
    topology::*,
    traffic::Tap,
};

/// IPv6 neighbour discovery and multicast listener messages: the links'
/// own chatter, not the test's traffic.
fn chatter(p: &[u8]) -> bool {
    p.first().is_some_and(|b| b >> 4 == 6)
        && p.len() > 40
        && p[6] == craft::ICMPV6
        && (130..=143).contains(&p[40])
}

/// What the test adds to the bridge's WireGuard peers: the exit-node
/// prefixes on either side, the client's IPv6 address at the server.
const TAILNET_EXIT: &str = "198.18.0.0/24,2001:db8:18::/64";
const WIREGUARD_EXIT: &str = "203.0.113.0/24,2001:db8:113::/64";

pub struct Rig {
    pub bridge: Bridge,
    taps: Vec<(Site, Tap)>,
}

impl Rig {
    pub fn new(purpose: &str) -> Self {
        let b = Bridge::with_server_allowed_ips(purpose, WG_SERVER_EXIT);
        let node = b.bed.keys.public.clone();
        let mut taps = Vec::new();
        for site in Site::ALL {
            let (ns, device, peer, allowed): (&NetNs, String, String, String) = match site {
                Site::Server => (
                    &b.bed.theirs,
                    b.bed.peer.name.clone(),
                    node.clone(),
                    format!(
                        "{NODE_WG}/32,{WG_CLIENT}/32,{NODE_WG_V6}/128,{WG_CLIENT_V6}/128,\
                         {TAILNET_BOTH},{INTERNET_NET},{TAILNET_EXIT}"
                    ),
                ),
                Site::Client => (
                    &b.client,
                    b.client_device().to_string(),
                    node.clone(),
                    format!("{WG_NET},{WG_NET_V6},{TAILNET_BOTH},{INTERNET_NET},{TAILNET_EXIT}"),
                ),
                Site::Tailnet => (
                    &b.tailnet,
                    b.tailnet_peer.name.clone(),
                    b.node_tailnet_public_key().to_string(),
                    format!(
                        "{NODE_TS}/32,{NODE_TS_V6}/128,{WG_NET},{WG_NET_V6},\
                         {INTERNET_NET},{LAN_NET},{WIREGUARD_EXIT}"
                    ),
                ),
                Site::Internet => {
                    let device = b
                        .internet
                        .devices()
                        .into_iter()
                        .find(|d| d != "lo")
                        .expect("the internet's veth");
                    (&b.internet, device, String::new(), String::new())
                }
            };
            let tap = ns.run(|| {
                if !peer.is_empty() {
                    run(Command::new("wg").args([
                        "set",
                        &device,
                        "peer",
                        &peer,
                        "allowed-ips",
                        &allowed,
                    ]));
                    // Room to send more than either of the node's MTUs.
                    run(Command::new("ip").args(["link", "set", &device, "mtu", "1500"]));
                }
                let drop = format!(
                    "add table inet difftest\n\
                     add chain inet difftest pre {{ type filter hook prerouting priority -500; }}\n\
                     add rule inet difftest pre iifname \"{device}\" drop\n"
                );
                run(Command::new("nft").args(["-e", &drop.replace('\n', ";")]));
                Tap::open(&device)
            });
            taps.push((site, tap));
        }
        Self { bridge: b, taps }
    }

    /// Starts TailGuard with `datapath` as the test's patterns want it,
    /// forwarding switched on in its namespace (as a container's
    /// `--sysctl` does).
    pub fn start(&self, datapath: &str, isolate: bool) -> DaemonUnderTest {
        let env = [
            ("TG_DATAPATH", datapath),
            ("TS_DEST_IP", WG_SERVER_BOTH),
            ("WG_ISOLATE_PEERS", if isolate { "1" } else { "0" }),
            ("STANDIN_ROUTES", &format!("{TAILNET_BOTH},{TAILNET_EXIT}")),
            (
                "STANDIN_PEER_ALLOWED_IPS",
                &format!("{TAILNET_PEER}/32,{TAILNET_PEER_V6}/128,{TAILNET_EXIT}"),
            ),
        ];
        self.bridge.bed.ours.run(|| {
            sysctl("net.ipv4.ip_forward", "1");
            sysctl("net.ipv6.conf.all.forwarding", "1");
            DaemonUnderTest::builder(&self.bridge)
                .envs(&env)
                .start_healthy()
        })
    }

    fn tap(&self, site: Site) -> &Tap {
        &self.taps.iter().find(|(s, _)| *s == site).expect("a tap").1
    }

    /// Sends `packets` from `site` and returns everything every site
    /// captured until the network has been quiet for a while.
    fn exchange(&self, site: Site, packets: &[Vec<u8>]) -> Vec<(Site, Vec<u8>)> {
        for (_, tap) in &self.taps {
            let _ = tap.take();
        }
        for p in packets {
            self.tap(site).send(p);
        }
        let start = Instant::now();
        let mut last = start;
        let mut got = Vec::new();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            for (s, tap) in &self.taps {
                for p in tap.take() {
                    if !chatter(&p) {
                        got.push((*s, p));
                        last = Instant::now();
                    }
                }
            }
            let quiet = last.elapsed() >= QUIET && start.elapsed() >= AT_LEAST;
            if quiet || start.elapsed() >= AT_MOST {
                return got;
            }
        }
    }

    /// Runs one case: the fate of each of its steps, a line per packet
    /// captured (sorted by site, in the order they came). A TCP case first
    /// completes its handshake (the receiver's SYN-ACK, the sender's ACK),
    /// and every segment after carries the sequence numbers of a real
    /// connection, so the kernel's connection tracking sees a valid one.
    pub fn run(&self, case: &Case) -> Vec<Vec<String>> {
        let mut names = PortNames::new(&node_addrs());
        let mut first_seen: Option<Vec<u8>> = None;
        let mut steps = Vec::new();
        let first = first_packets(case);
        steps.push(self.step(case.from, &first, &mut names, &mut first_seen, case));
        let mut tcp = Tcp {
            sender: SYN_SEQ + 1,
            receiver: SYN_ACK_SEQ,
        };
        let mut follow = case.follow.clone();
        if case.proto == Proto::Tcp {
            let handshake = [
                Follow::Reply { size: 0, df: false },
                Follow::Again { size: 0, df: false },
            ];
            follow.splice(0..0, handshake);
        }
        for (i, follow) in follow.iter().enumerate() {
            let handshake = case.proto == Proto::Tcp && i < 2;
            let (site, packets) = match follow {
                Follow::Again { size, df } => {
                    let flags = if handshake {
                        TCP_ACK
                    } else {
                        TCP_ACK | TCP_PSH
                    };
                    let packet = again(case, *size, *df, (flags, tcp.sender, tcp.receiver));
                    tcp.sender = tcp.sender.wrapping_add(tcp_payload(&packet));
                    (case.from, vec![packet])
                }
                Follow::Reply { .. } | Follow::Error(_) => {
                    let (Some(receiver), Some(seen)) = (case.receiver, &first_seen) else {
                        steps.push(vec!["nothing arrived to answer".to_string()]);
                        continue;
                    };
                    let packet = match follow {
                        Follow::Reply { size, df } => {
                            let flags = if handshake {
                                TCP_SYN | TCP_ACK
                            } else {
                                TCP_ACK | TCP_PSH
                            };
                            let p = reply(seen, *size, *df, (flags, tcp.receiver, tcp.sender));
                            // The SYN-ACK takes one sequence number.
                            let used = if handshake { 1 } else { tcp_payload(&p) };
                            tcp.receiver = tcp.receiver.wrapping_add(used);
                            p
                        }
                        Follow::Error(kind) => error(seen, *kind),
                        Follow::Again { .. } => unreachable!(),
                    };
                    (receiver, vec![packet])
                }
            };
            let mut unused = Some(Vec::new());
            steps.push(self.step(site, &packets, &mut names, &mut unused, case));
        }
        steps
    }

    fn step(
        &self,
        from: Site,
        packets: &[Vec<u8>],
        names: &mut PortNames,
        first_seen: &mut Option<Vec<u8>>,
        case: &Case,
    ) -> Vec<String> {
        let got = self.exchange(from, packets);
        let mut lines = Vec::new();
        for site in Site::ALL {
            for (_, p) in got.iter().filter(|(s, _)| *s == site) {
                if first_seen.is_none() && Some(site) == case.receiver {
                    *first_seen = Some(p.clone());
                }
                lines.push(format!("at {site:?}: {}", fate::describe(p, names)));
            }
        }
        if lines.is_empty() {
            lines.push("nothing seen anywhere".to_string());
        }
        lines
    }
}

/// The next sequence number of each side of a TCP case.
struct Tcp {
    sender: u32,
    receiver: u32,
}

const SYN_SEQ: u32 = 1000;
const SYN_ACK_SEQ: u32 = 7000;

/// The bytes of TCP payload in `packet`.
fn tcp_payload(packet: &[u8]) -> u32 {
    let p = fate::parse(packet).expect("our own packets are IP");
    if p.proto != craft::TCP {
        return 0;
    }
    (p.l4.len() - usize::from(p.l4[12] >> 4) * 4) as u32
}

/// How long the network must be quiet before a step is over, at least and
/// at most how long a step takes.
const QUIET: Duration = Duration::from_millis(150);
const AT_LEAST: Duration = Duration::from_millis(250);
const AT_MOST: Duration = Duration::from_secs(2);

/// The payload every packet starts with: the case and step, so a capture
/// can be read by a person.
fn marker(case: &Case, step: usize) -> Vec<u8> {
    format!("TGDIFF {} {step} ", case.index).into_bytes()
}

fn ip_of(case: &Case) -> Ip {
    let options = match case.shape {
        Shape::Options("nop") => vec![1, 1, 1, 0],
        Shape::Options("record-route") => vec![7, 7, 4, 0, 0, 0, 0, 0],
        Shape::Options(_) => {
            // A loose source route whose last hop is the destination and
            // whose pointer says it is done.
            let IpAddr::V4(dst) = case.dst else {
                unreachable!()
            };
            let mut o = vec![131, 7, 8];
            o.extend_from_slice(&dst.octets());
            o.push(0);
            o
        }
        _ => Vec::new(),
    };
    let ext = match case.shape {
        Shape::Extensions("hop-by-hop") => vec![HOP_BY_HOP],
        Shape::Extensions("destination") => vec![DEST_OPTS],
        Shape::Extensions(_) => vec![HOP_BY_HOP, DEST_OPTS],
        _ => Vec::new(),
    };
    Ip {
        src: case.from.addr(case.v6),
        dst: case.dst,
        ttl: case.ttl,
        df: case.df,
        options,
        ext,
    }
}

/// The transport layer of the sender's packets; for TCP `(flags, seq,
/// ack)`.
fn l4_of(case: &Case, step: usize, (flags, seq, ack): (u8, u32, u32)) -> L4 {
    match case.proto {
        Proto::Tcp => L4::Tcp {
            sport: case.sport,
            dport: case.dport,
            seq,
            ack,
            flags,
            mss: (flags & TCP_SYN != 0).then_some(1460),
            payload: marker(case, step),
        },
        Proto::Udp => L4::Udp {
            sport: case.sport,
            dport: case.dport,
            payload: marker(case, step),
            zero_checksum: case.shape == Shape::ZeroChecksum,
        },
        Proto::Echo => L4::Echo {
            request: true,
            id: case.sport,
            seq: step as u16 + 1,
            payload: marker(case, step),
        },
    }
}

fn first_packets(case: &Case) -> Vec<Vec<u8>> {
    let ip = ip_of(case);
    // A SYN carries no data: for TCP, sizes are the later segments'.
    let size = if case.proto == Proto::Tcp {
        0
    } else {
        case.size
    };
    let l4 = l4_of(case, 0, (TCP_SYN, SYN_SEQ, 0)).fit(size, craft::ip_len(&ip));
    if case.shape == Shape::Fragments {
        craft::fragments(&ip, &l4)
    } else {
        vec![craft::build(&ip, &l4)]
    }
}

/// The flow's next packet from its sender (plain, whatever the first was).
fn again(case: &Case, size: usize, df: bool, tcp: (u8, u32, u32)) -> Vec<u8> {
    let ip = Ip {
        ttl: 64,
        df: df && !case.v6,
        options: Vec::new(),
        ext: Vec::new(),
        ..ip_of(case)
    };
    let mut l4 = l4_of(case, 1, tcp);
    if let L4::Udp { zero_checksum, .. } = &mut l4 {
        *zero_checksum = false;
    }
    craft::build(&ip, &l4.fit(size, craft::ip_len(&ip)))
}

/// The receiver's answer to `seen` (what it got): the tuple turned round;
/// for TCP `(flags, seq, ack)`.
fn reply(seen: &[u8], size: usize, df: bool, (flags, seq, ack): (u8, u32, u32)) -> Vec<u8> {
    let p = fate::parse(seen).expect("captured packets are IP");
    let port = |at: usize| u16::from_be_bytes([p.l4[at], p.l4[at + 1]]);
    let ip = Ip {
        src: p.dst,
        dst: p.src,
        ttl: 64,
        df: df && p.src.is_ipv4(),
        options: Vec::new(),
        ext: Vec::new(),
    };
    let payload = b"TGDIFF reply ".to_vec();
    let l4 = match p.proto {
        craft::TCP => L4::Tcp {
            sport: port(2),
            dport: port(0),
            seq,
            ack,
            flags,
            mss: (flags & TCP_SYN != 0).then_some(1460),
            payload,
        },
        craft::UDP => L4::Udp {
            sport: port(2),
            dport: port(0),
            payload,
            zero_checksum: false,
        },
        _ => L4::Echo {
            request: false,
            id: port(4),
            seq: port(6),
            payload,
        },
    };
    craft::build(&ip, &l4.fit(size, craft::ip_len(&ip)))
}

/// An ICMP error from the receiver about `seen`.
fn error(seen: &[u8], kind: ErrorKind) -> Vec<u8> {
    let p = fate::parse(seen).expect("captured packets are IP");
    let v6 = p.src.is_ipv6();
    let own: HashMap<(bool, bool), IpAddr> = {
        let a = node_addrs();
        // (IPv6, tailnet side) -> the node's address.
        HashMap::from([
            ((false, false), a[0]),
            ((true, false), a[1]),
            ((false, true), a[2]),
            ((true, true), a[3]),
        ])
    };
    let dst = if kind == ErrorKind::WrongOuterDestination {
        // Another of the node's addresses than the flow's.
        if p.src == own[&(v6, true)] {
            own[&(v6, false)]
        } else {
            own[&(v6, true)]
        }
    } else {
        p.src
    };
    // As much as a host quotes: IPv4 up to 576 bytes in all, IPv6 1280.
    let room = if v6 { 1280 - 48 } else { 576 - 28 };
    let mut quote = seen[..seen.len().min(room)].to_vec();
    match kind {
        ErrorKind::QuoteIhlBelow5 if !v6 => quote[0] = 0x44,
        ErrorKind::QuoteIhlBelow5 | ErrorKind::TruncatedQuote => {
            let header = seen.len() - p.l4.len();
            quote.truncate(header + 4);
        }
        _ => {}
    }
    let (kind, code, rest) = match (kind, v6) {
        (ErrorKind::TooBig, false) => (3, 4, 1000),
        (ErrorKind::TooBig, true) => (2, 0, 1280),
        (_, false) => (3, 3, 0),
        (_, true) => (1, 4, 0),
    };
    let ip = Ip {
        src: p.dst,
        dst,
        ttl: 64,
        df: false,
        options: Vec::new(),
        ext: Vec::new(),
    };
    craft::build(
        &ip,
        &L4::Error {
            kind,
            code,
            rest,
            quote,
        },
    )
}
