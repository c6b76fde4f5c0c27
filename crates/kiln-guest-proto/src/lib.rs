//! The host-guest channel protocol: the messages that `kiln-vmm` (on the host) and `kiln-init`
//! (PID 1 in the guest) exchange, and their framing.
//!
//! It is a crate of its own so that `kiln-init`, a static binary, links only serde and
//! serde_json and none of the host's async stack. The transport is a byte stream: a
//! virtio-serial port under QEMU or a vsock connection under Firecracker.
//!
//! Framing: every message is a 4-byte big-endian length followed by that many bytes of JSON.
//! The guest speaks first with [`GuestMessage::Hello`] naming its [`PROTOCOL_VERSION`]; the
//! host answers with [`HostMessage::Config`] or closes the channel when the versions differ.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Version of this protocol. A host and guest with different versions do not talk.
pub const PROTOCOL_VERSION: u32 = 2;

/// Maximum size of one frame's JSON body in bytes. Larger frames are rejected before any
/// allocation, so a peer cannot make the other side reserve unbounded memory.
pub const MAX_FRAME_BYTES: u32 = 4 * 1024 * 1024;

/// Maximum length in bytes of one [`GuestMessage::Log`] line; longer output is split.
pub const MAX_LOG_LINE_BYTES: usize = 16 * 1024;

/// Name of the virtio-serial port that carries the channel under QEMU.
pub const VIRTIO_PORT_NAME: &str = "kiln.channel";

/// Vsock port on the host (CID 2) that the guest connects to under Firecracker.
pub const VSOCK_PORT: u32 = 1024;

/// Message sent by the host to the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// The instance config; sent once, in answer to [`GuestMessage::Hello`].
    Config(Box<InstanceConfig>),
    /// Deliver this signal number to the workload (graceful stop sends the config's
    /// `kill_signal`).
    Signal {
        /// Signal number, as in `kill(2)`.
        signal: i32,
    },
    /// Request a [`GuestMessage::ListeningSockets`] answer.
    ListSockets,
}

/// Message sent by the guest to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// First message of the guest; the host answers with its config.
    Hello {
        /// The guest's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// The workload process started.
    Started {
        /// Guest process id of the workload.
        pid: u32,
    },
    /// One line (or a part of a long line) of the workload's output, without the newline.
    Log {
        /// Which output stream the line came from.
        stream: Stream,
        /// The line, decoded as UTF-8 with invalid sequences replaced.
        line: String,
    },
    /// A startup script exited unsuccessfully; the workload does not start.
    StartupScriptFailed {
        /// Position of the script in [`InstanceConfig::startup_scripts`], from 0.
        index: usize,
        /// Exit status of the script as `sh` reported it, or `None` when killed by a signal.
        code: Option<i32>,
        /// Whether it was killed because it ran past its timeout.
        #[serde(default)]
        timed_out: bool,
        /// The script's combined stdout and stderr, truncated to [`MAX_LOG_LINE_BYTES`].
        output: String,
    },
    /// Answer to [`HostMessage::ListSockets`].
    ListeningSockets {
        /// TCP sockets in the LISTEN state and bound UDP sockets.
        sockets: Vec<ListeningSocket>,
    },
    /// The guest could not start the workload; it powers off after this message.
    BootFailed {
        /// What failed, with the value involved.
        message: String,
    },
    /// The workload exited; the guest powers off after this message.
    Exited(ExitStatus),
}

/// Output stream of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How the workload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExitStatus {
    /// Exit code when the workload exited normally.
    pub code: Option<i32>,
    /// Signal number when the workload was killed by a signal.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Returns the exit code a shell would report: the code, or 128 plus the signal number.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }
}

/// One socket the guest listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListeningSocket {
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Local address as text (`127.0.0.1`, `::`).
    pub address: String,
    /// Local port.
    pub port: u16,
}

/// Everything kiln-init needs to run one instance. It comes only from the host.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// Entrypoint plus command, as the image and release define them. Must not be empty.
    pub argv: Vec<String>,
    /// Working directory of the workload; `/` when empty.
    pub workdir: String,
    /// User id the workload runs as.
    pub uid: u32,
    /// Group id the workload runs as.
    pub gid: u32,
    /// Environment variables of the workload, in order.
    pub env: Vec<(String, String)>,
    /// Secrets, written to `/run/kiln/secrets/NAME` (mode 0400, owned by `uid`).
    pub secrets: Vec<Secret>,
    /// Also pass each secret to the workload as an environment variable named after it.
    pub secrets_as_env: bool,
    /// Guest hostname.
    pub hostname: String,
    /// Network identity; `None` leaves only the loopback device up.
    pub network: Option<NetworkConfig>,
    /// Shell scripts run in order with `/bin/sh -c` as root before the workload; the first
    /// failure (or timeout) stops the boot.
    pub startup_scripts: Vec<StartupScript>,
    /// Signal number sent to the workload on a graceful stop (SIGTERM is 15).
    pub kill_signal: i32,
    /// Random bytes from the host, credited to the guest's entropy pool before anything runs.
    pub entropy_seed: Vec<u8>,
}

impl std::fmt::Debug for InstanceConfig {
    // Secret values stay out of debug output so they never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret_names: Vec<&str> = self.secrets.iter().map(|s| s.name.as_str()).collect();
        f.debug_struct("InstanceConfig")
            .field("argv", &self.argv)
            .field("workdir", &self.workdir)
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .field("env", &self.env)
            .field("secrets", &secret_names)
            .field("secrets_as_env", &self.secrets_as_env)
            .field("hostname", &self.hostname)
            .field("network", &self.network)
            .field("startup_scripts", &self.startup_scripts.len())
            .field("kill_signal", &self.kill_signal)
            .finish_non_exhaustive()
    }
}

