//! TLS ClientHello reader: finds the server name (SNI) in the first bytes a client sends.
//!
//! The ingress never terminates TLS, so this is the only part of the tenant's stream it
//! interprets. [`scan`] is a pure function over the bytes buffered so far: the caller reads
//! more from the socket while it returns [`HelloScan::NeedMore`]. A ClientHello may arrive in
//! many TCP segments and, because TLS lets a handshake message span records, in several TLS
//! records (post-quantum key shares make hellos larger than one MTU). Input comes from
//! the network, so every length is checked and nothing here panics.

use thiserror::Error;

/// TLS record content type for handshake messages.
const CONTENT_TYPE_HANDSHAKE: u8 = 22;
/// Handshake message type of a ClientHello.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
/// Extension number of `server_name` (RFC 6066, section 3).
const EXTENSION_SERVER_NAME: u16 = 0;
/// `NameType` of a DNS hostname inside the `server_name` extension.
const NAME_TYPE_HOST_NAME: u8 = 0;
/// Length of a TLS record header: type, version, length.
const RECORD_HEADER_LEN: usize = 5;
/// Maximum plaintext record payload (RFC 8446, section 5.1).
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
/// Length of a handshake message header: type and 24-bit length.
const HANDSHAKE_HEADER_LEN: usize = 4;
/// Maximum length of a DNS hostname.
const MAX_HOSTNAME_LEN: usize = 253;

/// Outcome of scanning the bytes a client has sent so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloScan {
    /// The ClientHello is not complete yet: read more bytes and scan again.
    NeedMore,
    /// The complete ClientHello names this server, lowercased.
    Sni(String),
    /// The complete ClientHello has no `server_name` extension.
    NoSni,
}

/// Error in the bytes a client sent instead of a routable ClientHello.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HelloError {
    /// The first record is not a TLS handshake record, so the client does not speak TLS.
    #[error("not a TLS handshake record (content type {content_type})")]
    NotHandshake {
        /// Content type byte of the offending record.
        content_type: u8,
    },
    /// The handshake message is not a ClientHello.
    #[error("first handshake message is type {message_type}, not a ClientHello")]
    NotClientHello {
        /// Handshake message type byte.
        message_type: u8,
    },
    /// The ClientHello, or the bytes buffered to find it, exceed the configured cap.
    #[error("ClientHello needs more than {max_bytes} bytes")]
    TooLarge {
        /// The configured cap in bytes.
        max_bytes: usize,
    },
    /// A length or field violates the TLS wire format.
    #[error("malformed ClientHello: {reason}")]
    Malformed {
        /// The violated rule.
        reason: &'static str,
    },
}

/// Scans `buf`, the bytes received so far from a client, for a complete ClientHello.
///
/// `max_bytes` caps the bytes the caller may buffer: a ClientHello that cannot be complete
/// within that many bytes of records is rejected with [`HelloError::TooLarge`] as soon as its
/// length is known, without waiting for the rest. A result other than `NeedMore` is final:
/// more bytes never change it.
pub fn scan(buf: &[u8], max_bytes: usize) -> Result<HelloScan, HelloError> {
    // Bytes past the cap are never looked at, so the outcome is the same however far past
    // it the caller has read.
    let buf = &buf[..buf.len().min(max_bytes)];
    let message = match reassemble_message(buf, max_bytes)? {
        // Small records can stretch a short message past the cap; the result must not
        // depend on how much the caller happened to read beyond it.
        Some((_, wire_len)) if wire_len > max_bytes => {
            return Err(HelloError::TooLarge { max_bytes });
        }
        Some((message, _)) => message,
        None if buf.len() >= max_bytes => return Err(HelloError::TooLarge { max_bytes }),
        None => return Ok(HelloScan::NeedMore),
    };

    match find_server_name(&message)? {
        Some(name) => Ok(HelloScan::Sni(name)),
        None => Ok(HelloScan::NoSni),
    }
}

/// Joins the handshake fragments of consecutive records and returns the ClientHello body,
/// once all of it has arrived, with the number of bytes of `buf` it took.
fn reassemble_message(
    buf: &[u8],
    max_bytes: usize,
) -> Result<Option<(Vec<u8>, usize)>, HelloError> {
    let mut handshake = Vec::new();
    let mut offset = 0;

    loop {
        let Some(header) = buf.get(offset..offset + RECORD_HEADER_LEN) else {
            return Ok(None);
        };
        if header[0] != CONTENT_TYPE_HANDSHAKE {
            return Err(HelloError::NotHandshake {
                content_type: header[0],
            });
        }
        if header[1] != 3 {
            return Err(malformed("record version is not TLS (major version 3)"));
        }
        let payload_len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if payload_len == 0 {
            return Err(malformed("empty handshake record"));
        }
        if payload_len > MAX_RECORD_PAYLOAD {
            return Err(malformed("record longer than 16384 bytes"));
        }

        // A cut-short record still counts: its first part may complete the message.
        let payload_start = offset + RECORD_HEADER_LEN;
        let available = buf.len().saturating_sub(payload_start).min(payload_len);
        let before = handshake.len();
        handshake.extend_from_slice(&buf[payload_start..payload_start + available]);
        if let Some((message, handshake_len)) = complete_message(&handshake, max_bytes)? {
            return Ok(Some((message, payload_start + handshake_len - before)));
        }
        if available < payload_len {
            return Ok(None);
        }
        offset = payload_start + payload_len;
    }
}

