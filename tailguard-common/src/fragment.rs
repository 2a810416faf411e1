//! IP fragments and IPv6 extension headers: what the TC programs need to
//! know to follow a fragmented datagram of a flow they own, and to find the
//! transport header behind a chain of IPv6 extension headers. Pure
//! arithmetic on header fields, shared by the programs and host unit tests.
//!
//! Only the first fragment of a datagram carries the transport header (and
//! so the ports). The programs remember, per datagram (addresses, protocol,
//! fragment id), the ports the first fragment had and whether the fast path
//! took it; the later fragments are then translated (or left to the kernel)
//! the same way.

use bytemuck::{Pod, Zeroable};

use crate::wire::{
    ipv4,
    ipv6::{self, DEST_OPTS, FRAGMENT, HOP_BY_HOP, ROUTING},
};

/// Which part of a datagram a packet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    Whole,
    /// Offset 0 with more to come: carries the transport header.
    First,
    /// Offset above 0: payload only.
    Later,
}

/// From IPv4's flags and fragment offset field (host byte order): MF and
/// the offset in the low 13 bits.
pub const fn ipv4_fragment(flags_offset: u16) -> Fragment {
    classify(
        flags_offset & ipv4::OFFSET_MASK,
        flags_offset & ipv4::FLAG_MF != 0,
    )
}

/// From the second word of an IPv6 fragment header (host byte order): the
/// offset in the top 13 bits, M the lowest bit. A fragment header with offset
/// 0 and M clear (an "atomic fragment", RFC 6946) is a whole datagram.
pub const fn ipv6_fragment(offset_flags: u16) -> Fragment {
    classify(
        offset_flags >> ipv6::FRAGMENT_OFFSET_SHIFT,
        offset_flags & ipv6::FRAGMENT_MORE != 0,
    )
}

const fn classify(offset: u16, more: bool) -> Fragment {
    match (offset, more) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First,
        _ => Fragment::Later,
    }
}

/// How many extension headers the programs walk before giving up (a bounded
/// loop for the verifier; real traffic carries one or two).
pub const IPV6_MAX_EXT_HEADERS: usize = 6;

/// One step along an IPv6 header chain, decided from a header's type and
/// its first 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv6Step {
    /// Not an extension header: the upper-layer protocol starts here.
    Upper(u8),
    /// An extension header the forwarding path passes on untouched: skip
    /// `len` bytes to the next, of type `next`.
    Skip { next: u8, len: usize },
    /// A routing header with segments left: the packet is source-routed,
    /// and the kernel (which drops type 0, RFC 5095) decides. Walked past
    /// like `Skip`, to find the flow.
    SourceRouted { next: u8, len: usize },
    /// The fragment header (8 bytes): `id` tracks the datagram.
    Fragment { next: u8, part: Fragment, id: u32 },
}

/// Reads the extension header of type `kind` whose first 8 bytes are `h`.
pub const fn ipv6_step(kind: u8, h: [u8; 8]) -> Ipv6Step {
    match kind {
        HOP_BY_HOP | DEST_OPTS => Ipv6Step::Skip {
            next: h[ipv6::EXT_NEXT],
            len: ipv6::ext_header_len(h[ipv6::EXT_LEN]),
        },
        ROUTING if h[ipv6::ROUTING_SEGMENTS_LEFT] != 0 => Ipv6Step::SourceRouted {
            next: h[ipv6::EXT_NEXT],
            len: ipv6::ext_header_len(h[ipv6::EXT_LEN]),
        },
        ROUTING => Ipv6Step::Skip {
            next: h[ipv6::EXT_NEXT],
            len: ipv6::ext_header_len(h[ipv6::EXT_LEN]),
        },
        FRAGMENT => {
            let (at, id) = (ipv6::FRAGMENT_OFFSET, ipv6::FRAGMENT_ID);
            Ipv6Step::Fragment {
                next: h[ipv6::EXT_NEXT],
                part: ipv6_fragment(u16::from_be_bytes([h[at], h[at + 1]])),
                id: u32::from_be_bytes([h[id], h[id + 1], h[id + 2], h[id + 3]]),
            }
        }
        upper => Ipv6Step::Upper(upper),
    }
}

/// A fragmented datagram as it arrives on one device. IPv4 addresses use the
/// first four bytes; `id` is IPv4's 16-bit or IPv6's 32-bit identification;
/// `proto` the IPv4 protocol or the fragment header's next header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    /// The [`crate::Device`] it arrives on.
    pub ingress: u8,
    /// 4 or 6.
    pub family: u8,
    pub _pad: u8,
}

