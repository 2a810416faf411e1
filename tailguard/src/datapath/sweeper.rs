//! The connection table's garbage collector. The programs never expire a
//! flow themselves (an entry found is a flow, however old): the daemon
//! removes expired pairs, both halves together, every few seconds, so the
//! table keeps room and a port is free only once neither half holds it.
//!
//! A sweep reads the table whole, decides from that snapshot ([`plan`],
//! pure), and acts with each step checked against the kernel again: a pair
//! whose reply half had a packet meanwhile gets its origin half back. It
//! also recounts each source's unreplied flows from the origin halves'
//! marks and writes the counts the programs keep: what a race between a
//! program's count and a sweep gets wrong lasts one sweep.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tailguard_common::{
    Config,
    nat::{
        CHARGED, FlowKey, FlowState, Half, SourceKey, TableSize, Translation, expired, paired_key,
        resolve,
    },
};

use super::{Datapath, Error, table::TableEvents};
use crate::report::{ConnectionTableReport, Occupancy};

/// How often the table is swept: well inside the shortest timeout (10 s),
/// so a closed flow's port is free again soon after (see [`next_sweep`]
/// for very large tables).
pub const CADENCE: Duration = Duration::from_secs(5);
/// When the next sweep is due after one that took `last`: every
/// [`CADENCE`], or less often when the table is so large that a sweep
/// takes long, so that the sweeper never takes more than a tenth of a CPU
/// (a million flows take about a second to read and judge).
pub fn next_sweep(last: Duration) -> Duration {
    CADENCE.max(last * 10)
}

/// How long a reply half may be without its origin half before it is
/// removed: the origin is added just after the reply when a flow starts,
/// and a sweep may read the table between the two.
const ORPHAN_GRACE: u32 = 30;

/// What one snapshot of the table calls for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Expired pairs: the origin half's key, its half, and the reply
    /// half's key (if found) with the last time seen that made it expired.
    pub expired: Vec<Expired>,
    /// Reply halves with no origin half, idle past the grace.
    pub orphans: Vec<(FlowKey, u32)>,
    /// Live pairs by state, and per family.
    pub live: [u64; FlowState::COUNT],
    pub flows_v4: u64,
    pub flows_v6: u64,
    /// Unreplied flows each source holds, by the origin halves' marks.
    pub sources: BTreeMap<SourceKey, i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub origin: FlowKey,
    pub half: Half,
    pub reply: Option<FlowKey>,
    pub last_seen: u32,
}

/// Decides a sweep from a snapshot of every half, at `now` (the table's
/// clock), with the configuration the programs resolve halves with.
pub fn plan(halves: &[(FlowKey, Half)], cfg: &Config, now: u32) -> Plan {
    let index: HashMap<FlowKey, Half> = halves.iter().copied().collect();
    let mut plan = Plan::default();
    let mut paired = std::collections::HashSet::new();
    for (key, half) in halves.iter().filter(|(_, h)| h.meta.is_origin()) {
        let mut t = Translation::default();
        let reply = resolve(cfg, key, half, &mut t)
            .then(|| paired_key(&t, key))
            .filter(|r| index.contains_key(r));
        let reply_seen = reply.map_or(0, |r| index[&r].last_seen);
        let last_seen = half.last_seen.max(reply_seen);
        if let Some(r) = reply {
            paired.insert(r);
        }
        let state = half.meta.flow_state();
        if expired(key.proto, half.meta.state, last_seen, now) {
            plan.expired.push(Expired {
                origin: *key,
                half: *half,
                reply,
                last_seen,
            });
            continue;
        }
        plan.live[state as usize] += 1;
        if key.is_ipv6() {
            plan.flows_v6 += 1;
        } else {
            plan.flows_v4 += 1;
        }
        if half.meta.state & CHARGED != 0 {
            *plan.sources.entry(SourceKey::of(key)).or_default() += 1;
        }
    }
    for (key, half) in halves.iter().filter(|(_, h)| !h.meta.is_origin()) {
        if !paired.contains(key) && now.saturating_sub(half.last_seen) > ORPHAN_GRACE {
            plan.orphans.push((*key, half.last_seen));
        }
    }
    plan
}

/// What the sweeps have done since the daemon started, and the table now.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Pairs removed as expired, by the state they ended in.
    pub expired: [u64; FlowState::COUNT],
    /// Pairs found live again while being removed (a packet in between).
    pub restored: u64,
    /// Reply halves removed without their origin half.
    pub orphans: u64,
    /// Pairs the kernel refused to change (left for the next sweep).
    pub failed: u64,
    /// The last sweep: the table's live pairs by state and family, and
    /// how long it took.
    pub live: [u64; FlowState::COUNT],
    pub flows_v4: u64,
    pub flows_v6: u64,
    pub last_duration: Duration,
    pub sweeps: u64,
}

