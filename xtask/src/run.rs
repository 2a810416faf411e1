//! `cargo xtask run`: the daemon, built in release mode after `setup`.

use anyhow::Result;

use crate::{
    command::{cargo, exec, stage},
    setup,
};

pub fn run(args: &[String]) -> Result<()> {
    stage("setup", setup::run)?;
    exec(
        "tailguard",
        cargo()
            .args([
                "run",
                "--release",
                "--quiet",
                "--package",
                "tailguard",
                "--",
            ])
            .args(args),
    )
}
