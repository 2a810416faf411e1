//! The generated traffic: cases drawn from a seeded generator, so a seed
//! names the same cases on every run and on both datapaths.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};

use crate::topology::*;

/// Where the test sends from and captures: one namespace each, at its
/// WireGuard device (the uplink's veth for `Internet`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Site {
    /// The WireGuard server TailGuard is a client of (10.66.0.1, fd66::1).
    Server,
    /// A WireGuard client of TailGuard (10.66.0.3, fd66::3).
    Client,
    /// The tailnet peer (100.64.0.2, fd7a:115c:a1e0::2).
    Tailnet,
    /// Beyond the node's uplink (10.201.0.2).
    Internet,
}

impl Site {
    pub const ALL: [Site; 4] = [Site::Server, Site::Client, Site::Tailnet, Site::Internet];

    /// The site's own address of the family.
    pub fn addr(self, v6: bool) -> IpAddr {
        match (self, v6) {
            (Site::Server, false) => IpAddr::V4(Ipv4Addr::new(10, 66, 0, 1)),
            (Site::Server, true) => IpAddr::V6(Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 1)),
            (Site::Client, false) => IpAddr::V4(Ipv4Addr::new(10, 66, 0, 3)),
            (Site::Client, true) => IpAddr::V6(Ipv6Addr::new(0xfd66, 0, 0, 0, 0, 0, 0, 3)),
            (Site::Tailnet, false) => IpAddr::V4(Ipv4Addr::new(100, 64, 0, 2)),
            (Site::Tailnet, true) => {
                IpAddr::V6(Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, 2))
            }
            (Site::Internet, _) => IpAddr::V4(Ipv4Addr::new(10, 201, 0, 2)),
        }
    }

    fn on_wireguard(self) -> bool {
        matches!(self, Site::Server | Site::Client)
    }
}

/// The node's own addresses: its WireGuard and tailnet addresses, both
/// families.
pub fn node_addrs() -> [IpAddr; 4] {
    [
        NODE_WG.parse().unwrap(),
        NODE_WG_V6.parse().unwrap(),
        NODE_TS.parse().unwrap(),
        NODE_TS_V6.parse().unwrap(),
    ]
}

/// A destination, the policy row it exercises, and the site that
/// receives it (if any: the node's own address answers nobody).
#[derive(Debug)]
pub struct Target {
    pub row: &'static str,
    pub v4: &'static str,
    pub v6: Option<&'static str>,
    pub receiver: Option<Site>,
}

/// What each site sends to.
fn targets(from: Site) -> Vec<Target> {
    let other_peer = if from == Site::Server {
        Site::Client
    } else {
        Site::Server
    };
    let t = |row, v4, v6, receiver| Target {
        row,
        v4,
        v6,
        receiver,
    };
    if from.on_wireguard() {
        vec![
            t(
                "wg -> ts (masquerade)",
                TAILNET_PEER,
                Some(TAILNET_PEER_V6),
                Some(Site::Tailnet),
            ),
            t(
                "wg -> ts exit node (a prefix of table 52)",
                "198.18.0.7",
                Some("2001:db8:18::7"),
                Some(Site::Tailnet),
            ),
            if other_peer == Site::Server {
                t(
                    "wg -> wg",
                    WG_SERVER,
                    Some(WG_SERVER_V6),
                    Some(Site::Server),
                )
            } else {
                t(
                    "wg -> wg",
                    WG_CLIENT,
                    Some(WG_CLIENT_V6),
                    Some(Site::Client),
                )
            },
            t(
                "wg -> the node (not exposed)",
                NODE_WG,
                Some(NODE_WG_V6),
                None,
            ),
            t("wg -> the uplink", INTERNET, None, Some(Site::Internet)),
        ]
    } else {
        vec![
            t(
                "ts -> wg (SNAT)",
                WG_SERVER,
                Some(WG_SERVER_V6),
                Some(Site::Server),
            ),
            t(
                "ts -> wg client (SNAT)",
                WG_CLIENT,
                Some(WG_CLIENT_V6),
                Some(Site::Client),
            ),
            t(
                "ts -> TS_DEST_IP",
                NODE_TS,
                Some(NODE_TS_V6),
                Some(Site::Server),
            ),
            t(
                "ts -> exit node traffic into WireGuard",
                "203.0.113.10",
                Some("2001:db8:113::10"),
                Some(Site::Server),
            ),
            t("ts -> the uplink", INTERNET, None, Some(Site::Internet)),
        ]
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
    Echo,
}

/// How the first packet is shaped beyond its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Plain,
    /// IPv4 options: no-ops, record route, or a (completed) loose source
    /// route.
    Options(&'static str),
    /// IPv6 extension headers: hop-by-hop, destination options, or both.
    Extensions(&'static str),
    /// Sent as two fragments (IPv4, or IPv6 with a fragment header).
    Fragments,
    /// UDP with checksum 0 ("none").
    ZeroChecksum,
}

/// ICMP errors the receiver sends about the flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// Port unreachable, to the flow's translated address.
    Unreachable,
    /// Fragmentation needed (MTU 1000) / packet too big (MTU 1280).
    TooBig,
    /// Port unreachable, to another of the node's addresses than the one
    /// the flow was translated to.
    WrongOuterDestination,
    /// The quoted IPv4 header says IHL 4.
    QuoteIhlBelow5,
    /// The quote stops 4 bytes into the transport header.
    TruncatedQuote,
}

/// What follows the first packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The receiver answers (SYN-ACK, datagram, echo reply) to what it got.
    Reply { size: usize, df: bool },
    /// The sender sends the flow's next packet (TCP data, a datagram, the
    /// next echo request).
    Again { size: usize, df: bool },
    /// The receiver sends an ICMP error about what it got.
    Error(ErrorKind),
}

