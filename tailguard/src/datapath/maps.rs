//! Writing and reading back the maps the daemon fills: the configuration
//! entry and the route tries.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapError, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tailguard_common::{Config, Route, config::MAX_ROUTES};

use super::Error;

const CONFIG: &str = "CONFIG";
const ROUTES_V4: &str = "ROUTES_V4";
const ROUTES_V6: &str = "ROUTES_V6";

/// Where each destination prefix leaves: what the route tries hold.
pub type Routes = BTreeMap<IpNet, Route>;

pub(super) fn map_error(name: &'static str) -> impl Fn(MapError) -> Error {
    move |e| Error::Map {
        name,
        source: Box::new(e),
    }
}

fn missing(name: &'static str) -> Error {
    map_error(name)(MapError::InvalidName {
        name: name.to_string(),
    })
}

/// The map called `name` in the object.
pub(super) fn get<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Map, Error> {
    ebpf.map(name).ok_or_else(|| missing(name))
}

pub(super) fn get_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, Error> {
    ebpf.map_mut(name).ok_or_else(|| missing(name))
}

pub(super) fn write_config(ebpf: &mut Ebpf, config: &Config) -> Result<(), Error> {
    let mut map: Array<_, Config> =
        Array::try_from(get_mut(ebpf, CONFIG)?).map_err(map_error(CONFIG))?;
    map.set(0, config, 0).map_err(map_error(CONFIG))
}

pub(super) fn read_config(ebpf: &Ebpf) -> Result<Config, Error> {
    let map: Array<_, Config> = Array::try_from(get(ebpf, CONFIG)?).map_err(map_error(CONFIG))?;
    map.get(&0, 0).map_err(map_error(CONFIG))
}

/// Makes the route tries answer every destination as `routes` does. They
/// hold only the prefixes that change an answer (`without_redundant`), and
/// only what differs from what they hold is written.
pub(super) fn sync_routes(ebpf: &mut Ebpf, routes: &Routes) -> Result<(), Error> {
    let (v4, v6) = trie_entries(&without_redundant(routes));
    for (family, count) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
        if count > MAX_ROUTES as usize {
            return Err(Error::TooManyRoutes {
                family,
                count,
                max: MAX_ROUTES,
            });
        }
    }
    sync_trie(ebpf, ROUTES_V4, &v4)?;
    sync_trie(ebpf, ROUTES_V6, &v6)
}

/// `routes` without the prefixes that change no answer: those whose
/// nearest covering prefix leads to the same place (a tailnet peer's /32
/// inside the tailnet's /10). Longest-prefix lookups answer every
/// destination as before: where a removed prefix matched, its nearest
/// cover now does, with the same route, and a cover removed too has the
/// same route as its own.
pub fn without_redundant(routes: &Routes) -> Routes {
    // The prefix lengths in use, per family, longest first: a cover is
    // looked for at these only.
    let mut lengths: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    for net in routes.keys() {
        let family = usize::from(net.addr().is_ipv6());
        if !lengths[family].contains(&net.prefix_len()) {
            lengths[family].push(net.prefix_len());
        }
    }
    for family in &mut lengths {
        family.sort_unstable_by(|a, b| b.cmp(a));
    }
    routes
        .iter()
        .filter(|(net, route)| {
            let family = usize::from(net.addr().is_ipv6());
            let cover = lengths[family]
                .iter()
                .filter(|&&len| len < net.prefix_len())
                .find_map(|&len| {
                    let cover = IpNet::new(net.addr(), len).ok()?.trunc();
                    routes.get(&cover)
                });
            cover != Some(*route)
        })
        .map(|(net, route)| (*net, *route))
        .collect()
}

/// A route trie's key: prefix length and network address.
type TrieKey<const N: usize> = (u32, [u8; N]);

/// `routes` as the entries of the IPv4 trie and of the IPv6 trie.
fn trie_entries(routes: &Routes) -> (BTreeMap<TrieKey<4>, Route>, BTreeMap<TrieKey<16>, Route>) {
    let mut v4 = BTreeMap::new();
    let mut v6 = BTreeMap::new();
    for (net, route) in routes {
        match net {
            IpNet::V4(net) => v4.insert(
                (u32::from(net.prefix_len()), net.network().octets()),
                *route,
            ),
            IpNet::V6(net) => v6.insert(
                (u32::from(net.prefix_len()), net.network().octets()),
                *route,
            ),
        };
    }
    (v4, v6)
}

/// What turns a trie holding `present` into one holding exactly `wanted`:
/// the wanted entries it lacks or holds with another route written, then
/// every present key that is not wanted removed. Applied in that order, a
/// destination that stays routed never disappears in between; a trie
/// already as wanted is not written at all.
#[derive(Debug, PartialEq, Eq)]
struct TrieUpdate<K, V> {
    insert: Vec<(K, V)>,
    remove: Vec<K>,
}

