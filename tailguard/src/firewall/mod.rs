//! TailGuard's nftables table: applied as one atomic batch through the
//! `nftables` crate (which drives `nft -j`), one rule per row of the policy
//! (docs/policy.md), replaced whole when what it
//! depends on changes, removed at teardown.

mod rules;

pub use rules::{FAST_PATH_PORTS, FirewallPlan, TABLE};

use nftables::helper;
use tracing::info;

use crate::{
    config::{plan::Plan, settings::DatapathMode},
    host::observed::Observed,
};

/// What failed while changing TailGuard's table.
#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("applying the nftables table inet {TABLE}")]
    Apply(#[source] helper::NftablesError),
    #[error("removing the nftables table inet {TABLE}")]
    Remove(#[source] helper::NftablesError),
}

impl FirewallPlan {
    /// The table for `plan` while the kernel and Tailscale report `observed`.
    pub fn new(plan: &Plan, observed: &Observed) -> Self {
        let f = &plan.forwarding;
        Self {
            wg_device: plan.wireguard.device.clone(),
            ts_device: plan.tailscale.device.clone(),
            wg_port: observed.wg_port,
            ts_port: plan.tailscale.port,
            status_port: f.status_page_port,
            expose_host: f.expose_host,
            isolate_peers: f.isolate_peers,
            snat_to_wg: f.snat_to_wg,
            dest: f.dest_ip,
            ts_v4: observed.ts_v4,
            ts_v6: observed.ts_v6,
            fast_path_ports: f.datapath == DatapathMode::Ebpf,
        }
    }
}

/// The table as last applied.
#[derive(Default)]
pub struct Firewall {
    applied: Option<FirewallPlan>,
}

impl Firewall {
    /// Makes the table match `plan`; nothing happens when it already does.
    pub async fn apply(&mut self, plan: &FirewallPlan) -> Result<(), FirewallError> {
        if self.applied.as_ref() == Some(plan) {
            return Ok(());
        }
        helper::apply_ruleset_async(&rules::replace(plan))
            .await
            .map_err(FirewallError::Apply)?;
        info!(table = TABLE, ts_v4 = ?plan.ts_v4, ts_v6 = ?plan.ts_v6, "nftables table applied");
        self.applied = Some(plan.clone());
        Ok(())
    }

    /// Removes the table (harmless when it is not there).
    pub async fn remove(&mut self) -> Result<(), FirewallError> {
        helper::apply_ruleset_async(&rules::remove())
            .await
            .map_err(FirewallError::Remove)?;
        self.applied = None;
        Ok(())
    }
}