/// `/status`'s view of the table: its flows and capacity per family, the
/// source budget, the live pairs and the expired ones by state, and the
/// programs' events. Nothing is ever evicted (the tables are plain hash
/// maps): a full table refuses new flows, counted as `table-full`.
pub fn report(totals: &Totals, events: &TableEvents, size: &TableSize) -> ConnectionTableReport {
    let by_state = |counts: &[u64; FlowState::COUNT]| {
        FlowState::ALL
            .iter()
            .filter(|s| counts[**s as usize] > 0)
            .map(|s| (s.name().to_string(), counts[*s as usize]))
            .collect()
    };
    ConnectionTableReport {
        ipv4: Occupancy {
            flows: totals.flows_v4,
            capacity: size.v4_flows,
        },
        ipv6: Occupancy {
            flows: totals.flows_v6,
            capacity: size.v6_flows,
        },
        unreplied_per_source: size.unreplied_per_source,
        live: by_state(&totals.live),
        expired: by_state(&totals.expired),
        restored: totals.restored,
        orphans_removed: totals.orphans,
        sweep_failures: totals.failed,
        events: events
            .0
            .iter()
            .map(|(name, n)| (name.to_string(), *n))
            .collect(),
        sweeps: totals.sweeps,
        last_sweep_ms: totals.last_duration.as_millis() as u64,
    }
}

/// The table's clock now: whole seconds of `CLOCK_MONOTONIC`, as the
/// programs count them (`tailguard_common::config::Clock`).
pub fn now() -> u32 {
    super::clock::monotonic_seconds()
}

/// Sweeps the table once, adding what it did to `totals`. A pair the
/// kernel refuses to change is counted and left for the next sweep; the
/// others go on.
pub fn sweep(dp: &mut Datapath, totals: &mut Totals) -> Result<(), Error> {
    let started = Instant::now();
    let cfg = dp.config()?;
    let now = now();
    // The budgets as the programs count them, read before the table: what
    // they change while the sweep runs is added to the recount below.
    let counted_before = dp.sources()?;
    let plan = plan(&dp.halves()?, &cfg, now);
    for pair in &plan.expired {
        match remove_pair(dp, pair) {
            Ok(Removed::Expired) => totals.expired[pair.half.meta.flow_state() as usize] += 1,
            Ok(Removed::Restored) => totals.restored += 1,
            Ok(Removed::Gone) => {}
            Err(e) => {
                totals.failed += 1;
                tracing::debug!("sweeping a pair: {e}");
            }
        }
    }
    for (key, last_seen) in &plan.orphans {
        match dp.take_half(key) {
            Ok(Some(half)) if half.last_seen != *last_seen => {
                // It had a packet meanwhile: its origin half is back, or
                // will be made again from it.
                let _ = dp.insert_half(key, &half, true);
            }
            Ok(Some(_)) => totals.orphans += 1,
            Ok(None) => {}
            Err(_) => totals.failed += 1,
        }
    }
    let counted = dp.sources()?;
    for source in plan.sources.keys().chain(counted.keys()) {
        let changed_meanwhile = counted.get(source).copied().unwrap_or(0)
            - counted_before.get(source).copied().unwrap_or(0);
        let wanted = (plan.sources.get(source).copied().unwrap_or(0) + changed_meanwhile).max(0);
        if counted.get(source).copied().unwrap_or(0) != wanted
            || (wanted == 0 && counted.contains_key(source))
        {
            dp.set_source(source, wanted)?;
        }
    }
    totals.live = plan.live;
    totals.flows_v4 = plan.flows_v4;
    totals.flows_v6 = plan.flows_v6;
    totals.sweeps += 1;
    totals.last_duration = started.elapsed();
    Ok(())
}

/// What removing an expired pair came to.
enum Removed {
    Expired,
    /// A packet came in between: the pair is back as it was.
    Restored,
    /// Its origin half was gone already.
    Gone,
}

