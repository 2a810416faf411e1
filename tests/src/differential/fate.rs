//! A packet's fate as its receiver sees it, written as one line that two
//! datapaths must agree on: addresses, ports, flags, sizes, checksums as
//! valid or not, what an ICMP error says and quotes.
//!
//! The datapaths may choose different translation ports on purpose (the
//! kernel's masquerade keeps a free source port, the fast path takes one
//! of 61000-65535): a port (or echo identifier) next to one of the node's
//! own addresses is written as "translation port k", k counting the
//! distinct numbers of one case in the order they appear. So a flow that
//! keeps its port stays `xlat#1`, and one that changes it mid-flow shows a
//! second number. Every other port is written as it is.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use super::craft::{self, DEST_OPTS, FRAGMENT, HOP_BY_HOP, ICMP, ICMPV6, TCP, UDP};

/// Names the translation ports of one case.
pub struct PortNames {
    own: Vec<IpAddr>,
    seen: HashMap<u16, usize>,
    /// Fragment identifications, named the same way (the kernel may choose
    /// them when it fragments).
    ids: HashMap<u32, usize>,
}

impl PortNames {
    /// `own`: the node's addresses (both sides, both families).
    pub fn new(own: &[IpAddr]) -> Self {
        Self {
            own: own.to_vec(),
            seen: HashMap::new(),
            ids: HashMap::new(),
        }
    }

    /// `port` as seen next to `addr`.
    fn port(&mut self, addr: IpAddr, port: u16) -> String {
        if self.own.contains(&addr) {
            let next = self.seen.len() + 1;
            format!("xlat#{}", self.seen.entry(port).or_insert(next))
        } else {
            port.to_string()
        }
    }

    fn frag_id(&mut self, id: u32) -> String {
        let next = self.ids.len() + 1;
        format!("id#{}", self.ids.entry(id).or_insert(next))
    }
}

/// The network layer of a packet, read.
pub struct Parsed<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    /// The transport bytes (of this fragment).
    pub l4: &'a [u8],
    /// What the IP layer says, for the fate: TTL, DF, options, extension
    /// headers, fragment offset.
    pub ip_notes: String,
    /// Set for a fragment: (offset in bytes, more fragments, identification).
    pub frag: Option<(usize, bool, u32)>,
    /// The IPv4 header's checksum holds (always true for IPv6).
    pub header_ok: bool,
    /// The length the IP header gives the whole packet.
    pub total_len: usize,
}

/// Reads the IP layer of `p`; `None` if it is not IP or too short.
pub fn parse(p: &[u8]) -> Option<Parsed<'_>> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
            let frag = u16::from_be_bytes([p[6], p[7]]);
            let offset = usize::from(frag & 0x1fff) * 8;
            let more = frag & 0x2000 != 0;
            let id = u32::from(u16::from_be_bytes([p[4], p[5]]));
            let mut notes = format!("ttl {}", p[8]);
            if frag & 0x4000 != 0 {
                notes.push_str(" DF");
            }
            if ihl > 20 {
                notes.push_str(&format!(" options {:02x?}", &p[20..ihl]));
            }
            let end = total.clamp(ihl, p.len());
            Some(Parsed {
                src: IpAddr::V4(Ipv4Addr::new(p[12], p[13], p[14], p[15])),
                dst: IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19])),
                proto: p[9],
                l4: &p[ihl..end],
                ip_notes: notes,
                frag: (offset != 0 || more).then_some((offset, more, id)),
                header_ok: craft::checksum(&p[..ihl]) == 0,
                total_len: total,
            })
        }
        6 => {
            if p.len() < 40 {
                return None;
            }
            let total = 40 + usize::from(u16::from_be_bytes([p[4], p[5]]));
            let src: [u8; 16] = p[8..24].try_into().ok()?;
            let dst: [u8; 16] = p[24..40].try_into().ok()?;
            let mut notes = format!("hop limit {}", p[7]);
            let (mut next, mut at, mut frag) = (p[6], 40, None);
            // A bounded walk of the extension headers.
            for _ in 0..8 {
                match next {
                    HOP_BY_HOP | DEST_OPTS | 43 if p.len() >= at + 2 => {
                        notes.push_str(&format!(" ext {next}"));
                        let len = (usize::from(p[at + 1]) + 1) * 8;
                        next = p[at];
                        at += len;
                    }
                    FRAGMENT if p.len() >= at + 8 => {
                        let field = u16::from_be_bytes([p[at + 2], p[at + 3]]);
                        let id = u32::from_be_bytes([p[at + 4], p[at + 5], p[at + 6], p[at + 7]]);
                        frag = Some((usize::from(field & 0xfff8), field & 1 != 0, id));
                        next = p[at];
                        at += 8;
                    }
                    _ => break,
                }
            }
            let at = at.min(p.len());
            let end = total.clamp(at, p.len());
            Some(Parsed {
                src: IpAddr::V6(Ipv6Addr::from(src)),
                dst: IpAddr::V6(Ipv6Addr::from(dst)),
                proto: next,
                l4: &p[at..end],
                ip_notes: notes,
                frag,
                header_ok: true,
                total_len: total,
            })
        }
        _ => None,
    }
}

