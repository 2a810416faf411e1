//! Rewriting a packet in place: addresses, ports (or the echo identifier),
//! the TTL, the TCP MSS, each with its checksums updated incrementally
//! (`tailguard_common::checksum`). A flow's packets are rewritten directly,
//! with the transport checksum left to the kernel's helper, which alone
//! knows how the packet keeps it (`translate_headers`); the rarer rewrites
//! (ICMP errors, the MSS, fragments) go through the helpers throughout.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use tailguard_common::{
    checksum,
    fragment::Fragment,
    nat::{Translation, mss_for},
    wire::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, icmp, ipv4, ipv6, tcp, udp},
};

use crate::{icmp::IcmpError, packet::Packet, parse};

/// The low bits of the checksum helpers' flags: the size of the field
/// replaced (a port, the TTL and protocol word, a flags word).
pub const FIELD_16_BITS: u64 = 2;
const _: () = assert!(tcp::SRC_PORT == udp::SRC_PORT && tcp::DST_PORT == udp::DST_PORT);

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
        IPPROTO_TCP => (p.l4 + tcp::CHECKSUM, u64::from(BPF_F_PSEUDO_HDR)),
        // A zero UDP checksum over IPv4 means "none": keep it zero.
        IPPROTO_UDP => (
            p.l4 + udp::CHECKSUM,
            u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0),
        ),
        IPPROTO_ICMP => (p.l4 + icmp::CHECKSUM, 0),
        _ => (p.l4 + icmp::CHECKSUM, u64::from(BPF_F_PSEUDO_HDR)),
    }
}

/// An address's length in the family.
fn addr_len(ipv6: bool) -> usize {
    if ipv6 { ipv6::ADDR_LEN } else { ipv4::ADDR_LEN }
}

