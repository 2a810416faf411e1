//! Health: the node is healthy when Tailscale runs with addresses and is
//! online, the WireGuard device is up, the programs are attached on both
//! devices, and the maps and the nftables table have followed Tailscale's
//! latest state (its addresses above all). `/healthz` answers 200 or 503 with the reason (and when the
//! node started and first became healthy); `tailguard health` asks it, for
//! Docker's HEALTHCHECK: readiness. `/livez` answers 200 while the daemon's
//! loop turns, whatever the readiness (liveness: a stuck process is for
//! its supervisor to restart; one that is not ready is recovering).
//! `/status` shows the health and the forwarding plane; on the status page
//! (`TG_WEBUI_PORT`), what peers may see of it.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::info;

use super::server::{self, Client, Limits, Site};
use crate::{
    config::tailnet::in_tailnet,
    report::{
        ConnectionTableReport, Counters, ForwardingReport, Rates, SettingShown, StatusReport,
        TailscaleReport, WireGuardReport,
    },
    tailscale::{status::NotReady, supervisor::TailscaleRecoveries},
};

/// Why the netfilter datapath forwards although the eBPF one was wanted:
/// the fast path could not be loaded or attached.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fallback {
    /// The running kernel's release, as `uname -r` says it.
    pub kernel: String,
    /// Why the fast path is off, in one line (a refused program's verifier
    /// reason, not its log).
    pub reason: String,
}

/// How long the daemon's loop may go without a turn before `/livez` says
/// it is stuck. It turns at least every 5 s (its resync), each second
/// with the fast path (its counters).
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);

/// Every recovery since the daemon started, for `/status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recoveries {
    pub tailscaled: TailscaleRecoveries,
    /// The WireGuard side brought up again after its device went.
    pub wireguard_brought_back: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Health {
    pub started_at: SystemTime,
    /// The daemon's loop's last turn: what `/livez` judges by.
    pub loop_turned: Instant,
    pub recoveries: Recoveries,
    pub first_healthy_at: Option<SystemTime>,
    pub wireguard_up: bool,
    /// The device is gone and the last attempt to bring it back failed.
    pub wireguard_not_brought_back: bool,
    /// The peers this node connects to that stopped answering
    /// (`wireguard::handshakes`), each said in full.
    pub silent_peers: Vec<String>,
    /// Why `TG_HEALTH_PROBE` fails, while it does.
    pub probe_failure: Option<String>,
    /// Whether the routes are offered to the tailnet, and since when not.
    pub routes: RoutesOffer,
    pub wireguard_attached: bool,
    pub tailscale_attached: bool,
    /// The eBPF datapath runs, so both devices need the programs; with the
    /// netfilter datapath the devices need only exist.
    pub programs_required: bool,
    /// Set when the eBPF datapath was wanted and netfilter forwards instead.
    pub datapath_fallback: Option<Fallback>,
    /// `Err`: why Tailscale is not ready.
    pub tailscale: Result<(), NotReady>,
    /// The maps and the table hold what the kernel and Tailscale said last:
    /// false from a change of Tailscale's state or device until the
    /// forwarding plane has followed it (the node's tailnet address is what
    /// `TS_DEST_IP` and the masquerade rules match on, so "healthy" before
    /// that would send a client to a node that drops its first packets).
    pub forwarding_in_line: bool,
    /// The forwarding plane's maps as last read back from the kernel.
    pub forwarding: Option<ForwardingReport>,
    /// The fast path's outcome counters, read each second, and their rates
    /// over the last minute.
    pub counters: Option<Counters>,
    pub rates: Option<Rates>,
    /// The connection table: flows per family and state, what the sweeper
    /// removed, what the programs refused (`datapath::sweeper::report`).
    pub connection_table: Option<ConnectionTableReport>,
    /// The settings in effect, as the status page shows them.
    pub settings: Vec<SettingShown>,
    /// What tailscaled and the WireGuard device said last.
    pub tailscale_report: Option<TailscaleReport>,
    pub wireguard_report: Option<WireGuardReport>,
    /// `TS_HOSTNAME`, and the node's MagicDNS name once tailscaled tells
    /// it: names the node goes by, for the `Host` check.
    pub ts_hostname: Option<String>,
    pub dns_name: Option<String>,
}

