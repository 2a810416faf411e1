//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (the wg-quick
//! parser, the settings parser, the `TS_EXTRA_ARGS` parser), each for a
//! bounded time. A target fails on a panic or on a secret of its input in
//! any error or warning (`fuzz/oracle`). Each run starts from the inputs
//! it found before (`fuzz/corpus/TARGET`, not in git), the seeds
//! (`fuzz/seeds/TARGET`) and the inputs that once failed
//! (`fuzz/regressions/TARGET`), so those are run again every time.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::Stdio,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::command::{cargo, cargo_target_dir, exec, stage};

pub const TARGETS: &[&str] = &["wgconf", "settings", "extra_args"];

/// Pinned by `cargo xtask setup`.
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn fuzz_dir() -> PathBuf {
    xtask::toolchain::workspace_root().join("fuzz")
}

/// The oracle's own tests, one build of the targets, then each target (or
/// only `only`) for `seconds`.
pub fn run(seconds: u64, only: Option<&str>) -> Result<()> {
    let targets: Vec<&str> = match only {
        None => TARGETS.to_vec(),
        Some(name) if TARGETS.contains(&name) => vec![name],
        Some(name) => bail!("no fuzz target {name:?}; the targets are {TARGETS:?}"),
    };
    stage("fuzz: the oracle's tests", || {
        exec(
            "oracle tests",
            cargo()
                .arg("test")
                .arg("--manifest-path")
                .arg(fuzz_dir().join("Cargo.toml"))
                .args(["--package", "tailguard-fuzz-oracle"]),
        )
    })?;
    stage("fuzz: build the targets", || {
        exec("cargo fuzz build", &mut cargo_fuzz("build"))
    })?;
    let mut summary = Vec::new();
    for target in targets {
        let runs = stage(&format!("fuzz: {target} for {seconds} s"), || {
            fuzz(target, seconds)
        })?;
        summary.push(format!("{target}: {runs} executions in {seconds} s"));
    }
    eprintln!("fuzzing found nothing: {}", summary.join(", "));
    Ok(())
}

/// `cargo fuzz SUBCOMMAND` with the eBPF nightly (cargo-fuzz needs one),
/// without sanitizers (the parsers are safe Rust: a bug shows as a panic),
/// in the workspace's target directory.
fn cargo_fuzz(subcommand: &str) -> std::process::Command {
    let nightly = xtask::toolchain::ebpf_nightly().unwrap_or_else(|_| "nightly".to_string());
    let mut cmd = cargo();
    cmd.arg(format!("+{nightly}"))
        .args(["fuzz", subcommand, "--sanitizer", "none"])
        .arg("--fuzz-dir")
        .arg(fuzz_dir())
        .arg("--target-dir")
        .arg(cargo_target_dir().join("fuzz"));
    // The settings parser reads these variables too: a run must not depend
    // on the caller's environment.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if ["TS_", "TG_", "WG_"].iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(name.as_ref());
        }
    }
    cmd
}

/// Runs one target; returns how many inputs it ran.
fn fuzz(target: &str, seconds: u64) -> Result<u64> {
    let corpus = fuzz_dir().join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
    let mut cmd = cargo_fuzz("run");
    // The first directory takes what the fuzzer finds; the others are read.
    cmd.arg(target)
        .arg(&corpus)
        .arg(fuzz_dir().join("seeds").join(target))
        .arg(fuzz_dir().join("regressions").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"]);
    eprintln!("  $ cargo fuzz run {target} ... -max_total_time={seconds}");
    let start = Instant::now();
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .context("could not start `cargo fuzz run`")?;
    let mut runs = None;
    let stderr = child.stderr.take().expect("stderr is piped");
    for line in BufReader::new(stderr).lines() {
        let line = line.context("reading libFuzzer's output")?;
        if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
            runs = n.trim().parse().ok();
        }
        eprintln!("{line}");
    }
    let status = child.wait().context("waiting for `cargo fuzz run`")?;
    if !status.success() {
        bail!(
            "fuzz target {target} failed after {:.0} s ({status}): the input is in {}; \
             minimise it with `cargo fuzz tmin {target} FILE` and keep it in {}",
            start.elapsed().as_secs_f64(),
            fuzz_dir().join("artifacts").join(target).display(),
            fuzz_dir().join("regressions").join(target).display(),
        );
    }
    runs.with_context(|| format!("{target}: libFuzzer printed no execution count"))
}