/// What the first fragment of a datagram was.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragEntry {
    /// Its ports as it arrived (network byte order; the echo identifier and
    /// 0 for ICMP).
    pub sport: u16,
    pub dport: u16,
    /// Its transport protocol.
    pub proto: u8,
    /// 1 if the fast path translated it, 0 if the kernel got it (and so
    /// must get the rest to reassemble it).
    pub ours: u8,
    pub _pad: u16,
}

#[cfg(feature = "user")]
// SAFETY: `Pod` per bytemuck's derive (no padding, any bit pattern valid).
unsafe impl aya::Pod for FragKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for FragEntry {}

/// Datagrams being fragmented at once that the programs remember (an LRU
/// map: the oldest are forgotten first; a datagram takes well under a
/// second to arrive whole).
pub const FRAG_MAX_ENTRIES: u32 = 8192;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_flags_and_offset() {
        assert_eq!(ipv4_fragment(0), Fragment::Whole);
        assert_eq!(ipv4_fragment(0x4000), Fragment::Whole, "DF alone");
        assert_eq!(ipv4_fragment(0x2000), Fragment::First);
        assert_eq!(ipv4_fragment(0x2000 | 185), Fragment::Later);
        assert_eq!(ipv4_fragment(185), Fragment::Later, "the last one");
        assert_eq!(ipv4_fragment(0x8000), Fragment::Whole, "the reserved bit");
    }

    #[test]
    fn ipv6_offset_and_more() {
        assert_eq!(ipv6_fragment(0), Fragment::Whole, "atomic fragment");
        assert_eq!(ipv6_fragment(1), Fragment::First);
        assert_eq!(ipv6_fragment(185 << 3 | 1), Fragment::Later);
        assert_eq!(ipv6_fragment(185 << 3), Fragment::Later);
        assert_eq!(ipv6_fragment(0b110), Fragment::Whole, "reserved bits");
    }

    #[test]
    fn ipv6_chain_steps() {
        assert_eq!(ipv6_step(17, [0; 8]), Ipv6Step::Upper(17));
        assert_eq!(
            ipv6_step(HOP_BY_HOP, [60, 0, 1, 4, 0, 0, 0, 0]),
            Ipv6Step::Skip { next: 60, len: 8 }
        );
        assert_eq!(
            ipv6_step(DEST_OPTS, [6, 2, 0, 0, 0, 0, 0, 0]),
            Ipv6Step::Skip { next: 6, len: 24 }
        );
        assert_eq!(
            ipv6_step(ROUTING, [17, 2, 0, 0, 0, 0, 0, 0]),
            Ipv6Step::Skip { next: 17, len: 24 },
            "no segments left: the packet is at its final destination"
        );
        assert_eq!(
            ipv6_step(ROUTING, [17, 2, 0, 1, 0, 0, 0, 0]),
            Ipv6Step::SourceRouted { next: 17, len: 24 }
        );
        assert_eq!(
            ipv6_step(FRAGMENT, [17, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]),
            Ipv6Step::Fragment {
                next: 17,
                part: Fragment::First,
                id: 0xdead_beef
            }
        );
        assert_eq!(
            ipv6_step(FRAGMENT, [17, 0, 0x05, 0xc8, 0, 0, 0, 7]),
            Ipv6Step::Fragment {
                next: 17,
                part: Fragment::Later,
                id: 7
            }
        );
    }

    #[test]
    fn every_ipv6_fragment_field_reads_as_one_kind() {
        for field in 0..=u16::MAX {
            let offset = field >> 3;
            let more = field & 1 == 1;
            let part = ipv6_fragment(field);
            assert_eq!(part == Fragment::Later, offset != 0, "{field:#x}");
            assert_eq!(part == Fragment::First, offset == 0 && more, "{field:#x}");
        }
    }

    #[test]
    fn every_ipv4_fragment_field_reads_as_one_kind() {
        for field in 0..=u16::MAX {
            let offset = field & 0x1fff;
            let more = field & 0x2000 != 0;
            let part = ipv4_fragment(field);
            assert_eq!(part == Fragment::Later, offset != 0, "{field:#x}");
            assert_eq!(part == Fragment::First, offset == 0 && more, "{field:#x}");
        }
    }
}
