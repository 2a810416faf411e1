//! The fields the policy needs, read straight from the packet
//! (`parse::read`). The same reader reads the packet an ICMP error quotes,
//! at the quote's offset (`icmp`).

use crate::{
    link_layer::{has_ethernet, ip_header_offset},
    parse::{self, read},
};
use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, macros::map, maps::PerCpuArray, programs::TcContext,
};
use tailguard_common::{
    Device, Direction, PacketClass,
    fragment::{Fragment, IPV6_MAX_EXT_HEADERS, Ipv6Step, ipv4_fragment, ipv6_step},
    wire::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, icmp, icmpv6, ip_version, ipv4,
        ipv6, tcp, udp,
    },
};

/// The transport header's length until TCP's is read: UDP's and ICMP's.
const SHORT_L4_HEADER: u32 = udp::HEADER as u32;
const _: () = assert!(udp::HEADER == icmp::HEADER);

/// A packet the fast path can handle: IPv4 or IPv6 (behind a bounded chain
/// of extension headers), whole or a fragment, carrying TCP, UDP or an ICMP
/// echo.
#[repr(C, align(8))]
pub struct Packet {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub ipv6: bool,
    /// Where the IP header starts (after Ethernet, if any).
    pub l3: usize,
    /// Where the TCP/UDP/ICMP header starts.
    pub l4: usize,
    /// How long that header is (TCP: with its options).
    pub l4_len: u32,
    pub proto: u8,
    /// Network byte order; for ICMP echo, `sport` is the identifier.
    pub sport: u16,
    pub dport: u16,
    pub ttl: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    /// Length from the IP header on.
    pub len: u32,
    /// For a GSO packet (one that stands for several, cut up when sent),
    /// the payload size of each; 0 otherwise.
    pub gso_size: u32,
    /// Which part of its datagram this is. A later fragment has no transport
    /// header: `l4` points at payload, the ports are 0 until the policy
    /// recalls them from the first fragment, and `proto` is what the IPv4
    /// header or the fragment header names.
    pub part: Fragment,
    /// For a fragment: the datagram's identification and the protocol its
    /// fragments name (see `tailguard_common::fragment::FragKey`).
    pub frag_id: u32,
    pub frag_proto: u8,
    /// IPv4 options, or an IPv6 routing header with segments left: the
    /// kernel's to process (source routing among them).
    pub options: bool,
    /// IPv6 whose chain of extension headers is longer than the fast path
    /// walks: its transport header (and so its flow) is unknown.
    pub unreadable: bool,
    /// IPv6 UDP with checksum 0, which IPv6 forbids.
    pub udp6_no_checksum: bool,
    /// The length its IP header states: IPv4's total length, IPv6's
    /// payload length (extension headers included). `parse::classify` has
    /// judged it for the packet a program decides on; a quoted packet's
    /// describes the packet as it was sent, not the quote.
    pub stated_len: u16,
}

/// An IPv6 extension header the fast path walks past.
pub fn is_extension(next: u8) -> bool {
    matches!(
        next,
        ipv6::HOP_BY_HOP | ipv6::ROUTING | ipv6::FRAGMENT | ipv6::DEST_OPTS
    )
}

/// Where the packet a program decides on is read to: per CPU, one slot per
/// direction (an egress program can run inside an ingress one, when the
/// fast path sends a clone), off the stack, which 6.1's verifier allows 512
/// bytes for the whole call chain.
#[map]
static PACKETS: PerCpuArray<Packet> = PerCpuArray::with_max_entries(Direction::COUNT, 0);

impl Packet {
    /// Reads the packet on `device` once, for everything a program does
    /// with it: its class (the counters': `parse::classify` judges the
    /// link-layer and IP headers) and, for a packet the fast path can
    /// handle, its fields, in this CPU's slot for `direction` (`None` for
    /// anything the fast path leaves alone).
    #[inline(always)]
    pub fn read(
        ctx: &TcContext,
        device: Device,
        direction: Direction,
    ) -> (PacketClass, Option<&'static mut Self>) {
        let class = parse::classify(ctx, has_ethernet(device));
        if class != PacketClass::Ipv4 && class != PacketClass::Ipv6 {
            return (class, None);
        }
        let Some(slot) = PACKETS.get_ptr_mut(direction as u32) else {
            return (class, None);
        };
        // SAFETY: a per-CPU slot; a program runs to completion on one CPU,
        // and the two that can nest use different slots.
        let p = unsafe { &mut *slot };
        match p.read_into(ctx, ip_header_offset(device)) {
            Some(()) => (class, Some(p)),
            None => (class, None),
        }
    }

