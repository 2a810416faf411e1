//! What kind of packet a program is looking at, decided from a few header
//! fields. Pure arithmetic, shared by the TC programs (which read the fields
//! with bounds-checked loads) and host unit tests.

use crate::PacketClass;

/// Length of IPv4's fixed header, and so the least any IP header takes.
pub const IPV4_MIN_HEADER: usize = 20;
/// Length of IPv6's fixed header.
pub const IPV6_HEADER: usize = 40;

/// The fields of an IPv4 header that say whether it is whole.
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Lengths {
    /// Header length in bytes (IHL * 4).
    pub header: usize,
    /// The Total Length field.
    pub total: usize,
}

/// An IPv4 header is whole when its IHL is at least 5 words and the total
/// length it claims covers the header and is not more than what arrived.
/// (Ethernet padding may make `available` larger than `total`.)
pub const fn ipv4(lengths: Ipv4Lengths, available: usize) -> PacketClass {
    if lengths.header < IPV4_MIN_HEADER
        || lengths.total < lengths.header
        || lengths.total > available
    {
        PacketClass::Malformed
    } else {
        PacketClass::Ipv4
    }
}

/// An IPv6 header is whole when the fixed 40 bytes and the payload it claims
/// arrived.
pub const fn ipv6(payload: usize, available: usize) -> PacketClass {
    if IPV6_HEADER + payload > available {
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
        _ if nibble == 4 || nibble == 6 => Ok(nibble),
        _ => Err(PacketClass::NotIp),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn v4(header: usize, total: usize) -> Ipv4Lengths {
        Ipv4Lengths { header, total }
    }

    #[test]
    fn ipv4_header_must_be_whole_and_consistent() {
        assert_eq!(ipv4(v4(20, 60), 60), PacketClass::Ipv4);
        assert_eq!(ipv4(v4(24, 60), 60), PacketClass::Ipv4, "options are fine");
        assert_eq!(
            ipv4(v4(20, 46), 46 + 14),
            PacketClass::Ipv4,
            "Ethernet padding is fine"
        );
        assert_eq!(ipv4(v4(16, 60), 60), PacketClass::Malformed, "IHL 4");
        assert_eq!(
            ipv4(v4(20, 61), 60),
            PacketClass::Malformed,
            "claims more than arrived"
        );
        assert_eq!(
            ipv4(v4(24, 20), 60),
            PacketClass::Malformed,
            "total shorter than header"
        );
    }

    #[test]
    fn ipv6_payload_must_have_arrived() {
        assert_eq!(ipv6(0, 40), PacketClass::Ipv6);
        assert_eq!(ipv6(20, 60), PacketClass::Ipv6);
        assert_eq!(ipv6(21, 60), PacketClass::Malformed);
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
}
