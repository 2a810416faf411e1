//! The two datapaths agree: the same topology, the same generated traffic
//! (random tuples across TCP, UDP and ICMP echo, both families, every
//! direction, sizes around each MTU, fragments, IPv4 options, IPv6
//! extension headers, ICMP errors about live flows, well-formed and not,
//! UDP with checksum 0, flows the kernel saw start), run once with
//! `TG_DATAPATH=netfilter` and once with `ebpf`; every packet's fate —
//! whether and where it arrived, with which addresses, ports (translation
//! ports by their role, see `tailguard_tests::differential::fate`), flags,
//! sizes and checksums, which ICMP came back — must be the same.
//!
//! `DIFF_SEED` picks the cases (default 14, printed), `DIFF_CASES` how
//! many (default 100; more for a long run), `DIFF_REPORT` names a file for
//! the differences found, as markdown. `DIFF_DATAPATHS=ebpf,ebpf` (or
//! `netfilter,netfilter`) runs one datapath twice: what differs then is
//! the test's own noise, which must be none.

use std::fmt::Write as _;

use tailguard_tests::differential::{
    self,
    cases::{Case, Proto, Shape, generate},
};

/// What may differ on purpose, each with the reason (README lists them
/// too): the fate lines it matches are left out of both datapaths' fates
/// before they are compared, the rest of the case still is. Keep it short:
/// anything here is a place where a user sees the fast path behave unlike
/// the kernel.
const ON_PURPOSE: &[OnPurpose] = &[
    OnPurpose {
        what: "ICMP redirects for wg -> wg",
        ignores: |_, line| is_redirect(line),
        why: "the kernel sends one when it forwards a packet out of the device it came in on \
          (send_redirects); the fast path does not. On a WireGuard device a redirect \
          changes nothing: the peer a packet goes to is chosen by AllowedIPs, not by a \
          gateway",
    },
    OnPurpose {
        what: "a TCP SYN cut into fragments inside its header",
        ignores: |case, _| is_tiny_fragment(case),
        why: "RFC 1858's tiny fragments: the fast path drops a first fragment too short for its \
          transport header (drop:tiny-fragment), the kernel reassembles it",
    },
];

/// A TCP case whose first packet is cut into fragments: the generator cuts
/// an L4 header in half, and a SYN's header is longer than half of it.
fn is_tiny_fragment(case: &Case) -> bool {
    case.proto == Proto::Tcp && case.shape == Shape::Fragments
}

/// An ICMP (type 5) or ICMPv6 (type 137) redirect, as `fate` writes it.
fn is_redirect(line: &str) -> bool {
    (line.contains(": v4 ") && line.contains(" icmp 5/"))
        || (line.contains(": v6 ") && line.contains(" icmp 137/"))
}

struct OnPurpose {
    what: &'static str,
    ignores: fn(&Case, &str) -> bool,
    why: &'static str,
}

/// A case's fates without the lines that may differ on purpose.
fn compared(case: &Case, fates: &[Vec<String>]) -> Vec<Vec<String>> {
    fates
        .iter()
        .map(|step| {
            step.iter()
                .filter(|line| !ON_PURPOSE.iter().any(|o| (o.ignores)(case, line)))
                .cloned()
                .collect()
        })
        .collect()
}

fn setting(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

#[test]
fn both_datapaths_give_every_packet_the_same_fate() {
    tailguard_tests::require_root();
    let seed = setting("DIFF_SEED", 14);
    let count = setting("DIFF_CASES", 100) as usize;
    eprintln!("differential: seed {seed} (DIFF_SEED), {count} cases (DIFF_CASES)");
    let cases = generate(seed, count);
    // Every kind of traffic the issue names is among the cases (a short
    // run, for a look at a few cases, may miss some).
    let full = count >= 100;
    for (what, present) in [
        (
            "fragments",
            cases.iter().any(|c| c.shape == Shape::Fragments),
        ),
        (
            "IPv4 options",
            cases.iter().any(|c| matches!(c.shape, Shape::Options(_))),
        ),
        (
            "IPv6 extension headers",
            cases
                .iter()
                .any(|c| matches!(c.shape, Shape::Extensions(_))),
        ),
        (
            "UDP checksum 0 over IPv6",
            cases.iter().any(|c| c.shape == Shape::ZeroChecksum && c.v6),
        ),
        ("isolated peers", cases.iter().any(|c| c.isolate)),
    ] {
        assert!(
            present || !full,
            "seed {seed} with {count} cases draws no {what}: more cases"
        );
    }

    let started = std::time::Instant::now();
    let datapaths = std::env::var("DIFF_DATAPATHS").unwrap_or("netfilter,ebpf".into());
    let Some((first, second)) = datapaths.split_once(',') else {
        panic!("DIFF_DATAPATHS={datapaths:?}: two datapaths, comma-separated");
    };
    let kernel = differential::run(first, &cases);
    let fast = differential::run(second, &cases);
    eprintln!(
        "differential: both datapaths in {} s",
        started.elapsed().as_secs()
    );

    let mut differences = String::new();
    let mut count_differing = 0;
    for case in &cases {
        let (k, f) = (
            &compared(case, &kernel[case.index]),
            &compared(case, &fast[case.index]),
        );
        if k == f {
            continue;
        }
        count_differing += 1;
        writeln!(differences, "\n### {case}\n").unwrap();
        for (step, (ks, fs)) in k.iter().zip(f).enumerate() {
            let mark = if ks == fs { "same" } else { "DIFFERENT" };
            writeln!(differences, "step {step} ({mark}):").unwrap();
            writeln!(differences, "  {first}:").unwrap();
            for line in ks {
                writeln!(differences, "    {line}").unwrap();
            }
            writeln!(differences, "  {second}:").unwrap();
            for line in fs {
                writeln!(differences, "    {line}").unwrap();
            }
        }
    }
    if let Ok(path) = std::env::var("DIFF_REPORT") {
        let report = format!("seed {seed}, {count} cases, {count_differing} differ\n{differences}");
        std::fs::write(&path, report).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    let on_purpose: Vec<_> = ON_PURPOSE
        .iter()
        .map(|o| format!("{} ({})", o.what, o.why))
        .collect();
    assert!(
        differences.is_empty(),
        "{count_differing} of {count} cases differ between the datapaths \
         (seed {seed}, DIFF_SEED={seed} repeats them; differing on purpose: {on_purpose:?}):\n{differences}"
    );
}
