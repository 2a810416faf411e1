//! `cargo xtask vm-test`: the kernels users run, each booted in a VM with
//! this machine's files (virtme-ng over qemu), where the tests run against
//! the kernel's own WireGuard. This machine's kernel stays the main tier; it
//! has no WireGuard module, so this tier is where production's WireGuard
//! path and older verifiers are tested.
//!
//! In each VM: every program through the verifier for both link layers
//! (`tailguard programs`), then usage patterns (`patterns`, both
//! datapaths: traffic both ways, the translations the receivers see, the
//! refusals) and the daemon's stop (`daemon_lifecycle`: after SIGKILL the
//! next start takes over and its SIGTERM leaves the namespace as it was),
//! with kernel WireGuard on the daemon's device and on the peers (the
//! stand-in's TUN stays wireguard-go's, as tailscaled's is a TUN).
//! Attaching uses what the kernel has: clsact on 6.1, TCX on 6.12. Under
//! emulation a pattern takes about 2.5 minutes, so 6.1 (the oldest
//! verifier, no TCX, the most common VPS kernel) runs all four and 6.12 the
//! two that translate both ways (the bridge, and WireGuard as exit node with
//! `TS_DEST_IP`).

use std::{
    fs,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    command::{cargo, exec, probe, stage},
    setup,
};

/// A kernel series of the tier: the newest Debian package of it is used.
pub struct Kernel {
    /// As `--kernel` names it.
    pub name: &'static str,
    /// What it is to users.
    pub what: &'static str,
    /// The package names of the series (`apt-cache search --names-only`).
    pattern: &'static str,
    /// The test files run in its VM, each with the tests' names (filters
    /// as `cargo test` takes them; none: all of the file).
    tests: &'static [(&'static str, &'static [&'static str])],
}

/// The generic `amd64` flavours: the `cloud-amd64` 6.1 that Debian's VPS
/// images boot has the same verifier but no 9p, which virtme-ng needs for
/// this machine's files.
pub const KERNELS: [Kernel; 2] = [
    Kernel {
        name: "6.1",
        what: "Debian 12 (bookworm)",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        tests: &[("patterns", &[]), ("daemon_lifecycle", &[STOP_TEST])],
    },
    Kernel {
        name: "6.12",
        what: "Debian 13 (trixie), and bookworm-backports",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        tests: &[
            ("patterns", &["simple_bridge", "wireguard_as_exit_node"]),
            ("daemon_lifecycle", &[STOP_TEST]),
            // The kernel's device deleted and made again over netlink.
            (
                "heal_wireguard",
                &["a_deleted_wireguard_device_is_brought_back"],
            ),
        ],
    },
];

/// Unpacked kernels, one directory per version. Under /opt: the guest sees
/// this machine's /var and /tmp as its own (an overlay), not /opt.
const CACHE: &str = "/opt/tailguard-kernels";

/// virtme-ng, from PyPI (Debian 12 has none), at the version tested here.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// SIGKILL, a start that takes over, and a SIGTERM that leaves the
/// namespace as it was.
const STOP_TEST: &str = "restart_after_sigkill_takes_over_and_then_cleans_up";

/// How much slower the tests' waits may be under emulation (TCG: several
/// times slower than the host; the verifier alone takes 20 s for a program).
const EMULATED_TIME_SCALE: u32 = 6;

/// A VM that runs longer than this is stopped (and the tier fails).
const VM_LIMIT: Duration = Duration::from_secs(30 * 60);

/// A kernel unpacked into the cache.
pub struct Unpacked {
    /// `uname -r` in the guest.
    pub version: String,
    pub dir: PathBuf,
}

impl Unpacked {
    fn image(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.version))
    }
}

/// `cargo xtask setup`'s part: virtme-ng and every kernel of the tier.
pub fn setup() -> Result<()> {
    setup::pip_tool(VIRTME_NG, "vng")?;
    for kernel in &KERNELS {
        let unpacked = fetch(kernel)?;
        eprintln!(
            "  Linux {} ({}): {}",
            kernel.name,
            unpacked.version,
            unpacked.dir.display()
        );
    }
    Ok(())
}