/// One case: a flow's first packet and what follows it.
#[derive(Clone, Debug)]
pub struct Case {
    pub index: usize,
    /// Run with `WG_ISOLATE_PEERS=1`.
    pub isolate: bool,
    pub from: Site,
    pub row: &'static str,
    pub dst: IpAddr,
    pub receiver: Option<Site>,
    pub v6: bool,
    pub proto: Proto,
    pub sport: u16,
    pub dport: u16,
    /// The first packet's size, IP header included.
    pub size: usize,
    pub df: bool,
    pub ttl: u8,
    pub shape: Shape,
    pub follow: Vec<Follow>,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "case {} [{}{}]: {:?} {} -> {} ({:?} {} -> {}), {}{}, ttl {}, {:?}, then {:?}",
            self.index,
            self.row,
            if self.isolate {
                ", WG_ISOLATE_PEERS=1"
            } else {
                ""
            },
            self.from,
            self.from.addr(self.v6),
            self.dst,
            self.proto,
            self.sport,
            self.dport,
            if self.proto == Proto::Tcp {
                // A SYN (of no data), then the handshake's SYN-ACK and ACK.
                "SYN, SYN-ACK, ACK".to_string()
            } else {
                format!("{} bytes", self.size)
            },
            if self.df { " DF" } else { "" },
            self.ttl,
            self.shape,
            self.follow
        )
    }
}

/// The MTUs the sizes cluster around: the tailnet's 1280, WireGuard's
/// 1420, and the senders' own 1500.
const SIZES: [usize; 7] = [1279, 1280, 1281, 1419, 1420, 1421, 1500];

fn size(rng: &mut StdRng) -> usize {
    if rng.random_bool(0.4) {
        rng.random_range(60..400)
    } else {
        *SIZES.choose(rng).expect("sizes")
    }
}

/// `count` cases drawn from `seed`.
pub fn generate(seed: u64, count: usize) -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|index| case(&mut rng, index)).collect()
}

fn case(rng: &mut StdRng, index: usize) -> Case {
    let from = *[Site::Server, Site::Client, Site::Tailnet]
        .choose(rng)
        .expect("sites");
    let all = targets(from);
    let target = all.choose(rng).expect("targets");
    let v6 = target.v6.is_some() && rng.random_bool(0.5);
    let dst = if v6 { target.v6.unwrap() } else { target.v4 };
    let proto = *[Proto::Tcp, Proto::Udp, Proto::Udp, Proto::Echo]
        .choose(rng)
        .expect("protocols");
    let roll: f64 = rng.random();
    let shape = match roll {
        r if r < 0.55 => Shape::Plain,
        r if r < 0.67 && !v6 => Shape::Options(
            ["nop", "record-route", "loose-source-route"]
                .choose(rng)
                .unwrap(),
        ),
        r if r < 0.67 => {
            Shape::Extensions(["hop-by-hop", "destination", "both"].choose(rng).unwrap())
        }
        r if r < 0.85 => Shape::Fragments,
        _ if proto == Proto::Udp => Shape::ZeroChecksum,
        _ => Shape::Plain,
    };
    let ttl = match rng.random_range(0..40) {
        0 => 1,
        1 => 2,
        _ => 64,
    };
    let mut follow = Vec::new();
    if shape == Shape::Fragments {
        // The flow the kernel saw start (it reassembles fragments): its
        // next packet must stay the kernel's.
        follow.push(Follow::Again {
            size: rng.random_range(60..300),
            df: false,
        });
    }
    for _ in 0..rng.random_range(0..=2) {
        let df = rng.random_bool(0.5);
        follow.push(match rng.random_range(0..3) {
            0 => Follow::Reply {
                size: size(rng),
                df,
            },
            1 => Follow::Again {
                size: size(rng),
                df,
            },
            _ => Follow::Error(
                *[
                    ErrorKind::Unreachable,
                    ErrorKind::TooBig,
                    ErrorKind::WrongOuterDestination,
                    ErrorKind::QuoteIhlBelow5,
                    ErrorKind::TruncatedQuote,
                ]
                .choose(rng)
                .unwrap(),
            ),
        });
    }
    Case {
        index,
        isolate: rng.random_bool(0.2),
        from,
        row: target.row,
        dst: dst.parse().expect("an address"),
        receiver: target.receiver,
        v6,
        proto,
        // Unique per case, so no two cases share a flow.
        sport: 20000 + 3 * index as u16 + rng.random_range(0..3),
        dport: rng.random_range(1024..19999),
        size: size(rng),
        df: !v6 && rng.random_bool(0.6),
        ttl,
        shape,
        follow,
    }
}
