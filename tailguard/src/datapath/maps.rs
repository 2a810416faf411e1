//! Writing and reading back the maps the daemon fills: the configuration
//! entry and the route tries.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use aya::{
    Ebpf,
    maps::{Array, LpmTrie, Map, MapError, lpm_trie::Key},
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tailguard_common::{
    Config, Route,
    nat::{FlowKey, NatEntry},
};

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

fn get_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Map, Error> {
    ebpf.map_mut(name).ok_or_else(|| missing(name))
}

pub(super) fn nat(
    ebpf: &mut Ebpf,
) -> Result<aya::maps::HashMap<&mut aya::maps::MapData, FlowKey, NatEntry>, Error> {
    const NAT: &str = "NAT";
    aya::maps::HashMap::try_from(get_mut(ebpf, NAT)?).map_err(map_error(NAT))
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

/// Makes the route tries hold exactly `routes`: adds and changes entries
/// first and removes stale ones after, so a destination that stays routed
/// never disappears in between.
pub(super) fn sync_routes(ebpf: &mut Ebpf, routes: &Routes) -> Result<(), Error> {
    let v4 = routes.iter().filter_map(|(net, route)| match net {
        IpNet::V4(net) => Some((
            Key::new(u32::from(net.prefix_len()), net.network().octets()),
            *route,
        )),
        IpNet::V6(_) => None,
    });
    sync_trie(ebpf, ROUTES_V4, v4.collect())?;
    let v6 = routes.iter().filter_map(|(net, route)| match net {
        IpNet::V6(net) => Some((
            Key::new(u32::from(net.prefix_len()), net.network().octets()),
            *route,
        )),
        IpNet::V4(_) => None,
    });
    sync_trie(ebpf, ROUTES_V6, v6.collect())
}

fn sync_trie<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    wanted: Vec<(Key<[u8; N]>, Route)>,
) -> Result<(), Error> {
    let mut trie: LpmTrie<_, [u8; N], Route> =
        LpmTrie::try_from(get_mut(ebpf, name)?).map_err(map_error(name))?;
    let present: Vec<Key<[u8; N]>> = trie
        .keys()
        .collect::<Result<_, _>>()
        .map_err(map_error(name))?;
    for (key, route) in &wanted {
        trie.insert(key, route, 0).map_err(map_error(name))?;
    }
    let same = |a: &Key<[u8; N]>, b: &Key<[u8; N]>| {
        a.prefix_len() == b.prefix_len() && a.data() == b.data()
    };
    for key in present {
        if !wanted.iter().any(|(w, _)| same(w, &key)) {
            trie.remove(&key).map_err(map_error(name))?;
        }
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