    #[inline(always)]
    fn read_into(&mut self, ctx: &TcContext, l3: usize) -> Option<()> {
        // SAFETY: the context points at the kernel's `__sk_buff` for this run.
        let gso_size = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size };
        let p = self;
        p.read_ip_header(ctx, l3)?;
        if p.ipv6 {
            p.walk_extensions(ctx)?;
        }
        p.gso_size = gso_size;
        if p.unreadable {
            return Some(());
        }
        if p.part == Fragment::Later {
            // Payload only: the flow is whatever the first fragment said.
            return match p.proto {
                IPPROTO_TCP | IPPROTO_UDP => Some(()),
                IPPROTO_ICMP if !p.ipv6 => Some(()),
                IPPROTO_ICMPV6 | ipv6::DEST_OPTS if p.ipv6 => Some(()),
                _ => None,
            };
        }
        match p.proto {
            IPPROTO_TCP => {
                // Ports (kept in network byte order) through the flags.
                let h: [u8; tcp::FLAGS + 1] = read(ctx, p.l4)?;
                p.take_ports(&h);
                p.tcp_flags = h[tcp::FLAGS];
                p.l4_len = tcp::header_len(h[tcp::DATA_OFFSET]) as u32;
            }
            IPPROTO_UDP => {
                let h: [u8; udp::HEADER] = read(ctx, p.l4)?;
                p.take_ports(&h);
                p.udp6_no_checksum = p.ipv6 && h[udp::CHECKSUM] == 0 && h[udp::CHECKSUM + 1] == 0;
            }
            IPPROTO_ICMP if !p.ipv6 => p.read_echo(ctx, icmp::ECHO_REQUEST, icmp::ECHO_REPLY)?,
            IPPROTO_ICMPV6 if p.ipv6 => {
                p.read_echo(ctx, icmpv6::ECHO_REQUEST, icmpv6::ECHO_REPLY)?
            }
            _ => return None,
        }
        Some(())
    }

    /// Reads the IP header at `l3`, either family, into `self`: `l4` and
    /// `proto` then say where the transport header (IPv6: the first
    /// extension header, if any; see `walk_extensions`) starts and what it
    /// is. Every other field starts over (the ports 0).
    #[inline(always)]
    pub fn read_ip_header(&mut self, ctx: &TcContext, l3: usize) -> Option<()> {
        // Every IP header is at least IPv4's fixed part long.
        let h: [u8; ipv4::HEADER] = read(ctx, l3)?;
        let first = h[0];
        let len = ctx.len().checked_sub(l3 as u32)?;
        *self = match ip_version(first) {
            ipv4::VERSION => {
                let ihl = ipv4::header_len(first);
                if ihl < ipv4::HEADER {
                    return None;
                }
                let mut src = [0u8; 16];
                let mut dst = [0u8; 16];
                src[..ipv4::ADDR_LEN].copy_from_slice(&h[ipv4::SRC..][..ipv4::ADDR_LEN]);
                dst[..ipv4::ADDR_LEN].copy_from_slice(&h[ipv4::DST..][..ipv4::ADDR_LEN]);
                Self {
                    ipv6: false,
                    l3,
                    l4: l3 + ihl,
                    l4_len: SHORT_L4_HEADER,
                    proto: h[ipv4::PROTOCOL],
                    src,
                    dst,
                    sport: 0,
                    dport: 0,
                    ttl: h[ipv4::TTL],
                    tcp_flags: 0,
                    icmp_type: 0,
                    len,
                    gso_size: 0,
                    part: ipv4_fragment(u16::from_be_bytes([h[ipv4::FRAG], h[ipv4::FRAG + 1]])),
                    frag_id: u32::from(u16::from_be_bytes([h[ipv4::ID], h[ipv4::ID + 1]])),
                    frag_proto: h[ipv4::PROTOCOL],
                    options: ihl > ipv4::HEADER,
                    unreadable: false,
                    udp6_no_checksum: false,
                    stated_len: u16::from_be_bytes([h[ipv4::TOTAL_LEN], h[ipv4::TOTAL_LEN + 1]]),
                }
            }
            ipv6::VERSION => {
                let a: [[u8; ipv6::ADDR_LEN]; 2] = read(ctx, l3 + ipv6::SRC)?;
                Self {
                    ipv6: true,
                    l3,
                    l4: l3 + ipv6::HEADER,
                    l4_len: SHORT_L4_HEADER,
                    proto: h[ipv6::NEXT_HEADER],
                    src: a[0],
                    dst: a[1],
                    sport: 0,
                    dport: 0,
                    ttl: h[ipv6::HOP_LIMIT],
                    tcp_flags: 0,
                    icmp_type: 0,
                    len,
                    gso_size: 0,
                    part: Fragment::Whole,
                    frag_id: 0,
                    frag_proto: 0,
                    options: false,
                    unreadable: false,
                    udp6_no_checksum: false,
                    stated_len: u16::from_be_bytes([
                        h[ipv6::PAYLOAD_LEN],
                        h[ipv6::PAYLOAD_LEN + 1],
                    ]),
                }
            }
            _ => return None,
        };
        Some(())
    }

    /// Follows IPv6 extension headers to the transport header (or, in a later
    /// fragment, to the fragment header), at most `IPV6_MAX_EXT_HEADERS` of
    /// them. `None` if one is cut short.
    #[inline(always)]
    pub fn walk_extensions(&mut self, ctx: &TcContext) -> Option<()> {
        for _ in 0..IPV6_MAX_EXT_HEADERS {
            if !is_extension(self.proto) {
                return Some(());
            }
            let h: [u8; 8] = read(ctx, self.l4)?;
            match ipv6_step(self.proto, h) {
                Ipv6Step::Skip { next, len } => {
                    self.l4 += len;
                    self.proto = next;
                }
                Ipv6Step::SourceRouted { next, len } => {
                    self.options = true;
                    self.l4 += len;
                    self.proto = next;
                }
                Ipv6Step::Fragment { next, part, id } => {
                    self.l4 += ipv6::FRAGMENT_HEADER;
                    self.proto = next;
                    self.part = part;
                    self.frag_id = id;
                    self.frag_proto = next;
                    if part == Fragment::Later {
                        return Some(());
                    }
                }
                Ipv6Step::Upper(_) => return Some(()),
            }
        }
        self.unreadable = is_extension(self.proto);
        Some(())
    }

    /// ICMP: only echo requests and replies; errors go to the kernel.
    #[inline(always)]
    fn read_echo(&mut self, ctx: &TcContext, request: u8, reply: u8) -> Option<()> {
        let h: [u8; icmp::HEADER] = read(ctx, self.l4)?;
        self.take_echo(&h);
        if self.icmp_type != request && self.icmp_type != reply {
            return None;
        }
        Some(())
    }

    /// TCP's or UDP's ports (they sit alike), from the header's start `h`,
    /// kept in network byte order.
    #[inline(always)]
    pub fn take_ports<const N: usize>(&mut self, h: &[u8; N]) {
        const { assert!(N >= udp::DST_PORT + 2) };
        self.sport = u16::from_ne_bytes([h[udp::SRC_PORT], h[udp::SRC_PORT + 1]]);
        self.dport = u16::from_ne_bytes([h[udp::DST_PORT], h[udp::DST_PORT + 1]]);
    }

    /// An ICMP message's type and, for an echo, its identifier, from its
    /// header `h`: in `sport`, in network byte order as the ports.
    #[inline(always)]
    pub fn take_echo(&mut self, h: &[u8; icmp::HEADER]) {
        self.icmp_type = h[icmp::TYPE];
        self.sport = u16::from_ne_bytes([h[icmp::ECHO_ID], h[icmp::ECHO_ID + 1]]);
    }

    /// The ICMP of the packet's family.
    pub fn icmp_proto(&self) -> u8 {
        if self.ipv6 {
            IPPROTO_ICMPV6
        } else {
            IPPROTO_ICMP
        }
    }

    pub fn is_icmp(&self) -> bool {
        self.proto == IPPROTO_ICMP || self.proto == IPPROTO_ICMPV6
    }

    /// The first packet of a flow: a TCP SYN, any UDP datagram, an echo request.
    pub fn starts_flow(&self) -> bool {
        match self.proto {
            IPPROTO_TCP => self.tcp_flags & (tcp::SYN | tcp::ACK) == tcp::SYN,
            IPPROTO_UDP => true,
            _ => self.icmp_type == icmp::ECHO_REQUEST || self.icmp_type == icmpv6::ECHO_REQUEST,
        }
    }

    /// Fits a device of `mtu`: by length, or for GSO packets by the size of
    /// the packets they will be cut into: each has the IP and transport
    /// headers as they are (TCP options included; UDP's 8 bytes) and up to
    /// `gso_size` bytes of payload.
    pub fn fits(&self, mtu: u32) -> bool {
        if self.gso_size != 0 {
            (self.l4 - self.l3) as u32 + self.l4_len + self.gso_size <= mtu
        } else {
            self.len <= mtu
        }
    }
}
