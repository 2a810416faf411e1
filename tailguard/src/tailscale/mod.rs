//! Tailscale: tailscaled's LocalAPI data (status, preferences) and what
//! TailGuard asks of it. Field names are tailscaled's own, as its source
//! defines them (`ipn/ipnstate/ipnstate.go`, `ipn/prefs.go`).

pub mod localapi;
pub mod prefs;
pub mod status;
pub mod supervisor;
