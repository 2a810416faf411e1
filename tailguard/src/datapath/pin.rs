//! Where connection state outlives the daemon: the `NAT` map pinned on a
//! bpffs (`TG_BPF_DIR/<WG_DEVICE>/NAT`), so established flows through the
//! fast path survive a restart. A pin whose layout does not match this
//! build's is discarded, with a warning, rather than misread.

use crate::host::privileges::is_bpffs;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use tailguard_common::nat::{FlowKey, NatEntry};
use tracing::{info, warn};

/// Where bpffs is normally mounted.
const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_MAP_TYPE_LRU_HASH`.
const LRU_HASH: u32 = 9;

/// Makes `dir` ready for pins (mounting bpffs on /sys/fs/bpf when nothing
/// is mounted there, as in many containers) and returns the path for the
/// `NAT` pin, after discarding one of another layout or size (`entries`).
pub fn prepare(dir: &Path, entries: u32) -> io::Result<PathBuf> {
    if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        nix::mount::mount(
            Some("bpffs"),
            BPFFS,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|e| io::Error::other(format!("mounting bpffs on {BPFFS}: {e}")))?;
        info!(path = BPFFS, "mounted bpffs for pinned connection state");
    }
    // Nothing is made, and nothing removed, outside a bpffs: a mistyped
    // TG_BPF_DIR must not turn into files in /etc.
    let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
    if !is_bpffs(existing) {
        return Err(not_bpffs(dir));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
    let pin = dir.join(NAT_PIN);
    if pin.exists() && !compatible(&pin, entries) {
        warn!(
            pin = %pin.display(),
            "connection state of another layout or size (TailGuard version or TG_NAT_FLOWS changed): discarded (its flows start over)"
        );
        std::fs::remove_file(&pin)?;
    }
    Ok(pin)
}

/// The pins TailGuard makes in its directory; nothing else there is ours.
const NAT_PIN: &str = "NAT";
const OUR_PINS: [&str; 1] = [NAT_PIN];

fn not_bpffs(dir: &Path) -> io::Error {
    io::Error::other(format!(
        "TG_BPF_DIR: {} is not on a bpffs; TailGuard keeps its pins only there, and \
         touches nothing elsewhere",
        dir.display()
    ))
}

/// Removes the pinned state of one TailGuard (`tailguard cleanup`): only
/// the pins named as ours, only on a bpffs, and the directory if that
/// leaves it empty. `Ok(false)`: there was none.
pub fn remove(dir: &Path) -> io::Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !is_bpffs(dir) {
        return Err(not_bpffs(dir));
    }
    let mut removed = false;
    for name in OUR_PINS {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("removing {}: {e}", dir.join(name).display()),
                ));
            }
        }
    }
    // Left in place when something else lives there.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// The pinned map has this build's type, key and value, and `entries`.
fn compatible(pin: &Path, entries: u32) -> bool {
    let Ok(info) = MapData::from_pin(pin).and_then(|m| m.info()) else {
        return false;
    };
    info.map_type().ok().map(|t| t as u32) == Some(LRU_HASH)
        && info.key_size() as usize == size_of::<FlowKey>()
        && info.value_size() as usize == size_of::<NatEntry>()
        && info.max_entries() == entries
}

/// How full the pinned connection state is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    /// Entries in the map (two per flow: one per direction).
    pub entries: usize,
    /// Of those, the ones not yet idle past their timeout.
    pub live: usize,
    /// Entries the map can hold.
    pub capacity: u32,
}

/// Counts the entries of the pinned `NAT` map in `dir`; `None` when there
/// is none (netfilter datapath, or never started).
pub fn occupancy(dir: &Path) -> io::Result<Option<Occupancy>> {
    use aya::maps::{HashMap, Map};
    use tailguard_common::nat::timeout_ns;

    let pin = dir.join(NAT_PIN);
    if !pin.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(&pin).map_err(io::Error::other)?;
    let capacity = data.info().map_err(io::Error::other)?.max_entries();
    let map: HashMap<MapData, FlowKey, NatEntry> =
        HashMap::try_from(Map::LruHashMap(data)).map_err(io::Error::other)?;
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .map_err(io::Error::other)?;
    let mut counted = Occupancy {
        capacity,
        ..Occupancy::default()
    };
    for item in map.iter() {
        let (key, entry) = item.map_err(io::Error::other)?;
        counted.entries += 1;
        if now.saturating_sub(entry.last_seen) <= timeout_ns(key.proto, entry.state) {
            counted.live += 1;
        }
    }
    Ok(Some(counted))
}
