//! A packet of a flow we translate that is too big for its egress device
//! (IPv4 with DF set, or IPv6) is answered here, as the kernel's forwarding
//! path answers it: ICMP "fragmentation needed" (type 3 code 4) or ICMPv6
//! "packet too big" (type 2), with the egress MTU, from the node's own
//! address on the side the packet came in, to its sender, quoting the packet
//! as the sender sent it (it is not translated yet), TTL / hop limit 64, the
//! quote as long as the kernel makes it (576 bytes in all for IPv4, 1280 for
//! IPv6). Handing it to the kernel instead does not work for a reply
//! addressed to one of our translation ports: the kernel has no connection
//! for it, the sender never learns the path MTU and a bulk transfer stalls.
//!
//! The packet itself becomes the answer: cut to the quote's length
//! (`bpf_skb_change_tail`), room made in front of the quote for the new
//! headers (`bpf_skb_adjust_room`), and sent back out of the device it came
//! in on.
//!
//! IPv4 without DF is fragmented instead (`fragment`), after it has been
//! translated as its flow says: the kernel would fragment it too, but would
//! translate it anew (another port, or none), outside the flow.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_adj_room_mode::BPF_ADJ_ROOM_NET,
    helpers::{bpf_csum_diff, bpf_get_prandom_u32, bpf_skb_load_bytes},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use tailguard_common::{
    Config, Device, Outcome,
    nat::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{
    nat,
    packet::Packet,
    parse,
    policy::{Own, copy_own},
};

/// The quote's length: what is left of 576 (IPv4) / 1280 (IPv6) bytes after
/// the error's own IP and ICMP headers (the kernel's `icmp_send` and
/// `icmp6_send` cut there).
const QUOTE_V4: u32 = 576 - 20 - 8;
const QUOTE_V6: u32 = 1280 - 40 - 8;

/// `bpf_csum_diff` sums at most 512 bytes a call.
const CHUNK: usize = 512;

/// TTL / hop limit of the answer (the kernel's default for its own packets).
const TTL: u8 = 64;

/// Room for what is summed and written (BPF stack is 512 bytes in all).
#[repr(C, align(8))]
pub struct TooBigScratch {
    chunk: [u8; CHUNK],
    /// The sender's IP header (its fixed part), moved behind the new ones.
    quoted: [u8; 40],
    /// The new IP and ICMP headers.
    headers: [u8; 48],
    /// ICMPv6's pseudo header.
    pseudo: [u8; 40],
}

#[map]
static TOO_BIG_SCRATCH: PerCpuArray<TooBigScratch> = PerCpuArray::with_max_entries(1, 0);

/// When `verdict` says the packet is too big, answers it (see the module
/// doc) if it can; otherwise, or if something the answer needs is missing
/// (no own address of the family, IPv4 without DF or with options), the
/// kernel gets it, as `verdict` says.
#[inline(always)]
pub fn answer_or(
    ctx: &TcContext,
    cfg: &Config,
    p: &Packet,
    to: Device,
    verdict: (i32, Outcome),
) -> (i32, Outcome) {
    if verdict.1 != Outcome::KernelTooBig {
        return verdict;
    }
    answer(ctx, cfg, p, cfg.mtu(to)).unwrap_or(verdict)
}

/// The device the packet came in on, its index, and the node's address on
/// that side in the packet's family (`None` if the daemon set none).
#[inline(always)]
fn arrival(cfg: &Config, p: &Packet, out: &mut [u8; 16]) -> Option<(Device, u32)> {
    let device = nat::arrival()?;
    let ifindex = cfg.ifindex(device);
    if ifindex == 0 || !copy_own(cfg, p, Own::on(device), out) {
        return None;
    }
    Some((device, ifindex))
}

#[inline(always)]
fn answer(ctx: &TcContext, cfg: &Config, p: &Packet, mtu: u32) -> Option<(i32, Outcome)> {
    let s = TOO_BIG_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; a program runs to completion on one CPU.
    let s = unsafe { &mut *s };
    let (header, quote) = if p.ipv6 {
        (40, QUOTE_V6)
    } else {
        (20, QUOTE_V4)
    };
    if !p.ipv6 {
        let h: [u8; 8] = ctx.load(p.l3).ok()?;
        // Without DF the kernel fragments it; with options the fixed-size
        // header below would not hold it.
        if h[6] & 0x40 == 0 || h[0] != 0x45 {
            return None;
        }
    }
    // Every MTU is at least 576 (IPv4) / 1280 (IPv6), so a packet too big
    // is longer than the quote; one that is not stays the kernel's.
    if p.len < quote {
        return None;
    }
    let mut own = [0u8; 16];
    let (device, ifindex) = arrival(cfg, p, &mut own)?;
    load(ctx, p.l3, &mut s.quoted[..header])?;
    // Cut to the quote (this also makes the packet linear and no longer
    // GSO). From here on it is no longer the packet that came in: whatever
    // fails drops it.
    if ctx.change_tail(p.l3 as u32 + quote, 0).is_err() {
        return Some(failed());
    }
    let built = build(ctx, s, p, &own, header, quote, mtu);
    Some(match built {
        Some(()) => (
            crate::policy::redirect(ctx, device, ifindex),
            Outcome::TooBigAnswered,
        ),
        None => failed(),
    })
}

/// Turns the packet, cut to the quote, into the answer: new headers in
/// front (`header` bytes of IP, 8 of ICMP), the sender's header behind them.
#[inline(always)]
fn build(
    ctx: &TcContext,
    s: &mut TooBigScratch,
    p: &Packet,
    own: &[u8; 16],
    header: usize,
    quote: u32,
    mtu: u32,
) -> Option<()> {
    let mut sum = sum_packet(ctx, s, p.l3, quote as usize)?;
    if p.gso_size != 0 {
        sum = settle_quoted_checksum(ctx, s, p, sum)?;
    }
    ctx.adjust_room(header as i32 + 8, BPF_ADJ_ROOM_NET, 0)
        .ok()?;
    let total = header as u32 + 8 + quote;
    if p.ipv6 {
        write_ipv6(s, own, &p.src, total, mtu, sum)?;
        ctx.store(p.l3, &s.headers, 0).ok()?;
        ctx.store(p.l3 + 48, &s.quoted, 0).ok()
    } else {
        write_ipv4(s, own, &p.src, total, mtu, sum)?;
        let headers: &[u8; 28] = s.headers[..28].try_into().ok()?;
        let quoted: &[u8; 20] = s.quoted[..20].try_into().ok()?;
        ctx.store(p.l3, headers, 0).ok()?;
        ctx.store(p.l3 + 28, quoted, 0).ok()
    }
}

fn failed() -> (i32, Outcome) {
    // Cut or half-rewritten: it can no longer be handed on.
    (aya_ebpf::bindings::TC_ACT_SHOT, Outcome::DropHelperFailed)
}

/// Reads `out.len()` bytes (a constant after inlining) from `offset`.
#[inline(always)]
fn load(ctx: &TcContext, offset: usize, out: &mut [u8]) -> Option<()> {
    // SAFETY: `out` is writable for its whole length.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            offset as u32,
            out.as_mut_ptr().cast(),
            out.len() as u32,
        )
    };
    (ret == 0).then_some(())
}