/// Removes an expired pair, each half taken in one step so that a packet
/// in between is seen: the origin half first (until the reply half goes
/// too, its port stays taken, so no new flow can be handed the replies),
/// then the reply half; a half newer than the plan puts the pair back.
fn remove_pair(dp: &mut Datapath, pair: &Expired) -> Result<Removed, Error> {
    let Some(origin) = dp.take_half(&pair.origin)? else {
        return Ok(Removed::Gone);
    };
    if origin.last_seen > pair.half.last_seen {
        dp.insert_half(&pair.origin, &origin, true)?;
        return Ok(Removed::Restored);
    }
    let Some(reply) = pair.reply else {
        return Ok(Removed::Expired);
    };
    match dp.take_half(&reply)? {
        Some(half) if half.last_seen > pair.last_seen => {
            dp.insert_half(&reply, &half, true)?;
            dp.insert_half(&pair.origin, &origin, true)?;
            Ok(Removed::Restored)
        }
        _ => {
            // A reply that found its half just before it went may have
            // made the origin half again: alone now, it goes too.
            dp.take_half(&pair.origin)?;
            Ok(Removed::Expired)
        }
    }
}

#[cfg(test)]
mod tests {
    use tailguard_common::{
        Device,
        nat::{Meta, kind},
        wire::{IPPROTO_TCP, IPPROTO_UDP},
    };

    use super::*;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    /// A masqueraded flow from a WireGuard client to a tailnet peer: its
    /// two halves as the programs make them.
    fn pair(
        proto: u8,
        state: FlowState,
        origin_seen: u32,
        reply_seen: u32,
    ) -> [(FlowKey, Half); 2] {
        let origin = FlowKey {
            src: v4([10, 0, 0, 2]),
            dst: v4([100, 64, 0, 9]),
            sport: 5000u16.to_be(),
            dport: 443u16.to_be(),
            proto,
            ingress: Device::WireGuard as u8,
            family: 4,
            _pad: 0,
        };
        let half = Half {
            addr: v4([100, 64, 0, 1]),
            meta: Meta {
                port: 61_001u16.to_be(),
                kind: kind::ORIGIN,
                state: state as u8 | CHARGED,
            },
            last_seen: origin_seen,
        };
        let mut t = Translation::default();
        assert!(resolve(&Config::default(), &origin, &half, &mut t));
        let reply = paired_key(&t, &origin);
        let reply_half = tailguard_common::nat::paired_half(&origin, &half, reply_seen);
        [(origin, half), (reply, reply_half)]
    }

    #[test]
    fn a_long_sweep_makes_the_next_one_later() {
        assert_eq!(next_sweep(Duration::from_millis(20)), CADENCE);
        assert_eq!(next_sweep(Duration::from_secs(1)), Duration::from_secs(10));
    }

    #[test]
    fn a_pair_expires_by_its_later_half() {
        // The client last sent at 100; the server's replies keep coming.
        let halves = pair(IPPROTO_UDP, FlowState::Assured, 100, 1000);
        let plan = plan(&halves, &Config::default(), 1100);
        assert!(plan.expired.is_empty(), "{plan:?}");
        assert_eq!(plan.live[FlowState::Assured as usize], 1);
        let plan = super::plan(&halves, &Config::default(), 1121);
        assert_eq!(plan.expired.len(), 1);
        assert_eq!(plan.expired[0].reply, Some(halves[1].0));
        assert_eq!(plan.expired[0].last_seen, 1000);
    }

    #[test]
    fn a_one_way_flow_lives_while_its_client_sends() {
        let [origin, _] = pair(IPPROTO_UDP, FlowState::Unreplied, 500, 0);
        let halves = pair(IPPROTO_UDP, FlowState::Unreplied, 500, 10);
        let plan = plan(&halves, &Config::default(), 520);
        assert!(plan.expired.is_empty(), "{plan:?}");
        // Counted against its source while unreplied.
        assert_eq!(plan.sources.get(&SourceKey::of(&origin.0)), Some(&1));
        let plan = super::plan(&halves, &Config::default(), 531);
        assert_eq!(plan.expired.len(), 1);
        assert!(plan.sources.is_empty(), "an expired flow holds no budget");
    }

    #[test]
    fn tcp_states_keep_their_timeouts() {
        let halves = pair(IPPROTO_TCP, FlowState::Established, 0, 0);
        assert!(plan(&halves, &Config::default(), 86_400).expired.is_empty());
        let closed = pair(IPPROTO_TCP, FlowState::Close, 0, 0);
        assert_eq!(plan(&closed, &Config::default(), 11).expired.len(), 1);
    }

    #[test]
    fn a_reply_half_alone_goes_only_after_the_grace() {
        let [_, reply] = pair(IPPROTO_UDP, FlowState::Unreplied, 0, 100);
        assert!(plan(&[reply], &Config::default(), 120).orphans.is_empty());
        assert_eq!(
            plan(&[reply], &Config::default(), 131).orphans,
            vec![(reply.0, 100)]
        );
    }
}