/// Where an IP header starting at `l3` keeps its source or destination.
fn addr_offset(l3: usize, ipv6: bool, source: bool) -> usize {
    match (ipv6, source) {
        (false, true) => l3 + ipv4::SRC,
        (false, false) => l3 + ipv4::DST,
        (true, true) => l3 + ipv6::SRC,
        (true, false) => l3 + ipv6::DST,
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
    let diff = u64::from(checksum::replace_addr(0, old, new, addr_len(ipv6)));
    if l4_flags & u64::from(BPF_F_PSEUDO_HDR) != 0 {
        ok(ctx.l4_csum_replace(l4_sum, 0, diff, l4_flags))?;
    }
    if !ipv6 {
        ok(ctx.l3_csum_replace(l3 + ipv4::CHECKSUM, 0, diff, 0))?;
    }
    store_addr(ctx, addr_offset(l3, ipv6, source), ipv6, new)
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
    replace_addr(
        ctx,
        e.l3,
        e.ipv6,
        source,
        &old,
        new,
        e.l4 + icmp::CHECKSUM,
        flags,
    )?;
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
    let diff = u64::from(checksum::replace_addr(0, old, new, addr_len(ipv6)));
    if ipv6 {
        ok(ctx.l4_csum_replace(icmp_sum, 0, diff, 0))?;
    } else {
        ok(ctx.l3_csum_replace(inner_l3 + ipv4::CHECKSUM, 0, diff, 0))?;
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
    ok(ctx.l4_csum_replace(icmp_sum, u64::from(old), u64::from(new), FIELD_16_BITS))?;
    ok(ctx.store(offset, &new, 0))
}

/// Keeps the checksum of the packet an ICMP error quotes consistent with
/// the quote's new addresses and ports (the flow's reply `entry`, as
/// `icmp::rewrite_error` writes them), as the kernel's NAT does for the
/// packets it translates in errors: the quoted TCP/UDP checksum covers the
/// addresses (its pseudo header) and ports, a quoted echo request's its
/// identifier (and for ICMPv6 the addresses). The ICMP checksum then
/// accounts for the changed checksum field. Call before the quote changes.
#[inline(always)]
pub fn set_quoted_l4_checksum(ctx: &TcContext, e: &IcmpError, entry: &Translation) -> Result {
    if e.inner_csum == 0 {
        return Ok(());
    }
    let old: u16 = ctx.load(e.inner_csum).map_err(|_| Failed)?;
    let mut sum = u32::from(!old);
    if e.inner_proto != IPPROTO_ICMP {
        let n = addr_len(e.ipv6);
        sum = checksum::replace_addr(sum, &e.inner_src, &entry.dst, n);
        sum = checksum::replace_addr(sum, &e.inner_dst, &entry.src, n);
    }
    if e.inner_proto == IPPROTO_TCP || e.inner_proto == IPPROTO_UDP {
        sum = checksum::replace16(sum, e.inner_sport, entry.dport);
        sum = checksum::replace16(sum, e.inner_dport, entry.sport);
    } else {
        sum = checksum::replace16(sum, e.inner_sport, entry.sport);
    }
    let mut new = !checksum::fold(sum);
    // A zero UDP checksum would mean "none": the kernel writes its
    // equivalent, all ones.
    if new == 0 && e.inner_proto == IPPROTO_UDP {
        new = 0xffff;
    }
    if new == old {
        return Ok(());
    }
    ok(ctx.l4_csum_replace(
        e.l4 + icmp::CHECKSUM,
        u64::from(old),
        u64::from(new),
        FIELD_16_BITS,
    ))?;
    ok(ctx.store(e.inner_csum, &new, 0))
}

/// Rewrites a packet of a flow as `entry` says, in place: both addresses,
/// both ports (or the echo identifier), one off the TTL / hop limit (the
/// caller has checked it is > 1). The IP header is written directly and its
/// IPv4 checksum computed here. The transport checksum goes through the
/// kernel's helper, which knows how the packet's checksum is kept (a
/// CHECKSUM_PARTIAL packet from a TUN device holds only the pseudo
/// header's sum there): one call for the addresses, which the pseudo
/// header covers, one for the ports, and only for what changed.
#[inline(always)]
pub fn translate_headers(ctx: &TcContext, p: &mut Packet, entry: &Translation) -> Result {
    let len = addr_len(p.ipv6);
    let src_changed = p.src != entry.src;
    let dst_changed = p.dst != entry.dst;
    let addresses = checksum::replace_addr(
        checksum::replace_addr(0, &p.src, &entry.src, len),
        &p.dst,
        &entry.dst,
        len,
    );
    let new_ttl = p.ttl - 1;
    if p.ipv6 {
        let h = parse::at_mut::<[u8; ipv6::HEADER]>(ctx, p.l3).ok_or(Failed)?;
        // SAFETY: `at_mut` checked that the whole header lies within the
        // packet; nothing else points into it while this runs.
        let h = unsafe { &mut *h };
        h[ipv6::HOP_LIMIT] = new_ttl;
        h[ipv6::SRC..][..ipv6::ADDR_LEN].copy_from_slice(&entry.src);
        h[ipv6::DST..][..ipv6::ADDR_LEN].copy_from_slice(&entry.dst);
    } else {
        let h = parse::at_mut::<[u8; ipv4::HEADER]>(ctx, p.l3).ok_or(Failed)?;
        // SAFETY: as above.
        let h = unsafe { &mut *h };
        let field = u16::from_ne_bytes([h[ipv4::CHECKSUM], h[ipv4::CHECKSUM + 1]]);
        // The checksum covers TTL and protocol as one 16-bit word.
        let ttl_word = |ttl: u8| u16::from_ne_bytes([ttl, p.proto]);
        let diff = checksum::replace16(addresses, ttl_word(p.ttl), ttl_word(new_ttl));
        h[ipv4::CHECKSUM..][..2].copy_from_slice(&checksum::updated(field, diff).to_ne_bytes());
        h[ipv4::TTL] = new_ttl;
        h[ipv4::SRC..][..ipv4::ADDR_LEN].copy_from_slice(&entry.src[..ipv4::ADDR_LEN]);
        h[ipv4::DST..][..ipv4::ADDR_LEN].copy_from_slice(&entry.dst[..ipv4::ADDR_LEN]);
    }
    p.ttl = new_ttl;
    p.src = entry.src;
    p.dst = entry.dst;
    // ICMP echo: the identifier only; TCP's and UDP's ports sit alike.
    let icmp = p.is_icmp();
    let dport = if icmp { p.dport } else { entry.dport };
    let ports = checksum::replace16(checksum::replace16(0, p.sport, entry.sport), p.dport, dport);
    let ports_changed = p.sport != entry.sport || p.dport != dport;
    p.sport = entry.sport;
    p.dport = dport;
    if p.part == Fragment::Later {
        // Its ports and transport checksum are in the first fragment.
        return Ok(());
    }
    if ports_changed {
        if icmp {
            let id = parse::at_mut::<[u8; 2]>(ctx, p.l4 + icmp::ECHO_ID).ok_or(Failed)?;
            // SAFETY: checked by `at_mut`.
            unsafe { *id = p.sport.to_ne_bytes() };
        } else {
            let h = parse::at_mut::<[u8; 4]>(ctx, p.l4 + udp::SRC_PORT).ok_or(Failed)?;
            let (s, d) = (p.sport.to_ne_bytes(), p.dport.to_ne_bytes());
            // SAFETY: checked by `at_mut`.
            unsafe { *h = [s[0], s[1], d[0], d[1]] };
        }
    }
    // The helpers last: they may move the packet's data, which makes every
    // pointer into it invalid.
    let (l4_sum, l4_flags) = l4_checksum(p);
    if (src_changed || dst_changed) && l4_flags & u64::from(BPF_F_PSEUDO_HDR) != 0 {
        ok(ctx.l4_csum_replace(l4_sum, 0, u64::from(addresses), l4_flags))?;
    }
    if ports_changed {
        let flags = l4_flags & u64::from(BPF_F_MARK_MANGLED_0);
        ok(ctx.l4_csum_replace(l4_sum, 0, u64::from(ports), flags))?;
    }
    Ok(())
}

/// Takes one from the TTL / hop limit `ttl` of the IP header at `l3`.
#[inline(always)]
pub fn decrement_ttl_at(ctx: &TcContext, l3: usize, ipv6: bool, ttl: u8, proto: u8) -> Result {
    let new_ttl = ttl - 1;
    if ipv6 {
        ok(ctx.store(l3 + ipv6::HOP_LIMIT, &new_ttl, 0))
    } else {
        // The checksum covers TTL and protocol as one 16-bit word.
        let old = u16::from_be_bytes([ttl, proto]).to_be();
        let new = u16::from_be_bytes([new_ttl, proto]).to_be();
        ok(ctx.l3_csum_replace(
            l3 + ipv4::CHECKSUM,
            u64::from(old),
            u64::from(new),
            FIELD_16_BITS,
        ))?;
        ok(ctx.store(l3 + ipv4::TTL, &new_ttl, 0))
    }
}

/// How many TCP options the MSS clamp reads before it gives up.
const MSS_OPTION_STEPS: usize = 10;

/// Lowers the MSS option of a SYN (or SYN-ACK) so segments fit `mtu`.
#[inline(always)]
pub fn clamp_mss(ctx: &TcContext, p: &Packet, mtu: u32) -> Result {
    if p.proto != IPPROTO_TCP || p.tcp_flags & tcp::SYN == 0 {
        return Ok(());
    }
    let limit = mss_for(mtu, p.ipv6);
    let Ok(offset_byte) = ctx.load::<u8>(p.l4 + tcp::DATA_OFFSET) else {
        return Ok(());
    };
    let mut at = p.l4 + tcp::HEADER;
    let end = p.l4 + tcp::header_len(offset_byte);
    // Options are at most 40 bytes; each step consumes at least one. (The
    // MSS option comes first in every stack's SYN.)
    for _ in 0..MSS_OPTION_STEPS {
        if at >= end {
            break;
        }
        let Ok(kind) = ctx.load::<u8>(at) else { break };
        match kind {
            tcp::OPTION_END => break,
            tcp::OPTION_NOP => at += 1,
            _ => {
                let Ok(len) = ctx.load::<u8>(at + tcp::OPTION_LEN) else {
                    break;
                };
                if kind == tcp::OPTION_MSS && len == tcp::OPTION_MSS_LEN {
                    let Ok(mss) = ctx.load::<u16>(at + tcp::OPTION_VALUE) else {
                        break;
                    };
                    if u16::from_be(mss) > limit {
                        let new = limit.to_be();
                        ok(ctx.l4_csum_replace(
                            p.l4 + tcp::CHECKSUM,
                            u64::from(mss),
                            u64::from(new),
                            FIELD_16_BITS,
                        ))?;
                        ok(ctx.store(at + tcp::OPTION_VALUE, &new, 0))?;
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
    let old: u16 = ctx.load(p.l3 + ipv4::FRAG).map_err(|_| Failed)?;
    let new = old & !ipv4::FLAG_DF.to_be();
    if new == old {
        return Ok(());
    }
    ok(ctx.l3_csum_replace(
        p.l3 + ipv4::CHECKSUM,
        u64::from(old),
        u64::from(new),
        FIELD_16_BITS,
    ))?;
    ok(ctx.store(p.l3 + ipv4::FRAG, &new, 0))
}
