//! What the ingress programs did with each packet, counted per device and
//! packet class in the per-CPU `OUTCOMES` array (packets and bytes), so
//! `tailguard status` can say how much took the fast path and why the rest
//! did not. It is the ingress hooks' only count: one update per packet.

use crate::{Device, PacketClass};

/// One numbered outcome. Numbers are stable: they index the map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Translated as needed and redirected to the other device.
    Redirected = 0,
    /// Handed to the kernel: the daemon has not configured the programs yet.
    KernelNotConfigured = 1,
    /// Handed to the kernel: not IP, protocols other than TCP/UDP/ICMP echo,
    /// ICMP errors not about a flow of ours, IPv6 extension headers other
    /// than those the fast path walks, fragments of datagrams whose first
    /// fragment the kernel got (or, if unseen, addressed to the host).
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
    /// Handed to the kernel: too big for the egress device and neither
    /// answered nor fragmented by the fast path (IPv4 with options, GSO
    /// without DF, more than two fragments' worth, an Ethernet egress, no
    /// own address of the family to answer from).
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
    /// Handed to the kernel: bound for the other network (or another
    /// WireGuard peer) while the user left this family's forwarding switch
    /// off, so the kernel does what it does unforwarded (drops it).
    KernelForwardingOff = 13,
    /// Too big for the egress device (IPv4 with DF, or IPv6): answered with
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" from the node,
    /// as the kernel's forwarding path answers it, and not forwarded.
    TooBigAnswered = 14,
    /// IPv4 without DF, too big for the egress device: translated as its
    /// flow is and sent in two fragments, as the kernel would fragment it
    /// (the kernel itself would translate it anew, outside the flow).
    Fragmented = 15,
    /// Dropped: a later fragment (IPv4, or IPv6 by its fragment header)
    /// whose first fragment the fast path has not seen, addressed so that
    /// the fast path would forward it: without its ports it cannot be
    /// translated, and the kernel must not take it for a new connection.
    DropFragmentUnknown = 16,
    /// Handed to the kernel: IPv4 with options (source routing among them)
    /// or IPv6 with a routing header that has segments left, of no flow of
    /// ours: the kernel's option processing and `accept_source_route`
    /// decide.
    KernelIpOptions = 17,
    /// Dropped: IPv4 with options or IPv6 with a routing header that has
    /// segments left, of a flow the fast path owns: the kernel has no
    /// connection for it and would translate it anew.
    DropOptionsOfOurFlow = 18,
    /// Dropped: IPv6 UDP with checksum 0, which IPv6 forbids (RFC 8200
    /// 8.1); receivers drop it.
    DropUdpZeroChecksum = 19,
    /// Dropped: an IPv6 header chain longer than the fast path walks, or
    /// cut short, addressed so that the fast path would forward it.
    DropExtHeaders = 20,
    /// Handed to the kernel: a UDP datagram of a flow the kernel's
    /// conntrack tracks (started before the programs were attached, left to
    /// the kernel when no port was free, or a reply to the host's own
    /// datagrams), which stays the kernel's.
    KernelTrackedFlow = 21,
    /// Dropped: a first fragment too short for its transport header (RFC
    /// 1858's tiny fragments): its ports cannot be read, and a filter that
    /// judges a datagram by its first fragment is bypassed with one.
    DropTinyFragment = 22,
    /// Handed to the kernel: the connection table of the family is full
    /// (its live flows stay; the new one is the kernel's).
    KernelTableFull = 23,
    /// Handed to the kernel: the flow's source holds all its budget of
    /// unreplied flows (`TG_NAT_UNREPLIED_PER_SOURCE`).
    KernelOverBudget = 24,
}

impl Outcome {
    pub const COUNT: u32 = 25;

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
        Self::KernelForwardingOff,
        Self::TooBigAnswered,
        Self::Fragmented,
        Self::DropFragmentUnknown,
        Self::KernelIpOptions,
        Self::DropOptionsOfOurFlow,
        Self::DropUdpZeroChecksum,
        Self::DropExtHeaders,
        Self::KernelTrackedFlow,
        Self::DropTinyFragment,
        Self::KernelTableFull,
        Self::KernelOverBudget,
    ];

    /// The index of (`device`, `class`, `self`) in `OUTCOMES`: each
    /// packet is counted once, in the slot of what it was and what became
    /// of it (the per-class counts of the ingress hooks are these summed).
    pub const fn index(self, device: Device, class: PacketClass) -> u32 {
        (device as u32 * PacketClass::COUNT + class as u32) * Self::COUNT + self as u32
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
            Self::KernelForwardingOff => "kernel:forwarding-off",
            Self::TooBigAnswered => "too-big-answered",
            Self::Fragmented => "fragmented",
            Self::DropFragmentUnknown => "drop:fragment-unknown",
            Self::KernelIpOptions => "kernel:ip-options",
            Self::DropOptionsOfOurFlow => "drop:options-of-our-flow",
            Self::DropUdpZeroChecksum => "drop:udp6-zero-checksum",
            Self::DropExtHeaders => "drop:ext-headers",
            Self::KernelTrackedFlow => "kernel:tracked-flow",
            Self::DropTinyFragment => "drop:tiny-fragment",
            Self::KernelTableFull => "kernel:table-full",
            Self::KernelOverBudget => "kernel:over-budget",
        }
    }
}

/// Slots in `OUTCOMES`: every outcome of every packet class for both
/// devices.
pub const OUTCOME_SLOTS: u32 = Device::COUNT * PacketClass::COUNT * Outcome::COUNT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_own_slot() {
        let mut seen = [false; OUTCOME_SLOTS as usize];
        for device in Device::ALL {
            for class in PacketClass::ALL {
                for (i, outcome) in Outcome::ALL.into_iter().enumerate() {
                    assert_eq!(outcome as usize, i, "ALL is in number order");
                    let slot = outcome.index(device, class) as usize;
                    assert!(!seen[slot]);
                    seen[slot] = true;
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }
}
