//! Flows through the connection table (`tailguard_common::nat`): a new
//! flow's pair made whole, a known flow's packets translated, its state
//! followed, a missing half made again; and the outcome counters.

use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::{bpf_get_prandom_u32, bpf_jiffies64},
    macros::map,
    maps::PerCpuArray,
};
use tailguard_common::{
    Config, Counter, Device, Outcome, PacketClass,
    fragment::{FragEntry, FragKey},
    nat::{
        CHARGED, FlowKey, FlowState, Half, Meta, NAT_PORT_TRIES, REPLY_SEEN, TableEvent,
        Translation, kind, nat_port, next_state_bits, paired_half, paired_key, pairs_with, resolve,
    },
    outcome::OUTCOME_SLOTS,
    wire::{IPPROTO_TCP, ipv4, ipv6, tcp},
};

use crate::{
    icmp::IcmpError,
    packet::Packet,
    table::{self, Charge, Compact, Refused, Stored},
};

/// Room for the keys and halves of a flow: BPF programs get 512 bytes of
/// stack, and these would take most of it.
#[repr(C)]
pub struct Scratch {
    /// The packet's flow as it arrived.
    pub key: FlowKey,
    /// The other half's key: a new flow's reply, or the half a packet's
    /// own half pairs with.
    pub other: FlowKey,
    /// The packet's half as found, and the other half as found or made.
    pub half: Half,
    pub other_half: Half,
    /// The half the packet's half pairs with, as it should be.
    pub spare: Half,
    /// What the packet becomes.
    pub translation: Translation,
    /// What a new flow's packets leave with.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub compact: Compact,
    /// The kernel's FIB lookup for destinations outside our routes.
    pub fib: bpf_fib_lookup,
    /// A fragment's datagram, and what its first fragment was.
    pub frag_key: FragKey,
    pub frag_first: FragEntry,
    /// An ICMP error being translated.
    pub error: IcmpError,
    /// The class of the packet being decided (`note_class`).
    pub class: u32,
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

/// Keeps the class of the packet being decided until `count`, in map
/// memory: a value the verifier does not follow, so that it walks the
/// policy once rather than once per class.
#[inline(always)]
pub fn note_class(class: PacketClass) {
    if let Some(s) = scratch() {
        s.class = class as u32;
    }
}

/// Counts the packet being decided (of the class `note_class` kept) under
/// `outcome`: its one count.
#[inline(always)]
pub fn count(device: Device, outcome: Outcome, len: u32) {
    let class = scratch().map_or(PacketClass::Malformed, |s| PacketClass::from_index(s.class));
    if let Some(counter) = OUTCOMES.get_ptr_mut(outcome.index(device, class)) {
        // SAFETY: from the map lookup; only this CPU writes its copy.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(len);
        }
    }
}