/// Returns the ClientHello body and the handshake bytes it spans (header included) if
/// `handshake` contains all of it, after checking the header.
fn complete_message(
    handshake: &[u8],
    max_bytes: usize,
) -> Result<Option<(Vec<u8>, usize)>, HelloError> {
    let Some(header) = handshake.get(..HANDSHAKE_HEADER_LEN) else {
        return Ok(None);
    };
    if header[0] != HANDSHAKE_CLIENT_HELLO {
        return Err(HelloError::NotClientHello {
            message_type: header[0],
        });
    }

    let body_len =
        usize::from(header[1]) << 16 | usize::from(header[2]) << 8 | usize::from(header[3]);
    // Each record carries at most 16384 bytes, so a message needs one record header per
    // started 16 KiB of handshake bytes.
    let handshake_len = HANDSHAKE_HEADER_LEN + body_len;
    let min_wire_len =
        handshake_len + RECORD_HEADER_LEN * handshake_len.div_ceil(MAX_RECORD_PAYLOAD);
    if min_wire_len > max_bytes {
        return Err(HelloError::TooLarge { max_bytes });
    }

    Ok(handshake
        .get(HANDSHAKE_HEADER_LEN..handshake_len)
        .map(|body| (body.to_vec(), handshake_len)))
}

/// Walks a complete ClientHello body and returns the host name of its `server_name` extension.
fn find_server_name(body: &[u8]) -> Result<Option<String>, HelloError> {
    let mut reader = Reader::new(body);

    reader.take(2, "legacy_version is cut short")?;
    reader.take(32, "random is cut short")?;
    let session_id = reader.vector_u8("session_id is cut short")?;
    if session_id.len() > 32 {
        return Err(malformed("session_id longer than 32 bytes"));
    }
    let cipher_suites = reader.vector_u16("cipher_suites is cut short")?;
    if cipher_suites.is_empty() || cipher_suites.len() % 2 != 0 {
        return Err(malformed("cipher_suites is empty or of odd length"));
    }
    let compression = reader.vector_u8("compression_methods is cut short")?;
    if compression.is_empty() {
        return Err(malformed("compression_methods is empty"));
    }

    // A TLS 1.2 ClientHello may end here without any extensions.
    if reader.is_empty() {
        return Ok(None);
    }
    let extensions = reader.vector_u16("extensions are cut short")?;
    if !reader.is_empty() {
        return Err(malformed("bytes after the extensions"));
    }

    let mut extensions = Reader::new(extensions);
    let mut server_name = None;
    while !extensions.is_empty() {
        let extension_type = extensions.u16("extension type is cut short")?;
        let data = extensions.vector_u16("extension data is cut short")?;
        if extension_type != EXTENSION_SERVER_NAME {
            continue;
        }
        if server_name.is_some() {
            return Err(malformed("server_name extension appears twice"));
        }
        server_name = parse_server_name_extension(data)?;
    }
    Ok(server_name)
}

/// Parses the `ServerNameList` of a `server_name` extension (RFC 6066, section 3).
fn parse_server_name_extension(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut reader = Reader::new(data);
    let list = reader.vector_u16("server_name list is cut short")?;
    if !reader.is_empty() {
        return Err(malformed("bytes after the server_name list"));
    }
    // RFC 6066 allows an empty extension in a ServerHello only, but some clients send one.
    if list.is_empty() {
        return Ok(None);
    }

    let mut list = Reader::new(list);
    let mut host_name = None;
    while !list.is_empty() {
        let name_type = list.u8("server name type is cut short")?;
        let name = list.vector_u16("server name is cut short")?;
        if name_type != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host_name.is_some() {
            return Err(malformed("more than one host_name in server_name"));
        }
        host_name = Some(validate_host_name(name)?);
    }
    Ok(host_name)
}

/// Checks that a `host_name` is a plausible DNS name and returns it lowercased.
fn validate_host_name(name: &[u8]) -> Result<String, HelloError> {
    if name.is_empty() {
        return Err(malformed("empty host_name"));
    }
    if name.len() > MAX_HOSTNAME_LEN {
        return Err(malformed("host_name longer than 253 bytes"));
    }
    let valid_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
    if !name.iter().all(valid_byte) {
        return Err(malformed(
            "host_name contains a byte outside letters, digits, '-', '.', '_'",
        ));
    }
    if name.starts_with(b".") || name.ends_with(b".") || name.windows(2).any(|w| w == b"..") {
        return Err(malformed("host_name has an empty label"));
    }
    Ok(String::from_utf8_lossy(name).to_ascii_lowercase())
}

fn malformed(reason: &'static str) -> HelloError {
    HelloError::Malformed { reason }
}

/// Cursor over a byte slice whose reads fail instead of panicking when bytes run out.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    fn take(&mut self, len: usize, reason: &'static str) -> Result<&'a [u8], HelloError> {
        if self.rest.len() < len {
            return Err(malformed(reason));
        }
        let (head, tail) = self.rest.split_at(len);
        self.rest = tail;
        Ok(head)
    }

    fn u8(&mut self, reason: &'static str) -> Result<u8, HelloError> {
        Ok(self.take(1, reason)?[0])
    }

    fn u16(&mut self, reason: &'static str) -> Result<u16, HelloError> {
        let bytes = self.take(2, reason)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    fn vector_u8(&mut self, reason: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u8(reason)?;
        self.take(usize::from(len), reason)
    }

    fn vector_u16(&mut self, reason: &'static str) -> Result<&'a [u8], HelloError> {
        let len = self.u16(reason)?;
        self.take(usize::from(len), reason)
    }
}

#[cfg(test)]
mod tests;
