//! Helpers for TailGuard's privileged tests: the test networks' addresses
//! ([`topology`]), the namespaces that carry them ([`netns`], [`wg`],
//! [`bridge`]), the daemon under test ([`daemon`]), traffic tools
//! ([`traffic`]), TUN devices, packet injection and crafted packets.
//!
//! Every test makes its own uniquely named namespace and removes it on drop,
//! so tests can run in parallel and leave nothing behind even when they fail.
//! A test that lacks something it needs (root, a kernel feature, a tool)
//! panics saying what is missing: it never passes silently.
//!
//! The test files (`tests/tests/`) are named `<tier>_<subject>.rs`, the
//! tier saying how much of TailGuard is under test:
//!
//! - `datapath_`: the eBPF programs alone, run by `BPF_PROG_TEST_RUN` or
//!   attached in namespaces without the daemon;
//! - `attach_`: attaching the programs to devices and detaching them;
//! - `apply_`: one setup step of the daemon (WireGuard, resolver, GRO, the
//!   LocalAPI client) against the kernel or the Tailscale stand-in;
//! - `daemon_`: the whole daemon under test, started as users start it
//!   ([`daemon::DaemonUnderTest::builder`]);
//! - `patterns.rs`: the four usage patterns end to end;
//! - `image_`: the container image on a Docker engine.

pub mod bridge;
pub mod browser;
pub mod crafted;
pub mod daemon;
pub mod differential;
pub mod netns;
pub mod node;
pub mod packets;
pub mod standin;
pub mod topology;
pub mod traffic;
pub mod tun;
pub mod wg;

/// How long a wait may take: `base`, times `TG_TEST_TIME_SCALE` where that
/// is set (the VM tier sets it: its CPUs are emulated, several times slower
/// than this machine's).
pub fn patience(base: std::time::Duration) -> std::time::Duration {
    let scale = std::env::var("TG_TEST_TIME_SCALE")
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or(1)
        .max(1);
    base * scale
}

/// Panics unless running as root: these tests load eBPF programs and create
/// network namespaces.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and creates network namespaces: run it as root \
         (`cargo xtask test` does)"
    );
}

/// Mounts bpffs on /sys/fs/bpf unless it is there (the daemon would, but
/// parallel daemons must not each stack a mount of their own), once per
/// test process.
pub fn ensure_bpffs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let mounted = std::process::Command::new("mountpoint")
            .args(["-q", "/sys/fs/bpf"])
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            netns::run(std::process::Command::new("mount").args([
                "-t",
                "bpf",
                "bpffs",
                "/sys/fs/bpf",
            ]));
        }
    });
}

/// The `tailguard` binary built beside this test (`target/<profile>/`).
/// `cargo xtask test` builds it before the privileged tests run.
pub fn tailguard_bin() -> std::path::PathBuf {
    built_bin("tailguard", "cargo build -p tailguard")
}

/// The Tailscale stand-in (`tests/src/bin/tailscaled-standin.rs`), built
/// with the tests.
pub fn standin_bin() -> std::path::PathBuf {
    built_bin("tailscaled-standin", "cargo build -p tailguard-tests")
}

fn built_bin(name: &str, build: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    // A test runs from target/<profile>/deps/, a binary (the demo) from
    // target/<profile>/: the others sit in target/<profile>/.
    let mut dir = exe.parent().expect("executable in a directory");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>/deps has a parent");
    }
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`{build}`; `cargo xtask test` does)",
        bin.display()
    );
    bin
}
