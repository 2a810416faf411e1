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
    crate::command::outlive_ctrl_c()?;
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
