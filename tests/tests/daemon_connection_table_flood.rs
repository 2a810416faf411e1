//! The connection table under a flood (issue 16), with real traffic: one
//! WireGuard peer sends new UDP tuples and TCP SYNs to the tailnet for 30 s
//! as fast as it can, while a second peer's TCP connection stays silent for
//! 60 s and then carries data, and a third peer's one-way UDP stream keeps
//! its translated port and alone gets the sparse answers to it.
//!
//! The table never evicts (its maps are plain hash maps): what it refuses —
//! the flooder's unreplied flows beyond its budget, any new flow while the
//! table is full — goes the kernel's way, counted; the flows it holds stay
//! until they expire.
//!
//! The peers: the flooder is the bridge's third WireGuard client
//! ([`MORE_WG_CLIENTS`]), the silent connection the WireGuard server's, the
//! stream the second WireGuard peer's.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use serde_json::Value;
use tailguard::report::{ConnectionTableReport, StatusReport};
use tailguard_common::nat::NAT_PORT_FIRST;
use tailguard_tests::{
    bridge::Bridge,
    daemon::{DaemonUnderTest, health, status},
    patience,
    topology::*,
    traffic::*,
};

/// The figures: the flood lasts 30 s, inside the connection's
/// minute of silence.
const FLOOD: Duration = Duration::from_secs(30);
const SILENCE: Duration = Duration::from_secs(60);
/// The flooder's budget of unreplied flows: far less than it sends in a
/// second, so that the budget certainly refuses some of its flows.
const UNREPLIED_PER_SOURCE: u64 = 512;
/// The stream: one datagram a second, every tenth answered.
const STREAM_INTERVAL: Duration = Duration::from_secs(1);
const ANSWER_EVERY: usize = 10;
/// The flood's destination ports: below Linux's ephemeral range, where the
/// tailnet's listeners have theirs, so that no flood packet reaches them.
const FLOOD_PORTS: std::ops::RangeInclusive<u16> = 1..=32767;
/// The flood's source ports start here, above the well-known ones.
const FLOOD_FIRST_SOURCE_PORT: u16 = 1024;