/// Whether the node's routes (and exit node) are advertised to the
/// tailnet: withdrawn while the WireGuard side is down.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoutesOffer {
    pub advertised: bool,
    /// Why not, while they are not.
    pub withdrawn_because: Option<String>,
    /// Since when (Unix seconds).
    pub withdrawn_at: Option<u64>,
    /// How often they were withdrawn since the daemon started.
    pub withdrawals: u64,
}

/// One reason the node is not healthy.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error(transparent)]
    Tailscale(NotReady),
    #[error("the WireGuard device is not up")]
    WireGuardDown,
    #[error("{0}")]
    PeerSilent(String),
    #[error("{0}")]
    ProbeFails(String),
    #[error("the eBPF programs are not attached to both devices")]
    ProgramsNotAttached,
    #[error("the Tailscale device does not exist")]
    NoTailscaleDevice,
    #[error("the forwarding plane has not yet followed Tailscale's latest state")]
    ForwardingBehind,
    /// The loop that keeps everything else here true has stopped: none of
    /// it can be trusted any more.
    #[error("stuck: the daemon's loop has not turned for {0} s")]
    Stuck(u64),
}

/// Every reason the node is not healthy, in one line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(Reason::to_string).collect::<Vec<_>>().join("; "))]
pub struct Unhealthy(pub Vec<Reason>);

