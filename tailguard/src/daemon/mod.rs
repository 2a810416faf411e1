//! The daemon's life: check everything, set up the WireGuard side, attach
//! the programs, start and supervise tailscaled (attaching to its device as
//! soon as it exists), serve health, run until told to stop, then take down
//! everything it set up.

pub mod preflight;
pub mod probe;
pub mod wireguard_side;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    time::{Duration, SystemTime},
};

use futures_util::{FutureExt as _, StreamExt as _, future::Shared};
use tailguard_common::{Device, Direction};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tracing::{debug, error, info, warn};

use crate::{
    config::plan::{MismatchError, Plan},
    config::settings::{DatapathMode, Settings},
    config::tailnet::TAILSCALE_TABLE,
    config::wg_quick::ConfigError,
    config::wg_quick::WgConfig,
    daemon::preflight::PreflightError,
    daemon::wireguard_side::{PeerWatch, follow_offer},
    datapath::map_contents,
    datapath::{self, Datapath, LoadOptions, pin, sweeper},
    errors::{in_full, one_line},
    firewall::FirewallError,
    firewall::{Firewall, FirewallPlan},
    host::gro::GroSetup,
    host::netlink::Netlink,
    host::observed::Observed,
    host::resolver::ResolverSetup,
    host::sysctls::{Forwarding, Sysctls},
    host::{netlink::NetlinkError, privileges::PrivilegeError, resolver::ResolverError},
    http::health::{self, Health},
    report::history::{CounterRates, PeerTraffic, TRAFFIC_SAMPLE},
    tailscale::prefs::Offer,
    tailscale::supervisor::{Supervisor, TailscaleState},
    wireguard::bring_up::WgSetup,
    wireguard::endpoints,
    wireguard::handshakes,
    wireguard::{bring_up::SetupError, device::WireGuardError},
};

