//! What kind of packet a program is looking at, decided from a few header
//! fields. Pure arithmetic, shared by the TC programs (which read the fields
//! with bounds-checked loads) and host unit tests.

use crate::{
    PacketClass,
    wire::{ipv4, ipv6},
};

/// The fields of an IPv4 header that say whether it is whole.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Lengths {
    /// Header length in bytes (IHL * 4).
    pub header: usize,
    /// The Total Length field.
    pub total: usize,
}

/// What arrived: the packet's length from the IP header on (`skb->len`, which
/// counts the paged part of a GSO/GRO packet, not only the linear head the
/// programs can point into), and whether it is a GSO packet (one that stands
/// for several, `gso_size` set).
#[derive(Clone, Copy, Debug)]
pub struct Arrived {
    pub len: usize,
    pub gso: bool,
}

/// The most an IP length field can say; a GSO packet longer than that (BIG
/// TCP) carries 0 there instead, and `skb->len` is its length.
const IP_MAX_LEN: usize = 0xffff;

/// A GSO packet past 64 KiB whose length field says 0, as the kernel's BIG
/// TCP builds them.
const fn big_gso(field: usize, arrived: Arrived, fixed: usize) -> bool {
    arrived.gso && field == 0 && arrived.len > IP_MAX_LEN && arrived.len >= fixed
}

/// An IPv4 header is whole when its IHL is at least 5 words and the total
/// length it claims covers the header and is not more than what arrived.
/// (Ethernet padding may make what arrived longer than `total`.)
pub const fn ipv4(lengths: Ipv4Lengths, arrived: Arrived) -> PacketClass {
    if lengths.header >= ipv4::HEADER && big_gso(lengths.total, arrived, lengths.header) {
        return PacketClass::Ipv4;
    }
    if lengths.header < ipv4::HEADER
        || lengths.total < lengths.header
        || lengths.total > arrived.len
    {
        PacketClass::Malformed
    } else {
        PacketClass::Ipv4
    }
}

/// An IPv6 header is whole when the fixed 40 bytes and the payload it claims
/// arrived.
pub const fn ipv6(payload: usize, arrived: Arrived) -> PacketClass {
    if big_gso(payload, arrived, ipv6::HEADER) {
        return PacketClass::Ipv6;
    }
    if ipv6::HEADER + payload > arrived.len {
        PacketClass::Malformed
    } else {
        PacketClass::Ipv6
    }
}

/// Which header parser applies, from the version nibble and, on Ethernet
/// devices, the version the EtherType announced (`None` on L3 devices, where
/// the nibble is all there is). A disagreement is malformed; a version other
/// than 4 or 6 on an L3 device is simply not IP.
pub const fn version(nibble: u8, announced: Option<u8>) -> Result<u8, PacketClass> {
    match announced {
        Some(v) if v != nibble => Err(PacketClass::Malformed),
        _ if nibble == ipv4::VERSION || nibble == ipv6::VERSION => Ok(nibble),
        _ => Err(PacketClass::NotIp),
    }
}

/// How much of the quoted transport header an ICMP error must carry: the
/// 8 bytes that hold the ports (as the kernel's conntrack insists too).
pub const QUOTED_L4: usize = 8;

/// What the packet an ICMP error quotes carried after its fixed IP header,
/// as that header states it: IPv4's total length less the header
/// (`header`, options included), IPv6's payload length (`stated`, which
/// counts extension headers). These describe the packet as it was sent,
/// not the quote, which may be cut short. `None` when the lengths do not
/// add up or leave no room for the transport header's first `QUOTED_L4`
/// bytes: not a packet the fast path sent.
pub const fn quoted_payload(ipv6: bool, stated: usize, header: usize) -> Option<usize> {
    let payload = if ipv6 {
        stated
    } else if stated < header {
        return None;
    } else {
        stated - header
    };
    if payload < QUOTED_L4 {
        None
    } else {
        Some(payload)
    }
}