/// The ones' complement sum (unfolded, as `bpf_csum_diff` keeps it) of
/// `data` (a multiple of 4 bytes), added to `seed`.
#[inline(always)]
fn sum_of(data: &mut [u8], seed: u32) -> Option<u32> {
    // SAFETY: `data` is in map memory, `data.len()` bytes long.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            data.as_mut_ptr().cast(),
            data.len() as u32,
            seed,
        )
    };
    (sum >= 0).then_some(sum as u32)
}

/// The sum of the packet's `len` bytes from `offset` (`len` is one of the
/// two quote lengths, both multiples of 4).
#[inline(always)]
fn sum_packet(ctx: &TcContext, s: &mut TooBigScratch, offset: usize, len: usize) -> Option<u32> {
    let mut sum = 0;
    let mut at = 0;
    // The IPv6 quote takes three chunks (512 + 512 + 208), IPv4's two.
    for _ in 0..3 {
        if at + CHUNK <= len {
            load(ctx, offset + at, &mut s.chunk)?;
            sum = sum_of(&mut s.chunk, sum)?;
            at += CHUNK;
        }
    }
    let rest = len - at;
    if rest == QUOTE_V6 as usize - 2 * CHUNK {
        load(
            ctx,
            offset + at,
            &mut s.chunk[..QUOTE_V6 as usize - 2 * CHUNK],
        )?;
        sum = sum_of(&mut s.chunk[..QUOTE_V6 as usize - 2 * CHUNK], sum)?;
    } else if rest == QUOTE_V4 as usize - CHUNK {
        load(ctx, offset + at, &mut s.chunk[..QUOTE_V4 as usize - CHUNK])?;
        sum = sum_of(&mut s.chunk[..QUOTE_V4 as usize - CHUNK], sum)?;
    }
    Some(sum)
}

