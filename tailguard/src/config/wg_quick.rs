//! The wg-quick configuration file (`/etc/wireguard/wg0.conf`), parsed the
//! way wg-quick and `wg setconf` read it: sections and keys in any case,
//! `#` comments, whitespace ignored, comma-separated lists, list keys that
//! may repeat (their values add up) and scalar keys where the last wins.
//!
//! Errors name the file, the line and what is wrong. Key material is checked
//! (base64 of 32 bytes) but never printed: private and preshared keys are
//! [`SecretKey`]s, whose `Debug` hides them, and every message is redacted
//! ([`crate::config::secrets::redact`]) since a typo can put a key where a name was
//! expected.

pub mod render;

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6},
    path::{Path, PathBuf},
};

use base64::Engine as _;
use ipnet::IpNet;

use crate::config::{
    secrets::{plain_name, redact},
    tailnet::{TAILNET_RANGES, TAILSCALE_MARK_MASK, TAILSCALE_TABLE},
};

/// A whole configuration file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgConfig {
    pub interface: Interface,
    pub peers: Vec<Peer>,
}

/// The `[Interface]` section. `Key` is what holds the private key: the
/// parser reads into an `Interface<Option<SecretKey>>`, since the key may
/// come last, and hands out an `Interface` only once it has one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface<Key = SecretKey> {
    pub private_key: Key,
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

impl Interface<Option<SecretKey>> {
    /// The section read, if it has its private key.
    fn with_private_key(self) -> Option<Interface> {
        let Self {
            private_key,
            listen_port,
            fwmark,
            addresses,
            dns_servers,
            dns_search,
            mtu,
            table,
            pre_up,
            post_up,
            pre_down,
            post_down,
            save_config,
        } = self;
        Some(Interface {
            private_key: private_key?,
            listen_port,
            fwmark,
            addresses,
            dns_servers,
            dns_search,
            mtu,
            table,
            pre_up,
            post_up,
            pre_down,
            post_down,
            save_config,
        })
    }
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

impl ConfigError {
    /// An error at `line` of `file`. The message is redacted here, once for
    /// every path that builds one: it may quote the input back.
    fn new(file: &Path, line: usize, message: impl AsRef<str>) -> Self {
        Self {
            file: file.to_path_buf(),
            line,
            message: redact(message.as_ref()).into_owned(),
        }
    }
}

impl WgConfig {
    /// Reads and parses `path`. The second value holds warnings: a file
    /// others can read (as wg-quick warns), and lines that parse but will
    /// not do what they seem to.
    pub fn load(path: &Path) -> Result<(Self, Vec<String>), ConfigError> {
        let bytes = std::fs::read(path)
            .map_err(|e| ConfigError::new(path, 0, format!("cannot read: {e}")))?;
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
        let (config, parse_warnings) = parse_bytes(&bytes, path)?;
        warnings.extend(parse_warnings);
        if config.interface.save_config {
            warnings.push(format!(
                "{}: SaveConfig = true is ignored: TailGuard never rewrites its configuration",
                path.display()
            ));
        }
        Ok((config, warnings))
    }

    /// Whether any IPv6 is configured: an address or a peer's AllowedIPs.
    fn has_ipv6(&self) -> bool {
        self.interface.addresses.iter().any(|a| a.addr().is_ipv6())
            || self
                .peers
                .iter()
                .flat_map(|p| &p.allowed_ips)
                .any(|n| n.addr().is_ipv6())
    }
}

/// Parses configuration text; `file` is only used in messages.
pub fn parse(text: &str, file: &Path) -> Result<WgConfig, ConfigError> {
    parse_bytes(text.as_bytes(), file).map(|(config, _)| config)
}

/// Parses a file's bytes as wg-quick does: a UTF-8 byte-order mark, CRLF
/// line ends and any bytes inside comments are accepted. The second value
/// holds warnings ("file:line: ...").
pub fn parse_bytes(bytes: &[u8], file: &Path) -> Result<(WgConfig, Vec<String>), ConfigError> {
    const BOM: &[u8] = b"\xef\xbb\xbf";
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let mut parser = Parser {
        file,
        interface: Interface::default(),
        interface_lines: KeyLines::default(),
        peers: Vec::new(),
        section: None,
        warnings: Vec::new(),
    };
    for (index, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = index + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        // Comments may hold anything; the rest must be text.
        let content = raw.split(|b| *b == b'#').next().unwrap_or_default();
        let content = std::str::from_utf8(content).map_err(|_| {
            ConfigError::new(file, n, "this line is not UTF-8 text (outside a comment)")
        })?;
        parser.line(n, content)?;
    }
    parser.finish()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Interface,
    Peer,
}

/// The keys wg-quick knows, by section, in their usual spelling.
const INTERFACE_KEYS: [&str; 12] = [
    "PrivateKey",
    "ListenPort",
    "FwMark",
    "Address",
    "DNS",
    "MTU",
    "Table",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
    "SaveConfig",
];
const PEER_KEYS: [&str; 5] = [
    "PublicKey",
    "PresharedKey",
    "AllowedIPs",
    "Endpoint",
    "PersistentKeepalive",
];
/// Keys whose values add up when repeated; any other key may appear once.
const LIST_KEYS: [&str; 7] = [
    "Address",
    "DNS",
    "AllowedIPs",
    "PreUp",
    "PostUp",
    "PreDown",
    "PostDown",
];

impl Section {
    fn name(self) -> &'static str {
        match self {
            Self::Interface => "[Interface]",
            Self::Peer => "[Peer]",
        }
    }

