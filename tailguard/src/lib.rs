//! TailGuard: joins a WireGuard network to a Tailscale tailnet.
//!
//! The daemon binary (`src/main.rs`) is a thin shell over this library, so the
//! integration tests drive exactly the code the daemon runs.
pub mod datapath;
pub mod plan;
pub mod routes;
pub mod settings;
pub mod wgconf;
