//! The daemon's HTTP servers under hostile clients, as the issue found them
//! (#13): a foreign `Host` (DNS rebinding), a burst of requests from one
//! client, a client sending one header byte every few seconds, and 2,000
//! idle connections to the status page under an open-file limit of 1024.
//! Every target is the node's own address in the test namespaces or
//! loopback.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tailguard_tests::{
    bridge::Bridge,
    daemon::{DaemonUnderTest, health},
    topology::*,
};

const PAGE: u16 = 8088;
/// The daemon's header read timeout (`tailguard::http::server`).
const HEADER_READ_TIMEOUT: Duration = tailguard::http::server::HEADER_READ_TIMEOUT;

/// One request on a fresh connection (`Host` as given, none with `None`):
/// the whole answer as received, or why there was none.
fn ask(addr: &str, port: u16, path: &str, host: Option<&str>) -> String {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let host = host.map_or(String::new(), |h| format!("Host: {h}\r\n"));
        write!(
            stream,
            "GET {path} HTTP/1.1\r\n{host}Connection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    attempt().unwrap_or_else(|e| format!("GET {target}{path} failed: {e}"))
}

fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

/// The bridge's daemon with the status page on, healthy.
fn start(b: &Bridge, wrapper: &[&str], env: &[(&str, &str)]) -> DaemonUnderTest {
    b.bed.ours.run(|| {
        let mut node = DaemonUnderTest::builder(b).via(wrapper).envs(env).start();
        node.wait_for("health", |_| health().0);
        node
    })
}

#[test]
fn foreign_hosts_are_refused_and_isolated_peers_see_no_other_peer() {
    let b = Bridge::new("http-host");
    let node = start(
        &b,
        &[],
        &[("TG_WEBUI_PORT", "8088"), ("WG_ISOLATE_PEERS", "1")],
    );
    let ctx = |what: &str| format!("{what}\n{}", node.log());
    // The second WireGuard peer's AllowedIPs, as one of the WireGuard
    // side's routes in `/status`.
    let other_peer = "\"10.66.0.3/32\": \"wireguard\"";

    // The health address (the host's own): the Host check, and everything.
    b.bed.ours.run(|| {
        let refused = ask("127.0.0.1", 9002, "/status", Some("evil.example"));
        assert_eq!(
            status_line(&refused),
            "HTTP/1.1 403 Forbidden",
            "{}",
            ctx(&refused)
        );
        assert!(refused.contains("DNS rebinding"), "{refused}");
        let ok = ask("127.0.0.1", 9002, "/status", Some("127.0.0.1:9002"));
        assert_eq!(status_line(&ok), "HTTP/1.1 200 OK", "{}", ctx(&ok));
        assert!(ok.contains(other_peer), "the host sees everything: {ok}");
        let ok = ask("127.0.0.1", 9002, "/healthz", None);
        assert_eq!(status_line(&ok), "HTTP/1.1 200 OK", "no Host: {ok}");
    });

    // The status page from the WireGuard server's side.
    b.bed.theirs.run(|| {
        let refused = ask(NODE_WG, PAGE, "/status", Some("evil.example:8088"));
        assert_eq!(
            status_line(&refused),
            "HTTP/1.1 403 Forbidden",
            "{}",
            ctx(&refused)
        );
        // That request counted against the one a second.
        std::thread::sleep(Duration::from_millis(1100));
        let ok = ask(NODE_WG, PAGE, "/status", Some(&endpoint(NODE_WG, 8088)));
        assert_eq!(status_line(&ok), "HTTP/1.1 200 OK", "{}", ctx(&ok));
        assert!(ok.contains("\"forwarding\""), "{ok}");
        assert!(
            !ok.contains(other_peer) && ok.contains("\"wireguard_peers_hidden\": true"),
            "a WireGuard peer must not see the others: {ok}"
        );
    });

    // From the tailnet, by the MagicDNS name: everything.
    b.tailnet.run(|| {
        let name = "tailguard.standin.ts.net:8088";
        let ok = ask(NODE_TS, PAGE, "/status", Some(name));
        assert_eq!(status_line(&ok), "HTTP/1.1 200 OK", "{}", ctx(&ok));
        assert!(
            ok.contains(other_peer),
            "the tailnet side sees the peers: {ok}"
        );
        std::thread::sleep(Duration::from_millis(1100));
        let refused = ask(NODE_TS, PAGE, "/status", Some("tailguard.evil.example"));
        assert_eq!(status_line(&refused), "HTTP/1.1 403 Forbidden", "{refused}");
    });
    node.stop();
}

#[test]
fn one_request_a_second_per_client_and_slow_headers_are_cut_off() {
    let b = Bridge::new("http-rate");
    let mut node = start(&b, &[], &[("TG_WEBUI_PORT", "8088")]);
    node.wait_for("the second WireGuard peer's handshake", |_| {
        b.client_connected()
    });
    let ctx = |what: &str| format!("{what}\n{}", node.log());

    // 30 requests at once from the second WireGuard peer.
    let (answers, took) = b.client.run(|| {
        let started = Instant::now();
        let answers: Vec<String> = (0..30)
            .map(|_| ask(NODE_WG, PAGE, "/healthz", Some(NODE_WG)))
            .collect();
        (answers, started.elapsed())
    });
    let ok = answers
        .iter()
        .filter(|a| status_line(a) == "HTTP/1.1 200 OK")
        .count();
    let limited: Vec<&String> = answers
        .iter()
        .filter(|a| status_line(a) == "HTTP/1.1 429 Too Many Requests")
        .collect();
    eprintln!(
        "30 requests in {took:?}: {ok} answered 200, {} answered 429",
        limited.len()
    );
    assert_eq!(ok + limited.len(), 30, "{}", ctx(&answers.join("\n---\n")));
    // One a second: one in the first second, one more per second after it.
    assert!(
        ok >= 1 && ok <= 1 + took.as_secs() as usize,
        "{ok} answered in {took:?}"
    );
    assert!(
        limited.iter().all(|a| a.contains("retry-after: 1\r\n")),
        "{}",
        limited[0]
    );
    // Another client is not held back by that one.
    let other = b
        .bed
        .theirs
        .run(|| ask(NODE_WG, PAGE, "/healthz", Some(NODE_WG)));
    assert_eq!(status_line(&other), "HTTP/1.1 200 OK", "{}", ctx(&other));

    // A client that sends its request one byte every 2 s.
    let (cut_after, sent) = b.bed.theirs.run(|| {
        let request = format!("GET /healthz HTTP/1.1\r\nHost: {NODE_WG}\r\n\r\n");
        let target = SocketAddr::new(NODE_WG.parse().unwrap(), PAGE);
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(3)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let started = Instant::now();
        let mut sent = 0;
        let mut answer = [0; 512];
        // Bounded: without a timeout the request would take 80 s.
        while started.elapsed() < HEADER_READ_TIMEOUT * 4 {
            if stream.write_all(&request.as_bytes()[sent..=sent]).is_err() {
                return (Some(started.elapsed()), sent);
            }
            sent += 1;
            // Waits the 2 s; closed (perhaps after a 408) is cut off.
            match stream.read(&mut answer) {
                Ok(0) => return (Some(started.elapsed()), sent),
                Ok(n) => {
                    let got = String::from_utf8_lossy(&answer[..n]).into_owned();
                    assert!(
                        !got.contains(" 200 "),
                        "the slow request was answered: {got}"
                    );
                    return (Some(started.elapsed()), sent);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => return (Some(started.elapsed()), sent),
            }
        }
        (None, sent)
    });
    let cut_after = cut_after.unwrap_or_else(|| {
        panic!(
            "{}",
            ctx(&format!(
                "a client sending a byte every 2 s was still connected after {sent} bytes"
            ))
        )
    });
    eprintln!("slow client cut off after {cut_after:?} and {sent} of its bytes");
    // The header timeout, plus the pace of one byte and one read.
    assert!(
        cut_after < HEADER_READ_TIMEOUT + Duration::from_secs(4),
        "cut off only after {cut_after:?}"
    );
    node.stop();
}

/// How many connections are established at once, at most, and in all.
#[derive(Default)]
struct Flood {
    open: AtomicUsize,
    most_open: AtomicUsize,
    made: AtomicUsize,
}

impl Flood {
    /// `count` clients, each connecting from `sources[i % len]` to
    /// `target` and sending nothing, until `until`: when the server closes
    /// one, it connects again 2 s later (an attacker keeps the pressure).
    fn run(
        self: &Arc<Self>,
        sources: &[std::net::IpAddr],
        target: SocketAddr,
        count: usize,
        until: Instant,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let clients = (0..count).map(|i| {
                let source = sources[i % sources.len()];
                let flood = self.clone();
                async move { flood.client(source, target, until).await }
            });
            futures_util::future::join_all(clients).await;
        });
    }

    async fn client(&self, source: std::net::IpAddr, target: SocketAddr, until: Instant) {
        use tokio::io::AsyncReadExt as _;
        let until = tokio::time::Instant::from_std(until);
        while tokio::time::Instant::now() < until {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(source, 0)).unwrap();
            let connected = tokio::time::timeout_at(until, socket.connect(target)).await;
            if let Ok(Ok(mut stream)) = connected {
                self.made.fetch_add(1, Ordering::Relaxed);
                let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
                self.most_open.fetch_max(open, Ordering::Relaxed);
                // Idle until the server closes it (or the flood ends).
                let _ = tokio::time::timeout_at(until, stream.read(&mut [0; 64])).await;
                self.open.fetch_sub(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
}

/// The process's CPU time so far (user and system), from /proc/PID/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the daemon runs");
    // The fields after the command name (which may hold spaces): utime and
    // stime are the 14th and 15th of the line.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Lets this test process hold its side of the 2,000 connections.
fn raise_own_open_file_limit(to: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit"
    );
    if limit.rlim_cur >= to {
        return;
    }
    limit.rlim_cur = to;
    limit.rlim_max = limit.rlim_max.max(to);
    assert_eq!(
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) },
        0,
        "setrlimit"
    );
}