/// A script run before the workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartupScript {
    /// Shell command, run with `/bin/sh -c`.
    pub command: String,
    /// Seconds the script may run before it is killed; `None` waits as long as it takes.
    #[serde(default)]
    pub timeout_secs: Option<u32>,
}

/// A named secret value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secret {
    /// File name under `/run/kiln/secrets/`; letters, digits, `_`, `-` and `.` only.
    pub name: String,
    /// The secret's bytes.
    pub value: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The guest's network identity, all of it allocated by the control plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The instance's IPv6 address, configured as a /128.
    pub ipv6: std::net::Ipv6Addr,
    /// Link-local IPv6 address of the host end of the TAP, the default gateway.
    pub ipv6_gateway: std::net::Ipv6Addr,
    /// The instance's private IPv4 address, configured as a /32.
    pub ipv4: Option<std::net::Ipv4Addr>,
    /// IPv4 default gateway, reached on-link.
    pub ipv4_gateway: Option<std::net::Ipv4Addr>,
    /// MTU of the guest interface in bytes.
    pub mtu: u32,
    /// DNS servers written to `/etc/resolv.conf`.
    pub dns_servers: Vec<std::net::IpAddr>,
}

/// Error reading or writing a frame.
#[derive(Debug)]
pub enum FrameError {
    /// The stream failed.
    Io(io::Error),
    /// The peer announced a frame longer than [`MAX_FRAME_BYTES`].
    TooLong(u32),
    /// The frame's body is not a valid message.
    Json(serde_json::Error),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::Io(_) => write!(f, "channel read or write failed"),
            FrameError::TooLong(len) => {
                write!(
                    f,
                    "frame of {len} bytes exceeds the maximum of {MAX_FRAME_BYTES}"
                )
            }
            FrameError::Json(_) => write!(f, "frame is not a valid message"),
        }
    }
}

impl std::error::Error for FrameError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FrameError::Io(error) => Some(error),
            FrameError::TooLong(_) => None,
            FrameError::Json(error) => Some(error),
        }
    }
}

/// Encodes one message as a frame: length prefix plus JSON.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(message).map_err(FrameError::Json)?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLong(u32::MAX))?;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong(len));
    }

    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Parses the length prefix of a frame, rejecting lengths above [`MAX_FRAME_BYTES`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLong(len));
    }
    Ok(len as usize)
}

/// Decodes a frame body (without its length prefix).
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(FrameError::Json)
}

/// Writes one frame to a blocking stream.
pub fn write_frame<T: Serialize>(stream: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let frame = encode(message)?;
    stream.write_all(&frame).map_err(FrameError::Io)?;
    stream.flush().map_err(FrameError::Io)
}

/// Reads one frame from a blocking stream. Returns `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'a> Deserialize<'a>>(
    stream: &mut impl Read,
) -> Result<Option<T>, FrameError> {
    // End of stream before a frame starts is a clean close; inside a frame it is an error.
    let mut prefix = [0u8; 4];
    loop {
        match stream.read(&mut prefix[..1]) {
            Ok(0) => return Ok(None),
            Ok(_) => break,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(FrameError::Io(error)),
        }
    }
    stream
        .read_exact(&mut prefix[1..])
        .map_err(FrameError::Io)?;

    let mut body = vec![0u8; frame_len(prefix)?];
    stream.read_exact(&mut body).map_err(FrameError::Io)?;
    decode(&body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_config() -> InstanceConfig {
        InstanceConfig {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            workdir: "/srv".into(),
            uid: 1000,
            gid: 1000,
            env: vec![("A".into(), "1".into())],
            secrets: vec![Secret {
                name: "db_password".into(),
                value: b"hunter2".to_vec(),
            }],
            secrets_as_env: true,
            hostname: "web-1".into(),
            network: None,
            startup_scripts: vec![],
            kill_signal: 15,
            entropy_seed: vec![1, 2, 3],
        }
    }

    #[test]
    fn frame_round_trip() {
        let message = HostMessage::Config(Box::new(sample_config()));
        let frame = encode(&message).unwrap();
        let decoded: HostMessage = read_frame(&mut frame.as_slice()).unwrap().unwrap();
        assert_eq!(decoded, message);
    }

    #[test]
    fn frame_every_prefix_is_incomplete() {
        let frame = encode(&GuestMessage::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        for cut in 1..frame.len() {
            let result: Result<Option<GuestMessage>, _> = read_frame(&mut &frame[..cut]);
            assert!(result.is_err(), "prefix of {cut} bytes decoded");
        }
        let empty: Option<GuestMessage> = read_frame(&mut &frame[..0]).unwrap();
        assert_eq!(empty, None);
    }

    #[test]
    fn frame_too_long_rejected() {
        let prefix = (MAX_FRAME_BYTES + 1).to_be_bytes();
        let result: Result<Option<GuestMessage>, _> = read_frame(&mut &prefix[..]);
        assert!(matches!(result, Err(FrameError::TooLong(_))));
    }

    #[test]
    fn unknown_field_rejected() {
        let body = br#"{"type":"hello","version":1,"extra":true}"#;
        assert!(decode::<GuestMessage>(body).is_err());
    }

    #[test]
    fn debug_hides_secret_values() {
        let text = format!("{:?}", sample_config());
        assert!(text.contains("db_password"));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn shell_code_of_signal() {
        let status = ExitStatus {
            code: None,
            signal: Some(9),
        };
        assert_eq!(status.shell_code(), 137);
    }
}
