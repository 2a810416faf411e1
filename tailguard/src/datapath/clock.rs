//! The connection table's clock (`tailguard_common::config::Clock`): the
//! programs count whole seconds of `CLOCK_MONOTONIC` from the kernel's
//! jiffies, which cost them no helper call. How fast jiffies tick
//! (`CONFIG_HZ`) no interface reports, so it is measured here: the
//! `tg_clock` program, run through `BPF_PROG_TEST_RUN`, reads the jiffies
//! and the monotonic clock together, and two readings taken just after the
//! jiffies moved, some milliseconds apart, give the rate.

use std::time::Duration;

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use tailguard_common::config::Clock;

use super::{Error, object};

pub(super) const PROGRAM: &str = "tg_clock";

/// The least time between the two readings.
const WINDOW: Duration = Duration::from_millis(100);

/// How precisely the rate is measured: a reading just after a tick is late
/// by at most the time since the reading before it (on a busy machine a
/// preempted reader makes that milliseconds), so the two readings are taken
/// far enough apart that their lateness together is at most this part of
/// the time between them.
const PRECISION: u64 = 100;

/// How many ticks the first reading is chosen from (the one seen most
/// closely).
const FIRST_OF: usize = 5;

/// How long the measure may take before it gives up (a tick is at most
/// 10 ms, at 100 Hz).
const PATIENCE: Duration = Duration::from_secs(5);

/// How many times a rate that is no kernel's is measured again before it
/// is taken as it is: a tick that came late (a virtual CPU not running)
/// skews one measure, rarely two.
const ATTEMPTS: usize = 4;

/// The rates kernels are built with (`CONFIG_HZ`): a measure within 3 % of
/// one is that one.
const KNOWN_HZ: [u32; 8] = [100, 250, 300, 1000, 24, 48, 128, 1200];

/// Whole seconds of `CLOCK_MONOTONIC` now.
pub fn monotonic_seconds() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| t.tv_sec() as u32)
}

/// One reading of `tg_clock`: the jiffies, and the monotonic clock's
/// nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    pub jiffies: u64,
    pub nanos: u64,
}

/// Loads `tg_clock` (once per object) and measures the clock with it.
pub(super) fn measure(ebpf: &mut Ebpf) -> Result<Clock, Error> {
    let program: &mut SchedClassifier = ebpf
        .program_mut(PROGRAM)
        .ok_or_else(|| object::missing(PROGRAM))?
        .try_into()
        .map_err(|e| object::program_error(PROGRAM, e))?;
    program
        .load()
        .map_err(|e| object::program_error(PROGRAM, e))?;
    measure_with(|| read(program))
}

/// The measure itself, from any source of readings.
fn measure_with(read: impl Fn() -> Result<Reading, Error>) -> Result<Clock, Error> {
    let give_up = read()?.nanos + PATIENCE.as_nanos() as u64;
    let mut clock = None;
    for _ in 0..ATTEMPTS {
        let mut first = tick_edge(&read, give_up)?;
        for _ in 1..FIRST_OF {
            first = first.min_by_lateness(tick_edge(&read, give_up)?);
        }
        let second = loop {
            let edge = tick_edge(&read, give_up)?;
            let apart = edge.reading.nanos - first.reading.nanos;
            if apart >= WINDOW.as_nanos() as u64 && (first.late + edge.late) * PRECISION <= apart {
                break edge;
            }
        };
        let measured = clock_from(first.reading, second.reading).ok_or_else(stood_still)?;
        if KNOWN_HZ.contains(&measured.hz) {
            return Ok(measured);
        }
        clock = Some(measured);
    }
    clock.ok_or_else(stood_still)
}

/// A reading just after a tick, and how late it may be: the time since the
/// reading before it, in which the tick came.
#[derive(Clone, Copy)]
struct Edge {
    reading: Reading,
    late: u64,
}

impl Edge {
    fn min_by_lateness(self, other: Edge) -> Edge {
        if other.late < self.late { other } else { self }
    }
}

/// The next tick's edge, or an error once the monotonic clock passes
/// `give_up`.
fn tick_edge(read: &impl Fn() -> Result<Reading, Error>, give_up: u64) -> Result<Edge, Error> {
    let mut before = read()?;
    loop {
        let now = read()?;
        if now.jiffies != before.jiffies {
            return Ok(Edge {
                reading: now,
                late: now.nanos - before.nanos,
            });
        }
        if now.nanos > give_up {
            return Err(stood_still());
        }
        before = now;
    }
}

fn stood_still() -> Error {
    Error::ClockStoodStill {
        probe: PROGRAM,
        seconds: PATIENCE.as_secs(),
    }
}

fn read(program: &SchedClassifier) -> Result<Reading, Error> {
    // A test run needs at least an Ethernet header's worth of packet.
    let input = [0u8; 64];
    let mut output = [0u8; 64];
    program
        .test_run(TestRunOptions {
            data_in: Some(&input),
            data_out: Some(&mut output),
            ..Default::default()
        })
        .map_err(|e| object::program_error(PROGRAM, e))?;
    let word = |at: usize| u64::from_ne_bytes(output[at..at + 8].try_into().expect("8 bytes"));
    Ok(Reading {
        jiffies: word(0),
        nanos: word(8),
    })
}

