//! The per-CPU packet and byte counters the daemon reads.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use tailguard_common::{Counter, CounterSlot};

#[map]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(CounterSlot::COUNT, 0);

/// Adds one packet of `len` bytes to `slot`. Per-CPU slots need no atomics:
/// a program runs on one CPU at a time and is not preempted by itself there.
#[inline(always)]
pub fn count(slot: CounterSlot, len: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(slot.index()) {
        // SAFETY: the pointer comes from the map lookup and stays valid for
        // this program run; only this CPU writes its own copy.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(len);
        }
    }
}
