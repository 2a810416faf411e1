//! `cargo xtask demo`: setup, build the daemon, the Tailscale stand-in and
//! the demo, then run the demo (as root) until Ctrl-C.

use anyhow::Result;

use crate::{
    command::{cargo, exec, stage},
    setup,
};

pub fn run() -> Result<()> {
    stage("setup", setup::run)?;
    stage("build", || {
        exec(
            "cargo build",
            cargo().args([
                "build",
                "--quiet",
                "--package",
                "tailguard",
                "--package",
                "tailguard-tests",
                "--bins",
            ]),
        )
    })?;
    let demo = cargo_target_dir().join("debug").join("tailguard-demo");
    // Ctrl-C reaches every process of the terminal's group: the demo stops
    // on it and takes everything down, so we wait for it rather than die
    // before it has. (It installs its own handler; an ignored signal would
    // otherwise stay ignored in it.)
    // SAFETY: setting a signal's disposition to "ignore" has no handler to
    // run unsafely.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }?;
    exec("tailguard-demo", &mut std::process::Command::new(demo))
}

/// Where cargo puts its output (`CARGO_TARGET_DIR`, else `target/` at the
/// workspace root, which is this crate's parent).
fn cargo_target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("xtask sits in the workspace")
                .join("target")
        },
        std::path::PathBuf::from,
    )
}