/// Why `tailguard health` / `status` could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no TailGuard answers on {addr}: {source}")]
    NoAnswer {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// `path` does not make a request.
    #[error(transparent)]
    Request(#[from] hyper::http::Error),
    #[error("TailGuard on {addr} did not answer within 5 s")]
    TimedOut { addr: SocketAddr },
    #[error("TailGuard on {addr} answered /status with something that is not its report: {source}")]
    NotAReport {
        addr: SocketAddr,
        #[source]
        source: serde_json::Error,
    },
}

/// What `tailguard health` reports when it is not `healthy`.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The daemon's report of why it is not healthy.
    #[error("{0}")]
    Unhealthy(String),
    #[error(transparent)]
    Ask(#[from] AskError),
}

impl Health {
    pub fn new() -> Self {
        Self {
            started_at: SystemTime::now(),
            loop_turned: Instant::now(),
            recoveries: Recoveries::default(),
            first_healthy_at: None,
            wireguard_up: false,
            wireguard_not_brought_back: false,
            silent_peers: Vec::new(),
            probe_failure: None,
            routes: RoutesOffer {
                advertised: true,
                ..RoutesOffer::default()
            },
            wireguard_attached: false,
            tailscale_attached: false,
            programs_required: true,
            datapath_fallback: None,
            tailscale: Err(NotReady::NotAnsweredYet),
            forwarding_in_line: false,
            forwarding: None,
            counters: None,
            rates: None,
            connection_table: None,
            settings: Vec::new(),
            tailscale_report: None,
            wireguard_report: None,
            ts_hostname: None,
            dns_name: None,
        }
    }

    /// The names the node goes by in the tailnet: `TS_HOSTNAME`, the
    /// MagicDNS name and its first label (what MagicDNS resolves too).
    fn names(&self) -> Vec<String> {
        let dns_name = self
            .dns_name
            .as_deref()
            .map(|n| n.trim_end_matches('.'))
            .filter(|n| !n.is_empty());
        let short = dns_name.and_then(|n| n.split('.').next());
        self.ts_hostname
            .as_deref()
            .into_iter()
            .chain(dns_name)
            .chain(short)
            .map(str::to_string)
            .collect()
    }

    /// `Ok`, or every reason the node is not healthy.
    pub fn verdict(&self) -> Result<(), Unhealthy> {
        let mut reasons = Vec::new();
        if let Err(why) = &self.tailscale {
            reasons.push(Reason::Tailscale(why.clone()));
        }
        if !self.wireguard_up {
            reasons.push(Reason::WireGuardDown);
        }
        reasons.extend(self.silent_peers.iter().cloned().map(Reason::PeerSilent));
        reasons.extend(self.probe_failure.iter().cloned().map(Reason::ProbeFails));
        if self.programs_required && !(self.wireguard_attached && self.tailscale_attached) {
            reasons.push(Reason::ProgramsNotAttached);
        } else if !self.tailscale_attached {
            reasons.push(Reason::NoTailscaleDevice);
        }
        if !self.forwarding_in_line {
            reasons.push(Reason::ForwardingBehind);
        }
        let since = self.loop_turned.elapsed();
        if since > LIVE_WITHIN {
            reasons.push(Reason::Stuck(since.as_secs()));
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(Unhealthy(reasons))
        }
    }

    /// Why the WireGuard side is down for the tailnet, so that the routes
    /// through it are to be withdrawn: its device gone beyond the first
    /// attempt to bring it back (a re-creation that works takes a second,
    /// too short for the tailnet to fail over and back), a peer silent, or
    /// the probe failing. `None`: it is alive.
    pub fn wireguard_side_down(&self) -> Option<String> {
        let gone = self
            .wireguard_not_brought_back
            .then(|| "the WireGuard device is gone and could not be brought back".to_string());
        let why: Vec<String> = gone
            .into_iter()
            .chain(self.silent_peers.iter().cloned())
            .chain(self.probe_failure.iter().cloned())
            .collect();
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// The forwarding plane no longer holds what Tailscale or the kernel
    /// says (`moved`: new tailnet addresses, the Tailscale device changed):
    /// not healthy until [`Health::forwarding_followed`].
    pub fn forwarding_behind(&mut self, moved: bool) {
        if moved {
            self.forwarding_in_line = false;
        }
    }

    /// The forwarding plane holds what was observed last: noted (and the
    /// first healthy moment with it); whether that changed the health.
    pub fn forwarding_followed(&mut self) -> bool {
        let changed = !self.forwarding_in_line;
        self.forwarding_in_line = true;
        self.mark();
        changed
    }

    /// Records the first healthy moment (once).
    pub fn mark(&mut self) {
        if self.first_healthy_at.is_none() && self.verdict().is_ok() {
            self.first_healthy_at = Some(SystemTime::now());
            let after = self
                .first_healthy_at
                .and_then(|t| t.duration_since(self.started_at).ok())
                .unwrap_or_default();
            info!(after_ms = after.as_millis() as u64, "healthy");
        }
    }

    fn readiness(&self) -> (StatusCode, String) {
        let first = self
            .first_healthy_at
            .map_or("never".to_string(), |t| unix_seconds(t).to_string());
        let times = format!(
            "started_at: {}\nfirst_healthy_at: {first}\n",
            unix_seconds(self.started_at)
        );
        match self.verdict() {
            Ok(()) => (StatusCode::OK, format!("healthy\n{times}")),
            Err(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n{times}"),
            ),
        }
    }

    /// `/livez`: whether the daemon's loop still turns (liveness, for a
    /// supervisor that restarts a stuck process), whatever the readiness.
    fn liveness(&self, now: Instant) -> (StatusCode, String) {
        let since = now.saturating_duration_since(self.loop_turned);
        if since <= LIVE_WITHIN {
            (StatusCode::OK, "alive\n".into())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "stuck: the daemon's loop has not turned for {} s\n",
                    since.as_secs()
                ),
            )
        }
    }

    /// `/status` and the status page: the health, both sides' state and
    /// what the forwarding plane holds.
    pub fn report(&self) -> StatusReport {
        let verdict = self.verdict();
        let reasons = match &verdict {
            Ok(()) => Vec::new(),
            Err(Unhealthy(reasons)) => reasons.iter().map(Reason::to_string).collect(),
        };
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            healthy: verdict.is_ok(),
            reason: verdict.err().map(|why| why.to_string()),
            reasons,
            started_at: unix_seconds(self.started_at),
            first_healthy_at: self.first_healthy_at.map(unix_seconds),
            recoveries: self.recoveries,
            routes: self.routes.clone(),
            datapath: if self.programs_required {
                "ebpf"
            } else {
                "netfilter"
            }
            .to_string(),
            datapath_fallback: self.datapath_fallback.clone(),
            settings: self.settings.clone(),
            tailscale: self.tailscale_report.clone(),
            wireguard: self.wireguard_report.clone(),
            wireguard_peers_hidden: false,
            forwarding: self.forwarding.clone(),
            counters: self.counters.clone(),
            rates: self.rates.clone(),
            connection_table: self.connection_table.clone(),
        }
    }
}

pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// Who a listener serves, as far as the WireGuard peers' privacy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Audience {
    /// The health address: the host itself (`tailguard status`, `stats`).
    Host,
    /// The status page (`TG_WEBUI_PORT`): both sides' peers.
    Peers { isolate_peers: bool },
}

impl Audience {
    /// Whether `client` may see data about the WireGuard peers (their
    /// AllowedIPs, as the WireGuard side's routes, and `TS_DEST_IP`):
    /// always, except on the status page with `WG_ISOLATE_PEERS=1`, where
    /// only the host itself and tailnet addresses do. Everyone else may be
    /// a WireGuard peer (or a host behind one), so fails closed.
    pub fn sees_wireguard_peers(self, client: &Client) -> bool {
        match self {
            Self::Host
            | Self::Peers {
                isolate_peers: false,
            } => true,
            Self::Peers {
                isolate_peers: true,
            } => {
                let from = client.peer.ip();
                let from_host = from.is_loopback() || from == client.local.ip();
                from_host || in_tailnet(from)
            }
        }
    }
}

/// `/healthz` and `/status` for one audience.
struct Pages {
    health: watch::Receiver<Health>,
    audience: Audience,
}

impl Pages {
    /// The report as `client` may see it.
    fn report_for(&self, client: &Client) -> StatusReport {
        let mut report = self.health.borrow().report();
        if !self.audience.sees_wireguard_peers(client) {
            report.hide_wireguard_peers();
        }
        report
    }
}

impl Site for Pages {
    fn names(&self) -> Vec<String> {
        self.health.borrow().names()
    }

    fn respond(&self, path: &str, client: &Client) -> Response<Full<Bytes>> {
        match path {
            "/healthz" => {
                let (status, body) = self.health.borrow().readiness();
                server::response(status, "text/plain; charset=utf-8", body)
            }
            "/livez" => {
                let (status, body) = self.health.borrow().liveness(Instant::now());
                server::response(status, "text/plain; charset=utf-8", body)
            }
            "/status" => {
                let report = self.report_for(client);
                let json = serde_json::to_string_pretty(&report)
                    .expect("a report of plain data serialises");
                server::response(StatusCode::OK, "application/json", json + "\n")
            }
            "/" => {
                let report = self.report_for(client);
                server::response(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    super::page::render(&report),
                )
            }
            _ => server::response(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "/ (the status page), /status, /healthz and /livez here\n".into(),
            ),
        }
    }
}

/// Serves `/healthz` and `/status` on `listener` for `audience`, within
/// `limits`, until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    health: watch::Receiver<Health>,
    audience: Audience,
    limits: Limits,
) {
    server::serve(listener, limits, Pages { health, audience }).await;
}

/// Asks a running daemon (`tailguard health`): `Ok(report)` when ready
/// (`/healthz`) or, with `live`, alive (`/livez`); `Err(report or why it
/// could not ask)` otherwise.
pub async fn check(addr: SocketAddr, live: bool) -> Result<String, CheckError> {
    let path = if live { "/livez" } else { "/healthz" };
    match get(addr, path).await? {
        (StatusCode::OK, body) => Ok(body),
        (_, body) => Err(CheckError::Unhealthy(body)),
    }
}

