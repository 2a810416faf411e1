//! Rewriting a packet in place: addresses, ports (or the echo identifier),
//! the TTL, the TCP MSS, each with its checksums updated incrementally by
//! the kernel's helpers.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use tailguard_common::{
    fragment::Fragment,
    nat::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, mss_for},
};

use crate::{
    icmp::IcmpError,
    packet::{Packet, TCP_SYN},
};

/// A helper refused: the packet can no longer be trusted and is dropped.
pub struct Failed;

type Result = core::result::Result<(), Failed>;

fn ok(r: core::result::Result<(), i64>) -> Result {
    r.map_err(|_| Failed)
}

/// Where the transport checksum sits, and whether it covers the addresses
/// (everything but ICMPv4 includes the pseudo header). A later fragment has
/// none: the datagram's checksum is in the first fragment, which had it
/// updated for the whole datagram.
fn l4_checksum(p: &Packet) -> (usize, u64) {
    if p.part == Fragment::Later {
        return (p.l4, 0);
    }
    match p.proto {
        IPPROTO_TCP => (p.l4 + 16, u64::from(BPF_F_PSEUDO_HDR)),
        // A zero UDP checksum over IPv4 means "none": keep it zero.
        IPPROTO_UDP => (p.l4 + 6, u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0)),
        IPPROTO_ICMP => (p.l4 + 2, 0),
        _ => (p.l4 + 2, u64::from(BPF_F_PSEUDO_HDR)),
    }
}

/// The checksum difference of replacing `old` by `new` (the first `n`
/// bytes: 4 or 16).
#[inline(always)]
fn addr_diff(old: &[u8; 16], new: &[u8; 16], n: usize) -> core::result::Result<u64, Failed> {
    let mut from = [0u32; 4];
    let mut to = [0u32; 4];
    for i in 0..4 {
        from[i] = u32::from_ne_bytes([old[4 * i], old[4 * i + 1], old[4 * i + 2], old[4 * i + 3]]);
        to[i] = u32::from_ne_bytes([new[4 * i], new[4 * i + 1], new[4 * i + 2], new[4 * i + 3]]);
    }
    // SAFETY: both buffers are on our stack and `n` bytes long (4 or 16).
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), n as u32, to.as_mut_ptr(), n as u32, 0) };
    if diff < 0 {
        Err(Failed)
    } else {
        Ok(diff as u64)
    }
}

/// Where an IP header starting at `l3` keeps its source or destination.
fn addr_offset(l3: usize, ipv6: bool, source: bool) -> usize {
    match (ipv6, source) {
        (false, true) => l3 + 12,
        (false, false) => l3 + 16,
        (true, true) => l3 + 8,
        (true, false) => l3 + 24,
    }
}

/// Writes `new` over the address at `offset` (4 or 16 bytes).
#[inline(always)]
fn store_addr(ctx: &TcContext, offset: usize, ipv6: bool, new: &[u8; 16]) -> Result {
    if ipv6 {
        ok(ctx.store(offset, new, 0))
    } else {
        ok(ctx.store(offset, &[new[0], new[1], new[2], new[3]], 0))
    }
}

/// Replaces an address of the IP header at `l3`, updating the IPv4 header
/// checksum and, at `l4_sum` with `l4_flags`, the transport checksum when
/// it covers the address (`BPF_F_PSEUDO_HDR` in the flags).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn replace_addr(
    ctx: &TcContext,
    l3: usize,
    ipv6: bool,
    source: bool,
    old: &[u8; 16],
    new: &[u8; 16],
    l4_sum: usize,
    l4_flags: u64,
) -> Result {
    let diff = addr_diff(old, new, if ipv6 { 16 } else { 4 })?;
    if l4_flags & u64::from(BPF_F_PSEUDO_HDR) != 0 {
        ok(ctx.l4_csum_replace(l4_sum, 0, diff, l4_flags))?;
    }
    if !ipv6 {
        ok(ctx.l3_csum_replace(l3 + 10, 0, diff, 0))?;
    }
    store_addr(ctx, addr_offset(l3, ipv6, source), ipv6, new)
}

/// Replaces the source (`source` true) or destination address.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, p: &mut Packet, source: bool, new: &[u8; 16]) -> Result {
    let old = if source { p.src } else { p.dst };
    if old == *new {
        return Ok(());
    }
    let (l4_sum, l4_flags) = l4_checksum(p);
    replace_addr(ctx, p.l3, p.ipv6, source, &old, new, l4_sum, l4_flags)?;
    if source {
        p.src = *new;
    } else {
        p.dst = *new;
    }
    Ok(())
}

