//! Traffic for the throughput runs, and what it cost: a small-packet UDP
//! flood over many flows (counted where it arrives), a bulk TCP stream, and
//! the machine's CPU time meanwhile.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Command,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use tailguard_tests::netns::{NetNs, run};

/// One UDP flow of the flood: its ports (source address and destination
/// address are the flood's).
#[derive(Clone, Copy, Debug)]
pub struct Flow {
    pub sport: u16,
    pub dport: u16,
}

/// The `i`th of many flows to one destination address. No more than 2,000
/// share a destination port: the fast path translates to 4,536 ports per
/// destination address and port, as a masquerade does.
pub fn flow(i: usize) -> Flow {
    Flow {
        sport: 1024 + (i % 2000) as u16,
        dport: 2000 + (i / 2000) as u16,
    }
}

/// Payload of the flood's datagrams: 60-byte frames, the smallest Ethernet
/// carries.
const PAYLOAD: usize = 18;

/// Ethernet frames of UDP datagrams from `src` to `dst`, one per flow.
pub fn frames(
    macs: ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    flows: impl Iterator<Item = Flow>,
) -> Vec<Vec<u8>> {
    flows
        .map(|f| {
            let mut out = Vec::with_capacity(64);
            PacketBuilder::ethernet2(macs.0, macs.1)
                .ipv4(src.octets(), dst.octets(), 64)
                .udp(f.sport, f.dport)
                .write(&mut out, &[0u8; PAYLOAD])
                .expect("writing to a Vec");
            out
        })
        .collect()
}

/// The MAC address of `device` in `ns`.
pub fn mac(ns: &NetNs, device: &str) -> [u8; 6] {
    let out = run(Command::new("ip").args(["-n", ns.name(), "-j", "link", "show", "dev", device]));
    let json: serde_json::Value = serde_json::from_str(&out).expect("ip -j prints JSON");
    let text = json[0]["address"].as_str().expect("a link address");
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).expect("a hex MAC");
    }
    mac
}

/// The CPU the endpoints (senders, receivers, their kernel work) run on.
pub const ENDPOINT_CPU: usize = 0;
/// The CPU the forwarding hop's packets are steered to, so that its busy
/// time is the hop's cost and nothing else's.
pub const HOP_CPU: usize = 1;

/// Steers what arrives on `device` in `ns` to `cpu` (receive packet
/// steering: the device's receive processing, and all the kernel does with
/// the packet after, runs there).
pub fn steer(ns: &NetNs, device: &str, cpu: usize) {
    // /sys shows the namespace it was mounted in: `ip netns exec` mounts
    // the right one.
    let mask = format!("{:x}", 1u64 << cpu);
    run(Command::new("ip").args([
        "netns",
        "exec",
        ns.name(),
        "sh",
        "-c",
        &format!("echo {mask} > /sys/class/net/{device}/queues/rx-0/rps_cpus"),
    ]));
}

/// Sends `frames` round and round out of `device` in `ns`, from one thread
/// on [`ENDPOINT_CPU`] (a raw socket that skips the qdisc: the sender costs
/// as little as a sender can), until `duration` has passed. Returns the
/// frames sent.
pub fn flood(ns: &NetNs, device: &str, frames: &[Vec<u8>], duration: Duration) -> u64 {
    let all: Vec<&Vec<u8>> = frames.iter().collect();
    ns.run(|| {
        pin_to_cpu(ENDPOINT_CPU);
        send_for(device, &all, duration)
    })
}

/// Sends every frame once (from one thread): the flows' first packets.
pub fn send_once(ns: &NetNs, device: &str, frames: &[Vec<u8>]) {
    let all: Vec<&Vec<u8>> = frames.iter().collect();
    ns.run(|| {
        let socket = packet_socket(device);
        for batch in all.chunks(BATCH) {
            send_batch(&socket, batch);
        }
    });
}

const BATCH: usize = 64;

fn send_for(device: &str, frames: &[&Vec<u8>], duration: Duration) -> u64 {
    let socket = packet_socket(device);
    let deadline = Instant::now() + duration;
    let mut sent = 0u64;
    let mut at = 0;
    while Instant::now() < deadline {
        let batch: Vec<&Vec<u8>> = (0..BATCH)
            .map(|i| frames[(at + i) % frames.len()])
            .collect();
        at = (at + BATCH) % frames.len();
        sent += send_batch(&socket, &batch);
    }
    sent
}

/// An `AF_PACKET` socket bound to `device` that sends around the qdisc.
fn packet_socket(device: &str) -> OwnedFd {
    let index = nix::net::if_::if_nametoindex(device).expect("the flood's device");
    // SAFETY: plain system calls on a socket this function owns; every
    // pointer passed is to a live local of the right size.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            (&raw const one).cast(),
            size_of::<libc::c_int>() as u32,
        );
        let mut address: libc::sockaddr_ll = std::mem::zeroed();
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        address.sll_ifindex = index as i32;
        let bound = libc::bind(
            fd.as_raw_fd(),
            (&raw const address).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(
            bound,
            0,
            "binding to {device}: {}",
            std::io::Error::last_os_error()
        );
        fd
    }
}

