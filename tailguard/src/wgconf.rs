//! The wg-quick configuration file (`/etc/wireguard/wg0.conf`), parsed the
//! way wg-quick and `wg setconf` read it: sections and keys in any case,
//! `#` comments, whitespace ignored, comma-separated lists, list keys that
//! may repeat (their values add up) and scalar keys where the last wins.
//!
//! Errors name the file, the line and what is wrong. Key material is checked
//! (base64 of 32 bytes) but never printed: private and preshared keys are
//! [`SecretKey`]s, whose `Debug` hides them.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use ipnet::IpNet;

/// A whole configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgConfig {
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

/// The `[Interface]` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    pub private_key: Option<SecretKey>,
    pub listen_port: Option<u16>,
    /// `None`: not set (or `off`).
    pub fwmark: Option<u32>,
    /// Addresses with their prefix length (`10.1.0.2/24`): the prefix makes
    /// the on-link route, as `ip address add` does.
    pub addresses: Vec<IpNet>,
    pub dns_servers: Vec<IpAddr>,
    pub dns_search: Vec<String>,
    pub mtu: Option<u32>,
    pub table: Table,
    pub pre_up: Vec<String>,
    pub post_up: Vec<String>,
    pub pre_down: Vec<String>,
    pub post_down: Vec<String>,
    pub save_config: bool,
}

/// `Table =`: which routing table gets the AllowedIPs routes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Table {
    /// The main table, or for default routes a table of their own chosen
    /// with policy routing (wg-quick's default).
    #[default]
    Auto,
    /// Add no routes at all.
    Off,
    /// This table.
    Id(u32),
}

/// A `[Peer]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub public_key: PublicKey,
    pub preshared_key: Option<SecretKey>,
    /// Normalised to their network address, as the kernel stores them.
    pub allowed_ips: Vec<IpNet>,
    pub endpoint: Option<Endpoint>,
    pub persistent_keepalive: Option<u16>,
    /// Line of the `[Peer]` header, for messages about this peer.
    pub line: usize,
}

/// `Endpoint =`: an address, or a host name to resolve (again, every minute,
/// for peers behind dynamic DNS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Address(SocketAddr),
    Host { host: String, port: u16 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(a) => write!(f, "{a}"),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A public key: fine to show.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A private or preshared key: never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey(pub [u8; 32]);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<hidden>)")
    }
}

/// What is wrong, and where.
#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the problem is the file as a whole.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 => write!(f, "{}: {}", self.file.display(), self.message),
            line => write!(f, "{}:{line}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

impl WgConfig {
    /// Reads and parses `path`. The second value holds warnings (a file
    /// others can read, as wg-quick warns).
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let whole = |message: String| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| whole(format!("cannot read: {e}")))?;
        let mut warnings = Vec::new();
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                warnings.push(format!(
                    "{} is accessible to group or others (mode {mode:03o}); it holds a private key: chmod 600 it",
                    path.display()
                ));
            }
        }
        let config = parse(&text, path)?;
        if config.interface.save_config {
            warnings.push(format!(
                "{}: SaveConfig = true is ignored: TailGuard never rewrites its configuration",
                path.display()
            ));
        }
        Ok((config, warnings))
    }
}

/// Parses configuration text; `file` is only used in messages.
pub fn parse(text: &str, file: &Path) -> Result<WgConfig, ConfigError> {
    let mut parser = Parser {
        file,
        interface: Interface::default(),
        peers: Vec::new(),
        section: None,
    };
    for (index, raw) in text.lines().enumerate() {
        parser.line(index + 1, raw)?;
    }
    parser.finish()
}

#[derive(Clone, Copy)]
enum Section {
    Interface,
    Peer,
}

/// A `[Peer]` being read: its keys may come in any order.
struct PeerDraft {
    line: usize,
    public_key: Option<PublicKey>,
    preshared_key: Option<SecretKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
}

struct Parser<'a> {
    file: &'a Path,
    interface: Interface,
    peers: Vec<PeerDraft>,
    section: Option<Section>,
}

