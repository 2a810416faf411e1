//! Brings the WireGuard side up from the plan, in wg-quick's order — PreUp,
//! device, keys and peers, addresses, MTU, up, routes, policy routing,
//! PostUp — and takes it down again. Every step is idempotent, and what it
//! is about to ensure is recorded before it is taken, so teardown removes
//! exactly that: after a failure part way, and also when the bring-up is
//! abandoned part way (its future dropped: a stop during a slow start).

use std::{net::IpAddr, process::Stdio, time::Duration};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use tracing::{info, warn};

use crate::{
    config::plan::{IpRule, MAIN_TABLE, Mtu, Plan, WG_QUICK_DEFAULT_MTU, WireGuardPlan},
    host::netlink::{DeviceRoute, Netlink, NetlinkError},
    wireguard::device::{WgDevice, WireGuardError},
};

/// WireGuard's largest overhead: IPv6 (40) + UDP (8) + WireGuard (32).
pub const WG_OVERHEAD: u32 = 80;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    WireGuard(#[from] WireGuardError),
    #[error("{stage} hook `{command}` failed: {message}")]
    Hook {
        stage: &'static str,
        command: String,
        message: String,
    },
}

/// What bring-up put in place, for teardown.
pub struct WgSetup {
    /// The device's name, from the moment its creation began.
    creating: Option<String>,
    device: Option<WgDevice>,
    routes: Vec<DeviceRoute>,
    rules: Vec<IpRule>,
    pre_down: Vec<String>,
    post_down: Vec<String>,
}

impl WgSetup {
    /// The record of a bring-up of `wg` that has done nothing yet.
    pub fn new(wg: &WireGuardPlan) -> Self {
        Self {
            creating: None,
            device: None,
            routes: Vec::new(),
            rules: Vec::new(),
            pre_down: wg.hooks.pre_down.clone(),
            post_down: wg.hooks.post_down.clone(),
        }
    }

    pub fn device(&self) -> Option<&WgDevice> {
        self.device.as_ref()
    }

    /// Brings up the WireGuard side of `plan`. On failure, what was done so
    /// far is undone before the error is returned.
    pub async fn bring_up(nl: &Netlink, plan: &Plan) -> Result<Self, SetupError> {
        let mut setup = Self::new(&plan.wireguard);
        match setup.bring_up_in_place(nl, plan).await {
            Ok(()) => Ok(setup),
            Err(e) => {
                // Nothing half-applied: undo, but report the original error.
                if let Err(errors) = setup.teardown(nl).await {
                    for undo in errors {
                        warn!("undoing a failed start: {undo}");
                    }
                }
                Err(e)
            }
        }
    }

    /// Brings up the WireGuard side of `plan`, each step recorded in `self`
    /// before it is taken. Whether this fails or is dropped part way (the
    /// daemon abandons a start when told to stop), [`WgSetup::teardown`]
    /// then removes what was done; a hook still running is killed with
    /// everything it started.
    pub async fn bring_up_in_place(&mut self, nl: &Netlink, plan: &Plan) -> Result<(), SetupError> {
        let wg = &plan.wireguard;
        run_hooks("PreUp", &wg.hooks.pre_up).await?;
        self.creating = Some(wg.device.clone());
        let device = WgDevice::create(nl, &wg.device, &wg.userspace_program).await?;
        let ifindex = device.ifindex;
        let device = &*self.device.insert(device);
        device.configure(wg).await?;
        // What the device ended up with: its fwmark (the listen port when
        // neither was fixed) and its peers' endpoints (for the MTU rule).
        let state = device.reported().await?;
        let fwmark = state.fwmark;

        for address in &wg.addresses {
            nl.add_address(ifindex, *address).await?;
        }
        let mtu = match wg.mtu {
            Mtu::Fixed(mtu) => mtu,
            Mtu::Auto => {
                let endpoints: Vec<IpAddr> = state
                    .peers
                    .iter()
                    .filter_map(|p| p.config.endpoint)
                    .map(|e| e.ip())
                    .collect();
                auto_mtu(nl, &endpoints).await
            }
        };
        nl.set_up(ifindex, Some(mtu)).await?;

        for route in &wg.routes {
            let route = DeviceRoute {
                destination: route.destination,
                ifindex,
                table: route.table,
                gateway: None,
            };
            self.routes.push(route);
            nl.add_route(route).await?;
        }
        let mark_rules = fwmark.map(WireGuardPlan::mark_rules).into_iter().flatten();
        for rule in wg.rules.iter().copied().chain(mark_rules) {
            self.rules.push(rule);
            nl.add_rule(rule).await?;
        }
        crate::fault::point("in-wireguard");
        run_hooks("PostUp", &wg.hooks.post_up).await?;
        info!(device = wg.device, mtu, fwmark = ?fwmark, "WireGuard is up");
        Ok(())
    }