/// Folds an unfolded sum to 16 bits (not complemented).
#[inline(always)]
fn fold(sum: u32) -> u16 {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// A GSO packet (from GRO, or from a TUN device's offloads) is left with a
/// checksum still to be filled in over its transport header and payload
/// (`CHECKSUM_PARTIAL`), which a device may do when the answer leaves; that
/// would break the answer's checksum, which covers those bytes. So the quoted
/// transport checksum is set to the one value that filling in rewrites as
/// itself: X with X = ~(R + X) in ones' complement, R being the sum of the
/// rest of the transport bytes, i.e. 2X = ~R, X = ~R rotated right by one.
/// Returns the quote's sum with it.
#[inline(always)]
fn settle_quoted_checksum(
    ctx: &TcContext,
    s: &mut TooBigScratch,
    p: &Packet,
    quote_sum: u32,
) -> Option<u32> {
    let field = match p.proto {
        IPPROTO_TCP => p.l4 + 16,
        IPPROTO_UDP => p.l4 + 6,
        _ => return Some(quote_sum),
    };
    // The IP header is the fixed one (IPv4 options were refused above).
    let header_sum = if p.ipv6 {
        sum_of(&mut s.quoted[..40], 0)?
    } else {
        sum_of(&mut s.quoted[..20], 0)?
    };
    let old: u16 = ctx.load(field).ok()?;
    // R = quote - IP header - old field, in ones' complement.
    let rest = u32::from(fold(quote_sum)) + u32::from(!fold(header_sum)) + u32::from(!old);
    let rest = fold(rest);
    let mut new = (!rest).rotate_right(1);
    if new == 0 {
        // Filling in never writes 0 (it writes 0xffff for it).
        new = 0xffff;
    }
    ctx.store(field, &new, 0).ok()?;
    Some(u32::from(fold(header_sum)) + u32::from(rest) + u32::from(new))
}

/// The IPv4 header and ICMP "fragmentation needed" into `s.headers`.
#[inline(always)]
fn write_ipv4(
    s: &mut TooBigScratch,
    own: &[u8; 16],
    sender: &[u8; 16],
    total: u32,
    mtu: u32,
    quote_sum: u32,
) -> Option<()> {
    let h = &mut s.headers;
    *h = [0; 48];
    h[0] = 0x45;
    // As the kernel's icmp_send: the sender's TOS bits, precedence
    // "internetwork control".
    h[1] = (s.quoted[1] & 0x1e) | 0xc0;
    h[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    // SAFETY: a plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    h[4..6].copy_from_slice(&id.to_ne_bytes());
    h[8] = TTL;
    h[9] = IPPROTO_ICMP;
    h[12..16].copy_from_slice(&own[..4]);
    h[16..20].copy_from_slice(&sender[..4]);
    let ip_sum = !fold(sum_of(&mut h[..20], 0)?);
    h[10..12].copy_from_slice(&ip_sum.to_ne_bytes());
    // ICMP: type 3 code 4, unused, next-hop MTU.
    h[20] = 3;
    h[21] = 4;
    h[26..28].copy_from_slice(&(mtu as u16).to_be_bytes());
    let icmp_sum = !fold(sum_of(&mut h[20..28], quote_sum)?);
    h[22..24].copy_from_slice(&icmp_sum.to_ne_bytes());
    Some(())
}

/// The IPv6 header and ICMPv6 "packet too big" into `s.headers`.
#[inline(always)]
fn write_ipv6(
    s: &mut TooBigScratch,
    own: &[u8; 16],
    sender: &[u8; 16],
    total: u32,
    mtu: u32,
    quote_sum: u32,
) -> Option<()> {
    let payload = total - 40;
    let h = &mut s.headers;
    *h = [0; 48];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload as u16).to_be_bytes());
    h[6] = IPPROTO_ICMPV6;
    h[7] = TTL;
    h[8..24].copy_from_slice(own);
    h[24..40].copy_from_slice(sender);
    // ICMPv6: type 2 code 0, the MTU.
    h[40] = 2;
    h[44..48].copy_from_slice(&mtu.to_be_bytes());
    // The pseudo header: addresses, upper-layer length, next header.
    let ph = &mut s.pseudo;
    ph[..32].copy_from_slice(&h[8..40]);
    ph[32..36].copy_from_slice(&payload.to_be_bytes());
    ph[36..39].copy_from_slice(&[0, 0, 0]);
    ph[39] = IPPROTO_ICMPV6;
    let sum = sum_of(&mut s.pseudo, quote_sum)?;
    let icmp_sum = !fold(sum_of(&mut s.headers[40..48], sum)?);
    s.headers[42..44].copy_from_slice(&icmp_sum.to_ne_bytes());
    Some(())
}