impl Parser<'_> {
    fn error(&self, line: usize, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            message: message.into(),
        }
    }

    fn line(&mut self, n: usize, raw: &str) -> Result<(), ConfigError> {
        let content = raw.split('#').next().unwrap_or_default();
        // Hook commands keep their spaces; everything else is read without
        // any whitespace, as `wg` does.
        let trimmed = content.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        if trimmed.starts_with('[') {
            let name: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
            self.section = Some(match name.to_ascii_lowercase().as_str() {
                "[interface]" => Section::Interface,
                "[peer]" => {
                    self.peers.push(PeerDraft {
                        line: n,
                        public_key: None,
                        preshared_key: None,
                        allowed_ips: Vec::new(),
                        endpoint: None,
                        persistent_keepalive: None,
                    });
                    Section::Peer
                }
                _ => return Err(self.error(n, format!("unknown section {trimmed}"))),
            });
            return Ok(());
        }
        let Some((key, value)) = trimmed.split_once('=') else {
            return Err(self.error(n, format!("expected `Key = value`, found {trimmed:?}")));
        };
        let key = key.trim();
        let hook_value = value.trim().to_string();
        let value: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        let lower = key.to_ascii_lowercase();
        match self.section {
            None => Err(self.error(
                n,
                format!("{key} is outside of any [Interface] or [Peer] section"),
            )),
            Some(Section::Interface) => self.interface_key(n, key, &lower, &value, hook_value),
            Some(Section::Peer) => self.peer_key(n, key, &lower, &value),
        }
    }

    fn interface_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
        hook: String,
    ) -> Result<(), ConfigError> {
        let err = key_error(self.file, n, key);
        match lower {
            "privatekey" => {
                self.interface.private_key = Some(SecretKey(decode_key(value).map_err(err)?))
            }
            "listenport" => self.interface.listen_port = Some(parse_port(value).map_err(err)?),
            "fwmark" => self.interface.fwmark = parse_fwmark(value).map_err(err)?,
            "address" => {
                for item in list(value) {
                    let net = parse_address(item).map_err(&err)?;
                    self.interface.addresses.push(net);
                }
            }
            "dns" => {
                for item in list(value) {
                    match item.parse::<IpAddr>() {
                        Ok(addr) => self.interface.dns_servers.push(addr),
                        Err(_) => self
                            .interface
                            .dns_search
                            .push(parse_domain(item).map_err(&err)?),
                    }
                }
            }
            "mtu" => {
                let mtu = value
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (576..=65535).contains(m));
                self.interface.mtu =
                    Some(mtu.ok_or_else(|| {
                        err(format!("{value:?} is not an MTU from 576 to 65535"))
                    })?);
            }
            "table" => self.interface.table = parse_table(value).map_err(err)?,
            "preup" => self.interface.pre_up.push(hook),
            "postup" => self.interface.post_up.push(hook),
            "predown" => self.interface.pre_down.push(hook),
            "postdown" => self.interface.post_down.push(hook),
            "saveconfig" => {
                self.interface.save_config = match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err(format!("{value:?} is neither true nor false"))),
                }
            }
            _ => return Err(self.error(n, format!("unknown key {key} in [Interface]"))),
        }
        Ok(())
    }

    fn peer_key(
        &mut self,
        n: usize,
        key: &str,
        lower: &str,
        value: &str,
    ) -> Result<(), ConfigError> {
        let err = key_error(self.file, n, key);
        let mut parsed_allowed = Vec::new();
        let mut public_key = None;
        let mut preshared_key = None;
        let mut endpoint = None;
        let mut keepalive = None;
        match lower {
            "publickey" => public_key = Some(PublicKey(decode_key(value).map_err(err)?)),
            "presharedkey" => preshared_key = Some(SecretKey(decode_key(value).map_err(err)?)),
            "allowedips" => {
                for item in list(value) {
                    parsed_allowed.push(parse_prefix(item).map_err(&err)?.trunc());
                }
            }
            "endpoint" => endpoint = Some(parse_endpoint(value).map_err(err)?),
            "persistentkeepalive" => {
                keepalive = Some(if value.eq_ignore_ascii_case("off") {
                    0
                } else {
                    value.parse::<u16>().map_err(|_| {
                        err(format!(
                            "{value:?} is neither off nor a number of seconds up to 65535"
                        ))
                    })?
                })
            }
            _ => return Err(self.error(n, format!("unknown key {key} in [Peer]"))),
        }
        let peer = self.peers.last_mut().expect("a [Peer] section was opened");
        peer.allowed_ips.extend(parsed_allowed);
        peer.public_key = public_key.or(peer.public_key);
        peer.preshared_key = preshared_key.or(peer.preshared_key.take());
        peer.endpoint = endpoint.or(peer.endpoint.take());
        peer.persistent_keepalive = keepalive.or(peer.persistent_keepalive);
        Ok(())
    }

    fn finish(self) -> Result<WgConfig, ConfigError> {
        let mut peers = Vec::with_capacity(self.peers.len());
        for draft in self.peers {
            let public_key = draft
                .public_key
                .ok_or_else(|| self_error(self.file, draft.line, "[Peer] has no PublicKey"))?;
            if peers.iter().any(|p: &Peer| p.public_key == public_key) {
                return Err(self_error(
                    self.file,
                    draft.line,
                    &format!("peer {public_key} appears twice"),
                ));
            }
            peers.push(Peer {
                public_key,
                preshared_key: draft.preshared_key,
                allowed_ips: draft.allowed_ips,
                endpoint: draft.endpoint,
                persistent_keepalive: draft.persistent_keepalive.filter(|k| *k != 0),
                line: draft.line,
            });
        }
        if self.interface.private_key.is_none() {
            return Err(self_error(self.file, 0, "[Interface] has no PrivateKey"));
        }
        Ok(WgConfig {
            interface: self.interface,
            peers,
        })
    }
}