    fn keys(self) -> &'static [&'static str] {
        match self {
            Self::Interface => &INTERFACE_KEYS,
            Self::Peer => &PEER_KEYS,
        }
    }

    /// The key as this section spells it, whatever its case.
    fn key(self, name: &str) -> Option<&'static str> {
        self.keys()
            .iter()
            .copied()
            .find(|k| k.eq_ignore_ascii_case(name))
    }
}

/// Lines on which a section's single-valued keys were given.
#[derive(Default)]
struct KeyLines(Vec<(&'static str, usize)>);

impl KeyLines {
    fn of(&self, key: &str) -> Option<usize> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, n)| *n)
    }
}

/// A `[Peer]` being read: its keys may come in any order.
struct PeerDraft {
    line: usize,
    lines: KeyLines,
    public_key: Option<PublicKey>,
    preshared_key: Option<SecretKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: Option<u16>,
}

struct Parser<'a> {
    file: &'a Path,
    interface: Interface<Option<SecretKey>>,
    interface_lines: KeyLines,
    peers: Vec<PeerDraft>,
    section: Option<Section>,
    warnings: Vec<String>,
}

impl Parser<'_> {
    fn error(&self, line: usize, message: impl AsRef<str>) -> ConfigError {
        ConfigError::new(self.file, line, message)
    }

    fn warn(&mut self, line: usize, message: impl AsRef<str>) {
        let warning = ConfigError::new(self.file, line, message);
        self.warnings.push(warning.to_string());
    }

    /// Reads one line. What it says about the line hides the secrets the
    /// line holds as written, whatever reading did to them.
    fn line(&mut self, n: usize, content: &str) -> Result<(), ConfigError> {
        let secrets = crate::config::secrets::secret_tokens(content);
        let warned = self.warnings.len();
        let result = self.read_line(n, content);
        for warning in &mut self.warnings[warned..] {
            *warning = crate::config::secrets::redact_with(warning, &secrets);
        }
        result.map_err(|mut e| {
            e.message = crate::config::secrets::redact_with(&e.message, &secrets);
            e
        })
    }

    fn read_line(&mut self, n: usize, content: &str) -> Result<(), ConfigError> {
        // Hook commands keep their spaces; everything else is read without
        // any whitespace, as `wg` does (so `Private Key` is `PrivateKey`).
        let trimmed = content.trim();
        if trimmed.is_empty() {
            return Ok(());
        }
        if trimmed.starts_with('[') {
            return self.section_header(n, trimmed);
        }
        let Some(section) = self.section else {
            let what = key_as_shown(trimmed.split('=').next().unwrap_or_default(), None);
            return Err(self.error(
                n,
                format!("{what} is outside of any [Interface] or [Peer] section"),
            ));
        };
        let (name, value) = trimmed.split_once('=').unwrap_or((trimmed, ""));
        let name: String = name.chars().filter(|c| !c.is_whitespace()).collect();
        let Some(key) = section.key(&name) else {
            return Err(self.unknown_key(n, section, &name, trimmed.contains('=')));
        };
        let hook = value.trim().to_string();
        let value: String = value.chars().filter(|c| !c.is_whitespace()).collect();
        if !LIST_KEYS.contains(&key) {
            self.once(n, section, key)?;
        }
        match section {
            Section::Interface => self.interface_key(n, key, &value, hook),
            Section::Peer => self.peer_key(n, key, &value),
        }
    }

    fn section_header(&mut self, n: usize, trimmed: &str) -> Result<(), ConfigError> {
        let name: String = trimmed.chars().filter(|c| !c.is_whitespace()).collect();
        self.section = Some(match name.to_ascii_lowercase().as_str() {
            "[interface]" => Section::Interface,
            "[peer]" => {
                self.peers.push(PeerDraft {
                    line: n,
                    lines: KeyLines::default(),
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
        Ok(())
    }

    /// Why a key name is not one. A name that only *starts* with a known
    /// key is a missing `=` (`PrivateKey yPGF…=` splits at the key's own
    /// padding): the rest is a value, and never shown.
    fn unknown_key(&self, n: usize, section: Section, name: &str, has_equals: bool) -> ConfigError {
        let known = section.keys().iter().find(|k| {
            name.len() > k.len()
                && name
                    .get(..k.len())
                    .is_some_and(|start| start.eq_ignore_ascii_case(k))
        });
        match known {
            Some(key) => self.error(
                n,
                format!("{key}: expected `{key} = value`; is the `=` missing?"),
            ),
            None if !has_equals => self.error(
                n,
                format!(
                    "expected `Key = value`, found {}",
                    key_as_shown(name, Some(section))
                ),
            ),
            None => self.error(
                n,
                format!(
                    "unknown key {} in {}",
                    key_as_shown(name, Some(section)),
                    section.name()
                ),
            ),
        }
    }

    /// Records a single-valued key; a second one is an error naming both
    /// lines (wg would silently keep the last).
    fn once(&mut self, n: usize, section: Section, key: &'static str) -> Result<(), ConfigError> {
        let lines = match section {
            Section::Interface => &mut self.interface_lines,
            Section::Peer => match self.peers.last_mut() {
                Some(peer) => &mut peer.lines,
                None => return Err(outside_peer(self.file, n, key)),
            },
        };
        let Some(first) = lines.of(key) else {
            lines.0.push((key, n));
            return Ok(());
        };
        Err(if key == "PublicKey" {
            self.error(
                n,
                format!(
                    "a second PublicKey in one [Peer] (the first on line {first}): \
                     is a [Peer] header missing before this line?"
                ),
            )
        } else {
            self.error(
                n,
                format!(
                    "{key} is given twice in one {}, on lines {first} and {n}",
                    section.name()
                ),
            )
        })
    }

    fn interface_key(
        &mut self,
        n: usize,
        key: &'static str,
        value: &str,
        hook: String,
    ) -> Result<(), ConfigError> {
        let err = key_error(self.file, n, key);
        match key {
            "PrivateKey" => {
                self.interface.private_key = Some(SecretKey(decode_key(value).map_err(err)?))
            }
            "ListenPort" => self.interface.listen_port = Some(parse_port(value).map_err(err)?),
            "FwMark" => self.interface.fwmark = parse_fwmark(value).map_err(err)?,
            "Address" => {
                for item in list(value) {
                    let net = parse_address(item).map_err(&err)?;
                    self.interface.addresses.push(net);
                }
            }
            "DNS" => {
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
            "MTU" => {
                let mtu = value
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (576..=65535).contains(m));
                self.interface.mtu =
                    Some(mtu.ok_or_else(|| err(ValueError::Mtu(value.to_string())))?);
            }
            "Table" => self.interface.table = parse_table(value).map_err(err)?,
            "PreUp" => self.interface.pre_up.push(hook),
            "PostUp" => self.interface.post_up.push(hook),
            "PreDown" => self.interface.pre_down.push(hook),
            "PostDown" => self.interface.post_down.push(hook),
            "SaveConfig" => {
                self.interface.save_config = match value.to_ascii_lowercase().as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(err(ValueError::Bool(value.to_string()))),
                }
            }
            _ => unreachable!("every [Interface] key is handled"),
        }
        Ok(())
    }

    fn peer_key(&mut self, n: usize, key: &'static str, value: &str) -> Result<(), ConfigError> {
        let err = key_error(self.file, n, key);
        let mut host_bits = Vec::new();
        let Some(peer) = self.peers.last_mut() else {
            return Err(outside_peer(self.file, n, key));
        };
        match key {
            "PublicKey" => peer.public_key = Some(PublicKey(decode_key(value).map_err(err)?)),
            "PresharedKey" => peer.preshared_key = Some(SecretKey(decode_key(value).map_err(err)?)),
            "AllowedIPs" => {
                for item in list(value) {
                    let net = parse_prefix(item).map_err(&err)?;
                    if net.trunc() != net {
                        host_bits.push(net);
                    }
                    peer.allowed_ips.push(net.trunc());
                }
            }
            "Endpoint" => peer.endpoint = Some(parse_endpoint(value).map_err(err)?),
            "PersistentKeepalive" => {
                peer.persistent_keepalive = Some(if value.eq_ignore_ascii_case("off") {
                    0
                } else {
                    value
                        .parse::<u16>()
                        .map_err(|_| err(ValueError::Keepalive(value.to_string())))?
                })
            }
            _ => unreachable!("every [Peer] key is handled"),
        }
        for net in host_bits {
            self.warn(
                n,
                format!(
                    "AllowedIPs: {net} has host bits set; the kernel uses {}",
                    net.trunc()
                ),
            );
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(WgConfig, Vec<String>), ConfigError> {
        let mut peers: Vec<Peer> = Vec::with_capacity(self.peers.len());
        for draft in std::mem::take(&mut self.peers) {
            let public_key = draft
                .public_key
                .ok_or_else(|| self.error(draft.line, "[Peer] has no PublicKey"))?;
            if let Some(first) = peers.iter().find(|p| p.public_key == public_key) {
                return Err(self.error(
                    draft.line,
                    // Not the key itself: every key-like token is redacted.
                    format!(
                        "this peer has the same PublicKey as the peer at line {}",
                        first.line
                    ),
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
        let Some(interface) = std::mem::take(&mut self.interface).with_private_key() else {
            return Err(self.error(0, "[Interface] has no PrivateKey"));
        };
        let config = WgConfig { interface, peers };
        self.check_interface(&config)?;
        self.warn_about_allowed_ips(&config);
        Ok((config, self.warnings))
    }

    /// What only the whole file can tell about the `[Interface]` keys.
    fn check_interface(&self, config: &WgConfig) -> Result<(), ConfigError> {
        let at = |key| self.interface_lines.of(key).unwrap_or(0);
        let interface = &config.interface;
        if let Some(mtu) = interface.mtu
            && mtu < MIN_IPV6_MTU
            && config.has_ipv6()
        {
            return Err(self.error(
                at("MTU"),
                format!("MTU: {mtu} is below 1280, the least IPv6 allows, and IPv6 is configured"),
            ));
        }
        if let Some(mark) = interface.fwmark {
            if mark & TAILSCALE_MARK_MASK != 0 {
                return Err(self.error(
                    at("FwMark"),
                    format!(
                        "FwMark: {mark:#x} uses bits of {TAILSCALE_MARK_MASK:#x}, which tailscaled \
                         keeps for its own marks; choose a mark outside them"
                    ),
                ));
            }
            if mark == TAILSCALE_TABLE {
                return Err(self.error(
                    at("FwMark"),
                    format!(
                        "FwMark: {mark} is also the routing table of a default route, and table \
                         {TAILSCALE_TABLE} is tailscaled's; choose another mark"
                    ),
                ));
            }
        }
        if interface.table == Table::Id(TAILSCALE_TABLE) {
            return Err(self.error(
                at("Table"),
                format!("Table: {TAILSCALE_TABLE} is tailscaled's routing table; choose another"),
            ));
        }
        Ok(())
    }

    /// AllowedIPs that route somewhere else than they seem: given to two
    /// peers (the kernel keeps each prefix for one peer only), or inside
    /// the tailnet's own ranges (tailnet traffic would go into WireGuard).
    fn warn_about_allowed_ips(&mut self, config: &WgConfig) {
        let tailnet = TAILNET_RANGES;
        for (i, peer) in config.peers.iter().enumerate() {
            for net in &peer.allowed_ips {
                if let Some(range) = tailnet.iter().find(|r| overlaps(r, net)) {
                    self.warn(
                        peer.line,
                        format!(
                            "AllowedIPs: {net} of this peer overlaps the tailnet's range {range}: \
                             tailnet traffic for it would go into WireGuard"
                        ),
                    );
                }
                for other in &config.peers[..i] {
                    if let Some(theirs) = other.allowed_ips.iter().find(|o| overlaps(o, net)) {
                        self.warn(
                            peer.line,
                            format!(
                                "AllowedIPs: {net} of this peer overlaps {theirs} of the peer at \
                                 line {}{}",
                                other.line,
                                if theirs == net {
                                    ": the kernel gives it to this (the later) peer only"
                                } else {
                                    ": the more specific prefix wins"
                                }
                            ),
                        );
                    }
                }
            }
        }
    }
}

/// The least MTU an IPv6 link may have (RFC 8200).
const MIN_IPV6_MTU: u32 = 1280;

/// Whether one prefix holds the other. Default routes overlap everything on
/// purpose (an exit node); they are never reported.
fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.prefix_len() > 0 && b.prefix_len() > 0 && (a.contains(b) || b.contains(a))
}

/// A key name from the input, as messages may show it: a plain word is
/// shown, anything else (a value where the name should be) is not.
fn key_as_shown(name: &str, section: Option<Section>) -> String {
    // One word: a name with a space in it may be `Key value` with the `=`
    // forgotten, and the value a secret.
    let plain = plain_name(name.trim(), 32, |c| c.is_ascii_alphabetic());
    match (plain, section) {
        (Some(name), _) => name.to_string(),
        (None, Some(section)) => format!("a line that is not `Key = value` of {}", section.name()),
        (None, None) => "a line".to_string(),
    }
}

/// Makes errors about one key on one line: "file:line: Key: message".
/// Why one value of a key cannot be used; [`ConfigError`] adds the file,
/// the line and the key (and redacts what is quoted back).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("not a valid key (expected 32 bytes in base64, as `wg genkey` prints)")]
    KeyNotBase64,
    #[error("not a valid key: {0} bytes instead of 32")]
    KeyLength(usize),
    #[error("{0:?} is not a port from 0 to 65535")]
    Port(String),
    #[error("{0:?} is neither off nor a 32-bit number")]
    FwMark(String),
    #[error("{0:?} is not an address like 10.0.0.2/24")]
    Address(String),
    #[error("{0:?} is not a prefix like 10.0.0.0/24")]
    Prefix(String),
    #[error("{0:?} is neither an IP address nor a search domain")]
    Domain(String),
    #[error("{0:?} is not an MTU from 576 to 65535")]
    Mtu(String),
    #[error("{0:?} is not off, auto, main or a table number")]
    Table(String),
    #[error("{0:?} is neither true nor false")]
    Bool(String),
    #[error("{0:?} is neither off nor a number of seconds up to 65535")]
    Keepalive(String),
    #[error("{0:?} is not host:port, address:port or [IPv6]:port")]
    Endpoint(String),
    #[error("{0:?}: port 0 is not a port a peer listens on")]
    PortZero(String),
    #[error(
        "{0:?} is a number in a form other than a.b.c.d (inet_aton would read it as \
         an address of its own choosing): write the address as four decimal numbers"
    )]
    NumericHost(String),
    #[error("the zone {0:?} is neither a number nor an interface of this host")]
    Zone(String),
}

/// A [Peer] key with no [Peer] section open (the parser opens one before it
/// reads the keys of one, so this says what went wrong should that change).
fn outside_peer(file: &Path, line: usize, key: &str) -> ConfigError {
    ConfigError::new(file, line, format!("{key}: outside a [Peer] section"))
}

fn key_error<'a>(
    file: &'a Path,
    line: usize,
    key: &'a str,
) -> impl Fn(ValueError) -> ConfigError + 'a {
    move |message| ConfigError::new(file, line, format!("{key}: {message}"))
}

fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').filter(|s| !s.is_empty())
}

/// A WireGuard key: base64 of exactly 32 bytes. The message never repeats
/// the value.
fn decode_key(value: &str) -> Result<[u8; 32], ValueError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| ValueError::KeyNotBase64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| ValueError::KeyLength(bytes.len()))
}

