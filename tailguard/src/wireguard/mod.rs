//! The WireGuard side: the device (kernel module or wireguard-go), its
//! bring-up as wg-quick does it, the refresh of peers' DNS endpoints, and
//! whether the peers it connects to still answer (their handshakes).

pub mod bring_up;
pub mod device;
pub mod endpoints;
pub mod handshakes;
pub mod report;
