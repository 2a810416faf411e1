//! The bridge's two devices and the two hooks of each, numbered once: every
//! map indexed or keyed by a device or hook holds these numbers (`as u32`):
//! the counters and outcomes, a flow's `ingress` and `egress`, a fragmented
//! datagram's `ingress`, the route tries' values ([`crate::Route`]), the
//! programs' per-direction scratch slots.

/// The device a program is attached to, by the role it plays in the bridge.
/// Its number is part of the pinned connection-state map (a flow's
/// `egress`), so it never changes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Device {
    /// The WireGuard device (`WG_DEVICE`, usually `wg0`).
    WireGuard = 0,
    /// The Tailscale TUN device (`TS_DEVICE`, usually `tailscale0`).
    Tailscale = 1,
}

/// Which TC hook of the device saw the packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

impl Device {
    /// Every device, in number order.
    pub const ALL: [Self; 2] = [Self::WireGuard, Self::Tailscale];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Self::WireGuard => "wireguard",
            Self::Tailscale => "tailscale",
        }
    }

    /// The device on the other side of the bridge.
    pub const fn other(self) -> Self {
        match self {
            Self::WireGuard => Self::Tailscale,
            Self::Tailscale => Self::WireGuard,
        }
    }

    /// The device with this role number (`as u32`); anything else reads as
    /// WireGuard.
    pub const fn from_role(role: u32) -> Self {
        if role == Self::Tailscale as u32 {
            Self::Tailscale
        } else {
            Self::WireGuard
        }
    }

    /// The device with this number, if one has it.
    pub const fn from_number(number: u32) -> Option<Self> {
        if number < Self::COUNT {
            Some(Self::from_role(number))
        } else {
            None
        }
    }
}

impl Direction {
    /// Every direction, in number order.
    pub const ALL: [Self; 2] = [Self::Ingress, Self::Egress];
    pub const COUNT: u32 = Self::ALL.len() as u32;

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_and_direction_is_numbered_by_its_place() {
        for (i, device) in Device::ALL.into_iter().enumerate() {
            assert_eq!(device as usize, i);
            assert_eq!(Device::from_number(i as u32), Some(device));
            assert_eq!(Device::from_role(i as u32), device);
        }
        assert_eq!(Device::from_number(Device::COUNT), None);
        for (i, direction) in Direction::ALL.into_iter().enumerate() {
            assert_eq!(direction as usize, i);
        }
    }
}
