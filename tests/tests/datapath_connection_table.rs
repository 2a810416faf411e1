//! The connection table (`tailguard_common::nat`) run by the kernel on
//! crafted frames (`BPF_PROG_TEST_RUN`): a flow's pair holds its port
//! however idle one half is, a full table refuses new flows and keeps every
//! live one, two CPUs racing on one tuple end with one pair, a half-closed
//! connection keeps both directions, a reset tuple opened again is a fresh
//! flow, a source's unreplied flows are capped, and a half found missing is
//! made again or the flow ended. Time-based expiry is the sweeper's, judged
//! on the table read back (`sweeper::plan`) at chosen clock readings.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};

use tailguard::datapath::{
    Datapath, LinkLayer, LoadOptions,
    sweeper::{self, Totals},
};
use tailguard_common::{
    Device, Outcome,
    nat::{FlowKey, FlowState, NAT_MIN_FLOWS, NAT_PORT_FIRST, SourceKey, TableEvent, TableSize},
    wire::tcp::{ACK, FIN, RST, SYN},
};
use tailguard_tests::{crafted::*, topology::TS4};

const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 66, 0, 8);
const SERVICE: u16 = 443;

/// A datagram (or TCP segment) from `client:sport` to the tailnet peer's
/// service, as it arrives from WireGuard.
fn from_client(client: Ipv4Addr, sport: u16, l4: L4) -> Vec<u8> {
    frame(client.into(), PEER4.into(), sport, SERVICE, l4, 64)
}

/// The service's answer to the node's translated `port`, as it arrives
/// from the tailnet.
fn answer(port: u16, l4: L4) -> Vec<u8> {
    frame(PEER4.into(), TS4.into(), SERVICE, port, l4, 64)
}

/// The key of `client:sport`'s packets to the service, arriving on
/// WireGuard.
fn origin_key(client: Ipv4Addr, sport: u16, proto: u8) -> FlowKey {
    let mut key = FlowKey {
        sport: sport.to_be(),
        dport: SERVICE.to_be(),
        proto,
        ingress: Device::WireGuard as u8,
        family: 4,
        ..FlowKey::default()
    };
    key.src[..4].copy_from_slice(&client.octets());
    key.dst[..4].copy_from_slice(&PEER4.octets());
    key
}

fn event(dp: &Datapath, event: TableEvent) -> u64 {
    dp.table_events().unwrap().get(event)
}

/// Sends `frame` from WireGuard and says which port it left with.
fn forwarded_port(dp: &Datapath, frame: &[u8]) -> u16 {
    let out = run(dp, Device::WireGuard, frame);
    assert_eq!(out.verdict, REDIRECT, "forwarded");
    out.assert_checksums();
    out.ports().0
}

/// `answer` reaches `client:sport`, checksums valid.
fn assert_reaches(dp: &Datapath, answer: &[u8], client: Ipv4Addr, sport: u16) {
    let out = run(dp, Device::Tailscale, answer);
    assert_eq!(out.verdict, REDIRECT, "the answer is forwarded");
    out.assert_checksums();
    assert_eq!(out.ip().1, std::net::IpAddr::from(client), "to its client");
    assert_eq!(out.ports().1, sport, "to its client's port");
}

fn tcp_state(dp: &Datapath, client: Ipv4Addr, sport: u16) -> FlowState {
    let key = origin_key(client, sport, 6);
    dp.half(&key)
        .unwrap()
        .expect("the flow's origin half")
        .meta
        .flow_state()
}

/// The flow's SYN, SYN-ACK and ACK through the fast path; its port.
fn handshake(dp: &Datapath, client: Ipv4Addr, sport: u16) -> u16 {
    let port = forwarded_port(dp, &from_client(client, sport, L4::Tcp(SYN)));
    assert_reaches(dp, &answer(port, L4::Tcp(SYN | ACK)), client, sport);
    forwarded_port(dp, &from_client(client, sport, L4::Tcp(ACK)));
    assert_eq!(tcp_state(dp, client, sport), FlowState::Established);
    port
}

