//! The daemon under test: a `tailguard run` started by a test (from its
//! namespace thread, so the daemon runs in that namespace) through one
//! builder, its log collected as it goes; and the CLI commands a test asks
//! it with.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

pub use tailguard::report::StatusReport;

use crate::{
    bridge::Bridge,
    tailguard_bin,
    wg::{ConfigDir, Testbed},
};

/// How long a daemon may take to reach what a test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// Where a daemon under test runs: next to a [`Testbed`]'s WireGuard peer
/// with a configuration directory, or as the node of a [`Bridge`] (whose
/// stand-in then carries the tailnet to the bridge's tailnet peer).
pub enum Site<'a> {
    Testbed(&'a Testbed, &'a ConfigDir),
    Bridge(&'a Bridge),
}

impl<'a> From<(&'a Testbed, &'a ConfigDir)> for Site<'a> {
    fn from((bed, dir): (&'a Testbed, &'a ConfigDir)) -> Self {
        Self::Testbed(bed, dir)
    }
}

impl<'a> From<&'a Bridge> for Site<'a> {
    fn from(bridge: &'a Bridge) -> Self {
        Self::Bridge(bridge)
    }
}

impl Site<'_> {
    fn bed(&self) -> &Testbed {
        match self {
            Self::Testbed(bed, _) => bed,
            Self::Bridge(b) => &b.bed,
        }
    }

    fn dir(&self) -> &ConfigDir {
        match self {
            Self::Testbed(_, dir) => dir,
            Self::Bridge(b) => &b.dir,
        }
    }
}

/// How a test starts its daemon: the one way to (see
/// [`DaemonUnderTest::builder`]). Every start is `tailguard run` for the
/// site's WireGuard device and configuration, with a resolver file and a
/// pinning directory of the test's own (never the host's); what the test
/// adds comes on top, later settings winning.
#[must_use = "a builder starts nothing until `start`"]
pub struct Builder<'a> {
    site: Site<'a>,
    standin: bool,
    wrapper: Vec<String>,
    env: Vec<(String, String)>,
}

impl<'a> Builder<'a> {
    /// The Tailscale stand-in as the daemon's tailscaled: its LocalAPI
    /// socket in the configuration directory, its device uniquely named
    /// (a bridge's daemon always has it, logged in).
    pub fn standin(mut self) -> Self {
        self.standin = true;
        self
    }

    /// `TG_DATAPATH`: `ebpf` or `netfilter`.
    pub fn datapath(self, datapath: &str) -> Self {
        self.env("TG_DATAPATH", datapath)
    }

    /// One more setting of the daemon's environment.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// More settings of the daemon's environment, in order.
    pub fn envs(self, env: &[(&str, &str)]) -> Self {
        env.iter().fold(self, |b, (key, value)| b.env(key, value))
    }

    /// Runs the daemon through `wrapper` (a command and its arguments, to
    /// which the daemon's command line is appended), e.g. to drop
    /// privileges or to give it a mount namespace of its own.
    pub fn via(mut self, wrapper: &[&str]) -> Self {
        self.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Runs the daemon in a mount namespace of its own where `file` is seen
    /// at `target` (e.g. `/etc/hosts`); the machine's own stays as it is.
    pub fn with_file_at(self, target: &str, file: &std::path::Path) -> Self {
        let bind = format!("mount --bind \"$0\" {target} && exec \"$@\"");
        let file = file.display().to_string();
        self.via(&[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &bind,
            &file,
        ])
    }

    /// The command and the stand-in it gives the daemon, if any.
    fn prepare(&self) -> (Command, Option<StandIn>) {
        let daemon = tailguard_bin();
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(daemon);
                cmd
            }
            None => Command::new(daemon),
        };
        let (bed, dir) = (self.site.bed(), self.site.dir());
        crate::ensure_bpffs();
        cmd.arg("run")
            .env("WG_DEVICE", &bed.device)
            .env("WG_CONFIG_DIR", &dir.0)
            .env("TG_RESOLV_CONF", dir.0.join("resolv.conf"))
            .env("TG_BPF_DIR", dir.bpf_dir());
        let standin = (self.standin || matches!(self.site, Site::Bridge(_))).then(|| {
            // A device the test names (a restart's, to find the first
            // one's) is the stand-in's; else one of its own.
            let named = self.env.iter().rev().find(|(k, _)| k == "TS_DEVICE");
            let standin = StandIn {
                socket: dir.0.join("tailscaled.sock"),
                ts_device: named
                    .map_or_else(|| crate::netns::unique_ifname("ts"), |(_, d)| d.clone()),
            };
            cmd.env("TS_DEVICE", &standin.ts_device)
                .env("TS_TAILSCALED", crate::standin_bin())
                .env("TS_SOCKET", &standin.socket)
                .env("TS_STATE_DIR", dir.0.join("state"));
            standin
        });
        if let Site::Bridge(b) = self.site {
            cmd.envs(b.standin_env());
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        (cmd, standin)
    }

    /// The command [`Builder::start`] would run, for a test that wants its
    /// own standard streams.
    pub fn command(&self) -> Command {
        self.prepare().0
    }

    /// Starts the daemon from the calling thread (which must be in the
    /// site's namespace: the daemon runs where it is started).
    pub fn start(self) -> DaemonUnderTest {
        let (cmd, standin) = self.prepare();
        let mut daemon = DaemonUnderTest::spawn(cmd);
        daemon.standin = standin;
        daemon
    }

