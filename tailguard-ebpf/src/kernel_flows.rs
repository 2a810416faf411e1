//! UDP flows the kernel's conntrack tracks stay the kernel's.
//!
//! A UDP datagram cannot say whether it starts a flow, so without this the
//! fast path would take over, with a port of its own, every UDP flow the
//! kernel had: one started before the programs were attached, one left to
//! the kernel when no port was free, or the host's own (its DNS, NTP, ...),
//! whose replies to its tailnet address would even go to `TS_DEST_IP`.
//! The programs cannot ask conntrack itself (its lookup is a kfunc, which
//! this toolchain cannot call), so the NAT map holds entries marked
//! `state::KERNEL` for such flows, from three sources:
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

use aya_ebpf::{EbpfContext as _, bindings::__sk_buff, programs::TcContext};
use tailguard_common::{
    Device, Direction,
    fragment::Fragment,
    wire::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, ip_version, ipv4, ipv6},
};

use crate::{link_layer::ip_header_offset, nat, packet::Packet};

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
    let reply = nat::key_of(p, device).reply(device as u8);
    nat::keep_for_kernel(&reply, nat::now());
}
