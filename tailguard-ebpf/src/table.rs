//! The connection table's maps (`tailguard_common::nat`): the two halves
//! of every pair in one plain hash map per family, the unreplied budget of
//! each source, and the table's event counters. Everything here speaks the
//! working forms (`FlowKey`, `Half`) and turns them into the family's
//! compact ones in per-CPU scratch at the map call.

use core::intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd};

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tailguard_common::nat::{
    FlowKey, Half, Half4, Half6, Key4, Key6, Meta, SourceKey, TableEvent, TableSize,
};

/// The halves of every IPv4 and every IPv6 pair. The daemon sizes them at
/// load time from `TG_NAT_FLOWS` and pins them, so flows outlive a restart
/// of the daemon; its sweeper removes expired pairs.
#[map]
static NAT4: HashMap<Key4, Half4> =
    HashMap::with_max_entries(TableSize::COMPILED.entries(false), 0);
#[map]
static NAT6: HashMap<Key6, Half6> = HashMap::with_max_entries(TableSize::COMPILED.entries(true), 0);

/// Unreplied flows held per source (`SourceKey`). A count, not a list: the
/// flow's origin half says whether it holds one (`nat::CHARGED`). Entries
/// at zero are removed by the daemon's sweeper.
#[map]
static SOURCES: HashMap<SourceKey, i64> =
    HashMap::with_max_entries(TableSize::COMPILED.sources(), 0);

#[map]
static TABLE_EVENTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(TableEvent::COUNT, 0);

/// The compact forms of one key and one half, for the map calls (the
/// stack has no room for them next to the rest).
#[repr(C)]
pub struct Compact {
    k4: Key4,
    k6: Key6,
    h4: Half4,
    h6: Half6,
    source: SourceKey,
}

/// A half in the table: the map value's first word, its `meta` and
/// `last_seen` (see `Half4`). The memory stays valid for this program run,
/// but not the half: a preallocated map hands a deleted element to the
/// next insert at once, so whoever moves a state through it checks first
/// that the port and kind are still the half's (`nat::advance`).
#[derive(Clone, Copy)]
pub struct Stored {
    word: *mut u64,
}

/// The map call's error when the key is taken (`BPF_NOEXIST`).
const EEXIST: i32 = -17;

/// Why a half could not be added.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Its key is held by another entry.
    Taken,
    /// The family's table has no free element.
    Full,
}

#[inline(always)]
pub fn count(event: TableEvent) {
    if let Some(counter) = TABLE_EVENTS.get_ptr_mut(event as u32) {
        // SAFETY: from the map lookup; only this CPU writes its copy.
        unsafe { *counter += 1 };
    }
}

/// The half keyed `key`, copied into `out`.
#[inline(always)]
pub fn get(c: &mut Compact, key: &FlowKey, out: &mut Half) -> Option<Stored> {
    if key.is_ipv6() {
        c.k6 = key.to_v6();
        let h = NAT6.get_ptr_mut(&c.k6)?;
        // SAFETY: from the map lookup, valid for this program run.
        unsafe {
            *out = Half::from_v6(&*h);
        }
        Some(Stored {
            word: h as *mut u64,
        })
    } else {
        c.k4 = key.to_v4();
        let h = NAT4.get_ptr_mut(&c.k4)?;
        // SAFETY: as above.
        unsafe {
            *out = Half::from_v4(&*h);
        }
        Some(Stored {
            word: h as *mut u64,
        })
    }
}

/// Whether any half is keyed `key`.
#[inline(always)]
pub fn exists(c: &mut Compact, key: &FlowKey) -> bool {
    if key.is_ipv6() {
        c.k6 = key.to_v6();
        NAT6.get_ptr(&c.k6).is_some()
    } else {
        c.k4 = key.to_v4();
        NAT4.get_ptr(&c.k4).is_some()
    }
}

/// Adds `half` under `key` only if no entry has that key: never replaces.
#[inline(always)]
pub fn insert_new(c: &mut Compact, key: &FlowKey, half: &Half) -> Result<(), Refused> {
    let flags = u64::from(BPF_NOEXIST);
    let result = if key.is_ipv6() {
        c.k6 = key.to_v6();
        c.h6 = half.to_v6();
        NAT6.insert(&c.k6, &c.h6, flags)
    } else {
        c.k4 = key.to_v4();
        c.h4 = half.to_v4();
        NAT4.insert(&c.k4, &c.h4, flags)
    };
    match result {
        Ok(()) => Ok(()),
        Err(EEXIST) => Err(Refused::Taken),
        // E2BIG: no free element (or ENOMEM): the table cannot take it.
        Err(_) => Err(Refused::Full),
    }
}

