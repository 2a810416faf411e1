//! The traffic tools of the tests: ping, TCP and UDP servers and clients
//! that report what the other end saw, bulk senders, an HTTP GET, and a
//! packet tap that sends and captures IP packets at one device. Each works
//! in the calling thread's namespace (see [`crate::netns::NetNs::run`]);
//! dropped traffic shows as a timeout, never as a hang.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// `ping` that must succeed.
pub fn ping(target: &str) {
    if let Err(failure) = try_ping(target) {
        panic!("{failure}");
    }
}

/// `ping`, two echoes 0.2 s apart, each given 3 s; what it printed when no
/// reply came back (for a test that adds the daemon's log to its failure).
pub fn try_ping(target: &str) -> Result<(), String> {
    let out = Command::new("ping")
        .args(["-c", "2", "-i", "0.2", "-W", "3", target])
        .output()
        .expect("running ping");
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "ping {target} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// A TCP server in the calling thread's namespace that tells each client the
/// address it sees the client coming from, and reports them in turn.
pub struct WhoAmI {
    pub port: u16,
    seen: std::sync::mpsc::Receiver<String>,
    _thread: JoinHandle<()>,
}

impl WhoAmI {
    pub fn listen(ipv6: bool) -> Self {
        let any = if ipv6 { "[::]:0" } else { "0.0.0.0:0" };
        let listener = TcpListener::bind(any).expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let (tx, seen) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let peer = stream
                    .peer_addr()
                    .map(|a| a.ip().to_canonical().to_string())
                    .unwrap_or_default();
                let _ = stream.write_all(peer.as_bytes());
                if tx.send(peer).is_err() {
                    break;
                }
            }
        });
        Self {
            port,
            seen,
            _thread: thread,
        }
    }

    /// The source address the last client came from, as the server saw it.
    pub fn last_seen(&self) -> Option<String> {
        self.seen.try_iter().last()
    }
}

/// Connects to `addr:port` from the calling thread's namespace: the source
/// address the server saw, or why it failed (dropped traffic times out).
pub fn who_am_i(addr: &str, port: u16) -> Result<String, String> {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut seen = String::new();
    stream
        .read_to_string(&mut seen)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    Ok(seen)
}

/// A TCP server that counts the bytes each client sends and answers with
/// the count once the client has finished sending.
pub struct Sink {
    pub port: u16,
    _thread: JoinHandle<()>,
}

impl Sink {
    pub fn listen() -> Self {
        let listener = TcpListener::bind("[::]:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let mut count = 0u64;
                let mut buffer = [0u8; 65536];
                while let Ok(n) = stream.read(&mut buffer) {
                    if n == 0 {
                        break;
                    }
                    count += n as u64;
                }
                let _ = stream.write_all(count.to_string().as_bytes());
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// Sends `bytes` to a [`Sink`] and returns how many it says arrived.
pub fn send_bulk(addr: &str, port: u16, bytes: usize) -> Result<u64, String> {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![0x5au8; 16384];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        stream
            .write_all(&chunk[..n])
            .map_err(|e| format!("sending to {target}: {e}"))?;
        left -= n;
    }
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("reading from {target}: {e}"))?;
    answer.parse().map_err(|e| format!("{answer:?}: {e}"))
}

/// A UDP socket that reports the size of each datagram it receives.
pub struct UdpSink {
    pub port: u16,
    socket: UdpSocket,
}

impl UdpSink {
    pub fn bind() -> Self {
        let socket = UdpSocket::bind("[::]:0").expect("binding the test socket");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        Self {
            port: socket.local_addr().unwrap().port(),
            socket,
        }
    }

    /// The size of the next datagram, if one comes within 3 s.
    pub fn receive(&self) -> Option<usize> {
        let mut buffer = vec![0u8; 65536];
        self.socket.recv_from(&mut buffer).ok().map(|(n, _)| n)
    }
}

/// A UDP socket to send from, in the calling thread's namespace. Keep it
/// for the next datagram: the kernel applies a "packet too big" to the
/// socket the datagram came from, and forgets it if that socket is gone.
pub fn udp_sender() -> UdpSocket {
    UdpSocket::bind("[::]:0").expect("binding")
}

/// Sends one UDP datagram of `size` bytes (the kernel fragments it).
pub fn send_datagram(socket: &UdpSocket, addr: &str, port: u16, size: usize) {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    socket.send_to(&vec![0xa5; size], target).expect("sending");
}

/// A TCP server that echoes every line back, for connections that must
/// last (across a restart of the daemon).
pub struct Echo {
    pub port: u16,
    _thread: JoinHandle<()>,
}

impl Echo {
    pub fn listen() -> Self {
        let listener = TcpListener::bind("[::]:0").expect("binding the test server");
        let port = listener.local_addr().unwrap().port();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                std::thread::spawn(move || {
                    let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                    let mut writer = stream;
                    let mut line = String::new();
                    while std::io::BufRead::read_line(&mut reader, &mut line).is_ok_and(|n| n > 0) {
                        if writer.write_all(line.as_bytes()).is_err() {
                            break;
                        }
                        line.clear();
                    }
                });
            }
        });
        Self {
            port,
            _thread: thread,
        }
    }
}

