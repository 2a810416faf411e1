//! Bounds-checked packet access and the first parse: which IP family, if any.

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use core::mem::offset_of;

use network_types::{
    eth::{EthHdr, EtherType},
    icmp::Icmpv4Hdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use tailguard_common::{
    PacketClass,
    classify::{self, Arrived},
    fragment::IPV6_MAX_EXT_HEADERS,
    wire::{self, icmp, ipv4, ipv6, tcp, udp},
};

// The wire constants the programs read and write by are network-types'
// header layouts.
const _: () = {
    assert!(wire::ETH_HEADER == EthHdr::LEN);
    assert!(ipv4::HEADER == Ipv4Hdr::LEN);
    assert!(ipv4::TOS == offset_of!(Ipv4Hdr, tos));
    assert!(ipv4::TOTAL_LEN == offset_of!(Ipv4Hdr, tot_len));
    assert!(ipv4::ID == offset_of!(Ipv4Hdr, id));
    assert!(ipv4::FRAG == offset_of!(Ipv4Hdr, frags));
    assert!(ipv4::TTL == offset_of!(Ipv4Hdr, ttl));
    assert!(ipv4::PROTOCOL == offset_of!(Ipv4Hdr, proto));
    assert!(ipv4::CHECKSUM == offset_of!(Ipv4Hdr, check));
    assert!(ipv4::SRC == offset_of!(Ipv4Hdr, src_addr));
    assert!(ipv4::DST == offset_of!(Ipv4Hdr, dst_addr));
    assert!(ipv6::HEADER == Ipv6Hdr::LEN);
    assert!(ipv6::PAYLOAD_LEN == offset_of!(Ipv6Hdr, payload_len));
    assert!(ipv6::NEXT_HEADER == offset_of!(Ipv6Hdr, next_hdr));
    assert!(ipv6::HOP_LIMIT == offset_of!(Ipv6Hdr, hop_limit));
    assert!(ipv6::SRC == offset_of!(Ipv6Hdr, src_addr));
    assert!(ipv6::DST == offset_of!(Ipv6Hdr, dst_addr));
    assert!(tcp::HEADER == TcpHdr::LEN);
    assert!(tcp::SRC_PORT == offset_of!(TcpHdr, source));
    assert!(tcp::DST_PORT == offset_of!(TcpHdr, dest));
    assert!(tcp::CHECKSUM == offset_of!(TcpHdr, check));
    assert!(udp::HEADER == UdpHdr::LEN);
    assert!(udp::SRC_PORT == offset_of!(UdpHdr, src));
    assert!(udp::DST_PORT == offset_of!(UdpHdr, dst));
    assert!(udp::LEN == offset_of!(UdpHdr, len));
    assert!(udp::CHECKSUM == offset_of!(UdpHdr, check));
    assert!(icmp::HEADER == Icmpv4Hdr::LEN);
    assert!(icmp::TYPE == offset_of!(Icmpv4Hdr, type_));
    assert!(icmp::CODE == offset_of!(Icmpv4Hdr, code));
    assert!(icmp::CHECKSUM == offset_of!(Icmpv4Hdr, check));
};

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

/// Every offset the programs read or write at is below this: the deepest
/// header is behind the longest IPv6 chain they walk (extension headers
/// are at most 2 KiB each). The verifier marks a checked packet pointer
/// readable only if its largest possible offset stays below 64 KiB.
const OFFSET_MASK: usize = 0x7fff;
const _: () = assert!(
    wire::ETH_HEADER + ipv6::HEADER + (IPV6_MAX_EXT_HEADERS + 1) * 2048 + 64 <= OFFSET_MASK
);

/// A `T` read at `offset`, straight from the packet (no helper call). `T`
/// is at least two bytes: see `classify` on one-byte reads.
#[inline(always)]
pub fn read<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = at_mut::<T>(ctx, offset)?;
    // SAFETY: `at_mut` checked that a whole `T` lies within the packet;
    // packet data has no alignment to rely on.
    Some(unsafe { core::ptr::read_unaligned(at) })
}

