//! Reading the per-CPU counters the programs keep: one count per packet
//! and hook (see `tailguard_common::counters`).

use std::collections::BTreeMap;

use aya::{Ebpf, maps::PerCpuArray};
use tailguard_common::{Counter, CounterSlot, Device, Direction, Outcome, PacketClass};

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

/// The counters: the egress hooks' as the programs keep them, the ingress
/// hooks' summed from the outcomes (which count each arriving packet once,
/// by class and outcome).
pub(super) fn read(ebpf: &Ebpf) -> Result<Counters, Error> {
    let mut counters = sum_per_cpu(ebpf, MAP, CounterSlot::all().map(|slot| slot.index()))?;
    let outcomes = read_outcomes(ebpf)?;
    for slot in CounterSlot::all().filter(|slot| slot.direction == Direction::Ingress) {
        counters.insert(slot.index(), outcomes.class_total(slot.device, slot.class));
    }
    Ok(Counters(counters))
}

/// Each index of the per-CPU counter array `name`, summed over CPUs.
fn sum_per_cpu(
    ebpf: &Ebpf,
    name: &'static str,
    indexes: impl Iterator<Item = u32>,
) -> Result<BTreeMap<u32, Counter>, Error> {
    let map_error = maps::map_error(name);
    let map: PerCpuArray<_, Counter> =
        PerCpuArray::try_from(maps::get(ebpf, name)?).map_err(&map_error)?;
    let mut sums = BTreeMap::new();
    for index in indexes {
        let per_cpu = map.get(&index, 0).map_err(&map_error)?;
        let sum = per_cpu
            .iter()
            .copied()
            .fold(Counter::default(), Counter::add);
        sums.insert(index, sum);
    }
    Ok(sums)
}

/// What the ingress programs did, per device and outcome, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcomes(BTreeMap<u32, Counter>);

impl Outcomes {
    /// Packets of every class on `device` that came to `outcome`.
    pub fn get(&self, device: Device, outcome: Outcome) -> Counter {
        PacketClass::ALL
            .into_iter()
            .map(|class| self.of_class(device, class, outcome))
            .fold(Counter::default(), Counter::add)
    }

    fn of_class(&self, device: Device, class: PacketClass, outcome: Outcome) -> Counter {
        self.0
            .get(&outcome.index(device, class))
            .copied()
            .unwrap_or_default()
    }

    /// Packets of `class` that arrived on `device`, whatever became of them.
    fn class_total(&self, device: Device, class: PacketClass) -> Counter {
        Outcome::ALL
            .into_iter()
            .map(|outcome| self.of_class(device, class, outcome))
            .fold(Counter::default(), Counter::add)
    }

    /// For the report: per device, the outcomes that happened.
    pub fn report(&self) -> crate::report::Counters {
        Device::ALL
            .into_iter()
            .map(|device| {
                let outcomes = Outcome::ALL
                    .into_iter()
                    .map(|outcome| (outcome, self.get(device, outcome)))
                    .filter(|(_, c)| c.packets > 0)
                    .map(|(outcome, c)| {
                        let count = crate::report::Count {
                            packets: c.packets,
                            bytes: c.bytes,
                        };
                        (outcome.name().to_string(), count)
                    })
                    .collect();
                (device.name().to_string(), outcomes)
            })
            .collect()
    }
}

pub(super) fn read_outcomes(ebpf: &Ebpf) -> Result<Outcomes, Error> {
    let slots = 0..tailguard_common::outcome::OUTCOME_SLOTS;
    sum_per_cpu(ebpf, "OUTCOMES", slots).map(Outcomes)
}
