//! Where a listener binds: an address, or an interface name and a port
//! (`"eth1:7101"`), resolved to the interface's address when the agent
//! starts. A dedicated migration network is usually known by its
//! interface; its address may come from DHCP.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenOn {
    Address(SocketAddr),
    Interface { name: String, port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListenError {
    #[error("{0:?} is neither ADDRESS:PORT nor INTERFACE:PORT")]
    Syntax(String),
    #[error("{0:?} is not an interface name (1 to 15 letters, digits, '-', '_' or '.')")]
    InterfaceName(String),
    #[error("cannot list this host's interfaces: {0}")]
    List(String),
    #[error("interface {0} does not exist or has no IP address")]
    NoAddress(String),
}

impl TryFrom<String> for ListenOn {
    type Error = ListenError;
    fn try_from(s: String) -> Result<Self, ListenError> {
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenOn::Address(addr));
        }
        let (name, port) = s.rsplit_once(':').ok_or_else(|| ListenError::Syntax(s.clone()))?;
        let port = port.parse::<u16>().map_err(|_| ListenError::Syntax(s.clone()))?;
        // Linux interface names: at most IFNAMSIZ - 1 bytes, no '/' or
        // whitespace; a stricter set keeps addresses with typos out.
        let valid = (1..=15).contains(&name.len())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && name.parse::<IpAddr>().is_err();
        if !valid {
            return Err(ListenError::InterfaceName(name.to_owned()));
        }
        Ok(ListenOn::Interface { name: name.to_owned(), port })
    }
}

impl fmt::Display for ListenOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenOn::Address(a) => write!(f, "{a}"),
            ListenOn::Interface { name, port } => write!(f, "{name}:{port}"),
        }
    }
}

impl ListenOn {
    /// The address to bind: an interface's first IPv4 address (else its
    /// first IPv6 address that is not link-local).
    pub fn resolve(&self) -> Result<SocketAddr, ListenError> {
        match self {
            ListenOn::Address(a) => Ok(*a),
            ListenOn::Interface { name, port } => {
                let ifaces =
                    nix::ifaddrs::getifaddrs().map_err(|e| ListenError::List(e.to_string()))?;
                let ips: Vec<IpAddr> = ifaces
                    .filter(|i| &i.interface_name == name)
                    .filter_map(|i| i.address)
                    .filter_map(|a| {
                        a.as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
                    })
                    .collect();
                pick_address(&ips)
                    .map(|ip| SocketAddr::new(ip, *port))
                    .ok_or_else(|| ListenError::NoAddress(name.clone()))
            }
        }
    }
}

fn pick_address(ips: &[IpAddr]) -> Option<IpAddr> {
    let v4 = ips.iter().find(|ip| ip.is_ipv4());
    let v6 = ips.iter().find(|ip| match ip {
        // fe80::/10 needs a scope id to be reachable; peers cannot use it.
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        IpAddr::V4(_) => false,
    });
    v4.or(v6).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ListenOn, ListenError> {
        ListenOn::try_from(s.to_owned())
    }

    #[test]
    fn addresses_and_interfaces_parse_and_bad_ones_are_named() {
        assert_eq!(parse("10.0.0.1:7101"), Ok(ListenOn::Address("10.0.0.1:7101".parse().unwrap())));
        assert_eq!(
            parse("[fd00::1]:7101"),
            Ok(ListenOn::Address("[fd00::1]:7101".parse().unwrap()))
        );
        assert_eq!(parse("mig0:7101"), Ok(ListenOn::Interface { name: "mig0".into(), port: 7101 }));
        assert_eq!(parse("mig0:7101").unwrap().to_string(), "mig0:7101");
        assert_eq!(parse("mig0"), Err(ListenError::Syntax("mig0".into())));
        assert_eq!(parse("mig0:http"), Err(ListenError::Syntax("mig0:http".into())));
        assert_eq!(
            parse("an-interface-name-too-long:1"),
            Err(ListenError::InterfaceName("an-interface-name-too-long".into()))
        );
        assert_eq!(parse("eth 1:1"), Err(ListenError::InterfaceName("eth 1".into())));
        // An IPv6 address without brackets is not an interface.
        assert!(matches!(parse("fd00::1:7101"), Err(ListenError::InterfaceName(_))));
    }

    #[test]
    fn loopback_resolves_and_a_missing_interface_is_named() {
        let lo = parse("lo:7101").unwrap().resolve().expect("lo has an address");
        assert!(lo.ip().is_loopback() && lo.port() == 7101, "{lo}");
        let e = parse("nosuchif0:7101").unwrap().resolve().unwrap_err();
        assert_eq!(e, ListenError::NoAddress("nosuchif0".into()));
    }

    #[test]
    fn ipv4_is_preferred_and_link_local_ipv6_is_never_picked() {
        let ll: IpAddr = "fe80::1".parse().unwrap();
        let global: IpAddr = "fd00::7".parse().unwrap();
        let v4: IpAddr = "10.9.0.1".parse().unwrap();
        assert_eq!(pick_address(&[ll, global, v4]), Some(v4));
        assert_eq!(pick_address(&[ll, global]), Some(global));
        assert_eq!(pick_address(&[ll]), None);
    }
}