/// The most the second fragment may carry (the tail kept aside while the
/// first is sent): less than this, one fragment's worth on any MTU up to 2068.
const TAIL_MAX: u32 = 2048;

#[repr(C, align(8))]
pub struct FragmentScratch {
    tail: [u8; TAIL_MAX as usize],
}

#[map]
static FRAGMENT_SCRATCH: PerCpuArray<FragmentScratch> = PerCpuArray::with_max_entries(1, 0);

/// How much payload the first fragment carries on a device of `mtu`: all
/// that fits after a 20-byte header, in the 8-byte units offsets count in.
fn first_fragment(mtu: u32) -> u32 {
    (mtu - 20) & !7
}

/// Whether the fast path fragments `p` (too big for `mtu`) itself: IPv4
/// without DF and without options, whole (not GSO, not a fragment), at most two fragments'
/// worth, leaving by an L3 device (`bpf_clone_redirect` sends the first
/// fragment, and cannot fill in link-layer addresses). Anything else stays
/// the kernel's.
#[inline(always)]
pub fn fragmentable(ctx: &TcContext, p: &Packet, to: Device, mtu: u32) -> bool {
    // A fragment already (MF or an offset) would need its offsets carried
    // over; the kernel's path cannot re-fragment it in its flow either.
    if p.ipv6
        || p.part != tailguard_common::fragment::Fragment::Whole
        || p.gso_size != 0
        || crate::link_layer::has_ethernet(to)
        || mtu < 68
    {
        return false;
    }
    let Ok(h) = ctx.load::<[u8; 8]>(p.l3) else {
        return false;
    };
    let total = u32::from(u16::from_be_bytes([h[2], h[3]]));
    let first = first_fragment(mtu);
    h[0] == 0x45
        && h[6] & 0x40 == 0
        && total == p.len
        && total > 20 + first
        && total - 20 - first <= first.min(TAIL_MAX - 1)
}

