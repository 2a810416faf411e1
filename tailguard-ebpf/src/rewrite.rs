//! Rewriting a packet in place: addresses, ports (or the echo identifier),
//! the TTL, the TCP MSS, each with its checksums updated incrementally by
//! the kernel's helpers.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use tailguard_common::nat::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, mss_for};

use crate::packet::{Packet, TCP_SYN};

/// A helper refused: the packet can no longer be trusted and is dropped.
pub struct Failed;

type Result = core::result::Result<(), Failed>;

fn ok(r: core::result::Result<(), i64>) -> Result {
    r.map_err(|_| Failed)
}

/// Where the transport checksum sits, and whether it covers the addresses
/// (everything but ICMPv4 includes the pseudo header).
fn l4_checksum(p: &Packet) -> (usize, u64) {
    match p.proto {
        IPPROTO_TCP => (p.l4 + 16, u64::from(BPF_F_PSEUDO_HDR)),
        // A zero UDP checksum over IPv4 means "none": keep it zero.
        IPPROTO_UDP => (p.l4 + 6, u64::from(BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0)),
        IPPROTO_ICMP => (p.l4 + 2, 0),
        _ => (p.l4 + 2, u64::from(BPF_F_PSEUDO_HDR)),
    }
}

/// Replaces the source (`source` true) or destination address.
#[inline(always)]
pub fn set_addr(ctx: &TcContext, p: &mut Packet, source: bool, new: &[u8; 16]) -> Result {
    let old = if source { p.src } else { p.dst };
    if old == *new {
        return Ok(());
    }
    let n = p.addr_len();
    let mut from = [0u32; 4];
    let mut to = [0u32; 4];
    for i in 0..4 {
        from[i] = u32::from_ne_bytes([old[4 * i], old[4 * i + 1], old[4 * i + 2], old[4 * i + 3]]);
        to[i] = u32::from_ne_bytes([new[4 * i], new[4 * i + 1], new[4 * i + 2], new[4 * i + 3]]);
    }
    // SAFETY: both buffers are on our stack and `n` bytes long (4 or 16).
    let diff = unsafe { bpf_csum_diff(from.as_mut_ptr(), n as u32, to.as_mut_ptr(), n as u32, 0) };
    if diff < 0 {
        return Err(Failed);
    }
    let diff = diff as u64;
    let (l4_sum, l4_flags) = l4_checksum(p);
    if l4_flags & u64::from(BPF_F_PSEUDO_HDR) != 0 {
        ok(ctx.l4_csum_replace(l4_sum, 0, diff, l4_flags))?;
    }
    let offset = match (p.ipv6, source) {
        (false, true) => p.l3 + 12,
        (false, false) => p.l3 + 16,
        (true, true) => p.l3 + 8,
        (true, false) => p.l3 + 24,
    };
    if p.ipv6 {
        ok(ctx.store(offset, new, 0))?;
    } else {
        let four = [new[0], new[1], new[2], new[3]];
        ok(ctx.l3_csum_replace(p.l3 + 10, 0, diff, 0))?;
        ok(ctx.store(offset, &four, 0))?;
    }
    if source {
        p.src = *new;
    } else {
        p.dst = *new;
    }
    Ok(())
}

/// Replaces the source (`source` true) or destination port; for ICMP echo
/// the identifier (`source` true).
#[inline(always)]
pub fn set_port(ctx: &TcContext, p: &mut Packet, source: bool, new: u16) -> Result {
    let old = if source { p.sport } else { p.dport };
    if old == new {
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
    let ttl = p.ttl - 1;
    if p.ipv6 {
        ok(ctx.store(p.l3 + 7, &ttl, 0))?;
    } else {
        // The checksum covers TTL and protocol as one 16-bit word.
        let old = u16::from_be_bytes([p.ttl, p.proto]).to_be();
        let new = u16::from_be_bytes([ttl, p.proto]).to_be();
        ok(ctx.l3_csum_replace(p.l3 + 10, u64::from(old), u64::from(new), 2))?;
        ok(ctx.store(p.l3 + 8, &ttl, 0))?;
    }
    p.ttl = ttl;
    Ok(())
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
