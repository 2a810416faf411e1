//! Whether a device's packets start with an Ethernet header.
//!
//! WireGuard and TUN devices are L3: `skb->data` starts at the IP header. The
//! benchmarks' veth links and `BPF_PROG_TEST_RUN` (which always hands a
//! classifier an Ethernet frame) are L2. The daemon sets these globals when
//! it loads the object, so the check costs one read of a constant.
//!
//! A frame redirected out of an Ethernet device needs the next hop's and
//! the device's own address. The daemon knows them from the neighbour
//! table (`Config::link`); only while it does not, the kernel looks them
//! up per packet (`bpf_redirect_neigh`).

use aya_ebpf::{Global, programs::TcContext};
use tailguard_common::{Device, wire::ETH_HEADER};

use crate::{config, parse};

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

/// Writes the Ethernet addresses the daemon knows for frames out of `to`
/// into the packet's header (destination, then source); false when it
/// knows none, or the packet has no room for them.
#[inline(always)]
pub fn address_frame(ctx: &TcContext, to: Device) -> bool {
    let Some(link) = config::config().map(|c| c.link(to)) else {
        return false;
    };
    if !link.is_known() {
        return false;
    }
    let Some(at) = parse::at_mut::<[u8; 12]>(ctx, 0) else {
        return false;
    };
    // SAFETY: `at_mut` checked that 12 bytes lie within the packet.
    unsafe { at.write_unaligned(link.header) };
    true
}
