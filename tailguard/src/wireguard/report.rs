//! The WireGuard device as the status report shows it: what `wg show`
//! prints, less the private and preshared keys, plus each peer's traffic
//! over the last minutes.

use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use wireguard_control::{Backend, Device};

use crate::report::{WireGuardPeerReport, WireGuardReport, history::PeerTraffic};

/// Each peer's received plus sent bytes, for [`PeerTraffic::record`].
pub fn byte_totals(device: &Device) -> Vec<(String, u64)> {
    device
        .peers
        .iter()
        .map(|p| {
            let key = p.config.public_key.to_base64();
            (key, p.stats.rx_bytes + p.stats.tx_bytes)
        })
        .collect()
}

/// The report of `device`; `userspace_program` names a userspace one.
pub fn report(device: &Device, userspace_program: &str, traffic: &PeerTraffic) -> WireGuardReport {
    let peers = device
        .peers
        .iter()
        .map(|p| {
            let public_key = p.config.public_key.to_base64();
            WireGuardPeerReport {
                traffic: traffic.traffic(&public_key),
                public_key,
                endpoint: p.config.endpoint,
                allowed_ips: p
                    .config
                    .allowed_ips
                    .iter()
                    .filter_map(|a| IpNet::new(a.address, a.cidr).ok())
                    .collect(),
                last_handshake: p.stats.last_handshake_time.and_then(unix_seconds),
                received_bytes: p.stats.rx_bytes,
                sent_bytes: p.stats.tx_bytes,
                persistent_keepalive: p.config.persistent_keepalive_interval.filter(|&s| s > 0),
            }
        })
        .collect();
    WireGuardReport {
        interface: device.name.as_str_lossy().into_owned(),
        public_key: device.public_key.as_ref().map(|k| k.to_base64()),
        listen_port: device.listen_port.unwrap_or(0),
        fwmark: device.fwmark.filter(|&m| m != 0),
        implementation: match device.backend {
            Backend::Kernel => "kernel".to_string(),
            Backend::Userspace => userspace_program.to_string(),
        },
        peers,
    }
}

/// Unix seconds; `None` for the epoch itself (WireGuard's "never").
fn unix_seconds(t: SystemTime) -> Option<u64> {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
        .filter(|&s| s > 0)
}