/// A running daemon's report (`/status`), as `tailguard status` and `stats`
/// show it.
pub async fn ask_report(addr: SocketAddr) -> Result<StatusReport, AskError> {
    let (_, body) = get(addr, "/status").await?;
    serde_json::from_str(&body).map_err(|source| AskError::NotAReport { addr, source })
}

/// `GET path` from a running daemon's health server: the status and body,
/// or why it could not be asked.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), AskError> {
    // A server on all addresses is asked on loopback, by that address.
    let addr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, addr.port()))
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()))
        }
        _ => addr,
    };
    let ask = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| AskError::NoAnswer { addr, source })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, AskError>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .unwrap_or(Err(AskError::TimedOut { addr }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Health {
        Health {
            wireguard_up: true,
            wireguard_attached: true,
            tailscale_attached: true,
            tailscale: Ok(()),
            forwarding_in_line: true,
            ..Health::new()
        }
    }

    #[test]
    fn every_missing_part_is_named() {
        assert_eq!(healthy().verdict(), Ok(()));
        let h = Health {
            tailscale: Err(NotReady::NotRunning("NeedsLogin".into())),
            tailscale_attached: false,
            ..healthy()
        };
        assert_eq!(
            h.verdict().unwrap_err().to_string(),
            "tailscaled is NeedsLogin, not Running; the eBPF programs are not attached to both devices"
        );
        assert_eq!(
            Health {
                wireguard_up: false,
                ..healthy()
            }
            .verdict()
            .unwrap_err()
            .to_string(),
            "the WireGuard device is not up"
        );
        assert_eq!(
            Health {
                forwarding_in_line: false,
                ..healthy()
            }
            .verdict()
            .unwrap_err()
            .to_string(),
            "the forwarding plane has not yet followed Tailscale's latest state"
        );
    }

    #[test]
    fn first_healthy_moment_is_kept() {
        let mut h = Health::new();
        h.mark();
        assert!(h.first_healthy_at.is_none());
        let mut h = healthy();
        h.mark();
        let first = h.first_healthy_at.expect("marked");
        h.tailscale = Err(NotReady::Offline);
        h.mark();
        h.tailscale = Ok(());
        h.mark();
        assert_eq!(h.first_healthy_at, Some(first));
    }

    #[tokio::test]
    async fn healthz_answers_200_or_503_with_the_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Health::new());
        let (local, _) = Limits::split(1024);
        tokio::spawn(serve(listener, rx, Audience::Host, local));
        let e = match check(addr, false).await {
            Err(CheckError::Unhealthy(report)) => report,
            other => panic!("the report of an unhealthy node, not {other:?}"),
        };
        assert!(
            e.starts_with("unhealthy: tailscaled has not answered yet"),
            "{e}"
        );
        assert!(e.contains("first_healthy_at: never"), "{e}");
        tx.send_modify(|h| {
            *h = healthy();
            h.mark();
        });
        let ok = check(addr, false).await.unwrap();
        assert!(ok.starts_with("healthy\n") && !ok.contains("never"), "{ok}");
        drop(tx);
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let e = check(closed, false).await.unwrap_err();
        assert!(
            matches!(e, CheckError::Ask(AskError::NoAnswer { .. }))
                && e.to_string().contains("no TailGuard answers"),
            "{e}"
        );
    }

    /// Liveness is the loop's turning, not the readiness: an unready node
    /// whose loop turns is alive; one whose loop stopped is stuck, however
    /// healthy it was, and not ready either (what it last saw is stale).
    #[tokio::test]
    async fn livez_answers_by_the_loops_last_turn() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(Health::new());
        let (local, _) = Limits::split(1024);
        tokio::spawn(serve(listener, rx, Audience::Host, local));
        assert!(check(addr, false).await.is_err(), "not ready");
        assert_eq!(check(addr, true).await.unwrap(), "alive\n", "yet alive");
        let Some(long_ago) = Instant::now().checked_sub(LIVE_WITHIN + Duration::from_secs(5))
        else {
            return; // a machine up for less than that has no such past
        };
        tx.send_modify(|h| {
            *h = healthy();
            h.loop_turned = long_ago;
        });
        match check(addr, false).await {
            Err(CheckError::Unhealthy(report)) => assert!(
                report.contains("stuck: the daemon's loop has not turned for 3"),
                "{report}"
            ),
            other => panic!("not ready by what it last saw, not {other:?}"),
        }
        match check(addr, true).await {
            Err(CheckError::Unhealthy(report)) => {
                assert!(
                    report.starts_with("stuck: the daemon's loop has not turned for 3"),
                    "{report}"
                )
            }
            other => panic!("a stuck loop, not {other:?}"),
        }
    }

    fn client(local: &str, peer: &str) -> Client {
        Client::new(local.parse().unwrap(), peer.parse().unwrap())
    }

    #[test]
    fn isolated_wireguard_peers_do_not_see_each_other() {
        let isolated = Audience::Peers {
            isolate_peers: true,
        };
        let page = |from: &str| client("10.66.0.2:8088", from);
        for (from, sees) in [
            ("10.66.0.1:40000", false),
            ("192.168.8.10:40000", false),
            ("[fd66::1]:40000", false),
            ("[::ffff:10.66.0.3]:40000", false),
            ("100.64.0.2:40000", true),
            ("[fd7a:115c:a1e0::2]:40000", true),
            ("10.66.0.2:40000", true),
            ("127.0.0.1:40000", true),
        ] {
            assert_eq!(isolated.sees_wireguard_peers(&page(from)), sees, "{from}");
        }
        let open = Audience::Peers {
            isolate_peers: false,
        };
        assert!(open.sees_wireguard_peers(&page("10.66.0.1:40000")));
        assert!(Audience::Host.sees_wireguard_peers(&page("10.66.0.1:40000")));
    }

    fn forwarding() -> ForwardingReport {
        ForwardingReport {
            ts_v4: Some("100.64.0.1".parse().unwrap()),
            dest_v4: Some("10.66.0.1".parse().unwrap()),
            dest_v6: Some("fd66::1".parse().unwrap()),
            isolate_peers: true,
            routes: [
                ("10.66.0.1/32", "wireguard"),
                ("192.168.8.0/24", "wireguard"),
                ("100.64.0.0/10", "tailscale"),
                ("10.201.0.0/24", "kernel"),
            ]
            .map(|(net, egress)| (net.to_string(), egress.to_string()))
            .into(),
            ..ForwardingReport::default()
        }
    }

    fn wireguard() -> WireGuardReport {
        WireGuardReport {
            interface: "wg0".into(),
            peers: vec![crate::report::WireGuardPeerReport {
                public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
                endpoint: Some("198.51.100.7:51820".parse().unwrap()),
                allowed_ips: vec!["10.66.0.1/32".parse().unwrap()],
                ..Default::default()
            }],
            ..WireGuardReport::default()
        }
    }

    #[test]
    fn the_peer_view_drops_the_wireguard_peers_routes_and_the_dest_ip() {
        let mut report = Health {
            forwarding: Some(forwarding()),
            wireguard_report: Some(wireguard()),
            ..healthy()
        }
        .report();
        report.hide_wireguard_peers();
        let forwarding = report.forwarding.as_ref().expect("forwarding");
        assert_eq!(
            forwarding.routes,
            [("100.64.0.0/10".to_string(), "tailscale".to_string())].into()
        );
        let text = serde_json::to_string(&report).unwrap();
        for gone in [
            "10.66.0.1",
            "192.168.8.0",
            "fd66::1",
            "10.201.0.0",
            "198.51.100.7",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert_eq!(forwarding.ts_v4, Some("100.64.0.1".parse().unwrap()));
        assert!(report.healthy && report.wireguard_peers_hidden);
    }

    async fn body(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn the_status_page_shows_each_client_its_view() {
        let (_tx, rx) = watch::channel(Health {
            forwarding: Some(forwarding()),
            ..healthy()
        });
        let pages = |audience| Pages {
            health: rx.clone(),
            audience,
        };
        let isolated = pages(Audience::Peers {
            isolate_peers: true,
        });
        let from_wg = client("10.66.0.2:8088", "10.66.0.1:40000");
        let from_tailnet = client("10.66.0.2:8088", "100.64.0.2:40000");
        let seen = body(isolated.respond("/status", &from_wg)).await;
        let report: StatusReport = serde_json::from_str(&seen).expect("a report");
        assert!(
            !seen.contains("192.168.8.0/24") && report.wireguard_peers_hidden,
            "{seen}"
        );
        let seen = body(isolated.respond("/status", &from_tailnet)).await;
        assert!(seen.contains("192.168.8.0/24"), "{seen}");
        let seen = body(pages(Audience::Host).respond("/status", &from_wg)).await;
        assert!(seen.contains("192.168.8.0/24"), "{seen}");
    }

    #[test]
    fn the_status_says_why_netfilter_forwards() {
        let report = healthy().report();
        assert_eq!(report.datapath, "ebpf");
        assert_eq!(report.datapath_fallback, None);
        let fallback = Fallback {
            kernel: "6.1.0-50-amd64".into(),
            reason: "tg_wg_ingress was refused by the verifier: combined stack size of 3 \
                     calls is 544. Too large"
                .into(),
        };
        let fallen_back = Health {
            programs_required: false,
            datapath_fallback: Some(fallback.clone()),
            ..healthy()
        };
        let report = fallen_back.report();
        assert_eq!(report.datapath, "netfilter");
        assert_eq!(report.datapath_fallback, Some(fallback));
    }

    #[test]
    fn the_node_goes_by_its_hostname_and_magicdns_names() {
        let h = Health {
            ts_hostname: Some("bridge".into()),
            dns_name: Some("tailguard.standin.ts.net.".into()),
            ..Health::new()
        };
        assert_eq!(
            h.names(),
            ["bridge", "tailguard.standin.ts.net", "tailguard"]
        );
        assert!(Health::new().names().is_empty());
    }

    /// One raw HTTP/1.1 exchange: the status line and the whole answer.
    async fn raw(addr: SocketAddr, request: String) -> String {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_foreign_host_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(Health {
            dns_name: Some("tailguard.standin.ts.net.".into()),
            ..healthy()
        });
        let (local, _) = Limits::split(1024);
        tokio::spawn(serve(listener, rx, Audience::Host, local));
        let ask = |host: String| {
            raw(
                addr,
                format!("GET /status HTTP/1.1\r\n{host}Connection: close\r\n\r\n"),
            )
        };
        let refused = ask("Host: evil.example\r\n".into()).await;
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        assert!(refused.contains("DNS rebinding"), "{refused}");
        let refused = raw(
            addr,
            "GET http://evil.example/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                .into(),
        )
        .await;
        assert!(
            refused.starts_with("HTTP/1.1 403"),
            "absolute target: {refused}"
        );
        for host in [
            format!("Host: {addr}\r\n"),
            "Host: localhost\r\n".into(),
            "Host: tailguard.standin.ts.net:9002\r\n".into(),
        ] {
            let ok = ask(host.clone()).await;
            assert!(ok.starts_with("HTTP/1.1 200"), "{host}: {ok}");
        }
        let old = raw(addr, "GET /status HTTP/1.0\r\n\r\n".into()).await;
        assert!(old.starts_with("HTTP/1.0 200"), "no Host at all: {old}");
    }

    #[tokio::test]
    async fn the_status_page_answers_a_client_once_a_second() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_tx, rx) = watch::channel(healthy());
        let (_, page) = Limits::split(1024);
        let audience = Audience::Peers {
            isolate_peers: false,
        };
        tokio::spawn(serve(listener, rx, audience, page));
        // All on one keep-alive connection, sent at once.
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let last = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        let answers = raw(addr, request.repeat(29) + &last).await;
        let ok = answers.matches("HTTP/1.1 200").count();
        let limited = answers.matches("HTTP/1.1 429").count();
        assert_eq!((ok, limited), (1, 29), "{answers}");
        assert_eq!(
            answers.matches("retry-after: 1\r\n").count(),
            29,
            "{answers}"
        );
    }
}
