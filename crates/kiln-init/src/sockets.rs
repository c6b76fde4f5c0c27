//! Lists the guest's listening sockets from `/proc/net/{tcp,tcp6,udp,udp6}`, so the agent can
//! explain a failed health check ("listening on 127.0.0.1:8080 only").

use std::net::{Ipv4Addr, Ipv6Addr};

use kiln_guest_proto::ListeningSocket;

/// `st` value of a TCP socket in the LISTEN state.
const TCP_LISTEN: &str = "0A";
/// `st` value of an unconnected UDP socket.
const UDP_UNCONNECTED: &str = "07";

/// Returns every listening TCP socket and every bound, unconnected UDP socket.
pub(crate) fn listening() -> Vec<ListeningSocket> {
    let tables = [
        ("tcp", "/proc/net/tcp", TCP_LISTEN),
        ("tcp", "/proc/net/tcp6", TCP_LISTEN),
        ("udp", "/proc/net/udp", UDP_UNCONNECTED),
        ("udp", "/proc/net/udp6", UDP_UNCONNECTED),
    ];
    let mut sockets = Vec::new();
    for (protocol, path, state) in tables {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        sockets.extend(parse_table(protocol, &text, state));
    }
    sockets
}

/// Parses one `/proc/net` socket table, keeping the rows in `state`.
pub(crate) fn parse_table(protocol: &str, text: &str, state: &str) -> Vec<ListeningSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let row_state = fields.nth(1)?;
            if row_state != state {
                return None;
            }
            let (address, port) = local.split_once(':')?;
            Some(ListeningSocket {
                protocol: protocol.to_owned(),
                address: parse_address(address)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// Parses the kernel's hex address: each 32-bit word in host (little-endian) byte order.
fn parse_address(hex: &str) -> Option<String> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();

    match bytes.len() {
        4 => Some(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).to_string()),
        16 => {
            let octets: [u8; 16] = bytes.try_into().ok()?;
            Some(Ipv6Addr::from(octets).to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from a Debian 12 guest running `busybox httpd -p 8080` and a listener on
    // 127.0.0.1:5000.
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1388 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1388 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 1235 1 0000000000000000 100 0 0 10 0\n";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2345 1 0000000000000000 100 0 0 10 0\n";

    #[test]
    fn tcp_listen_rows_only() {
        let sockets = parse_table("tcp", TCP, TCP_LISTEN);
        assert_eq!(sockets.len(), 1);
        assert_eq!(sockets[0].address, "127.0.0.1");
        assert_eq!(sockets[0].port, 5000);
    }

    #[test]
    fn tcp6_wildcard() {
        let sockets = parse_table("tcp", TCP6, TCP_LISTEN);
        assert_eq!(sockets.len(), 1);
        assert_eq!(sockets[0].address, "::");
        assert_eq!(sockets[0].port, 8080);
    }

    #[test]
    fn garbage_ignored() {
        assert!(parse_table("tcp", "header\nnot a row\n0: zz:zz 0:0 0A\n", TCP_LISTEN).is_empty());
    }
}
