//! Whether the peers this node connects to (those with an `Endpoint`: a
//! client config's server) still answer, by wg's rule of thumb: a
//! handshake within the last 3 minutes (docs/architecture.md, "Health and
//! recovery").
//!
//! WireGuard makes a handshake only when it has something to send, so the
//! age alone says nothing about an idle peer. A session's keys last
//! 3 minutes (REJECT_AFTER_TIME); once they have expired, whatever is sent
//! to the peer (traffic, a persistent keepalive) starts with a handshake
//! initiation, which the device counts as sent bytes. So a peer is
//! *silent* when its last handshake is older than the window and what was
//! sent to it since went unanswered for [`ANSWER_WITHIN`]. It stays silent
//! until the next handshake.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use crate::config::wg_quick::PublicKey;

/// wg's rule of thumb for a live peer: a handshake within this long.
pub const HANDSHAKE_WINDOW: Duration = Duration::from_secs(180);
/// How long sending to a peer whose session has expired may go without a
/// handshake: WireGuard sends a new initiation every 5 s (REKEY_TIMEOUT),
/// so this is two of them unanswered.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);
/// How often the peers' handshakes are read.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// One peer as the device reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerSample {
    pub public_key: PublicKey,
    pub last_handshake: Option<SystemTime>,
    /// Everything sent to the peer so far, handshake initiations included.
    pub tx_bytes: u64,
}

/// What is known of one peer between two readings.
#[derive(Clone, Copy, Debug)]
struct Track {
    last_handshake: Option<SystemTime>,
    tx_bytes: u64,
    /// Since when something sent after its session expired has had no
    /// handshake in answer.
    unanswered_since: Option<Instant>,
}

/// The judged peers' tracks, for one device.
#[derive(Debug)]
pub struct Handshakes {
    /// When the device was made: a peer it has no handshake with yet is as
    /// old as that.
    device_since: Instant,
    tracks: HashMap<PublicKey, Track>,
}

impl Handshakes {
    pub fn new(now: Instant) -> Self {
        Self {
            device_since: now,
            tracks: HashMap::new(),
        }
    }

    /// The device was made anew (its peers start with no handshake).
    pub fn device_made(&mut self, now: Instant) {
        *self = Self::new(now);
    }

