//! The daemon's life: check everything, set up the WireGuard side, attach
//! the programs, start and supervise tailscaled (attaching to its device as
//! soon as it exists), serve health, run until told to stop, then take down
//! everything it set up.

use std::{
    future::Future,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow};
use tailguard_common::{Device, Direction};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{
    datapath::{Datapath, LoadOptions},
    endpoints,
    gro::GroSetup,
    health::{self, Health},
    netlink::Netlink,
    plan::Plan,
    resolver::ResolverSetup,
    settings::Settings,
    tailscale::supervisor::Supervisor,
    wg_setup::WgSetup,
    wgconf::WgConfig,
};

/// Said with every load failure: the usual cause is missing privileges.
pub const LOAD_HINT: &str = "loading the eBPF programs (needs root, or CAP_BPF and CAP_NET_ADMIN)";

/// How often to look for the Tailscale device until it exists.
const TS_DEVICE_POLL: Duration = Duration::from_millis(250);

/// Reads the configuration and computes the plan; touches nothing.
pub fn plan(settings: &Settings) -> Result<Plan> {
    let (config, warnings) = WgConfig::load(&settings.wg_config_path())?;
    for warning in warnings {
        warn!("{warning}");
    }
    let plan = Plan::new(settings, &config);
    for warning in crate::tailscale::prefs::extra_args_warnings(&plan.tailscale) {
        warn!("{warning}");
    }
    Ok(plan)
}

/// Runs until `shutdown` completes, then tears down. A failure at any step
/// of the start tears down what the earlier steps set up.
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    let plan = plan(settings)?;
    let nl = Netlink::connect().context("opening rtnetlink")?;
    let mut running = Running {
        nl,
        started_at: SystemTime::now(),
        gro: None,
        wg: None,
        resolver: None,
        datapath: None,
        supervisor: None,
        tasks: Vec::new(),
    };
    let result = match running.start(settings, &plan).await {
        Ok(()) => running.serve(settings, &plan, shutdown).await,
        Err(e) => Err(e),
    };
    let teardown = running.teardown().await;
    result.and(teardown)
}

/// Everything set up so far, each part removed by [`Running::teardown`].
struct Running {
    nl: Netlink,
    /// When the daemon started (reported by `/healthz`).
    started_at: SystemTime,
    /// tailscaled's supervisor: its stop switch and task.
    supervisor: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// Background tasks (the health endpoint), aborted at teardown.
    tasks: Vec<JoinHandle<()>>,
    gro: Option<GroSetup>,
    wg: Option<WgSetup>,
    resolver: Option<ResolverSetup>,
    datapath: Option<Datapath>,
}

impl Running {
    /// The start, in the reference's order: the uplink's UDP GRO forwarding
    /// (never fatal), WireGuard, then name resolution.
    async fn start(&mut self, settings: &Settings, plan: &Plan) -> Result<()> {
        self.gro = GroSetup::enable(&self.nl).await;
        let wg = WgSetup::bring_up(&self.nl, plan, &settings.wg_userspace).await;
        self.wg = Some(wg.context("bringing up WireGuard")?);
        let resolver = ResolverSetup::apply(&self.nl, &plan.resolver).await;
        self.resolver = Some(resolver.context("configuring name resolution")?);
        Ok(())
    }