/// Replaces an address of an ICMP error's outer header (ICMPv6's checksum
/// covers it through the pseudo header, ICMPv4's does not).
#[inline(always)]
pub fn set_outer_addr(ctx: &TcContext, e: &mut IcmpError, source: bool, new: &[u8; 16]) -> Result {
    let old = if source { e.src } else { e.dst };
    if old == *new {
        return Ok(());
    }
    let flags = if e.ipv6 {
        u64::from(BPF_F_PSEUDO_HDR)
    } else {
        0
    };
    replace_addr(ctx, e.l3, e.ipv6, source, &old, new, e.l4 + 2, flags)?;
    if source {
        e.src = *new;
    } else {
        e.dst = *new;
    }
    Ok(())
}

/// Replaces an address of the packet an ICMP error quotes (its IP header at
/// `inner_l3`; the ICMP checksum at `icmp_sum`). For IPv4 the quoted header
/// checksum is updated with it, which leaves the ICMP checksum's sum over
/// that header unchanged; ICMPv6 checksums the address itself.
#[inline(always)]
pub fn set_quoted_addr(
    ctx: &TcContext,
    icmp_sum: usize,
    inner_l3: usize,
    ipv6: bool,
    source: bool,
    old: &[u8; 16],
    new: &[u8; 16],
) -> Result {
    if old == new {
        return Ok(());
    }
    let diff = addr_diff(old, new, if ipv6 { 16 } else { 4 })?;
    if ipv6 {
        ok(ctx.l4_csum_replace(icmp_sum, 0, diff, 0))?;
    } else {
        ok(ctx.l3_csum_replace(inner_l3 + 10, 0, diff, 0))?;
    }
    store_addr(ctx, addr_offset(inner_l3, ipv6, source), ipv6, new)
}

/// Replaces a port (or echo identifier) of the quoted packet at `offset`.
#[inline(always)]
pub fn set_quoted_port(
    ctx: &TcContext,
    icmp_sum: usize,
    offset: usize,
    old: u16,
    new: u16,
) -> Result {
    if old == new {
        return Ok(());
    }
    ok(ctx.l4_csum_replace(icmp_sum, u64::from(old), u64::from(new), 2))?;
    ok(ctx.store(offset, &new, 0))
}

/// One's-complement addition, as checksums add.
fn csum_add(sum: u32, add: u32) -> u32 {
    let (s, carry) = sum.overflowing_add(add);
    s + u32::from(carry)
}

/// Adds the change of one 16-bit word from `from` to `to`.
fn csum_replace(sum: u32, from: u16, to: u16) -> u32 {
    csum_add(csum_add(sum, u32::from(!from)), u32::from(to))
}

fn csum_fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// Keeps the checksum of the packet an ICMP error quotes consistent with
/// the quote's new addresses and ports (the flow's reply `entry`, as
/// `icmp::rewrite_error` writes them), as the kernel's NAT does for the
/// packets it translates in errors: the quoted TCP/UDP checksum covers the
/// addresses (its pseudo header) and ports, a quoted echo request's its
/// identifier (and for ICMPv6 the addresses). The ICMP checksum then
/// accounts for the changed checksum field. Call before the quote changes.
#[inline(always)]
pub fn set_quoted_l4_checksum(
    ctx: &TcContext,
    e: &IcmpError,
    entry: &tailguard_common::nat::NatEntry,
) -> Result {
    if e.inner_csum == 0 {
        return Ok(());
    }
    let old: u16 = ctx.load(e.inner_csum).map_err(|_| Failed)?;
    let mut sum = u32::from(!old);
    // In software, 16 bits at a time: the helper's buffers would not fit
    // the stack next to the error's fields.
    if e.inner_proto != IPPROTO_ICMP {
        let n = if e.ipv6 { 16 } else { 4 };
        for i in 0..8 {
            if 2 * i < n {
                let word = |a: &[u8; 16]| u16::from_ne_bytes([a[2 * i], a[2 * i + 1]]);
                sum = csum_replace(sum, word(&e.inner_src), word(&entry.dst));
                sum = csum_replace(sum, word(&e.inner_dst), word(&entry.src));
            }
        }
    }
    if e.inner_proto == IPPROTO_TCP || e.inner_proto == IPPROTO_UDP {
        sum = csum_replace(sum, e.inner_sport, entry.dport);
        sum = csum_replace(sum, e.inner_dport, entry.sport);
    } else {
        sum = csum_replace(sum, e.inner_sport, entry.sport);
    }
    let mut new = !csum_fold(sum);
    // A zero UDP checksum would mean "none": the kernel writes its
    // equivalent, all ones.
    if new == 0 && e.inner_proto == IPPROTO_UDP {
        new = 0xffff;
    }
    if new == old {
        return Ok(());
    }
    ok(ctx.l4_csum_replace(e.l4 + 2, u64::from(old), u64::from(new), 2))?;
    ok(ctx.store(e.inner_csum, &new, 0))
}

