//! The WireGuard device: the kernel's, created over netlink, or — when the
//! kernel has no WireGuard — a userspace implementation (wireguard-go, as
//! wg-quick uses) that we run as our child and talk to over its UAPI socket.
//! Keys and peers go through wireguard-control, which speaks both.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use nix::errno::Errno;
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};
use tracing::{info, warn};
use wireguard_control::{Backend, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::{
    config::plan::{FwMark, WireGuardPlan},
    config::wg_quick::Endpoint,
    host::netlink::{Netlink, NetlinkError},
};

/// Where userspace implementations put their UAPI sockets.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// How long a query or update of the device may take. A stopped or hung
/// wireguard-go still accepts the connection to its socket (the kernel
/// queues it) and then never answers: without a limit, the daemon's loop
/// would wait with it.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);

// debug-ok: names and messages only, no key.
#[derive(Debug, thiserror::Error)]
pub enum WireGuardError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{device} exists but is a {kind} device, not WireGuard")]
    NotWireGuard { device: String, kind: String },
    #[error("starting the userspace WireGuard `{program}` for {device}: {message}")]
    Userspace {
        program: String,
        device: String,
        message: String,
    },
    #[error("configuring WireGuard device {device}: {message}")]
    Configure { device: String, message: String },
    #[error("the WireGuard device {device} did not answer within {seconds} s{action}")]
    NoAnswer {
        device: String,
        seconds: u64,
        /// What was done about it.
        action: &'static str,
    },
}

type Result<T> = std::result::Result<T, WireGuardError>;