#[test]
fn a_flood_neither_breaks_an_idle_connection_nor_misdelivers_a_one_way_stream() {
    let b = Bridge::with_more_clients("flood", 1);
    let flooder = &b.more_clients[0];
    let flooder_address: Ipv4Addr = flooder.addresses.address.parse().unwrap();
    let tailnet_peer: Ipv4Addr = TAILNET_PEER.parse().unwrap();
    let echo = b.tailnet.run(Echo::listen);
    let listener = b.tailnet.run(|| UdpEcho::answering_every(ANSWER_EVERY));
    let listener_address = SocketAddr::new(tailnet_peer.into(), listener.port);
    // Wherever the listener's answers arrive on the WireGuard side, they
    // are counted there: the stream peer's count must be its socket's,
    // the others' none.
    let answers = format!("ip saddr {TAILNET_PEER} udp sport {}", listener.port);
    let answers_at_flooder = flooder.ns.run(|| ArrivalCounter::install(&answers));
    let answers_at_idle_peer = b.bed.theirs.run(|| ArrivalCounter::install(&answers));
    let answers_at_stream_peer = b.client.run(|| ArrivalCounter::install(&answers));

    let mut node = b.bed.ours.run(|| {
        DaemonUnderTest::builder(&b)
            .datapath("ebpf")
            .env(
                "TG_NAT_UNREPLIED_PER_SOURCE",
                &UNREPLIED_PER_SOURCE.to_string(),
            )
            .start_healthy()
    });

    let stop_stream = AtomicBool::new(false);
    let stream_sent = AtomicU64::new(0);
    let flood_over = AtomicBool::new(false);
    let run = std::thread::scope(|scope| {
        // A failure below must still end the threads, or the scope would
        // wait for them for ever.
        let _ends_the_threads = RaiseOnDrop([&stop_stream, &flood_over]);
        let stream = scope.spawn(|| {
            b.client
                .run(|| one_way_stream(listener_address, &stop_stream, &stream_sent))
        });
        let mut idle = b.bed.theirs.run(|| {
            let target = SocketAddr::new(tailnet_peer.into(), echo.port);
            TcpStream::connect_timeout(&target, patience(Duration::from_secs(3)))
                .expect("the idle connection, through the bridge")
        });
        let silent_since = Instant::now();
        // Both flows are the fast path's before the flood starts (the
        // kernel's would not be in its table): the connection established,
        // the stream unreplied or answered.
        b.bed.ours.run(|| {
            node.wait_for("the connection and the stream in the table", |_| {
                let live = status().connection_table.unwrap_or_default().live;
                let count = |state: &str| live.get(state).copied().unwrap_or(0);
                count("established") >= 1 && count("unreplied") + count("replied") >= 1
            })
        });
        let before = b.bed.ours.run(status);

        let sampler = scope.spawn(|| b.bed.ours.run(|| status_until(&flood_over)));
        let sent = flooder.ns.run(|| {
            let dropped_before = tx_dropped(flooder.device());
            let mut sent = flood(flooder_address, tailnet_peer, FLOOD);
            sent.dropped_by_device = tx_dropped(flooder.device()) - dropped_before;
            sent
        });
        flood_over.store(true, Ordering::Relaxed);
        let stream_sent_by_flood_end = stream_sent.load(Ordering::Relaxed);
        let during = sampler.join().expect("the status sampler");
        // The daemon publishes the counters each second.
        std::thread::sleep(patience(Duration::from_secs(2)));
        let after = b.bed.ours.run(status);

        std::thread::sleep(SILENCE.saturating_sub(silent_since.elapsed()));
        let silence = silent_since.elapsed();
        let echoed = echo_line(&mut idle, "after a minute of silence");
        stop_stream.store(true, Ordering::Relaxed);
        let stream = stream.join().expect("the stream");
        Run {
            sent,
            stream,
            stream_sent_by_flood_end,
            during,
            before,
            after,
            silence,
            echoed,
            idle,
        }
    });

    // The table once a sweep has run after everything above.
    let end = b.bed.ours.run(|| {
        let swept = sweeps(&status());
        node.wait_for("a sweep after the test's traffic", |_| {
            sweeps(&status()) > swept
        });
        status()
    });
    let healthy_at_end = b.bed.ours.run(health);
    let exited = node.exited();
    let ctx = |what: &str| format!("{what}\n{}", node.log());

    // What the flood reached.
    let flood_secs = run.sent.elapsed.as_secs_f64();
    let from_wireguard = wireguard_packets(&run.after) - wireguard_packets(&run.before);
    println!(
        "flood: peer 1 sent {} UDP datagrams and {} SYNs in {flood_secs:.1} s: {:.0} \
         packets/s ({} sends refused by its own stack, {} dropped by its WireGuard device)",
        run.sent.udp,
        run.sent.syn,
        (run.sent.udp + run.sent.syn) as f64 / flood_secs,
        run.sent.refused,
        run.sent.dropped_by_device
    );
    println!(
        "flood: the fast path took {from_wireguard} packets from the WireGuard side: {:.0} \
         packets/s",
        from_wireguard as f64 / flood_secs
    );
    let peak_v4 = run
        .during
        .iter()
        .filter_map(|s| Some(s.connection_table.as_ref()?.ipv4.flows))
        .max()
        .unwrap_or(0);
    println!(
        "connection table during the flood: {} samples, at most {peak_v4} IPv4 flows (as of \
         the last sweep)",
        run.during.len()
    );
    let table = end.connection_table.clone().unwrap_or_default();
    print_table(&table, &end);

    // The daemon stayed healthy, during the flood and after.
    let unhealthy: Vec<&StatusReport> = run.during.iter().filter(|s| !s.healthy).collect();
    assert!(
        !run.during.is_empty() && unhealthy.is_empty(),
        "{}",
        ctx(&format!(
            "unhealthy (or not answering) during the flood: {unhealthy:#?}"
        ))
    );
    assert!(healthy_at_end.0, "{}", ctx(&healthy_at_end.1));
    assert!(
        exited.is_none(),
        "{}",
        ctx(&format!("the daemon ended: {exited:?}"))
    );

    // The silent connection survived: its data echoed on the same
    // connection, and it is still the fast path's.
    assert!(run.silence >= SILENCE, "silent for only {:?}", run.silence);
    assert_eq!(
        run.echoed.as_deref(),
        Ok("after a minute of silence"),
        "{}",
        ctx("the idle connection after the flood")
    );
    assert!(
        table.live.get("established").copied() >= Some(1),
        "{}",
        ctx(&format!("the idle connection left the table: {table:#?}"))
    );
    drop(run.idle);

    // The stream kept its port (the fast path's, so never the kernel's)
    // from its first datagram to its last.
    let heard = listener.heard();
    let first = heard
        .first()
        .unwrap_or_else(|| panic!("{}", ctx("the listener heard nothing")))
        .from;
    let node_ts: std::net::IpAddr = NODE_TS.parse().unwrap();
    assert!(
        first.ip().to_canonical() == node_ts && first.port() >= NAT_PORT_FIRST,
        "{}",
        ctx(&format!("the stream's first datagram came from {first}"))
    );
    let moved: Vec<&SocketAddr> = heard
        .iter()
        .map(|h| &h.from)
        .filter(|from| **from != first)
        .collect();
    assert!(
        moved.is_empty(),
        "{}",
        ctx(&format!(
            "the stream came from {first}, then from {moved:?}"
        ))
    );
    let sequence = |bytes: &[u8]| {
        stream_sequence(bytes)
            .filter(|n| *n < run.stream.sent)
            .unwrap_or_else(|| panic!("{}", ctx(&format!("not the stream's: {bytes:?}"))))
    };
    let answered: Vec<u64> = heard
        .iter()
        .filter(|h| h.answered)
        .map(|h| sequence(&h.bytes))
        .collect();
    println!(
        "stream: peer 3 sent {} datagrams ({} by the flood's end), the listener heard {} \
         (all from {first}) and answered {answered:?}; peer 3 received {} answers",
        run.stream.sent,
        run.stream_sent_by_flood_end,
        heard.len(),
        run.stream.answers.len()
    );

    // The answers reached the stream's peer, and it alone: each from the
    // listener, to a datagram the listener answered, one after the flood.
    let mut received: Vec<u64> = run
        .stream
        .answers
        .iter()
        .map(|(bytes, from)| {
            assert_eq!(*from, listener_address, "{}", ctx("an answer's source"));
            sequence(bytes)
        })
        .collect();
    received.sort_unstable();
    assert_eq!(
        received,
        answered,
        "{}",
        ctx(&format!(
            "the answers peer 3 received, and those the listener sent ({} of the stream's \
             datagrams sent by the flood's end)",
            run.stream_sent_by_flood_end
        ))
    );
    assert!(
        answered.iter().any(|n| *n >= run.stream_sent_by_flood_end),
        "{}",
        ctx(&format!(
            "no answer after the flood (to {answered:?}; {} datagrams sent by its end)",
            run.stream_sent_by_flood_end
        ))
    );
    let arrived = [
        ("peer 1 (the flooder)", &flooder.ns, &answers_at_flooder),
        (
            "peer 2 (the idle connection)",
            &b.bed.theirs,
            &answers_at_idle_peer,
        ),
        ("peer 3 (the stream)", &b.client, &answers_at_stream_peer),
    ]
    .map(|(who, ns, counter)| (who, ns.run(|| counter.packets())));
    println!("answers arrived at: {arrived:?}");
    assert_eq!(
        arrived.map(|(_, n)| n),
        [0, 0, received.len() as u64],
        "{}",
        ctx("the listener's answers, where they arrived")
    );

    // Nothing evicted, nothing broken: the flooder's flows beyond its
    // budget were refused and went the kernel's way.
    let event = |name: &str| table.events.get(name).copied().unwrap_or(0);
    assert_eq!(
        event("flows-ended-broken"),
        0,
        "{}",
        ctx(&format!("flows ended broken: {table:#?}"))
    );
    assert!(
        run.sent.udp > UNREPLIED_PER_SOURCE && from_wireguard > 2 * UNREPLIED_PER_SOURCE,
        "{}",
        ctx(&format!(
            "the flood ({} UDP tuples sent, {from_wireguard} packets at the bridge) did not \
             exceed the budget of {UNREPLIED_PER_SOURCE} unreplied flows",
            run.sent.udp
        ))
    );
    let over_budget = end.counted("wireguard", "kernel:over-budget");
    assert!(
        event("over-budget") > 0 && over_budget > 0,
        "{}",
        ctx(&format!(
            "no refusal over the budget: {table:#?}\n{:#?}",
            end.counters
        ))
    );
    for (family, occupancy) in [("ipv4", table.ipv4), ("ipv6", table.ipv6)] {
        assert!(
            occupancy.capacity > 0 && occupancy.flows <= u64::from(occupancy.capacity),
            "{}",
            ctx(&format!("{family}: {table:#?}"))
        );
    }
    b.bed.ours.run(|| node.stop());
}

