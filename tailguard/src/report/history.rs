//! What the report shows over time, kept in memory: each WireGuard peer's
//! traffic over the last 10 minutes (the page's sparklines), and the fast
//! path's counters over the last minute (its rates).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use super::{Count, Counters, Rate, Rates};

/// How often a peer's traffic is sampled (the sparklines' resolution).
pub const TRAFFIC_SAMPLE: Duration = Duration::from_secs(5);

/// How far back a peer's traffic goes.
pub const TRAFFIC_SPAN: Duration = Duration::from_secs(600);

/// How far back the rates look.
pub const RATE_SPAN: Duration = Duration::from_secs(60);

/// Each peer's received plus sent bytes, as read at each sample.
#[derive(Debug, Default)]
pub struct PeerTraffic {
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
}

impl PeerTraffic {
    /// Records the peers' byte totals read `at`; peers no longer listed are
    /// forgotten.
    pub fn record(&mut self, at: Instant, totals: &[(String, u64)]) {
        self.samples
            .retain(|key, _| totals.iter().any(|(listed, _)| listed == key));
        for (key, total) in totals {
            let samples = self.samples.entry(key.clone()).or_default();
            // A re-created device counts from 0 again: start over.
            if samples.back().is_some_and(|&(_, last)| *total < last) {
                samples.clear();
            }
            samples.push_back((at, *total));
            while samples
                .front()
                .is_some_and(|&(t, _)| at.duration_since(t) > TRAFFIC_SPAN)
            {
                samples.pop_front();
            }
        }
    }

    /// The bytes the peer moved between each two samples, oldest first.
    pub fn traffic(&self, key: &str) -> Vec<u64> {
        self.samples.get(key).map_or_else(Vec::new, |samples| {
            samples
                .iter()
                .zip(samples.iter().skip(1))
                .map(|(&(_, a), &(_, b))| b - a)
                .collect()
        })
    }
}

/// The fast path's counters as read over the last minute.
#[derive(Debug, Default)]
pub struct CounterRates {
    samples: VecDeque<(Instant, Counters)>,
}

impl CounterRates {
    pub fn record(&mut self, at: Instant, counters: Counters) {
        // Counters that went back (a new object after a fallback and a
        // return) start the span over.
        if self
            .samples
            .back()
            .is_some_and(|(_, last)| went_back(last, &counters))
        {
            self.samples.clear();
        }
        self.samples.push_back((at, counters));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| at.duration_since(*t) > RATE_SPAN)
        {
            self.samples.pop_front();
        }
    }

    /// The rates between the oldest sample of the span and the newest;
    /// `None` with fewer than two samples.
    pub fn rates(&self) -> Option<Rates> {
        let ((from, first), (to, last)) = (self.samples.front()?, self.samples.back()?);
        let seconds = to.duration_since(*from).as_secs_f64();
        if seconds <= 0.0 {
            return None;
        }
        let outcomes = last
            .iter()
            .map(|(device, outcomes)| {
                let rates = outcomes
                    .iter()
                    .map(|(outcome, now)| {
                        let then = first
                            .get(device)
                            .and_then(|o| o.get(outcome))
                            .copied()
                            .unwrap_or_default();
                        let rate = Rate {
                            packets: now.packets.saturating_sub(then.packets) as f64 / seconds,
                            bytes: now.bytes.saturating_sub(then.bytes) as f64 / seconds,
                        };
                        (outcome.clone(), rate)
                    })
                    .collect::<BTreeMap<_, _>>();
                (device.clone(), rates)
            })
            .collect();
        Some(Rates {
            over_seconds: seconds,
            outcomes,
        })
    }
}

fn went_back(before: &Counters, after: &Counters) -> bool {
    before.iter().any(|(device, outcomes)| {
        outcomes.iter().any(|(outcome, then)| {
            let now: Count = after
                .get(device)
                .and_then(|o| o.get(outcome))
                .copied()
                .unwrap_or_default();
            now.packets < then.packets
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(redirected: u64) -> Counters {
        let mut outcomes = BTreeMap::new();
        outcomes.insert(
            "redirected".to_string(),
            Count {
                packets: redirected,
                bytes: redirected * 100,
            },
        );
        BTreeMap::from([("wireguard".to_string(), outcomes)])
    }

    #[test]
    fn a_peers_traffic_is_what_moved_between_samples_over_ten_minutes() {
        let start = Instant::now();
        let mut traffic = PeerTraffic::default();
        let key = "peer".to_string();
        for i in 0..200u64 {
            let at = start + Duration::from_secs(5 * i);
            traffic.record(at, &[(key.clone(), i * i)]);
        }
        let moved = traffic.traffic("peer");
        // 600 s of samples 5 s apart: 121 samples, 120 intervals.
        assert_eq!(moved.len(), 120);
        assert_eq!(moved.last(), Some(&(199 * 199 - 198 * 198)));
        // A counter that went back (the device made again) starts over.
        traffic.record(start + Duration::from_secs(1000), &[(key.clone(), 5)]);
        assert!(traffic.traffic("peer").is_empty());
        traffic.record(start + Duration::from_secs(1005), &[(key.clone(), 12)]);
        assert_eq!(traffic.traffic("peer"), [7]);
        // A peer no longer listed is forgotten.
        traffic.record(start + Duration::from_secs(1010), &[]);
        assert!(traffic.traffic("peer").is_empty());
    }

    #[test]
    fn rates_are_over_the_last_minute() {
        let start = Instant::now();
        let mut rates = CounterRates::default();
        assert_eq!(rates.rates(), None);
        for i in 0..=90u64 {
            // 10 packets a second for the first 30 s, then 50.
            let packets = if i <= 30 { 10 * i } else { 300 + 50 * (i - 30) };
            rates.record(start + Duration::from_secs(i), counters(packets));
        }
        let r = rates.rates().expect("rates");
        assert_eq!(r.over_seconds, 60.0);
        let redirected = r.outcomes["wireguard"]["redirected"];
        assert_eq!(redirected.packets, 50.0);
        assert_eq!(redirected.bytes, 5000.0);
        // Counters that start over start the span over.
        rates.record(start + Duration::from_secs(91), counters(3));
        assert_eq!(rates.rates(), None);
    }
}
