//! A minimal HTTP/1.1 server side: read one request head, skip its body, write a response.
//!
//! The example answers every request with the same body, so it needs only the request line,
//! `Connection` and `Content-Length`. Requests it cannot frame (chunked bodies, oversize
//! heads, garbage) get an error status, and then the connection closes.

use std::io::{self, Read};

/// Maximum size of a request head (request line and headers).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Maximum request body, which is read and discarded.
pub const MAX_BODY_BYTES: u64 = 1024 * 1024;

/// The parts of a request that decide the response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, such as `GET` or `HEAD`.
    pub method: String,
    /// Request target, such as `/`.
    pub target: String,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// A request that could not be read.
#[derive(Debug)]
pub enum RequestError {
    /// Reading from the connection failed.
    Io(io::Error),
    /// The request is malformed or unsupported; the response explains it and the connection
    /// closes after it.
    Invalid(Response),
}

/// A plain-text response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: &'static str,
    /// Body text.
    pub body: String,
}

impl Response {
    /// Returns a `200 OK` response with `body`.
    pub fn ok(body: String) -> Self {
        Self {
            status: 200,
            reason: "OK",
            body,
        }
    }

    fn error(status: u16, reason: &'static str, detail: &str) -> Self {
        Self {
            status,
            reason,
            body: format!("{status} {reason}: {detail}\n"),
        }
    }

    /// Serializes the response. `head_only` leaves out the body (for `HEAD`), and
    /// `keep_alive` sets the `Connection` header.
    pub fn to_bytes(&self, head_only: bool, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut bytes = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
            self.status,
            self.reason,
            self.body.len()
        )
        .into_bytes();
        if !head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Reads the next request from `reader`, using `buffer` for bytes read past the end of the
/// previous one (pipelined requests). Returns `None` when the client closed the connection
/// or stayed idle past the read timeout between requests.
pub fn read_request<R: Read>(
    reader: &mut R,
    buffer: &mut Vec<u8>,
) -> Result<Option<Request>, RequestError> {
    let head_end = loop {
        if let Some(position) = find(buffer, b"\r\n\r\n") {
            break position;
        }
        if buffer.len() > MAX_HEAD_BYTES {
            return Err(RequestError::Invalid(Response::error(
                431,
                "Request Header Fields Too Large",
                "the request head is larger than 16 KiB",
            )));
        }

        let mut chunk = [0u8; 4096];
        match reader.read(&mut chunk) {
            Ok(0) => return Ok(None),
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if is_close(&error) && buffer.is_empty() => return Ok(None),
            Err(error) => return Err(RequestError::Io(error)),
        }
    };

    let head: Vec<u8> = buffer.drain(..head_end + 4).collect();
    let (request, body_len) = parse_head(&head[..head_end]).map_err(RequestError::Invalid)?;
    skip_body(reader, buffer, body_len).map_err(RequestError::Io)?;
    Ok(Some(request))
}

/// Returns true for errors that mean the client went away or idled out.
fn is_close(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Parses a request head into the request and its body length.
fn parse_head(head: &[u8]) -> Result<(Request, u64), Response> {
    let bad = |detail: &str| Response::error(400, "Bad Request", detail);
    let head = std::str::from_utf8(head).map_err(|_| bad("the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");

    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    let [method, target, version] = parts.as_slice() else {
        return Err(bad("expected a request line such as GET / HTTP/1.1"));
    };
    if method.is_empty() || !method.chars().all(|c| c.is_ascii_uppercase()) || target.is_empty() {
        return Err(bad("expected a request line such as GET / HTTP/1.1"));
    }
    let http11 = match *version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => {
            return Err(Response::error(
                505,
                "HTTP Version Not Supported",
                "use HTTP/1.1",
            ));
        }
    };

    let mut close = !http11;
    let mut body_len = 0;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(bad("a header line has no ':'"));
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "connection" => {
                for token in value.split(',').map(|t| t.trim().to_ascii_lowercase()) {
                    match token.as_str() {
                        "close" => close = true,
                        "keep-alive" => close = false,
                        _ => {}
                    }
                }
            }
            "content-length" => {
                body_len = value
                    .parse()
                    .map_err(|_| bad("Content-Length is not a number"))?;
                if body_len > MAX_BODY_BYTES {
                    return Err(Response::error(
                        413,
                        "Content Too Large",
                        "the request body is larger than 1 MiB",
                    ));
                }
            }
            "transfer-encoding" => {
                return Err(Response::error(
                    501,
                    "Not Implemented",
                    "chunked request bodies are not supported; send Content-Length",
                ));
            }
            _ => {}
        }
    }

    let request = Request {
        method: (*method).to_owned(),
        target: (*target).to_owned(),
        keep_alive: !close,
    };
    Ok((request, body_len))
}

/// Discards `len` body bytes, first from `buffer`, then from `reader`.
fn skip_body<R: Read>(reader: &mut R, buffer: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let from_buffer = usize::try_from(len).unwrap_or(usize::MAX).min(buffer.len());
    buffer.drain(..from_buffer);
    let remaining = len - from_buffer as u64;
    if remaining == 0 {
        return Ok(());
    }
    let copied = io::copy(&mut reader.take(remaining), &mut io::sink())?;
    if copied < remaining {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed inside the request body",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn read_all(input: &[u8]) -> Vec<Result<Option<Request>, u16>> {
        let mut reader = Cursor::new(input.to_vec());
        let mut buffer = Vec::new();
        let mut results = Vec::new();
        loop {
            match read_request(&mut reader, &mut buffer) {
                Ok(Some(request)) => results.push(Ok(Some(request))),
                Ok(None) => {
                    results.push(Ok(None));
                    return results;
                }
                Err(RequestError::Invalid(response)) => {
                    results.push(Err(response.status));
                    return results;
                }
                Err(RequestError::Io(error)) => panic!("{error}"),
            }
        }
    }

    fn request(method: &str, keep_alive: bool) -> Result<Option<Request>, u16> {
        Ok(Some(Request {
            method: method.to_owned(),
            target: "/".to_owned(),
            keep_alive,
        }))
    }

    #[test]
    fn pipelined_requests_with_bodies() {
        let input = b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nConnection: close\r\n\r\n";
        let results = read_all(input);
        assert_eq!(
            results,
            [
                request("POST", true),
                request("GET", true),
                request("HEAD", false),
                Ok(None)
            ]
        );
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        assert_eq!(
            read_all(b"GET / HTTP/1.0\r\n\r\n")[0],
            request("GET", false)
        );
        assert_eq!(
            read_all(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")[0],
            request("GET", true)
        );
    }

    #[test]
    fn malformed_requests_get_status() {
        let cases: [(&[u8], u16); 7] = [
            (b"garbage\r\n\r\n", 400),
            (b"GET /\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        ];
        for (input, status) in cases {
            assert_eq!(
                read_all(input)[0],
                Err(status),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversize_head_rejected() {
        let mut input = b"GET / HTTP/1.1\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES + 10));
        assert_eq!(read_all(&input)[0], Err(431));
    }

    #[test]
    fn eof_between_requests_is_clean() {
        assert_eq!(read_all(b""), [Ok(None)]);
        assert_eq!(read_all(b"GET / HT"), [Ok(None)]);
    }

    #[test]
    fn response_bytes() {
        let response = Response::ok("hi\n".to_owned());
        assert_eq!(
            String::from_utf8(response.to_bytes(false, true)).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nhi\n"
        );
        let head = String::from_utf8(response.to_bytes(true, false)).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
    }
}
