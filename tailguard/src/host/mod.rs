//! The host's kernel and files outside the two devices: netlink (links,
//! addresses, routes, rules), the kernel switches (sysctls), GRO, the
//! resolver file, and the privileges the daemon runs with.

pub mod gro;
pub mod netlink;
pub mod observed;
pub mod privileges;
pub mod resolver;
pub mod sysctls;