fn parse_port(value: &str) -> Result<u16, ValueError> {
    value
        .parse()
        .map_err(|_| ValueError::Port(value.to_string()))
}

/// `off`, a decimal number or a `0x` hexadecimal one; 0 means off.
fn parse_fwmark(value: &str) -> Result<Option<u32>, ValueError> {
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
    let mark = parsed.map_err(|_| ValueError::FwMark(value.to_string()))?;
    Ok((mark != 0).then_some(mark))
}

/// An interface address: with a prefix length, or a single host.
fn parse_address(value: &str) -> Result<IpNet, ValueError> {
    if value.contains('/') {
        return parse_prefix(value);
    }
    value
        .parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| ValueError::Address(value.to_string()))
}

fn parse_prefix(value: &str) -> Result<IpNet, ValueError> {
    if !value.contains('/') {
        // wg accepts a bare address as a host route.
        if let Ok(addr) = value.parse::<IpAddr>() {
            return Ok(IpNet::from(addr));
        }
    }
    value
        .parse::<IpNet>()
        .map_err(|_| ValueError::Prefix(value.to_string()))
}

/// A search domain or host name: DNS labels, optionally ending in a dot
/// (fully qualified).
fn parse_domain(value: &str) -> Result<String, ValueError> {
    let name = value.strip_suffix('.').unwrap_or(value);
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if valid {
        Ok(value.to_string())
    } else {
        Err(ValueError::Domain(value.to_string()))
    }
}

