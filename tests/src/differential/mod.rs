//! The differential test's parts (`tests/tests/daemon_differential.rs`): the same
//! generated traffic through both datapaths, each packet reduced to its
//! fate as the receiver sees it.
//!
//! - `cases`: the seeded generator of flows and what follows their first
//!   packet;
//! - `craft`: the packets, byte by byte;
//! - `rig`: the topology, the packet taps, running a case;
//! - `fate`: a captured packet as a line both datapaths must agree on.

pub mod cases;
pub mod craft;
pub mod fate;
pub mod rig;

use cases::Case;

/// The fates of `cases` through `datapath`: per case, per step, the
/// lines of what every site captured. Cases with `WG_ISOLATE_PEERS=1` run
/// on a topology of their own: after a restart of the daemon, the
/// WireGuard client would still hold its session with the old device and
/// lose what it sends until it shakes hands again.
pub fn run(datapath: &str, cases: &[Case]) -> Vec<Vec<Vec<String>>> {
    let mut fates = vec![Vec::new(); cases.len()];
    for isolate in [false, true] {
        let rig = rig::Rig::new(&format!(
            "diff-{datapath}{}",
            if isolate { "-i" } else { "" }
        ));
        let node = rig.start(datapath, isolate);
        for case in cases.iter().filter(|c| c.isolate == isolate) {
            fates[case.index] = rig.run(case);
        }
        rig.bridge.bed.ours.run(|| node.stop());
    }
    fates
}