/// Replaces the source (`source` true) or destination port; for ICMP echo
/// the identifier (`source` true).
#[inline(always)]
pub fn set_port(ctx: &TcContext, p: &mut Packet, source: bool, new: u16) -> Result {
    let old = if source { p.sport } else { p.dport };
    if old == new {
        return Ok(());
    }
    if p.part == Fragment::Later {
        // Its ports are in the first fragment.
        if source {
            p.sport = new;
        } else {
            p.dport = new;
        }
        return Ok(());
    }
    let offset = if p.is_icmp() {
        p.l4 + 4
    } else if source {
        p.l4
    } else {
        p.l4 + 2
    };
    let (l4_sum, l4_flags) = l4_checksum(p);
    let flags = (l4_flags & u64::from(BPF_F_MARK_MANGLED_0)) | 2;
    ok(ctx.l4_csum_replace(l4_sum, u64::from(old), u64::from(new), flags))?;
    ok(ctx.store(offset, &new, 0))?;
    if source {
        p.sport = new;
    } else {
        p.dport = new;
    }
    Ok(())
}

/// Takes one from the TTL / hop limit (the caller has checked it is > 1).
#[inline(always)]
pub fn decrement_ttl(ctx: &TcContext, p: &mut Packet) -> Result {
    decrement_ttl_at(ctx, p.l3, p.ipv6, p.ttl, p.proto)?;
    p.ttl -= 1;
    Ok(())
}

/// Takes one from the TTL / hop limit `ttl` of the IP header at `l3`.
#[inline(always)]
pub fn decrement_ttl_at(ctx: &TcContext, l3: usize, ipv6: bool, ttl: u8, proto: u8) -> Result {
    let new_ttl = ttl - 1;
    if ipv6 {
        ok(ctx.store(l3 + 7, &new_ttl, 0))
    } else {
        // The checksum covers TTL and protocol as one 16-bit word.
        let old = u16::from_be_bytes([ttl, proto]).to_be();
        let new = u16::from_be_bytes([new_ttl, proto]).to_be();
        ok(ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 2))?;
        ok(ctx.store(l3 + 8, &new_ttl, 0))
    }
}

/// Lowers the MSS option of a SYN (or SYN-ACK) so segments fit `mtu`.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, p: &Packet, mtu: u32) -> Result {
    if p.proto != IPPROTO_TCP || p.tcp_flags & TCP_SYN == 0 {
        return Ok(());
    }
    let limit = mss_for(mtu, p.ipv6);
    let Ok(offset_byte) = ctx.load::<u8>(p.l4 + 12) else {
        return Ok(());
    };
    let header = usize::from(offset_byte >> 4) * 4;
    let mut at = p.l4 + 20;
    let end = p.l4 + header;
    // Options are at most 40 bytes; each step consumes at least one.
    for _ in 0..10 {
        if at >= end {
            break;
        }
        let Ok(kind) = ctx.load::<u8>(at) else { break };
        match kind {
            0 => break,
            1 => at += 1,
            _ => {
                let Ok(len) = ctx.load::<u8>(at + 1) else {
                    break;
                };
                if kind == 2 && len == 4 {
                    let Ok(mss) = ctx.load::<u16>(at + 2) else {
                        break;
                    };
                    if u16::from_be(mss) > limit {
                        let new = limit.to_be();
                        ok(ctx.l4_csum_replace(p.l4 + 16, u64::from(mss), u64::from(new), 2))?;
                        ok(ctx.store(at + 2, &new, 0))?;
                    }
                    break;
                }
                if len < 2 {
                    break;
                }
                at += usize::from(len);
            }
        }
    }
    Ok(())
}

/// Clears DF on an IPv4 fragment, as the kernel's path sends fragments: it
/// reassembles what it forwards and fragments it anew, and never sets DF
/// on a fragment it makes.
#[inline(always)]
pub fn clear_df_of_fragment(ctx: &TcContext, p: &Packet) -> Result {
    if p.ipv6 || p.part == Fragment::Whole {
        return Ok(());
    }
    let old: u16 = ctx.load(p.l3 + 6).map_err(|_| Failed)?;
    let new = old & !0x4000u16.to_be();
    if new == old {
        return Ok(());
    }
    ok(ctx.l3_csum_replace(p.l3 + 10, u64::from(old), u64::from(new), 2))?;
    ok(ctx.store(p.l3 + 6, &new, 0))
}
