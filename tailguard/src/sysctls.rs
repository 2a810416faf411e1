//! The kernel switches TailGuard needs while it runs, back to what they were
//! afterwards:
//! - IP forwarding, both families: the netfilter datapath forwards through
//!   the kernel, and so does every packet the eBPF fast path hands over;
//! - the fast path's translation ports reserved (`ip_local_reserved_ports`),
//!   so the host never binds one of them itself, even with a widened
//!   ephemeral range: a port the fast path hands out is never also the
//!   host's own on the same address.

use std::{fs, io};

use tailguard_common::nat::NAT_PORT_FIRST;
use tracing::info;

const FORWARDING: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];
/// Covers IPv6 too.
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// The switches we changed, with the values they had.
pub struct Sysctls {
    changed: Vec<(&'static str, String)>,
}

impl Sysctls {
    pub fn apply() -> io::Result<Self> {
        let mut applied = Self {
            changed: Vec::new(),
        };
        for path in FORWARDING.into_iter().chain([RESERVED_PORTS]) {
            let before = read(path)?;
            let after = if path == RESERVED_PORTS {
                with_nat_ports(&before)
            } else {
                "1".to_string()
            };
            if after == before {
                continue;
            }
            if let Err(e) = write(path, &after) {
                let _ = applied.restore();
                return Err(e);
            }
            info!(switch = path, value = after, "kernel switch set");
            applied.changed.push((path, before));
        }
        Ok(applied)
    }

    pub fn restore(self) -> io::Result<()> {
        let mut result = Ok(());
        for (path, before) in self.changed.into_iter().rev() {
            if let Err(e) = write(path, &before) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

/// The reserved port list with the fast path's range added (once).
fn with_nat_ports(before: &str) -> String {
    let range = format!("{NAT_PORT_FIRST}-65535");
    if before.split(',').any(|r| r == range) {
        before.to_string()
    } else if before.is_empty() {
        range
    } else {
        format!("{before},{range}")
    }
}

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))
}

fn write(path: &str, value: &str) -> io::Result<()> {
    // With a newline: an empty write would change nothing (an empty list
    // is written as just the newline).
    fs::write(path, format!("{value}\n")).map_err(|e| {
        // A container's /proc/sys is read-only: the engine sets them.
        let key = path.trim_start_matches("/proc/sys/").replace('/', ".");
        io::Error::new(
            e.kind(),
            format!("writing {path}: {e} (in a container, start it with --sysctl {key}={value})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_nat_range_is_added_once_to_what_is_reserved() {
        assert_eq!(with_nat_ports(""), "61000-65535");
        assert_eq!(with_nat_ports("8080"), "8080,61000-65535");
        assert_eq!(with_nat_ports("8080,61000-65535"), "8080,61000-65535");
    }
}
