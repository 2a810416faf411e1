//! The differential test's packets, written byte by byte: IPv4 with
//! options and fragments, IPv6 with extension headers and fragments, UDP
//! with checksum 0, ICMP errors with any quote — shapes a socket cannot
//! send and a packet builder will not write.

use std::net::IpAddr;

/// IP protocol numbers, IPv6 extension headers and TCP flags, as the
/// programs read them.
pub use tailguard_common::wire::{
    IPPROTO_ICMP as ICMP, IPPROTO_ICMPV6 as ICMPV6, IPPROTO_TCP as TCP, IPPROTO_UDP as UDP,
    ipv6::{DEST_OPTS, FRAGMENT, HOP_BY_HOP},
    tcp::{ACK as TCP_ACK, PSH as TCP_PSH, SYN as TCP_SYN},
};

/// The network layer of a packet to build.
#[derive(Clone, Debug)]
pub struct Ip {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    /// IPv4 only: "don't fragment".
    pub df: bool,
    /// IPv4 options (a multiple of 4 bytes).
    pub options: Vec<u8>,
    /// IPv6 extension headers before the transport header, by type
    /// ([`HOP_BY_HOP`], [`DEST_OPTS`]), each 8 bytes padded with PadN.
    pub ext: Vec<u8>,
}

/// The transport layer of a packet to build.
#[derive(Clone, Debug)]
pub enum L4 {
    Tcp {
        sport: u16,
        dport: u16,
        seq: u32,
        ack: u32,
        flags: u8,
        mss: Option<u16>,
        payload: Vec<u8>,
    },
    Udp {
        sport: u16,
        dport: u16,
        payload: Vec<u8>,
        /// Send checksum 0 ("none": legal over IPv4 only).
        zero_checksum: bool,
    },
    Echo {
        request: bool,
        id: u16,
        seq: u16,
        payload: Vec<u8>,
    },
    /// An ICMP error: type, code, the 4 bytes after the checksum (the MTU
    /// for "too big"), and the quoted packet.
    Error {
        kind: u8,
        code: u8,
        rest: u32,
        quote: Vec<u8>,
    },
}

impl L4 {
    fn header_len(&self) -> usize {
        match self {
            L4::Tcp { mss, .. } => 20 + if mss.is_some() { 4 } else { 0 },
            L4::Udp { .. } | L4::Echo { .. } | L4::Error { .. } => 8,
        }
    }

    /// The transport bytes that make a packet of `size` bytes in all (IP
    /// headers included) when the headers take `ip_len`: the payload is
    /// cut or padded to fit.
    pub fn fit(mut self, size: usize, ip_len: usize) -> Self {
        let want = size.saturating_sub(ip_len + self.header_len());
        if let L4::Tcp { payload, .. } | L4::Udp { payload, .. } | L4::Echo { payload, .. } =
            &mut self
        {
            let mut byte = 0u8;
            while payload.len() < want {
                payload.push(byte);
                byte = byte.wrapping_add(37);
            }
            payload.truncate(want);
        }
        self
    }
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The pseudo-header of the transport checksum.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&[0, proto]);
            p.extend_from_slice(&(len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&d.octets());
            p.extend_from_slice(&(len as u32).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, proto]);
        }
        _ => panic!("mixed families: {src} -> {dst}"),
    }
    p
}

/// The IP header length `ip` will have (IPv6: with its extension headers).
pub fn ip_len(ip: &Ip) -> usize {
    if ip.src.is_ipv4() {
        20 + ip.options.len()
    } else {
        40 + 8 * ip.ext.len()
    }
}

