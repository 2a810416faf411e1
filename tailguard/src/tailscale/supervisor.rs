//! Supervising tailscaled: start it (or use one that already answers on the
//! socket: attach mode), log it in, set the preferences, follow its status,
//! and start it again with back-off when it exits, or kill it first when it
//! stops answering (each request is timed: `localapi`). The rest of TailGuard
//! (the forwarding plane, health) keeps running meanwhile; it learns what
//! Tailscale is doing from the [`TailscaleState`] this publishes.

use crate::report::TailscaleReport;
use std::{
    net::{Ipv4Addr, Ipv6Addr},
    process::Stdio,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
    sync::watch,
    time::{Instant, sleep},
};
use tracing::{error, info, warn};

use super::{
    localapi::{self, LocalApi, LocalApiError},
    prefs::{self, Offer},
    status::{NotReady, Status},
};
use crate::config::plan::{Login, TailscalePlan};
use futures_util::{FutureExt as _, Stream, StreamExt as _};
use nix::sys::signal::Signal;

/// tailscaled could not be started.
#[derive(Debug, thiserror::Error)]
#[error("starting tailscaled `{program}`: {source}")]
pub struct SpawnError {
    program: String,
    #[source]
    source: std::io::Error,
}

/// What the rest of the daemon needs to know about Tailscale.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailscaleState {
    /// The node's own tailnet addresses.
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
    /// `Ok` once Running, with addresses, online; else why not.
    pub ready: Result<(), NotReady>,
    /// The node's MagicDNS name (`Self.DNSName`), once known.
    pub dns_name: Option<String>,
    /// What the supervisor has brought back so far.
    pub recoveries: TailscaleRecoveries,
    /// What the status page shows of the last status read.
    pub report: Option<TailscaleReport>,
}

/// Each kind of recovery of tailscaled, counted since the daemon started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TailscaleRecoveries {
    /// Ours exited and was started again.
    pub restarts_after_exit: u64,
    /// Ours stopped answering, was killed and started again.
    pub restarts_after_hang: u64,
    /// The node needed a login again and was logged in again.
    pub logins_again: u64,
}

impl Default for TailscaleState {
    fn default() -> Self {
        Self {
            v4: None,
            v6: None,
            ready: Err(NotReady::NotAnsweredYet),
            dns_name: None,
            recoveries: TailscaleRecoveries::default(),
            report: None,
        }
    }
}

/// How often to read tailscaled's status until its IPN bus is followed.
const POLL: Duration = Duration::from_secs(1);
/// How often to read it whole while following the bus.
const RESYNC: Duration = Duration::from_secs(10);
/// How often to check that it still answers while following the bus (a
/// stopped tailscaled leaves its bus open and quiet): a status read without
/// the peers.
const LIVENESS_EVERY: Duration = Duration::from_secs(2);
/// Failed status reads in a row, after a first answer, that make ours hung:
/// killed and started again, once they have gone on for [`HUNG_FOR`]. (An
/// attached one is only reported: it is not ours to kill.)
const HUNG_AFTER: u32 = 2;
/// How long the failures must last: a tailscaled that closed its socket on
/// its way out has that long to exit by itself (and be counted as an exit).
const HUNG_FOR: Duration = Duration::from_secs(5);
/// How long tailscaled may take to open its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(30);
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct Supervisor {
    plan: TailscalePlan,
    api: LocalApi,
    state: watch::Sender<TailscaleState>,
    recoveries: std::sync::Mutex<TailscaleRecoveries>,
}

impl Supervisor {
    pub fn new(plan: &TailscalePlan) -> (Self, watch::Receiver<TailscaleState>) {
        let (state, receiver) = watch::channel(TailscaleState::default());
        let supervisor = Self {
            plan: plan.clone(),
            api: LocalApi::new(&plan.socket),
            state,
            recoveries: Default::default(),
        };
        (supervisor, receiver)
    }

