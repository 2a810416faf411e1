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
    config::NodeAddress,
    wire::{
        IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, icmp, icmpv6, ipv4, ipv6, tcp, udp,
    },
};

use crate::{nat, packet::Packet, parse, rewrite::FIELD_16_BITS};

/// The quote's length: what is left of 576 (IPv4) / 1280 (IPv6) bytes after
/// the error's own IP and ICMP headers (the kernel's `icmp_send` and
/// `icmp6_send` cut there).
const QUOTE_V4: u32 = ipv4::ERROR_MAX - (ipv4::HEADER + icmp::HEADER) as u32;
const QUOTE_V6: u32 = ipv6::MIN_MTU - (ipv6::HEADER + icmp::HEADER) as u32;

/// The new headers in front of the quote: IP (IPv6's is the longer) and ICMP.
const V4_HEADERS: usize = ipv4::HEADER + icmp::HEADER;
const V6_HEADERS: usize = ipv6::HEADER + icmp::HEADER;

/// ICMPv6's pseudo header: the addresses, the upper-layer length (32
/// bits), 3 zero bytes and the next header.
const PSEUDO_HEADER: usize = 2 * ipv6::ADDR_LEN + 8;
const PSEUDO_LEN: usize = 2 * ipv6::ADDR_LEN;
const PSEUDO_NEXT_HEADER: usize = PSEUDO_HEADER - 1;

/// The TOS of an ICMP error, as the kernel's `icmp_send` makes it: the
/// sender's TOS bits (`IPTOS_TOS_MASK`), precedence "internetwork
/// control" (`IPTOS_PREC_INTERNETCONTROL`).
const IPTOS_TOS_MASK: u8 = 0x1e;
const IPTOS_PREC_INTERNETCONTROL: u8 = 0xc0;

/// `bpf_csum_diff` sums at most 512 bytes a call.
const CHUNK: usize = 512;

/// TTL / hop limit of the answer (the kernel's default for its own packets).
const TTL: u8 = 64;

/// Room for what is summed and written (BPF stack is 512 bytes in all).
#[repr(C, align(8))]
pub struct TooBigScratch {
    chunk: [u8; CHUNK],
    /// The sender's IP header (its fixed part), moved behind the new ones.
    quoted: [u8; ipv6::HEADER],
    /// The new IP and ICMP headers.
    headers: [u8; V6_HEADERS],
    /// ICMPv6's pseudo header.
    pseudo: [u8; PSEUDO_HEADER],
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
    if ifindex == 0 || !cfg.copy_node_address(p.ipv6, NodeAddress::on(device), out) {
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
        (ipv6::HEADER, QUOTE_V6)
    } else {
        (ipv4::HEADER, QUOTE_V4)
    };
    if !p.ipv6 {
        // Version through the fragment field.
        let h: [u8; ipv4::TTL] = ctx.load(p.l3).ok()?;
        // Without DF the kernel fragments it; with options the fixed-size
        // header below would not hold it.
        if !ipv4::dont_fragment(h[ipv4::FRAG]) || h[0] != ipv4::VERSION_IHL_PLAIN {
            return None;
        }
    }
    // Every MTU is at least 576 (IPv4) / 1280 (IPv6), so a packet too big
    // is longer than the quote; one that is not stays the kernel's.
    if p.len < quote {
        return None;
    }
    let mut node = [0u8; 16];
    let (device, ifindex) = arrival(cfg, p, &mut node)?;
    load(ctx, p.l3, &mut s.quoted[..header])?;
    // Cut to the quote (this also makes the packet linear and no longer
    // GSO). From here on it is no longer the packet that came in: whatever
    // fails drops it.
    if ctx.change_tail(p.l3 as u32 + quote, 0).is_err() {
        return Some(failed());
    }
    let built = build(ctx, s, p, &node, header, quote, mtu);
    Some(match built {
        Some(()) => (
            crate::policy::redirect(ctx, device, ifindex),
            Outcome::TooBigAnswered,
        ),
        None => failed(),
    })
}