/// A WireGuard device that is up (or being brought up).
pub struct WgDevice {
    pub name: String,
    pub ifindex: u32,
    /// Kernel, or the userspace implementation's UAPI socket.
    pub backend: Backend,
    /// The userspace implementation we started (none if it was running
    /// already, or for the kernel's device).
    child: Option<Child>,
    /// An exchange is under way. The daemon's loop makes one at a time, so
    /// one found under way at the start of the next has timed out and is
    /// still blocked on the device's socket: no other is started until it
    /// ends (each would hold a thread, and the loop for [`ANSWER_WITHIN`]).
    in_flight: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl WgDevice {
    /// Creates the device, or takes over the one that exists (a second start
    /// is harmless). Prefers the kernel; falls back to `userspace_program`.
    pub async fn create(nl: &Netlink, name: &str, userspace_program: &str) -> Result<Self> {
        match nl.link_kind(name).await? {
            Some(kind) if kind == "wireguard" => {
                return Self::found(nl, name, Backend::Kernel).await;
            }
            Some(_) if is_userspace_device(name) => {
                return Self::found(nl, name, Backend::Userspace).await;
            }
            Some(kind) => {
                return Err(WireGuardError::NotWireGuard {
                    device: name.into(),
                    kind,
                });
            }
            None => {}
        }
        match nl.add_wireguard(name).await {
            Ok(()) => {
                info!(device = name, "created kernel WireGuard device");
                Self::found(nl, name, Backend::Kernel).await
            }
            Err(e) if e.errno == Some(Errno::EOPNOTSUPP) => {
                info!(
                    device = name,
                    program = userspace_program,
                    "the kernel has no WireGuard: using userspace WireGuard"
                );
                let child = start_userspace(name, userspace_program).await?;
                let mut device = Self::found(nl, name, Backend::Userspace).await?;
                device.child = Some(child);
                Ok(device)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn found(nl: &Netlink, name: &str, backend: Backend) -> Result<Self> {
        let ifindex = nl
            .link_index(name)
            .await?
            .ok_or_else(|| WireGuardError::Configure {
                device: name.into(),
                message: "the device vanished right after it was created".into(),
            })?;
        Ok(Self {
            name: name.into(),
            ifindex,
            backend,
            child: None,
            in_flight: Default::default(),
        })
    }

    /// Sets the private key, listen port, fwmark and exactly the planned peers
    /// (peers not in the plan are removed). Endpoints given as host names are
    /// resolved now; one that does not resolve is left unset with a warning,
    /// and the re-resolution task sets it later.
    pub async fn configure(&self, plan: &WireGuardPlan) -> Result<()> {
        let mut update = DeviceUpdate::new()
            .set_private_key(Key(plan.private_key.0))
            .replace_peers();
        if let Some(port) = plan.listen_port {
            update = update.set_listen_port(port);
        }
        if let Some(mark) = plan.fwmark.known() {
            update = update.set_fwmark(mark);
        }
        for peer in &plan.peers {
            let mut builder = PeerConfigBuilder::new(&Key(peer.public_key.0)).replace_allowed_ips();
            if let Some(preshared) = &peer.preshared_key {
                builder = builder.set_preshared_key(Key(preshared.0));
            }
            for net in &peer.allowed_ips {
                builder = builder.add_allowed_ip(net.addr(), net.prefix_len());
            }
            if let Some(keepalive) = peer.persistent_keepalive {
                builder = builder.set_persistent_keepalive_interval(keepalive);
            }
            if let Some(endpoint) = &peer.endpoint {
                match resolve(endpoint).await {
                    Some(addr) => builder = builder.set_endpoint(addr),
                    None => {
                        warn!(device = self.name, peer = %peer.public_key, %endpoint, "endpoint does not resolve yet")
                    }
                }
            }
            update = update.add_peer(builder);
        }
        self.apply(update).await?;
        if plan.fwmark == FwMark::ActualListenPort {
            // No mark and no fixed port: mark with the port the device got,
            // as the original does.
            let port = self.listen_port().await?;
            self.apply(DeviceUpdate::new().set_fwmark(u32::from(port)))
                .await?;
        }
        Ok(())
    }

    /// Sets one peer's endpoint (endpoint re-resolution).
    pub async fn set_endpoint(
        &self,
        peer: &crate::config::wg_quick::PublicKey,
        addr: SocketAddr,
    ) -> Result<()> {
        let update =
            DeviceUpdate::new().add_peer(PeerConfigBuilder::new(&Key(peer.0)).set_endpoint(addr));
        self.apply(update).await
    }

    /// Sets one peer's persistent keepalive (0: none). Turned on, WireGuard
    /// sends one at once, and a handshake first if the session expired.
    pub async fn set_keepalive(
        &self,
        peer: &crate::config::wg_quick::PublicKey,
        seconds: u16,
    ) -> Result<()> {
        let update = DeviceUpdate::new().add_peer(
            PeerConfigBuilder::new(&Key(peer.0)).set_persistent_keepalive_interval(seconds),
        );
        self.apply(update).await
    }

    /// The device as WireGuard reports it.
    pub async fn reported(&self) -> Result<wireguard_control::Device> {
        let (name, backend) = (self.interface_name()?, self.backend);
        self.answer("query", move || {
            wireguard_control::Device::get(&name, backend)
        })
        .await
    }

    pub async fn listen_port(&self) -> Result<u16> {
        self.reported()
            .await?
            .listen_port
            .ok_or_else(|| self.configure_error("the device reports no listen port".into()))
    }

    async fn apply(&self, update: DeviceUpdate) -> Result<()> {
        let (name, backend) = (self.interface_name()?, self.backend);
        self.answer("update", move || update.apply(&name, backend))
            .await
    }

    /// Runs one blocking exchange with the device (`what` it is, for the
    /// message), within [`ANSWER_WITHIN`]. When the wireguard-go we started
    /// does not answer in time it is hung: it is killed, which takes its
    /// device with it, and the daemon brings the WireGuard side up again
    /// (the exchange's thread, blocked on its socket, then ends too). One we
    /// did not start is only reported.
    async fn answer<T: Send + 'static>(
        &self,
        what: &str,
        exchange: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        use std::sync::atomic::Ordering;
        let no_answer = |action| WireGuardError::NoAnswer {
            device: self.name.clone(),
            seconds: ANSWER_WITHIN.as_secs(),
            action,
        };
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return Err(no_answer(" (an earlier query is still waiting for it)"));
        }
        /// Ends the exchange however its thread ends (a panic too).
        struct Ended(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Ended {
            fn drop(&mut self) {
                self.0.store(false, std::sync::atomic::Ordering::Release);
            }
        }
        let ended = Ended(self.in_flight.clone());
        let timed = tokio::task::spawn_blocking(move || {
            let _ended = ended;
            exchange()
        });
        match tokio::time::timeout(ANSWER_WITHIN, timed).await {
            Ok(finished) => finished
                .map_err(|e| {
                    self.configure_error(format!("the WireGuard {what} did not finish: {e}"))
                })?
                .map_err(|e| self.configure_error(e.to_string())),
            Err(_) => {
                let pid = self.child.as_ref().and_then(Child::id);
                if let Some(pid) = pid {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                Err(no_answer(if pid.is_some() {
                    ": its wireguard-go is killed, to be started again"
                } else {
                    " (not started by TailGuard: left as it is)"
                }))
            }
        }
    }

    fn interface_name(&self) -> Result<InterfaceName> {
        self.name
            .parse()
            // debug-ok: an interface-name parse error, no key.
            .map_err(|e| self.configure_error(format!("{e:?}")))
    }

    fn configure_error(&self, message: String) -> WireGuardError {
        WireGuardError::Configure {
            device: self.name.clone(),
            message,
        }
    }

    /// Deletes the device. A userspace implementation exits when its device
    /// goes; we wait for ours (and stop it if it lingers).
    pub async fn delete(mut self, nl: &Netlink) -> Result<()> {
        nl.delete_link(&self.name).await?;
        if let Some(mut child) = self.child.take()
            && tokio::time::timeout(Duration::from_secs(3), child.wait())
                .await
                .is_err()
        {
            warn!(
                device = self.name,
                "userspace WireGuard did not exit with its device; stopping it"
            );
            let _ = child.kill().await;
        }
        let _ = std::fs::remove_file(uapi_socket(&self.name));
        info!(device = self.name, "WireGuard device removed");
        Ok(())
    }
}

/// Whether `name` is a userspace WireGuard's device: its UAPI socket is there.
pub fn is_userspace_device(name: &str) -> bool {
    uapi_socket(name).exists()
}

fn uapi_socket(name: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{name}.sock"))
}

/// Starts `program -f NAME` (foreground, so it stays our child and its log
/// becomes ours) and waits for its UAPI socket.
async fn start_userspace(name: &str, program: &str) -> Result<Child> {
    let fail = |message: String| WireGuardError::Userspace {
        program: program.into(),
        device: name.into(),
        message,
    };
    let _ = std::fs::remove_file(uapi_socket(name));
    let mut child = Command::new(program)
        .args(["-f", name])
        // wireguard-go: log level; and no warning box about the kernel module.
        .env("LOG_LEVEL", "error")
        // A group of its own: a signal for ours (Ctrl-C at a terminal, a
        // SIGHUP to the group) is ours to act on; the device goes when our
        // teardown deletes it, in order.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| {
            fail(format!(
                "{e} (set WG_QUICK_USERSPACE_IMPLEMENTATION to its path)"
            ))
        })?;
    if let Some(stderr) = child.stderr.take() {
        let device = name.to_string();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.trim().is_empty() && !line.contains('│') && !line.contains('─') {
                    info!(device, "userspace WireGuard: {line}");
                }
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if tokio::net::UnixStream::connect(uapi_socket(name))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(fail(format!(
                "it exited ({status}) before opening {}",
                uapi_socket(name).display()
            )));
        }
        if tokio::time::Instant::now() > deadline {
            return Err(fail(format!(
                "no UAPI socket at {} after 5 s",
                uapi_socket(name).display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An endpoint's address: as given, or the first address its name resolves to.
pub async fn resolve(endpoint: &Endpoint) -> Option<SocketAddr> {
    match endpoint {
        Endpoint::Address(addr) => Some(*addr),
        Endpoint::Host { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await
            .ok()?
            .next(),
    }
}