    /// Takes one reading of the judged peers (`now` and `wall` its moment
    /// on both clocks); returns those that are silent.
    pub fn observe(
        &mut self,
        now: Instant,
        wall: SystemTime,
        samples: &[PeerSample],
    ) -> Vec<PublicKey> {
        let device_age = now.saturating_duration_since(self.device_since);
        let mut silent = Vec::new();
        for sample in samples {
            // The first reading is the baseline: nothing was seen moving.
            let track = self.tracks.entry(sample.public_key).or_insert(Track {
                last_handshake: sample.last_handshake,
                tx_bytes: sample.tx_bytes,
                unanswered_since: None,
            });
            if track.last_handshake != sample.last_handshake {
                track.last_handshake = sample.last_handshake;
                track.unanswered_since = None;
            }
            let age = sample
                .last_handshake
                .map_or(device_age, |at| wall.duration_since(at).unwrap_or_default())
                .min(device_age);
            let sent = sample.tx_bytes > track.tx_bytes;
            track.tx_bytes = sample.tx_bytes;
            if age < HANDSHAKE_WINDOW {
                track.unanswered_since = None;
            } else if sent && track.unanswered_since.is_none() {
                track.unanswered_since = Some(now);
            }
            if track
                .unanswered_since
                .is_some_and(|since| now.duration_since(since) >= ANSWER_WITHIN)
            {
                silent.push(sample.public_key);
            }
        }
        silent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: PublicKey = PublicKey([7; 32]);

    /// A peer read every `CHECK_EVERY` from a start: each step gives its
    /// last handshake (seconds after the start) and the bytes sent so far.
    fn run(steps: &[(Option<u64>, u64)]) -> Vec<bool> {
        let start = Instant::now();
        let wall_start = SystemTime::now();
        let mut handshakes = Handshakes::new(start);
        steps
            .iter()
            .enumerate()
            .map(|(i, &(handshake, tx_bytes))| {
                let after = CHECK_EVERY * i as u32;
                let sample = PeerSample {
                    public_key: KEY,
                    last_handshake: handshake.map(|s| wall_start + Duration::from_secs(s)),
                    tx_bytes,
                };
                !handshakes
                    .observe(start + after, wall_start + after, &[sample])
                    .is_empty()
            })
            .collect()
    }

    /// Steps (one per `CHECK_EVERY`) up to `seconds`, sending `per_step`
    /// bytes each, with a handshake at 0 only.
    fn sending(seconds: u64, per_step: u64) -> Vec<(Option<u64>, u64)> {
        (0..=seconds / CHECK_EVERY.as_secs())
            .map(|i| (Some(0), i * per_step))
            .collect()
    }

    #[test]
    fn a_peer_sent_to_without_a_handshake_for_the_window_is_silent() {
        let silent = run(&sending(220, 148));
        let first = silent
            .iter()
            .position(|s| *s)
            .expect("silent at some point");
        let at = CHECK_EVERY * first as u32;
        assert!(
            at >= HANDSHAKE_WINDOW + ANSWER_WITHIN
                && at <= HANDSHAKE_WINDOW + ANSWER_WITHIN + CHECK_EVERY,
            "silent after {at:?}"
        );
        assert!(silent[first..].iter().all(|s| *s), "and stays so");
    }

    #[test]
    fn an_idle_peer_is_not_judged_by_its_age() {
        // A handshake at 0, traffic until 20 s, then nothing for minutes.
        let steps: Vec<_> = (0..100).map(|i| (Some(0), (i.min(4)) * 100)).collect();
        assert!(run(&steps).iter().all(|s| !s));
    }

    #[test]
    fn traffic_after_an_idle_spell_gets_its_handshake_in_time() {
        // Idle for 5 minutes, then traffic: the handshake it starts comes
        // at the next reading.
        let mut steps: Vec<_> = (0..60).map(|_| (Some(0), 100)).collect();
        steps.push((Some(0), 400));
        steps.extend((0..10).map(|i| (Some(301), 500 + i * 100)));
        assert!(run(&steps).iter().all(|s| !s));
    }

    #[test]
    fn a_new_handshake_ends_the_silence() {
        let mut steps = sending(220, 148);
        let n = steps.len() as u64;
        steps.extend((0..3).map(|i| (Some(n * 5 + i), (n + i) * 148)));
        let silent = run(&steps);
        assert!(silent[steps.len() - 4], "silent before");
        assert!(!silent[steps.len() - 3..].iter().any(|s| *s), "{silent:?}");
    }

    #[test]
    fn a_peer_never_answered_is_as_old_as_the_device() {
        let steps: Vec<_> = (0..45).map(|i| (None, i * 148)).collect();
        let silent = run(&steps);
        let first = silent
            .iter()
            .position(|s| *s)
            .expect("silent at some point");
        assert!(CHECK_EVERY * first as u32 >= HANDSHAKE_WINDOW + ANSWER_WITHIN);
    }

    #[test]
    fn a_handshake_from_before_the_device_counts_from_the_device() {
        // A device taken over with an hour-old handshake, sent to all along:
        // the window starts when it was made here.
        let start = Instant::now();
        let wall = SystemTime::now();
        let mut handshakes = Handshakes::new(start);
        let silent: Vec<bool> = (0..45u32)
            .map(|i| {
                let sample = PeerSample {
                    public_key: KEY,
                    last_handshake: Some(wall - Duration::from_secs(3600)),
                    tx_bytes: u64::from(i) * 148,
                };
                let after = CHECK_EVERY * i;
                !handshakes
                    .observe(start + after, wall + after, &[sample])
                    .is_empty()
            })
            .collect();
        let first = silent
            .iter()
            .position(|s| *s)
            .expect("silent at some point");
        assert_eq!(
            CHECK_EVERY * first as u32,
            HANDSHAKE_WINDOW + ANSWER_WITHIN,
            "{silent:?}"
        );
    }
}
