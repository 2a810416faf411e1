//! Fault injection, a TEST AID: named points in the daemon's start where a
//! test can make it panic, to check that a panic after the first change to
//! the kernel still takes down everything set up so far
//! (`tests/tests/daemon_start_stop.rs`).
//!
//! `TG_FAULT_PANIC=<point>[,<point>...]` in the daemon's environment makes
//! [`point`] panic at each point named. Unset (as it always is outside the
//! tests), a point does nothing but read the variable. The points:
//! - `after-table`: the nftables table is in place, nothing else;
//! - `in-wireguard`: the WireGuard device is up with its routes and rules,
//!   PostUp has not run;
//! - `after-wireguard`: the WireGuard side is up;
//! - `after-resolver`: the resolver file is written;
//! - `serving`: everything is up and tailscaled's supervisor started;
//! - `spawning-tailscaled`: in the supervisor's task, about to start
//!   tailscaled (a panic in a task of its own, not in the start's).

/// The variable naming the points that panic.
pub const VARIABLE: &str = "TG_FAULT_PANIC";

/// Panics if [`VARIABLE`] names `name`.
pub fn point(name: &str) {
    if named(std::env::var_os(VARIABLE).as_deref(), name) {
        panic!("{VARIABLE}={name}: injected panic at fault point {name}");
    }
}

fn named(variable: Option<&std::ffi::OsStr>, name: &str) -> bool {
    variable
        .and_then(|v| v.to_str())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == name))
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::named;

    #[test]
    fn a_point_panics_only_when_named() {
        assert!(!named(None, "after-table"));
        assert!(!named(Some(OsStr::new("")), "after-table"));
        assert!(!named(Some(OsStr::new("after-tables")), "after-table"));
        assert!(named(Some(OsStr::new("after-table")), "after-table"));
        assert!(named(
            Some(OsStr::new("serving, after-table")),
            "after-table"
        ));
    }
}
