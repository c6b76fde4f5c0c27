//! The host end of the host-guest channel: the hello/config handshake, then a task that
//! reads the guest's messages into a bounded queue.
//!
//! The framing and message types are in [`kiln_guest_proto`] (re-exported as
//! [`crate::proto`]), shared with kiln-init. The transport is a Unix socket in both drivers:
//! QEMU's chardev socket behind the virtio-serial port, or the socket Firecracker connects to
//! when the guest opens its vsock port.

use std::sync::Arc;
use std::time::Duration;

use kiln_core::InstanceId;
use kiln_guest_proto::{
    FrameError, GuestMessage, HostMessage, InstanceConfig, PROTOCOL_VERSION, frame_len,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, mpsc};

use crate::VmmError;

/// Number of guest messages buffered for the consumer. When it is full, reading stops and
/// the guest's writes block, so a chatty workload cannot grow host memory.
const EVENT_QUEUE_LEN: usize = 1024;

/// Messages from the guest, in order. Ends when the channel closes (the VM powered off).
#[derive(Debug)]
pub struct GuestEvents {
    receiver: mpsc::Receiver<GuestMessage>,
}

impl GuestEvents {
    /// Returns the next message, or `None` once the channel has closed.
    pub async fn recv(&mut self) -> Option<GuestMessage> {
        self.receiver.recv().await
    }

    /// A stream that has already ended, for a VM whose channel is gone.
    pub(crate) fn closed() -> GuestEvents {
        let (_, receiver) = mpsc::channel(1);
        GuestEvents { receiver }
    }
}

/// Sends messages to the guest. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ChannelWriter {
    instance: InstanceId,
    stream: Arc<Mutex<OwnedWriteHalf>>,
}

impl ChannelWriter {
    /// Sends one message to kiln-init.
    pub async fn send(&self, message: &HostMessage) -> Result<(), VmmError> {
        let channel_error = |source| VmmError::Channel {
            instance: self.instance,
            operation: "send",
            source,
        };
        let frame = kiln_guest_proto::encode(message).map_err(channel_error)?;
        let mut stream = self.stream.lock().await;
        stream
            .write_all(&frame)
            .await
            .map_err(|error| channel_error(FrameError::Io(error)))
    }
}

/// Reads one frame from the stream; `Ok(None)` at a clean end of stream.
async fn read_message(stream: &mut OwnedReadHalf) -> Result<Option<GuestMessage>, FrameError> {
    let mut prefix = [0u8; 4];
    let first = stream
        .read(&mut prefix[..1])
        .await
        .map_err(FrameError::Io)?;
    if first == 0 {
        return Ok(None);
    }
    stream
        .read_exact(&mut prefix[1..])
        .await
        .map_err(FrameError::Io)?;

    let mut body = vec![0u8; frame_len(prefix)?];
    stream.read_exact(&mut body).await.map_err(FrameError::Io)?;
    kiln_guest_proto::decode(&body).map(Some)
}

/// Waits up to `timeout` for kiln-init's hello, checks its version, sends `config` and starts
/// the reader task.
pub async fn handshake(
    instance: InstanceId,
    stream: UnixStream,
    config: InstanceConfig,
    timeout: Duration,
) -> Result<(ChannelWriter, GuestEvents), HandshakeError> {
    let (mut reader, writer) = stream.into_split();

    let hello = match tokio::time::timeout(timeout, read_message(&mut reader)).await {
        Err(_) => return Err(HandshakeError::Timeout),
        Ok(Ok(Some(message))) => message,
        Ok(Ok(None)) => {
            return Err(HandshakeError::Failed(VmmError::ChannelClosed {
                instance,
                expected: "kiln-init's hello",
            }));
        }
        Ok(Err(source)) => {
            return Err(HandshakeError::Failed(VmmError::Channel {
                instance,
                operation: "read hello",
                source,
            }));
        }
    };
    match hello {
        GuestMessage::Hello { version } if version == PROTOCOL_VERSION => {}
        GuestMessage::Hello { version } => {
            return Err(HandshakeError::Failed(VmmError::ProtocolVersion {
                guest: version,
                host: PROTOCOL_VERSION,
            }));
        }
        _ => {
            return Err(HandshakeError::Failed(VmmError::ChannelClosed {
                instance,
                expected: "kiln-init's hello as the first message",
            }));
        }
    }

    let writer = ChannelWriter {
        instance,
        stream: Arc::new(Mutex::new(writer)),
    };
    writer
        .send(&HostMessage::Config(Box::new(config)))
        .await
        .map_err(HandshakeError::Failed)?;
    Ok((writer, spawn_reader(instance, reader)))
}

/// Attaches to an already configured guest (after an agent restart): no handshake.
pub fn attach(instance: InstanceId, stream: UnixStream) -> (ChannelWriter, GuestEvents) {
    let (reader, writer) = stream.into_split();
    let writer = ChannelWriter {
        instance,
        stream: Arc::new(Mutex::new(writer)),
    };
    (writer, spawn_reader(instance, reader))
}

/// How a handshake failed: a timeout can be retried once with a fresh boot, other failures not.
#[derive(Debug)]
pub enum HandshakeError {
    /// No hello within the timeout.
    Timeout,
    /// The channel failed or the guest spoke another protocol.
    Failed(VmmError),
}

fn spawn_reader(instance: InstanceId, mut reader: OwnedReadHalf) -> GuestEvents {
    let (sender, receiver) = mpsc::channel(EVENT_QUEUE_LEN);
    tokio::spawn(async move {
        loop {
            match read_message(&mut reader).await {
                Ok(Some(message)) => {
                    // Without a consumer, close the connection: QEMU then discards the
                    // guest's output instead of stalling it, and the socket is free for the
                    // next client (an agent adopting the VM).
                    if sender.send(message).await.is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(error) => {
                    tracing::warn!(%instance, error = %error, "host-guest channel read failed");
                    return;
                }
            }
        }
    });
    GuestEvents { receiver }
}