/// The transport bytes, checksummed for `ip`.
fn transport(ip: &Ip, l4: &L4) -> (u8, Vec<u8>) {
    let v6 = ip.src.is_ipv6();
    let (proto, mut bytes, csum_at) = match l4 {
        L4::Tcp {
            sport,
            dport,
            seq,
            ack,
            flags,
            mss,
            payload,
        } => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(&ack.to_be_bytes());
            let words = if mss.is_some() { 6u8 } else { 5 };
            b.extend_from_slice(&[words << 4, *flags, 0xfa, 0xf0, 0, 0, 0, 0]);
            if let Some(mss) = mss {
                b.extend_from_slice(&[2, 4]);
                b.extend_from_slice(&mss.to_be_bytes());
            }
            b.extend_from_slice(payload);
            (TCP, b, Some(16))
        }
        L4::Udp {
            sport,
            dport,
            payload,
            zero_checksum,
        } => {
            let mut b = Vec::new();
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(payload);
            (UDP, b, (!zero_checksum).then_some(6))
        }
        L4::Echo {
            request,
            id,
            seq,
            payload,
        } => {
            let kind = match (v6, request) {
                (false, true) => 8,
                (false, false) => 0,
                (true, true) => 128,
                (true, false) => 129,
            };
            let mut b = vec![kind, 0, 0, 0];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&seq.to_be_bytes());
            b.extend_from_slice(payload);
            (if v6 { ICMPV6 } else { ICMP }, b, Some(2))
        }
        L4::Error {
            kind,
            code,
            rest,
            quote,
        } => {
            let mut b = vec![*kind, *code, 0, 0];
            b.extend_from_slice(&rest.to_be_bytes());
            b.extend_from_slice(quote);
            (if v6 { ICMPV6 } else { ICMP }, b, Some(2))
        }
    };
    if let Some(at) = csum_at {
        // ICMPv4 has no pseudo-header; everything else does.
        let mut sum_over = if proto == ICMP {
            Vec::new()
        } else {
            pseudo_header(ip.src, ip.dst, proto, bytes.len())
        };
        sum_over.extend_from_slice(&bytes);
        let mut sum = checksum(&sum_over);
        if proto == UDP && sum == 0 {
            sum = 0xffff;
        }
        bytes[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    }
    (proto, bytes)
}

/// One whole packet.
pub fn build(ip: &Ip, l4: &L4) -> Vec<u8> {
    let (proto, l4) = transport(ip, l4);
    ip_packet(ip, proto, &l4, None)
}

/// The IP header(s) around `payload`; `frag`: (offset in bytes, more
/// fragments, identification) for a fragment.
fn ip_packet(ip: &Ip, proto: u8, payload: &[u8], frag: Option<(usize, bool, u32)>) -> Vec<u8> {
    match (ip.src, ip.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let hlen = 20 + ip.options.len();
            let total = hlen + payload.len();
            let (offset, more, id) = frag.unwrap_or((0, false, 0x1234));
            let flags = (u16::from(ip.df) << 14) | (u16::from(more) << 13) | (offset / 8) as u16;
            let mut h = vec![0x40 | (hlen / 4) as u8, 0];
            h.extend_from_slice(&(total as u16).to_be_bytes());
            h.extend_from_slice(&(id as u16).to_be_bytes());
            h.extend_from_slice(&flags.to_be_bytes());
            h.extend_from_slice(&[ip.ttl, proto, 0, 0]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&ip.options);
            let sum = checksum(&h);
            h[10..12].copy_from_slice(&sum.to_be_bytes());
            h.extend_from_slice(payload);
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            // The chain: the extension headers, then the fragment header if
            // any, then the transport.
            let after_ext = if frag.is_some() { FRAGMENT } else { proto };
            let mut chain = Vec::new();
            for (i, _) in ip.ext.iter().enumerate() {
                let next = *ip.ext.get(i + 1).unwrap_or(&after_ext);
                // PadN fills the header to 8 bytes.
                chain.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
            }
            if let Some((offset, more, id)) = frag {
                chain.extend_from_slice(&[proto, 0]);
                chain.extend_from_slice(&((offset as u16) | u16::from(more)).to_be_bytes());
                chain.extend_from_slice(&id.to_be_bytes());
            }
            let first = *ip.ext.first().unwrap_or(&after_ext);
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&((chain.len() + payload.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[first, ip.ttl]);
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h.extend_from_slice(&chain);
            h.extend_from_slice(payload);
            h
        }
        _ => panic!("mixed families"),
    }
}

/// The packet as two fragments, cut near the middle of its transport bytes.
pub fn fragments(ip: &Ip, l4: &L4) -> Vec<Vec<u8>> {
    let (proto, bytes) = transport(ip, l4);
    let cut = ((bytes.len() / 2) / 8 * 8).max(8);
    let id = 0x5a5a_0000 | (u32::from(bytes[0]) << 8) | u32::from(bytes[1]);
    vec![
        ip_packet(ip, proto, &bytes[..cut], Some((0, true, id))),
        ip_packet(ip, proto, &bytes[cut..], Some((cut, false, id))),
    ]
}