/// A one-way flow's reply half idle since boot (a syslog or statsd
/// stream, whose server never answers) while its client keeps sending:
/// its port is never handed to another flow, even when it is the only
/// port left, and the server's answer still reaches only its client.
#[test]
fn a_live_flow_keeps_its_port_however_idle_its_reply_half() {
    let mut dp = datapath(false);
    let port = forwarded_port(&dp, &from_client(CLIENT4, 30000, L4::Udp));
    let reply = reply_key(port);
    let mut idle = dp.half(&reply).unwrap().expect("the reply half");
    idle.last_seen = 0;
    dp.insert_half(&reply, &idle, false).unwrap();
    // The client sends on; every other port is held by others.
    forwarded_port(&dp, &from_client(CLIENT4, 30000, L4::Udp));
    for p in (NAT_PORT_FIRST..=u16::MAX).filter(|p| *p != port) {
        dp.insert_half(&reply_key(p), &reply_half_to(OTHER_CLIENT, 1), false)
            .unwrap();
    }
    let (taken, no_port) = (
        event(&dp, TableEvent::PortsTaken),
        outcome_count(&dp, Device::WireGuard, Outcome::KernelNoPort),
    );
    // Each newcomer tries 16 ports from a random start: 3000 of them try
    // the idle flow's port too, all but surely (1 - 16/4536)^3000 < 1e-4.
    const NEWCOMERS: u16 = 3000;
    for i in 0..NEWCOMERS {
        let newcomer = from_client(OTHER_CLIENT, 31000 + i, L4::Udp);
        let out = run(&dp, Device::WireGuard, &newcomer);
        assert_eq!(
            (out.verdict, &out.frame),
            (CONTINUE, &newcomer),
            "newcomer {i}: no port, the kernel's"
        );
    }
    assert_eq!(
        event(&dp, TableEvent::PortsTaken),
        taken + u64::from(NEWCOMERS)
    );
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelNoPort),
        no_port + u64::from(NEWCOMERS)
    );
    assert_reaches(&dp, &answer(port, L4::Udp), CLIENT4, 30000);
    // The sweeper keeps the pair: its origin half is live.
    sweeper::sweep(&mut dp, &mut Totals::default()).unwrap();
    assert!(dp.half(&reply).unwrap().is_some(), "the pair is kept whole");
    assert!(dp.half(&origin_key(CLIENT4, 30000, 17)).unwrap().is_some());
}

/// A table filled with answered flows refuses the next new flow (to the
/// kernel, counted as `table-full`) and keeps every one of its flows.
#[test]
fn a_full_table_refuses_new_flows_and_keeps_every_live_one() {
    let size = TableSize {
        v4_flows: NAT_MIN_FLOWS,
        v6_flows: NAT_MIN_FLOWS,
        unreplied_per_source: 0,
    };
    let dp = datapath_with(
        LoadOptions {
            nat: size,
            ..LoadOptions::uniform(LinkLayer::Ethernet)
        },
        false,
    );
    let flows: Vec<(u16, u16)> = (0..NAT_MIN_FLOWS as u16)
        .map(|i| {
            let sport = 20000 + i;
            let port = forwarded_port(&dp, &from_client(CLIENT4, sport, L4::Udp));
            assert_reaches(&dp, &answer(port, L4::Udp), CLIENT4, sport);
            (sport, port)
        })
        .collect();
    let mut before: Vec<FlowKey> = dp.halves().unwrap().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        before.len(),
        2 * NAT_MIN_FLOWS as usize,
        "two halves a flow"
    );
    let (full, refused) = (
        event(&dp, TableEvent::TableFull),
        outcome_count(&dp, Device::WireGuard, Outcome::KernelTableFull),
    );
    let newcomer = from_client(OTHER_CLIENT, 40000, L4::Udp);
    let out = run(&dp, Device::WireGuard, &newcomer);
    assert_eq!((out.verdict, &out.frame), (CONTINUE, &newcomer), "refused");
    assert_eq!(event(&dp, TableEvent::TableFull), full + 1);
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelTableFull),
        refused + 1
    );
    let mut after: Vec<FlowKey> = dp.halves().unwrap().into_iter().map(|(k, _)| k).collect();
    before.sort_by_key(sort_key);
    after.sort_by_key(sort_key);
    assert_eq!(before, after, "no flow lost its place");
    for &(sport, port) in [flows[0], flows[flows.len() / 2], flows[flows.len() - 1]].iter() {
        assert_reaches(&dp, &answer(port, L4::Udp), CLIENT4, sport);
    }
}