/// What stops the daemon (its start, or its service), each naming the step
/// that failed with the cause as its source.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Mismatch(#[from] MismatchError),
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("reading the forwarding switches")]
    ForwardingSwitches(#[source] std::io::Error),
    #[error("opening rtnetlink")]
    Rtnetlink(#[source] std::io::Error),
    #[error("watching links and routes")]
    KernelChanges(#[source] std::io::Error),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Firewall(#[from] FirewallError),
    #[error("bringing up WireGuard")]
    WireGuard(#[source] SetupError),
    #[error(transparent)]
    WireGuardDevice(#[from] WireGuardError),
    #[error("the WireGuard device {0} is gone")]
    WireGuardGone(String),
    #[error("configuring name resolution")]
    Resolver(#[source] ResolverError),
    #[error("setting the kernel's switches")]
    Switches(#[source] std::io::Error),
    #[error("TG_HEALTH_ADDR={addr}: cannot listen")]
    HealthListen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TG_WEBUI_PORT={port}: cannot listen")]
    PageListen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Datapath(#[from] datapath::Error),
    #[error("attaching the eBPF programs")]
    Attach(#[source] datapath::Error),
    #[error("filling the forwarding plane's maps")]
    FirstFill(#[source] Box<Error>),
    #[error("tailscaled's supervisor ended unexpectedly")]
    SupervisorEnded,
    #[error("teardown left {} error(s): {}", .0.len(), .0.join("; "))]
    Teardown(Vec<String>),
}

type Result<T, E = Error> = std::result::Result<T, E>;

/// Said with `tailguard programs`' load failures: the usual cause is
/// missing privileges (the daemon's start checks them first).
pub const LOAD_HINT: &str = "loading the eBPF programs (needs root, or CAP_BPF and CAP_NET_ADMIN)";

/// How often the maps are checked against the kernel without a notification.
const RESYNC: Duration = Duration::from_secs(5);
/// How often the counters shown by `/status` are read.
const COUNTERS: Duration = Duration::from_secs(1);

/// Reads the configuration and computes the plan; touches nothing.
pub fn plan(settings: &Settings) -> Result<Plan> {
    let (config, warnings) = WgConfig::load(&settings.wg_config_path())?;
    for warning in warnings {
        warn!("{warning}");
    }
    let (plan, warnings) = Plan::checked(settings, &config)?;
    for warning in warnings {
        warn!("{warning}");
    }
    Ok(plan)
}

/// Runs until `shutdown` completes, then tears down. A failure at any step
/// of the start tears down what the earlier steps set up; so do a
/// `shutdown` during the start (which abandons it) and a panic (which is
/// resumed once the teardown is done).
pub async fn run(settings: &Settings, shutdown: impl Future<Output = ()>) -> Result<()> {
    // What the process may do first: in a container started without a
    // grant, that is the one thing to fix, whatever else is wrong.
    crate::host::privileges::check(
        crate::host::privileges::Capabilities::of_this_process(),
        std::path::Path::new("/dev/net/tun"),
        settings.datapath == crate::config::settings::DatapathMode::Ebpf,
    )?;
    crate::http::server::raise_open_file_limit();
    let plan = plan(settings)?;
    // The user's, once: the daemon never turns it on (or off).
    let forwarding = Forwarding::read().map_err(Error::ForwardingSwitches)?;
    forwarding.log();
    let nl = Netlink::connect().map_err(Error::Rtnetlink)?;
    crate::daemon::preflight::devices(&nl, &plan).await?;
    let mut running = Running {
        nl,
        started_at: SystemTime::now(),
        settings_shown: settings.shown(),
        gro: None,
        wg: None,
        resolver: None,
        datapath: None,
        firewall: None,
        sysctls: None,
        forwarding,
        observed: None,
        supervisor: None,
        tasks: Vec::new(),
    };
    // Everything the start and the service change is recorded in `running`
    // as it is made, so whatever ends them — a failure, a stop, a panic —
    // the teardown finds it there.
    let outcome = AssertUnwindSafe(running.start_and_serve(&plan, shutdown.shared()))
        .catch_unwind()
        .await;
    let teardown = running.teardown().await;
    match outcome {
        Ok(result) => result.and(teardown),
        Err(panic) => {
            if let Err(e) = teardown {
                error!("{}", one_line(&e));
            }
            std::panic::resume_unwind(panic)
        }
    }
}

/// How far the start went.
#[derive(PartialEq)]
enum Start {
    Done,
    /// Told to stop before it was done.
    Stopped,
}

/// Whether `shutdown` has come (it may be polled again after it has).
fn stop_requested<S: Future<Output = ()>>(shutdown: &Shared<S>) -> bool {
    shutdown.clone().now_or_never().is_some()
}

/// What the table is made from before any device exists: WireGuard's
/// port only if the config fixes it, no tailnet addresses yet, and no
/// indexes or MTUs (which [`FirewallPlan::new`] does not read: the table
/// names devices).
fn observed_before_devices(plan: &Plan) -> Observed {
    Observed {
        wg_port: plan.wireguard.listen_port,
        ..Observed::default()
    }
}

/// Everything set up so far, each part removed by [`Running::teardown`].
struct Running {
    nl: Netlink,
    /// When the daemon started (reported by `/healthz`).
    started_at: SystemTime,
    /// The settings, as the status page shows them.
    settings_shown: Vec<crate::report::SettingShown>,
    /// tailscaled's supervisor: its stop switch and task.
    supervisor: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    /// Background tasks (the health endpoint), aborted at teardown.
    tasks: Vec<JoinHandle<()>>,
    gro: Option<GroSetup>,
    wg: Option<WgSetup>,
    resolver: Option<ResolverSetup>,
    /// `None` with the netfilter datapath (chosen, or fallen back to).
    datapath: Option<Datapath>,
    firewall: Option<Firewall>,
    sysctls: Option<Sysctls>,
    /// The forwarding switches as found at the start.
    forwarding: Forwarding,
    /// What the maps and the table were last made from.
    observed: Option<Observed>,
}

impl Running {
    async fn start_and_serve<S: Future<Output = ()>>(
        &mut self,
        plan: &Plan,
        shutdown: Shared<S>,
    ) -> Result<()> {
        if self.start(plan, &shutdown).await? == Start::Stopped {
            info!("told to stop during the start");
            return Ok(());
        }
        self.serve(plan, shutdown).await
    }

    /// The start: the nftables table first, so that no device of ours ever
    /// carries a packet without the policy; then, in the order
    /// docs/architecture.md gives ("Apply"), the uplink's UDP GRO forwarding
    /// (never fatal), the kernel switches, WireGuard and name resolution.
    ///
    /// `shutdown` is heard between the steps and during the WireGuard
    /// bring-up, which can take long (hooks, endpoint names to resolve) and
    /// records each step as it goes, so it can be abandoned part way. The
    /// other steps are quick and not made to be cut short.
    async fn start<S: Future<Output = ()>>(
        &mut self,
        plan: &Plan,
        shutdown: &Shared<S>,
    ) -> Result<Start> {
        let firewall = self.firewall.insert(Firewall::default());
        firewall
            .apply(&FirewallPlan::new(plan, &observed_before_devices(plan)))
            .await?;
        crate::fault::point("after-table");
        if stop_requested(shutdown) {
            return Ok(Start::Stopped);
        }
        self.gro = GroSetup::enable(&self.nl).await;
        // Before WireGuard, as wg-quick sets `src_valid_mark` before PostUp
        // (a hook may rely on it), and so that WireGuard's own random
        // listen port cannot land among the fast path's reserved ports.
        self.sysctls = Some(Sysctls::apply(&plan.switches).map_err(Error::Switches)?);
        let wg = self.wg.insert(WgSetup::new(&plan.wireguard));
        tokio::select! {
            biased;
            () = shutdown.clone() => return Ok(Start::Stopped),
            up = wg.bring_up_in_place(&self.nl, plan) => {
                up.map_err(Error::WireGuard)?;
            }
        }
        crate::fault::point("after-wireguard");
        // Now with WireGuard's actual port open.
        let observed = self.observe(plan, &TailscaleState::default(), None).await?;
        if let Some(firewall) = self.firewall.as_mut() {
            firewall.apply(&FirewallPlan::new(plan, &observed)).await?;
        }
        if stop_requested(shutdown) {
            return Ok(Start::Stopped);
        }
        let resolver = ResolverSetup::apply(&self.nl, &plan.resolver).await;
        self.resolver = Some(resolver.map_err(Error::Resolver)?);
        crate::fault::point("after-resolver");
        if stop_requested(shutdown) {
            return Ok(Start::Stopped);
        }
        Ok(Start::Done)
    }

    async fn serve(&mut self, plan: &Plan, shutdown: impl Future<Output = ()>) -> Result<()> {
        let (health, health_rx) = watch::channel(Health {
            started_at: self.started_at,
            wireguard_up: true,
            ts_hostname: plan.tailscale.hostname.clone(),
            settings: self.settings_shown.clone(),
            ..Health::new()
        });
        let (local_limits, page_limits) = crate::http::server::Limits::of_this_process();
        let listener = TcpListener::bind(plan.health_addr)
            .await
            .map_err(|source| Error::HealthListen {
                addr: plan.health_addr,
                source,
            })?;
        // The status page: the same `/status` and `/healthz`, on all
        // addresses, for both sides (the firewall opens it to them).
        if let Some(port) = plan.forwarding.status_page_port {
            let page = std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
            let listener = TcpListener::bind(page)
                .await
                .map_err(|source| Error::PageListen { port, source })?;
            let audience = health::Audience::Peers {
                isolate_peers: plan.forwarding.isolate_peers,
            };
            let page = health::serve(listener, health_rx.clone(), audience, page_limits);
            self.tasks.push(tokio::spawn(page));
        }
        let local = health::serve(listener, health_rx, health::Audience::Host, local_limits);
        self.tasks.push(tokio::spawn(local));

        if plan.forwarding.datapath == DatapathMode::Ebpf {
            match self.load_datapath(plan).await {
                Ok(()) => health.send_modify(|h| h.wireguard_attached = true),
                Err(e) => {
                    let fallback = health::Fallback {
                        kernel: kernel_release(),
                        reason: e.summary(),
                    };
                    // A refused program's whole verifier log: thousands of
                    // lines, for RUST_LOG=debug only.
                    debug!("the eBPF fast path's error in full: {}", in_full(&e));
                    error!(
                        "THE eBPF FAST PATH IS OFF on kernel {}: {}. The netfilter datapath \
                         forwards everything (the same policy, forwarded by the kernel, slower).",
                        fallback.kernel,
                        fallback.reason.trim_end_matches('.')
                    );
                    health.send_modify(|h| h.datapath_fallback = Some(fallback));
                }
            }
        }
        health.send_modify(|h| h.programs_required = self.datapath.is_some());
        // Every link or route change may move the Tailscale device or table
        // 52: both are re-read on each one, and on a slow timer in case a
        // notification was lost (the socket drops them when it overflows).
        let mut kernel_changes = Netlink::watch_links_and_routes().map_err(Error::KernelChanges)?;
        let mut tailscale_state = TailscaleState::default();
        self.refresh(plan, &tailscale_state, &health)
            .await
            .map_err(|e| Error::FirstFill(Box::new(e)))?;
        if !health.borrow().tailscale_attached {
            info!(device = %plan.tailscale.device, "waiting for the Tailscale device");
        }

        // tailscaled comes after the WireGuard side and its programs, so the
        // policy is in place before the tailnet device exists.
        let (supervisor, mut tailscale) = Supervisor::new(&plan.tailscale);
        let (stop_supervisor, stopped) = watch::channel(false);
        let (offer, offered) = watch::channel(Offer::Routes);
        self.supervisor = Some((
            stop_supervisor,
            tokio::spawn(supervisor.run(stopped, offered)),
        ));
        // Without a probe nothing is ever sent: its branch below never runs.
        let (probe_verdict, mut probe) = watch::channel(None);
        if let Some(target) = plan.health_probe {
            self.tasks
                .push(tokio::spawn(probe::run(target, probe_verdict)));
        }
        let mut peers = PeerWatch::new(&plan.wireguard);
        let mut handshake_check = tokio::time::interval(handshakes::CHECK_EVERY);
        // After a long turn (a re-creation), one check, not a burst.
        handshake_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        crate::fault::point("serving");
        info!(wg = %plan.wireguard.device, ts = %plan.tailscale.device, "running; SIGINT or SIGTERM stops");

        tokio::pin!(shutdown);
        let dynamic = endpoints::any_dynamic(&plan.wireguard);
        let mut endpoint_refresh = tokio::time::interval(plan.wireguard.endpoint_refresh);
        endpoint_refresh.tick().await; // the first tick is now; bring-up just resolved them
        let mut resync = tokio::time::interval(RESYNC);
        let mut counters = tokio::time::interval(COUNTERS);
        let mut sweep = tokio::time::interval(sweeper::CADENCE);
        let mut swept = sweeper::Totals::default();
        let mut counter_rates = CounterRates::default();
        let mut peer_traffic = PeerTraffic::default();
        let mut wireguard_report = tokio::time::interval(TRAFFIC_SAMPLE);
        wireguard_report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wg_recovery = Retry::default();
        loop {
            // For `/livez`; nobody needs waking for it.
            health.send_if_modified(|h| {
                h.loop_turned = std::time::Instant::now();
                false
            });
            follow_offer(&health, &offer);
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                ended = supervisor_ended(&mut self.supervisor) => {
                    // It ends only when told to: this is a panic (resumed,
                    // so that it takes the way of every other one).
                    self.supervisor = None;
                    return match ended {
                        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                        _ => Err(Error::SupervisorEnded),
                    };
                }
                Some(()) = kernel_changes.next() => {
                    // A burst (tailscaled adding its routes) is read once.
                    while let Some(Some(())) = kernel_changes.next().now_or_never() {}
                }
                _ = resync.tick() => {}
                Ok(()) = tailscale.changed() => {
                    let before = (tailscale_state.v4, tailscale_state.v6);
                    tailscale_state = tailscale.borrow_and_update().clone();
                    // New addresses: healthy again only once the refresh
                    // below has brought the forwarding plane in line.
                    let moved = before != (tailscale_state.v4, tailscale_state.v6);
                    health.send_modify(|h| {
                        h.tailscale = tailscale_state.ready.clone();
                        h.dns_name = tailscale_state.dns_name.clone();
                        h.recoveries.tailscaled = tailscale_state.recoveries;
                        h.tailscale_report = tailscale_state.report.clone();
                        h.forwarding_behind(moved);
                    });
                }
                _ = counters.tick(), if self.datapath.is_some() => {
                    // The programs' counts each second; the table's flows
                    // and expiry as of the last sweep.
                    if let Some(datapath) = self.datapath.as_ref()
                        && let (Ok(outcomes), Ok(events)) =
                            (datapath.outcomes(), datapath.table_events())
                    {
                        let counted = outcomes.report();
                        counter_rates.record(std::time::Instant::now(), counted.clone());
                        health.send_modify(|h| {
                            h.counters = Some(counted);
                            h.rates = counter_rates.rates();
                            h.connection_table =
                                Some(sweeper::report(&swept, &events, &plan.forwarding.nat));
                        });
                    }
                    continue;
                }
                _ = sweep.tick(), if self.datapath.is_some() => {
                    if let Some(datapath) = self.datapath.as_mut() {
                        if let Err(e) = sweeper::sweep(datapath, &mut swept) {
                            warn!("sweeping the connection table: {}", one_line(&e));
                        }
                        sweep.reset_after(sweeper::next_sweep(swept.last_duration));
                    }
                    continue;
                }
                _ = handshake_check.tick(), if peers.judges_any() => {
                    if let Some(device) = self.wg.as_ref().and_then(WgSetup::device) {
                        peers.check(device, &health).await;
                        follow_offer(&health, &offer);
                    }
                    continue;
                }
                _ = wireguard_report.tick() => {
                    if let Some(device) = self.wg.as_ref().and_then(WgSetup::device) {
                        // A failed read is the device gone or hung: the
                        // refresh and the handshake check say so.
                        if let Ok(reported) = device.reported().await {
                            peer_traffic.record(std::time::Instant::now(), &crate::wireguard::report::byte_totals(&reported));
                            let report = crate::wireguard::report::report(&reported, &plan.wireguard.userspace_program, &peer_traffic);
                            health.send_modify(|h| h.wireguard_report = Some(report));
                        }
                    }
                    continue;
                }
                Ok(()) = probe.changed() => {
                    let failure = probe.borrow_and_update().clone();
                    health.send_modify(|h| h.probe_failure = failure);
                    follow_offer(&health, &offer);
                    continue;
                }
                _ = endpoint_refresh.tick(), if dynamic => {
                    if let Some(device) = self.wg.as_ref().and_then(WgSetup::device)
                        && let Err(e) = endpoints::refresh(device, &plan.wireguard).await
                    {
                        warn!("re-resolving peer endpoints: {e}");
                    }
                    continue;
                }
            }
            let mut refreshed = self.refresh(plan, &tailscale_state, &health).await;
            if matches!(refreshed, Err(Error::WireGuardGone(_))) {
                note_wireguard(&health, &plan.wireguard.device, false);
                if let Some(next) = wg_recovery.attempt() {
                    // Hooks and endpoint names can take long: a stop is
                    // heard meanwhile, and what was made so far is in
                    // `self.wg` for the teardown.
                    let recreated = tokio::select! {
                        biased;
                        () = &mut shutdown => return Ok(()),
                        recreated = self.recreate_wireguard(plan) => recreated,
                    };
                    match recreated {
                        Ok(()) => {
                            peers.device_made(&health);
                            health.send_modify(|h| h.recoveries.wireguard_brought_back += 1);
                            refreshed = self.refresh(plan, &tailscale_state, &health).await;
                        }
                        Err(e) => {
                            warn!(
                                "bringing the WireGuard side up again: {}; trying again in {} s",
                                one_line(&e),
                                next.as_secs()
                            );
                            health.send_modify(|h| h.wireguard_not_brought_back = true);
                        }
                    }
                }
            }
            let wireguard_up = !matches!(refreshed, Err(Error::WireGuardGone(_)));
            wg_recovery.up(wireguard_up);
            note_wireguard(&health, &plan.wireguard.device, wireguard_up);
            match refreshed {
                // Said once, when it went (`note_wireguard`).
                Err(Error::WireGuardGone(_)) => {}
                Err(e) => warn!("updating the forwarding plane: {}", one_line(&e)),
                Ok(()) => {}
            }
        }
    }

    /// Brings the WireGuard side back from the plan after its device went
    /// (deleted, or its wireguard-go ended): what is left of the old
    /// bring-up is removed (rules, routes, hooks, as `wg-quick down` would),
    /// and it is brought up again. The next refresh attaches the programs
    /// to the new device and brings the maps in line with its ifindex. On
    /// failure the record of what was done stays in
    /// `self.wg`, for the next attempt (or the stop) to remove.
    async fn recreate_wireguard(&mut self, plan: &Plan) -> Result<()> {
        // A port WireGuard picked itself is kept: the peers that connect
        // to this node know it by that port (their endpoint for it). Should
        // it be taken meanwhile, WireGuard picks another.
        if let (
            None,
            Some(Observed {
                wg_port: Some(port),
                ..
            }),
        ) = (plan.wireguard.listen_port, self.observed.as_ref())
        {
            let port = *port;
            let mut same_port = plan.clone();
            same_port.wireguard.listen_port = Some(port);
            match self.bring_wireguard_back(&same_port).await {
                Ok(()) => return Ok(()),
                Err(e) => warn!(
                    "bringing the WireGuard side up again on its port {port}: {}; \
                     letting WireGuard pick a port",
                    one_line(&e)
                ),
            }
        }
        self.bring_wireguard_back(plan).await
    }

    /// What is left of the WireGuard side removed, and the side brought up
    /// as `plan` says.
    async fn bring_wireguard_back(&mut self, plan: &Plan) -> Result<()> {
        if let Some(old) = self.wg.take()
            && let Err(errors) = old.teardown(&self.nl).await
        {
            for e in errors {
                warn!("removing what is left of the WireGuard side: {e}");
            }
        }
        let wg = self.wg.insert(WgSetup::new(&plan.wireguard));
        wg.bring_up_in_place(&self.nl, plan)
            .await
            .map_err(Error::WireGuard)?;
        info!(
            device = plan.wireguard.device,
            "the WireGuard side is up again"
        );
        Ok(())
    }

    /// Loads the programs and attaches them to the WireGuard device; on
    /// failure nothing of them is left.
    async fn load_datapath(&mut self, plan: &Plan) -> Result<(), datapath::Error> {
        let dir = &plan.forwarding.pin_dir;
        let mut options = LoadOptions {
            nat: plan.forwarding.nat,
            ..LoadOptions::default()
        };
        // Without a place to pin it (no bpffs, and no CAP_SYS_ADMIN to
        // mount one: a container), the fast path still runs; its flows
        // just start over with the daemon.
        options.pin_dir = match pin::prepare(dir, &plan.forwarding.nat) {
            Ok(pin) => Some(pin),
            Err(e) => {
                warn!("connection state not pinned, flows will not survive a restart: {e}");
                None
            }
        };
        let mut datapath = Datapath::load(&options)?;
        datapath
            .attach(
                Device::WireGuard,
                &plan.wireguard.device,
                plan.forwarding.attach,
            )
            .await?;
        self.datapath = Some(datapath);
        Ok(())
    }

    /// What the kernel and Tailscale say now; `ts_device` as found.
    async fn observe(
        &self,
        plan: &Plan,
        tailscale: &TailscaleState,
        ts_device: Option<(u32, u32)>,
    ) -> Result<Observed> {
        let wg_ifindex = self
            .nl
            .link_index(&plan.wireguard.device)
            .await?
            .ok_or_else(|| Error::WireGuardGone(plan.wireguard.device.clone()))?;
        let mut table52 = Vec::new();
        if let Some((ts_index, _)) = ts_device {
            for ipv6 in [false, true] {
                let routes = self.nl.routes(ipv6, Some(TAILSCALE_TABLE)).await?;
                table52.extend(
                    routes
                        .into_iter()
                        .filter(|(_, oif, _)| *oif == Some(ts_index))
                        .map(|(net, _, _)| net),
                );
            }
        }
        let mut main_kernel_routes = Vec::new();
        for ipv6 in [false, true] {
            let routes = self.nl.routes(ipv6, None).await?;
            main_kernel_routes.extend(routes.into_iter().filter_map(|(net, oif, _)| {
                let ours =
                    oif == Some(wg_ifindex) || oif.is_some() && oif == ts_device.map(|d| d.0);
                (net.prefix_len() > 0 && !ours).then_some(net)
            }));
        }
        let wg_port = match self.wg.as_ref().and_then(WgSetup::device) {
            Some(device) => Some(device.listen_port().await?),
            None => None,
        };
        Ok(Observed {
            wg_ifindex,
            wg_mtu: self.nl.link_mtu(wg_ifindex).await?,
            wg_port,
            ts_device,
            ts_v4: tailscale.v4,
            ts_v6: tailscale.v6,
            table52,
            main_kernel_routes,
            forwarding: self.forwarding,
        })
    }

    /// Attaches to the Tailscale device if it exists (again, if it was made
    /// anew), then brings the maps and the table in line with the kernel and
    /// Tailscale.
    async fn refresh(
        &mut self,
        plan: &Plan,
        tailscale: &TailscaleState,
        health: &watch::Sender<Health>,
    ) -> Result<()> {
        // The WireGuard device's programs: again on a device made anew
        // (attaching to the same one is a no-op), and health says whether
        // they are there.
        if let Some(datapath) = self.datapath.as_mut()
            && self.nl.link_index(&plan.wireguard.device).await?.is_some()
        {
            let attached = datapath
                .attach(
                    Device::WireGuard,
                    &plan.wireguard.device,
                    plan.forwarding.attach,
                )
                .await;
            health.send_if_modified(|h| {
                let changed = h.wireguard_attached != attached.is_ok();
                h.wireguard_attached = attached.is_ok();
                changed
            });
            attached.map_err(Error::Attach)?;
        }
        let ts_device = match self.nl.link_index(&plan.tailscale.device).await? {
            Some(index) => {
                if let Some(datapath) = self.datapath.as_mut() {
                    datapath
                        .attach(
                            Device::Tailscale,
                            &plan.tailscale.device,
                            plan.forwarding.attach,
                        )
                        .await
                        .map_err(Error::Attach)?;
                }
                Some((index, self.nl.link_mtu(index).await?))
            }
            None => None,
        };
        health.send_if_modified(|h| {
            let attached = ts_device.is_some();
            let changed = h.tailscale_attached != attached;
            h.tailscale_attached = attached;
            h.forwarding_behind(changed);
            changed
        });
        let observed = self.observe(plan, tailscale, ts_device).await?;
        if self.observed.as_ref() == Some(&observed) {
            health.send_if_modified(Health::forwarding_followed);
            return Ok(());
        }
        if let Some(firewall) = self.firewall.as_mut() {
            let mut table = FirewallPlan::new(plan, &observed);
            // Fallen back to netfilter: no translation ports to keep free.
            table.fast_path_ports &= self.datapath.is_some();
            firewall.apply(&table).await?;
        }
        // The UDP flows the kernel has from before the fast path takes over
        // (first, and when it takes over the Tailscale device) stay the
        // kernel's; from now on the programs keep track themselves.
        let takes_over = self.observed.as_ref().map(|f| f.ts_device.is_some())
            != Some(observed.ts_device.is_some());
        let view = match self.datapath.as_mut() {
            Some(datapath) => {
                let routes =
                    map_contents::routes(plan, &observed.table52, &observed.main_kernel_routes);
                if takes_over {
                    let limit = plan.forwarding.nat.kernel_flows();
                    match crate::datapath::kernel_flows::keep_for_kernel(
                        datapath,
                        &routes,
                        limit as usize,
                    ) {
                        Ok(n) => info!(entries = n, "the kernel's UDP flows stay the kernel's"),
                        Err(e) => warn!(
                            "reading the kernel's conntrack table: {}; UDP flows it has \
                             from before may be taken over by the fast path",
                            one_line(&e)
                        ),
                    }
                }
                datapath.write_config(&map_contents::config(plan, &observed))?;
                datapath.sync_routes(&routes)?;
                // The config entry as the kernel now holds it, and every
                // route the tries answer by (they hold only the prefixes
                // that change an answer, and answer as `routes` does).
                Some(map_contents::describe(&datapath.config()?, &routes))
            }
            None => None,
        };
        info!(
            ts_v4 = ?observed.ts_v4,
            ts_v6 = ?observed.ts_v6,
            table52 = observed.table52.len(),
            "forwarding plane updated"
        );
        health.send_modify(|h| {
            h.forwarding = view;
            h.forwarding_followed();
        });
        self.observed = Some(observed);
        Ok(())
    }

    /// Takes down everything, collecting errors instead of stopping at one:
    /// tailscaled (and its device), the programs, the WireGuard side, the
    /// resolver, the kernel switches, GRO, and the nftables table last, once
    /// no device of ours is left to carry a packet.
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
        if let Some(wg) = self.wg.take()
            && let Err(e) = wg.teardown(&self.nl).await
        {
            errors.extend(e.iter().map(ToString::to_string));
        }
        if let Some(resolver) = self.resolver.take()
            && let Err(e) = resolver.teardown(&self.nl).await
        {
            errors.extend(e.iter().map(ToString::to_string));
        }
        if let Some(sysctls) = self.sysctls.take()
            && let Err(e) = sysctls.restore()
        {
            errors.push(e.to_string());
        }
        if let Some(gro) = self.gro.take()
            && let Err(e) = gro.restore().await
        {
            errors.push(one_line(&e));
        }
        if let Some(mut firewall) = self.firewall.take()
            && let Err(e) = firewall.remove().await
        {
            errors.push(one_line(&e));
        }
        if errors.is_empty() {
            info!("stopped; everything set up was removed");
            Ok(())
        } else {
            Err(Error::Teardown(errors))
        }
    }
}

/// When to try a recovery again: at once the first time, then after a
/// delay that doubles with each attempt (up to a minute), so that a part
/// that fails again at once (a wireguard-go that exits as it starts) is
/// not re-made in a tight loop; the delay starts over once the part has
/// stayed up for a minute.
struct Retry {
    not_before: tokio::time::Instant,
    delay: Duration,
    up_since: Option<tokio::time::Instant>,
}

impl Retry {
    const FIRST: Duration = Duration::from_secs(2);
    const MAX: Duration = Duration::from_secs(60);

    /// Whether an attempt is due now; if so, the next one is not due
    /// before the returned delay.
    fn attempt(&mut self) -> Option<Duration> {
        let now = tokio::time::Instant::now();
        if now < self.not_before {
            return None;
        }
        let wait = self.delay;
        self.not_before = now + wait;
        self.delay = (self.delay * 2).min(Self::MAX);
        Some(wait)
    }

    /// Notes whether the part is up now.
    fn up(&mut self, up: bool) {
        let now = tokio::time::Instant::now();
        if !up {
            self.up_since = None;
            return;
        }
        let since = *self.up_since.get_or_insert(now);
        if now.duration_since(since) >= Self::MAX {
            self.delay = Self::FIRST;
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            not_before: tokio::time::Instant::now(),
            delay: Self::FIRST,
            up_since: None,
        }
    }
}

/// Health follows the WireGuard device: gone (deleted, or its wireguard-go
/// ended, which takes the device with it) or back, said once per change.
fn note_wireguard(health: &watch::Sender<Health>, device: &str, up: bool) {
    health.send_if_modified(|h| {
        if h.wireguard_up == up {
            return false;
        }
        if up {
            info!("the WireGuard device {device} is back");
            h.wireguard_not_brought_back = false;
        } else {
            warn!("the WireGuard device {device} is gone: traffic to and from WireGuard stops");
        }
        h.wireguard_up = up;
        true
    });
}

/// The running kernel's release, as `uname -r` says it.
fn kernel_release() -> String {
    nix::sys::utsname::uname().map_or_else(
        |e| format!("unknown ({e})"),
        |name| name.release().to_string_lossy().into_owned(),
    )
}

/// When the supervisor's task ends; never, if there is none.
async fn supervisor_ended(
    supervisor: &mut Option<(watch::Sender<bool>, JoinHandle<()>)>,
) -> Result<(), tokio::task::JoinError> {
    match supervisor {
        Some((_, task)) => task.await,
        None => std::future::pending().await,
    }
}

fn log_counters(datapath: &Datapath) {
    let Ok(counters) = datapath.counters() else {
        return;
    };
    for device in Device::ALL {
        for direction in Direction::ALL {
            let c = counters.hook_total(device, direction);
            // What the fast path sends is counted once, where it arrived.
            let counted = match direction {
                Direction::Ingress => "arrived",
                Direction::Egress => "sent by the kernel",
            };
            info!(
                device = device.name(),
                direction = direction.name(),
                packets = c.packets,
                bytes = c.bytes,
                counted,
                "counted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table applied before any device exists is the one made from
    /// what is observed with the devices: it depends on nothing they add.
    #[test]
    fn the_table_before_the_devices_is_the_table_with_them() {
        let config = crate::config::wg_quick::parse(
            "[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n\
             Address = 10.66.0.2/24\nListenPort = 51821\n",
            std::path::Path::new("wg0.conf"),
        )
        .unwrap();
        let (settings, _) = crate::config::settings::parse_args(&["--webui-port=8080"]).unwrap();
        let plan = Plan::new(&settings, &config);
        let with_devices = Observed {
            wg_ifindex: 7,
            wg_mtu: 1420,
            wg_port: Some(51821),
            ts_device: Some((8, 1280)),
            table52: vec!["100.64.0.0/10".parse().unwrap()],
            ..Observed::default()
        };
        assert_eq!(
            FirewallPlan::new(&plan, &observed_before_devices(&plan)),
            FirewallPlan::new(&plan, &with_devices)
        );
    }
}
