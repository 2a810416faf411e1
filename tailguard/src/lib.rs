//! TailGuard: joins a WireGuard network to a Tailscale tailnet.
//!
//! The daemon binary (`src/main.rs`) is a thin shell over this library, so the
//! integration tests drive exactly the code the daemon runs. The rooms, and
//! the way the data goes through them, are described in
//! `docs/architecture.md`.
pub mod cli;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod errors;
pub mod fault;
pub mod firewall;
pub mod host;
pub mod http;
pub mod report;
pub mod tailscale;
pub mod wireguard;
