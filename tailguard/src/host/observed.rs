//! What the kernel and Tailscale report at a given moment, as the daemon
//! gathers it: the inputs, beside the plan, of the datapath's maps and of
//! the nftables table.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::sysctls::Forwarding;

/// What the kernel and Tailscale say at a given moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub wg_ifindex: u32,
    pub wg_mtu: u32,
    /// WireGuard's actual listen port.
    pub wg_port: Option<u16>,
    /// `None` until tailscaled has created its device.
    pub ts_device: Option<(u32, u32)>,
    /// The node's own tailnet addresses.
    pub ts_v4: Option<Ipv4Addr>,
    pub ts_v6: Option<Ipv6Addr>,
    /// Table 52's routes out of the Tailscale device (peers, their subnets,
    /// and the exit node's default routes when one is used).
    pub table52: Vec<IpNet>,
    /// The main table's routes that are not default routes and leave
    /// through neither the WireGuard nor the Tailscale device (the uplink's
    /// network, static routes): the kernel's, never forwarded by us.
    pub main_kernel_routes: Vec<IpNet>,
    /// The user's forwarding switches, as the daemon found them at its start.
    pub forwarding: Forwarding,
}
