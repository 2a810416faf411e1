//! The HTTP server behind the health address and the status page, bounded
//! so that no client (on the status page: any WireGuard or tailnet peer) can
//! hold the daemon's file descriptors or CPU, starve the other listener, or
//! read the pages through a rebinding DNS name.
//!
//! Each listener has its own cap on connections, taken *before* `accept`:
//! connections beyond it wait in the kernel's backlog and cost the daemon
//! no descriptor. Each connection lives a bounded time; a client that is
//! slow to send its headers, or idles between requests, is cut off at the
//! header timeout.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    header::{CONTENT_TYPE, HOST, HeaderValue, RETRY_AFTER},
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, sync::Semaphore, time::Instant};
use tracing::{info, warn};

use super::{
    host_header,
    rate_limit::{ClientSlots, RateLimit},
};

/// How long a client may take to send a request's headers; hyper restarts
/// it when a keep-alive connection goes idle, so it is the idle limit too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest any connection lives, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// Per connection read buffer (hyper's minimum is 8 KiB): a request here
/// is a line and a few headers.
const MAX_BUF: usize = 16 * 1024;
/// Descriptors kept for the rest of the daemon: rtnetlink and its watch,
/// the LocalAPI, tailscaled's and wireguard-go's pipes, the eBPF maps,
/// programs and links, the nftables socket, hooks.
const RESERVED_FDS: u64 = 256;
/// The health address is the host's own (`tailguard health`, Docker's
/// HEALTHCHECK): a few connections at a time are plenty.
const LOCAL_CONNECTIONS: usize = 32;
/// The status page's cap, however many descriptors the process may have.
const PAGE_CONNECTIONS_MAX: usize = 1024;
/// A browser opens up to 6 connections to a site.
const PAGE_CONNECTIONS_PER_CLIENT: usize = 8;
/// The original status page allows one request a second per client.
const PAGE_REQUESTS_PER_SECOND: NonZeroU32 = NonZeroU32::MIN;
/// How often the rate limiter forgets the clients that went quiet.
const FORGET_IDLE_CLIENTS: Duration = Duration::from_secs(10);
const ACCEPT_PAUSE_FIRST: Duration = Duration::from_millis(50);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// What one listener allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub connections: usize,
    /// Connections served at once for one client address; `None`: no cap.
    pub per_client: Option<usize>,
    /// Requests a second for one client address; `None`: no limit.
    pub requests_per_second: Option<NonZeroU32>,
}

impl Limits {
    /// The health address's limits and the status page's, sized so that
    /// both servers together use at most half of what `open_files` leaves
    /// after the rest of the daemon's share.
    pub fn split(open_files: u64) -> (Self, Self) {
        let spare = usize::try_from(open_files.saturating_sub(RESERVED_FDS)).unwrap_or(usize::MAX);
        let local = LOCAL_CONNECTIONS.min(spare / 4).max(4);
        let page = (spare / 2)
            .saturating_sub(local)
            .clamp(4, PAGE_CONNECTIONS_MAX);
        (
            Self {
                connections: local,
                per_client: None,
                requests_per_second: None,
            },
            Self {
                connections: page,
                per_client: Some(PAGE_CONNECTIONS_PER_CLIENT),
                requests_per_second: Some(PAGE_REQUESTS_PER_SECOND),
            },
        )
    }

    /// [`Limits::split`] for this process's open-file limit as it is now.
    pub fn of_this_process() -> (Self, Self) {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        Self::split(soft)
    }
}

/// Raises the soft open-file limit to the hard one (systemd and many
/// container engines start services at 1024, with a far higher hard limit)
/// for the whole daemon: what is left after the HTTP servers' caps is the
/// rest's. The daemon calls it at start, before it opens anything.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => info!(from = soft, to = hard, "open-file limit raised"),
        Err(e) => warn!("raising the open-file limit from {soft} to {hard}: {e}"),
    }
}

/// One connection's two ends, IPv4-mapped addresses (from a dual-stack
/// listener) shown as IPv4.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Client {
    /// The address the client connected to.
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

impl Client {
    pub fn new(local: SocketAddr, peer: SocketAddr) -> Self {
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        Self {
            local: canonical(local),
            peer: canonical(peer),
        }
    }
}

/// What a listener serves.
pub trait Site: Send + Sync + 'static {
    /// The names this node goes by, besides its addresses, `localhost` and
    /// the machine's host name (see [`host_header::is_ours`]).
    fn names(&self) -> Vec<String>;
    /// The answer to `GET path` from `client`.
    fn respond(&self, path: &str, client: &Client) -> Response<Full<Bytes>>;
}

/// An answer with a body of `content_type`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: String,
) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    response(status, "text/plain; charset=utf-8", body)
}

/// Serves `site` on `listener` within `limits` until the task is dropped.
pub async fn serve(listener: TcpListener, limits: Limits, site: impl Site) {
    let responder = Arc::new(Responder {
        site,
        machine: machine_host_name(),
        rate: limits.requests_per_second.map(RateLimit::new),
    });
    let connections = Arc::new(Semaphore::new(limits.connections));
    let per_client = limits.per_client.map(|n| Arc::new(ClientSlots::new(n)));
    let address = listener.local_addr().ok();
    let mut pause = AcceptPause::default();
    let mut idle_forgotten = Instant::now();
    loop {
        let permit = connections
            .clone()
            .acquire_owned()
            .await
            // `acquire_owned` fails only on a closed semaphore, and this
            // one is never closed: it lives here, unshared with a closer.
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                pause.after(&e, address).await;
                continue;
            }
        };
        pause.accepted(address);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let client = Client::new(local, peer);
        // Over its cap, the client's connection is closed at once (dropped).
        let slot = match &per_client {
            Some(slots) => match slots.take(client.peer.ip()) {
                Some(slot) => Some(slot),
                None => continue,
            },
            None => None,
        };
        if let Some(rate) = &responder.rate
            && idle_forgotten.elapsed() > FORGET_IDLE_CLIENTS
        {
            rate.forget_idle();
            idle_forgotten = Instant::now();
        }
        let responder = responder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = responder.answer(&request, &client);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(stream), service);
            // The header timeout ends slow and idle clients; this ends the
            // rest (one that reads slowly, or asks forever).
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            drop((permit, slot));
        });
    }
}

