//! The kernel's switches as TailGuard finds and leaves them:
//! - IP forwarding, per family, is the user's: read once at the start (a
//!   container gets it from `--sysctl`), never written. A family whose
//!   switch is off is not forwarded between the networks, by the kernel or
//!   by the fast path, so the host still serves both networks itself (the
//!   simple-server pattern) without joining them;
//! - the fast path's translation ports reserved (`ip_local_reserved_ports`)
//!   while the daemon runs, whichever datapath it uses, back to what they
//!   were afterwards, so the host never
//!   binds one of them itself, even with a widened ephemeral range: a port
//!   the fast path hands out is never also the host's own on the same
//!   address;
//! - `src_valid_mark` on for wg-quick's IPv4 policy routing (replies to
//!   marked packets then pass the reverse-path check), back afterwards.
//!
//! Whether `src_valid_mark` is written is the plan's ([`SwitchesPlan`]).

use std::{fmt, fs, io};

use tailguard_common::nat::NAT_PORT_FIRST;
use tracing::{info, warn};

use crate::config::plan::SwitchesPlan;

/// Covers IPv6 too.
const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
/// The host's ephemeral ports (covers IPv6 too).
const EPHEMERAL_PORTS: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// wg-quick's switch for IPv4 policy routing.
const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

/// Whether the kernel forwards each family, as its switches said at the
/// start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarding {
    pub ipv4: bool,
    pub ipv6: bool,
}

/// One family's forwarding switch: its name in the log and its sysctl.
struct Switch {
    family: &'static str,
    key: &'static str,
}

const IPV4: Switch = Switch {
    family: "IPv4",
    key: "net.ipv4.ip_forward",
};
const IPV6: Switch = Switch {
    family: "IPv6",
    key: "net.ipv6.conf.all.forwarding",
};

impl Switch {
    fn path(&self) -> String {
        format!("/proc/sys/{}", self.key.replace('.', "/"))
    }

    fn read(&self) -> io::Result<bool> {
        is_on(&self.path())
    }

    /// What the switch means for the user, said at the start and by `check`.
    fn describe(&self, on: bool) -> String {
        let Self { family, key } = self;
        if on {
            format!(
                "{family} forwarding is on ({key}=1): traffic between the networks is forwarded \
                 as the policy allows"
            )
        } else {
            format!(
                "{family} forwarding is off: nothing is forwarded between the networks; start \
                 with --sysctl {key}=1 to bridge"
            )
        }
    }
}

impl Forwarding {
    /// The switches as they are now.
    pub fn read() -> io::Result<Self> {
        Ok(Self {
            ipv4: IPV4.read()?,
            ipv6: IPV6.read()?,
        })
    }

    /// Logs what each switch means: off is what a user who wants a bridge
    /// must change, so it is a warning.
    pub fn log(&self) {
        for (switch, on) in self.switches() {
            if on {
                info!("{}", switch.describe(on));
            } else {
                warn!("{}", switch.describe(on));
            }
        }
    }

    fn switches(&self) -> [(Switch, bool); 2] {
        [(IPV4, self.ipv4), (IPV6, self.ipv6)]
    }
}

/// One line per family, as [`Forwarding::log`] says them.
impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (switch, on) in self.switches() {
            writeln!(f, "{}", switch.describe(on))?;
        }
        Ok(())
    }
}

/// The switches as they were, each that the start changed.
#[derive(Default)]
pub struct Sysctls {
    reserved_ports_before: Option<String>,
    src_valid_mark_before: Option<String>,
}

impl Sysctls {
    /// Sets the switches: the reserved ports, and what `plan` asks for.
    /// Calling it again, or with the switches already set, changes nothing.
    pub fn apply(plan: &SwitchesPlan) -> io::Result<Self> {
        Ok(Self {
            reserved_ports_before: reserve_translation_ports()?,
            src_valid_mark_before: plan.src_valid_mark.then(enable_src_valid_mark).flatten(),
        })
    }

    /// Puts back what [`Sysctls::apply`] changed.
    pub fn restore(self) -> io::Result<()> {
        // Each is put back even when the other cannot be.
        let mark = (self.src_valid_mark_before).map_or(Ok(()), |v| write(SRC_VALID_MARK, &v));
        let ports = (self.reserved_ports_before).map_or(Ok(()), |v| write(RESERVED_PORTS, &v));
        mark.and(ports)
    }
}

/// Adds the fast path's range to the reserved ports; returns the list as
/// it was when it changed it.
fn reserve_translation_ports() -> io::Result<Option<String>> {
    let before = read(RESERVED_PORTS)?;
    let after = with_nat_ports(&before);
    if after == before {
        return Ok(None);
    }
    if let Err(e) = write(RESERVED_PORTS, &after) {
        // A container's `/proc/sys` is read-only unless the engine sets
        // the switch. The reservation only matters when the host's own
        // ephemeral ports could fall in the fast path's range: if they
        // cannot, start without it rather than refuse to.
        if overlaps_nat_ports(&read(EPHEMERAL_PORTS)?) {
            return Err(e);
        }
        warn!(
            "{e}; starting without it: the host's ephemeral ports ({EPHEMERAL_PORTS}) lie \
                 below the fast path's translation ports, only a service bound to one of them \
                 explicitly would clash"
        );
        return Ok(None);
    }
    info!(switch = RESERVED_PORTS, value = after, "kernel switch set");
    Ok(Some(before))
}