/// Sends the translated `p` out of `ifindex` as two fragments: the first
/// (a clone) with as much as fits and "more fragments" set, then the rest
/// at its offset. The tail waits in per-CPU scratch while the packet is cut
/// for the first.
#[inline(always)]
pub fn fragment(ctx: &TcContext, p: &Packet, to: Device, ifindex: u32, mtu: u32) -> (i32, Outcome) {
    send_fragments(ctx, p, to, ifindex, mtu).unwrap_or_else(failed)
}

#[inline(always)]
fn send_fragments(
    ctx: &TcContext,
    p: &Packet,
    to: Device,
    ifindex: u32,
    mtu: u32,
) -> Option<(i32, Outcome)> {
    let s = FRAGMENT_SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU slot; a program runs to completion on one CPU.
    let s = unsafe { &mut *s };
    let first = first_fragment(mtu);
    // Masked so the verifier sees it bounded by the buffer; `fragmentable`
    // made it 1..TAIL_MAX already.
    let tail = parse::at_least_one((p.len - 20 - first) & (TAIL_MAX - 1))?;
    let l3 = p.l3 as u32;
    // SAFETY: `s.tail` is writable for `tail` (< TAIL_MAX) bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            l3 + 20 + first,
            s.tail.as_mut_ptr().cast(),
            tail,
        )
    };
    if loaded != 0 {
        return None;
    }
    let old_total = (p.len as u16).to_be();
    let old_frag: u16 = ctx.load(p.l3 + 6).ok()?;
    // The first fragment.
    ctx.change_tail(l3 + 20 + first, 0).ok()?;
    // Flags and offset were 0 but for the reserved bit, which stays.
    let reserved = u16::from_be(old_frag) & 0x8000;
    set_fragment_fields(
        ctx,
        p.l3,
        old_total,
        old_frag,
        20 + first,
        reserved | 0x2000,
    )?;
    // The clone carries the mark: its egress must not take it for the
    // kernel's own datagram (see `kernel_flows`).
    crate::kernel_flows::mark_sent(ctx);
    ctx.clone_redirect(ifindex, 0).ok()?;
    // The rest, where the first fragment's payload ended.
    ctx.change_tail(l3 + 20 + tail, 0).ok()?;
    // SAFETY: `s.tail` holds `tail` bytes.
    let stored = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            l3 + 20,
            s.tail.as_ptr().cast(),
            tail,
            0,
        )
    };
    if stored != 0 {
        return None;
    }
    let first_total = ((20 + first) as u16).to_be();
    let first_frag = (reserved | 0x2000).to_be();
    set_fragment_fields(
        ctx,
        p.l3,
        first_total,
        first_frag,
        20 + tail,
        reserved | (first / 8) as u16,
    )?;
    Some((
        crate::policy::redirect(ctx, to, ifindex),
        Outcome::Fragmented,
    ))
}

/// Writes an IPv4 header's total length and fragment field (flags and
/// offset), replacing `old_total` and `old_frag` (network order) in its
/// checksum.
#[inline(always)]
fn set_fragment_fields(
    ctx: &TcContext,
    l3: usize,
    old_total: u16,
    old_frag: u16,
    total: u32,
    frag: u16,
) -> Option<()> {
    let total = (total as u16).to_be();
    let frag = frag.to_be();
    ctx.l3_csum_replace(l3 + 10, u64::from(old_total), u64::from(total), 2)
        .ok()?;
    ctx.l3_csum_replace(l3 + 10, u64::from(old_frag), u64::from(frag), 2)
        .ok()?;
    ctx.store(l3 + 2, &total, 0).ok()?;
    ctx.store(l3 + 6, &frag, 0).ok()
}