fn sort_key(k: &FlowKey) -> ([u8; 16], [u8; 16], u16, u16, u8, u8) {
    (k.src, k.dst, k.sport, k.dport, k.proto, k.ingress)
}

/// The first packets of many flows, each sent by two threads on two CPUs
/// at once (a spin barrier before each): every flow ends with exactly one
/// pair, both threads' packets leave with its port, and no half is left
/// without its other half.
#[test]
fn two_cpus_racing_on_one_tuple_end_with_one_pair() {
    const FLOWS: u16 = 20_000;
    let dp = datapath(false);
    let arrived = AtomicU64::new(0);
    let ports: Vec<Vec<u16>> = std::thread::scope(|scope| {
        let racers: Vec<_> = (0..2)
            .map(|cpu| {
                let (dp, arrived) = (&dp, &arrived);
                scope.spawn(move || {
                    let mut set = nix::sched::CpuSet::new();
                    set.set(cpu).expect("a CPU number");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                        .expect("pinning the racer to its CPU (the test needs two)");
                    (0..FLOWS)
                        .map(|i| {
                            // Both racers in, then both go.
                            let generation = u64::from(i) * 2;
                            arrived.fetch_add(1, Ordering::SeqCst);
                            let since = std::time::Instant::now();
                            while arrived.load(Ordering::SeqCst) < generation + 2 {
                                assert!(
                                    since.elapsed().as_secs() < 10,
                                    "the other racer stopped (it failed)"
                                );
                                std::hint::spin_loop();
                            }
                            // A service port of its own for each flow: one
                            // service's reply tuples hold only 4536 ports.
                            let flow = frame(
                                CLIENT4.into(),
                                PEER4.into(),
                                10000 + i,
                                1000 + i,
                                L4::Udp,
                                64,
                            );
                            forwarded_port(dp, &flow)
                        })
                        .collect()
                })
            })
            .collect();
        racers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    let lost = event(&dp, TableEvent::RaceLost);
    println!("{FLOWS} flows raced: {lost} races lost (and their flows adopted)");
    for (i, (first, second)) in ports[0].iter().zip(&ports[1]).enumerate() {
        assert_eq!(first, second, "flow {i}: one port for both CPUs");
    }
    let halves = dp.halves().unwrap();
    assert_eq!(halves.len(), 2 * FLOWS as usize, "one pair a flow");
    let cfg = dp.config().unwrap();
    let plan = sweeper::plan(&halves, &cfg, sweeper::now() + 3600);
    assert_eq!(plan.orphans.len(), 0, "no reply half alone");
    assert!(
        plan.expired.iter().all(|e| e.reply.is_some()),
        "no origin half alone"
    );
    assert!(lost > 0, "the racers never raced: the test proves nothing");
}

/// A FIN from the client leaves a half-closed connection: both directions
/// still go through, and the pair lives for the FIN timeout (120 s, the
/// kernel's `FIN_WAIT`), not the 10 s of a closed one.
#[test]
fn a_half_closed_connection_keeps_both_directions_for_the_fin_timeout() {
    let dp = datapath(false);
    let port = handshake(&dp, CLIENT4, 40000);
    forwarded_port(&dp, &from_client(CLIENT4, 40000, L4::Tcp(FIN | ACK)));
    assert_eq!(tcp_state(&dp, CLIENT4, 40000), FlowState::FinFromOrigin);
    // The server still sends, the client still acknowledges.
    assert_reaches(&dp, &answer(port, L4::Tcp(ACK)), CLIENT4, 40000);
    forwarded_port(&dp, &from_client(CLIENT4, 40000, L4::Tcp(ACK)));
    assert_eq!(tcp_state(&dp, CLIENT4, 40000), FlowState::FinFromOrigin);
    let cfg = dp.config().unwrap();
    let now = sweeper::now();
    let halves = dp.halves().unwrap();
    assert!(sweeper::plan(&halves, &cfg, now + 119).expired.is_empty());
    let expired = sweeper::plan(&halves, &cfg, now + 121).expired;
    assert_eq!(expired.len(), 1);
    assert!(expired[0].reply.is_some(), "both halves go together");
    // The server's FIN closes it both ways.
    assert_reaches(&dp, &answer(port, L4::Tcp(FIN | ACK)), CLIENT4, 40000);
    assert_eq!(tcp_state(&dp, CLIENT4, 40000), FlowState::LastAck);
}

/// A reset connection whose client opens it again on the same ports: a
/// fresh flow (SYN_SENT and its timeout, counted as `reopened`), not the
/// closing one's 10 s.
#[test]
fn a_reset_then_a_syn_on_the_same_tuple_starts_a_fresh_flow() {
    let dp = datapath(false);
    let port = handshake(&dp, CLIENT4, 40001);
    assert_reaches(&dp, &answer(port, L4::Tcp(RST | ACK)), CLIENT4, 40001);
    assert_eq!(tcp_state(&dp, CLIENT4, 40001), FlowState::Close);
    let cfg = dp.config().unwrap();
    let now = sweeper::now();
    assert_eq!(
        sweeper::plan(&dp.halves().unwrap(), &cfg, now + 11)
            .expired
            .len(),
        1,
        "closed: 10 s"
    );
    let reopened = event(&dp, TableEvent::Reopened);
    let again = forwarded_port(&dp, &from_client(CLIENT4, 40001, L4::Tcp(SYN)));
    assert_eq!(again, port, "the pair, and so its port, carries on");
    assert_eq!(tcp_state(&dp, CLIENT4, 40001), FlowState::SynSent);
    assert_eq!(event(&dp, TableEvent::Reopened), reopened + 1);
    assert!(
        sweeper::plan(&dp.halves().unwrap(), &cfg, now + 11)
            .expired
            .is_empty(),
        "a fresh flow's timeout"
    );
    assert_reaches(&dp, &answer(port, L4::Tcp(SYN | ACK)), CLIENT4, 40001);
}

/// One source's unreplied flows are capped (here at 8): its next new flow
/// is refused (to the kernel, counted), another source's is not, and an
/// answer gives one back. The sweeper's recount agrees with the programs'.
#[test]
fn one_source_holds_at_most_its_unreplied_budget() {
    const BUDGET: u32 = 8;
    let mut dp = datapath(false);
    let mut cfg = dp.config().unwrap();
    cfg.unreplied_per_source = BUDGET;
    dp.write_config(&cfg).unwrap();
    let ports: Vec<u16> = (0..BUDGET as u16)
        .map(|i| forwarded_port(&dp, &from_client(CLIENT4, 20000 + i, L4::Udp)))
        .collect();
    let (over, outcome) = (
        event(&dp, TableEvent::OverBudget),
        outcome_count(&dp, Device::WireGuard, Outcome::KernelOverBudget),
    );
    let one_more = from_client(CLIENT4, 29999, L4::Udp);
    let out = run(&dp, Device::WireGuard, &one_more);
    assert_eq!(
        (out.verdict, &out.frame),
        (CONTINUE, &one_more),
        "over budget"
    );
    assert_eq!(event(&dp, TableEvent::OverBudget), over + 1);
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelOverBudget),
        outcome + 1
    );
    // A SYN refused so is the kernel's, and so is its retransmission: its
    // connection is never split between the kernel's port and one of ours.
    let syn = from_client(CLIENT4, 29997, L4::Tcp(SYN));
    assert_eq!(run(&dp, Device::WireGuard, &syn).verdict, CONTINUE);
    let tracked = outcome_count(&dp, Device::WireGuard, Outcome::KernelTrackedFlow);
    assert_eq!(run(&dp, Device::WireGuard, &syn).verdict, CONTINUE);
    assert_eq!(
        outcome_count(&dp, Device::WireGuard, Outcome::KernelTrackedFlow),
        tracked + 1,
        "the retransmitted SYN: the kernel's flow"
    );
    forwarded_port(&dp, &from_client(OTHER_CLIENT, 20000, L4::Udp));
    // An answer: that flow is replied, and its budget is back.
    assert_reaches(&dp, &answer(ports[0], L4::Udp), CLIENT4, 20000);
    forwarded_port(&dp, &from_client(CLIENT4, 29998, L4::Udp));
    let source = SourceKey::of(&origin_key(CLIENT4, 0, 17));
    assert_eq!(dp.sources().unwrap().get(&source), Some(&i64::from(BUDGET)));
    // Miscounted (as a race between a program and a sweep could leave
    // it): the sweeper's recount from the flows puts it right.
    dp.set_source(&source, 1).unwrap();
    sweeper::sweep(&mut dp, &mut Totals::default()).unwrap();
    assert_eq!(dp.sources().unwrap().get(&source), Some(&i64::from(BUDGET)));
}