/// The clock from two readings, each taken just after a tick: the rate,
/// rounded to the kernel's own if it is a known one, and the jiffies at
/// monotonic zero. `None` if the jiffies did not move between them.
pub fn clock_from(first: Reading, second: Reading) -> Option<Clock> {
    let ticks = second.jiffies.checked_sub(first.jiffies)?;
    let nanos = second.nanos.checked_sub(first.nanos)?;
    if ticks == 0 || nanos == 0 {
        return None;
    }
    let measured = ticks as f64 * 1e9 / nanos as f64;
    let hz = KNOWN_HZ
        .into_iter()
        .find(|&known| (measured / f64::from(known) - 1.0).abs() < 0.03)
        .unwrap_or(measured.round().max(1.0) as u32);
    let ticks_since_zero = (u128::from(second.nanos) * u128::from(hz) / 1_000_000_000) as u64;
    Some(Clock {
        zero: second.jiffies.wrapping_sub(ticks_since_zero),
        hz,
        _pad: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readings of a kernel ticking `hz` times a second whose jiffies stood
    /// at `zero` at monotonic zero, at `nanos`.
    fn reading(hz: u64, zero: u64, nanos: u64) -> Reading {
        Reading {
            jiffies: zero.wrapping_add(nanos * hz / 1_000_000_000),
            nanos,
        }
    }

    #[test]
    fn the_rate_and_zero_are_those_of_the_kernel_measured() {
        // Jiffies start 5 minutes before they wrap, as the kernel starts
        // them (INITIAL_JIFFIES).
        for hz in [100u64, 250, 300, 1000] {
            let zero = (u32::MAX as u64).wrapping_sub(300 * hz);
            let at = 3_600_000_000_000u64; // an hour after boot
            let tick = 1_000_000_000 / hz;
            let first = reading(hz, zero, at + 1_000);
            let second = reading(hz, zero, at + 2 * tick + 20_000_000 + 3_000);
            let clock = clock_from(first, second).expect("the jiffies moved");
            assert_eq!(u64::from(clock.hz), hz);
            assert!(
                clock.zero.abs_diff(zero) <= 1,
                "zero {} vs {zero}",
                clock.zero
            );
            // The programs' seconds are the monotonic clock's.
            let later = reading(hz, zero, at + 7_200_000_000_000);
            assert_eq!(clock.seconds(later.jiffies), 3600 + 7200);
        }
    }

    #[test]
    fn an_unknown_rate_is_rounded() {
        let first = Reading {
            jiffies: 1000,
            nanos: 1_000_000_000,
        };
        let second = Reading {
            jiffies: 1042 + 1000,
            nanos: 2_000_000_000,
        };
        assert_eq!(clock_from(first, second).map(|c| c.hz), Some(1042));
    }

    #[test]
    fn jiffies_that_did_not_move_give_no_clock() {
        let r = Reading {
            jiffies: 7,
            nanos: 10,
        };
        assert_eq!(clock_from(r, Reading { nanos: 20, ..r }), None);
        assert_eq!(clock_from(r, r), None);
    }

    /// A source of readings, read every 2 µs, from a kernel whose jiffies
    /// at a monotonic nanosecond `jiffies_at` gives, except that the reader
    /// is preempted for `stall` nanoseconds across the ticks (counted from
    /// the first reading) that `stalled` picks.
    fn reader(
        jiffies_at: impl Fn(u64) -> u64,
        stall: u64,
        stalled: impl Fn(u64) -> bool,
    ) -> impl Fn() -> Result<Reading, Error> {
        const STEP: u64 = 2_000;
        let now = std::cell::Cell::new(1_000_000_000u64);
        let ticks = std::cell::Cell::new(0u64);
        move || {
            let before = now.get();
            let mut at = before + STEP;
            if jiffies_at(at) != jiffies_at(before) {
                ticks.set(ticks.get() + 1);
                if stalled(ticks.get()) {
                    at += stall;
                }
            }
            now.set(at);
            Ok(Reading {
                jiffies: jiffies_at(at),
                nanos: at,
            })
        }
    }

    fn steady(hz: u64) -> impl Fn(u64) -> u64 {
        move |nanos| reading(hz, 0, nanos).jiffies
    }

    #[test]
    fn a_reader_preempted_across_a_tick_does_not_skew_the_rate() {
        // At 100 Hz a reading 9 ms late at one end of the measure and not
        // at the other makes the rate 8 % off, no kernel's. Late at the
        // start: the first reading is the most punctual of the first ticks.
        let clock = measure_with(reader(steady(100), 9_000_000, |t| t <= 4)).expect("a clock");
        assert_eq!(clock.hz, 100);
        // Late at the end but for one tick in ten: the second reading waits
        // for one seen closely.
        let stalled = |t: u64| t > 5 && t % 10 != 3;
        let clock = measure_with(reader(steady(100), 9_000_000, stalled)).expect("a clock");
        assert_eq!(clock.hz, 100);
    }

    #[test]
    fn a_rate_no_kernel_has_is_measured_again() {
        // Ticks that came late for the first half second (a virtual CPU that
        // did not run) skew the first measure; the second is the kernel's.
        let lagging = |nanos: u64| {
            let early = nanos.min(1_300_000_000);
            let late = nanos - early;
            early * 90 / 1_000_000_000 + late * 100 / 1_000_000_000
        };
        let clock = measure_with(reader(lagging, 0, |_| false)).expect("a clock");
        assert_eq!(clock.hz, 100);
    }

    #[test]
    fn a_reader_late_on_every_tick_measures_over_longer() {
        // 9 ms late on every tick: 1 % precise once the readings are 1.8 s
        // apart.
        let clock = measure_with(reader(steady(100), 9_000_000, |_| true)).expect("a clock");
        assert_eq!(clock.hz, 100);
    }

    #[test]
    fn jiffies_that_stand_still_give_up() {
        let err = measure_with(reader(|_| 7, 0, |_| false)).unwrap_err();
        assert!(err.to_string().contains("did not move"), "{err}");
    }
}