fn trie_update<K: Ord + Copy, V: Copy + PartialEq>(
    present: &BTreeMap<K, V>,
    wanted: &BTreeMap<K, V>,
) -> TrieUpdate<K, V> {
    TrieUpdate {
        insert: wanted
            .iter()
            .filter(|(k, v)| present.get(k) != Some(v))
            .map(|(k, v)| (*k, *v))
            .collect(),
        remove: present
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect(),
    }
}

fn sync_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: &BTreeMap<TrieKey<N>, Route>,
) -> Result<(), Error> {
    let mut trie: LpmTrie<_, [u8; N], Route> =
        LpmTrie::try_from(get_mut(ebpf, name)?).map_err(map_error(name))?;
    let present: BTreeMap<TrieKey<N>, Route> = trie
        .iter()
        .map(|entry| entry.map(|(key, route)| ((key.prefix_len(), key.data()), route)))
        .collect::<Result<_, _>>()
        .map_err(map_error(name))?;
    let update = trie_update(&present, wanted);
    for ((len, data), route) in &update.insert {
        trie.insert(&Key::new(*len, *data), route, 0)
            .map_err(map_error(name))?;
    }
    for (len, data) in &update.remove {
        trie.remove(&Key::new(*len, *data))
            .map_err(map_error(name))?;
    }
    Ok(())
}

/// The route tries' contents, read back from the kernel.
pub(super) fn read_routes(ebpf: &Ebpf) -> Result<Routes, Error> {
    let mut routes = Routes::new();
    read_trie(ebpf, ROUTES_V4, &mut routes, |data: [u8; 4], len| {
        Ipv4Net::new(Ipv4Addr::from(data), len).map(IpNet::V4)
    })?;
    read_trie(ebpf, ROUTES_V6, &mut routes, |data: [u8; 16], len| {
        Ipv6Net::new(Ipv6Addr::from(data), len).map(IpNet::V6)
    })?;
    Ok(routes)
}

fn read_trie<const N: usize, E>(
    ebpf: &Ebpf,
    name: &'static str,
    routes: &mut Routes,
    net: impl Fn([u8; N], u8) -> Result<IpNet, E>,
) -> Result<(), Error> {
    let trie: LpmTrie<_, [u8; N], Route> =
        LpmTrie::try_from(get(ebpf, name)?).map_err(map_error(name))?;
    for entry in trie.iter() {
        let (key, route) = entry.map_err(map_error(name))?;
        // The kernel keeps prefix lengths within the key's size.
        if let Ok(net) = net(key.data(), key.prefix_len() as u8) {
            routes.insert(net, route);
        }
    }
    Ok(())
}