/// One line sent on `stream` and read back (waiting up to 30 s, long
/// enough for TCP to retransmit across a restart).
pub fn echo_line(stream: &mut TcpStream, line: &str) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while answer.last() != Some(&b'\n') {
        let n = stream.read(&mut byte).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed".into());
        }
        answer.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&answer).trim_end().to_string())
}

/// `GET path` over plain HTTP/1.1 from the calling thread's namespace: the
/// whole response (status line, headers, body), or why it failed.
pub fn http_get(addr: &str, port: u16, path: &str) -> String {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    let attempt = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    };
    attempt().unwrap_or_else(|e| format!("GET {target}{path} failed: {e}"))
}

/// A TCP connection to `addr:port` from the calling thread's namespace is
/// established (someone answered the SYN), or why not.
pub fn tcp_connects(addr: &str, port: u16) -> Result<(), String> {
    let target = SocketAddr::new(addr.parse().expect("an address"), port);
    TcpStream::connect_timeout(&target, Duration::from_secs(2))
        .map(drop)
        .map_err(|e| format!("connecting to {target}: {e}"))
}

/// A UDP socket on any address and port of both families, whose reads
/// give up after `read_timeout`.
pub fn udp_socket(read_timeout: Duration) -> UdpSocket {
    let socket = UdpSocket::bind("[::]:0").expect("binding");
    socket.set_read_timeout(Some(read_timeout)).unwrap();
    socket
}

/// The next datagram on `socket`, and where it came from (IPv4 as IPv4),
/// if one comes within the socket's read timeout.
pub fn receive_datagram(socket: &UdpSocket) -> std::io::Result<(Vec<u8>, SocketAddr)> {
    let mut buffer = vec![0u8; 65536];
    let (n, from) = socket.recv_from(&mut buffer)?;
    buffer.truncate(n);
    Ok((
        buffer,
        SocketAddr::new(from.ip().to_canonical(), from.port()),
    ))
}

/// A UDP server that answers every datagram with the same bytes and tells
/// from where each came.
pub struct UdpEcho {
    pub port: u16,
    heard: mpsc::Receiver<Heard>,
    _thread: JoinHandle<()>,
}

/// A datagram a [`UdpEcho`] received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heard {
    /// Where it came from (as the server saw it).
    pub from: SocketAddr,
    pub bytes: Vec<u8>,
    /// Whether the server answered it.
    pub answered: bool,
}

impl UdpEcho {
    pub fn listen() -> Self {
        Self::answering_every(1)
    }

    /// As [`UdpEcho::listen`], answering only the `nth` datagram, the
    /// `2·nth`, and so on (counted as they arrive, from any source): a
    /// server whose replies are sparse, which keeps a flow nearly one-way.
    pub fn answering_every(nth: usize) -> Self {
        assert!(nth > 0, "answering every 0th datagram");
        let socket = UdpSocket::bind("[::]:0").expect("binding the echo server");
        let port = socket.local_addr().unwrap().port();
        let (tx, heard) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 2048];
            let mut received = 0usize;
            while let Ok((n, from)) = socket.recv_from(&mut buffer) {
                received += 1;
                let answered = received.is_multiple_of(nth);
                if answered {
                    let _ = socket.send_to(&buffer[..n], from);
                }
                let bytes = buffer[..n].to_vec();
                if tx
                    .send(Heard {
                        from,
                        bytes,
                        answered,
                    })
                    .is_err()
                {
                    break;
                }
            }
        });
        Self {
            port,
            heard,
            _thread: thread,
        }
    }

    /// Where the next datagram came from (address as the server saw it).
    pub fn next_source(&self) -> Option<SocketAddr> {
        self.heard
            .recv_timeout(Duration::from_secs(3))
            .ok()
            .map(|h| h.from)
    }

    /// Forgets the sources seen so far, so that the next is a new one.
    pub fn forget_seen(&self) {
        while self.heard.try_recv().is_ok() {}
    }

    /// The datagrams received since the last call (or since
    /// [`UdpEcho::forget_seen`]), in order.
    pub fn heard(&self) -> Vec<Heard> {
        self.heard.try_iter().collect()
    }
}