/// Turns the packet, cut to the quote, into the answer: new headers in
/// front (`header` bytes of IP, then ICMP's), the sender's header behind
/// them.
#[inline(always)]
fn build(
    ctx: &TcContext,
    s: &mut TooBigScratch,
    p: &Packet,
    node: &[u8; 16],
    header: usize,
    quote: u32,
    mtu: u32,
) -> Option<()> {
    let mut sum = sum_packet(ctx, s, p.l3, quote as usize)?;
    if p.gso_size != 0 {
        sum = settle_quoted_checksum(ctx, s, p, sum)?;
    }
    ctx.adjust_room((header + icmp::HEADER) as i32, BPF_ADJ_ROOM_NET, 0)
        .ok()?;
    let total = (header + icmp::HEADER) as u32 + quote;
    if p.ipv6 {
        write_ipv6(s, node, &p.src, total, mtu, sum)?;
        ctx.store(p.l3, &s.headers, 0).ok()?;
        ctx.store(p.l3 + V6_HEADERS, &s.quoted, 0).ok()
    } else {
        write_ipv4(s, node, &p.src, total, mtu, sum)?;
        let headers: &[u8; V4_HEADERS] = s.headers[..V4_HEADERS].try_into().ok()?;
        let quoted: &[u8; ipv4::HEADER] = s.quoted[..ipv4::HEADER].try_into().ok()?;
        ctx.store(p.l3, headers, 0).ok()?;
        ctx.store(p.l3 + V4_HEADERS, quoted, 0).ok()
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
        IPPROTO_TCP => p.l4 + tcp::CHECKSUM,
        IPPROTO_UDP => p.l4 + udp::CHECKSUM,
        _ => return Some(quote_sum),
    };
    // The IP header is the fixed one (IPv4 options were refused above).
    let header_sum = if p.ipv6 {
        sum_of(&mut s.quoted[..ipv6::HEADER], 0)?
    } else {
        sum_of(&mut s.quoted[..ipv4::HEADER], 0)?
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
    node: &[u8; 16],
    sender: &[u8; 16],
    total: u32,
    mtu: u32,
    quote_sum: u32,
) -> Option<()> {
    let h = &mut s.headers;
    *h = [0; V6_HEADERS];
    h[0] = ipv4::VERSION_IHL_PLAIN;
    h[ipv4::TOS] = (s.quoted[ipv4::TOS] & IPTOS_TOS_MASK) | IPTOS_PREC_INTERNETCONTROL;
    h[ipv4::TOTAL_LEN..][..2].copy_from_slice(&(total as u16).to_be_bytes());
    // SAFETY: a plain helper call.
    let id = unsafe { bpf_get_prandom_u32() } as u16;
    h[ipv4::ID..][..2].copy_from_slice(&id.to_ne_bytes());
    h[ipv4::TTL] = TTL;
    h[ipv4::PROTOCOL] = IPPROTO_ICMP;
    h[ipv4::SRC..][..ipv4::ADDR_LEN].copy_from_slice(&node[..ipv4::ADDR_LEN]);
    h[ipv4::DST..][..ipv4::ADDR_LEN].copy_from_slice(&sender[..ipv4::ADDR_LEN]);
    let ip_sum = !fold(sum_of(&mut h[..ipv4::HEADER], 0)?);
    h[ipv4::CHECKSUM..][..2].copy_from_slice(&ip_sum.to_ne_bytes());
    // ICMP: "fragmentation needed", unused, next-hop MTU.
    let icmp_h = &mut h[ipv4::HEADER..V4_HEADERS];
    icmp_h[icmp::TYPE] = icmp::DEST_UNREACHABLE;
    icmp_h[icmp::CODE] = icmp::FRAGMENTATION_NEEDED;
    icmp_h[icmp::NEXT_HOP_MTU..][..2].copy_from_slice(&(mtu as u16).to_be_bytes());
    let icmp_sum = !fold(sum_of(&mut *icmp_h, quote_sum)?);
    icmp_h[icmp::CHECKSUM..][..2].copy_from_slice(&icmp_sum.to_ne_bytes());
    Some(())
}

/// The IPv6 header and ICMPv6 "packet too big" into `s.headers`.
#[inline(always)]
fn write_ipv6(
    s: &mut TooBigScratch,
    node: &[u8; 16],
    sender: &[u8; 16],
    total: u32,
    mtu: u32,
    quote_sum: u32,
) -> Option<()> {
    let payload = total - ipv6::HEADER as u32;
    let h = &mut s.headers;
    *h = [0; V6_HEADERS];
    h[0] = ipv6::VERSION_BYTE;
    h[ipv6::PAYLOAD_LEN..][..2].copy_from_slice(&(payload as u16).to_be_bytes());
    h[ipv6::NEXT_HEADER] = IPPROTO_ICMPV6;
    h[ipv6::HOP_LIMIT] = TTL;
    h[ipv6::SRC..][..ipv6::ADDR_LEN].copy_from_slice(node);
    h[ipv6::DST..][..ipv6::ADDR_LEN].copy_from_slice(sender);
    // ICMPv6: "packet too big" (code 0), the MTU.
    h[ipv6::HEADER + icmp::TYPE] = icmpv6::PACKET_TOO_BIG;
    h[ipv6::HEADER + icmp::V6_MTU..][..4].copy_from_slice(&mtu.to_be_bytes());
    // The pseudo header: addresses, upper-layer length, next header.
    let ph = &mut s.pseudo;
    ph[..PSEUDO_LEN].copy_from_slice(&h[ipv6::SRC..ipv6::HEADER]);
    ph[PSEUDO_LEN..][..4].copy_from_slice(&payload.to_be_bytes());
    ph[PSEUDO_LEN + 4..PSEUDO_NEXT_HEADER].copy_from_slice(&[0, 0, 0]);
    ph[PSEUDO_NEXT_HEADER] = IPPROTO_ICMPV6;
    let sum = sum_of(&mut s.pseudo, quote_sum)?;
    let icmp_h = &mut s.headers[ipv6::HEADER..V6_HEADERS];
    let icmp_sum = !fold(sum_of(&mut *icmp_h, sum)?);
    icmp_h[icmp::CHECKSUM..][..2].copy_from_slice(&icmp_sum.to_ne_bytes());
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

/// The fixed IPv4 header every fragment the fast path makes carries.
const V4_HEADER: u32 = ipv4::HEADER as u32;

/// How much payload the first fragment carries on a device of `mtu`: all
/// that fits after a fixed header, in the 8-byte units offsets count in.
fn first_fragment(mtu: u32) -> u32 {
    (mtu - V4_HEADER) & !(ipv4::OFFSET_UNIT - 1)
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
        || mtu < ipv4::MIN_MTU
    {
        return false;
    }
    // Version through the fragment field.
    let Ok(h) = ctx.load::<[u8; ipv4::TTL]>(p.l3) else {
        return false;
    };
    let total = u32::from(u16::from_be_bytes([
        h[ipv4::TOTAL_LEN],
        h[ipv4::TOTAL_LEN + 1],
    ]));
    let first = first_fragment(mtu);
    h[0] == ipv4::VERSION_IHL_PLAIN
        && !ipv4::dont_fragment(h[ipv4::FRAG])
        && total == p.len
        && total > V4_HEADER + first
        && total - V4_HEADER - first <= first.min(TAIL_MAX - 1)
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
    let tail = parse::at_least_one((p.len - V4_HEADER - first) & (TAIL_MAX - 1))?;
    let l3 = p.l3 as u32;
    // SAFETY: `s.tail` is writable for `tail` (< TAIL_MAX) bytes.
    let loaded = unsafe {
        bpf_skb_load_bytes(
            ctx.as_ptr(),
            l3 + V4_HEADER + first,
            s.tail.as_mut_ptr().cast(),
            tail,
        )
    };
    if loaded != 0 {
        return None;
    }
    let old_total = (p.len as u16).to_be();
    let old_frag: u16 = ctx.load(p.l3 + ipv4::FRAG).ok()?;
    // The first fragment.
    ctx.change_tail(l3 + V4_HEADER + first, 0).ok()?;
    // Flags and offset were 0 but for the reserved bit, which stays.
    let reserved = u16::from_be(old_frag) & ipv4::FLAG_RESERVED;
    set_fragment_fields(
        ctx,
        p.l3,
        old_total,
        old_frag,
        V4_HEADER + first,
        reserved | ipv4::FLAG_MF,
    )?;
    // The clone carries the mark: its egress must not take it for the
    // kernel's own datagram (see `kernel_flows`).
    crate::kernel_flows::mark_sent(ctx);
    // A clone has no neighbour lookup of its own: on an Ethernet device it
    // leaves with the addresses the daemon knows (the rest is redirected,
    // and addressed, as any packet).
    if crate::link_layer::has_ethernet(to) {
        crate::link_layer::address_frame(ctx, to);
    }
    ctx.clone_redirect(ifindex, 0).ok()?;
    // The rest, where the first fragment's payload ended.
    ctx.change_tail(l3 + V4_HEADER + tail, 0).ok()?;
    // SAFETY: `s.tail` holds `tail` bytes.
    let stored = unsafe {
        aya_ebpf::helpers::bpf_skb_store_bytes(
            ctx.as_ptr().cast(),
            l3 + V4_HEADER,
            s.tail.as_ptr().cast(),
            tail,
            0,
        )
    };
    if stored != 0 {
        return None;
    }
    let first_total = ((V4_HEADER + first) as u16).to_be();
    let first_frag = (reserved | ipv4::FLAG_MF).to_be();
    set_fragment_fields(
        ctx,
        p.l3,
        first_total,
        first_frag,
        V4_HEADER + tail,
        reserved | (first / ipv4::OFFSET_UNIT) as u16,
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
    let checksum = l3 + ipv4::CHECKSUM;
    ctx.l3_csum_replace(
        checksum,
        u64::from(old_total),
        u64::from(total),
        FIELD_16_BITS,
    )
    .ok()?;
    ctx.l3_csum_replace(
        checksum,
        u64::from(old_frag),
        u64::from(frag),
        FIELD_16_BITS,
    )
    .ok()?;
    ctx.store(l3 + ipv4::TOTAL_LEN, &total, 0).ok()?;
    ctx.store(l3 + ipv4::FRAG, &frag, 0).ok()
}
