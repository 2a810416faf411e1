//! Whether a device's packets start with an Ethernet header.
//!
//! WireGuard and TUN devices are L3: `skb->data` starts at the IP header. The
//! benchmarks' veth links and `BPF_PROG_TEST_RUN` (which always hands a
//! classifier an Ethernet frame) are L2. The daemon sets these globals when
//! it loads the object, so the check costs one read of a constant.

use aya_ebpf::Global;
use tailguard_common::{Device, wire::ETH_HEADER};

/// 1 when the WireGuard-side device carries Ethernet frames.
#[unsafe(no_mangle)]
static WG_ETHERNET: Global<u8> = Global::new(0);

/// 1 when the Tailscale-side device carries Ethernet frames.
#[unsafe(no_mangle)]
static TS_ETHERNET: Global<u8> = Global::new(0);

#[inline(always)]
pub fn has_ethernet(device: Device) -> bool {
    let flag = match device {
        Device::WireGuard => &WG_ETHERNET,
        Device::Tailscale => &TS_ETHERNET,
    };
    flag.load() != 0
}

/// Where the IP header of `device`'s packets starts.
#[inline(always)]
pub fn ip_header_offset(device: Device) -> usize {
    if has_ethernet(device) { ETH_HEADER } else { 0 }
}
