//! kiln-net against the real kernel: every test runs in its own network namespace, creates
//! real TAP devices and rules, and plays the guest by writing raw Ethernet frames into the
//! TAP's file descriptor, the way a VMM does.

// Helpers outside `#[test]` functions panic on setup failures just like the tests do.
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use kiln_core::{InstanceId, OrgId};
use kiln_net::{
    HostNetworkConfig, InstanceNetwork, MacAddr, NetEngine, TapName, TapPrefix, VNET_HDR_LEN,
    open_tap,
};
use kiln_testkit::netns::NetNs;

/// How long a test waits for a forwarded frame before it fails.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

const UDP_PORT: u16 = 4789;

fn config() -> HostNetworkConfig {
    HostNetworkConfig {
        tap_prefix: TapPrefix::new("knt").unwrap(),
        ..HostNetworkConfig::default()
    }
}

fn instance(org: OrgId, host_part: u8) -> InstanceNetwork {
    let instance = InstanceId::new();
    InstanceNetwork {
        instance,
        org,
        mac: MacAddr::for_instance(instance),
        ipv6: Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, u16::from(host_part)),
        ipv4: Some(Ipv4Addr::new(100, 64, 0, host_part)),
    }
}

/// A guest's end of its TAP device.
struct Guest {
    network: InstanceNetwork,
    tap: File,
    /// The host side's MAC, the destination of every frame the guest sends.
    gateway_mac: [u8; 6],
}

impl Guest {
    fn attach(namespace: &NetNs, engine: &NetEngine, network: &InstanceNetwork) -> Self {
        let name = engine.tap_name(network.instance);
        let tap = open_tap(&name).unwrap();
        Self {
            network: network.clone(),
            tap,
            gateway_mac: link_mac(namespace, &name),
        }
    }

    fn send_udp(&mut self, source: IpAddr, destination: IpAddr, payload: &[u8]) {
        let mut frame = vec![0; VNET_HDR_LEN];
        frame.extend(udp_frame(
            self.network.mac.0,
            self.gateway_mac,
            source,
            destination,
            payload,
        ));
        self.tap.write_all(&frame).unwrap();
    }

