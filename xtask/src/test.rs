//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use anyhow::Result;

use crate::{
    build_ebpf,
    command::{cargo, exec, stage},
    setup,
};

pub fn run() -> Result<()> {
    stage("setup", setup::run)?;
    stage("format", || {
        exec("rustfmt", cargo().args(["fmt", "--all", "--check"]))
    })?;
    stage("clippy (host crates)", || {
        exec(
            "clippy",
            cargo().args([
                "clippy",
                "--workspace",
                "--exclude",
                "tailguard-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )
    })?;
    stage("clippy (eBPF crate)", clippy_ebpf)?;
    stage("build and verify eBPF programs", build_ebpf::run)?;
    stage("unit tests (unprivileged)", || {
        exec(
            "unit tests",
            cargo().args([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "tailguard-ebpf",
                "--exclude",
                "tailguard-tests",
                "--exclude",
                "tailguard-benches",
            ]),
        )
    })?;
    stage("BPF_PROG_TEST_RUN and namespace tests (privileged)", || {
        exec(
            "privileged tests",
            cargo().args(["test", "--no-fail-fast", "--package", "tailguard-tests"]),
        )
    })?;
    eprintln!("all checks passed");
    Ok(())
}

/// The eBPF crate only compiles for the BPF target, with its pinned nightly.
fn clippy_ebpf() -> Result<()> {
    let nightly = xtask::toolchain::ebpf_nightly()?;
    exec(
        "clippy (eBPF)",
        cargo().arg(format!("+{nightly}")).args([
            "clippy",
            "--package",
            "tailguard-ebpf",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--",
            "-D",
            "warnings",
        ]),
    )
}
