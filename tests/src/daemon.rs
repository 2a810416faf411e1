//! A `tailguard run` started by a test (from its namespace thread, so the
//! daemon runs in that namespace), its log collected as it goes.

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

use crate::{
    tailguard_bin,
    wg::{ConfigDir, Testbed},
};

/// How long a daemon may take to reach what a test waits for.
const PATIENCE: Duration = Duration::from_secs(20);

/// A daemon whose "tailscaled" is the stand-in.
pub struct WithStandIn {
    pub daemon: Daemon,
    /// The stand-in's LocalAPI socket.
    pub socket: std::path::PathBuf,
    pub ts_device: String,
}

pub struct Daemon {
    child: Child,
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Daemon {
    /// `tailguard run` for a testbed's WireGuard device and configuration,
    /// with a resolver file of its own (never the host's), and `env` on top.
    pub fn start(bed: &Testbed, dir: &ConfigDir, env: &[(&str, &str)]) -> Self {
        Self::start_via(&[], bed, dir, env)
    }

    /// [`Daemon::start`] through `wrapper` (a command and its arguments, to
    /// which the daemon's command line is appended), e.g. to drop privileges.
    pub fn start_via(
        wrapper: &[&str],
        bed: &Testbed,
        dir: &ConfigDir,
        env: &[(&str, &str)],
    ) -> Self {
        let daemon = tailguard_bin();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(daemon);
                cmd
            }
            None => Command::new(daemon),
        };
        run_args(&mut cmd, bed, dir, env);
        Self::spawn(cmd)
    }

    /// The command [`Daemon::start`] runs, for a test that wants its own
    /// standard streams.
    pub fn command(bed: &Testbed, dir: &ConfigDir, env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(tailguard_bin());
        run_args(&mut cmd, bed, dir, env);
        cmd
    }

    /// [`Daemon::start`] with the Tailscale stand-in as its tailscaled: its
    /// LocalAPI socket in `dir`, its device uniquely named.
    pub fn with_standin(bed: &Testbed, dir: &ConfigDir, env: &[(&str, &str)]) -> WithStandIn {
        Self::with_standin_via(&[], bed, dir, env)
    }

    /// [`Daemon::with_standin`] through a wrapper (see [`Daemon::start_via`]).
    pub fn with_standin_via(
        wrapper: &[&str],
        bed: &Testbed,
        dir: &ConfigDir,
        env: &[(&str, &str)],
    ) -> WithStandIn {
        let socket = dir.0.join("tailscaled.sock");
        let ts_device = crate::netns::unique_ifname("ts");
        let standin = crate::standin_bin().display().to_string();
        let socket_text = socket.display().to_string();
        let state_dir = dir.0.join("state").display().to_string();
        let mut all = vec![
            ("TS_DEVICE", ts_device.as_str()),
            ("TS_TAILSCALED", standin.as_str()),
            ("TS_SOCKET", socket_text.as_str()),
            ("TS_STATE_DIR", state_dir.as_str()),
        ];
        all.extend_from_slice(env);
        WithStandIn {
            daemon: Self::start_via(wrapper, bed, dir, &all),
            socket,
            ts_device,
        }
    }

    /// Runs `cmd` — a `tailguard run`, perhaps wrapped in another command —
    /// collecting its log.
    pub fn spawn(mut cmd: Command) -> Self {
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
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
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
        let deadline = Instant::now() + crate::patience(PATIENCE);
        while !done(self) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tailguard exited ({status}) before {what}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {} s:\n{}",
                crate::patience(PATIENCE).as_secs(),
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

/// `run` for a testbed's WireGuard device and configuration, with a
/// resolver file (never the host's) and a pinning directory of the test's
/// own, and `env` on top.
fn run_args(cmd: &mut Command, bed: &Testbed, dir: &ConfigDir, env: &[(&str, &str)]) {
    crate::ensure_bpffs();
    cmd.arg("run")
        .env("WG_DEVICE", &bed.device)
        .env("WG_CONFIG_DIR", &dir.0)
        .env("TG_RESOLV_CONF", dir.0.join("resolv.conf"))
        .env("TG_BPF_DIR", dir.bpf_dir())
        .envs(env.iter().copied());
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

/// `tailguard status` in the calling thread's namespace: the daemon's JSON
/// status, or `null` before it answers.
pub fn status() -> serde_json::Value {
    serde_json::from_slice(&tailguard(&["status"], &[]).stdout).unwrap_or_default()
}
