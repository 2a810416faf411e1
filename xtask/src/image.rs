//! `cargo xtask image`: the container image, built on this machine's Docker
//! engine (started by hand when none runs) from locally made bases, since no
//! image registry is reachable here:
//!
//! - `local/debian:bookworm`: debootstrap's minimal Debian, made once and
//!   kept in the engine (with this machine's extra certificate authorities,
//!   so that builds reach the package registries through its proxy);
//! - `local/tailscale-standin`: the test harness's stand-in as `tailscaled`,
//!   passed as `TAILSCALE_IMAGE` for the smoke test (production builds take
//!   Tailscale's official image, the Dockerfile's default).
//!
//! The engine started here uses its own data root, socket and exec root,
//! and `--iptables=false --ip-forward=false --bridge=none`: it changes
//! nothing of the host's network; builds use the host's network, containers
//! get none. It is stopped again when the task ends.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    apt::SourceFiles,
    backports::Release,
    command::{cargo, exec, probe, stage},
};

/// The smoke test's image: the daemon with the stand-in as tailscaled.
pub const SMOKE_IMAGE: &str = "tailguard:smoke";
const BASE: &str = "local/debian:bookworm";
const STANDIN_IMAGE: &str = "local/tailscale-standin";
const DATA_ROOT: &str = "/var/lib/tailguard-docker";
const EXEC_ROOT: &str = "/run/tailguard-docker";
const ROOTFS: &str = "/var/cache/tailguard/bookworm-rootfs";

/// A Docker engine to talk to: the machine's own, or one started here (and
/// stopped on drop).
pub struct Engine {
    pub host: String,
    started: Option<Child>,
}