/// `memlock` of every map's fdinfo.
pub(super) fn memory(ebpf: &Ebpf) -> Result<BTreeMap<String, u64>, Error> {
    use std::os::fd::{AsFd as _, AsRawFd as _};

    let mut out = BTreeMap::new();
    for (name, data) in ebpf.maps().filter_map(|(n, m)| Some((n, map_data(m)?))) {
        let fd = data.fd().as_fd().as_raw_fd();
        let path = format!("/proc/self/fdinfo/{fd}");
        let memlock = std::fs::read_to_string(&path)
            .ok()
            .and_then(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .ok_or_else(|| Error::Device {
                device: name.to_string(),
                message: format!("no memlock in {path}"),
            })?;
        out.insert(name.to_string(), memlock);
    }
    Ok(out)
}

/// The map types this object has (others are skipped).
fn map_data(map: &Map) -> Option<&aya::maps::MapData> {
    match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::LpmTrie(m)
        | Map::LruHashMap(m)
        | Map::PerCpuArray(m) => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use proptest::{collection::vec, prelude::*};

    use super::*;

    fn route() -> impl Strategy<Value = Route> {
        prop_oneof![Just(Route::WIREGUARD), Just(Route::TAILSCALE)]
    }

    /// A set of routes as the daemon computes them: network addresses only.
    fn routes() -> impl Strategy<Value = Routes> {
        let net = prop_oneof![
            (any::<Ipv4Addr>(), 0..=32u8).prop_map(|(a, len)| Ipv4Net::new(a, len).unwrap().into()),
            // Few distinct addresses, so that sets overlap from one update
            // to the next.
            (0..4u8, 0..=128u8).prop_map(|(a, len)| {
                Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, a.into()), len)
                    .unwrap()
                    .into()
            }),
            (0..4u8, 8..=32u8).prop_map(|(a, len)| Ipv4Net::new(Ipv4Addr::new(10, 0, 0, a), len)
                .unwrap()
                .into()),
        ];
        vec((net.prop_map(|n: IpNet| n.trunc()), route()), 0..12)
            .prop_map(|entries| entries.into_iter().collect())
    }

    /// Applies [`trie_update`] to `trie`, a map standing in for the kernel's
    /// LPM trie, in the order [`sync_trie`] does, checking the moment in
    /// between.
    fn sync_model<K: Ord + Copy + Debug>(
        trie: &mut BTreeMap<K, Route>,
        wanted: &BTreeMap<K, Route>,
    ) -> Result<(), TestCaseError> {
        let update = trie_update(trie, wanted);
        for (key, route) in update.insert {
            trie.insert(key, route);
        }
        for (key, route) in wanted {
            prop_assert_eq!(
                trie.get(key),
                Some(route),
                "a wanted route is missing in between"
            );
        }
        for key in update.remove {
            prop_assert!(
                trie.remove(&key).is_some(),
                "removed a key that was not there"
            );
        }
        Ok(())
    }

    /// The tries read back as routes, as [`read_routes`] does.
    fn read_model(v4: &BTreeMap<TrieKey<4>, Route>, v6: &BTreeMap<TrieKey<16>, Route>) -> Routes {
        let v4 = v4.iter().map(|((len, data), route)| {
            (
                Ipv4Net::new(Ipv4Addr::from(*data), *len as u8)
                    .unwrap()
                    .into(),
                *route,
            )
        });
        let v6 = v6.iter().map(|((len, data), route)| {
            (
                Ipv6Net::new(Ipv6Addr::from(*data), *len as u8)
                    .unwrap()
                    .into(),
                *route,
            )
        });
        v4.chain(v6).collect()
    }

    /// Where a longest-prefix lookup of `addr` in `routes` leads.
    fn lookup(routes: &Routes, addr: std::net::IpAddr) -> Option<Route> {
        routes
            .iter()
            .filter(|(net, _)| net.contains(&addr))
            .max_by_key(|(net, _)| net.prefix_len())
            .map(|(_, route)| *route)
    }

    proptest! {
        #[test]
        fn the_tries_end_equal_to_each_wanted_set(
            stale in routes(),
            updates in vec(routes(), 1..8),
        ) {
            // Whatever an earlier run left in the pinned tries.
            let (mut v4, mut v6) = trie_entries(&stale);
            for wanted in &updates {
                let (want_v4, want_v6) = trie_entries(&without_redundant(wanted));
                sync_model(&mut v4, &want_v4)?;
                sync_model(&mut v6, &want_v6)?;
                prop_assert_eq!(read_model(&v4, &v6), without_redundant(wanted));
                // Once there, the same set writes nothing.
                prop_assert!(trie_update(&v4, &want_v4).insert.is_empty());
                prop_assert!(trie_update(&v6, &want_v6).remove.is_empty());
            }
        }

        /// Without the prefixes that change nothing, every destination
        /// (each network's first address and its neighbours, where answers
        /// change) is answered as before.
        #[test]
        fn leaving_out_redundant_prefixes_changes_no_answer(wanted in routes()) {
            let kept = without_redundant(&wanted);
            prop_assert!(kept.len() <= wanted.len());
            let probes = wanted.keys().flat_map(|net| {
                let first = net.network();
                let next = match first {
                    std::net::IpAddr::V4(a) => std::net::IpAddr::V4((u32::from(a).wrapping_add(1)).into()),
                    std::net::IpAddr::V6(a) => std::net::IpAddr::V6((u128::from(a).wrapping_add(1)).into()),
                };
                [first, next, net.broadcast()]
            });
            for addr in probes {
                prop_assert_eq!(lookup(&kept, addr), lookup(&wanted, addr), "at {}", addr);
            }
        }
    }

    #[test]
    fn a_peer_inside_the_tailnet_range_is_left_out_a_subnet_inside_a_wireguard_route_is_not() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let routes: Routes = [
            (net("100.64.0.0/10"), Route::TAILSCALE),
            (net("100.101.102.103/32"), Route::TAILSCALE),
            (net("10.0.0.0/8"), Route::WIREGUARD),
            (net("10.1.0.0/16"), Route::TAILSCALE),
            (net("10.1.2.3/32"), Route::WIREGUARD),
            (net("10.1.9.9/32"), Route::TAILSCALE),
        ]
        .into_iter()
        .collect();
        let kept: Vec<String> = without_redundant(&routes)
            .keys()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            kept,
            ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "100.64.0.0/10"],
            "the /32s with their cover's route go; the one that differs stays"
        );
    }
}
