//! Running the tools a task needs, with errors that say which step failed.

use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// A `cargo` that honours the workspace's `rust-toolchain.toml`. `cargo
/// +stable xtask` sets `RUSTUP_TOOLCHAIN` for us; our children must not
/// inherit it, or they would build with the machine's toolchain instead of
/// the pinned one.
pub fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(xtask::toolchain::workspace_root());
    for var in ["RUSTUP_TOOLCHAIN", "RUSTC", "RUSTDOC", "CARGO"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Runs `cmd` with its output shown; fails naming `what` and the command.
pub fn exec(what: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("  $ {}", display(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("{what}: could not start `{}`", display(cmd)))?;
    if !status.success() {
        bail!("{what}: `{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// `cargo build` of the daemon and the test tools beside it (the
/// Tailscale stand-in, the demo), with `flags` (`--release`, `--quiet`).
pub fn build_daemon_and_tools(flags: &[&str]) -> Result<()> {
    exec(
        "build the daemon and the stand-in",
        cargo().arg("build").args(flags).args([
            "--package",
            "tailguard",
            "--package",
            "tailguard-tests",
            "--bins",
        ]),
    )
}

/// Runs `cmd` quietly and returns its standard output, or `None` when it
/// cannot be started or fails. For probes: "is this already in place?".
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` as a named stage and reports how long it took.
pub fn stage<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    eprintln!("==> {name}");
    let start = Instant::now();
    let result = f().with_context(|| format!("stage `{name}` failed"));
    let secs = start.elapsed().as_secs_f64();
    match &result {
        Ok(_) => eprintln!("==> {name}: done in {secs:.1} s"),
        Err(_) => eprintln!("==> {name}: FAILED after {secs:.1} s"),
    }
    result
}

fn display(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Ctrl-C reaches every process of the terminal's group: a child that
/// stops on it and takes everything down (the demo, the benchmarks) must
/// be waited for rather than orphaned, so the task itself ignores it. (The
/// child installs its own handler; an ignored signal would otherwise stay
/// ignored in it.)
pub fn outlive_ctrl_c() -> Result<()> {
    // SAFETY: setting a signal's disposition to "ignore" has no handler to
    // run unsafely.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }?;
    Ok(())
}

/// Where cargo puts its output (`CARGO_TARGET_DIR`, else `target/` at the
/// workspace root).
pub fn cargo_target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || xtask::toolchain::workspace_root().join("target"),
        std::path::PathBuf::from,
    )
}
