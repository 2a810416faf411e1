//! `cargo xtask test`: everything CI checks, in the order that fails fastest.

use anyhow::Result;

use std::{path::PathBuf, process::Command};

use crate::{
    build_ebpf,
    command::{cargo, exec, stage},
    fuzz, image, setup,
};

fn root() -> PathBuf {
    xtask::toolchain::workspace_root()
}

/// The root compose file and each example's, as docker-compose reads them.
fn compose_files() -> Result<()> {
    let mut files = vec![root().join("docker-compose.yml")];
    for entry in std::fs::read_dir(root().join("examples"))?.flatten() {
        let file = entry.path().join("docker-compose.yml");
        if file.exists() {
            files.push(file);
        }
    }
    for file in files {
        exec(
            "docker-compose config",
            Command::new("docker-compose")
                .arg("--file")
                .arg(&file)
                .args(["config", "--quiet"]),
        )?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SECONDS_IN_TEST: u64 = 20;

pub fn run() -> Result<()> {
    stage("setup", setup::run)?;
    stage("format", || {
        exec("rustfmt", cargo().args(["fmt", "--all", "--check"]))?;
        exec(
            "rustfmt (fuzz workspace)",
            cargo().args([
                "fmt",
                "--manifest-path",
                "fuzz/Cargo.toml",
                "--all",
                "--check",
            ]),
        )
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
    stage("Dockerfile lint (hadolint)", || {
        exec(
            "hadolint",
            Command::new(setup::hadolint_path()).arg(root().join("Dockerfile")),
        )
    })?;
    stage("compose files", compose_files)?;
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
    // Every input that once failed runs first; a short run after it keeps
    // the stage (the instrumented build is most of it) within CI's budget.
    stage("fuzz targets (short runs)", || {
        fuzz::run(FUZZ_SECONDS_IN_TEST, None)
    })?;
    // The container smoke test (among the privileged tests) needs an
    // engine and the image; an engine started here stops at the end.
    let engine = stage("Docker engine", image::Engine::ensure)?;
    image::build(&engine)?;
    stage("BPF_PROG_TEST_RUN and namespace tests (privileged)", || {
        exec(
            "privileged tests",
            cargo().env("DOCKER_HOST", &engine.host).args([
                "test",
                "--no-fail-fast",
                "--package",
                "tailguard-tests",
            ]),
        )
    })?;
    drop(engine);
    stage("VM tier: other kernels, kernel WireGuard", || {
        crate::vm::run(None)
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
            // The benchmarks' floor program is a binary of its own.
            "--features",
            "bench-floor",
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