/// The table's clock: whole seconds of the monotonic clock, counted from
/// jiffies as `cfg` says (see `tailguard_common::config::Clock`).
#[inline(always)]
pub fn now(cfg: &Config) -> u32 {
    // SAFETY: a plain helper call (which the verifier inlines).
    cfg.clock.seconds(unsafe { bpf_jiffies64() })
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

/// The half of `key`'s flow, copied into `s.half`.
#[inline(always)]
pub fn find(s: &mut Scratch) -> Option<Stored> {
    table::get(&mut s.compact, &s.key, &mut s.half)
}

/// A packet of a known flow (its half found by `find` in `s.half`, at
/// `stored`), resolved into `s.translation`: its time stamped, its pair
/// checked whole once a second (and made whole again if a half went
/// missing), the flow's state moved on by `tcp_flags`. False when the
/// flow is gone (its half could not be paired again) or cannot be
/// translated (the configuration lost the address it needs).
#[inline(always)]
pub fn follow(cfg: &Config, s: &mut Scratch, stored: Stored, tcp_flags: u8, now: u32) -> bool {
    if !resolve(cfg, &s.key, &s.half, &mut s.translation) {
        return false;
    }
    let origin = s.half.meta.is_origin();
    let first_reply = !origin && s.half.meta.state & REPLY_SEEN == 0;
    // The origin half holds the state; a reply needs it only when it can
    // move it: the first one, and TCP's SYN, FIN and RST. (The reply
    // side's plain ACKs would move only LAST_ACK to TIME_WAIT: such a pair
    // goes after LAST_ACK's 30 s, where conntrack keeps it 120 s.)
    let news = first_reply
        || (s.key.proto == IPPROTO_TCP && tcp_flags & (tcp::SYN | tcp::FIN | tcp::RST) != 0);
    let stamped = stored.touch(now);
    let mut origin_at = if origin { Some(stored) } else { None };
    if stamped || (!origin && news) {
        s.other = paired_key(&s.translation, &s.key);
        s.spare = paired_half(&s.key, &s.half, now);
        let other = match table::get(&mut s.compact, &s.other, &mut s.other_half) {
            // Another flow's half where ours should be: this flow's port
            // (or its client's tuple) is no longer its own.
            Some(_) if !pairs_with(&s.spare, &s.other_half) => None,
            Some(other) => Some(other),
            None => repair(s),
        };
        let Some(other) = other else {
            table::remove(&mut s.compact, &s.key);
            if origin && s.half.meta.state & CHARGED != 0 {
                table::refund(&mut s.compact, &s.key);
            }
            table::count(TableEvent::Ended);
            return false;
        };
        if !origin {
            origin_at = Some(other);
        }
    }
    let advanced = match origin_at {
        Some(at) if origin || news => advance(s, at, origin, tcp_flags),
        _ => false,
    };
    // Marked only once the origin's state has taken the reply in.
    if first_reply && advanced {
        let meta = stored.meta();
        let seen = Meta {
            state: meta.state | REPLY_SEEN,
            ..meta
        };
        // Only this bit of a reply half changes, and every writer sets it.
        stored.replace_meta(meta, seen);
    }
    true
}

/// Makes the half that pairs with `s.half` (`s.spare`, from
/// `paired_half`) again at `s.other`, where none was found. `None` when the
/// key is now another flow's (a newer flow of the same client, or a port
/// taken meanwhile): this half's flow is over.
#[inline(always)]
fn repair(s: &mut Scratch) -> Option<Stored> {
    match table::insert_new(&mut s.compact, &s.other, &s.spare) {
        Ok(()) => table::count(TableEvent::Repaired),
        Err(Refused::Full) => return None,
        // Another CPU made a half there first: ours only if it is the one
        // this half pairs with.
        Err(Refused::Taken) => {}
    }
    let stored = table::get(&mut s.compact, &s.other, &mut s.other_half)?;
    pairs_with(&s.spare, &s.other_half).then_some(stored)
}

/// Moves the flow's state (in its origin half, at `at`, copied in
/// `s.half` or `s.other_half`) on by a packet from `from_origin`'s side;
/// whoever installs an answered state gives its source's budget back.
/// True once the state holds the packet (moved, or nothing to move).
#[inline(always)]
fn advance(s: &mut Scratch, at: Stored, from_origin: bool, tcp_flags: u8) -> bool {
    let copy = if from_origin {
        s.half.meta
    } else {
        s.other_half.meta
    };
    // A few tries: each failure means another CPU moved it meanwhile.
    for _ in 0..4 {
        let meta = at.meta();
        // A preallocated map reuses a deleted element at once: if the
        // sweeper took this pair meanwhile, the element may be another
        // flow's now (its port and kind tell).
        if meta.port != copy.port || meta.kind != copy.kind {
            return false;
        }
        let Some((state, release)) =
            next_state_bits(meta.state, s.key.proto, from_origin, tcp_flags)
        else {
            return true;
        };
        if at.replace_meta(meta, Meta { state, ..meta }) {
            if release {
                // The client is the origin key's source.
                let client = if from_origin { s.key } else { s.other };
                table::refund(&mut s.compact, &client);
            }
            if matches!(meta.flow_state(), FlowState::TimeWait | FlowState::Close)
                && FlowState::from_bits(state) == FlowState::SynSent
            {
                table::count(TableEvent::Reopened);
            }
            return true;
        }
    }
    false
}

/// What became of a new flow.
pub enum Made {
    /// Its pair is in the table, as `s.translation` says.
    Created,
    /// Another CPU made the same flow first: its pair is used, resolved
    /// into `s.translation`.
    Adopted,
    /// Refused, for this reason (the caller counts it, `table::count`).
    Refused(TableEvent),
    /// Another CPU made the same flow first, and it was gone again before
    /// it could be used (counted as a race lost).
    Lost,
}

/// Records a new flow: `p` (keyed `s.key`) leaves through `egress` with
/// `s.src`/`s.dst` and, when `allocate`, a fresh source port from the fast
/// path's range; `service` says `s.dst` is `TS_DEST_IP` (so the reply's
/// source is the node's tailnet address). The reply half is added first,
/// and only where no entry is, which is what makes a port ours alone; then
/// the origin half, or, if another CPU added that first, its flow is used
/// and our reply half taken back.
#[inline(always)]
pub fn create(
    cfg: &Config,
    p: &Packet,
    s: &mut Scratch,
    allocate: bool,
    service: bool,
    egress: Device,
    now: u32,
) -> Made {
    let charged = match table::charge(&mut s.compact, &s.key, cfg.unreplied_per_source) {
        Charge::Taken => CHARGED,
        Charge::Unlimited => 0,
        Charge::Refused => return Made::Refused(TableEvent::OverBudget),
    };
    let service = if service {
        kind::SERVICE_FROM_CONFIG
    } else {
        0
    };
    s.half = Half {
        addr: s.src,
        meta: Meta {
            port: p.sport,
            kind: kind::ORIGIN | service,
            state: FlowState::first(p.proto) as u8 | charged,
        },
        last_seen: now,
    };
    s.other_half = Half {
        addr: p.src,
        meta: Meta {
            port: s.key.client_port(true),
            kind: service,
            state: 0,
        },
        last_seen: now,
    };
    // The reply as it will arrive: the answer to the packet as it leaves.
    s.other = FlowKey {
        src: s.src,
        dst: s.dst,
        ..s.key
    }
    .reply(egress as u8);
    // Whether the reply half is the one this packet added (else another
    // CPU's, for the same flow).
    let made = if allocate {
        claim_port(s).map(|()| true)
    } else {
        match table::insert_new(&mut s.compact, &s.other, &s.other_half) {
            Ok(()) => Ok(true),
            // Untranslated, both CPUs make the same reply half: if that
            // is what is there, the race is on the origin half below.
            Err(Refused::Taken) if same_half_at_other(s) => Ok(false),
            Err(why) => Err(refusal(why)),
        }
    };
    let ours = match made {
        Ok(ours) => ours,
        Err(event) => {
            if charged != 0 {
                table::refund(&mut s.compact, &s.key);
            }
            return Made::Refused(event);
        }
    };
    match table::insert_new(&mut s.compact, &s.key, &s.half) {
        Ok(()) => {
            table::count(TableEvent::Created);
            resolve(cfg, &s.key, &s.half, &mut s.translation);
            Made::Created
        }
        Err(why) => {
            if ours {
                table::remove(&mut s.compact, &s.other);
            }
            if charged != 0 {
                table::refund(&mut s.compact, &s.key);
            }
            if why == Refused::Full {
                return Made::Refused(TableEvent::TableFull);
            }
            table::count(TableEvent::RaceLost);
            // The winner's pair is brand new: nothing to check or move on,
            // only to translate by.
            if find(s).is_some() && resolve(cfg, &s.key, &s.half, &mut s.translation) {
                Made::Adopted
            } else {
                Made::Lost
            }
        }
    }
}

/// Whether the half at `s.other` is the reply half `s.other_half` this
/// flow would make.
#[inline(always)]
fn same_half_at_other(s: &mut Scratch) -> bool {
    table::get(&mut s.compact, &s.other, &mut s.spare).is_some()
        && pairs_with(&s.other_half, &s.spare)
}

fn refusal(why: Refused) -> TableEvent {
    match why {
        Refused::Taken => TableEvent::PortsTaken,
        Refused::Full => TableEvent::TableFull,
    }
}

/// Finds a port of the fast path's range that no half holds and adds the
/// reply half (`s.other`, `s.other_half`) with it; the origin half
/// (`s.half`) gets the same port.
#[inline(always)]
fn claim_port(s: &mut Scratch) -> Result<(), TableEvent> {
    // SAFETY: a plain helper call.
    let random = unsafe { bpf_get_prandom_u32() };
    for attempt in 0..NAT_PORT_TRIES {
        let port = nat_port(random, attempt).to_be();
        s.other.set_client_port(false, port);
        // Looked up first: a taken port costs no failed insert.
        if table::exists(&mut s.compact, &s.other) {
            continue;
        }
        match table::insert_new(&mut s.compact, &s.other, &s.other_half) {
            Ok(()) => {
                s.half.meta.port = port;
                return Ok(());
            }
            // Another CPU took it between the look and the insert.
            Err(Refused::Taken) => continue,
            Err(Refused::Full) => return Err(TableEvent::TableFull),
        }
    }
    Err(TableEvent::PortsTaken)
}
