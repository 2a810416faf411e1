//! Health: the node is healthy when Tailscale runs with addresses and is
//! online, the WireGuard device is up, and the programs are attached on both
//! devices. `/healthz` answers 200 or 503 with the reason (and when the
//! node started and first became healthy); `tailguard health` asks it, for
//! Docker's HEALTHCHECK.

use std::{
    convert::Infallible,
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::{Request, Response, StatusCode, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::info;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    pub started_at: SystemTime,
    pub first_healthy_at: Option<SystemTime>,
    pub wireguard_up: bool,
    pub wireguard_attached: bool,
    pub tailscale_attached: bool,
    /// The eBPF datapath runs, so both devices need the programs; with the
    /// netfilter datapath the devices need only exist.
    pub programs_required: bool,
    /// `Err`: why Tailscale is not ready.
    pub tailscale: Result<(), String>,
    /// The forwarding plane's maps as last read back from the kernel.
    pub forwarding: serde_json::Value,
    /// The fast path's outcome counters, read each second.
    pub counters: serde_json::Value,
}

impl Health {
    pub fn new() -> Self {
        Self {
            started_at: SystemTime::now(),
            first_healthy_at: None,
            wireguard_up: false,
            wireguard_attached: false,
            tailscale_attached: false,
            programs_required: true,
            tailscale: Err("tailscaled has not answered yet".into()),
            forwarding: serde_json::Value::Null,
            counters: serde_json::Value::Null,
        }
    }

    /// `Ok`, or every reason the node is not healthy.
    pub fn verdict(&self) -> Result<(), String> {
        let mut reasons = Vec::new();
        if let Err(why) = &self.tailscale {
            reasons.push(why.clone());
        }
        if !self.wireguard_up {
            reasons.push("the WireGuard device is not up".into());
        }
        if self.programs_required && !(self.wireguard_attached && self.tailscale_attached) {
            reasons.push("the eBPF programs are not attached to both devices".into());
        } else if !self.tailscale_attached {
            reasons.push("the Tailscale device does not exist".into());
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
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

    fn report(&self) -> (StatusCode, String) {
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

    /// `/status`: the health and what the forwarding plane holds, as JSON.
    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "healthy": self.verdict().is_ok(),
            "reason": self.verdict().err(),
            "started_at": unix_seconds(self.started_at),
            "first_healthy_at": self.first_healthy_at.map(unix_seconds),
            "datapath": if self.programs_required { "ebpf" } else { "netfilter" },
            "forwarding": self.forwarding,
            "counters": self.counters,
        })
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, health: watch::Receiver<Health>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = match req.uri().path() {
                    "/healthz" => health.borrow().report(),
                    "/status" => (StatusCode::OK, format!("{:#}\n", health.borrow().status())),
                    _ => (
                        StatusCode::NOT_FOUND,
                        "/healthz and /status here\n".to_string(),
                    ),
                };
                async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::from(body)))
                            .expect("valid"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Asks a running daemon (`tailguard health`): `Ok(report)` when healthy,
/// `Err(report or why it could not ask)` otherwise.
pub async fn check(addr: SocketAddr) -> Result<String, String> {
    match get(addr, "/healthz").await? {
        (StatusCode::OK, body) => Ok(body),
        (_, body) => Err(body),
    }
}

/// `GET path` from a running daemon's health server: the status and body,
/// or why it could not be asked.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), String> {
    let ask = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("no TailGuard answers on {addr}: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .expect("valid");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), ask)
        .await
        .unwrap_or_else(|_| Err(format!("TailGuard on {addr} did not answer within 5 s")))
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
            ..Health::new()
        }
    }

    #[test]
    fn every_missing_part_is_named() {
        assert_eq!(healthy().verdict(), Ok(()));
        let h = Health {
            tailscale: Err("tailscaled is NeedsLogin, not Running".into()),
            tailscale_attached: false,
            ..healthy()
        };
        assert_eq!(
            h.verdict(),
            Err("tailscaled is NeedsLogin, not Running; the eBPF programs are not attached to both devices".into())
        );
        assert_eq!(
            Health {
                wireguard_up: false,
                ..healthy()
            }
            .verdict(),
            Err("the WireGuard device is not up".into())
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
        h.tailscale = Err("offline".into());
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
        tokio::spawn(serve(listener, rx));
        let e = check(addr).await.unwrap_err();
        assert!(
            e.starts_with("unhealthy: tailscaled has not answered yet"),
            "{e}"
        );
        assert!(e.contains("first_healthy_at: never"), "{e}");
        tx.send_modify(|h| {
            *h = healthy();
            h.mark();
        });
        let ok = check(addr).await.unwrap();
        assert!(ok.starts_with("healthy\n") && !ok.contains("never"), "{ok}");
        drop(tx);
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(
            check(closed)
                .await
                .unwrap_err()
                .contains("no TailGuard answers")
        );
    }
}
