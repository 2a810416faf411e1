//! TailGuard: joins a WireGuard network to a Tailscale tailnet.
//!
//! The daemon binary (`src/main.rs`) is a thin shell over this library, so the
//! integration tests drive exactly the code the daemon runs.
pub mod conntrack;
pub mod daemon;
pub mod datapath;
pub mod endpoints;
pub mod family;
pub mod fault;
pub mod firewall;
pub mod forwarding;
pub mod gro;
pub mod health;
pub mod netlink;
pub mod plan;
pub mod preflight;
pub mod privileges;
pub mod resolver;
pub mod routes;
pub mod secrets;
pub mod settings;
pub mod sysctls;
pub mod tailscale;
pub mod wg_setup;
pub mod wgconf;
pub mod wgconf_render;
pub mod wgpair;
pub mod wireguard;