    /// Returns the payload of the next UDP datagram to `UDP_PORT` that reaches this guest.
    fn receive_udp(&mut self) -> Vec<u8> {
        let deadline = Instant::now() + FRAME_TIMEOUT;
        let mut buffer = vec![0; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no UDP datagram within {FRAME_TIMEOUT:?}");
            let mut poll = [nix::poll::PollFd::new(
                self.tap.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let timeout = nix::poll::PollTimeout::try_from(left).unwrap();
            if nix::poll::poll(&mut poll, timeout).unwrap() == 0 {
                continue;
            }
            let length = self.tap.read(&mut buffer).unwrap();
            if let Some(payload) = parse_udp(&buffer[VNET_HDR_LEN..length]) {
                return payload;
            }
        }
    }
}

fn link_mac(namespace: &NetNs, tap: &TapName) -> [u8; 6] {
    let output = namespace.ip(&["-j", "link", "show", tap.as_str()]).unwrap();
    let links: serde_json::Value = serde_json::from_str(&output).unwrap();
    let text = links[0]["address"].as_str().unwrap();
    let mut mac = [0; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

fn udp_frame(
    source_mac: [u8; 6],
    destination_mac: [u8; 6],
    source: IpAddr,
    destination: IpAddr,
    payload: &[u8],
) -> Vec<u8> {
    let udp_length = 8 + payload.len();
    let mut udp = Vec::with_capacity(udp_length);
    udp.extend_from_slice(&UDP_PORT.to_be_bytes());
    udp.extend_from_slice(&UDP_PORT.to_be_bytes());
    udp.extend_from_slice(&(udp_length as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);

    let mut frame = Vec::new();
    frame.extend_from_slice(&destination_mac);
    frame.extend_from_slice(&source_mac);
    match (source, destination) {
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let mut pseudo = Vec::new();
            pseudo.extend_from_slice(&source.octets());
            pseudo.extend_from_slice(&destination.octets());
            pseudo.extend_from_slice(&(udp_length as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, 17]);
            pseudo.extend_from_slice(&udp);
            let checksum = internet_checksum(&pseudo);
            udp[6..8].copy_from_slice(&checksum.to_be_bytes());

            frame.extend_from_slice(&[0x86, 0xdd]);
            frame.extend_from_slice(&[0x60, 0, 0, 0]);
            frame.extend_from_slice(&(udp_length as u16).to_be_bytes());
            frame.extend_from_slice(&[17, 64]);
            frame.extend_from_slice(&source.octets());
            frame.extend_from_slice(&destination.octets());
        }
        (IpAddr::V4(source), IpAddr::V4(destination)) => {
            let mut header = vec![0x45, 0];
            header.extend_from_slice(&((20 + udp_length) as u16).to_be_bytes());
            header.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
            header.extend_from_slice(&source.octets());
            header.extend_from_slice(&destination.octets());
            let checksum = internet_checksum(&header);
            header[10..12].copy_from_slice(&checksum.to_be_bytes());

            frame.extend_from_slice(&[0x08, 0x00]);
            frame.extend_from_slice(&header);
        }
        _ => panic!("mixed address families"),
    }
    frame.extend_from_slice(&udp);
    frame
}

fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Returns the payload of a UDP datagram to `UDP_PORT` in an Ethernet frame.
fn parse_udp(frame: &[u8]) -> Option<Vec<u8>> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let udp = match ethertype {
        0x86dd if *frame.get(14 + 6)? == 17 => frame.get(14 + 40..)?,
        0x0800 if *frame.get(14 + 9)? == 17 => {
            let header_length = usize::from(frame[14] & 0x0f) * 4;
            frame.get(14 + header_length..)?
        }
        _ => return None,
    };
    let port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    (port == UDP_PORT).then(|| udp.get(8..).map(<[u8]>::to_vec))?
}

fn count_owned_links(namespace: &NetNs) -> usize {
    namespace
        .ip(&["-o", "link", "show"])
        .unwrap()
        .lines()
        .filter(|line| line.contains(": knt"))
        .count()
}

fn count_guest_routes(namespace: &NetNs) -> usize {
    let v6 = namespace.ip(&["-6", "-o", "route", "show"]).unwrap();
    let v4 = namespace.ip(&["-4", "-o", "route", "show"]).unwrap();
    v6.lines()
        .chain(v4.lines())
        .filter(|line| line.contains("fd00:0:0:1::") || line.contains("100.64.0."))
        .count()
}

fn count_kiln_rules(namespace: &NetNs) -> usize {
    let ruleset = namespace
        .exec("/usr/sbin/nft", &["-j", "list", "ruleset"])
        .unwrap();
    let document: serde_json::Value = serde_json::from_str(&ruleset).unwrap();
    document["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|object| {
            ["table", "chain", "rule", "set", "counter"]
                .iter()
                .any(|kind| object[kind]["table"] == "kiln" || object[kind]["name"] == "kiln")
        })
        .count()
}

#[test]
fn spoofed_sources_dropped() {
    let namespace = NetNs::create("spoof").unwrap();
    namespace
        .block_on(|| async {
            let org = OrgId::new();
            let (a, b) = (instance(org, 2), instance(org, 3));
            let mut engine = NetEngine::new(config()).unwrap();
            engine.apply(&[a.clone(), b.clone()]).await.unwrap();
            let mut sender = Guest::attach(&namespace, &engine, &a);
            let mut receiver = Guest::attach(&namespace, &engine, &b);

            // The spoofed datagram goes first: if it got through, it would arrive first.
            let spoofed_v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 1, 0, 0, 0, 0x99));
            sender.send_udp(spoofed_v6, IpAddr::V6(b.ipv6), b"spoofed v6");
            // A neighbor's address is spoofed as well, even though it is routed on this host.
            sender.send_udp(IpAddr::V6(b.ipv6), IpAddr::V6(b.ipv6), b"neighbor v6");
            sender.send_udp(IpAddr::V6(a.ipv6), IpAddr::V6(b.ipv6), b"assigned v6");
            assert_eq!(receiver.receive_udp(), b"assigned v6");

            let spoofed_v4 = IpAddr::V4(Ipv4Addr::new(100, 64, 0, 99));
            let b4 = IpAddr::V4(b.ipv4.unwrap());
            sender.send_udp(spoofed_v4, b4, b"spoofed v4");
            sender.send_udp(IpAddr::V4(a.ipv4.unwrap()), b4, b"assigned v4");
            assert_eq!(receiver.receive_udp(), b"assigned v4");

            let dropped = engine.counter_packets("inet", "spoofed").await.unwrap();
            assert!(
                dropped >= 3,
                "spoofed counter is {dropped}, expected at least 3"
            );
        })
        .unwrap();
}