/// A flow whose reply half went missing: the next packet (in a new
/// second) makes it again and the answers come back; if its port has been
/// taken meanwhile, the flow is ended instead (its half removed, counted)
/// and the next packet starts a new flow with another port.
#[test]
fn a_missing_half_is_made_again_or_its_flow_ended() {
    let mut dp = datapath(false);
    let origin = origin_key(CLIENT4, 30001, 17);
    let port = forwarded_port(&dp, &from_client(CLIENT4, 30001, L4::Udp));
    let step_back = |dp: &mut Datapath| {
        let mut half = dp.half(&origin).unwrap().expect("the origin half");
        half.last_seen -= 5;
        dp.insert_half(&origin, &half, false).unwrap();
    };
    assert!(dp.remove_half(&reply_key(port)).unwrap());
    step_back(&mut dp);
    let repaired = event(&dp, TableEvent::Repaired);
    assert_eq!(
        forwarded_port(&dp, &from_client(CLIENT4, 30001, L4::Udp)),
        port
    );
    assert_eq!(event(&dp, TableEvent::Repaired), repaired + 1);
    assert_reaches(&dp, &answer(port, L4::Udp), CLIENT4, 30001);

    assert!(dp.remove_half(&reply_key(port)).unwrap());
    dp.insert_half(&reply_key(port), &reply_half_to(OTHER_CLIENT, 7), false)
        .unwrap();
    step_back(&mut dp);
    let ended = event(&dp, TableEvent::Ended);
    let out = run(
        &dp,
        Device::WireGuard,
        &from_client(CLIENT4, 30001, L4::Udp),
    );
    assert_eq!(
        out.verdict, CONTINUE,
        "the broken flow's packet: the kernel's"
    );
    assert_eq!(event(&dp, TableEvent::Ended), ended + 1);
    assert_eq!(dp.half(&origin).unwrap(), None, "its origin half is gone");
    let fresh = forwarded_port(&dp, &from_client(CLIENT4, 30001, L4::Udp));
    assert_ne!(fresh, port, "a new flow, a free port");
}

/// The programs' clock (jiffies, at the rate the daemon measured) is the
/// sweeper's: a new flow's halves are stamped with the monotonic second it
/// went through, and a packet seconds later moves the stamp on by as much.
#[test]
fn the_programs_stamp_flows_with_the_sweepers_clock() {
    let dp = datapath(false);
    let before = sweeper::now();
    let port = forwarded_port(&dp, &from_client(CLIENT4, 31000, L4::Udp));
    let after = sweeper::now();
    let stamp = |dp: &Datapath| {
        dp.half(&origin_key(CLIENT4, 31000, 17))
            .unwrap()
            .expect("the origin half")
            .last_seen
    };
    let first = stamp(&dp);
    assert!(
        (before..=after).contains(&first),
        "stamped {first}, the monotonic clock read {before}..={after}"
    );
    let reply = dp.half(&reply_key(port)).unwrap().expect("the reply half");
    assert_eq!(reply.last_seen, first, "both halves at once");
    std::thread::sleep(std::time::Duration::from_millis(2100));
    forwarded_port(&dp, &from_client(CLIENT4, 31000, L4::Udp));
    let moved = stamp(&dp) - first;
    assert!(
        (2..=3).contains(&moved),
        "2.1 s later the stamp moved {moved} s"
    );
}