/// Counts the packets arriving in the calling thread's namespace (on any of
/// its devices) that match an nftables expression, such as `ip saddr
/// 100.64.0.2 udp sport 5000`: a capture that misses none however busy the
/// devices are. Its table goes with the namespace.
pub struct ArrivalCounter {
    table: String,
}

impl ArrivalCounter {
    /// Starts counting, in the calling thread's namespace.
    pub fn install(matching: &str) -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let table = format!(
            "tg_arrivals_{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let nft = |args: &[&str]| crate::netns::run(Command::new("nft").args(args));
        nft(&["add", "table", "inet", &table]);
        // Before conntrack and every other hook: all that arrives.
        nft(&[
            "add",
            "chain",
            "inet",
            &table,
            "arriving",
            "{ type filter hook prerouting priority -400 ; }",
        ]);
        nft(&[
            "add",
            "rule",
            "inet",
            &table,
            "arriving",
            &format!("{matching} counter"),
        ]);
        Self { table }
    }

    /// The packets counted so far (read in the calling thread's namespace,
    /// the one it was installed in).
    pub fn packets(&self) -> u64 {
        let out = crate::netns::run(Command::new("nft").args([
            "-j",
            "list",
            "chain",
            "inet",
            &self.table,
            "arriving",
        ]));
        let json: serde_json::Value = serde_json::from_str(&out).expect("nft's JSON");
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find_map(|item| {
                item["rule"]["expr"]
                    .as_array()?
                    .iter()
                    .find_map(|e| e["counter"]["packets"].as_u64())
            })
            .unwrap_or_else(|| panic!("no counter in table {}: {out}", self.table))
    }
}

/// Sends `message` from `socket` to `addr:port`; the answer, if one comes
/// within 3 s.
pub fn udp_ask(socket: &UdpSocket, addr: &str, port: u16, message: &[u8]) -> Option<Vec<u8>> {
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let target = SocketAddr::new(addr.parse().unwrap(), port);
    socket.send_to(message, target).expect("sending");
    let mut buffer = [0u8; 2048];
    socket.recv(&mut buffer).ok().map(|n| buffer[..n].to_vec())
}

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// A packet socket on one device: sends IP packets out of it as they are
/// (no routing, no fragmenting by the sender's stack) and captures every
/// IP packet that arrives on it (an `AF_PACKET` socket, so nothing the
/// receiver's stack does, to an ICMP error say, hides it).
pub struct Tap {
    fd: OwnedFd,
    ifindex: i32,
}

impl Tap {
    /// Opens the tap on `device` of the calling thread's namespace.
    pub fn open(device: &str) -> Self {
        let ifindex = nix::net::if_::if_nametoindex(device)
            .unwrap_or_else(|e| panic!("no device {device}: {e}")) as i32;
        // SAFETY: plain system calls on a socket this function owns.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                fd >= 0,
                "a packet socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            let addr = sockaddr(ETH_P_ALL, ifindex);
            let bound = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert!(
                bound == 0,
                "binding the packet socket to {device}: {}",
                std::io::Error::last_os_error()
            );
            Self { fd, ifindex }
        }
    }

    /// Sends one IP packet out of the device.
    pub fn send(&self, packet: &[u8]) {
        let proto = if packet[0] >> 4 == 6 {
            ETH_P_IPV6
        } else {
            ETH_P_IP
        };
        let addr = sockaddr(proto, self.ifindex);
        // SAFETY: `packet` and `addr` outlive the call.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert!(
            sent == packet.len() as isize,
            "sending {} bytes: {}",
            packet.len(),
            std::io::Error::last_os_error()
        );
    }

    /// The IP packets that arrived since the last call (not those sent).
    pub fn take(&self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.next_arrived()).collect()
    }

    /// The first IP packet to arrive within `patience` for which `wanted`
    /// holds (those before it are dropped), if one does.
    pub fn next_where(
        &self,
        patience: Duration,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let deadline = Instant::now() + patience;
        while Instant::now() < deadline {
            match self.next_arrived() {
                Some(packet) if wanted(&packet) => return Some(packet),
                Some(_) => {}
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        None
    }

    /// The next IP packet that arrived (not one sent), if one is waiting.
    fn next_arrived(&self) -> Option<Vec<u8>> {
        let mut buffer = vec![0u8; 65536];
        loop {
            // SAFETY: an all-zero sockaddr_ll is valid; the buffers outlive
            // the call.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return None;
            }
            let proto = u16::from_be(from.sll_protocol);
            let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
            if !outgoing && (proto == ETH_P_IP || proto == ETH_P_IPV6) {
                buffer.truncate(n as usize);
                return Some(buffer);
            }
        }
    }
}

fn sockaddr(proto: u16, ifindex: i32) -> libc::sockaddr_ll {
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto.to_be();
    addr.sll_ifindex = ifindex;
    addr
}