fn send_batch(socket: &OwnedFd, frames: &[&Vec<u8>]) -> u64 {
    let mut iovecs: Vec<libc::iovec> = frames
        .iter()
        .map(|f| libc::iovec {
            iov_base: f.as_ptr() as *mut _,
            iov_len: f.len(),
        })
        .collect();
    // SAFETY: each message points at one iovec of `iovecs`, which points at
    // a frame that outlives the call; the kernel only reads them.
    let mut messages: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let n = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            messages.as_mut_ptr(),
            messages.len() as u32,
            0,
        )
    };
    n.max(0) as u64
}

/// Keeps the calling thread on `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// UDP datagrams arriving on devices of one namespace, counted and dropped
/// at their ingress hook (nftables' netdev family): receiving costs little
/// and nothing answers. Removed on drop.
pub struct UdpCounter {
    ns: String,
    table: &'static str,
}

impl UdpCounter {
    pub fn install(ns: &NetNs, devices: &[&str]) -> Self {
        let table = "tailguard_bench_sink";
        let mut script = format!("table netdev {table} {{\n");
        for (i, device) in devices.iter().enumerate() {
            script.push_str(&format!(
                "  chain in{i} {{ type filter hook ingress device \"{device}\" priority 0; ip protocol udp counter drop; ip6 nexthdr udp counter drop; }}\n"
            ));
        }
        script.push_str("}\n");
        nft(ns.name(), &["-f", "-"], Some(&script));
        Self {
            ns: ns.name().to_string(),
            table,
        }
    }

    /// Datagrams counted so far.
    pub fn count(&self) -> u64 {
        let out = nft(
            &self.ns,
            &["-j", "list", "table", "netdev", self.table],
            None,
        );
        let json: serde_json::Value = serde_json::from_str(&out).expect("nft -j prints JSON");
        json["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item["rule"]["expr"].as_array())
            .flatten()
            .filter_map(|expr| expr["counter"]["packets"].as_u64())
            .sum()
    }
}

impl Drop for UdpCounter {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args([
                "netns", "exec", &self.ns, "nft", "delete", "table", "netdev", self.table,
            ])
            .status();
    }
}

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running nft (installed by cargo xtask setup)");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(text.as_bytes())
            .expect("writing to nft");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// CPU time so far, from /proc/stat, in seconds: the whole machine's
/// (everything but idle and iowait), and the interrupts' and softirqs' on
/// [`HOP_CPU`] (the hop's work: its devices receive there, beside a
/// [`Soaker`]'s user time). Not the CPU's system time: kernel threads
/// that happen to run there (kdamond reclaiming memory, a compiler's
/// system calls) book theirs as that, and the hop's work books none.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuTime {
    pub machine: f64,
    pub hop: f64,
}

/// A busy loop at the lowest priority on one CPU, so that the CPU never
/// idles while it runs. An idle CPU with its tick stopped books the
/// interrupts and softirqs it serves as idle time; a busy one books them
/// right, and the soaker yields to all of them.
pub struct Soaker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Soaker {
    pub fn start(cpu: usize) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            pin_to_cpu(cpu);
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sets the calling thread's own policy; `param` is valid.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param) };
            while !flag.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Soaker {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl CpuTime {
    pub fn now() -> Self {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        // Fields: user nice system idle iowait irq softirq steal ...
        let seconds = |name: &str, fields: &[usize]| -> f64 {
            let ticks: Vec<u64> = stat
                .lines()
                .find(|l| l.split_whitespace().next() == Some(name))
                .unwrap_or_default()
                .split_whitespace()
                .skip(1)
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            let sum: u64 = fields.iter().filter_map(|&i| ticks.get(i)).sum();
            sum as f64 / clock_ticks()
        };
        Self {
            machine: seconds("cpu", &[0, 1, 2, 5, 6, 7]),
            hop: seconds(&format!("cpu{HOP_CPU}"), &[5, 6]),
        }
    }

    pub fn since(self, start: Self) -> Self {
        Self {
            machine: self.machine - start.machine,
            hop: self.hop - start.hop,
        }
    }
}

/// Waits (up to 20 s) until the machine is nearly idle: namespaces and
/// big maps of a previous run are torn down by kernel workers in the
/// background, and must not be measured with the next.
pub fn settle() {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let before = CpuTime::now();
        std::thread::sleep(Duration::from_millis(500));
        if CpuTime::now().since(before).machine < 0.05 {
            return;
        }
    }
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a constant.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds (user + system) of the processes in namespace `ns` so far.
pub fn namespace_cpu(ns: &NetNs) -> f64 {
    let pids = run(Command::new("ip").args(["netns", "pids", ns.name()]));
    let ticks: u64 = pids
        .split_whitespace()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            // Fields after the command name (which may hold spaces):
            // state is field 3, utime 14 and stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let fields: Vec<u64> = rest
                .split_whitespace()
                .map(|v| v.parse().unwrap_or(0))
                .collect();
            fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0)
        })
        .sum();
    ticks as f64 / clock_ticks()
}

