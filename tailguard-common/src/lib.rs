//! Types shared by the daemon (`tailguard`) and the TC programs (`tailguard-ebpf`).
//!
//! Everything that crosses the user/kernel boundary is `#[repr(C)]` and derives
//! bytemuck's `Pod`, which refuses hidden padding at compile time: the kernel
//! copies map values byte for byte, so both sides must agree on every byte.
#![no_std]

pub mod checksum;
pub mod classify;
pub mod config;
pub mod counters;
pub mod device;
pub mod fragment;
pub mod nat;
pub mod outcome;
pub mod policy;
pub mod wire;

pub use config::{Config, Route};
pub use counters::{Counter, CounterSlot, PacketClass};
pub use device::{Device, Direction};
pub use outcome::Outcome;
pub use policy::PolicyRule;