/// Makes errors about one key on one line: "file:line: Key: message".
fn key_error<'a>(file: &'a Path, line: usize, key: &'a str) -> impl Fn(String) -> ConfigError + 'a {
    move |message| ConfigError {
        file: file.to_path_buf(),
        line,
        message: format!("{key}: {message}"),
    }
}

fn self_error(file: &Path, line: usize, message: &str) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        line,
        message: message.to_string(),
    }
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|s| !s.is_empty())
}

/// A WireGuard key: base64 of exactly 32 bytes. The message never repeats
/// the value.
fn decode_key(value: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| {
            "not a valid key (expected 32 bytes in base64, as `wg genkey` prints)".to_string()
        })?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("not a valid key: {} bytes instead of 32", bytes.len()))
}

fn parse_port(value: &str) -> Result<u16, String> {
    value
        .parse()
        .map_err(|_| format!("{value:?} is not a port from 0 to 65535"))
}

/// `off`, a decimal number or a `0x` hexadecimal one; 0 means off.
fn parse_fwmark(value: &str) -> Result<Option<u32>, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse(),
    };
    let mark = parsed.map_err(|_| format!("{value:?} is neither off nor a 32-bit number"))?;
    Ok((mark != 0).then_some(mark))
}

/// An interface address: with a prefix length, or a single host.
fn parse_address(value: &str) -> Result<IpNet, String> {
    if value.contains('/') {
        return parse_prefix(value);
    }
    value
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("{value:?} is not an address like 10.0.0.2/24"))
}

fn parse_prefix(value: &str) -> Result<IpNet, String> {
    if !value.contains('/') {
        // wg accepts a bare address as a host route.
        if let Ok(addr) = value.parse::<IpAddr>() {
            return Ok(IpNet::from(addr));
        }
    }
    value
        .parse::<IpNet>()
        .map_err(|_| format!("{value:?} is not a prefix like 10.0.0.0/24"))
}

fn parse_domain(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 253
        && value.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(value.to_string())
    } else {
        Err(format!(
            "{value:?} is neither an IP address nor a search domain"
        ))
    }
}

