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
/// Answered tries in a row that make a failed target answer again: a lossy
/// link that answers one try in two does not make the routes flap.
pub const ANSWERS_AFTER: u32 = 2;

/// What the probe says: `None` while the target answers (or before it has
/// failed [`FAILS_AFTER`] times in a row), else why it does not.
pub type Verdict = Option<String>;

/// Tries `target` every [`EVERY`], the first time at once, publishing each
/// change of its verdict; ends when every receiver is gone.
pub async fn run(target: SocketAddr, verdict: watch::Sender<Verdict>) {
    let mut runs = Runs::default();
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
        let failed = failed
            .map(|why| format!("TG_HEALTH_PROBE={target} does not accept a connection: {why}"));
        verdict.send_if_modified(|old| {
            let now = runs.next(old, failed);
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

/// The tries' runs of failures and answers, and the verdict they make.
#[derive(Default)]
struct Runs {
    failures: u32,
    answers: u32,
}

impl Runs {
    /// The verdict after one more try (`failed`: why it failed), given the
    /// last: it changes only after a run of [`FAILS_AFTER`] failures or
    /// [`ANSWERS_AFTER`] answers.
    fn next(&mut self, last: &Verdict, failed: Option<String>) -> Verdict {
        match failed {
            Some(why) => {
                self.failures += 1;
                self.answers = 0;
                if self.failures >= FAILS_AFTER {
                    Some(why)
                } else {
                    last.clone()
                }
            }
            None => {
                self.answers += 1;
                self.failures = 0;
                if self.answers >= ANSWERS_AFTER {
                    None
                } else {
                    last.clone()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the target counts as answering after each try of `tries`
    /// (true: answered).
    fn verdicts(tries: &[bool]) -> Vec<bool> {
        let mut runs = Runs::default();
        let mut verdict: Verdict = None;
        tries
            .iter()
            .map(|&answered| {
                verdict = runs.next(&verdict, (!answered).then(|| "refused".to_string()));
                verdict.is_none()
            })
            .collect()
    }

    #[test]
    fn a_run_of_failures_fails_it_and_a_run_of_answers_brings_it_back() {
        let (ok, no) = (true, false);
        assert_eq!(
            verdicts(&[ok, no, ok, no, no, no, ok, no, ok, ok, ok]),
            [ok, ok, ok, ok, no, no, no, no, no, ok, ok]
        );
    }
}