/// What the test's traffic came to, for the checks after it.
struct Run {
    sent: Flooded,
    stream: Streamed,
    /// Datagrams the stream had sent when the flood ended.
    stream_sent_by_flood_end: u64,
    /// `/status` each second during the flood.
    during: Vec<StatusReport>,
    /// `/status` before the flood and just after it.
    before: StatusReport,
    after: StatusReport,
    /// How long the idle connection was silent, and what its data after
    /// that brought back.
    silence: Duration,
    echoed: Result<String, String>,
    idle: TcpStream,
}

/// Raises its flags when dropped.
struct RaiseOnDrop<'a, const N: usize>([&'a AtomicBool; N]);

impl<const N: usize> Drop for RaiseOnDrop<'_, N> {
    fn drop(&mut self) {
        for flag in self.0 {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// What the flooder sent.
struct Flooded {
    udp: u64,
    syn: u64,
    /// Sends its own stack refused.
    refused: u64,
    /// Packets its WireGuard device dropped meanwhile (its WireGuard did
    /// not take them in time).
    dropped_by_device: u64,
    elapsed: Duration,
}

/// Sends new flows from `source` to `target` for `duration`, from the
/// calling thread's namespace, as fast as one thread can: UDP datagrams
/// and TCP SYNs in turn, each from a source and to a destination port no
/// packet before it had.
fn flood(source: Ipv4Addr, target: Ipv4Addr, duration: Duration) -> Flooded {
    let socket = RawIpv4::open();
    let destination_ports = FLOOD_PORTS.len() as u64;
    let source_ports = u64::from(u16::MAX - FLOOD_FIRST_SOURCE_PORT) + 1;
    let mut sent = Flooded {
        udp: 0,
        syn: 0,
        refused: 0,
        dropped_by_device: 0,
        elapsed: Duration::ZERO,
    };
    let mut packet = Vec::with_capacity(64);
    let started = Instant::now();
    let mut tuple = 0u64;
    while started.elapsed() < duration {
        let dport = FLOOD_PORTS.start() + (tuple % destination_ports) as u16;
        let sport = FLOOD_FIRST_SOURCE_PORT + ((tuple / destination_ports) % source_ports) as u16;
        let ip = PacketBuilder::ipv4(source.octets(), target.octets(), 64);
        packet.clear();
        let udp = tuple.is_multiple_of(2);
        if udp {
            ip.udp(sport, dport).write(&mut packet, b"flood")
        } else {
            ip.tcp(sport, dport, tuple as u32, 64240)
                .syn()
                .write(&mut packet, &[])
        }
        .expect("writing to a Vec cannot fail");
        match (socket.send(&packet, target), udp) {
            (false, _) => sent.refused += 1,
            (true, true) => sent.udp += 1,
            (true, false) => sent.syn += 1,
        }
        tuple += 1;
    }
    sent.elapsed = started.elapsed();
    sent
}

/// A raw IPv4 socket that sends whole IP packets (`IPPROTO_RAW`: the
/// kernel adds no header of its own), routed by their destination.
struct RawIpv4(OwnedFd);

impl RawIpv4 {
    fn open() -> Self {
        // SAFETY: a plain system call; the descriptor is owned from here.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        };
        assert!(
            fd >= 0,
            "a raw socket (root is needed): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        Self(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Sends one packet; whether the stack took it.
    fn send(&self, packet: &[u8], to: Ipv4Addr) -> bool {
        // SAFETY: an all-zero sockaddr_in is valid.
        let mut address: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        address.sin_family = libc::AF_INET as u16;
        address.sin_addr.s_addr = u32::from_ne_bytes(to.octets());
        // SAFETY: `packet` and `address` outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const address).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        sent == packet.len() as isize
    }
}

/// What the stream sent and got back.
struct Streamed {
    sent: u64,
    /// Each answer's bytes and where it came from.
    answers: Vec<(Vec<u8>, SocketAddr)>,
}

/// Sends `stream <n>` to `target` once a [`STREAM_INTERVAL`], from one
/// socket (one source port) of the calling thread's namespace, until
/// `stop`, counting the datagrams in `sent`; keeps whatever comes back,
/// and after `stop` waits a little for answers still on their way.
fn one_way_stream(target: SocketAddr, stop: &AtomicBool, sent: &AtomicU64) -> Streamed {
    let socket = udp_socket(Duration::from_millis(100));
    let mut answers = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            let n = sent.load(Ordering::Relaxed);
            socket
                .send_to(format!("stream {n}").as_bytes(), target)
                .expect("sending the stream");
            sent.store(n + 1, Ordering::Relaxed);
            next += STREAM_INTERVAL;
        }
        if let Ok(answer) = receive_datagram(&socket) {
            answers.push(answer);
        }
    }
    let grace = Instant::now() + patience(Duration::from_secs(3));
    while Instant::now() < grace {
        if let Ok(answer) = receive_datagram(&socket) {
            answers.push(answer);
        }
    }
    Streamed {
        sent: sent.load(Ordering::Relaxed),
        answers,
    }
}

/// Packets `device` (in the calling thread's namespace) dropped on their
/// way out.
fn tx_dropped(device: &str) -> u64 {
    let out = tailguard_tests::netns::run(
        Command::new("ip").args(["-j", "-s", "link", "show", "dev", device]),
    );
    let json: Value = serde_json::from_str(&out).expect("ip's JSON");
    json[0]["stats64"]["tx"]["dropped"]
        .as_u64()
        .unwrap_or_else(|| panic!("no transmit drops of {device} in {out}"))
}

/// The `n` of a `stream <n>` datagram.
fn stream_sequence(payload: &[u8]) -> Option<u64> {
    std::str::from_utf8(payload)
        .ok()?
        .strip_prefix("stream ")?
        .parse()
        .ok()
}

/// `/status` once a second (in the calling thread's namespace) until
/// `over`.
fn status_until(over: &AtomicBool) -> Vec<StatusReport> {
    let mut samples = Vec::new();
    while !over.load(Ordering::Relaxed) {
        let asked = Instant::now();
        samples.push(status());
        std::thread::sleep(Duration::from_secs(1).saturating_sub(asked.elapsed()));
    }
    samples
}

/// The table's sweeps so far, by `/status`.
fn sweeps(status: &StatusReport) -> u64 {
    status.connection_table.as_ref().map_or(0, |t| t.sweeps)
}

/// Every packet the fast path took from the WireGuard device, whatever
/// became of it.
fn wireguard_packets(status: &StatusReport) -> u64 {
    status
        .counters
        .iter()
        .filter_map(|c| c.get("wireguard"))
        .flat_map(|outcomes| outcomes.values())
        .map(|c| c.packets)
        .sum()
}

/// The table and the outcomes, as the closing note quotes them.
fn print_table(table: &ConnectionTableReport, status: &StatusReport) {
    for (family, o) in [("ipv4", table.ipv4), ("ipv6", table.ipv6)] {
        println!(
            "connection table {family}: {} flows of {}",
            o.flows, o.capacity
        );
    }
    println!("  unreplied per source: {}", table.unreplied_per_source);
    println!("  events: {:?}", table.events);
    println!("  live by state: {:?}", table.live);
    println!("  expired by state: {:?}", table.expired);
    println!(
        "  restored {}, orphan halves removed {}, sweeps {} (the last {} ms)",
        table.restored, table.orphans_removed, table.sweeps, table.last_sweep_ms
    );
    for device in ["wireguard", "tailscale"] {
        let outcomes: Vec<String> = status
            .counters
            .iter()
            .filter_map(|c| c.get(device))
            .flatten()
            .map(|(outcome, c)| format!("{outcome} {}", c.packets))
            .collect();
        println!("  {device} outcomes (packets): {}", outcomes.join(", "));
    }
}