fn parse_table(value: &str) -> Result<Table, String> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Ok(Table::Auto),
        "off" => Ok(Table::Off),
        // The names iproute2 defines in every rt_tables file.
        "main" => Ok(Table::Id(254)),
        "local" => Ok(Table::Id(255)),
        "default" => Ok(Table::Id(253)),
        _ => match value.parse::<u32>() {
            Ok(id) if id != 0 => Ok(Table::Id(id)),
            _ => Err(format!(
                "{value:?} is not off, auto, main or a table number"
            )),
        },
    }
}

/// `host:port`, `1.2.3.4:port` or `[v6]:port`.
fn parse_endpoint(value: &str) -> Result<Endpoint, String> {
    if let Ok(addr) = value.parse::<SocketAddr>() {
        return Ok(Endpoint::Address(addr));
    }
    let bad = || format!("{value:?} is not host:port, address:port or [IPv6]:port");
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.starts_with('[') || host.contains(':') || host.is_empty() {
        return Err(bad());
    }
    parse_domain(host).map_err(|_| bad())?;
    Ok(Endpoint::Host {
        host: host.to_string(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUBLIC: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PSK: &str = "FpCyhws9cxwWoV4xELtfJvjJN+zQVRPISllRWgeopVE=";

    fn file() -> &'static Path {
        Path::new("/etc/wireguard/wg0.conf")
    }

    fn ok(text: &str) -> WgConfig {
        parse(text, file()).unwrap_or_else(|e| panic!("{e}"))
    }

    fn err(text: &str) -> String {
        parse(text, file()).expect_err("must fail").to_string()
    }

    /// The seed README's example, with real keys.
    fn seed_example() -> String {
        format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 10.1.0.2/24,fd00:ed7c:a960:6e9b::2/64\n\
             DNS = 10.1.0.1,fd00:ed7c:a960:6e9b::1\nMTU = 1420\n\n[Peer]\nPublicKey = {PUBLIC}\n\
             PresharedKey = {PSK}\nAllowedIPs = 0.0.0.0/0,::/0,192.168.8.0/24\n\
             Endpoint = vpn.example.net:51820\nPersistentKeepalive = 25\n"
        )
    }

    #[test]
    fn parses_the_seed_example() {
        let c = ok(&seed_example());
        let i = &c.interface;
        assert_eq!(
            i.addresses,
            ["10.1.0.2/24", "fd00:ed7c:a960:6e9b::2/64"].map(|a| a.parse::<IpNet>().unwrap())
        );
        assert_eq!(
            i.dns_servers,
            ["10.1.0.1", "fd00:ed7c:a960:6e9b::1"].map(|a| a.parse::<IpAddr>().unwrap())
        );
        assert_eq!(i.mtu, Some(1420));
        assert_eq!(i.table, Table::Auto);
        assert_eq!(c.peers.len(), 1);
        let p = &c.peers[0];
        assert_eq!(p.public_key.to_string(), PUBLIC);
        assert!(p.preshared_key.is_some());
        assert_eq!(
            p.allowed_ips,
            ["0.0.0.0/0", "::/0", "192.168.8.0/24"].map(|a| a.parse::<IpNet>().unwrap())
        );
        assert_eq!(
            p.endpoint,
            Some(Endpoint::Host {
                host: "vpn.example.net".into(),
                port: 51820
            })
        );
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.line, 7);
    }

    #[test]
    fn every_interface_key_in_any_case_with_comments() {
        let c = ok(&format!(
            "# a comment\n[interface]   # section names in any case\n\
             privatekey={PRIVATE}\nLISTENPORT = 51820\nFwMark = 0x1234\n\
             Address = 10.0.0.1/24\naddress = fd00::1/64, 10.0.1.1  # repeated key adds up\n\
             DNS = 9.9.9.9, corp.example, lan\nMtu = 1380\nTable = 1234\n\
             PreUp = echo pre up %i\nPostUp = iptables -A FORWARD -i %i -j ACCEPT\nPostUp = echo two\n\
             PreDown = echo pre down\nPostDown = echo post down\nSaveConfig = false\n"
        ));
        let i = &c.interface;
        assert!(i.private_key.is_some());
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(i.fwmark, Some(0x1234));
        assert_eq!(
            i.addresses,
            ["10.0.0.1/24", "fd00::1/64", "10.0.1.1/32"].map(|a| a.parse::<IpNet>().unwrap())
        );
        assert_eq!(i.dns_servers, vec!["9.9.9.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(i.dns_search, ["corp.example", "lan"]);
        assert_eq!(i.mtu, Some(1380));
        assert_eq!(i.table, Table::Id(1234));
        assert_eq!(i.pre_up, ["echo pre up %i"]);
        assert_eq!(
            i.post_up,
            ["iptables -A FORWARD -i %i -j ACCEPT", "echo two"]
        );
        assert_eq!(i.pre_down, ["echo pre down"]);
        assert_eq!(i.post_down, ["echo post down"]);
        assert!(!i.save_config);
        assert!(c.peers.is_empty());
    }

    #[test]
    fn table_and_fwmark_spellings() {
        let with =
            |line: &str| ok(&format!("[Interface]\nPrivateKey={PRIVATE}\n{line}\n")).interface;
        assert_eq!(with("Table = off").table, Table::Off);
        assert_eq!(with("Table = auto").table, Table::Auto);
        assert_eq!(with("Table = main").table, Table::Id(254));
        assert_eq!(with("FwMark = off").fwmark, None);
        assert_eq!(with("FwMark = 0").fwmark, None);
        assert_eq!(with("FwMark = 51820").fwmark, Some(51820));
        assert!(with("SaveConfig = true").save_config);
    }

    #[test]
    fn peers_with_every_key_and_repeated_allowed_ips() {
        let c = ok(&format!(
            "[Interface]\nPrivateKey={PRIVATE}\n[Peer]\nPublicKey={PUBLIC}\nAllowedIPs=10.9.0.0/24\n\
             AllowedIPs = 10.10.0.7/16, 10.11.0.1\nEndpoint = [2001:db8::1]:51820\nPersistentKeepalive = off\n\
             [PEER]\nPublicKey={PSK}\nEndpoint=203.0.113.9:4500\n"
        ));
        let a = &c.peers[0];
        assert_eq!(
            a.allowed_ips,
            ["10.9.0.0/24", "10.10.0.0/16", "10.11.0.1/32"].map(|a| a.parse::<IpNet>().unwrap()),
            "host bits are cleared as the kernel does"
        );
        assert_eq!(
            a.endpoint,
            Some(Endpoint::Address("[2001:db8::1]:51820".parse().unwrap()))
        );
        assert_eq!(a.persistent_keepalive, None);
        assert_eq!(
            c.peers[1].endpoint,
            Some(Endpoint::Address("203.0.113.9:4500".parse().unwrap()))
        );
    }

    #[test]
    fn errors_name_file_line_and_problem() {
        let base = format!("[Interface]\nPrivateKey={PRIVATE}\n");
        let cases = [
            (
                format!("{base}Address = 10.0.0.300/24\n"),
                "wg0.conf:3: Address: \"10.0.0.300/24\" is not a prefix",
            ),
            (
                format!("{base}ListenPort = 70000\n"),
                "wg0.conf:3: ListenPort: \"70000\" is not a port",
            ),
            (
                format!("{base}MTU = 9\n"),
                "wg0.conf:3: MTU: \"9\" is not an MTU",
            ),
            (
                format!("{base}Table = sometimes\n"),
                "wg0.conf:3: Table: \"sometimes\" is not off, auto",
            ),
            (
                format!("{base}FwMark = 0xzz\n"),
                "wg0.conf:3: FwMark: \"0xzz\" is neither off nor",
            ),
            (
                format!("{base}SaveConfig = maybe\n"),
                "wg0.conf:3: SaveConfig",
            ),
            (
                format!("{base}DNS = 1.1.1.1, bad domain!\n"),
                "wg0.conf:3: DNS: \"baddomain!\"",
            ),
            (
                format!("{base}Colour = blue\n"),
                "wg0.conf:3: unknown key Colour in [Interface]",
            ),
            (
                format!("{base}[Peer]\nPublicKey={PUBLIC}\nAllowedIPs = 10.0.0.0/33\n"),
                "wg0.conf:5: AllowedIPs",
            ),
            (
                format!("{base}[Peer]\nPublicKey={PUBLIC}\nEndpoint = [::1:51820\n"),
                "wg0.conf:5: Endpoint",
            ),
            (
                format!("{base}[Peer]\nPublicKey={PUBLIC}\nEndpoint = host.example\n"),
                "wg0.conf:5: Endpoint",
            ),
            (
                format!("{base}[Peer]\nPublicKey={PUBLIC}\nPersistentKeepalive = soon\n"),
                "wg0.conf:5: PersistentKeepalive",
            ),
            (
                format!("{base}[Peer]\nAllowedIPs = 10.0.0.0/24\n"),
                "wg0.conf:3: [Peer] has no PublicKey",
            ),
            (
                format!("{base}[Peer]\nPublicKey={PUBLIC}\n[Peer]\nPublicKey={PUBLIC}\n"),
                "wg0.conf:5: peer xTIBA",
            ),
            (
                format!("{base}[Peer]\nFoo = 1\n"),
                "wg0.conf:4: unknown key Foo in [Peer]",
            ),
            (
                format!("{base}[Wat]\n"),
                "wg0.conf:3: unknown section [Wat]",
            ),
            (
                format!("{base}just words\n"),
                "wg0.conf:3: expected `Key = value`",
            ),
            (
                "Address = 10.0.0.1/24\n".to_string(),
                "wg0.conf:1: Address is outside of any",
            ),
            (
                "[Interface]\nAddress = 10.0.0.1/24\n".to_string(),
                "wg0.conf: [Interface] has no PrivateKey",
            ),
        ];
        for (text, expected) in cases {
            let e = err(&text);
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
            assert!(e.starts_with("/etc/wireguard/wg0.conf:"), "{e}");
        }
    }

    #[test]
    fn bad_keys_are_reported_without_their_value() {
        let secretish = "c2VjcmV0LXZhbHVlLXRoYXQtaXMtdG9vLXNob3J0";
        for key in ["PrivateKey", "PresharedKey"] {
            let text = if key == "PrivateKey" {
                format!("[Interface]\nPrivateKey = {secretish}\n")
            } else {
                format!(
                    "[Interface]\nPrivateKey={PRIVATE}\n[Peer]\nPublicKey={PUBLIC}\nPresharedKey = {secretish}\n"
                )
            };
            let e = err(&text);
            assert!(
                e.contains(&format!("{key}: not a valid key: 30 bytes instead of 32")),
                "{e}"
            );
            assert!(!e.contains(secretish), "the value must not be echoed: {e}");
        }
        let e = err("[Interface]\nPrivateKey = not*base64\n");
        assert!(
            e.contains("PrivateKey: not a valid key (expected 32 bytes in base64")
                && !e.contains("not*base64"),
            "{e}"
        );
    }

    #[test]
    fn debug_output_never_shows_secret_keys() {
        let shown = format!("{:?}", ok(&seed_example()));
        assert!(!shown.contains(PRIVATE) && !shown.contains(PSK), "{shown}");
        assert!(shown.contains(PUBLIC), "public keys may be shown: {shown}");
    }

    #[test]
    fn load_warns_when_others_can_read_the_file() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("tg-wgconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("wg0.conf");
        std::fs::write(&path, seed_example()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let (_, warnings) = WgConfig::load(&path).unwrap();
        assert!(
            warnings.len() == 1
                && warnings[0].contains("mode 644")
                && warnings[0].contains("chmod 600"),
            "{warnings:?}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(WgConfig::load(&path).unwrap().1.is_empty());
        std::fs::write(
            &path,
            seed_example().replace("MTU = 1420", "MTU = 1420\nSaveConfig = true"),
        )
        .unwrap();
        let (_, warnings) = WgConfig::load(&path).unwrap();
        assert!(
            warnings.len() == 1 && warnings[0].contains("SaveConfig = true is ignored"),
            "{warnings:?}"
        );
        let missing = WgConfig::load(&dir.join("wg9.conf"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("wg9.conf: cannot read"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
