//! The daemon's status report: one type for everything the daemon tells
//! about itself. The health server sends it as `/status` (JSON) and renders
//! it as the status page; `tailguard status` and `stats` read it back, and
//! so do the tests: nobody picks fields out of the JSON by name.

pub mod history;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::http::health::{Fallback, Recoveries, RoutesOffer};

/// Everything `/status` says, and the status page shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// TailGuard's version.
    pub version: String,
    /// Ready: traffic can flow both ways now (`/healthz`).
    pub healthy: bool,
    /// Every reason it is not, in one line.
    pub reason: Option<String>,
    /// The same reasons, one each.
    pub reasons: Vec<String>,
    /// Unix seconds.
    pub started_at: u64,
    pub first_healthy_at: Option<u64>,
    pub recoveries: Recoveries,
    pub routes: RoutesOffer,
    /// `ebpf` or `netfilter`.
    pub datapath: String,
    /// Why netfilter forwards although eBPF was wanted.
    pub datapath_fallback: Option<Fallback>,
    /// The settings in effect, by their environment names; secrets only
    /// as "(set)".
    pub settings: Vec<SettingShown>,
    /// What tailscaled said last (`None` before it answered).
    pub tailscale: Option<TailscaleReport>,
    /// The WireGuard device as it was read last.
    pub wireguard: Option<WireGuardReport>,
    /// The WireGuard peers' data is left out for this reader
    /// (`WG_ISOLATE_PEERS=1` on the status page, to a WireGuard peer).
    pub wireguard_peers_hidden: bool,
    /// What the forwarding plane's maps hold (`None`: netfilter).
    pub forwarding: Option<ForwardingReport>,
    /// The fast path's outcome counters since it started (`None`: netfilter).
    pub counters: Option<Counters>,
    /// The same, as rates over the last minute.
    pub rates: Option<Rates>,
    pub connection_table: Option<ConnectionTableReport>,
}

/// One setting as the status page shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingShown {
    pub name: String,
    pub value: String,
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Per device (`wireguard`, `tailscale`), per outcome (`redirected`,
/// `kernel:…`, `drop:…`): the outcomes that happened.
pub type Counters = BTreeMap<String, BTreeMap<String, Count>>;

/// Packets and bytes a second.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    pub packets: f64,
    pub bytes: f64,
}

/// [`Counters`] as rates over the last minute (over as much of it as the
/// daemon has counted), and over how many seconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub over_seconds: f64,
    pub outcomes: BTreeMap<String, BTreeMap<String, Rate>>,
}

impl StatusReport {
    /// The packets counted for `device` and `outcome` (0 if none).
    pub fn counted(&self, device: &str, outcome: &str) -> u64 {
        self.counters
            .as_ref()
            .and_then(|c| c.get(device)?.get(outcome))
            .map_or(0, |c| c.packets)
    }

    /// Leaves out what a WireGuard peer may not see of the others
    /// (`WG_ISOLATE_PEERS=1`): their endpoints and AllowedIPs, the routes
    /// to the WireGuard side (those AllowedIPs again), the host's own
    /// routes, and `TS_DEST_IP`.
    pub fn hide_wireguard_peers(&mut self) {
        if let Some(forwarding) = &mut self.forwarding {
            forwarding.routes.retain(|_, egress| egress == "tailscale");
            forwarding.dest_v4 = None;
            forwarding.dest_v6 = None;
        }
        if let Some(wireguard) = &mut self.wireguard {
            wireguard.peers.clear();
        }
        self.settings.retain(|s| s.name != "TS_DEST_IP");
        self.wireguard_peers_hidden = true;
    }
}

/// Tailscale as tailscaled reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TailscaleReport {
    pub backend_state: String,
    /// tailscaled's version.
    pub version: String,
    /// The machine name (`Self.HostName`).
    pub machine_name: String,
    pub node_id: String,
    /// The MagicDNS name, without the final dot.
    pub dns_name: String,
    pub addresses: Vec<IpAddr>,
    pub online: bool,
    /// When the node key expires (RFC 3339), if it does.
    pub key_expiry: Option<String>,
    pub tailnet: Option<String>,
    /// The exit node this node uses, if any.
    pub exit_node: Option<ExitNodeInUse>,
    /// Every route this node advertises, with the control server's answer.
    pub advertised_routes: Vec<AdvertisedRoute>,
    /// tailscaled's health warnings.
    pub warnings: Vec<String>,
    /// Tailnet peers, and how many are online.
    pub peers: usize,
    pub peers_online: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitNodeInUse {
    pub id: String,
    /// Its machine name, when it is among the known peers.
    pub name: Option<String>,
    pub online: bool,
    pub addresses: Vec<IpNet>,
}

/// One advertised route and whether the control server lets it carry
/// traffic: approved (in `Self.AllowedIPs`) or waiting (in the admin
/// console, or for an auto-approver); primary when this node is the one
/// the tailnet routes it through (`Self.PrimaryRoutes`; several routers may
/// advertise one route).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedRoute {
    pub route: IpNet,
    pub approved: bool,
    pub primary: bool,
}

/// The WireGuard device, as `wg show` would print it (without its keys'
/// secret halves).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardReport {
    pub interface: String,
    /// Base64, as `wg` shows it.
    pub public_key: Option<String>,
    pub listen_port: u16,
    pub fwmark: Option<u32>,
    /// `kernel` or the userspace program's name.
    pub implementation: String,
    pub peers: Vec<WireGuardPeerReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGuardPeerReport {
    pub public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    /// Unix seconds; `None`: never.
    pub last_handshake: Option<u64>,
    pub received_bytes: u64,
    pub sent_bytes: u64,
    /// Seconds; `None`: off.
    pub persistent_keepalive: Option<u16>,
    /// Bytes received and sent in each interval of the last 10 minutes,
    /// oldest first (see [`history`]).
    pub traffic: Vec<u64>,
}

/// The forwarding plane's configuration entry and routes, as the kernel
/// holds them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardingReport {
    pub wg_ifindex: u32,
    pub ts_ifindex: u32,
    pub wg_mtu: u16,
    pub ts_mtu: u16,
    pub ts_v4: Option<Ipv4Addr>,
    pub ts_v6: Option<Ipv6Addr>,
    pub wg_v4: Option<Ipv4Addr>,
    pub wg_v6: Option<Ipv6Addr>,
    pub dest_v4: Option<Ipv4Addr>,
    pub dest_v6: Option<Ipv6Addr>,
    pub isolate_peers: bool,
    pub snat_to_wg: bool,
    pub forward_v4: bool,
    pub forward_v6: bool,
    /// Each prefix the route tries answer by, and where it leads
    /// (`wireguard`, `tailscale`, `kernel`).
    pub routes: BTreeMap<String, String>,
}

/// The connection table: how full, what lives and what the sweeper and the
/// programs did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionTableReport {
    pub ipv4: Occupancy,
    pub ipv6: Occupancy,
    pub unreplied_per_source: u32,
    /// Live flows by state, as of the last sweep.
    pub live: BTreeMap<String, u64>,
    /// Flows the sweeper expired, by state.
    pub expired: BTreeMap<String, u64>,
    pub restored: u64,
    pub orphans_removed: u64,
    pub sweep_failures: u64,
    /// What the programs counted (new flows, refusals, evictions…).
    pub events: BTreeMap<String, u64>,
    pub sweeps: u64,
    pub last_sweep_ms: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupancy {
    pub flows: u64,
    pub capacity: u32,
}
