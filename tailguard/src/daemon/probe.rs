//! `TG_HEALTH_PROBE`: a TCP service behind WireGuard (the router's web UI,
//! say) that must accept a connection for the WireGuard side to count as
//! alive. A device that is up and a peer that makes handshakes can still
//! leave the network behind it unreachable (the peer's own uplink down, a
//! route gone); this is the user's own end-to-end check.

use std::{net::SocketAddr, time::Duration};

use tokio::{net::TcpStream, sync::watch, time::Instant};
use tracing::{info, warn};

/// How often the target is tried.
pub const EVERY: Duration = Duration::from_secs(5);
/// How long one connection may take: time for the kernel to send its SYN
/// again once (after 1 s) and a reply to the second to come back.
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// Failed tries in a row that make the target fail: one lost SYN and its
/// retry is not an outage.
pub const FAILS_AFTER: u32 = 2;

/// What the probe says: `None` while the target answers (or before it has
/// failed [`FAILS_AFTER`] times in a row), else why it does not.
pub type Verdict = Option<String>;

/// Tries `target` every [`EVERY`], the first time at once, publishing each
/// change of its verdict; ends when every receiver is gone.
pub async fn run(target: SocketAddr, verdict: watch::Sender<Verdict>) {
    let mut failures = 0;
    let mut next = Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        next += EVERY;
        let tried = tokio::time::timeout(TIMEOUT, TcpStream::connect(target)).await;
        let failed = match tried {
            Ok(Ok(_connection)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {} s", TIMEOUT.as_secs())),
        };
        failures = if failed.is_some() { failures + 1 } else { 0 };
        let now = failed
            .filter(|_| failures >= FAILS_AFTER)
            .map(|why| format!("TG_HEALTH_PROBE={target} does not accept a connection: {why}"));
        verdict.send_if_modified(|old| {
            if *old == now {
                return false;
            }
            match &now {
                Some(why) => warn!("{why}"),
                None => info!(%target, "TG_HEALTH_PROBE answers again"),
            }
            *old = now;
            true
        });
        if verdict.is_closed() {
            return;
        }
    }
}
