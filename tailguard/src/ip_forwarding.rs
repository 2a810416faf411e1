//! The kernel's IP forwarding switches: on while TailGuard runs (the
//! netfilter datapath forwards through the kernel, and so does every packet
//! the eBPF fast path hands over), back to what they were afterwards.

use std::{fs, io};

use tracing::info;

const SWITCHES: [&str; 2] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
];

/// The switches we turned on, with the values they had.
pub struct IpForwarding {
    changed: Vec<(&'static str, String)>,
}

impl IpForwarding {
    pub fn enable() -> io::Result<Self> {
        let mut changed = Vec::new();
        for path in SWITCHES {
            let before = read(path)?;
            if before != "1" {
                if let Err(e) = write(path, "1") {
                    let _ = Self { changed }.restore();
                    return Err(e);
                }
                info!(switch = path, "IP forwarding turned on");
                changed.push((path, before));
            }
        }
        Ok(Self { changed })
    }

    pub fn restore(self) -> io::Result<()> {
        let mut result = Ok(());
        for (path, before) in self.changed {
            if let Err(e) = write(path, &before) {
                result = result.and(Err(e));
            }
        }
        result
    }
}

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))
}

fn write(path: &str, value: &str) -> io::Result<()> {
    fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("writing {path}: {e}")))
}
