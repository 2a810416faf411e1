//! The WireGuard side: the device (kernel module or wireguard-go), its
//! bring-up as wg-quick does it, and the refresh of peers' DNS endpoints.

pub mod bring_up;
pub mod device;
pub mod endpoints;
