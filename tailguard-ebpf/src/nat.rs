//! The connection-state map and the outcome counters.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_fib_lookup},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_boot_ns},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tailguard_common::{
    Counter, Device, Outcome,
    fragment::{FragEntry, FragKey},
    nat::{FlowKey, NAT_MAX_ENTRIES, NAT_PORT_TRIES, NatEntry, nat_port, state, timeout_ns},
    outcome::OUTCOME_SLOTS,
    wire::{ipv4, ipv6},
};

use crate::{icmp::IcmpError, packet::Packet};

/// Both directions of every flow the fast path owns. The daemon pins it, so
/// flows outlive a restart of the daemon.
#[map]
static NAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(NAT_MAX_ENTRIES, 0);

/// Room for the keys and entries of a new flow: BPF programs get 512 bytes
/// of stack, and these would take most of it.
#[repr(C)]
pub struct Scratch {
    /// The packet's flow as it arrived.
    pub key: FlowKey,
    /// What a new flow's packets leave with.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub reply: FlowKey,
    pub back: NatEntry,
    pub entry: NatEntry,
    /// The kernel's FIB lookup for destinations outside our routes.
    pub fib: bpf_fib_lookup,
    /// A fragment's datagram, and what its first fragment was.
    pub frag_key: FragKey,
    pub frag_first: FragEntry,
    /// An ICMP error being translated.
    pub error: IcmpError,
}

#[map]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's scratch space.
#[inline(always)]
pub fn scratch() -> Option<&'static mut Scratch> {
    // SAFETY: a per-CPU slot; a program runs to completion on one CPU.
    SCRATCH.get_ptr_mut(0).map(|s| unsafe { &mut *s })
}

/// The device the packet being decided arrived on, as its flow key in the
/// scratch space says (set first thing, for every packet that has a flow;
/// read from there rather than passed down, which the stack cannot afford).
#[inline(always)]
pub fn arrival() -> Option<Device> {
    Some(Device::from_role(u32::from(scratch()?.key.ingress)))
}

#[map]
static OUTCOMES: PerCpuArray<Counter> = PerCpuArray::with_max_entries(OUTCOME_SLOTS, 0);

#[inline(always)]
pub fn count(device: Device, outcome: Outcome, len: u32) {
    if let Some(counter) = OUTCOMES.get_ptr_mut(outcome.index(device)) {
        // SAFETY: from the map lookup; only this CPU writes its copy.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(len);
        }
    }
}

pub fn now() -> u64 {
    // SAFETY: a plain helper call.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The key of `p` as it arrives on `device`.
#[inline(always)]
pub fn key_of(p: &Packet, device: Device) -> FlowKey {
    FlowKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: if p.is_icmp() { 0 } else { p.dport },
        proto: p.proto,
        ingress: device as u8,
        family: if p.ipv6 { ipv6::VERSION } else { ipv4::VERSION },
        _pad: 0,
    }
}

/// The live entry for `key`, if any (an expired one counts as none).
#[inline(always)]
pub fn lookup(key: &FlowKey, now: u64) -> Option<*mut NatEntry> {
    let entry = NAT.get_ptr_mut(key)?;
    // SAFETY: from the map lookup, valid for this program run.
    let (last, state) = unsafe { ((*entry).last_seen, (*entry).state) };
    if now.saturating_sub(last) > timeout_ns(key.proto, state) {
        return None;
    }
    Some(entry)
}

/// Records a new flow: `p` (keyed `s.key`) leaves through `egress` with
/// `s.src`/`s.dst` and, when `allocate`, a fresh source port from the fast
/// path's range; its replies arrive on `egress` and go back through the
/// other device.
/// The reply entry is inserted first and only if free, which is what makes
/// a port ours alone. Leaves the entry for `p` in `s.entry`; false when no
/// port was free.
#[inline(always)]
pub fn create(p: &Packet, s: &mut Scratch, allocate: bool, egress: Device, now: u64) -> bool {
    let icmp = p.is_icmp();
    // The reply as it will arrive: the answer to the packet as it leaves.
    s.reply = FlowKey {
        src: s.src,
        dst: s.dst,
        ..s.key
    }
    .reply(egress as u8);
    // The reply turns back into what `p` came from (with the ports of the
    // answer to `p`, before a port of ours is chosen).
    s.back = NatEntry {
        src: p.dst,
        dst: p.src,
        sport: s.reply.sport,
        dport: s.reply.dport,
        egress: egress.other() as u32,
        last_seen: now,
        state: 0,
        _pad: 0,
    };
    let mut sport = p.sport;
    if allocate {
        // SAFETY: a plain helper call.
        let random = unsafe { bpf_get_prandom_u32() };
        let mut found = false;
        for attempt in 0..NAT_PORT_TRIES {
            let port = nat_port(random, attempt).to_be();
            if icmp {
                s.reply.sport = port;
            } else {
                s.reply.dport = port;
            }
            // Free, or held by a flow that has gone idle past its timeout
            // (the LRU has not evicted it yet): ours.
            let free = NAT
                .insert(&s.reply, &s.back, u64::from(BPF_NOEXIST))
                .is_ok()
                || (lookup(&s.reply, now).is_none() && NAT.insert(&s.reply, &s.back, 0).is_ok());
            if free {
                sport = port;
                found = true;
                break;
            }
        }
        if !found {
            return false;
        }
    } else if NAT.insert(&s.reply, &s.back, 0).is_err() {
        return false;
    }
    s.entry = NatEntry {
        src: s.src,
        dst: s.dst,
        sport,
        dport: if icmp { 0 } else { p.dport },
        egress: egress as u32,
        last_seen: now,
        state: 0,
        _pad: 0,
    };
    if NAT.insert(&s.key, &s.entry, 0).is_err() {
        let _ = NAT.remove(&s.reply);
        return false;
    }
    true
}

/// Says that packets keyed `key` belong to a flow the kernel tracks (see
/// `kernel_flows`): a new entry marked `state::KERNEL`, or a live one's
/// time refreshed. A live flow of the fast path's own under that key stays
/// as it is.
#[inline(always)]
pub fn keep_for_kernel(key: &FlowKey, now: u64) {
    if let Some(entry) = lookup(key, now) {
        // SAFETY: from the map lookup, valid for this program run.
        unsafe {
            if (*entry).state & state::KERNEL != 0 {
                (*entry).last_seen = now;
            }
        }
        return;
    }
    let marker = NatEntry {
        last_seen: now,
        state: state::KERNEL,
        ..NatEntry::default()
    };
    let _ = NAT.insert(key, &marker, 0);
}
