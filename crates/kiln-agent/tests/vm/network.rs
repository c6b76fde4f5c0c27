//! Host networking seen from inside real guests: a guest that forges its source address, and
//! guests of the same and of different orgs connecting to each other.
//!
//! The host is a private network namespace running the agent with real kiln-net; a second
//! namespace behind a veth pair stands for the outside world and runs the listener. Guests
//! send UDP (busybox `tftp` read requests, whose file name is the marker; busybox-static's `wget`
//! crashes, so HTTP goes through `nc`) with forged and
//! genuine source addresses; masquerading rewrites the genuine ones on the way out, so the
//! listener distinguishes them by marker.

use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::*;

/// UDP port of the outside listener.
const LISTENER_PORT: u16 = 9069;

/// How long the test waits for the last genuine packets after the guest sent them.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(30);

/// A forged IPv6 source: not the guest's address, not link-local.
const FORGED_IPV6: &str = "fd00:bad::66";

/// A forged IPv4 source inside the instances' private range, but not the guest's own.
const FORGED_IPV4: &str = "100.64.99.99";

/// Markers received by the outside listener, in arrival order.
struct Listener {
    markers: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    /// Binds a dual-stack UDP socket in `namespace` and collects the markers it receives.
    fn start(namespace: &NetNs) -> Self {
        let socket = namespace
            .run(|| UdpSocket::bind(("::", LISTENER_PORT)))
            .unwrap()
            .unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let markers = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let markers = Arc::clone(&markers);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut buffer = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((length, _source)) = socket.recv_from(&mut buffer) else {
                        continue;
                    };
                    markers
                        .lock()
                        .unwrap()
                        .push(tftp_file_name(&buffer[..length]));
                }
            })
        };
        Self {
            markers,
            stop,
            thread: Some(thread),
        }
    }

    fn markers(&self) -> Vec<String> {
        self.markers.lock().unwrap().clone()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Returns the file name of a TFTP read request (opcode 1, name, NUL, mode, NUL), or the
/// whole datagram as text when it is something else.
fn tftp_file_name(datagram: &[u8]) -> String {
    match datagram {
        [0, 1, rest @ ..] => {
            let end = rest
                .iter()
                .position(|&byte| byte == 0)
                .unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        }
        other => String::from_utf8_lossy(other).into_owned(),
    }
}

/// Joins `host` to `outside` with a veth pair: the host end has `fd99::1` and `192.0.2.1`,
/// the outside end `fd99::2`, `fd99::3`, `192.0.2.2` and `192.0.2.3`.
fn connect_outside(host: &NetNs, outside: &NetNs) {
    host.ip(&[
        "link",
        "add",
        "kspo0",
        "type",
        "veth",
        "peer",
        "name",
        "kspi0",
        "netns",
        outside.name(),
    ])
    .unwrap();
    host.ip(&["-6", "addr", "add", "fd99::1/64", "dev", "kspo0", "nodad"])
        .unwrap();
    host.ip(&["addr", "add", "192.0.2.1/24", "dev", "kspo0"])
        .unwrap();
    host.ip(&["link", "set", "kspo0", "up"]).unwrap();
    for address in ["fd99::2/64", "fd99::3/64"] {
        outside
            .ip(&["-6", "addr", "add", address, "dev", "kspi0", "nodad"])
            .unwrap();
    }
    for address in ["192.0.2.2/24", "192.0.2.3/24"] {
        outside
            .ip(&["addr", "add", address, "dev", "kspi0"])
            .unwrap();
    }
    outside.ip(&["link", "set", "kspi0", "up"]).unwrap();
}

/// Reads a named counter of Kiln's `inet` table in `namespace`.
fn counter_packets(namespace: &NetNs, name: &str) -> u64 {
    let output = namespace
        .exec(
            "/usr/sbin/nft",
            &["-j", "list", "counter", "inet", "kiln", name],
        )
        .unwrap();
    let document: serde_json::Value = serde_json::from_str(&output).unwrap();
    document["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|object| object["counter"]["packets"].as_u64())
        .unwrap()
}

/// Builds the prober's script, which connects to a same-org and an other-org guest over
/// both families, then sends genuine and forged UDP to the outside listener, the forged ones
/// before the last genuine ones.
fn prober_script(prober: &Assignment, same_org: &Assignment, other_org: &Assignment) -> String {
    let genuine_ipv6 = prober.network.ipv6;
    let genuine_ipv4 = prober.network.ipv4;
    let same_ipv6 = same_org.network.ipv6;
    let same_ipv4 = same_org.network.ipv4;
    let other_ipv6 = other_org.network.ipv6;
    let other_ipv4 = other_org.network.ipv4;
    format!(
        r#"
IF=$(ls /sys/class/net | grep -v '^lo$' | head -n 1)
echo 2 > /proc/sys/net/ipv4/conf/$IF/arp_announce
fetch() {{
    body=$(printf 'GET / HTTP/1.0\r\n\r\n' | timeout 6 nc -w 5 "$2" 8080 2>&1 | tail -n 1)
    if [ "$body" = "hello from kiln" ]; then echo "$1 ok $body"; else echo "$1 failed"; fi
}}
fetch same-org-v6 {same_ipv6}
fetch same-org-v4 {same_ipv4}
fetch other-org-v6 {other_ipv6}
fetch other-org-v4 {other_ipv4}

ip -6 addr add {FORGED_IPV6}/128 dev $IF
ip addr add {FORGED_IPV4}/32 dev $IF
ip -6 route add fd99::2/128 via fe80::1 dev $IF src {FORGED_IPV6}
ip -6 route add fd99::3/128 via fe80::1 dev $IF src {genuine_ipv6}
ip route add 192.0.2.2/32 via 169.254.0.1 dev $IF src {FORGED_IPV4}
ip route add 192.0.2.3/32 via 169.254.0.1 dev $IF src {genuine_ipv4}
ip -6 route get fd99::2
ip route get 192.0.2.2
send() {{ timeout 2 tftp -g -r "$1" -l /tmp/tftp-$1 "$2" {LISTENER_PORT} >/dev/null 2>&1 & usleep 300000; }}
send genuine-v6 fd99::3
send genuine-v4 192.0.2.3
send forged-v6 fd99::2
send forged-v4 192.0.2.2
send final-v6 fd99::3
send final-v4 192.0.2.3
wait
echo SPOOF-SENT
exec sleep 600
"#
    )
}

#[test]
fn real_guest_spoofing_dropped_orgs_isolated() {
    let host = NetNs::create("vmsp").unwrap();
    let outside = NetNs::create("vmout").unwrap();
    connect_outside(&host, &outside);
    let listener = Listener::start(&outside);

    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    // Root in the guest: forging a source address takes `ip addr add`.
    let images = BusyboxImages { rootfs, uid: 0 };

    let server = "exec httpd -f -p [::]:8080 -h /www";
    let same_org = vm_assignment(11, server);
    let mut other_org = vm_assignment(12, server);
    other_org.org_id = OrgId::new();
    other_org.org = "globex".parse().unwrap();
    let mut prober = vm_assignment(10, "");
    prober.org_id = same_org.org_id;
    prober.command[2] = prober_script(&prober, &same_org, &other_org);
    // No port: the prober counts as healthy while it runs.
    prober.ports.clear();

    host.block_on(|| async {
        let mut h = vm_harness(root.path(), images);
        let servers = [same_org.clone(), other_org.clone()];
        h.agent.set_desired(assignments(1, &servers));
        h.pass_until("both servers healthy", HEALTHY_TIMEOUT, |h| {
            servers
                .iter()
                .all(|a| h.phase(a.instance_id) == Some(Phase::Healthy))
        })
        .await;

        let all = [same_org.clone(), other_org.clone(), prober.clone()];
        h.agent.set_desired(assignments(2, &all));
        h.pass_until("the prober's probes sent", HEALTHY_TIMEOUT, |h| {
            h.log_tail(prober.instance_id)
                .iter()
                .any(|line| line == "SPOOF-SENT")
        })
        .await;
        let output = h.log_tail(prober.instance_id);

        let expected = [
            "same-org-v6 ok hello from kiln",
            "same-org-v4 ok hello from kiln",
            "other-org-v6 failed",
            "other-org-v4 failed",
        ];
        for line in expected {
            assert!(
                output.iter().any(|l| l == line),
                "missing {line:?} in {output:?}"
            );
        }

        // Every datagram takes the same path, so once the last genuine ones arrived, forged
        // ones sent before them would have arrived too.
        let deadline = Instant::now() + LISTENER_TIMEOUT;
        while !["final-v6", "final-v4"]
            .iter()
            .all(|marker| listener.markers().iter().any(|m| m == marker))
        {
            assert!(
                Instant::now() < deadline,
                "final markers not received within {LISTENER_TIMEOUT:?}: {:?}; guest output {output:?}",
                listener.markers()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let markers = listener.markers();
        for marker in ["genuine-v6", "genuine-v4"] {
            assert!(markers.iter().any(|m| m == marker), "{marker} not in {markers:?}");
        }
        assert!(
            markers.iter().all(|m| !m.starts_with("forged")),
            "a forged packet passed: {markers:?}"
        );
        // The forged packets left the guest and were dropped by the anti-spoofing rules.
        assert!(counter_packets(&host, "spoofed") >= 2);
        assert!(counter_packets(&host, "isolated") >= 2);

        h.agent.set_desired(assignments(3, &[]));
        h.pass_until("all forgotten", HEALTHY_TIMEOUT, |h| {
            h.agent.tracked().is_empty()
        })
        .await;
    })
    .unwrap();
}
