//! PROXY protocol version 2 (the binary form, as specified by HAProxy's `proxy-protocol.txt`)
//! so a backend can learn the client's address through an L4 proxy.
//!
//! The ingress only writes headers; [`parse_v2`] exists for backends written in Rust and for
//! the tests that check what the ingress sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

/// The 12-byte signature that starts every version 2 header.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_COMMAND_PROXY: u8 = 0x21;
/// Version 2, command LOCAL.
const VERSION_COMMAND_LOCAL: u8 = 0x20;
/// Address family INET, protocol STREAM.
const TCP_OVER_IPV4: u8 = 0x11;
/// Address family INET6, protocol STREAM.
const TCP_OVER_IPV6: u8 = 0x21;

/// Encodes a PROXY v2 header for a TCP connection from `client` to `destination`.
///
/// Both addresses must be of one family; an IPv4 address meeting an IPv6 one is written as
/// IPv6 (IPv4-mapped), and an IPv4-mapped IPv6 pair is written as IPv4.
pub fn encode_v2(client: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (client_ip, destination_ip) = match (canonical(client.ip()), canonical(destination.ip())) {
        (IpAddr::V4(c), IpAddr::V4(d)) => (IpAddr::V4(c), IpAddr::V4(d)),
        (c, d) => (IpAddr::V6(to_v6(c)), IpAddr::V6(to_v6(d))),
    };

    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&SIGNATURE);
    header.push(VERSION_COMMAND_PROXY);
    match (client_ip, destination_ip) {
        (IpAddr::V4(c), IpAddr::V4(d)) => {
            header.push(TCP_OVER_IPV4);
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&c.octets());
            header.extend_from_slice(&d.octets());
        }
        (c, d) => {
            header.push(TCP_OVER_IPV6);
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&to_v6(c).octets());
            header.extend_from_slice(&to_v6(d).octets());
        }
    }
    header.extend_from_slice(&client.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn to_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// Addresses carried by a PROXY v2 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied TCP connection.
    Proxy {
        /// The client's address as the proxy saw it.
        client: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// A connection the proxy made itself, such as a health check.
    Local,
}

/// Why bytes are not a PROXY v2 header.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProxyHeaderError {
    /// The bytes do not start with the version 2 signature.
    #[error("missing PROXY protocol v2 signature")]
    MissingSignature,
    /// Version or command byte is not v2 PROXY or LOCAL.
    #[error("unsupported PROXY protocol version and command byte {0:#04x}")]
    UnsupportedCommand(u8),
    /// The family and protocol byte is not TCP over IPv4 or IPv6.
    #[error("unsupported PROXY protocol family byte {0:#04x}")]
    UnsupportedFamily(u8),
    /// The address block is shorter than its family needs.
    #[error("PROXY protocol address block of {0} bytes is too short")]
    ShortAddresses(usize),
}

/// Parses a PROXY v2 header at the start of `buf`, returning it and its length in bytes, or
/// `None` when `buf` is a valid but incomplete beginning.
pub fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyHeaderError> {
    let signature_len = buf.len().min(SIGNATURE.len());
    if buf[..signature_len] != SIGNATURE[..signature_len] {
        return Err(ProxyHeaderError::MissingSignature);
    }
    let Some(fixed) = buf.get(..16) else {
        return Ok(None);
    };
    let address_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    let Some(addresses) = buf.get(16..16 + address_len) else {
        return Ok(None);
    };
    let total = 16 + address_len;

    match fixed[12] {
        VERSION_COMMAND_LOCAL => return Ok(Some((ProxyHeader::Local, total))),
        VERSION_COMMAND_PROXY => {}
        other => return Err(ProxyHeaderError::UnsupportedCommand(other)),
    }

    let port = |at: usize| u16::from_be_bytes([addresses[at], addresses[at + 1]]);
    let header = match fixed[13] {
        TCP_OVER_IPV4 => {
            if address_len < 12 {
                return Err(ProxyHeaderError::ShortAddresses(address_len));
            }
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    addresses[at],
                    addresses[at + 1],
                    addresses[at + 2],
                    addresses[at + 3],
                ))
            };
            ProxyHeader::Proxy {
                client: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        TCP_OVER_IPV6 => {
            if address_len < 36 {
                return Err(ProxyHeaderError::ShortAddresses(address_len));
            }
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&addresses[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            ProxyHeader::Proxy {
                client: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        other => return Err(ProxyHeaderError::UnsupportedFamily(other)),
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_header_round_trips() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let destination: SocketAddr = "198.51.100.1:443".parse().unwrap();
        let header = encode_v2(client, destination);
        assert_eq!(header.len(), 28);
        assert_eq!(
            parse_v2(&header),
            Ok(Some((
                ProxyHeader::Proxy {
                    client,
                    destination
                },
                28
            )))
        );
    }

    #[test]
    fn ipv6_header_round_trips() {
        let client: SocketAddr = "[2001:db8::7]:51000".parse().unwrap();
        let destination: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let header = encode_v2(client, destination);
        assert_eq!(header.len(), 52);
        assert_eq!(
            parse_v2(&header),
            Ok(Some((
                ProxyHeader::Proxy {
                    client,
                    destination
                },
                52
            )))
        );
    }

    #[test]
    fn mixed_families_written_as_ipv6() {
        let client: SocketAddr = "192.0.2.7:51000".parse().unwrap();
        let destination: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        let header = encode_v2(client, destination);
        let expected_client =
            SocketAddr::new(IpAddr::V6("::ffff:192.0.2.7".parse().unwrap()), 51000);
        assert_eq!(
            parse_v2(&header),
            Ok(Some((
                ProxyHeader::Proxy {
                    client: expected_client,
                    destination
                },
                52
            )))
        );
    }

    #[test]
    fn header_known_bytes() {
        let header = encode_v2(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.2:2".parse().unwrap(),
        );
        let expected: Vec<u8> = [
            &SIGNATURE[..],
            &[0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 2, 0, 1, 0, 2],
        ]
        .concat();
        assert_eq!(header, expected);
    }

    #[test]
    fn incomplete_header_needs_more() {
        let header = encode_v2(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.2:2".parse().unwrap(),
        );
        for len in 0..header.len() {
            assert_eq!(parse_v2(&header[..len]), Ok(None), "cut at {len}");
        }
    }

    #[test]
    fn tls_bytes_lack_signature() {
        assert_eq!(
            parse_v2(&[22, 3, 1, 0, 200]),
            Err(ProxyHeaderError::MissingSignature)
        );
    }
}