fn parse_table(value: &str) -> Result<Table, ValueError> {
    match value.to_ascii_lowercase().as_str() {
        "auto" => Ok(Table::Auto),
        "off" => Ok(Table::Off),
        // The names iproute2 defines in every rt_tables file.
        "main" => Ok(Table::Id(254)),
        "local" => Ok(Table::Id(255)),
        "default" => Ok(Table::Id(253)),
        _ => match value.parse::<u32>() {
            Ok(id) if id != 0 => Ok(Table::Id(id)),
            _ => Err(ValueError::Table(value.to_string())),
        },
    }
}

/// `host:port`, `1.2.3.4:port` or `[v6]:port`, where a link-local IPv6
/// address may carry its zone (`[fe80::1%eth0]:51820`, or a zone number).
pub fn parse_endpoint(value: &str) -> Result<Endpoint, ValueError> {
    let bad = || ValueError::Endpoint(value.to_string());
    let (host, port, bracketed) = match value.strip_prefix('[') {
        Some(rest) => {
            let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
            (inner, after.strip_prefix(':').ok_or_else(bad)?, true)
        }
        None => {
            let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
            (host, port, false)
        }
    };
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(ValueError::PortZero(value.to_string()));
    }
    if bracketed {
        let (address, zone) = match host.split_once('%') {
            Some((address, zone)) => (address, Some(zone)),
            None => (host, None),
        };
        let address: Ipv6Addr = address.parse().map_err(|_| bad())?;
        let scope_id = zone.map(zone_index).transpose()?.unwrap_or(0);
        return Ok(Endpoint::Address(SocketAddr::V6(SocketAddrV6::new(
            address, port, 0, scope_id,
        ))));
    }
    if host.is_empty() || host.contains(':') {
        return Err(bad());
    }
    if let Ok(address) = host.parse::<Ipv4Addr>() {
        return Ok(Endpoint::Address(SocketAddr::from((address, port))));
    }
    if looks_numeric(host) {
        return Err(ValueError::NumericHost(host.to_string()));
    }
    parse_domain(host).map_err(|_| bad())?;
    Ok(Endpoint::Host {
        host: host.to_string(),
        port,
    })
}

