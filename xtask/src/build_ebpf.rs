//! `cargo xtask build-ebpf`: the daemon's own build (its build.rs compiles and
//! embeds the eBPF object), then `tailguard programs`, which loads that object
//! through the kernel verifier and lists each program.

use anyhow::Result;

use crate::command::{cargo, exec};

pub fn run() -> Result<()> {
    exec(
        "build and verify the eBPF programs",
        cargo().args(["run", "--quiet", "--package", "tailguard", "--", "programs"]),
    )
}
