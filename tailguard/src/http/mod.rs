//! The daemon's HTTP side: the health address (`/healthz`, `/status`) and
//! the status page on `TG_WEBUI_PORT`, served by one bounded server.

pub mod health;
mod host_header;
mod page;
mod rate_limit;
pub mod server;