/// A TCP receiver in the calling thread's namespace that discards what it
/// is sent; its port.
pub fn tcp_discard() -> u16 {
    let listener = TcpListener::bind("0.0.0.0:0").expect("binding the discard server");
    let port = listener.local_addr().expect("bound").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            std::thread::spawn(move || {
                pin_to_cpu(ENDPOINT_CPU);
                let mut buffer = vec![0u8; 1 << 18];
                while matches!(stream.read(&mut buffer), Ok(n) if n > 0) {}
            });
        }
    });
    port
}

/// One TCP stream to `target` for `duration` (from the calling thread's
/// namespace, on [`ENDPOINT_CPU`]); the bytes it carried.
pub fn tcp_stream(target: SocketAddr, duration: Duration) -> u64 {
    pin_to_cpu(ENDPOINT_CPU);
    // Generous: a flood just before may still be queued in userspace
    // WireGuard, ahead of the handshake.
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("connecting to {target}: {e}"));
    let chunk = vec![0x5au8; 1 << 18];
    let deadline = Instant::now() + duration;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        match stream.write(&chunk) {
            Ok(n) => sent += n as u64,
            Err(e) => panic!("sending to {target}: {e}"),
        }
    }
    sent
}

/// conntrack's limit of connections (settable only from the first
/// network namespace; the others read it).
pub const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
/// conntrack's hash table's bucket count, shared by every namespace.
pub const CONNTRACK_HASHSIZE: &str = "/sys/module/nf_conntrack/parameters/hashsize";

/// A kernel setting raised (if below) for a while and put back on drop, so
/// that a run leaves the machine as it found it.
pub struct KernelSetting {
    path: &'static str,
    /// What it was, if it was raised.
    before: Option<String>,
}

impl KernelSetting {
    pub fn at_least(path: &'static str, value: u64) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let now = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
        if now.trim().parse::<u64>().unwrap_or(0) >= value {
            // Not written at all: writing conntrack's hashsize rehashes
            // every connection, even to the same size.
            return Ok(Self { path, before: None });
        }
        std::fs::write(path, value.to_string())
            .with_context(|| format!("writing {value} to {path}"))?;
        Ok(Self {
            path,
            before: Some(now),
        })
    }
}

impl Drop for KernelSetting {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = std::fs::write(self.path, before.trim());
        }
    }
}

/// Where [`unused_routes`] lie: outside every network the benchmarks
/// route (inside the tailnet's 100.64.0.0/10 they would be redundant, and
/// the tries would drop them), and no test traffic goes there.
pub const UNUSED_NET: ipnet::Ipv4Net = match ipnet::Ipv4Net::new(Ipv4Addr::new(44, 0, 0, 0), 8) {
    Ok(net) => net,
    Err(_) => panic!("a valid prefix"),
};

/// `n` host routes in [`UNUSED_NET`] that no traffic uses: they only make
/// the tables bigger.
pub fn unused_routes(n: usize) -> impl Iterator<Item = ipnet::Ipv4Net> {
    let first = u32::from(UNUSED_NET.network());
    (0..n as u32).map(move |i| ipnet::Ipv4Net::new(Ipv4Addr::from(first + i), 32).expect("a /32"))
}

/// Fails unless the route tries hold all `n` of [`unused_routes`]: a scale
/// point that silently loaded fewer would measure a smaller table than it
/// says.
pub fn check_unused_routes(dp: &tailguard::datapath::Datapath, n: usize) -> anyhow::Result<()> {
    let held = dp
        .routes()?
        .keys()
        .filter(|net| matches!(net, ipnet::IpNet::V4(v4) if UNUSED_NET.contains(v4)))
        .count();
    anyhow::ensure!(
        held == n,
        "the route tries hold {held} of the {n} extra routes"
    );
    Ok(())
}

/// `items` in an order that looks random but is the same every run
/// (Fisher-Yates, driven by splitmix64): consecutive packets of a flood go
/// to flows all over the table, as traffic's would, rather than walking it
/// in the order it was filled.
pub fn shuffle<T>(items: &mut [T]) {
    let mut state = 0x5eed_u64;
    for i in (1..items.len()).rev() {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        items.swap(i, (z % (i as u64 + 1)) as usize);
    }
}