/// A name whose last label is a number (`010.1.1.1`, `0x7f000001`,
/// `2130706433`): resolvers read those as IPv4 addresses (inet_aton's octal,
/// hexadecimal and short forms), so it is not a host name.
fn looks_numeric(host: &str) -> bool {
    let last = host
        .strip_suffix('.')
        .unwrap_or(host)
        .rsplit('.')
        .next()
        .unwrap_or_default();
    let hex = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X"));
    match hex {
        Some(digits) => digits.chars().all(|c| c.is_ascii_hexdigit()),
        None => !last.is_empty() && last.chars().all(|c| c.is_ascii_digit()),
    }
}

/// An IPv6 zone: a number, or the name of an interface of this host.
fn zone_index(zone: &str) -> Result<u32, ValueError> {
    if let Ok(index) = zone.parse::<u32>() {
        return Ok(index);
    }
    nix::net::if_::if_nametoindex(zone).map_err(|_| ValueError::Zone(zone.to_string()))
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
        assert_eq!(i.private_key, SecretKey(decode_key(PRIVATE).unwrap()));
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
                "wg0.conf:5: this peer has the same PublicKey as the peer at line 3",
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

    /// The typos that used to print a key back: a missing `=` (the key's
    /// own padding becomes the separator), a key on a line of its own, a
    /// key before any section.
    #[test]
    fn a_key_where_a_name_belongs_is_never_printed() {
        let unpadded = PRIVATE.trim_end_matches('=');
        let cases = [
            (
                format!("[Interface]\nPrivateKey {PRIVATE}\n"),
                "wg0.conf:2: PrivateKey: expected `PrivateKey = value`; is the `=` missing?",
            ),
            (
                format!("[Interface]\nPrivateKey {unpadded}\n"),
                "wg0.conf:2: PrivateKey: expected `PrivateKey = value`",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey={PRIVATE}\n[Peer]\nPublicKey={PUBLIC}\nPresharedKey {PSK}\n"
                ),
                "wg0.conf:5: PresharedKey: expected `PresharedKey = value`",
            ),
            (
                format!("[Interface]\nPrivateKey =\n{PRIVATE}\n"),
                "wg0.conf:2: PrivateKey: not a valid key",
            ),
            (
                format!("[Interface]\n{PRIVATE}\n"),
                "wg0.conf:2: unknown key a line that is not `Key = value` of [Interface]",
            ),
            (
                format!("[Interface]\n{unpadded}\n"),
                "wg0.conf:2: expected `Key = value`, found a line that is not",
            ),
            (
                format!("{PRIVATE}\n[Interface]\n"),
                "wg0.conf:1: a line is outside of any [Interface] or [Peer] section",
            ),
            (
                format!("[Interface]\nPrivateKey={PRIVATE}\nDNS = 1.1.1.1, lan {PSK}\n"),
                "wg0.conf:3: DNS: \"lan<redacted>\" is neither",
            ),
            (
                "PrivateKey lettersonlyvalue\n[Interface]\n".to_string(),
                "wg0.conf:1: a line is outside of any [Interface] or [Peer] section",
            ),
            (
                format!("[Interface]\nPrivateKey={PRIVATE}\nDNS = 1.1.1.1, {PSK}\n"),
                "wg0.conf:3: DNS: \"<redacted>\" is neither",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey={PRIVATE}\n[Peer]\nPublicKey={PUBLIC}\nEndpoint = {unpadded}\n"
                ),
                "wg0.conf:5: Endpoint: \"<redacted>\" is not host:port",
            ),
        ];
        for (text, expected) in cases {
            let e = err(&text);
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
            for secret in [
                PRIVATE,
                unpadded,
                PSK,
                PSK.trim_end_matches('='),
                "lettersonlyvalue",
            ] {
                assert!(!e.contains(secret), "a key in {e:?}");
            }
        }
    }

    #[test]
    fn files_as_editors_write_them() {
        let text = seed_example();
        let crlf = format!("\u{feff}{}", text.replace('\n', "\r\n"));
        assert_eq!(ok(&crlf), ok(&text), "BOM and CRLF");
        let bytes = text
            .replace("MTU = 1420", "MTU = 1420 # caf\u{1}")
            .into_bytes();
        // Latin-1 in a comment: not UTF-8, and not wg-quick's business.
        let bytes: Vec<u8> = bytes
            .into_iter()
            .map(|b| if b == 1 { 0xe9 } else { b })
            .collect();
        let (config, _) = parse_bytes(&bytes, file()).expect("non-UTF-8 in a comment");
        assert_eq!(config, ok(&text));
        let mut bad = text.as_bytes().to_vec();
        bad.extend_from_slice(b"PostUp = echo \xff\n");
        let e = parse_bytes(&bad, file()).unwrap_err().to_string();
        assert!(
            e.contains("wg0.conf:13: this line is not UTF-8 text"),
            "{e}"
        );
        let spaced = ok(&text
            .replace("PrivateKey", "Private Key")
            .replace("AllowedIPs", "Allowed IPs"));
        assert_eq!(
            spaced,
            ok(&text),
            "whitespace inside key names, as wg strips it"
        );
    }

    fn endpoint(value: &str) -> Result<Endpoint, String> {
        parse_endpoint(value).map_err(|e| e.to_string())
    }

    #[test]
    fn endpoints_with_zones_dots_and_bad_numbers() {
        assert_eq!(
            endpoint("[fe80::1%7]:51820"),
            Ok(Endpoint::Address(SocketAddr::V6(SocketAddrV6::new(
                "fe80::1".parse().unwrap(),
                51820,
                0,
                7
            ))))
        );
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        assert!(
            matches!(endpoint("[fe80::1%lo]:51820"), Ok(Endpoint::Address(SocketAddr::V6(a))) if a.scope_id() == lo)
        );
        let e = endpoint("[fe80::1%nosuchif0]:51820").unwrap_err();
        assert!(
            e.contains("\"nosuchif0\" is neither a number nor an interface"),
            "{e}"
        );
        assert_eq!(
            endpoint("vpn.example.com.:51820"),
            Ok(Endpoint::Host {
                host: "vpn.example.com.".into(),
                port: 51820
            })
        );
        for zero in ["vpn.example.com:0", "10.0.0.1:0", "[fd00::1]:0"] {
            let e = endpoint(zero).unwrap_err();
            assert!(e.contains("port 0 is not a port a peer listens on"), "{e}");
        }
        for numeric in ["010.1.1.1", "0x7f000001", "2130706433", "10.1", "1.2.3.0x4"] {
            let e = endpoint(&format!("{numeric}:51820")).unwrap_err();
            assert!(
                e.contains("a number in a form other than a.b.c.d"),
                "{numeric}: {e}"
            );
        }
        assert!(endpoint("1e100.net:443").is_ok());
    }

    #[test]
    fn a_key_given_twice_names_both_lines() {
        let base = format!("[Interface]\nPrivateKey={PRIVATE}\n");
        for (text, expected) in [
            (
                format!("{base}ListenPort = 1\nListenPort = 2\n"),
                "wg0.conf:4: ListenPort is given twice in one [Interface], on lines 3 and 4",
            ),
            (
                format!("{base}privatekey = {PSK}\n"),
                "wg0.conf:3: PrivateKey is given twice in one [Interface], on lines 2 and 3",
            ),
            (
                format!(
                    "{base}[Peer]\nPublicKey={PUBLIC}\nAllowedIPs=10.0.0.2/32\nPublicKey={PSK}\n"
                ),
                "wg0.conf:6: a second PublicKey in one [Peer] (the first on line 4): is a [Peer] header missing",
            ),
            (
                format!(
                    "{base}[Peer]\nPublicKey={PUBLIC}\nEndpoint=1.2.3.4:1\nEndpoint=1.2.3.4:2\n"
                ),
                "wg0.conf:6: Endpoint is given twice in one [Peer], on lines 5 and 6",
            ),
        ] {
            let e = err(&text);
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
            assert!(!e.contains(PSK), "{e}");
        }
        // List keys add up, in any number of lines.
        assert_eq!(
            ok(&format!(
                "{base}Address = 10.0.0.1/24\nAddress = 10.0.1.1/24\n"
            ))
            .interface
            .addresses
            .len(),
            2
        );
    }

    #[test]
    fn interface_values_that_clash_with_ipv6_or_tailscaled() {
        let base = format!("[Interface]\nPrivateKey={PRIVATE}\n");
        for (lines, expected) in [
            (
                "Address = 10.0.0.1/24, fd00::1/64\nMTU = 1200\n",
                "wg0.conf:4: MTU: 1200 is below 1280, the least IPv6 allows",
            ),
            (
                "FwMark = 0x10000\n",
                "wg0.conf:3: FwMark: 0x10000 uses bits of 0xff0000, which tailscaled keeps",
            ),
            (
                "FwMark = 52\n",
                "wg0.conf:3: FwMark: 52 is also the routing table",
            ),
            (
                "Table = 52\n",
                "wg0.conf:3: Table: 52 is tailscaled's routing table",
            ),
        ] {
            let e = err(&format!("{base}{lines}"));
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
        // Without IPv6 anywhere, a small MTU is the user's choice.
        assert_eq!(
            ok(&format!("{base}Address = 10.0.0.1/24\nMTU = 1200\n"))
                .interface
                .mtu,
            Some(1200)
        );
        let ipv6_peer =
            format!("{base}MTU = 1200\n[Peer]\nPublicKey={PUBLIC}\nAllowedIPs = fd00::/64\n");
        assert!(err(&ipv6_peer).contains("MTU: 1200 is below 1280"));
    }

    fn warnings(text: &str) -> Vec<String> {
        parse_bytes(text.as_bytes(), file())
            .unwrap_or_else(|e| panic!("{e}"))
            .1
    }

    #[test]
    fn allowed_ips_that_route_elsewhere_are_warned_about() {
        let base = format!("[Interface]\nPrivateKey={PRIVATE}\n");
        let w = warnings(&format!(
            "{base}[Peer]\nPublicKey={PUBLIC}\nAllowedIPs = 10.0.0.0/24, 0.0.0.0/0\n\
             [Peer]\nPublicKey={PSK}\nAllowedIPs = 10.0.0.0/24, 10.0.0.7/16, 100.100.1.0/24\n"
        ));
        let expected = [
            "wg0.conf:6: AllowedIPs: 10.0.0.0/24 of this peer overlaps 10.0.0.0/24 of the peer at line 3: the kernel gives it to this (the later) peer only",
            "wg0.conf:8: AllowedIPs: 10.0.0.7/16 has host bits set; the kernel uses 10.0.0.0/16",
            "wg0.conf:6: AllowedIPs: 10.0.0.0/16 of this peer overlaps 10.0.0.0/24 of the peer at line 3: the more specific prefix wins",
            "wg0.conf:6: AllowedIPs: 100.100.1.0/24 of this peer overlaps the tailnet's range 100.64.0.0/10",
        ];
        for e in expected {
            assert!(w.iter().any(|w| w.contains(e)), "expected {e:?} in {w:#?}");
        }
        assert_eq!(w.len(), expected.len(), "{w:#?}");
        // Default routes (an exit node) overlap everything on purpose.
        assert!(warnings(&seed_example()).is_empty());
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