/// What answers a listener's requests, shared by its connections: the site
/// behind the rate limit and the `Host` check.
struct Responder<S> {
    site: S,
    machine: Option<String>,
    rate: Option<RateLimit>,
}

impl<S: Site> Responder<S> {
    fn answer<B>(&self, request: &Request<B>, client: &Client) -> Response<Full<Bytes>> {
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.check(client.peer.ip())
        {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut response = text(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many requests from {}: {} a second is the limit\n",
                    client.peer.ip(),
                    rate.per_second()
                ),
            );
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(seconds));
            return response;
        }
        if let Some(refused) = self.foreign_host(request, client.local.ip()) {
            return text(StatusCode::FORBIDDEN, refused);
        }
        self.site.respond(request.uri().path(), client)
    }

    /// Why the request is refused, if its `Host` (or its absolute target)
    /// names neither this node nor its address: a page on another site,
    /// whose name a rebinding DNS server points at this node, must not
    /// read it. A request without `Host` (HTTP/1.0) passes.
    fn foreign_host<B>(&self, request: &Request<B>, local: IpAddr) -> Option<String> {
        let mut names = self.site.names();
        names.extend(self.machine.iter().cloned());
        let authority = request.uri().authority().map(|a| a.as_str().to_string());
        let hosts = request
            .headers()
            .get_all(HOST)
            .iter()
            .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
            .chain(authority);
        for host in hosts {
            if !host_header::is_ours(&host, local, &names) {
                let shown: String = host.chars().take(100).collect();
                return Some(format!(
                    "refused: Host {shown:?} is neither an address nor a name of this node \
                     (a guard against DNS rebinding); ask for {local} or one of its names\n"
                ));
            }
        }
        None
    }
}

/// The machine's host name, read once (it names the node too).
fn machine_host_name() -> Option<String> {
    nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
}

/// The pause after a failed `accept` (a full descriptor table fails every
/// call at once: without a pause the loop spins), said once per burst.
#[derive(Debug)]
struct AcceptPause {
    errors: u64,
    next: Duration,
}

impl Default for AcceptPause {
    fn default() -> Self {
        Self {
            errors: 0,
            next: ACCEPT_PAUSE_FIRST,
        }
    }
}

impl AcceptPause {
    async fn after(&mut self, e: &std::io::Error, address: Option<SocketAddr>) {
        if self.errors == 0 {
            warn!(
                address = ?address,
                "accepting a connection: {e}; pausing up to {} ms between tries until it works again",
                ACCEPT_PAUSE_MAX.as_millis()
            );
        }
        self.errors += 1;
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(ACCEPT_PAUSE_MAX);
    }

    fn accepted(&mut self, address: Option<SocketAddr>) {
        if self.errors > 0 {
            info!(address = ?address, failed = self.errors, "accepting connections again");
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_servers_stay_well_inside_the_open_file_limit() {
        for open_files in [1024, 4096, 65536, 1 << 20] {
            let (local, page) = Limits::split(open_files);
            let used = (local.connections + page.connections) as u64;
            assert!(
                used <= (open_files - RESERVED_FDS) / 2,
                "{open_files}: {local:?} {page:?}"
            );
            assert_eq!(local.connections, LOCAL_CONNECTIONS);
            assert!(page.per_client.is_some() && page.requests_per_second.is_some());
            assert!(local.per_client.is_none() && local.requests_per_second.is_none());
        }
        assert_eq!(Limits::split(1024).1.connections, 352);
        assert_eq!(Limits::split(1 << 20).1.connections, PAGE_CONNECTIONS_MAX);
        // Even a tiny limit serves something.
        let (local, page) = Limits::split(100);
        assert!(local.connections >= 1 && page.connections >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_pause_longer_each_time_until_one_works() {
        let full = std::io::Error::from_raw_os_error(nix::libc::EMFILE);
        let mut pause = AcceptPause::default();
        let mut waited = Vec::new();
        for _ in 0..7 {
            let started = Instant::now();
            pause.after(&full, None).await;
            waited.push(started.elapsed().as_millis());
        }
        assert_eq!(waited, [50, 100, 200, 400, 800, 1000, 1000]);
        pause.accepted(None);
        let started = Instant::now();
        pause.after(&full, None).await;
        assert_eq!(
            started.elapsed(),
            ACCEPT_PAUSE_FIRST,
            "a new burst starts short"
        );
    }

    #[test]
    fn mapped_ipv4_is_shown_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.66.0.2]:8088".parse().unwrap();
        let peer: SocketAddr = "[::ffff:10.66.0.1]:40000".parse().unwrap();
        let c = Client::new(mapped, peer);
        assert_eq!(c.local, "10.66.0.2:8088".parse().unwrap());
        assert_eq!(c.peer, "10.66.0.1:40000".parse().unwrap());
    }
}
