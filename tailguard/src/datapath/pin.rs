//! Where connection state outlives the daemon: the connection table's maps
//! (`table::STATE_MAPS`) pinned on a bpffs (`TG_BPF_DIR/<WG_DEVICE>/`), so
//! established flows through the fast path survive a restart. Pins whose
//! layout or size does not match this build's and settings' are discarded
//! (all of them: they only make sense together), with a warning, rather
//! than misread.

use crate::host::privileges::is_bpffs;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use tailguard_common::nat::TableSize;
use tracing::{info, warn};

use super::table::{STATE_MAPS, StateMap};

/// Where bpffs is normally mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Makes `dir` ready for pins (mounting bpffs on /sys/fs/bpf when nothing
/// is mounted there, as in many containers) and returns it, after
/// discarding pins of another layout or size (`size`).
pub fn prepare(dir: &Path, size: &TableSize) -> io::Result<PathBuf> {
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
    let stale = STATE_MAPS
        .iter()
        .any(|map| dir.join(map.name).exists() && !compatible(&dir.join(map.name), map, size))
        || dir.join(LEGACY_PIN).exists();
    if stale {
        warn!(
            dir = %dir.display(),
            "connection state of another layout or size (TailGuard version or TG_NAT_* changed): discarded (its flows start over)"
        );
        remove_pins(dir)?;
    }
    Ok(dir.to_path_buf())
}

/// The single map of TailGuard's versions before the per-family tables.
const LEGACY_PIN: &str = "NAT";

/// The pins TailGuard makes in its directory; nothing else there is ours.
fn our_pins() -> impl Iterator<Item = &'static str> {
    STATE_MAPS.iter().map(|m| m.name).chain([LEGACY_PIN])
}

/// Removes our pins in `dir`; true if there was one.
fn remove_pins(dir: &Path) -> io::Result<bool> {
    let mut removed = false;
    for name in our_pins() {
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
    Ok(removed)
}

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
    let removed = remove_pins(dir)?;
    // Left in place when something else lives there.
    let _ = std::fs::remove_dir(dir);
    Ok(removed)
}

/// The pinned map has this build's type, key and value, and the entries
/// `size` asks for.
fn compatible(pin: &Path, map: &StateMap, size: &TableSize) -> bool {
    let Ok(info) = MapData::from_pin(pin).and_then(|m| m.info()) else {
        return false;
    };
    info.map_type().ok().map(|t| t as u32) == Some(map.map_type)
        && info.key_size() as usize == map.key_size
        && info.value_size() as usize == map.value_size
        && info.max_entries() == (map.entries)(size)
}