    async fn serve(
        &mut self,
        settings: &Settings,
        plan: &Plan,
        shutdown: impl Future<Output = ()>,
    ) -> Result<()> {
        let (health, health_rx) = watch::channel(Health {
            started_at: self.started_at,
            wireguard_up: true,
            ..Health::new()
        });
        let listener = TcpListener::bind(settings.health_addr)
            .await
            .with_context(|| format!("TG_HEALTH_ADDR={}: cannot listen", settings.health_addr))?;
        self.tasks
            .push(tokio::spawn(health::serve(listener, health_rx)));

        let mode = settings.tc_attach;
        let datapath = self
            .datapath
            .insert(Datapath::load(&LoadOptions::default()).context(LOAD_HINT)?);
        datapath
            .attach(Device::WireGuard, &settings.wg_device, mode)
            .await
            .context("attaching the eBPF programs")?;
        health.send_modify(|h| h.wireguard_attached = true);

        // tailscaled comes after the WireGuard side and its programs, so the
        // policy is in place before the tailnet device exists.
        let (supervisor, mut tailscale) = Supervisor::new(settings, &plan.tailscale);
        let (stop_supervisor, stopped) = watch::channel(false);
        self.supervisor = Some((stop_supervisor, tokio::spawn(supervisor.run(stopped))));
        info!(wg = %settings.wg_device, ts = %settings.ts_device, "running; SIGINT or SIGTERM stops");

        tokio::pin!(shutdown);
        let mut ts_attached = attach_if_present(&self.nl, datapath, settings).await?;
        if ts_attached {
            health.send_modify(|h| h.tailscale_attached = true);
        } else {
            info!(device = %settings.ts_device, "waiting for the Tailscale device");
        }
        let dynamic = endpoints::any_dynamic(&plan.wireguard);
        let mut refresh = tokio::time::interval(settings.endpoint_refresh);
        refresh.tick().await; // the first tick is now; bring-up just resolved them
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(TS_DEVICE_POLL), if !ts_attached => {
                    ts_attached = attach_if_present(&self.nl, datapath, settings).await?;
                    if ts_attached {
                        health.send_modify(|h| { h.tailscale_attached = true; h.mark(); });
                    }
                }
                Ok(()) = tailscale.changed() => {
                    let state = tailscale.borrow_and_update().clone();
                    health.send_modify(|h| { h.tailscale = state.ready.clone(); h.mark(); });
                }
                _ = refresh.tick(), if dynamic => {
                    if let Some(device) = self.wg.as_ref().and_then(WgSetup::device)
                        && let Err(e) = endpoints::refresh(device, &plan.wireguard).await
                    {
                        warn!("re-resolving peer endpoints: {e}");
                    }
                }
            }
        }
    }

    /// Takes down everything, collecting errors instead of stopping at one.
    async fn teardown(&mut self) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        if let Some((stop, task)) = self.supervisor.take() {
            let _ = stop.send(true);
            if tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .is_err()
            {
                errors.push("tailscaled's supervisor did not stop within 10 s".into());
            }
        }
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Some(datapath) = self.datapath.take() {
            log_counters(&datapath);
            if let Err(e) = datapath.detach().await {
                errors.extend(e.iter().map(ToString::to_string));
            }
        }
        if let Some(resolver) = self.resolver.take()
            && let Err(e) = resolver.teardown(&self.nl).await
        {
            errors.extend(e.iter().map(ToString::to_string));
        }
        if let Some(wg) = self.wg.take()
            && let Err(e) = wg.teardown(&self.nl).await
        {
            errors.extend(e.iter().map(ToString::to_string));
        }
        if let Some(gro) = self.gro.take()
            && let Err(e) = gro.restore().await
        {
            errors.push(e);
        }
        if errors.is_empty() {
            info!("stopped; everything set up was removed");
            Ok(())
        } else {
            Err(anyhow!(
                "teardown left {} error(s): {}",
                errors.len(),
                errors.join("; ")
            ))
        }
    }
}

/// Attaches the Tailscale device's programs if the device exists yet.
async fn attach_if_present(
    nl: &Netlink,
    datapath: &mut Datapath,
    settings: &Settings,
) -> Result<bool> {
    if nl.link_index(&settings.ts_device).await?.is_none() {
        return Ok(false);
    }
    datapath
        .attach(Device::Tailscale, &settings.ts_device, settings.tc_attach)
        .await
        .context("attaching the eBPF programs")?;
    Ok(true)
}

fn log_counters(datapath: &Datapath) {
    let Ok(counters) = datapath.counters() else {
        return;
    };
    for device in Device::ALL {
        for direction in Direction::ALL {
            let c = counters.hook_total(device, direction);
            info!(
                device = device.name(),
                direction = direction.name(),
                packets = c.packets,
                bytes = c.bytes,
                "counted"
            );
        }
    }
}
