//! What the ingress programs did with each packet, counted per device in the
//! per-CPU `OUTCOMES` array (packets and bytes), so `tailguard status` can say
//! how much took the fast path and why the rest did not.

use crate::Device;

/// One numbered outcome. Numbers are stable: they index the map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Translated as needed and redirected to the other device.
    Redirected = 0,
    /// Handed to the kernel: the daemon has not configured the programs yet.
    KernelNotConfigured = 1,
    /// Handed to the kernel: not IP, fragments, IPv6 extension headers,
    /// protocols other than TCP/UDP/ICMP echo, ICMP errors.
    KernelNotHandled = 2,
    /// Handed to the kernel: part of a flow the fast path did not see start
    /// (the kernel's conntrack owns it).
    KernelNotOurFlow = 3,
    /// Handed to the kernel: addressed to the host itself (input policy).
    KernelLocal = 4,
    /// Handed to the kernel: the device its route needs is not there yet
    /// (the Tailscale device before tailscaled made it, or no own address).
    KernelNoRoute = 5,
    /// Handed to the kernel: the TTL / hop limit would expire, so it answers.
    KernelTtl = 6,
    /// Handed to the kernel: too big for the egress device, so it fragments
    /// or says "packet too big".
    KernelTooBig = 7,
    /// Handed to the kernel: no free translation port (or the map refused).
    KernelNoPort = 8,
    /// Dropped: traffic between WireGuard peers with `WG_ISOLATE_PEERS=1`.
    DropIsolated = 9,
    /// Dropped: a rewrite or redirect helper failed.
    DropHelperFailed = 10,
    /// An ICMP error about a flow of ours, translated back (quote and all)
    /// and redirected to the flow's sender.
    ErrorTranslated = 11,
    /// Dropped: bound for neither side nor the host (the uplink, the
    /// internet), which the policy does not forward.
    DropNoRoute = 12,
    /// Handed to the kernel: a UDP datagram of a flow the kernel's
    /// conntrack tracks (started before the programs were attached, left to
    /// the kernel when no port was free, or a reply to the host's own
    /// datagrams), which stays the kernel's.
    KernelTrackedFlow = 13,
}

impl Outcome {
    pub const COUNT: u32 = 14;

    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::Redirected,
        Self::KernelNotConfigured,
        Self::KernelNotHandled,
        Self::KernelNotOurFlow,
        Self::KernelLocal,
        Self::KernelNoRoute,
        Self::KernelTtl,
        Self::KernelTooBig,
        Self::KernelNoPort,
        Self::DropIsolated,
        Self::DropHelperFailed,
        Self::ErrorTranslated,
        Self::DropNoRoute,
        Self::KernelTrackedFlow,
    ];

    /// The index of (`device`, `self`) in `OUTCOMES`.
    pub const fn index(self, device: Device) -> u32 {
        device as u32 * Self::COUNT + self as u32
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Redirected => "redirected",
            Self::KernelNotConfigured => "kernel:not-configured",
            Self::KernelNotHandled => "kernel:not-handled",
            Self::KernelNotOurFlow => "kernel:not-our-flow",
            Self::KernelLocal => "kernel:local",
            Self::KernelNoRoute => "kernel:no-route",
            Self::KernelTtl => "kernel:ttl",
            Self::KernelTooBig => "kernel:too-big",
            Self::KernelNoPort => "kernel:no-port",
            Self::DropIsolated => "drop:isolated-peers",
            Self::DropHelperFailed => "drop:helper-failed",
            Self::ErrorTranslated => "icmp-error-translated",
            Self::DropNoRoute => "drop:not-forwarded",
            Self::KernelTrackedFlow => "kernel:tracked-flow",
        }
    }
}

/// Slots in `OUTCOMES`: every outcome for both devices.
pub const OUTCOME_SLOTS: u32 = 2 * Outcome::COUNT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_slot() {
        let mut seen = [false; OUTCOME_SLOTS as usize];
        for device in Device::ALL {
            for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
                assert_eq!(outcome as usize, i, "ALL is in number order");
                let slot = outcome.index(device) as usize;
                assert!(!seen[slot]);
                seen[slot] = true;
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
