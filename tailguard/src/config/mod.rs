//! Everything the daemon is told, checked and turned into a [`plan::Plan`]
//! without touching the system: the settings, the wg-quick file, the routes
//! to advertise. Nothing here depends on the datapath or on Tailscale's
//! client code; later steps depend on this.

pub mod advertised_routes;
pub mod extra_args;
pub mod family;
pub mod plan;
pub mod secrets;
pub mod settings;
pub mod tailnet;
pub mod wg_quick;