impl Engine {
    /// The running engine at the default socket (or one this task started
    /// before and left running), or a new one.
    pub fn ensure() -> Result<Self> {
        let host = format!("unix://{EXEC_ROOT}/docker.sock");
        for running in ["unix:///var/run/docker.sock", host.as_str()] {
            if responds(running) {
                eprintln!("  using the running Docker engine ({running})");
                return Ok(Self {
                    host: running.into(),
                    started: None,
                });
            }
        }
        std::fs::create_dir_all(DATA_ROOT)?;
        std::fs::create_dir_all(EXEC_ROOT)?;
        let log = std::fs::File::create(format!("{EXEC_ROOT}.log"))?;
        let child = Command::new("dockerd")
            .args(["--data-root", DATA_ROOT, "--exec-root", EXEC_ROOT])
            .args([
                "--pidfile",
                &format!("{EXEC_ROOT}/dockerd.pid"),
                "-H",
                &host,
            ])
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--ip-forward=false",
            ])
            .args([
                "--ip-masq=false",
                "--bridge=none",
                "--storage-driver",
                "overlay2",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd (cargo xtask setup installs docker.io)")?;
        let engine = Self {
            host,
            started: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !responds(&engine.host) {
            if Instant::now() > deadline {
                bail!("dockerd did not answer within 30 s (its log: {EXEC_ROOT}.log)");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        eprintln!(
            "  started dockerd ({}), stopped again at the end",
            engine.host
        );
        Ok(engine)
    }

    /// Debian's Docker client for this engine (BuildKit on): the newer
    /// client that may come first in PATH lacks buildx.
    pub fn docker(&self) -> Command {
        let mut cmd = Command::new("/usr/bin/docker");
        cmd.env("DOCKER_HOST", &self.host)
            .env("DOCKER_BUILDKIT", "1");
        cmd
    }

    fn has_image(&self, name: &str) -> bool {
        probe(
            self.docker()
                .args(["image", "inspect", name])
                .stdout(Stdio::null()),
        )
        .is_some()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(mut child) = self.started.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn responds(host: &str) -> bool {
    probe(
        Command::new("/usr/bin/docker")
            .env("DOCKER_HOST", host)
            .args(["version", "--format", "{{.Server.Version}}"]),
    )
    .is_some()
}

/// Builds the smoke test's image (the bases first, when missing).
pub fn build(engine: &Engine) -> Result<()> {
    stage("image: local Debian base", || base(engine))?;
    stage("image: Tailscale stand-in", || standin(engine))?;
    stage("image: TailGuard (stand-in as tailscaled)", || {
        exec(
            "docker build",
            engine
                .docker()
                .current_dir(xtask::toolchain::workspace_root())
                .args(["build", "--network", "host", "--progress", "plain"])
                .args(["--build-arg", &format!("BUILD_BASE={BASE}")])
                .args(["--build-arg", &format!("RUNTIME_BASE={BASE}")])
                .args(["--build-arg", &format!("TAILSCALE_IMAGE={STANDIN_IMAGE}")])
                .args(["-t", SMOKE_IMAGE, "."]),
        )
    })
}

fn base(engine: &Engine) -> Result<()> {
    if engine.has_image(BASE) {
        eprintln!("  {BASE} is there");
        return Ok(());
    }
    let rootfs = Path::new(ROOTFS);
    if !rootfs.join("etc/debian_version").exists() {
        let _ = std::fs::remove_dir_all(rootfs);
        exec(
            "debootstrap",
            Command::new("debootstrap")
                .args(["--variant=minbase", "bookworm"])
                .arg(rootfs)
                .arg(debian_mirror()?),
        )?;
    }
    // Packages debootstrap downloaded: not part of the system.
    if let Ok(entries) = std::fs::read_dir(rootfs.join("var/cache/apt/archives")) {
        for entry in entries.flatten() {
            if entry.path().extension().is_some_and(|e| e == "deb") {
                std::fs::remove_file(entry.path())?;
            }
        }
    }
    // The machine's own certificate authorities (a proxy's, here): the
    // build stage's ca-certificates package takes them into its bundle.
    let extra = rootfs.join("usr/local/share/ca-certificates");
    std::fs::create_dir_all(&extra)?;
    if let Ok(entries) = std::fs::read_dir("/usr/local/share/ca-certificates") {
        for entry in entries.flatten() {
            std::fs::copy(entry.path(), extra.join(entry.file_name()))?;
        }
    }
    let tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()
        .context("tar")?;
    exec(
        "docker import",
        engine
            .docker()
            .args(["import", "--change"])
            .arg("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["-", BASE])
            .stdin(tar.stdout.context("tar's output")?),
    )
}

/// The archive this machine's apt uses for its own release (a Debian
/// archive carries every release, so bookworm too).
fn debian_mirror() -> Result<String> {
    let release = Release::system()?;
    let source = SourceFiles::system().archive(&release.codename)?;
    eprintln!(
        "  debootstrap from the mirror of {} (as {} has it)",
        source.suite, source.entry
    );
    Ok(source.uri)
}

/// `local/tailscale-standin`: the stand-in built here as
/// /usr/local/bin/tailscaled, and a `tailscale` that says what it is.
fn standin(engine: &Engine) -> Result<()> {
    exec(
        "build the stand-in",
        cargo().args([
            "build",
            "--release",
            "--package",
            "tailguard-tests",
            "--bin",
            "tailscaled-standin",
        ]),
    )?;
    let dir = tempdir()?;
    std::fs::copy(
        crate::command::cargo_target_dir().join("release/tailscaled-standin"),
        dir.join("tailscaled"),
    )?;
    std::fs::write(
        dir.join("tailscale"),
        "#!/bin/sh\necho 'this image carries the test stand-in for tailscaled, not Tailscale' >&2\nexit 1\n",
    )?;
    std::fs::set_permissions(
        dir.join("tailscale"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    std::fs::write(
        dir.join("Dockerfile"),
        "ARG BASE\nFROM ${BASE}\nCOPY tailscaled tailscale /usr/local/bin/\n",
    )?;
    let result = exec(
        "docker build (stand-in)",
        engine
            .docker()
            .args(["build", "--quiet", "--build-arg", &format!("BASE={BASE}")])
            .args(["-t", STANDIN_IMAGE])
            .arg(&dir),
    );
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tailguard-standin-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `cargo xtask image`: setup, then the smoke test's image.
pub fn run() -> Result<()> {
    stage("setup", crate::setup::run)?;
    let engine = Engine::ensure()?;
    build(&engine)?;
    let size =
        probe(
            engine
                .docker()
                .args(["image", "inspect", "--format", "{{.Size}}", SMOKE_IMAGE]),
        )
        .unwrap_or_default();
    eprintln!("  {SMOKE_IMAGE}: {} bytes", size.trim());
    Ok(())
}
