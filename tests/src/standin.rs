//! The Tailscale stand-in: plays tailscaled's part in tests, since neither
//! tailscaled nor a control server can be installed here. It serves the
//! LocalAPI endpoints TailGuard uses with tailscaled's JSON shapes, so the
//! daemon cannot tell it from the real one, and records every preference
//! change so tests can assert them. Test-only controls live under
//! `/standin/` (never used by TailGuard).
//!
//! Login: an auth key logs in at once; `login-interactive` offers an
//! AuthURL that a test "visits" with `POST /standin/approve`.
//!
//! Route approval, as Tailscale documents it for subnet routers: an
//! advertised route carries traffic only once an admin (or an
//! auto-approver) approves it; the control server then lists it in the
//! node's `Self.AllowedIPs`, and, this node being the only router for it,
//! in `Self.PrimaryRoutes`. A test approves routes with
//! `POST /standin/set {"approved_routes": [...]}`; an approved route that
//! is no longer advertised is listed in neither.

use std::{
    convert::Infallible,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Method, Request, Response, StatusCode, body::Frame, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::{net::UnixListener, sync::watch};

/// tailscaled's `ipn.State` numbers, as the IPN bus sends them.
fn state_number(state: &str) -> u64 {
    match state {
        "NeedsLogin" => 1,
        "NeedsMachineAuth" => 2,
        "Stopped" => 3,
        "Starting" => 4,
        "Running" => 5,
        _ => 0,
    }
}

/// Everything the stand-in knows and has been told.
#[derive(Clone, Debug)]
pub struct State {
    pub backend_state: String,
    pub auth_url: String,
    /// The node's tailnet addresses, given once logged in.
    pub addresses: Vec<IpAddr>,
    pub online: bool,
    /// Current preferences (tailscaled's field names).
    pub prefs: Map<String, Value>,
    /// Every `start` and `PATCH prefs` body, in order.
    pub log: Vec<Value>,
    /// Peers for `Status.Peer`, keyed by node key.
    pub peers: Map<String, Value>,
    /// The routes the tailnet's admin approved for this node.
    pub approved_routes: Vec<String>,
    /// Logging in leads to `Starting`, and whoever sets up the node's
    /// routing moves it on to `Running`, as tailscaled's engine does; when
    /// false, logging in leads straight to `Running`.
    pub starting_until_routed: bool,
}

impl State {
    pub fn new(addresses: Vec<IpAddr>) -> Self {
        let prefs = json!({
            "ControlURL": "", "RouteAll": false, "ExitNodeID": "", "ExitNodeIP": "", "AutoExitNode": "",
            "ExitNodeAllowLANAccess": false, "CorpDNS": true, "RunWebClient": false, "WantRunning": false,
            "Hostname": "", "AdvertiseRoutes": null, "NoSNAT": false, "NetfilterMode": 2
        });
        Self {
            backend_state: "NeedsLogin".into(),
            auth_url: String::new(),
            addresses,
            online: false,
            prefs: prefs.as_object().cloned().unwrap_or_default(),
            log: Vec::new(),
            peers: Map::new(),
            approved_routes: Vec::new(),
            starting_until_routed: false,
        }
    }

    fn log_in(&mut self) {
        self.backend_state = if self.starting_until_routed {
            "Starting"
        } else {
            "Running"
        }
        .into();
        self.auth_url.clear();
        self.online = true;
    }

    /// What `tailscale logout` (or a node key expiring) leaves: the
    /// backend needs a login again, and until then the node has no
    /// tailnet address (`status` shows addresses only while running).
    fn log_out(&mut self) {
        self.backend_state = "NeedsLogin".into();
        self.online = false;
    }

    fn status(&self) -> Value {
        let logged_in = self.backend_state == "Running";
        let ips: Vec<String> = if logged_in {
            self.addresses.iter().map(ToString::to_string).collect()
        } else {
            vec![]
        };
        let advertised: Vec<String> = self.prefs["AdvertiseRoutes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r.as_str().map(str::to_string))
            .collect();
        let routed: Vec<String> = advertised
            .into_iter()
            .filter(|r| logged_in && self.approved_routes.contains(r))
            .collect();
        let allowed: Vec<String> = self
            .addresses
            .iter()
            .filter(|_| logged_in)
            .map(|a| format!("{a}/{}", if a.is_ipv4() { 32 } else { 128 }))
            .chain(routed.iter().cloned())
            .collect();
        json!({
            "Version": "1.84.0-standin",
            "TUN": true,
            "BackendState": self.backend_state,
            "HaveNodeKey": true,
            "AuthURL": self.auth_url,
            "TailscaleIPs": if ips.is_empty() { Value::Null } else { json!(ips) },
            "Self": {
                "ID": "nStandin1CNTRL", "PublicKey": "nodekey:standin", "HostName": self.prefs["Hostname"],
                "DNSName": "tailguard.standin.ts.net.", "OS": "linux",
                "TailscaleIPs": ips, "AllowedIPs": allowed, "PrimaryRoutes": routed,
                "Online": self.online && logged_in,
                "KeyExpiry": "2099-01-01T00:00:00Z"
            },
            "Health": null,
            "CurrentTailnet": {"Name": "standin.example", "MagicDNSSuffix": "standin.ts.net", "MagicDNSEnabled": true},
            "Peer": self.peers,
        })
    }

    fn notification(&self) -> Value {
        json!({"State": state_number(&self.backend_state), "Prefs": self.prefs, "BrowseToURL": self.auth_url})
    }
}

/// A running stand-in LocalAPI.
pub struct StandIn {
    state: Arc<Mutex<State>>,
    changed: watch::Sender<()>,
}

impl StandIn {
    pub fn new(state: State) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            changed: watch::channel(()).0,
        }
    }

    /// A snapshot of the state, for assertions.
    pub fn state(&self) -> State {
        self.state.lock().unwrap().clone()
    }

    /// Changes the state and tells IPN bus watchers.
    pub fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.state.lock().unwrap());
        self.changed.send_replace(());
    }

    /// Serves the LocalAPI on `socket` until the task is dropped.
    pub async fn serve(self: Arc<Self>, socket: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(socket)?;
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let me = me.clone();
                    async move { Ok::<_, Infallible>(me.handle(req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(
        &self,
        req: Request<hyper::body::Incoming>,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let method = req.method().clone();
        let uri = req.uri().clone();
        let host_ok = req
            .headers()
            .get(hyper::header::HOST)
            .is_none_or(|h| h == "local-tailscaled.sock");
        if !host_ok || req.headers().contains_key(hyper::header::ORIGIN) {
            return reply(StatusCode::FORBIDDEN, json!("invalid Host or Origin"));
        }
        let body = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let path = uri.path();
        let query = uri.query().unwrap_or("");
        match (method, path) {
            (Method::GET, "/localapi/v0/status") => {
                let mut status = self.state.lock().unwrap().status();
                if query.contains("peers=false") {
                    status["Peer"] = Value::Null;
                }
                reply(StatusCode::OK, status)
            }
            (Method::GET, "/localapi/v0/prefs") => {
                reply(StatusCode::OK, json!(self.state.lock().unwrap().prefs))
            }
            (Method::PATCH, "/localapi/v0/prefs") => {
                let Some(masked) = body.as_object().cloned() else {
                    return reply(StatusCode::BAD_REQUEST, json!("expected masked prefs"));
                };
                self.update(|s| {
                    for (key, value) in &masked {
                        if key.ends_with("Set") {
                            continue;
                        }
                        if masked.get(&format!("{key}Set")) == Some(&Value::Bool(true)) {
                            s.prefs.insert(key.clone(), value.clone());
                        }
                    }
                    s.log.push(json!({"PATCH prefs": masked}));
                });
                reply(StatusCode::OK, json!(self.state.lock().unwrap().prefs))
            }
            (Method::POST, "/localapi/v0/start") => {
                self.update(|s| {
                    // Never keep the key itself in the log: tests assert it was sent.
                    let has_key = body
                        .get("AuthKey")
                        .and_then(Value::as_str)
                        .is_some_and(|k| !k.is_empty());
                    let update = body.get("UpdatePrefs").cloned().unwrap_or(Value::Null);
                    if let Some(prefs) = update.as_object() {
                        s.prefs.extend(prefs.clone());
                    }
                    let key = if has_key { "<given>" } else { "" };
                    s.log
                        .push(json!({"start": {"AuthKey": key, "UpdatePrefs": update}}));
                    if has_key {
                        s.log_in();
                    }
                });
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (Method::POST, "/localapi/v0/login-interactive") => {
                self.update(|s| {
                    s.auth_url = "https://login.standin.invalid/a/0123456789".into();
                    s.log.push(json!({"login-interactive": true}));
                });
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (Method::POST, "/localapi/v0/logout") => {
                self.update(|s| {
                    s.log_out();
                    s.log.push(json!({"logout": true}));
                });
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (Method::GET, "/localapi/v0/whois") => {
                let addr = query.strip_prefix("addr=").unwrap_or("");
                let state = self.state.lock().unwrap();
                if state
                    .addresses
                    .iter()
                    .any(|a| addr.starts_with(&a.to_string()))
                {
                    reply(
                        StatusCode::OK,
                        json!({"Node": {"ID": "nStandin1CNTRL"}, "UserProfile": {"LoginName": "standin@example"}}),
                    )
                } else {
                    reply(StatusCode::NOT_FOUND, json!("no match for IP:port"))
                }
            }
            (Method::GET, "/localapi/v0/watch-ipn-bus") => {
                self.update(|s| s.log.push(json!({"watch-ipn-bus": query})));
                self.watch()
            }
            (Method::GET, "/standin/log") => {
                reply(StatusCode::OK, json!(self.state.lock().unwrap().log))
            }
            (Method::POST, "/standin/set") => {
                self.update(|s| {
                    if let Some(addrs) = body.get("addresses").and_then(Value::as_array) {
                        s.addresses = addrs
                            .iter()
                            .filter_map(|a| a.as_str()?.parse().ok())
                            .collect();
                    }
                    if let Some(online) = body.get("online").and_then(Value::as_bool) {
                        s.online = online;
                    }
                    if let Some(routes) = body.get("approved_routes").and_then(Value::as_array) {
                        s.approved_routes = routes
                            .iter()
                            .filter_map(|r| Some(r.as_str()?.to_string()))
                            .collect();
                    }
                });
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            (Method::POST, "/standin/approve") => {
                self.update(State::log_in);
                reply(StatusCode::NO_CONTENT, Value::Null)
            }
            _ => reply(StatusCode::NOT_FOUND, json!(format!("stand-in: no {path}"))),
        }
    }

    /// A never-ending body: the state now, then again on every change.
    fn watch(&self) -> Response<BoxBody<Bytes, Infallible>> {
        let state = self.state.clone();
        let mut changed = self.changed.subscribe();
        changed.mark_changed();
        let stream =
            futures_util::stream::unfold((state, changed), |(state, mut changed)| async move {
                changed.changed().await.ok()?;
                let mut line = state.lock().unwrap().notification().to_string();
                line.push('\n');
                Some((
                    Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
                    (state, changed),
                ))
            });
        Response::builder()
            .status(StatusCode::OK)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(BoxBody::new(StreamBody::new(stream)))
            .expect("a valid response")
    }
}

fn reply(status: StatusCode, body: Value) -> Response<BoxBody<Bytes, Infallible>> {
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(BoxBody::new(Full::new(Bytes::from(text))))
        .expect("a valid response")
}

/// A test's request to a stand-in's socket (LocalAPI or `/standin/`
/// controls): the status and the JSON answer (`null` if none; 503 when
/// nothing listens on the socket).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Value,
) -> (StatusCode, Value) {
    // Not listening (yet): say so rather than panic, tests poll with this.
    let Ok(stream) = tokio::net::UnixStream::connect(socket).await else {
        return (StatusCode::SERVICE_UNAVAILABLE, Value::Null);
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let text = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "local-tailscaled.sock")
        .body(Full::new(Bytes::from(text)))
        .expect("a valid request");
    let response = sender
        .send_request(req)
        .await
        .expect("the stand-in answers");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// [`request`] from synchronous test code: the JSON answer.
pub fn ask(socket: &Path, method: Method, path: &str, body: Value) -> Value {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(request(socket, method, path, body))
        .1
}

/// The preferences the stand-in holds (what the daemon set).
pub fn prefs(socket: &Path) -> Value {
    ask(socket, Method::GET, "/localapi/v0/prefs", Value::Null)
}
