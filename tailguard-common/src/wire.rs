//! The wire formats the programs read and write: header lengths, where the
//! fields they touch sit (offsets from the start of their own header), and
//! the numbers they compare with: protocols, ICMP types and codes, flags.
//! As RFC 791 (IPv4), 8200 (IPv6), 9293 (TCP), 768 (UDP), 792 (ICMP) and
//! 4443 (ICMPv6) lay them out; the TC programs check them against
//! network-types' header structs when they are compiled
//! (`tailguard-ebpf/src/parse.rs`).

/// An Ethernet header: destination, source, EtherType.
pub const ETH_HEADER: usize = 14;

/// IP protocol numbers (IPv4's protocol field, IPv6's next header).
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Address families as the kernel numbers them (`bpf_fib_lookup`'s
/// `family`).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// The IP version, from the first byte of any IP header.
pub const fn ip_version(first: u8) -> u8 {
    first >> 4
}

/// The IPv4 header.
pub mod ipv4 {
    pub const VERSION: u8 = 4;
    /// The fixed header, without options (IHL 5).
    pub const HEADER: usize = 20;
    pub const ADDR_LEN: usize = 4;
    pub const TOS: usize = 1;
    pub const TOTAL_LEN: usize = 2;
    pub const ID: usize = 4;
    /// Flags and fragment offset.
    pub const FRAG: usize = 6;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: usize = 10;
    pub const SRC: usize = 12;
    pub const DST: usize = 16;
    /// The first byte of a header without options: version 4, IHL 5.
    pub const VERSION_IHL_PLAIN: u8 = 0x45;
    /// The bits of the flags and fragment offset field (host byte order).
    pub const FLAG_RESERVED: u16 = 0x8000;
    pub const FLAG_DF: u16 = 0x4000;
    pub const FLAG_MF: u16 = 0x2000;
    pub const OFFSET_MASK: u16 = 0x1fff;
    /// Offsets count in units of 8 bytes.
    pub const OFFSET_UNIT: u32 = 8;
    /// The least MTU of an IPv4 link (RFC 791).
    pub const MIN_MTU: u32 = 68;
    /// What an ICMP error is cut to, in all (RFC 1812 4.3.2.3, as the
    /// kernel's `icmp_send` does).
    pub const ERROR_MAX: u32 = 576;

    /// The header's length in bytes, from its first byte (IHL, in 4-byte
    /// words).
    pub const fn header_len(first: u8) -> usize {
        (first & 0x0f) as usize * 4
    }

    /// DF, as the high byte of the flags field (`FRAG`) holds it.
    pub const fn dont_fragment(frag_high_byte: u8) -> bool {
        (frag_high_byte as u16) << 8 & FLAG_DF != 0
    }
}

/// The IPv6 header and its extension headers.
pub mod ipv6 {
    pub const VERSION: u8 = 6;
    pub const HEADER: usize = 40;
    pub const ADDR_LEN: usize = 16;
    pub const PAYLOAD_LEN: usize = 4;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SRC: usize = 8;
    pub const DST: usize = 24;
    /// The first byte of a header of traffic class 0: version 6.
    pub const VERSION_BYTE: u8 = 0x60;
    /// The least MTU of an IPv6 link, and what an ICMPv6 error is cut to
    /// in all (RFC 8200 5, RFC 4443 2.4).
    pub const MIN_MTU: u32 = 1280;

    /// Extension headers, by their next-header number.
    pub const HOP_BY_HOP: u8 = 0;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const DEST_OPTS: u8 = 60;
    /// The fragment header's length; the least of any extension header.
    pub const FRAGMENT_HEADER: usize = 8;
    /// In every extension header: its own next header, its length.
    pub const EXT_NEXT: usize = 0;
    pub const EXT_LEN: usize = 1;
    /// In a routing header: segments left.
    pub const ROUTING_SEGMENTS_LEFT: usize = 3;
    /// In a fragment header: offset and flags, identification.
    pub const FRAGMENT_OFFSET: usize = 2;
    pub const FRAGMENT_ID: usize = 4;
    /// The fragment header's offset-and-flags word (host byte order): the
    /// offset in its top 13 bits, M ("more fragments") the lowest.
    pub const FRAGMENT_MORE: u16 = 1;
    pub const FRAGMENT_OFFSET_SHIFT: u16 = 3;

    /// An extension header's length in bytes, from its length field (in
    /// units of 8 bytes, not counting the first 8).
    pub const fn ext_header_len(len_field: u8) -> usize {
        (len_field as usize + 1) * 8
    }
}

/// The TCP header.
pub mod tcp {
    /// Without options.
    pub const HEADER: usize = 20;
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    /// Data offset (the header's length) in the high nibble.
    pub const DATA_OFFSET: usize = 12;
    pub const FLAGS: usize = 13;
    pub const CHECKSUM: usize = 16;
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
    /// Options: the most there can be, and the kinds the MSS clamp reads.
    pub const MAX_OPTIONS: usize = 40;
    pub const OPTION_END: u8 = 0;
    pub const OPTION_NOP: u8 = 1;
    pub const OPTION_MSS: u8 = 2;
    pub const OPTION_MSS_LEN: u8 = 4;
    /// In an option: kind, length, value.
    pub const OPTION_LEN: usize = 1;
    pub const OPTION_VALUE: usize = 2;

    /// The header's length in bytes, from its `DATA_OFFSET` byte.
    pub const fn header_len(data_offset: u8) -> usize {
        (data_offset >> 4) as usize * 4
    }
}

/// The UDP header.
pub mod udp {
    pub const HEADER: usize = 8;
    pub const SRC_PORT: usize = 0;
    pub const DST_PORT: usize = 2;
    pub const LEN: usize = 4;
    pub const CHECKSUM: usize = 6;
}

/// The ICMP header, and ICMPv4's types and codes. ICMPv6's header is laid
/// out the same (its types are in [`icmpv6`]).
pub mod icmp {
    /// Type, code, checksum and the 4 bytes each type uses its own way.
    pub const HEADER: usize = 8;
    pub const TYPE: usize = 0;
    pub const CODE: usize = 1;
    pub const CHECKSUM: usize = 2;
    /// An echo's identifier.
    pub const ECHO_ID: usize = 4;
    /// "Fragmentation needed"'s next-hop MTU (16 bits).
    pub const NEXT_HOP_MTU: usize = 6;
    /// ICMPv6 "packet too big"'s MTU (32 bits).
    pub const V6_MTU: usize = 4;

    pub const ECHO_REPLY: u8 = 0;
    pub const DEST_UNREACHABLE: u8 = 3;
    /// The code of `DEST_UNREACHABLE` that says "fragmentation needed and
    /// DF set".
    pub const FRAGMENTATION_NEEDED: u8 = 4;
    pub const ECHO_REQUEST: u8 = 8;
    pub const TIME_EXCEEDED: u8 = 11;
    pub const PARAMETER_PROBLEM: u8 = 12;
}

/// ICMPv6's types (its header is [`icmp`]'s).
pub mod icmpv6 {
    pub const DEST_UNREACHABLE: u8 = 1;
    pub const PACKET_TOO_BIG: u8 = 2;
    pub const TIME_EXCEEDED: u8 = 3;
    pub const PARAMETER_PROBLEM: u8 = 4;
    pub const ECHO_REQUEST: u8 = 128;
    pub const ECHO_REPLY: u8 = 129;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_come_from_their_fields() {
        assert_eq!(ip_version(0x45), ipv4::VERSION);
        assert_eq!(ip_version(ipv6::VERSION_BYTE), ipv6::VERSION);
        assert_eq!(ipv4::header_len(ipv4::VERSION_IHL_PLAIN), ipv4::HEADER);
        assert_eq!(ipv4::header_len(0x4f), 60, "IHL 15: the most options");
        assert_eq!(tcp::header_len(0x50), tcp::HEADER);
        assert_eq!(tcp::header_len(0xf0), tcp::HEADER + tcp::MAX_OPTIONS);
        assert_eq!(ipv6::ext_header_len(0), ipv6::FRAGMENT_HEADER);
        assert_eq!(ipv6::ext_header_len(2), 24);
    }

    #[test]
    fn dont_fragment_is_read_from_the_flags_byte() {
        assert!(ipv4::dont_fragment(0x40));
        assert!(ipv4::dont_fragment(0x5f), "with an offset's high bits");
        assert!(!ipv4::dont_fragment(0x20), "MF alone");
        assert!(!ipv4::dont_fragment(0x80), "the reserved bit alone");
    }
}