#[test]
fn spoofed_mac_dropped() {
    let namespace = NetNs::create("mac").unwrap();
    namespace
        .block_on(|| async {
            let org = OrgId::new();
            let (a, b) = (instance(org, 2), instance(org, 3));
            let mut engine = NetEngine::new(config()).unwrap();
            engine.apply(&[a.clone(), b.clone()]).await.unwrap();
            let mut sender = Guest::attach(&namespace, &engine, &a);
            let mut receiver = Guest::attach(&namespace, &engine, &b);

            let assigned = sender.network.mac;
            sender.network.mac = MacAddr([0x02, 0xde, 0xad, 0, 0, 1]);
            sender.send_udp(IpAddr::V6(a.ipv6), IpAddr::V6(b.ipv6), b"foreign mac");
            sender.network.mac = assigned;
            sender.send_udp(IpAddr::V6(a.ipv6), IpAddr::V6(b.ipv6), b"assigned mac");
            assert_eq!(receiver.receive_udp(), b"assigned mac");
        })
        .unwrap();
}

#[test]
fn orgs_isolated_same_org_connected() {
    let namespace = NetNs::create("orgs").unwrap();
    namespace
        .block_on(|| async {
            let (acme, other) = (OrgId::new(), OrgId::new());
            let (a, b, c) = (instance(acme, 2), instance(acme, 3), instance(other, 4));
            let mut engine = NetEngine::new(config()).unwrap();
            engine
                .apply(&[a.clone(), b.clone(), c.clone()])
                .await
                .unwrap();
            let mut target = Guest::attach(&namespace, &engine, &a);
            let mut same_org = Guest::attach(&namespace, &engine, &b);
            let mut other_org = Guest::attach(&namespace, &engine, &c);

            for (from_other, from_same, to) in [
                (IpAddr::V6(c.ipv6), IpAddr::V6(b.ipv6), IpAddr::V6(a.ipv6)),
                (
                    IpAddr::V4(c.ipv4.unwrap()),
                    IpAddr::V4(b.ipv4.unwrap()),
                    IpAddr::V4(a.ipv4.unwrap()),
                ),
            ] {
                other_org.send_udp(from_other, to, b"other org");
                same_org.send_udp(from_same, to, b"same org");
                assert_eq!(target.receive_udp(), b"same org");
            }

            // Isolation applies in the other direction too.
            target.send_udp(IpAddr::V6(a.ipv6), IpAddr::V6(c.ipv6), b"to other org");
            same_org.send_udp(IpAddr::V6(b.ipv6), IpAddr::V6(a.ipv6), b"after");
            assert_eq!(target.receive_udp(), b"after");

            let isolated = engine.counter_packets("inet", "isolated").await.unwrap();
            assert_eq!(isolated, 3);
        })
        .unwrap();
}

