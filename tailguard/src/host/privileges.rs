//! What the process may do, said once at start-up: in a container each
//! missing capability, device or switch is named with the flag that grants
//! it, instead of surfacing later as a bare "operation not permitted".

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// Capability numbers from `linux/capability.h`.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The effective capability set of this process (`CapEff`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities(u64);

impl Capabilities {
    pub fn of_this_process() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        Self::parse(&status)
    }

    fn parse(status: &str) -> Self {
        let bits = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or(0);
        Self(bits)
    }

    const fn has(self, cap: u32) -> bool {
        self.0 & (1 << cap) != 0
    }
}

/// What TailGuard cannot run without, each with the flag that grants it.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "missing CAP_NET_ADMIN: WireGuard, addresses, routes and the nftables table need it \
         (docker: --cap-add NET_ADMIN)"
    )]
    NoNetAdmin,
    #[error(
        "no {}: tailscaled and userspace WireGuard make TUN devices (docker: --device /dev/net/tun)",
        .0.display()
    )]
    NoTun(PathBuf),
}

/// Checks what TailGuard needs and says what is missing: fails for what it
/// cannot run without, warns for what only costs the fast path or the
/// pinned connection state. `ebpf`: the eBPF datapath is wanted.
pub fn check(caps: Capabilities, tun: &Path, ebpf: bool) -> Result<(), PrivilegeError> {
    if !caps.has(CAP_NET_ADMIN) {
        return Err(PrivilegeError::NoNetAdmin);
    }
    if !tun.exists() {
        return Err(PrivilegeError::NoTun(tun.to_path_buf()));
    }
    let bpf = caps.has(CAP_BPF) || caps.has(CAP_SYS_ADMIN);
    if ebpf && !bpf {
        warn!(
            "missing CAP_BPF (and CAP_SYS_ADMIN): the eBPF fast path cannot load and netfilter will \
             forward everything (docker: --cap-add BPF --cap-add PERFMON, or SYS_ADMIN on engines \
             that do not know CAP_BPF)"
        );
    }
    if ebpf && bpf && !caps.has(CAP_PERFMON) && !caps.has(CAP_SYS_ADMIN) {
        info!(
            "no CAP_PERFMON: the verifier adds its speculation guards to the programs \
             (docker: --cap-add PERFMON)"
        );
    }
    if ebpf && !caps.has(CAP_SYS_ADMIN) && !is_bpffs(Path::new("/sys/fs/bpf")) {
        warn!(
            "no bpffs on /sys/fs/bpf and no CAP_SYS_ADMIN to mount one: flows through the fast \
             path will not survive a restart (docker: -v /sys/fs/bpf:/sys/fs/bpf)"
        );
    }
    Ok(())
}

/// `BPF_FS_MAGIC` from the kernel's `magic.h`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A bpffs is mounted at `path`.
pub fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[u32]) -> Capabilities {
        Capabilities(list.iter().fold(0, |bits, cap| bits | 1 << cap))
    }

    #[test]
    fn the_effective_set_is_read_from_proc_status() {
        let status = "Name:\ttailguard\nCapInh:\t0000000000000000\nCapEff:\t0000000000001000\n";
        assert_eq!(Capabilities::parse(status), caps(&[CAP_NET_ADMIN]));
    }

    #[test]
    fn what_is_missing_is_named_with_its_flag() {
        let tun = Path::new("/proc/self/status"); // exists
        let e = check(caps(&[CAP_BPF]), tun, true).unwrap_err().to_string();
        assert!(
            e.contains("CAP_NET_ADMIN") && e.contains("--cap-add NET_ADMIN"),
            "{e}"
        );
        let e = check(caps(&[CAP_NET_ADMIN]), Path::new("/nonexistent/tun"), true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device /dev/net/tun"), "{e}");
        assert!(
            check(caps(&[CAP_NET_ADMIN]), tun, true).is_ok(),
            "eBPF only warns"
        );
    }
}