    /// Removes what bring-up put in place, in reverse, collecting every error
    /// instead of stopping at the first.
    pub async fn teardown(mut self, nl: &Netlink) -> Result<(), Vec<SetupError>> {
        let mut errors = Vec::new();
        if self.device.is_some()
            && let Err(e) = run_hooks("PreDown", &self.pre_down).await
        {
            errors.push(e);
        }
        for rule in self.rules.drain(..).rev() {
            if let Err(e) = nl.delete_rule(rule).await {
                errors.push(e.into());
            }
        }
        for route in self.routes.drain(..).rev() {
            // Routes through the device go with it; the others need removing.
            if route.table.is_some_and(|t| t != MAIN_TABLE)
                && let Err(e) = nl.delete_route(route).await
            {
                errors.push(e.into());
            }
        }
        if let Some(device) = self.device.take() {
            if let Err(e) = device.delete(nl).await {
                errors.push(e.into());
            }
            if let Err(e) = run_hooks("PostDown", &self.post_down).await {
                errors.push(e);
            }
        } else if let Some(name) = self.creating.take()
            && let Err(e) = delete_half_made(nl, &name).await
        {
            errors.push(e.into());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// wg-quick's rule: the largest MTU of the devices the peers' endpoints are
/// reached by (else the default route's device), less WireGuard's overhead;
/// 1420 when none is known.
async fn auto_mtu(nl: &Netlink, endpoints: &[IpAddr]) -> u32 {
    let mut devices = Vec::new();
    for endpoint in endpoints {
        if let Ok(Some(oif)) = nl.route_to(*endpoint).await {
            devices.push(oif);
        }
    }
    if devices.is_empty() {
        for ipv6 in [false, true] {
            if let Ok(Some((oif, _))) = nl.default_route(ipv6).await {
                devices.push(oif);
            }
        }
    }
    let mut largest = None;
    for oif in devices {
        if let Ok(mtu) = nl.link_mtu(oif).await {
            largest = Some(largest.map_or(mtu, |m: u32| m.max(mtu)));
        }
    }
    largest.map_or(WG_QUICK_DEFAULT_MTU, |m| {
        m.saturating_sub(WG_OVERHEAD).max(1280)
    })
}

/// The device of a bring-up abandoned while [`WgDevice::create`] ran. A
/// kernel device may be there (made, or about to be taken over) and is
/// removed; a userspace one ends with its wireguard-go, which dropping the
/// start killed. Anything else under that name is not ours to remove.
async fn delete_half_made(nl: &Netlink, name: &str) -> Result<(), NetlinkError> {
    if nl.link_kind(name).await?.as_deref() == Some("wireguard") {
        nl.delete_link(name).await?;
        info!(device = name, "WireGuard device removed");
    }
    Ok(())
}

/// How long one hook command may run before it is killed.
const HOOK_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs hook commands with `sh -c`, in order; the first failure stops.
async fn run_hooks(stage: &'static str, commands: &[String]) -> Result<(), SetupError> {
    for command in commands {
        // A hook may carry a key (`wg set %i private-key …` from a pipe is
        // usual, a literal one is not unheard of): shown redacted.
        let shown = crate::config::secrets::redact(command).into_owned();
        info!("{stage}: {shown}");
        run_hook(command).await.map_err(|e| SetupError::Hook {
            stage,
            command: shown,
            // What the hook wrote may carry a key too.
            message: crate::config::secrets::redact(&e.to_string()).into_owned(),
        })?;
    }
    Ok(())
}

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
enum HookError {
    /// `sh` could not be started or waited for.
    #[error(transparent)]
    Run(#[from] std::io::Error),
    #[error(
        "still running after {} s: killed, with everything it started",
        HOOK_TIMEOUT.as_secs()
    )]
    TimedOut,
    #[error("{status} {stderr}")]
    Failed {
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// One hook, `sh -c COMMAND`, in a process group of its own, so that it and
/// everything it started can be killed together: when it outlives
/// [`HOOK_TIMEOUT`], and when this future is dropped (the start it belongs
/// to abandoned). What a hook that exits leaves running is its business.
async fn run_hook(command: &str) -> Result<(), HookError> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", command])
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let group = KillGroupOnDrop(child.id().map(|pid| Pid::from_raw(pid as i32)));
    let out = tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| HookError::TimedOut)??;
    group.disarm();
    if !out.status.success() {
        return Err(HookError::Failed {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Kills a process group when dropped, unless disarmed (a hook that
/// finished).
struct KillGroupOnDrop(Option<Pid>);

impl KillGroupOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        if let Some(group) = self.0 {
            // ESRCH (the group is gone already) is the one error, and harmless.
            let _ = killpg(group, Signal::SIGKILL);
        }
    }
}
