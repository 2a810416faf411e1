//! A typed client for tailscaled's LocalAPI: HTTP/1.1 over its unix socket
//! (`/var/run/tailscale/tailscaled.sock` by default). Requests carry
//! `Host: local-tailscaled.sock` and no Origin/Referer, as tailscaled
//! requires; over the socket, root may read and write.

use std::{future::Future, path::PathBuf, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request, StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

use super::status::Status;
use crate::config::extra_args::MaskedPrefs;

const HOST: &str = "local-tailscaled.sock";

/// How long one request may take, from connecting to the whole answer (for
/// the IPN bus: to its headers). tailscaled answers its LocalAPI in
/// milliseconds; one that has not answered in this long is stopped,
/// deadlocked or its socket's backlog full, and a caller blocked on it
/// would watch neither its child nor the daemon's stop.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("cannot reach tailscaled at {}: {source}", socket.display())]
    Connect {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("LocalAPI {path}: {message}")]
    Http { path: String, message: String },
    #[error("LocalAPI {path} answered {status}: {body}")]
    Status {
        path: String,
        status: StatusCode,
        body: String,
    },
    #[error("LocalAPI {path}: unexpected answer: {message}")]
    Decode { path: String, message: String },
    #[error("LocalAPI {path}: no answer within {} s", timeout.as_secs_f32())]
    TimedOut { path: String, timeout: Duration },
}

type Result<T> = std::result::Result<T, LocalApiError>;

/// Which notifications `watch-ipn-bus` sends (tailscaled's `ipn.NotifyWatchOpt`).
pub mod watch {
    /// Send the current state first, then changes.
    pub const INITIAL_STATE: u64 = 1 << 1;
    /// Include the current prefs in the first message.
    pub const INITIAL_PREFS: u64 = 1 << 2;
}

/// The LocalAPI of one tailscaled.
#[derive(Clone, Debug)]
pub struct LocalApi {
    socket: PathBuf,
    timeout: Duration,
}

impl LocalApi {
    /// A client whose requests give up after [`REQUEST_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::with_timeout(socket, REQUEST_TIMEOUT)
    }

    pub fn with_timeout(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
        }
    }

    /// `work` (part of a request to `path`), given up after the timeout.
    async fn in_time<T>(&self, path: &str, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(LocalApiError::TimedOut {
                    path: path.into(),
                    timeout: self.timeout,
                })
            })
    }

    /// `GET status`, without the peer map when `peers` is false.
    pub async fn status(&self, peers: bool) -> Result<Status> {
        let path = if peers {
            "status"
        } else {
            "status?peers=false"
        };
        self.json(Method::GET, path, None).await
    }

    /// `GET prefs`: the preferences as tailscaled holds them.
    pub async fn prefs(&self) -> Result<Value> {
        self.json(Method::GET, "prefs", None).await
    }

    /// `PATCH prefs` with masked preferences; returns the resulting prefs.
    pub async fn edit_prefs(&self, prefs: &MaskedPrefs) -> Result<Value> {
        self.json(Method::PATCH, "prefs", Some(prefs.to_json()))
            .await
    }

    /// `POST start`: start the backend, logging in with `body`'s auth key.
    pub async fn start(&self, body: Value) -> Result<()> {
        self.send(Method::POST, "start", Some(body)).await.map(drop)
    }

    /// `POST login-interactive`: ask for a login URL (it arrives as the
    /// status's `AuthURL` and on the IPN bus).
    pub async fn login_interactive(&self) -> Result<()> {
        self.send(Method::POST, "login-interactive", None)
            .await
            .map(drop)
    }

    /// `GET whois?addr=`: who is behind a tailnet address.
    pub async fn whois(&self, addr: &str) -> Result<Value> {
        self.json(Method::GET, &format!("whois?addr={addr}"), None)
            .await
    }

    /// `GET watch-ipn-bus?mask=`: a stream of notifications (one JSON object
    /// each) until tailscaled closes it or the stream is dropped. Only its
    /// start is timed: a bus may rightly stay quiet for hours.
    pub async fn watch(&self, mask: u64) -> Result<impl Stream<Item = Result<Value>> + use<>> {
        let path = format!("watch-ipn-bus?mask={mask}");
        let body = self
            .in_time(&path, self.request(Method::GET, &path, None))
            .await?;
        Ok(futures_util::stream::unfold(
            (body, Vec::<u8>::new(), path),
            |(mut body, mut buffer, path)| async move {
                loop {
                    // One JSON object per line (tailscaled flushes after each).
                    if let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buffer.drain(..=end).collect();
                        if line.iter().all(u8::is_ascii_whitespace) {
                            continue;
                        }
                        let item =
                            serde_json::from_slice(&line).map_err(|e| LocalApiError::Decode {
                                path: path.clone(),
                                message: e.to_string(),
                            });
                        return Some((item, (body, buffer, path)));
                    }
                    match body.frame().await {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                buffer.extend_from_slice(&data);
                            }
                        }
                        Some(Err(e)) => {
                            let e = LocalApiError::Http {
                                path: path.clone(),
                                message: e.to_string(),
                            };
                            return Some((Err(e), (body, Vec::new(), path)));
                        }
                        None => return None,
                    }
                }
            },
        ))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T> {
        let bytes = self.send(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| LocalApiError::Decode {
            path: path.into(),
            message: e.to_string(),
        })
    }

    /// One request; the whole body of a successful answer, within the
    /// timeout.
    async fn send(&self, method: Method, path: &str, body: Option<Value>) -> Result<Bytes> {
        self.in_time(path, async {
            let response = self.request(method, path, body).await?;
            collect(path, response).await
        })
        .await
    }

    /// One request; the body of a successful (2xx) answer, unread. Any other
    /// answer is an error carrying what tailscaled said.
    async fn request(&self, method: Method, path: &str, body: Option<Value>) -> Result<Incoming> {
        let http = |e: hyper::Error| LocalApiError::Http {
            path: path.into(),
            message: e.to_string(),
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| LocalApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        tokio::spawn(connection);
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = Request::builder()
            .method(method)
            .uri(format!("/localapi/v0/{path}"))
            .header(hyper::header::HOST, HOST)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| LocalApiError::Http {
                path: path.into(),
                message: e.to_string(),
            })?;
        let response = sender.send_request(request).await.map_err(http)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response.into_body());
        }
        let said = collect(path, response.into_body()).await?;
        Err(LocalApiError::Status {
            path: path.into(),
            status,
            body: String::from_utf8_lossy(&said).trim().to_string(),
        })
    }
}

async fn collect(path: &str, body: Incoming) -> Result<Bytes> {
    body.collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| LocalApiError::Http {
            path: path.into(),
            message: e.to_string(),
        })
}
