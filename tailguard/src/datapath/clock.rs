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

/// How far apart the two readings are: long enough that the jitter of a
/// tick (microseconds, in a VM tens of them) is well under 1 % of it.
const WINDOW: Duration = Duration::from_millis(20);

/// How long the jiffies may stand still before the measure gives up (a
/// tick is at most 10 ms, at 100 Hz).
const PATIENCE: Duration = Duration::from_secs(2);

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
    let read = || read(program);
    let first = after_a_tick(&read, read()?)?;
    // At least `WINDOW` later, again just after a tick.
    let mut last = first;
    while last.nanos < first.nanos + WINDOW.as_nanos() as u64 {
        last = read()?;
    }
    let second = after_a_tick(&read, last)?;
    clock_from(first, second).ok_or_else(stood_still)
}

/// The first reading after `from` in which the jiffies moved on.
fn after_a_tick(
    read: &impl Fn() -> Result<Reading, Error>,
    from: Reading,
) -> Result<Reading, Error> {
    loop {
        let now = read()?;
        if now.jiffies != from.jiffies {
            return Ok(now);
        }
        if now.nanos > from.nanos + PATIENCE.as_nanos() as u64 {
            return Err(stood_still());
        }
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
}