#[test]
fn apply_is_idempotent() {
    let namespace = NetNs::create("idem").unwrap();
    namespace
        .block_on(|| async {
            let org = OrgId::new();
            let desired = [instance(org, 2), instance(org, 3)];
            let mut engine = NetEngine::new(config()).unwrap();

            let first = engine.apply(&desired).await.unwrap();
            assert_eq!(first.created.len(), 2);
            let rules = count_kiln_rules(&namespace);

            let second = engine.apply(&desired).await.unwrap();
            assert!(second.is_unchanged(), "{second:?}");
            assert_eq!(count_kiln_rules(&namespace), rules);
            assert_eq!(count_owned_links(&namespace), 2);

            // A VMM keeps the TAP open while the agent restarts: the new engine adopts the
            // device instead of recreating it, and the guest's traffic keeps flowing.
            let mut sender = Guest::attach(&namespace, &engine, &desired[0]);
            let mut receiver = Guest::attach(&namespace, &engine, &desired[1]);
            drop(engine);
            let mut restarted = NetEngine::new(config()).unwrap();
            let adopted = restarted.apply(&desired).await.unwrap();
            assert!(adopted.created.is_empty(), "{adopted:?}");
            assert!(adopted.removed.is_empty(), "{adopted:?}");
            assert_eq!(adopted.refreshed.len(), 2);
            assert_eq!(count_kiln_rules(&namespace), rules);
            sender.send_udp(
                IpAddr::V6(desired[0].ipv6),
                IpAddr::V6(desired[1].ipv6),
                b"after restart",
            );
            assert_eq!(receiver.receive_udp(), b"after restart");
        })
        .unwrap();
}

#[test]
fn removal_leaves_nothing_behind() {
    let namespace = NetNs::create("clean").unwrap();
    namespace
        .block_on(|| async {
            let org = OrgId::new();
            let links_before = namespace
                .ip(&["-o", "link", "show"])
                .unwrap()
                .lines()
                .count();
            let mut engine = NetEngine::new(config()).unwrap();

            for cycle in 0..100u8 {
                let desired = [instance(org, 2 + cycle % 50)];
                let created = engine.apply(&desired).await.unwrap();
                assert_eq!(created.created.len(), 1, "cycle {cycle}");
                let removed = engine.apply(&[]).await.unwrap();
                assert_eq!(removed.removed.len(), 1, "cycle {cycle}");
            }

            let kept = [instance(org, 2), instance(OrgId::new(), 3)];
            engine.apply(&kept).await.unwrap();
            assert_eq!(count_owned_links(&namespace), 2);
            assert_eq!(count_guest_routes(&namespace), 4);
            assert!(count_kiln_rules(&namespace) > 0);

            engine.apply(&kept[..1]).await.unwrap();
            assert_eq!(count_owned_links(&namespace), 1);
            assert_eq!(count_guest_routes(&namespace), 2);

            engine.apply(&[]).await.unwrap();
            assert_eq!(count_owned_links(&namespace), 0);
            assert_eq!(count_guest_routes(&namespace), 0);
            assert_eq!(count_kiln_rules(&namespace), 0);
            let links_after = namespace
                .ip(&["-o", "link", "show"])
                .unwrap()
                .lines()
                .count();
            assert_eq!(links_after, links_before);
        })
        .unwrap();
}

#[test]
fn foreign_links_left_alone() {
    let namespace = NetNs::create("foreign").unwrap();
    namespace
        .ip(&["tuntap", "add", "dev", "kntforeign", "mode", "tap"])
        .unwrap();
    namespace
        .block_on(|| async {
            let mut engine = NetEngine::new(config()).unwrap();
            engine.apply(&[instance(OrgId::new(), 2)]).await.unwrap();
            engine.apply(&[]).await.unwrap();
        })
        .unwrap();
    let links = namespace.ip(&["-o", "link", "show"]).unwrap();
    assert!(links.contains("kntforeign"), "{links}");
}

#[test]
fn duplicate_address_rejected() {
    let namespace = NetNs::create("dup").unwrap();
    namespace
        .block_on(|| async {
            let org = OrgId::new();
            let a = instance(org, 2);
            let mut b = instance(org, 3);
            b.ipv6 = a.ipv6;
            let mut engine = NetEngine::new(config()).unwrap();
            let error = engine.apply(&[a, b]).await.unwrap_err();
            assert!(error.to_string().contains("fd00:0:0:1::2"), "{error}");
            assert_eq!(count_owned_links(&namespace), 0);
        })
        .unwrap();
}