    /// [`Builder::start`] on a bridge, then waits until the node is
    /// healthy and the second WireGuard peer (and any more clients) has its
    /// handshake (each retries only every 5 s); asserts that healthy means the fast path (when it
    /// runs) has the tailnet side, and that where the peers are the
    /// kernel's, the daemon's device is too.
    pub fn start_healthy(self) -> DaemonUnderTest {
        let Site::Bridge(bridge) = self.site else {
            panic!("start_healthy waits for a bridge's peers: build the daemon on a bridge")
        };
        let mut node = self.start();
        node.wait_for("health", |_| health().0);
        node.wait_for("the WireGuard clients' handshakes", |_| {
            bridge.client_connected()
        });
        // Healthy means the fast path (when it runs) has the tailnet side:
        // its maps know tailscaled's device and address.
        let f = status().forwarding;
        assert!(
            f.as_ref()
                .is_none_or(|f| f.ts_ifindex != 0 && f.ts_v4.is_some()),
            "healthy, but the fast path's maps lack the tailnet side: {f:#?}\n{}",
            node.log()
        );
        // Where the peers are the kernel's, the daemon's device must be
        // too: a userspace one has its UAPI socket.
        if crate::wg::kernel_wireguard() {
            let socket = format!("/var/run/wireguard/{}.sock", bridge.bed.device);
            assert!(
                !std::path::Path::new(&socket).exists(),
                "the kernel has WireGuard, but the daemon runs userspace WireGuard:\n{}",
                node.log()
            );
        }
        node
    }
}

/// The stand-in a daemon under test has as its tailscaled.
pub struct StandIn {
    /// Its LocalAPI socket.
    pub socket: std::path::PathBuf,
    /// The Tailscale device it makes.
    pub ts_device: String,
}

/// A `tailguard run` started by a test, its log collected as it goes.
pub struct DaemonUnderTest {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    standin: Option<StandIn>,
}

impl DaemonUnderTest {
    /// How a test starts a daemon at `site`: a bridge, or
    /// `(&testbed, &config_dir)`; e.g.
    /// `DaemonUnderTest::builder(&bridge).datapath("ebpf").env("TS_DEST_IP", WG_SERVER).start_healthy()`.
    pub fn builder<'a>(site: impl Into<Site<'a>>) -> Builder<'a> {
        Builder {
            site: site.into(),
            standin: false,
            wrapper: Vec::new(),
            env: Vec::new(),
        }
    }

    /// The daemon's stand-in tailscaled (see [`Builder::standin`]).
    pub fn standin(&self) -> &StandIn {
        self.standin
            .as_ref()
            .expect("a daemon started with the stand-in (`Builder::standin`, or on a bridge)")
    }

    /// Runs `cmd` — a `tailguard run`, perhaps wrapped in another command —
    /// collecting its log.
    fn spawn(mut cmd: Command) -> Self {
        // A process group of its own: a Ctrl-C at the terminal (the demo)
        // is for the caller, which then stops the daemon in order.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("starting tailguard");
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().expect("piped stderr");
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        Self {
            child,
            log,
            reader: Some(reader),
            standin: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pid of the daemon's child whose command line matches `pattern`
    /// (`pgrep -f`), empty when there is none.
    pub fn child_pid(&self, pattern: &str) -> String {
        let out = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string(), "-f", pattern])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// The exit status, if the daemon has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for `done`, failing with the log if the daemon exits first or
    /// time runs out.
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        self.wait_within(PATIENCE, what, done);
    }

    /// As [`DaemonUnderTest::wait_for`], for what takes longer than usual
    /// by design (`base`, scaled as every patience is).
    pub fn wait_within(&mut self, base: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + crate::patience(base);
        while !done(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tailguard exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {} s:\n{}",
                crate::patience(base).as_secs(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the daemon to end by itself (a start that fails): its exit
    /// status and its whole log.
    pub fn exit(mut self) -> (ExitStatus, String) {
        let status = self.child.wait().unwrap();
        (status, self.finish())
    }

    /// SIGTERM; the daemon must then exit successfully. Returns its log.
    pub fn stop(mut self) -> String {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let status = self.child.wait().unwrap();
        let log = self.finish();
        assert!(
            status.success(),
            "tailguard failed on SIGTERM ({status}):\n{log}"
        );
        log
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.finish();
    }

    /// The whole log, once the process is gone and its pipe drained.
    fn finish(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        self.log()
    }
}

/// The datapaths a test runs once each, expecting the same (`TG_DATAPATH`).
pub const DATAPATHS: [&str; 2] = ["ebpf", "netfilter"];

/// Packets the fast path counted for `device` with `outcome` (`tailguard
/// status` in the calling thread's namespace); none before it answers.
pub fn counted(device: &str, outcome: &str) -> u64 {
    status().counted(device, outcome)
}

/// `tailguard <args>` in the calling thread's namespace, with `env` on top.
pub fn tailguard(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> std::process::Output {
    Command::new(tailguard_bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running tailguard {args:?}: {e}"))
}

/// `tailguard health` in the calling thread's namespace: healthy or not,
/// and the report.
pub fn health() -> (bool, String) {
    let out = tailguard(&["health"], &[]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `tailguard status` in the calling thread's namespace: the daemon's
/// report, or an empty one (not healthy, no datapath) before it answers.
pub fn status() -> StatusReport {
    let out = tailguard(&["status"], &[]);
    if !out.status.success() {
        return StatusReport::default();
    }
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "tailguard status printed something that is not its report ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
