//! Packet and byte counters, one slot per (device, direction, packet class).
//!
//! The counter map is a per-CPU array indexed by [`CounterSlot::index`]; each
//! CPU increments its own copy without atomics and the daemon sums the copies.
//! The egress programs count there what the kernel sends (what the fast path
//! sends is counted once, at its ingress, under its outcome); the ingress
//! hooks' slots the daemon sums from the outcomes (`crate::outcome`).

use bytemuck::{Pod, Zeroable};

use crate::{Device, Direction};

/// The value stored in each slot of the `COUNTERS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

impl Counter {
    /// Adds another CPU's (or another slot's) counts to this one.
    pub const fn add(self, other: Self) -> Self {
        Self {
            packets: self.packets + other.packets,
            bytes: self.bytes + other.bytes,
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: `Counter` is `Pod` (checked by bytemuck's derive: no padding, every
// bit pattern valid), which is exactly what `aya::Pod` requires.
unsafe impl aya::Pod for Counter {}

/// What the parser made of the packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketClass {
    Ipv4 = 0,
    Ipv6 = 1,
    /// Not IP at all (e.g. ARP on an Ethernet device): passed on untouched.
    NotIp = 2,
    /// Claims to be IP but its header is cut short or inconsistent.
    Malformed = 3,
}

impl PacketClass {
    pub const COUNT: u32 = 4;
    pub const ALL: [Self; Self::COUNT as usize] =
        [Self::Ipv4, Self::Ipv6, Self::NotIp, Self::Malformed];

    /// The class numbered `index` (anything past the last is malformed).
    pub const fn from_index(index: u32) -> Self {
        match index {
            0 => Self::Ipv4,
            1 => Self::Ipv6,
            2 => Self::NotIp,
            _ => Self::Malformed,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
            Self::NotIp => "not_ip",
            Self::Malformed => "malformed",
        }
    }
}

/// One slot of the counter map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CounterSlot {
    pub device: Device,
    pub direction: Direction,
    pub class: PacketClass,
}

impl CounterSlot {
    /// Number of slots; the size of the `COUNTERS` map.
    pub const COUNT: u32 = Device::COUNT * Direction::COUNT * PacketClass::ALL.len() as u32;

    pub const fn new(device: Device, direction: Direction, class: PacketClass) -> Self {
        Self {
            device,
            direction,
            class,
        }
    }

    /// The slot's index in the map: device-major, then direction, then class.
    pub const fn index(self) -> u32 {
        let classes = PacketClass::ALL.len() as u32;
        ((self.device as u32) * Direction::COUNT + self.direction as u32) * classes
            + self.class as u32
    }

    /// Every slot, in index order.
    pub fn all() -> impl Iterator<Item = Self> {
        Device::ALL.into_iter().flat_map(|device| {
            Direction::ALL.into_iter().flat_map(move |direction| {
                PacketClass::ALL
                    .into_iter()
                    .map(move |class| Self::new(device, direction, class))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn every_slot_has_its_own_index_within_the_map() {
        let indexes: Vec<u32> = CounterSlot::all().map(CounterSlot::index).collect();
        let expected: Vec<u32> = (0..CounterSlot::COUNT).collect();
        assert_eq!(indexes, expected);
    }

    #[test]
    fn counter_is_two_u64_without_padding() {
        assert_eq!(core::mem::size_of::<Counter>(), 16);
        let c = Counter {
            packets: 1,
            bytes: 2,
        }
        .add(Counter {
            packets: 3,
            bytes: 4,
        });
        assert_eq!(
            c,
            Counter {
                packets: 4,
                bytes: 6
            }
        );
    }
}
