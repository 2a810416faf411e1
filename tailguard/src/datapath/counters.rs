//! Reading the per-CPU counters the programs keep.

use std::collections::BTreeMap;

use aya::{Ebpf, maps::PerCpuArray};
use tailguard_common::{Counter, CounterSlot, Device, Direction, PacketClass};

use super::{Error, maps};

const MAP: &str = "COUNTERS";

/// Counters summed over CPUs, one per slot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters(BTreeMap<u32, Counter>);

impl Counters {
    /// Every slot at zero.
    pub fn zero() -> Self {
        Self(
            CounterSlot::all()
                .map(|slot| (slot.index(), Counter::default()))
                .collect(),
        )
    }

    pub fn get(&self, device: Device, direction: Direction, class: PacketClass) -> Counter {
        let index = CounterSlot::new(device, direction, class).index();
        self.0.get(&index).copied().unwrap_or_default()
    }

    /// The sum over every packet class of one hook.
    pub fn hook_total(&self, device: Device, direction: Direction) -> Counter {
        PacketClass::ALL
            .into_iter()
            .map(|class| self.get(device, direction, class))
            .fold(Counter::default(), Counter::add)
    }

    /// Every slot with its counts, in index order.
    pub fn slots(&self) -> impl Iterator<Item = (CounterSlot, Counter)> + '_ {
        CounterSlot::all().map(|slot| (slot, self.get(slot.device, slot.direction, slot.class)))
    }
}

pub(super) fn read(ebpf: &Ebpf) -> Result<Counters, Error> {
    let map_error = maps::map_error(MAP);
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(maps::get(ebpf, MAP)?).map_err(&map_error)?;
    let mut sums = BTreeMap::new();
    for slot in CounterSlot::all() {
        let index = slot.index();
        let per_cpu = map.get(&index, 0).map_err(&map_error)?;
        let sum = per_cpu
            .iter()
            .copied()
            .fold(Counter::default(), Counter::add);
        sums.insert(index, sum);
    }
    Ok(Counters(sums))
}