#[test]
fn two_thousand_idle_connections_leave_health_answering_and_the_cpu_idle() {
    raise_own_open_file_limit(16384);
    let prlimit = std::process::Command::new("prlimit")
        .arg("--version")
        .output();
    assert!(
        prlimit.is_ok_and(|out| out.status.success()),
        "this test runs the daemon under `prlimit` (util-linux): install it"
    );
    let b = Bridge::new("http-flood");
    // systemd's default limit, with no hard limit above it to raise to.
    let node = start(
        &b,
        &["prlimit", "--nofile=1024:1024"],
        &[("TG_WEBUI_PORT", "8088")],
    );
    let pid = node.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("1024")),
        "the daemon runs with 1024 open files at most: {limits}"
    );
    let fds_before = open_files(pid);

    // 1,000 from one WireGuard peer (past the per-client cap), 1,000 over
    // loopback from 200 source addresses (5 each: within the per-client
    // cap, together past the listener's own).
    let flood_for = Duration::from_secs(14);
    let until = Instant::now() + flood_for;
    let from_peer = Arc::new(Flood::default());
    let from_loopback = Arc::new(Flood::default());
    let (health_times, cpu, most_fds) = std::thread::scope(|scope| {
        scope.spawn(|| {
            b.bed.theirs.run(|| {
                let peer = SocketAddr::new(NODE_WG.parse().unwrap(), PAGE);
                from_peer.run(&[WG_SERVER.parse().unwrap()], peer, 1000, until);
            })
        });
        scope.spawn(|| {
            b.bed.ours.run(|| {
                let sources: Vec<_> = (0..200u8)
                    .map(|i| std::net::IpAddr::from([127, 0, 1, i + 1]))
                    .collect();
                let page = SocketAddr::from(([127, 0, 0, 1], PAGE));
                from_loopback.run(&sources, page, 1000, until);
            })
        });
        // Let the flood build, then measure for a few seconds inside it.
        std::thread::sleep(Duration::from_secs(4));
        b.bed.ours.run(|| {
            let cpu_before = cpu_time(pid);
            let started = Instant::now();
            let mut health_times = Vec::new();
            let mut most_fds = 0;
            while started.elapsed() < Duration::from_secs(6) {
                let asked = Instant::now();
                let (healthy, report) = health();
                health_times.push(asked.elapsed());
                assert!(
                    healthy,
                    "tailguard health under the flood: {report}\n{}",
                    node.log()
                );
                most_fds = most_fds.max(open_files(pid));
                std::thread::sleep(Duration::from_millis(500));
            }
            let cpu = (cpu_time(pid) - cpu_before).as_secs_f64() / started.elapsed().as_secs_f64();
            (health_times, cpu, most_fds)
        })
    });
    let log = node.log();
    let slowest = health_times.iter().max().unwrap();
    eprintln!(
        "flood: most connections open at once {} from the peer and {} over loopback \
         ({} and {} made); daemon fds {fds_before} before, {most_fds} at most during; \
         `tailguard health` {} answers, slowest {slowest:?}; daemon CPU {:.1} % of one CPU",
        from_peer.most_open.load(Ordering::Relaxed),
        from_loopback.most_open.load(Ordering::Relaxed),
        from_peer.made.load(Ordering::Relaxed),
        from_loopback.made.load(Ordering::Relaxed),
        health_times.len(),
        cpu * 100.0,
    );
    let opened = from_peer.most_open.load(Ordering::Relaxed)
        + from_loopback.most_open.load(Ordering::Relaxed);
    assert!(
        opened >= 1000,
        "the flood must really hold connections: {opened}"
    );
    assert!(
        most_fds < 1024 - 128,
        "the daemon's descriptors: {most_fds}\n{log}"
    );
    assert!(
        cpu < 0.2,
        "the daemon spins: {:.0} % of a CPU\n{log}",
        cpu * 100.0
    );
    assert!(!log.contains("Too many open files"), "{log}");
    // The flood is over: the page answers again.
    std::thread::sleep(Duration::from_secs(1));
    let page = b
        .bed
        .theirs
        .run(|| ask(NODE_WG, PAGE, "/healthz", Some(NODE_WG)));
    assert_eq!(status_line(&page), "HTTP/1.1 200 OK", "{page}\n{log}");
    node.stop();
}