/// Whether a quoted UDP header's length field is one the packet could have
/// had: at least the header, and within the `payload` the IP header states,
/// unless that is a first fragment's, whose UDP length is the whole
/// datagram's.
pub const fn quoted_udp_len(udp_len: usize, payload: usize, first_fragment: bool) -> bool {
    udp_len >= crate::wire::udp::HEADER && (udp_len <= payload || first_fragment)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v4(header: usize, total: usize) -> Ipv4Lengths {
        Ipv4Lengths { header, total }
    }

    const fn plain(len: usize) -> Arrived {
        Arrived { len, gso: false }
    }

    const fn gso(len: usize) -> Arrived {
        Arrived { len, gso: true }
    }

    #[test]
    fn ipv4_header_must_be_whole_and_consistent() {
        assert_eq!(ipv4(v4(20, 60), plain(60)), PacketClass::Ipv4);
        assert_eq!(
            ipv4(v4(24, 60), plain(60)),
            PacketClass::Ipv4,
            "options are fine"
        );
        assert_eq!(
            ipv4(v4(20, 46), plain(46 + 14)),
            PacketClass::Ipv4,
            "Ethernet padding is fine"
        );
        assert_eq!(ipv4(v4(16, 60), plain(60)), PacketClass::Malformed, "IHL 4");
        assert_eq!(
            ipv4(v4(20, 61), plain(60)),
            PacketClass::Malformed,
            "claims more than arrived"
        );
        assert_eq!(
            ipv4(v4(24, 20), plain(60)),
            PacketClass::Malformed,
            "total shorter than header"
        );
    }

    #[test]
    fn ipv6_payload_must_have_arrived() {
        assert_eq!(ipv6(0, plain(40)), PacketClass::Ipv6);
        assert_eq!(ipv6(20, plain(60)), PacketClass::Ipv6);
        assert_eq!(ipv6(21, plain(60)), PacketClass::Malformed);
    }

    /// GRO and TSO packets are whole as `skb->len` counts them; past 64 KiB
    /// (BIG TCP) their length field is 0.
    #[test]
    fn gso_packets_are_not_malformed() {
        assert_eq!(ipv4(v4(20, 64000), gso(64000)), PacketClass::Ipv4);
        assert_eq!(ipv4(v4(20, 0), gso(150_000)), PacketClass::Ipv4);
        assert_eq!(ipv6(0, gso(150_000)), PacketClass::Ipv6);
        assert_eq!(ipv6(63960, gso(64000)), PacketClass::Ipv6);
        assert_eq!(
            ipv4(v4(20, 0), plain(150_000)),
            PacketClass::Malformed,
            "a length of 0 only from GSO"
        );
        assert_eq!(
            ipv4(v4(20, 0), gso(1500)),
            PacketClass::Malformed,
            "0 only past what the field can say"
        );
        assert_eq!(
            ipv4(v4(16, 0), gso(150_000)),
            PacketClass::Malformed,
            "IHL 4"
        );
        assert_eq!(
            ipv6(0, plain(150_000)),
            PacketClass::Ipv6,
            "an empty payload"
        );
    }

    #[test]
    fn version_must_match_what_the_link_layer_announced() {
        assert_eq!(version(4, None), Ok(4));
        assert_eq!(version(6, None), Ok(6));
        assert_eq!(version(5, None), Err(PacketClass::NotIp));
        assert_eq!(version(4, Some(4)), Ok(4));
        assert_eq!(version(4, Some(6)), Err(PacketClass::Malformed));
        assert_eq!(version(6, Some(4)), Err(PacketClass::Malformed));
        assert_eq!(version(0, Some(4)), Err(PacketClass::Malformed));
    }

    #[test]
    fn a_quoted_packet_must_state_room_for_its_ports() {
        assert_eq!(quoted_payload(false, 20 + 8, 20), Some(8));
        assert_eq!(quoted_payload(false, 24 + 30, 24), Some(30), "options");
        assert_eq!(quoted_payload(false, 16, 20), None, "total below header");
        assert_eq!(quoted_payload(false, 20 + 7, 20), None, "under 8 bytes");
        assert_eq!(
            quoted_payload(true, 8, ipv6::HEADER),
            Some(8),
            "IPv6 states its payload"
        );
        assert_eq!(quoted_payload(true, 7, ipv6::HEADER), None);
    }

    #[test]
    fn a_quoted_udp_length_must_fit_what_the_ip_header_states() {
        assert!(quoted_udp_len(8, 8, false));
        assert!(quoted_udp_len(29, 29, false));
        assert!(!quoted_udp_len(7, 29, false), "below the header");
        assert!(!quoted_udp_len(7, 29, true), "below the header");
        assert!(!quoted_udp_len(30, 29, false), "past the datagram");
        assert!(
            quoted_udp_len(3000, 1472, true),
            "a first fragment's is the datagram's"
        );
    }
}
