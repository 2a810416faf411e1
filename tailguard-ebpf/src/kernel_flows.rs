//! UDP flows the kernel's conntrack tracks stay the kernel's.
//!
//! A UDP datagram cannot say whether it starts a flow, so without this the
//! fast path would take over, with a port of its own, every UDP flow the
//! kernel had: one started before the programs were attached, one left to
//! the kernel when no port was free, or the host's own (its DNS, NTP, ...),
//! whose replies to its tailnet address would even go to `TS_DEST_IP`.
//! The programs cannot ask conntrack itself (its lookup is a kfunc, which
//! this toolchain cannot call), so the `KERNEL_FLOWS` map holds a mark for
//! such flows, from three sources:
//! - the egress programs: a UDP datagram the kernel sends out of a device
//!   (forwarded by it, or the host's own) makes its replies, as they will
//!   arrive on that device, the kernel's;
//! - the ingress programs: a flow they leave to the kernel for want of a
//!   port is the kernel's from then on;
//! - the daemon, at start: the UDP flows in the kernel's conntrack table.
//!
//! Packets the fast path sends itself carry a mark in `tc_index` (as
//! Cilium marks its redirected packets), so the egress programs can tell
//! them from the kernel's.
//!
//! The marks are hints, kept apart from the connection table in an LRU map:
//! losing one to eviction at worst lets the fast path take over a kernel
//! flow with a port of its own (the flow's next datagrams leave from
//! another port), and they never take a flow's place in the table.

use aya_ebpf::{
    EbpfContext as _, bindings::__sk_buff, macros::map, maps::LruHashMap, programs::TcContext,
};
use tailguard_common::{
    Device, Direction,
    fragment::Fragment,
    nat::{FlowKey, FlowState, KERNEL_FLOWS_COMPILED},
    wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ip_version, ipv4, ipv6},
};

use crate::{config::config, link_layer::ip_header_offset, nat, packet::Packet};

/// When a kernel flow's packet last went by (the table's clock, seconds),
/// by its key as its packets arrive.
#[map]
static KERNEL_FLOWS: LruHashMap<FlowKey, u32> =
    LruHashMap::with_max_entries(KERNEL_FLOWS_COMPILED, 0);

/// How long a mark outlives the last packet: the kernel's timeout for a
/// UDP stream, the longest it keeps one.
const IDLE: u32 = FlowState::Assured.timeout(IPPROTO_UDP);

/// Whether packets keyed `key` belong to a flow the kernel tracks; a live
/// mark is stamped again.
#[inline(always)]
pub fn owns(key: &FlowKey, now: u32) -> bool {
    let Some(seen) = KERNEL_FLOWS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: from the map lookup, valid for this program run.
    unsafe {
        if now.saturating_sub(*seen) > IDLE {
            return false;
        }
        if *seen != now {
            *seen = now;
        }
    }
    true
}

/// Says that packets keyed `key` belong to a flow the kernel tracks.
#[inline(always)]
pub fn keep(key: &FlowKey, now: u32) {
    if !owns(key, now) {
        let _ = KERNEL_FLOWS.insert(key, &now, 0);
    }
}

/// The `tc_index` bit of packets the fast path sends.
const SENT_BY_FAST_PATH: u32 = 1 << 15;

/// Marks a packet the fast path is about to send.
#[inline(always)]
pub fn mark_sent(ctx: &TcContext) {
    // SAFETY: the context points at the kernel's `__sk_buff` for this run;
    // TC programs may write `tc_index`.
    unsafe {
        let skb = ctx.as_ptr() as *mut __sk_buff;
        (*skb).tc_index |= SENT_BY_FAST_PATH;
    }
}

/// On a device's egress: a UDP datagram or ICMP echo the kernel sends makes
/// the flow's replies, arriving on `device`, the kernel's. The fast path's own packets
/// only lose their mark.
#[inline(always)]
pub fn learn(ctx: &TcContext, device: Device) {
    // SAFETY: as in `mark_sent`.
    let skb = ctx.as_ptr() as *mut __sk_buff;
    unsafe {
        if (*skb).tc_index & SENT_BY_FAST_PATH != 0 {
            (*skb).tc_index &= !SENT_BY_FAST_PATH;
            return;
        }
    }
    let l3 = ip_header_offset(device);
    // Only UDP and ICMP echo need this (every other packet of a TCP flow
    // but its SYN is the kernel's anyway): a look at the protocol before
    // reading it all.
    let Ok(first) = ctx.load::<u8>(l3) else {
        return;
    };
    let protocol_at = if ip_version(first) == ipv6::VERSION {
        l3 + ipv6::NEXT_HEADER
    } else {
        l3 + ipv4::PROTOCOL
    };
    let Ok(protocol) = ctx.load::<u8>(protocol_at) else {
        return;
    };
    if protocol != IPPROTO_UDP && protocol != IPPROTO_ICMP && protocol != IPPROTO_ICMPV6 {
        return;
    }
    // (Of ICMP, only echo requests and replies are read.)
    let Some(p) = Packet::read(ctx, l3, Direction::Egress) else {
        return;
    };
    // A later fragment carries no ports: its first fragment said it all.
    if p.proto == IPPROTO_TCP || p.part == Fragment::Later {
        return;
    }
    // The packet that answers this one, or (for an echo reply) the next
    // request.
    let Some(cfg) = config() else {
        return;
    };
    let reply = nat::key_of(p, device).reply(device as u8);
    keep(&reply, nat::now(cfg));
}
