//! Endpoint re-resolution: peers whose `Endpoint =` is a host name (dynamic
//! DNS) are looked up again every interval, and only the peers whose address
//! changed are updated — what the original's cron job did every minute.

use std::{collections::HashMap, net::SocketAddr};

use tracing::{info, warn};

use crate::{
    config::plan::WireGuardPlan,
    config::wg_quick::{Endpoint, PublicKey},
    wireguard::device::{WgDevice, WireGuardError, resolve},
};

/// The peers whose endpoint must be set: those resolved to an address other
/// than the one the device has now.
pub fn changed(
    current: &HashMap<PublicKey, Option<SocketAddr>>,
    resolved: &[(PublicKey, SocketAddr)],
) -> Vec<(PublicKey, SocketAddr)> {
    resolved
        .iter()
        .filter(|(key, addr)| current.get(key).copied().flatten() != Some(*addr))
        .copied()
        .collect()
}

/// Looks up every host-name endpoint once and updates the peers that moved.
/// Returns how many were updated. A name that does not resolve is skipped
/// (and tried again next time); the peer keeps its last address.
pub async fn refresh(device: &WgDevice, plan: &WireGuardPlan) -> Result<usize, WireGuardError> {
    let mut resolved = Vec::new();
    for peer in &plan.peers {
        let Some(endpoint @ Endpoint::Host { .. }) = &peer.endpoint else {
            continue;
        };
        match resolve(endpoint).await {
            Some(addr) => resolved.push((peer.public_key, addr)),
            None => warn!(peer = %peer.public_key, %endpoint, "endpoint does not resolve"),
        }
    }
    if resolved.is_empty() {
        return Ok(0);
    }
    let current: HashMap<PublicKey, Option<SocketAddr>> = device
        .reported()
        .await?
        .peers
        .into_iter()
        .map(|p| (PublicKey(p.config.public_key.0), p.config.endpoint))
        .collect();
    let updates = changed(&current, &resolved);
    for (key, addr) in &updates {
        device.set_endpoint(key, *addr).await?;
        info!(peer = %key, endpoint = %addr, "peer endpoint re-resolved to a new address");
    }
    Ok(updates.len())
}

/// Whether any peer has an endpoint worth re-resolving.
pub fn any_dynamic(plan: &WireGuardPlan) -> bool {
    plan.peers
        .iter()
        .any(|p| matches!(p.endpoint, Some(Endpoint::Host { .. })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_peers_whose_address_moved_are_updated() {
        let current = HashMap::from([
            (key(1), Some(addr("203.0.113.1:51820"))),
            (key(2), Some(addr("203.0.113.2:51820"))),
            (key(3), None),
        ]);
        let resolved = [
            (key(1), addr("203.0.113.1:51820")),  // unchanged
            (key(2), addr("198.51.100.2:51820")), // moved
            (key(3), addr("198.51.100.3:51820")), // had none yet
        ];
        assert_eq!(
            changed(&current, &resolved),
            [
                (key(2), addr("198.51.100.2:51820")),
                (key(3), addr("198.51.100.3:51820"))
            ]
        );
        assert!(changed(&current, &resolved[..1]).is_empty());
    }

    #[test]
    fn a_port_change_counts_too() {
        let current = HashMap::from([(key(1), Some(addr("203.0.113.1:51820")))]);
        assert_eq!(
            changed(&current, &[(key(1), addr("203.0.113.1:4500"))]).len(),
            1
        );
    }
}
