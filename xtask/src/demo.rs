//! `cargo xtask demo`: setup, build the daemon, the Tailscale stand-in and
//! the demo, then run the demo (as root) until Ctrl-C.

use anyhow::Result;

use crate::{
    command::{exec, stage},
    setup,
};

pub fn run() -> Result<()> {
    stage("setup", setup::run)?;
    stage("build", || {
        crate::command::build_daemon_and_tools(&["--quiet"])
    })?;
    let demo = crate::command::cargo_target_dir()
        .join("debug")
        .join("tailguard-demo");
    crate::command::outlive_ctrl_c()?;
    exec("tailguard-demo", &mut std::process::Command::new(demo))
}