/// The transport checksum of a whole (unfragmented) packet: "ok", "bad",
/// or "zero" for UDP's "none".
fn l4_checksum(src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) -> &'static str {
    if proto == UDP && l4.len() >= 8 && l4[6] == 0 && l4[7] == 0 {
        return "zero";
    }
    let mut over = if proto == ICMP {
        Vec::new()
    } else {
        craft::pseudo_header(src, dst, proto, l4.len())
    };
    over.extend_from_slice(l4);
    if craft::checksum(&over) == 0 {
        "ok"
    } else {
        "bad"
    }
}

/// A short digest of bytes the datapaths must carry unchanged.
fn digest(bytes: &[u8]) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}/{}", bytes.len())
}

/// The fate line of a captured packet.
pub fn describe(p: &[u8], names: &mut PortNames) -> String {
    let Some(ip) = parse(p) else {
        return format!("not IP: {} bytes", p.len());
    };
    let family = if ip.src.is_ipv4() { "v4" } else { "v6" };
    let mut line = format!(
        "{family} {} -> {} len {} {}",
        ip.src, ip.dst, ip.total_len, ip.ip_notes
    );
    if !ip.header_ok {
        line.push_str(" header-checksum-bad");
    }
    let whole = match ip.frag {
        Some((offset, more, id)) => {
            line.push_str(&format!(
                " fragment {} offset {offset}{}",
                names.frag_id(id),
                if more { " MF" } else { "" }
            ));
            if offset != 0 {
                line.push_str(&format!(" proto {} data {}", ip.proto, digest(ip.l4)));
                return line;
            }
            false
        }
        None => true,
    };
    line.push(' ');
    line.push_str(&transport(&ip, whole, names));
    line
}

/// The transport part of a fate line (`whole`: the packet is not a
/// fragment, so its checksum can be checked).
fn transport(ip: &Parsed, whole: bool, names: &mut PortNames) -> String {
    let l4 = ip.l4;
    let csum = if whole {
        l4_checksum(ip.src, ip.dst, ip.proto, l4)
    } else {
        "n/a"
    };
    let port = |b: &[u8], at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    match ip.proto {
        TCP if l4.len() >= 20 => {
            let offset = usize::from(l4[12] >> 4) * 4;
            let mut mss = String::new();
            let mut at = 20;
            while at + 1 < offset.min(l4.len()) {
                match l4[at] {
                    0 => break,
                    1 => at += 1,
                    2 if at + 3 < l4.len() => {
                        mss = format!(" mss {}", port(l4, at + 2));
                        break;
                    }
                    _ => at += usize::from(l4[at + 1]).max(2),
                }
            }
            format!(
                "tcp {} -> {} flags {:#04x}{mss} csum {csum} data {}",
                names.port(ip.src, port(l4, 0)),
                names.port(ip.dst, port(l4, 2)),
                l4[13],
                digest(l4.get(offset..).unwrap_or(&[]))
            )
        }
        UDP if l4.len() >= 8 => format!(
            "udp {} -> {} csum {csum} data {}",
            names.port(ip.src, port(l4, 0)),
            names.port(ip.dst, port(l4, 2)),
            digest(&l4[8..])
        ),
        ICMP | ICMPV6 if l4.len() >= 8 => {
            let (kind, code) = (l4[0], l4[1]);
            let echo = if ip.proto == ICMP {
                kind == 0 || kind == 8
            } else {
                kind == 128 || kind == 129
            };
            if echo {
                // The identifier is the flow's "port", on the side of
                // whoever sent the request.
                let requester = if kind == 8 || kind == 128 {
                    ip.src
                } else {
                    ip.dst
                };
                format!(
                    "icmp echo {kind} id {} seq {} csum {csum} data {}",
                    names.port(requester, port(l4, 4)),
                    port(l4, 6),
                    digest(&l4[8..])
                )
            } else {
                let rest = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
                let mtu = match (ip.proto, kind) {
                    (ICMP, 3) if code == 4 => format!(" mtu {}", rest & 0xffff),
                    (ICMPV6, 2) => format!(" mtu {rest}"),
                    _ => String::new(),
                };
                format!(
                    "icmp {kind}/{code}{mtu} csum {csum} quoting [{}]",
                    quote(&l4[8..], names)
                )
            }
        }
        proto => format!("proto {proto} csum {csum} data {}", digest(l4)),
    }
}

