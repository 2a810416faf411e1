//! Bounds-checked packet access and the first parse: which IP family, if any.

use aya_ebpf::programs::TcContext;
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};
use tailguard_common::PacketClass;

/// The one accessor for packet data: a pointer to a `T` at `offset`, or
/// `None` when the packet is too short. The verifier insists on this check
/// before every access. Pointers from here are invalidated by any helper that
/// changes the packet (`bpf_skb_change_*`, `adjust_room`): derive them again.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Classifies the packet. `ethernet` says whether an Ethernet header comes
/// first; on L3 devices the IP version nibble is all there is to go on.
#[inline(always)]
pub fn classify(ctx: &TcContext, ethernet: bool) -> PacketClass {
    // Where the IP header starts, and the version the EtherType announces
    // (0: none, take the nibble's word for it).
    let (l3, announced) = if ethernet {
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return PacketClass::Malformed;
        };
        // SAFETY: `ptr_at` checked that a whole `EthHdr` lies within the packet.
        let ether_type = unsafe { (*eth).ether_type };
        let announced = if ether_type == EtherType::Ipv4 as u16 {
            4
        } else if ether_type == EtherType::Ipv6 as u16 {
            6
        } else {
            return PacketClass::NotIp;
        };
        (EthHdr::LEN, announced)
    } else {
        (0, 0)
    };
    // Every IP header is at least as long as IPv4's fixed part, so checking
    // for that much first also makes the version nibble readable. (A one-byte
    // bounds check would not do: the compiler turns `p + 1 > end` into
    // `p >= end`, which the verifier does not take as proof of one byte.)
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return PacketClass::Malformed;
    };
    // SAFETY: checked by `ptr_at`.
    let version = unsafe { (*ip).version() };
    if announced != 0 && version != announced {
        return PacketClass::Malformed;
    }
    match version {
        4 => ipv4(ctx, l3),
        6 => ipv6(ctx, l3),
        _ => PacketClass::NotIp,
    }
}

/// An IPv4 header is whole when its fixed part fits, its IHL is at least 5
/// words, and the total length it claims is not more than what arrived.
#[inline(always)]
fn ipv4(ctx: &TcContext, l3: usize) -> PacketClass {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return PacketClass::Malformed;
    };
    // SAFETY: checked by `ptr_at`.
    let (ihl, tot_len) = unsafe { ((*ip).ihl(), (*ip).tot_len()) };
    let available = ctx.data_end() - ctx.data() - l3;
    if (ihl as usize) < Ipv4Hdr::LEN
        || (tot_len as usize) < (ihl as usize)
        || tot_len as usize > available
    {
        return PacketClass::Malformed;
    }
    PacketClass::Ipv4
}

/// An IPv6 header is whole when the fixed 40 bytes fit and the payload it
/// claims arrived.
#[inline(always)]
fn ipv6(ctx: &TcContext, l3: usize) -> PacketClass {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return PacketClass::Malformed;
    };
    // SAFETY: checked by `ptr_at`.
    let payload = unsafe { (*ip).payload_len() } as usize;
    let available = ctx.data_end() - ctx.data() - l3;
    if Ipv6Hdr::LEN + payload > available {
        return PacketClass::Malformed;
    }
    PacketClass::Ipv6
}