    /// Runs until `shutdown` turns true; then stops the tailscaled it started.
    /// `offer` says whether the node's routes are to be advertised (they
    /// follow it while tailscaled runs).
    pub async fn run(self, mut shutdown: watch::Receiver<bool>, mut offer: watch::Receiver<Offer>) {
        let attach = self.api.status(false).await.is_ok();
        if attach {
            info!(socket = %self.plan.socket.display(), "a tailscaled already answers: using it (attach mode)");
        }
        let mut backoff = BACKOFF_FIRST;
        loop {
            let mut child = if attach {
                None
            } else {
                match self.spawn() {
                    Ok(child) => Some(child),
                    Err(e) => {
                        error!("{e}");
                        if wait_or_shutdown(&mut shutdown, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            };
            let started = Instant::now();
            // A stop is heard even inside a LocalAPI request (up to its
            // timeout, at every step of a setup): the daemon's teardown
            // gives the supervisor only so long.
            let mut told = shutdown.clone();
            let outcome = tokio::select! {
                outcome = self.serve(child.as_mut(), &mut shutdown, &mut offer) => outcome,
                _ = told.wait_for(|stop| *stop) => Outcome::Shutdown,
            };
            if let Some(child) = child.as_mut() {
                match outcome {
                    // Hung: a SIGTERM would wait for it in vain.
                    Outcome::Hung(_) => kill_group(child).await,
                    _ => stop(child).await,
                }
            }
            let (why, hung) = match outcome {
                Outcome::Shutdown => return,
                Outcome::Exited(why) => (why, false),
                Outcome::Hung(error) => (NotReady::Hung(error), true),
            };
            self.state.send_replace(TailscaleState {
                ready: Err(why.clone()),
                recoveries: self.recoveries(),
                ..TailscaleState::default()
            });
            if started.elapsed() > BACKOFF_MAX {
                backoff = BACKOFF_FIRST;
            }
            warn!("{why}; starting it again in {} s", backoff.as_secs());
            if wait_or_shutdown(&mut shutdown, backoff).await {
                return;
            }
            // Counted as it happens (not when decided: a stop during the
            // back-off restarts nothing).
            self.count(|r| {
                if hung {
                    r.restarts_after_hang += 1;
                } else {
                    r.restarts_after_exit += 1;
                }
            });
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    fn spawn(&self) -> Result<Child, SpawnError> {
        crate::fault::point("spawning-tailscaled");
        let tailscaled = &self.plan.tailscaled;
        let mut cmd = Command::new(&tailscaled.program);
        cmd.args(&tailscaled.args)
            // A group of its own: a signal for ours (Ctrl-C at a terminal, a
            // SIGHUP to the group) is ours to act on; tailscaled stops when
            // the supervisor stops it, in the teardown's order.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|source| SpawnError {
            program: tailscaled.program.clone(),
            source,
        })?;
        // Its log becomes ours.
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    info!(target: "tailscaled", "{line}");
                }
            });
        }
        info!(
            program = tailscaled.program,
            device = self.plan.device,
            port = self.plan.port,
            "tailscaled started"
        );
        Ok(child)
    }

    /// One life of tailscaled: wait for it, log in, set preferences, follow
    /// it. Returns when it exits or when told to shut down.
    ///
    /// Once tailscaled answers, its IPN bus says when something changed and
    /// each notification leads to a fresh status; a slow timer re-reads the
    /// status too, in case the bus is not there or stays quiet.
    async fn serve(
        &self,
        mut child: Option<&mut Child>,
        shutdown: &mut watch::Receiver<bool>,
        offer: &mut watch::Receiver<Offer>,
    ) -> Outcome {
        let mut setup = SetupProgress::default();
        let mut socket_deadline = Some(Instant::now() + SOCKET_WAIT);
        let mut bus: Option<Bus> = None;
        // When the status was last read whole (the peers too) and followed.
        let mut followed: Option<Instant> = None;
        let mut failures = 0;
        let mut failing_since: Option<Instant> = None;
        loop {
            // While the bus is followed and quiet, only check it answers.
            let whole = bus.is_none() || followed.is_none_or(|at| at.elapsed() >= RESYNC);
            match self.api.status(whole).await {
                Ok(status) => {
                    socket_deadline = None;
                    failures = 0;
                    failing_since = None;
                    if whole {
                        followed = Some(Instant::now());
                        let offer = *offer.borrow();
                        self.follow(&status, &mut setup, offer).await;
                    }
                }
                Err(e) => {
                    bus = None;
                    if socket_deadline.is_some_and(|d| Instant::now() > d) {
                        return Outcome::Exited(NotReady::NeverAnswered {
                            seconds: SOCKET_WAIT.as_secs(),
                            error: e.to_string(),
                        });
                    }
                    if socket_deadline.is_none() {
                        failures += 1;
                        let since = *failing_since.get_or_insert_with(Instant::now);
                        if let Some(child) = child.as_deref_mut()
                            && failures >= HUNG_AFTER
                            && since.elapsed() >= HUNG_FOR
                        {
                            if let Ok(Some(status)) = child.try_wait() {
                                return Outcome::Exited(NotReady::Exited(status.to_string()));
                            }
                            return Outcome::Hung(e.to_string());
                        }
                        self.publish(
                            Err(NotReady::NoAnswer(e.to_string())),
                            (None, None),
                            None,
                            None,
                        );
                    }
                }
            }
            if bus.is_none() && socket_deadline.is_none() && failures == 0 {
                match self.api.watch(localapi::watch::INITIAL_STATE).await {
                    Ok(stream) => bus = Some(Box::pin(stream) as Bus),
                    Err(e) => warn!(
                        "following tailscaled's IPN bus: {e}; reading its status every {} s instead",
                        RESYNC.as_secs()
                    ),
                }
            }
            let wait = if bus.is_some() { LIVENESS_EVERY } else { POLL };
            tokio::select! {
                status = exited(child.as_deref_mut()) => {
                    return Outcome::Exited(NotReady::Exited(status));
                }
                note = next_notification(&mut bus) => match note {
                    // A burst of notifications leads to one status read,
                    // whole.
                    Some(Ok(_)) => {
                        while let Some(Some(Ok(_))) = next_notification(&mut bus).now_or_never() {}
                        followed = None;
                    }
                    Some(Err(e)) => { warn!("tailscaled's IPN bus: {e}"); bus = None; }
                    None => bus = None,
                },
                () = sleep(wait) => {}
                // Seen now (else it would wake every turn while reads
                // fail); followed with the next status, read whole.
                Ok(()) = offer.changed() => {
                    offer.borrow_and_update();
                    followed = None;
                }
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() || shutdown.has_changed().is_err() {
                return Outcome::Shutdown;
            }
        }
    }

    /// Acts on one status: log in if needed, set preferences once running
    /// (the advertised routes as `offer` says, again whenever it changes),
    /// the once-healthy ones once healthy, and publish the state.
    async fn follow(&self, status: &Status, setup: &mut SetupProgress, offer: Offer) {
        // Not NoState: a tailscaled restarting with its state passes
        // through it on its way back to Running, and needs no login.
        if status.backend_state == "NeedsLogin" && setup.was_running {
            // Logged out, its node key expired, or restarted without its
            // state: the whole setup again, the login first.
            warn!("tailscaled needs a login again; logging in again");
            *setup = SetupProgress::default();
            self.count(|r| r.logins_again += 1);
        }
        setup.was_running |= status.backend_state == "Running";
        let SetupProgress {
            login,
            prefs_set,
            healthy_prefs_set,
            was_running: _,
            offered,
        } = setup;
        match status.backend_state.as_str() {
            "NeedsLogin" | "NoState" => login.advance(&self.api, &self.plan, status, offer).await,
            "NeedsMachineAuth" if !login.machine_auth_said => {
                warn!("the node waits for approval in the tailnet's admin console");
                login.machine_auth_said = true;
            }
            "Running" if !*prefs_set => {
                match self
                    .api
                    .edit_prefs(&prefs::at_start(&self.plan, offer))
                    .await
                {
                    Ok(_) => {
                        info!(routes = ?self.plan.advertise.routes, exit_node = self.plan.advertise.exit_node, ?offer, "Tailscale preferences set");
                        *prefs_set = true;
                        *offered = offer;
                    }
                    Err(e) => warn!("setting Tailscale preferences: {e}"),
                }
            }
            "Running" if *offered != offer => {
                match self
                    .api
                    .edit_prefs(&prefs::advertised(&self.plan, offer))
                    .await
                {
                    Ok(_) => {
                        match offer {
                            Offer::Routes => info!("the routes and exit node are advertised again"),
                            Offer::Withdrawn => {
                                info!("the routes and exit node are withdrawn from the tailnet")
                            }
                        }
                        *offered = offer;
                    }
                    // Tried again with the next status.
                    Err(e) => warn!("changing the advertised routes: {e}"),
                }
            }
            _ => {}
        }
        let ready = status.ready();
        if ready.is_ok() && *prefs_set && !*healthy_prefs_set {
            match prefs::once_healthy(&self.plan, status) {
                Ok(None) => *healthy_prefs_set = true,
                Ok(Some(later)) => match self.api.edit_prefs(&later).await {
                    Ok(_) => {
                        info!(exit_node = ?self.plan.exit_node, web_client = self.plan.web_client, "preferences for a healthy node set");
                        *healthy_prefs_set = true;
                    }
                    Err(e) => warn!("setting the exit node / web client: {e}"),
                },
                // A named exit node may appear in a later netmap: try again.
                Err(e) => warn!("{e}"),
            }
        }
        let dns_name = status.self_node.as_ref().map(|n| n.dns_name.clone());
        let advertised = prefs::at_start(&self.plan, *offered).advertise_routes;
        self.publish(
            ready,
            status.own_addresses(),
            dns_name.filter(|n| !n.is_empty()),
            Some(status.report(&advertised.unwrap_or_default())),
        );
    }

    /// Counts a recovery (published with the next state).
    fn count(&self, recovery: impl FnOnce(&mut TailscaleRecoveries)) {
        recovery(&mut self.recoveries.lock().unwrap_or_else(|e| e.into_inner()));
    }

    fn recoveries(&self) -> TailscaleRecoveries {
        *self.recoveries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(
        &self,
        ready: Result<(), NotReady>,
        (v4, v6): (Option<Ipv4Addr>, Option<Ipv6Addr>),
        dns_name: Option<String>,
        report: Option<TailscaleReport>,
    ) {
        let new = TailscaleState {
            v4,
            v6,
            ready,
            dns_name,
            recoveries: self.recoveries(),
            report,
        };
        self.state.send_if_modified(|old| {
            if *old == new {
                return false;
            }
            if (old.v4, old.v6) != (new.v4, new.v6) {
                info!(v4 = ?new.v4, v6 = ?new.v6, "tailnet addresses");
            }
            if old.ready != new.ready {
                match &new.ready {
                    Ok(()) => info!("Tailscale is up"),
                    Err(why) => info!("Tailscale is not ready: {why}"),
                }
            }
            *old = new;
            true
        });
    }
}

enum Outcome {
    Shutdown,
    Exited(NotReady),
    /// Ours stopped answering (the last error): to be killed and started
    /// again.
    Hung(String),
}

/// How far the node's setup (login, preferences) has come with one run of
/// tailscaled, so each step happens once per run, or once more after the
/// node fell back to needing a login.
#[derive(Default)]
struct SetupProgress {
    login: LoginProgress,
    /// The preferences of the plan are set.
    prefs_set: bool,
    /// The once-healthy ones (exit node, web client) too.
    healthy_prefs_set: bool,
    /// The backend has been Running since the login.
    was_running: bool,
    /// The routes' offer tailscaled was last given (once `prefs_set`).
    offered: Offer,
}

/// Where the login stands.
#[derive(Default)]
struct LoginProgress {
    started: bool,
    interactive_requested: bool,
    url_shown: Option<String>,
    machine_auth_said: bool,
}

impl LoginProgress {
    async fn advance(
        &mut self,
        api: &LocalApi,
        plan: &TailscalePlan,
        status: &Status,
        offer: Offer,
    ) {
        if !self.started {
            let key = match plan.login.key() {
                Ok(key) => key,
                Err(e) => {
                    error!("{e}");
                    return;
                }
            };
            match api
                .start(prefs::start_body(
                    key.as_deref(),
                    &prefs::at_start(plan, offer),
                ))
                .await
            {
                Ok(()) => {
                    self.started = true;
                    if key.is_some() {
                        info!("logging in with the auth key (TS_AUTHKEY)");
                    }
                }
                Err(e) => {
                    warn!("starting tailscaled's login: {e}");
                    return;
                }
            }
            if key.is_some() {
                return;
            }
        }
        if plan.login == Login::Interactive && !self.interactive_requested {
            match api.login_interactive().await {
                Ok(()) => self.interactive_requested = true,
                Err(e) => warn!("asking for a login URL: {e}"),
            }
        }
        if !status.auth_url.is_empty() && self.url_shown.as_deref() != Some(&status.auth_url) {
            let line = "=".repeat(72);
            warn!(
                "\n{line}\nTo connect TailGuard to your tailnet, log in at:\n\n    {}\n\n{line}",
                status.auth_url
            );
            self.url_shown = Some(status.auth_url.clone());
        }
    }
}

/// The IPN bus, once subscribed to.
type Bus = std::pin::Pin<Box<dyn Stream<Item = Result<serde_json::Value, LocalApiError>> + Send>>;

/// The next notification; never, when there is no bus.
async fn next_notification(
    bus: &mut Option<Bus>,
) -> Option<Result<serde_json::Value, LocalApiError>> {
    match bus {
        Some(bus) => bus.next().await,
        None => std::future::pending().await,
    }
}

/// When the child exits; never, in attach mode (no child).
async fn exited(child: Option<&mut Child>) -> String {
    match child {
        Some(child) => match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        },
        None => std::future::pending().await,
    }
}

/// SIGTERM, then SIGKILL if it does not go within 5 s. A SIGCONT follows
/// the SIGTERM: a stopped tailscaled acts on it only once it runs again.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        for signal in [Signal::SIGTERM, Signal::SIGCONT] {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        warn!("tailscaled did not stop within 5 s; killing it");
        kill_group(child).await;
    }
}

/// SIGKILL to tailscaled's process group (it has one of its own, see
/// `spawn`: whatever it started goes with it), then waits for it.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    let _ = child.kill().await;
}

/// Sleeps `duration` unless shutdown comes first; true means shut down.
async fn wait_or_shutdown(shutdown: &mut watch::Receiver<bool>, duration: Duration) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = sleep(duration) => false,
        _ = shutdown.changed() => *shutdown.borrow(),
    }
}
