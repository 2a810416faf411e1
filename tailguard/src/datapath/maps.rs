//! Writing and reading back the maps the daemon fills: the configuration
//! entry and the route tries.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapError, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tailguard_common::{Config, Route};

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

/// Makes the route tries hold exactly `routes`.
pub(super) fn sync_routes(ebpf: &mut Ebpf, routes: &Routes) -> Result<(), Error> {
    let (v4, v6) = trie_entries(routes);
    sync_trie(ebpf, ROUTES_V4, &v4)?;
    sync_trie(ebpf, ROUTES_V6, &v6)
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

/// What turns a trie holding the keys `present` into one holding exactly
/// `wanted`: every wanted entry written (new and changed alike), then
/// every present key that is not wanted removed. Applied in that order, a
/// destination that stays routed never disappears in between.
#[derive(Debug, PartialEq, Eq)]
struct TrieUpdate<K, V> {
    insert: Vec<(K, V)>,
    remove: Vec<K>,
}

fn trie_update<K: Ord + Copy, V: Copy>(present: &[K], wanted: &BTreeMap<K, V>) -> TrieUpdate<K, V> {
    TrieUpdate {
        insert: wanted.iter().map(|(k, v)| (*k, *v)).collect(),
        remove: present
            .iter()
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
    let present: Vec<TrieKey<N>> = trie
        .keys()
        .map(|key| key.map(|key| (key.prefix_len(), key.data())))
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
        let present: Vec<K> = trie.keys().copied().collect();
        let update = trie_update(&present, wanted);
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

    proptest! {
        #[test]
        fn the_tries_end_equal_to_each_wanted_set(
            stale in routes(),
            updates in vec(routes(), 1..8),
        ) {
            // Whatever an earlier run left in the pinned tries.
            let (mut v4, mut v6) = trie_entries(&stale);
            for wanted in &updates {
                let (want_v4, want_v6) = trie_entries(wanted);
                sync_model(&mut v4, &want_v4)?;
                sync_model(&mut v6, &want_v6)?;
                prop_assert_eq!(&read_model(&v4, &v6), wanted);
            }
        }
    }
}
