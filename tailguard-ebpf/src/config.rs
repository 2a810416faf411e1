//! The maps the daemon fills: the configuration entry and the route tries
//! that say which device a destination leaves through. The programs decide
//! the egress from these, never from a per-packet kernel route lookup: that
//! lookup is what makes the kernel's own path no faster than ours.

use aya_ebpf::{
    macros::map,
    maps::{Array, LpmTrie, lpm_trie::Key},
};
use tailguard_common::{Config, Route, config::MAX_ROUTES};

#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map]
static ROUTES_V4: LpmTrie<[u8; 4], Route> = LpmTrie::with_max_entries(MAX_ROUTES, 0);

#[map]
static ROUTES_V6: LpmTrie<[u8; 16], Route> = LpmTrie::with_max_entries(MAX_ROUTES, 0);

/// The configuration, `None` until the daemon has written it.
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(0).filter(|c| c.wg_ifindex != 0)
}

/// Where an IPv4 destination is routed, by longest prefix.
#[inline(always)]
pub fn route_v4(dst: [u8; 4]) -> Option<Route> {
    ROUTES_V4.get(&Key::new(32, dst)).copied()
}

/// Where an IPv6 destination is routed, by longest prefix.
#[inline(always)]
pub fn route_v6(dst: [u8; 16]) -> Option<Route> {
    ROUTES_V6.get(&Key::new(128, dst)).copied()
}
