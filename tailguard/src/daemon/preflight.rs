//! What the host must look like before anything is changed: the devices the
//! settings name are either absent (TailGuard or tailscaled makes them) or
//! of the kind they must be. A `TS_DEVICE=eth0` or `WG_DEVICE=eth0` typo
//! would otherwise put the programs, addresses and routes on the uplink.

use crate::{config::plan::Plan, host::netlink::Netlink, wireguard::device};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PreflightError {
    #[error(
        "WG_DEVICE={device}: {device} exists and is a {kind} device, not WireGuard (kernel, or \
         userspace with its control socket); name a WireGuard device or a free name"
    )]
    NotWireGuard { device: String, kind: String },
    #[error(
        "TS_DEVICE={device}: {device} exists and is a {kind} device, not a TUN device \
         (tailscaled's); name tailscaled's device or a free name"
    )]
    NotTun { device: String, kind: String },
    #[error("reading the devices: {0}")]
    Netlink(String),
}

/// Checks both devices; touches nothing.
pub async fn devices(nl: &Netlink, plan: &Plan) -> Result<(), PreflightError> {
    let kind_of = async |name: &str| {
        nl.link_kind(name)
            .await
            .map_err(|e| PreflightError::Netlink(e.to_string()))
    };
    let wg_kind = kind_of(&plan.wireguard.device).await?;
    let ts_kind = kind_of(&plan.tailscale.device).await?;
    check(
        &plan.wireguard.device,
        wg_kind.as_deref(),
        device::is_userspace_device(&plan.wireguard.device),
        &plan.tailscale.device,
        ts_kind.as_deref(),
    )
}

/// The rule itself: `None` is a device that does not exist.
fn check(
    wg_device: &str,
    wg_kind: Option<&str>,
    wg_userspace: bool,
    ts_device: &str,
    ts_kind: Option<&str>,
) -> Result<(), PreflightError> {
    let shown = |kind: &str| {
        if kind.is_empty() {
            "plain".to_string()
        } else {
            kind.to_string()
        }
    };
    match wg_kind {
        None | Some("wireguard") => {}
        // Userspace WireGuard's device is a TUN device with its UAPI socket.
        Some("tun") if wg_userspace => {}
        Some(kind) => {
            return Err(PreflightError::NotWireGuard {
                device: wg_device.into(),
                kind: shown(kind),
            });
        }
    }
    match ts_kind {
        None | Some("tun") => Ok(()),
        Some(kind) => Err(PreflightError::NotTun {
            device: ts_device.into(),
            kind: shown(kind),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_wireguard_and_tun_devices_or_free_names_pass() {
        assert_eq!(check("wg0", None, false, "tailscale0", None), Ok(()));
        assert_eq!(
            check("wg0", Some("wireguard"), false, "ts0", Some("tun")),
            Ok(())
        );
        assert_eq!(check("wg0", Some("tun"), true, "ts0", None), Ok(()));
        for (wg, userspace, ts, expected) in [
            (
                Some("veth"),
                false,
                None,
                "WG_DEVICE=wg0: wg0 exists and is a veth device, not WireGuard",
            ),
            (
                Some("tun"),
                false,
                None,
                "WG_DEVICE=wg0: wg0 exists and is a tun device, not WireGuard",
            ),
            (
                None,
                false,
                Some(""),
                "TS_DEVICE=ts0: ts0 exists and is a plain device, not a TUN device",
            ),
            (
                None,
                false,
                Some("wireguard"),
                "TS_DEVICE=ts0: ts0 exists and is a wireguard device, not a TUN",
            ),
        ] {
            let e = check("wg0", wg, userspace, "ts0", ts)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(expected), "{e}");
        }
    }
}
