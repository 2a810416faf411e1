//! Uniquely named network namespaces that remove themselves.

use std::{
    fs::File,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use nix::sched::{CloneFlags, setns};

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `tg-<purpose>-<pid>-<n>`: unique across parallel tests and
    /// concurrent test processes.
    pub fn new(purpose: &str) -> Self {
        let name = Self::unique_name(purpose);
        run(Command::new("ip").args(["netns", "add", &name]));
        Self { name }
    }

    /// Names the network namespace of process `pid` (a container's) as
    /// `tg-<purpose>-<pid>-<n>`, so that it can be used like one made
    /// here. Dropping it ends the processes inside and drops the name.
    pub fn adopt(purpose: &str, pid: u32) -> Self {
        let name = Self::unique_name(purpose);
        run(Command::new("ip").args(["netns", "attach", &name, &pid.to_string()]));
        Self { name }
    }

    fn unique_name(purpose: &str) -> String {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        static ORPHANS_REMOVED: std::sync::Once = std::sync::Once::new();
        ORPHANS_REMOVED.call_once(remove_orphans);
        format!(
            "tg-{purpose}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A namespace for TailGuard as the documented container gets it:
    /// both forwarding switches on (`--sysctl net.ipv4.ip_forward=1
    /// --sysctl net.ipv6.conf.all.forwarding=1`), which the daemon only
    /// reads. [`NetNs::set_forwarding`] turns them off again.
    pub fn for_daemon(purpose: &str) -> Self {
        let ns = Self::new(purpose);
        ns.set_forwarding(true, true);
        ns
    }

    /// Sets the namespace's forwarding switches, per family, as a
    /// container's `--sysctl` would: before the daemon starts, which reads
    /// them once.
    pub fn set_forwarding(&self, ipv4: bool, ipv6: bool) {
        let value = |on| if on { "1" } else { "0" };
        self.run(|| {
            sysctl("net.ipv4.ip_forward", value(ipv4));
            sysctl("net.ipv6.conf.all.forwarding", value(ipv6));
        });
    }

    /// The namespace's forwarding switches as they are: their values, as
    /// the kernel prints them.
    pub fn forwarding(&self) -> (String, String) {
        self.run(|| {
            let read =
                |path| std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
            (
                read("/proc/sys/net/ipv4/ip_forward"),
                read("/proc/sys/net/ipv6/conf/all/forwarding"),
            )
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names of the namespace's devices (`lo` among them); none if it
    /// cannot be read.
    pub fn devices(&self) -> Vec<String> {
        Command::new("ip")
            .args(["-n", &self.name, "-br", "link"])
            .output()
            .map(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .map(|name| name.split('@').next().unwrap_or(name).to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The namespace's device whose name starts with `prefix`.
    pub fn device_starting_with(&self, prefix: &str) -> String {
        self.devices()
            .into_iter()
            .find(|d| d.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* device in {}", self.name))
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and
    /// returns its result (re-raising its panic). Only that thread moves:
    /// the test's other threads stay where they were. Processes it starts
    /// inherit the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                    setns(&ns, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("entering network namespace {path}: {e}"));
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The namespace's devices, for their userspace WireGuard sockets.
        let devices = self.devices();
        remove_namespace(&self.name);
        // A killed wireguard-go cannot remove its socket, and /run/wireguard
        // is shared by all namespaces: remove it here, so that even a test
        // that failed half way leaves nothing behind.
        for device in devices {
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{device}.sock"));
        }
    }
}

/// Ends the processes left in namespace `name`, then deletes it.
fn remove_namespace(name: &str) {
    // A process left inside keeps the namespace (and its devices) alive
    // after `ip netns del`: end them first.
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill")
                .args(["-9", pid])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// Removes the namespaces of test processes that are gone: a test process
/// killed (by a timeout, or by hand while a test hung) runs no destructor,
/// and its namespaces would stay, with their devices and processes, until
/// the machine reboots. A namespace's name carries its maker's pid (see
/// [`NetNs::new`]); one whose maker still runs is left alone.
fn remove_orphans() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        // Its devices' WireGuard sockets stay: a live test's device may
        // have the same name, and a stale socket is replaced by the next
        // wireguard-go of that name.
        if maker_pid(name)
            .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        {
            remove_namespace(name);
        }
    }
}

/// The pid in `tg-<purpose>-<pid>-<n>`, if `name` is a test's namespace.
fn maker_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("tg-")?;
    let mut from_end = rest.rsplit('-');
    from_end.next()?.parse::<u32>().ok()?;
    let pid = from_end.next()?.parse().ok()?;
    from_end.next()?;
    Some(pid)
}

/// A veth pair between two namespaces, each end up with its address.
/// Returns the two interface names.
pub fn veth(a: &NetNs, a_addr: &str, b: &NetNs, b_addr: &str) -> (String, String) {
    let (a_if, b_if) = (unique_ifname("va"), unique_ifname("vb"));
    run(Command::new("ip").args([
        "link",
        "add",
        &a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        &b_if,
        "netns",
        b.name(),
    ]));
    for (ns, ifname, addr) in [(a, &a_if, a_addr), (b, &b_if, b_addr)] {
        // No IPv6 link-local address: it would appear (after DAD) while a
        // test compares snapshots of the namespace, and the underlay is IPv4.
        run(Command::new("ip").args([
            "-n",
            ns.name(),
            "link",
            "set",
            "dev",
            ifname,
            "addrgenmode",
            "none",
        ]));
        run(Command::new("ip").args(["-n", ns.name(), "addr", "add", addr, "dev", ifname]));
        run(Command::new("ip").args(["-n", ns.name(), "link", "set", ifname, "up"]));
        run(Command::new("ip").args(["-n", ns.name(), "link", "set", "lo", "up"]));
    }
    (a_if, b_if)
}

/// An interface name unique to this test process (at most 15 characters).
/// WireGuard userspace sockets live in /run/wireguard, which all namespaces
/// share: two devices of the same name in parallel tests would collide.
pub fn unique_ifname(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    assert!(name.len() <= 15, "{name} is too long for an interface name");
    name
}

/// The routing state of the current thread's namespace, as iproute2 prints
/// it: links, addresses, routes of every table, and rules.
pub fn routing_state() -> String {
    let mut state = String::new();
    for args in [
        &["-br", "link"][..],
        &["-br", "addr"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["rule"],
        &["-6", "rule"],
    ] {
        state.push_str(&run(Command::new("ip").args(args)));
    }
    state
}

/// Runs a command that must succeed, panicking with its output otherwise.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot start {cmd:?} (is it installed? `cargo xtask setup`): {e}")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes a sysctl of the current thread's network namespace.
pub fn sysctl(key: &str, value: &str) {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("setting {key}={value}: {e}"));
}

/// Sets the MTU of `device` in the current namespace.
pub fn set_mtu(device: &str, mtu: u32) {
    run(Command::new("ip").args(["link", "set", "dev", device, "mtu", &mtu.to_string()]));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_maker_pid_is_read_from_a_test_namespace_name_only() {
        assert_eq!(maker_pid("tg-life-table-4242-7"), Some(4242));
        assert_eq!(maker_pid("tg-x-1-0"), Some(1));
        for other in [
            "tg-4242-7",
            "life-4242-7",
            "tg-x-4242",
            "tg-x-y-7",
            "tg-x-4242-z",
        ] {
            assert_eq!(maker_pid(other), None, "{other}");
        }
    }

    /// The namespace of a test process that is gone is removed; one of a
    /// process that runs stays.
    #[test]
    fn an_orphaned_namespace_is_removed_and_a_live_ones_stays() {
        crate::require_root();
        let mut gone = Command::new("true").spawn().unwrap();
        let gone_pid = gone.id();
        gone.wait().unwrap();
        let orphan = format!("tg-orphan-{gone_pid}-0");
        let live = format!("tg-orphan-{}-{}", std::process::id(), u32::MAX);
        for name in [&orphan, &live] {
            run(Command::new("ip").args(["netns", "add", name]));
        }
        remove_orphans();
        let listed = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        let names: Vec<&str> = listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        remove_namespace(&live);
        assert!(!names.contains(&orphan.as_str()), "{listed}");
        assert!(names.contains(&live.as_str()), "{listed}");
    }
}