/// The newest package of `kernel`'s series, unpacked into the cache (once:
/// a second call finds it there).
pub fn fetch(kernel: &Kernel) -> Result<Unpacked> {
    let package = newest_package(kernel)?;
    let version = package
        .strip_prefix("linux-image-")
        .expect("the pattern starts with linux-image-")
        .to_string();
    let dir = Path::new(CACHE).join(&version);
    let unpacked = Unpacked { version, dir };
    let complete = unpacked.dir.join(".complete");
    if complete.exists() {
        return Ok(unpacked);
    }
    let download = Path::new(CACHE).join(format!(".download-{}", unpacked.version));
    let partial = Path::new(CACHE).join(format!(".partial-{}", unpacked.version));
    for dir in [&download, &partial, &unpacked.dir] {
        if dir.exists() {
            fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    fs::create_dir_all(&download).with_context(|| format!("creating {}", download.display()))?;
    // apt fetches as its own user where it can write.
    fs::set_permissions(&download, fs::Permissions::from_mode(0o777))?;
    exec(
        "apt-get download",
        Command::new("apt-get")
            .current_dir(&download)
            .args(["download", "-q", &package]),
    )?;
    let deb = fs::read_dir(&download)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    exec(
        "dpkg -x",
        Command::new("dpkg").arg("-x").arg(&deb).arg(&partial),
    )?;
    // virtme-ng links the guest's /lib/modules/VERSION to the modules
    // beside the image: they need their index.
    exec(
        "depmod",
        Command::new("depmod")
            .arg("-b")
            .arg(&partial)
            .arg(&unpacked.version),
    )?;
    fs::rename(&partial, &unpacked.dir)?;
    fs::remove_dir_all(&download)?;
    fs::write(&complete, &package)?;
    Ok(unpacked)
}

/// The highest-numbered package name of the series the machine's package
/// lists offer.
fn newest_package(kernel: &Kernel) -> Result<String> {
    let search = || {
        probe(Command::new("apt-cache").args(["search", "--names-only", kernel.pattern]))
            .unwrap_or_default()
    };
    let mut found = search();
    if found.trim().is_empty() {
        exec(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        found = search();
    }
    found
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .max_by_key(|name| numbers(name))
        .with_context(|| {
            format!(
                "no package matches {} in the package lists (Linux {}: {})",
                kernel.pattern, kernel.name, kernel.what
            )
        })
}

/// The numbers in `name`, in order: "6.1.0-50" sorts after "6.1.0-47".
fn numbers(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// How the VMs run: KVM when a guest boots with it, emulation otherwise.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accel {
    Kvm,
    Emulated,
}

/// `cargo xtask vm-test`: the tier, on every kernel or the one named.
pub fn run(only: Option<&str>) -> Result<()> {
    let kernels: Vec<&Kernel> = KERNELS
        .iter()
        .filter(|k| only.is_none_or(|name| name == k.name))
        .collect();
    if kernels.is_empty() {
        let names: Vec<&str> = KERNELS.iter().map(|k| k.name).collect();
        bail!("no kernel {only:?} in the VM tier: {}", names.join(", "));
    }
    // The guest sees this machine's files, but has a /tmp, /var and /run of
    // its own: a workspace there is not the guest's.
    for dir in [
        xtask::toolchain::workspace_root(),
        crate::command::cargo_target_dir(),
    ] {
        if ["/tmp", "/var", "/run"]
            .iter()
            .any(|hidden| dir.starts_with(hidden))
        {
            bail!(
                "{} is under /tmp, /var or /run, which the VM's guest has of its own: \
                 clone the repository (and put CARGO_TARGET_DIR) elsewhere to run the VM tier",
                dir.display()
            );
        }
    }
    let unpacked = stage("VM tier: kernels", || {
        kernels.iter().map(|k| fetch(k)).collect::<Result<Vec<_>>>()
    })?;
    let mut files: Vec<&str> = kernels
        .iter()
        .flat_map(|k| k.tests.iter().map(|t| t.0))
        .collect();
    files.sort_unstable();
    files.dedup();
    let executables = stage("VM tier: build", || build(&files))?;
    let accel = stage("VM tier: KVM or emulation", || accel(&unpacked[0]))?;
    for (kernel, unpacked) in kernels.iter().zip(&unpacked) {
        stage(
            &format!(
                "VM tier: Linux {} ({}), {:?}",
                kernel.name, unpacked.version, accel
            ),
            || boot(kernel, unpacked, accel, &executables),
        )?;
    }
    Ok(())
}

/// The daemon, the stand-in and the test files' executables (run in the
/// guest as they are: it sees this machine's files).
fn build(files: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    crate::command::build_daemon_and_tools(&[])?;
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--package",
        "tailguard-tests",
        "--no-run",
        "--message-format=json",
    ]);
    for file in files {
        cmd.args(["--test", file]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the VM tier's tests failed ({})", out.status);
    }
    let mut executables = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default();
        if let (Some(path), true) = (message["executable"].as_str(), files.contains(&name)) {
            executables.push((name.to_string(), PathBuf::from(path)));
        }
    }
    if executables.len() != files.len() {
        bail!(
            "cargo built {} of the VM tier's {} test files",
            executables.len(),
            files.len()
        );
    }
    Ok(executables)
}

/// KVM if a guest boots with it within a few seconds (on this machine's
/// kind it hangs after the BIOS), else emulation.
fn accel(kernel: &Unpacked) -> Result<Accel> {
    // Its output goes to a file of its own: qemu reopens its standard
    // output from the start, which wiped a log it was redirected to.
    let dir = crate::command::cargo_target_dir().join("vm");
    fs::create_dir_all(&dir)?;
    let log_path = dir.join("kvm-probe.log");
    let log = fs::File::create(&log_path)?;
    // The guest says it ran: vng's exit status does not.
    const BOOTED: &str = "tailguard-vm-booted";
    let mut probe = vng(kernel, Accel::Kvm, &[]);
    probe
        .args(["--", &format!("echo {BOOTED}")])
        .stdout(log.try_clone()?)
        .stderr(log);
    let ended = run_bounded(&mut probe, Duration::from_secs(30))?;
    let said = fs::read_to_string(&log_path).unwrap_or_default();
    if ended && said.lines().any(|l| l.trim() == BOOTED) {
        eprintln!("  KVM works: the VMs run at the host's speed");
        return Ok(Accel::Kvm);
    }
    let last = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    eprintln!(
        "  KVM does not boot a guest here ({last}): the VMs are emulated (TCG), \
         for function, not speed"
    );
    Ok(Accel::Emulated)
}

/// `vng --run KERNEL` with this machine's files (read-only but for `rw`).
fn vng(kernel: &Unpacked, accel: Accel, rw: &[&Path]) -> Command {
    let mut cmd = Command::new(setup::pip_script("vng"));
    cmd.arg("--run").arg(kernel.image()).args([
        "--force-9p",
        "--memory",
        "2G",
        "--cpus",
        "2",
        "--verbose",
    ]);
    if accel == Accel::Emulated {
        cmd.arg("--disable-kvm");
    }
    for dir in rw {
        cmd.arg("--rwdir").arg(dir);
    }
    cmd
}

/// Runs `cmd` in a process group of its own, stopping the whole group
/// (qemu with it) after `limit`; whether it ended in time. (Its exit status
/// says nothing: vng exits with 255 after a guest that powered off well.)
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<bool> {
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .spawn()
        .context("starting vng (`cargo xtask setup` installs virtme-ng)")?;
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(true);
        }
        if started.elapsed() > limit {
            let group = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One VM: the steps of the guest script, each with its log and exit code
/// in `target/vm/VERSION/`.
fn boot(
    series: &Kernel,
    kernel: &Unpacked,
    accel: Accel,
    executables: &[(String, PathBuf)],
) -> Result<()> {
    let root = xtask::toolchain::workspace_root();
    let out = crate::command::cargo_target_dir()
        .join("vm")
        .join(&kernel.version);
    if out.exists() {
        fs::remove_dir_all(&out)?;
    }
    fs::create_dir_all(&out)?;
    let scale = match accel {
        Accel::Kvm => 1,
        Accel::Emulated => EMULATED_TIME_SCALE,
    };
    let script = out.join("guest.sh");
    let tests: Vec<(&Path, &[&str], &str)> = series
        .tests
        .iter()
        .map(|(file, filters)| {
            let executable = executables
                .iter()
                .find(|(name, _)| name == file)
                .map(|(_, path)| path.as_path())
                .expect("built above");
            (executable, *filters, *file)
        })
        .collect();
    fs::write(&script, guest_script(&root, &out, scale, &tests))?;
    let started = Instant::now();
    let mut cmd = vng(kernel, accel, &[&out]);
    cmd.arg("--").arg(format!("sh {}", script.display()));
    let console = fs::File::create(out.join("console.log"))?;
    cmd.stdout(console.try_clone()?).stderr(console);
    eprintln!(
        "  booting Linux {}; the guest's steps log to {}",
        kernel.version,
        out.display()
    );
    let finished = run_bounded(&mut cmd, VM_LIMIT)?;
    let results = fs::read_to_string(out.join("results")).unwrap_or_default();
    let mut failed = Vec::new();
    for line in results.lines() {
        let (step, code) = line.split_once(' ').unwrap_or((line, "?"));
        eprintln!(
            "  {step}: {}",
            if code == "0" { "passed" } else { "FAILED" }
        );
        if code != "0" {
            failed.push(step.to_string());
        }
    }
    let uname = fs::read_to_string(out.join("uname")).unwrap_or_default();
    if uname.trim() != kernel.version {
        bail!(
            "the guest did not run Linux {} (uname -r: {:?}); see {}",
            kernel.version,
            uname.trim(),
            out.join("console.log").display()
        );
    }
    let steps = 1 + 1 + series.tests.len();
    if !failed.is_empty() || results.lines().count() != steps || !finished {
        let logs: Vec<String> = failed
            .iter()
            .map(|step| tail(&out.join(format!("{step}.log")), 60))
            .collect();
        bail!(
            "Linux {}: {} of {steps} steps passed{}; logs in {}\n{}",
            kernel.version,
            results.lines().count() - failed.len(),
            if finished {
                ""
            } else {
                " (the VM did not finish in time)"
            },
            out.display(),
            logs.join("\n")
        );
    }
    eprintln!(
        "  Linux {}: all {steps} steps passed in {:.0} s",
        kernel.version,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The guest's steps: the modules the tests need, then each step with its
/// log and exit code written to `out`.
fn guest_script(root: &Path, out: &Path, scale: u32, tests: &[(&Path, &[&str], &str)]) -> String {
    let out = out.display();
    let mut script = format!(
        "# Written by `cargo xtask vm-test`; runs in the guest.\n\
         uname -r > {out}/uname\n\
         step() {{ name=$1; shift; \"$@\" > {out}/$name.log 2>&1; echo \"$name $?\" >> {out}/results; }}\n\
         # No udev in the guest: the TUN device's node is made by hand.\n\
         modules() {{ modprobe wireguard && modprobe tun && \
         {{ [ -e /dev/net/tun ] || {{ mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }}; }} \
         && test -d /sys/module/wireguard; }}\n\
         step modules modules\n\
         step programs {daemon} programs\n\
         cd {root}/tests\n\
         export TG_TEST_WIREGUARD=kernel TG_TEST_TIME_SCALE={scale}\n",
        root = root.display(),
        daemon = crate::command::cargo_target_dir()
            .join("debug")
            .join("tailguard")
            .display(),
    );
    for (executable, filters, name) in tests {
        // Several names: `--exact` each, so that one does not also pick
        // another test whose name contains it.
        let filters = if filters.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", filters.join(" "))
        };
        script.push_str(&format!(
            "step {name} {} --test-threads=1{filters}\n",
            executable.display()
        ));
    }
    script
}

/// The last `lines` lines of a log, for the error.
fn tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!(
        "--- {} (last {lines} lines)\n{}",
        log.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_package_has_the_highest_numbers() {
        let mut names = [
            "linux-image-6.1.0-9-amd64",
            "linux-image-6.1.0-50-amd64",
            "linux-image-6.1.0-47-amd64",
        ];
        names.sort_by_key(|n| numbers(n));
        assert_eq!(names[2], "linux-image-6.1.0-50-amd64");
    }
}