/// Turns `src_valid_mark` on; returns what it was when it changed it. In
/// a container it is usually set by `--sysctl` and read-only: then a
/// warning, not a failed start (only replies over the default route
/// suffer), as wg-quick's own attempt would.
fn enable_src_valid_mark() -> Option<String> {
    let before = read(SRC_VALID_MARK).ok();
    if before.as_deref() == Some("1") {
        return None;
    }
    if let Err(e) = write(SRC_VALID_MARK, "1") {
        warn!("{e}: replies over the default route may be dropped");
        return None;
    }
    info!(switch = SRC_VALID_MARK, value = "1", "kernel switch set");
    before
}

/// Whether the switch at `path` is on; a kernel without the family (IPv6
/// disabled at boot has no `/proc/sys/net/ipv6`) forwards none of it.
fn is_on(path: &str) -> io::Result<bool> {
    let value = match read(path) {
        Ok(value) => value,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    value.parse::<i64>().map(|v| v != 0).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{path}: {value:?} is not a number"),
        )
    })
}

/// Whether the ephemeral range `range` ("first last") reaches into the fast
/// path's translation ports; one that cannot be read counts as reaching.
fn overlaps_nat_ports(range: &str) -> bool {
    let last = range.split_whitespace().nth(1).map(str::parse::<u16>);
    !matches!(last, Some(Ok(last)) if last < NAT_PORT_FIRST)
}

/// The reserved port list with the fast path's range added (once).
fn with_nat_ports(before: &str) -> String {
    let range = format!("{NAT_PORT_FIRST}-65535");
    if before.split(',').any(|r| r == range) {
        before.to_string()
    } else if before.is_empty() {
        range
    } else {
        format!("{before},{range}")
    }
}

fn read(path: &str) -> io::Result<String> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| io::Error::new(e.kind(), format!("reading {path}: {e}")))
}

fn write(path: &str, value: &str) -> io::Result<()> {
    // With a newline: an empty write would change nothing (an empty list
    // is written as just the newline).
    fs::write(path, format!("{value}\n")).map_err(|e| {
        // A container's /proc/sys is read-only: the engine sets them.
        let key = path.trim_start_matches("/proc/sys/").replace('/', ".");
        io::Error::new(
            e.kind(),
            format!("writing {path}: {e} (in a container, start it with --sysctl {key}={value})"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ephemeral_range_below_the_nat_ports_is_clear_of_them() {
        assert!(!overlaps_nat_ports("32768\t60999"));
        assert!(overlaps_nat_ports("32768 61000"));
        assert!(overlaps_nat_ports("1024 65535"));
        assert!(overlaps_nat_ports("garbage"));
        assert!(overlaps_nat_ports(""));
    }

    #[test]
    fn the_nat_range_is_added_once_to_what_is_reserved() {
        assert_eq!(with_nat_ports(""), "61000-65535");
        assert_eq!(with_nat_ports("8080"), "8080,61000-65535");
        assert_eq!(with_nat_ports("8080,61000-65535"), "8080,61000-65535");
    }

    #[test]
    fn a_switch_is_on_unless_zero_and_off_where_the_family_is_missing() {
        let dir = std::env::temp_dir().join(format!("tg-switch-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let file = dir.join("forwarding");
        let path = file.to_str().unwrap();
        for (value, on) in [("0\n", false), ("1\n", true), ("2", true)] {
            fs::write(&file, value).unwrap();
            assert_eq!(is_on(path).unwrap(), on, "{value:?}");
        }
        fs::write(&file, "yes\n").unwrap();
        let e = is_on(path).unwrap_err().to_string();
        assert_eq!(e, format!("{path}: \"yes\" is not a number"));
        fs::remove_file(&file).unwrap();
        assert!(!is_on(path).unwrap(), "no such family: nothing forwarded");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn each_family_says_whether_it_is_forwarded_and_how_to_change_it() {
        let lines = |ipv4, ipv6| Forwarding { ipv4, ipv6 }.to_string();
        assert_eq!(
            lines(false, true),
            "IPv4 forwarding is off: nothing is forwarded between the networks; start with \
             --sysctl net.ipv4.ip_forward=1 to bridge\n\
             IPv6 forwarding is on (net.ipv6.conf.all.forwarding=1): traffic between the \
             networks is forwarded as the policy allows\n"
        );
        assert_eq!(
            lines(true, false),
            "IPv4 forwarding is on (net.ipv4.ip_forward=1): traffic between the networks is \
             forwarded as the policy allows\n\
             IPv6 forwarding is off: nothing is forwarded between the networks; start with \
             --sysctl net.ipv6.conf.all.forwarding=1 to bridge\n"
        );
    }
}
