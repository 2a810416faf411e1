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
    Device,
    fragment::Fragment,
    nat::{FlowKey, FlowState, KERNEL_FLOWS_COMPILED},
    wire::{IPPROTO_TCP, IPPROTO_UDP},
};

use crate::{config::config, nat, packet::Packet};

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

/// Whether the fast path sent this packet (see `mark_sent`); the mark is
/// taken off, so that nothing past this hook sees it.
#[inline(always)]
pub fn sent_by_fast_path(ctx: &TcContext) -> bool {
    // SAFETY: as in `mark_sent`.
    let skb = ctx.as_ptr() as *mut __sk_buff;
    unsafe {
        if (*skb).tc_index & SENT_BY_FAST_PATH == 0 {
            return false;
        }
        (*skb).tc_index &= !SENT_BY_FAST_PATH;
    }
    true
}

/// On a device's egress: a UDP datagram or ICMP echo the kernel sends
/// (`p`, read by `Packet::read`) makes the flow's replies, arriving on
/// `device`, the kernel's.
#[inline(always)]
pub fn learn(p: &Packet, device: Device) {
    // Only UDP and ICMP echo need this: every other packet of a TCP flow
    // but its SYN is the kernel's anyway. A later fragment carries no
    // ports: its first fragment said it all.
    if p.proto == IPPROTO_TCP || p.part == Fragment::Later {
        return;
    }
    let Some(cfg) = config() else {
        return;
    };
    // The packet that answers this one, or (for an echo reply) the next
    // request.
    let reply = nat::key_of(p, device).reply(device as u8);
    keep(&reply, nat::now(cfg));
}
