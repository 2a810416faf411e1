//! TUN devices (L3, like WireGuard and tailscale0) and raw injection of
//! packets on a device's egress path.

use std::{
    fs::{File, OpenOptions},
    io::{ErrorKind, Read, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
    time::{Duration, Instant},
};

use crate::netns::run;

/// A TUN device in the current thread's namespace. Writing to it makes a
/// packet arrive on the device (its ingress); what the kernel sends out of it
/// (its egress) can be read back. Closing it removes the device.
pub struct Tun {
    file: File,
    name: String,
}

nix::ioctl_write_int!(tunsetiff, b'T', 202);

impl Tun {
    /// Creates the device without IPv6 (so the kernel sends nothing on its
    /// own: no router solicitations or MLD reports) and brings it up.
    pub fn create(name: &str) -> Self {
        Self::with_flags(name, 0)
    }

    /// [`Tun::create`], with a `virtio_net_hdr` (10 bytes) before each
    /// packet written, as wireguard-go and tailscaled write theirs: it can
    /// make a GSO packet (one that stands for several), and the kernel
    /// keeps all but the first `hdr_len` bytes out of the linear head.
    pub fn create_with_vnet_hdr(name: &str) -> Self {
        Self::with_flags(name, libc::IFF_VNET_HDR)
    }

    fn with_flags(name: &str, flags: libc::c_int) -> Self {
        assert!(
            name.len() < libc::IFNAMSIZ,
            "interface name {name} too long"
        );
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .unwrap_or_else(|e| panic!("opening /dev/net/tun (is the tun module available?): {e}"));
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | flags) as libc::c_short;
        // SAFETY: TUNSETIFF reads an `ifreq`, which `ifr` is.
        unsafe { tunsetiff(file.as_raw_fd(), &raw const ifr as u64) }
            .unwrap_or_else(|e| panic!("TUNSETIFF {name}: {e}"));
        crate::netns::sysctl(&format!("net.ipv6.conf.{name}.disable_ipv6"), "1");
        run(std::process::Command::new("ip").args(["link", "set", "dev", name, "up"]));
        Self {
            file,
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ifindex(&self) -> u32 {
        nix::net::if_::if_nametoindex(self.name.as_str()).expect("TUN device exists")
    }

    /// Makes `packet` (an IP packet) arrive on the device.
    pub fn inject(&mut self, packet: &[u8]) {
        let n = self
            .file
            .write(packet)
            .unwrap_or_else(|e| panic!("writing to {}: {e}", self.name));
        assert_eq!(n, packet.len(), "short write to {}", self.name);
    }

    /// Reads every packet the device sent out, waiting until `count` have
    /// come or `timeout` passed, then a little more to catch extras.
    pub fn read_sent(&mut self, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let mut packets = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut settle: Option<Instant> = None;
        let mut buf = vec![0u8; 65536];
        loop {
            match self.file.read(&mut buf) {
                Ok(n) => packets.push(buf[..n].to_vec()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let now = Instant::now();
                    if packets.len() >= count {
                        let until = *settle.get_or_insert(now + Duration::from_millis(200));
                        if now >= until {
                            return packets;
                        }
                    } else if now >= deadline {
                        return packets;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("reading from {}: {e}", self.name),
            }
        }
    }
}

/// Sends IP packets out of a device through an `AF_PACKET` socket: they take
/// the device's egress path (TC egress included) as if the kernel had routed
/// them there, with no address or route needed.
pub struct EgressInjector {
    fd: OwnedFd,
}

impl EgressInjector {
    pub fn new() -> Self {
        // Protocol 0: this socket only sends, it receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` is a fresh, owned descriptor.
        Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        }
    }

    pub fn send(&self, ifindex: u32, packet: &[u8]) {
        let ethertype: u16 = match packet.first().map(|b| b >> 4) {
            Some(4) => libc::ETH_P_IP as u16,
            Some(6) => libc::ETH_P_IPV6 as u16,
            _ => panic!("not an IP packet"),
        };
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = ethertype.to_be();
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: valid buffer and address of the stated lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            packet.len() as isize,
            "sendto: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Default for EgressInjector {
    fn default() -> Self {
        Self::new()
    }
}