/// Where a `T` at `offset` sits in the packet, to read or write in place.
/// When the packet's linear part (all that programs can point into) is too
/// short, as for a GSO or GRO packet whose rest is in pages, the bytes up
/// to the end of `T` are pulled into it first, and only then. `None` past
/// the packet's end. Valid until a helper that may move the packet's data.
#[inline(always)]
pub fn at_mut<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    // Bounded for the verifier, also once the compiler has spilled the
    // offset to the stack and loaded it back (offsets kept in map memory
    // come back to it unbounded, and 6.1's does not carry a later check over
    // to a reloaded copy). The mask changes no offset the programs read at.
    let offset = offset & OFFSET_MASK;
    if let Some(at) = ptr_at::<T>(ctx, offset) {
        return Some(at as *mut T);
    }
    let want = (offset + core::mem::size_of::<T>()) as u32;
    if want > ctx.len() {
        return None;
    }
    // Moves bytes into the linear part; every packet pointer is invalid
    // after it, so the one returned is derived again.
    ctx.pull_data(want).ok()?;
    ptr_at::<T>(ctx, offset).map(|at| at as *mut T)
}

/// Classifies the packet. `ethernet` says whether an Ethernet header comes
/// first. The decisions are in `tailguard_common::classify` (host-tested);
/// this reads the fields they need.
#[inline(always)]
pub fn classify(ctx: &TcContext, ethernet: bool) -> PacketClass {
    // Where the IP header starts, and the version the EtherType announces.
    let (l3, announced) = if ethernet {
        let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
            return PacketClass::Malformed;
        };
        // SAFETY: `ptr_at` checked that a whole `EthHdr` lies within the packet.
        let ether_type = unsafe { (*eth).ether_type };
        let announced = if ether_type == EtherType::Ipv4 as u16 {
            ipv4::VERSION
        } else if ether_type == EtherType::Ipv6 as u16 {
            ipv6::VERSION
        } else {
            return PacketClass::NotIp;
        };
        (wire::ETH_HEADER, Some(announced))
    } else {
        (0, None)
    };
    // Every IP header is at least as long as IPv4's fixed part, so checking
    // for that much first also makes the version nibble readable. (A one-byte
    // bounds check would not do: the compiler turns `p + 1 > end` into
    // `p >= end`, which the verifier does not take as proof of one byte.)
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return PacketClass::Malformed;
    };
    // The whole packet, as `skb->len` counts it: a GRO or GSO packet's
    // linear head (what `data_end` bounds) is only part of it.
    // SAFETY: the context points at the kernel's `__sk_buff` for this run.
    let gso = unsafe { (*(ctx.as_ptr() as *const __sk_buff)).gso_size } != 0;
    let arrived = Arrived {
        len: (ctx.len() as usize).saturating_sub(l3),
        gso,
    };
    // SAFETY: checked by `ptr_at`.
    match classify::version(unsafe { (*ip).version() }, announced) {
        Ok(ipv4::VERSION) => {
            // SAFETY: checked by `ptr_at`.
            let (header, total) = unsafe { ((*ip).ihl() as usize, (*ip).tot_len() as usize) };
            classify::ipv4(classify::Ipv4Lengths { header, total }, arrived)
        }
        Ok(_) => match ptr_at::<Ipv6Hdr>(ctx, l3) {
            // SAFETY: checked by `ptr_at`.
            Some(ip6) => classify::ipv6(unsafe { (*ip6).payload_len() } as usize, arrived),
            None => PacketClass::Malformed,
        },
        Err(class) => class,
    }
}

/// `value` if it is at least 1, in a way every verifier this runs on can
/// follow: 6.1's learns no lower bound from `value != 0` (which is what
/// the compiler turns `value >= 1` into), only from a signed comparison,
/// and the compiler keeps that one only for a value it knows nothing
/// about (the empty `asm!` hides it; it costs no instruction).
#[inline(always)]
pub fn at_least_one(mut value: u32) -> Option<u32> {
    // SAFETY: an empty template: the register is left as it is.
    unsafe { core::arch::asm!("/* {0} */", inout(reg) value) };
    if (value as i32) < 1 {
        None
    } else {
        Some(value)
    }
}