#[inline(always)]
pub fn remove(c: &mut Compact, key: &FlowKey) {
    let _ = if key.is_ipv6() {
        c.k6 = key.to_v6();
        NAT6.remove(&c.k6)
    } else {
        c.k4 = key.to_v4();
        NAT4.remove(&c.k4)
    };
}

impl Stored {
    fn read(self) -> u64 {
        // SAFETY: points at the map value (see `Stored`), 8-byte aligned.
        unsafe { core::ptr::read_volatile(self.word) }
    }

    pub fn meta(self) -> Meta {
        meta_of(self.read())
    }

    /// Installs `new` as the meta if it still is `old`. The whole word is
    /// exchanged: a stamp written meanwhile makes it fail, and the caller
    /// tries again.
    pub fn replace_meta(self, old: Meta, new: Meta) -> bool {
        let word = self.read();
        if meta_of(word) != old {
            return false;
        }
        let mut bytes = word.to_ne_bytes();
        bytes[..4].copy_from_slice(&new.word().to_ne_bytes());
        // SAFETY: as in `read`; BPF_CMPXCHG on a map value.
        let (_, done) = unsafe {
            atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
                self.word,
                word,
                u64::from_ne_bytes(bytes),
            )
        };
        done
    }

    /// Stamps the half with `now`; false when it already had it.
    pub fn touch(self, now: u32) -> bool {
        // SAFETY: as in `read`; `last_seen` is the word's second half.
        // A plain store: every CPU writes "now".
        unsafe {
            let last_seen = (self.word as *mut u32).add(1);
            if core::ptr::read_volatile(last_seen) == now {
                return false;
            }
            core::ptr::write_volatile(last_seen, now);
        }
        true
    }
}

fn meta_of(word: u64) -> Meta {
    let b = word.to_ne_bytes();
    Meta::from_word(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// What taking one of a source's unreplied budget came to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Charge {
    /// Taken: the flow holds it (`nat::CHARGED`) until it is answered.
    Taken,
    /// No budget is set: nothing to take.
    Unlimited,
    /// The source holds all of it, or the budget map has no room for one
    /// more source.
    Refused,
}

/// Takes one of the unreplied budget of `key`'s source (`budget` per
/// source; 0: no limit).
#[inline(always)]
pub fn charge(c: &mut Compact, key: &FlowKey, budget: u32) -> Charge {
    if budget == 0 {
        return Charge::Unlimited;
    }
    c.source = SourceKey::of(key);
    let count = match SOURCES.get_ptr_mut(&c.source) {
        Some(count) => count,
        None => {
            // Another CPU may add it first: either way it exists after.
            let _ = SOURCES.insert(&c.source, &0, u64::from(BPF_NOEXIST));
            match SOURCES.get_ptr_mut(&c.source) {
                Some(count) => count,
                None => return Charge::Refused,
            }
        }
    };
    // SAFETY: from the map lookup, an aligned i64 in the map value. The
    // look and the add are two steps (the programs are built for BPF's
    // first instruction set, whose atomic add returns nothing): CPUs
    // racing on one source can take a few more than the budget, never
    // unboundedly many.
    unsafe {
        if core::ptr::read_volatile(count) >= i64::from(budget) {
            return Charge::Refused;
        }
        atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(count, 1);
    }
    Charge::Taken
}

/// Gives back what a flow of `key`'s source took (see `charge`).
#[inline(always)]
pub fn refund(c: &mut Compact, key: &FlowKey) {
    c.source = SourceKey::of(key);
    if let Some(count) = SOURCES.get_ptr_mut(&c.source) {
        // SAFETY: as in `charge`. (Below zero only if the daemon's sweeper
        // removed the entry as idle while a charge raced it; it reads
        // anything below one as none.)
        unsafe { atomic_xadd::<i64, i64, { AtomicOrdering::SeqCst }>(count, -1) };
    }
}