/// What an ICMP error quotes: the quoted packet's header and ports, with
/// its checksums checked where the quote holds them whole.
fn quote(q: &[u8], names: &mut PortNames) -> String {
    let Some(ip) = parse(q) else {
        return format!("unreadable, {} bytes", q.len());
    };
    let mut line = format!("{} -> {}", ip.src, ip.dst);
    if !ip.header_ok {
        line.push_str(" header-checksum-bad");
    }
    let port = |at: usize| u16::from_be_bytes([ip.l4[at], ip.l4[at + 1]]);
    let whole = ip.frag.is_none() && ip.total_len <= q.len();
    match ip.proto {
        TCP | UDP if ip.l4.len() >= 4 => {
            let name = if ip.proto == TCP { "tcp" } else { "udp" };
            line.push_str(&format!(
                " {name} {} -> {}",
                names.port(ip.src, port(0)),
                names.port(ip.dst, port(2))
            ));
            if whole && ip.proto == UDP {
                line.push_str(&format!(
                    " csum {}",
                    l4_checksum(ip.src, ip.dst, ip.proto, ip.l4)
                ));
            }
        }
        ICMP | ICMPV6 if ip.l4.len() >= 8 => {
            // The identifier belongs to whoever sent the request: the
            // source of a request, the destination of a reply.
            let kind = ip.l4[0];
            let requester = if kind == 0 || kind == 129 {
                ip.dst
            } else {
                ip.src
            };
            line.push_str(&format!(
                " icmp {kind} id {}",
                names.port(requester, port(4))
            ));
        }
        proto => line.push_str(&format!(" proto {proto}")),
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        differential::craft::{Ip, L4, build},
        topology::*,
    };

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
        let ip = Ip {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            ttl: 63,
            df: false,
            options: vec![],
            ext: vec![],
        };
        let l4 = L4::Udp {
            sport,
            dport,
            payload: b"TGDIFF".to_vec(),
            zero_checksum: false,
        };
        build(&ip, &l4)
    }

    fn fates(packets: &[Vec<u8>]) -> Vec<String> {
        let mut names = PortNames::new(&[NODE_TS.parse().unwrap()]);
        packets.iter().map(|p| describe(p, &mut names)).collect()
    }

    #[test]
    fn translation_ports_are_named_consistently_within_a_case() {
        // The same flow through two datapaths that chose different ports.
        let kernel = [
            udp(NODE_TS, 30000, TAILNET_PEER, 53),
            udp(NODE_TS, 30000, TAILNET_PEER, 53),
        ];
        let fast = [
            udp(NODE_TS, 61000, TAILNET_PEER, 53),
            udp(NODE_TS, 61000, TAILNET_PEER, 53),
        ];
        assert_eq!(fates(&kernel), fates(&fast));
        assert!(fates(&kernel)[0].contains("udp xlat#1 -> 53 csum ok"));
        // A flow whose port changes mid-flow is told apart.
        let taken_over = [
            udp(NODE_TS, 30000, TAILNET_PEER, 53),
            udp(NODE_TS, 61000, TAILNET_PEER, 53),
        ];
        assert_ne!(fates(&kernel), fates(&taken_over));
        // Ports away from the node's addresses are compared as they are.
        assert_ne!(
            fates(&[udp(WG_SERVER, 30000, TAILNET_PEER, 53)]),
            fates(&[udp(WG_SERVER, 30001, TAILNET_PEER, 53)])
        );
    }

    #[test]
    fn checksums_options_and_fragments_show() {
        let mut p = udp(WG_SERVER, 1, TAILNET_PEER, 2);
        let last = p.len() - 1;
        p[last] ^= 1;
        assert!(
            fates(&[p])[0].contains("csum bad"),
            "a broken checksum shows"
        );
        let ip = Ip {
            src: WG_SERVER_V6.parse().unwrap(),
            dst: TAILNET_PEER_V6.parse().unwrap(),
            ttl: 64,
            df: false,
            options: vec![],
            ext: vec![HOP_BY_HOP, DEST_OPTS],
        };
        let l4 = L4::Udp {
            sport: 1,
            dport: 2,
            payload: vec![7; 100],
            zero_checksum: false,
        };
        let line = &fates(&[build(&ip, &l4)])[0];
        assert!(line.contains("ext 0 ext 60 udp 1 -> 2 csum ok"), "{line}");
        let parts = craft::fragments(&ip, &l4);
        let lines = fates(&parts);
        assert!(
            lines[0].contains("fragment id#1 offset 0 MF udp 1 -> 2 csum n/a"),
            "{lines:?}"
        );
        assert!(lines[1].contains("fragment id#1 offset"), "{lines:?}");
    }
}
