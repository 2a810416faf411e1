//! `cargo xtask bench`: setup, then the benchmarks in release mode (as
//! root). They measure and write `benches/results/`; they assert nothing.

use anyhow::Result;

use crate::{
    command::{cargo, exec, stage},
    setup,
};

pub fn run() -> Result<()> {
    stage("setup", setup::run)?;
    // The throughput runs start the daemon and the Tailscale stand-in.
    crate::command::build_daemon_and_tools(&["--release"])?;
    crate::command::outlive_ctrl_c()?;
    exec(
        "tailguard-bench",
        cargo().args([
            "run",
            "--release",
            "--quiet",
            "--package",
            "tailguard-benches",
            "--bin",
            "tailguard-bench",
        ]),
    )
}
