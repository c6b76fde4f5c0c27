use proptest::prelude::*;

use super::*;

const CAP: usize = 16 * 1024;

/// Real ClientHellos captured from clients (see `tests/fixtures/capture`), with the SNI each sent.
const FIXTURES: &[(&str, &[u8], Option<&str>)] = &[
    (
        "curl",
        include_bytes!("../../tests/fixtures/curl.bin"),
        Some("app.example.test"),
    ),
    (
        "openssl",
        include_bytes!("../../tests/fixtures/openssl.bin"),
        Some("shop.example.test"),
    ),
    (
        "openssl-many-groups",
        include_bytes!("../../tests/fixtures/openssl-many-groups.bin"),
        Some("api.example.test"),
    ),
    (
        "openssl-tls12",
        include_bytes!("../../tests/fixtures/openssl-tls12.bin"),
        Some("legacy.example.test"),
    ),
    (
        "openssl-no-sni",
        include_bytes!("../../tests/fixtures/openssl-no-sni.bin"),
        None,
    ),
    (
        "rustls",
        include_bytes!("../../tests/fixtures/rustls.bin"),
        Some("app.example.test"),
    ),
    (
        "rustls-pq",
        include_bytes!("../../tests/fixtures/rustls-pq.bin"),
        Some("pq.example.test"),
    ),
    (
        "rustls-pq-fragmented",
        include_bytes!("../../tests/fixtures/rustls-pq-fragmented.bin"),
        Some("frag.example.test"),
    ),
    (
        "rustls-no-sni",
        include_bytes!("../../tests/fixtures/rustls-no-sni.bin"),
        None,
    ),
];

fn expected_scan(sni: Option<&str>) -> HelloScan {
    match sni {
        Some(name) => HelloScan::Sni(name.to_owned()),
        None => HelloScan::NoSni,
    }
}

/// Splits the handshake bytes of `hello` (one or more records) into records of `size` bytes.
fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    let mut handshake = Vec::new();
    let mut rest = hello;
    while rest.len() >= RECORD_HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        handshake.extend_from_slice(&rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len]);
        rest = &rest[RECORD_HEADER_LEN + len..];
    }
    let mut out = Vec::new();
    for chunk in handshake.chunks(size) {
        out.extend_from_slice(&[CONTENT_TYPE_HANDSHAKE, 3, 1]);
        out.extend_from_slice(&u16::try_from(chunk.len()).unwrap().to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

fn record_count(hello: &[u8]) -> usize {
    let mut count = 0;
    let mut rest = hello;
    while rest.len() >= RECORD_HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        rest = &rest[RECORD_HEADER_LEN + len..];
        count += 1;
    }
    count
}

#[test]
fn fixtures_complete_yield_sni() {
    for (name, hello, sni) in FIXTURES {
        assert_eq!(scan(hello, CAP), Ok(expected_scan(*sni)), "fixture {name}");
    }
}

#[test]
fn fixtures_every_prefix_needs_more() {
    for (name, hello, _) in FIXTURES {
        for len in 0..hello.len() {
            assert_eq!(
                scan(&hello[..len], CAP),
                Ok(HelloScan::NeedMore),
                "fixture {name} cut at {len} of {} bytes",
                hello.len()
            );
        }
    }
}

#[test]
fn post_quantum_hello_spans_records() {
    let fragmented = FIXTURES
        .iter()
        .find(|f| f.0 == "rustls-pq-fragmented")
        .unwrap()
        .1;
    assert!(
        record_count(fragmented) >= 3,
        "rustls wrote {} records",
        record_count(fragmented)
    );
    let pq = FIXTURES.iter().find(|f| f.0 == "rustls-pq").unwrap().1;
    assert!(
        pq.len() > 1400,
        "a post-quantum hello exceeds a typical 1400-byte segment"
    );
}

#[test]
fn fixtures_refragmented_every_size() {
    for (name, hello, sni) in FIXTURES {
        for size in [1, 2, 3, 4, 5, 7, 64, 255, 1000] {
            let records = refragment(hello, size);
            assert_eq!(
                scan(&records, CAP),
                Ok(expected_scan(*sni)),
                "{name} in {size}-byte records"
            );
            for len in (0..records.len()).step_by(size.max(3)) {
                assert_eq!(
                    scan(&records[..len], CAP),
                    Ok(HelloScan::NeedMore),
                    "{name} in {size}-byte records cut at {len}"
                );
            }
        }
    }
}

#[test]
fn trailing_bytes_after_hello_are_ignored() {
    for (name, hello, sni) in FIXTURES {
        let mut stream = hello.to_vec();
        stream.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
        assert_eq!(
            scan(&stream, CAP),
            Ok(expected_scan(*sni)),
            "fixture {name}"
        );
    }
}

#[test]
fn hello_above_cap_rejected_from_header() {
    let pq = FIXTURES.iter().find(|f| f.0 == "rustls-pq").unwrap().1;
    // The record and handshake headers (9 bytes) already tell the hello's length.
    assert_eq!(
        scan(&pq[..9], 1024),
        Err(HelloError::TooLarge { max_bytes: 1024 })
    );
    assert_eq!(
        scan(pq, pq.len()),
        Ok(HelloScan::Sni("pq.example.test".into()))
    );
    assert_eq!(
        scan(pq, pq.len() - 1),
        Err(HelloError::TooLarge {
            max_bytes: pq.len() - 1
        })
    );
}

#[test]
fn buffer_at_cap_without_hello_rejected() {
    let pq = FIXTURES.iter().find(|f| f.0 == "rustls-pq").unwrap().1;
    // One-byte records cost five header bytes each, so the buffer fills before the hello ends.
    let records = refragment(pq, 1);
    let cap = pq.len() * 2;
    assert_eq!(
        scan(&records[..cap], cap),
        Err(HelloError::TooLarge { max_bytes: cap })
    );
}

#[test]
fn non_tls_input_rejected() {
    assert_eq!(
        scan(b"GET / HTTP/1.1\r\n", CAP),
        Err(HelloError::NotHandshake { content_type: b'G' })
    );
    // An SSLv2-compatible hello starts with a length byte that has its high bit set.
    assert_eq!(
        scan(&[0x80, 0x2e, 0x01, 0x03, 0x01], CAP),
        Err(HelloError::NotHandshake { content_type: 0x80 })
    );
    assert_eq!(
        scan(&[22, 2, 0, 0, 4], CAP),
        Err(HelloError::Malformed {
            reason: "record version is not TLS (major version 3)"
        })
    );
    assert_eq!(
        scan(&[22, 3, 1, 0, 4, 2, 0, 0, 0], CAP),
        Err(HelloError::NotClientHello { message_type: 2 })
    );
    assert_eq!(
        scan(&[22, 3, 1, 0, 0], CAP),
        Err(HelloError::Malformed {
            reason: "empty handshake record"
        })
    );
}

#[test]
fn bad_host_names_rejected() {
    let curl = FIXTURES[0].1;
    let at = curl
        .windows(16)
        .position(|w| w == b"app.example.test")
        .unwrap();
    for (replacement, what) in [
        (&b"app.ex ample.tes"[..], "space"),
        (&b"app.example.tes\0"[..], "NUL byte"),
        (&b"app..xample.test"[..], "empty label"),
        (&b"app.example.tes."[..], "trailing dot"),
    ] {
        let mut hello = curl.to_vec();
        hello[at..at + 16].copy_from_slice(replacement);
        assert!(
            matches!(scan(&hello, CAP), Err(HelloError::Malformed { .. })),
            "host name with {what}"
        );
    }
}

#[test]
fn uppercase_host_name_lowercased() {
    let curl = FIXTURES[0].1;
    let at = curl
        .windows(16)
        .position(|w| w == b"app.example.test")
        .unwrap();
    let mut hello = curl.to_vec();
    hello[at..at + 16].copy_from_slice(b"APP.Example.TEST");
    assert_eq!(
        scan(&hello, CAP),
        Ok(HelloScan::Sni("app.example.test".into()))
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = scan(&bytes, CAP);
    }

    #[test]
    fn handshake_prefixed_bytes_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        len in any::<u16>(),
    ) {
        let mut bytes = vec![CONTENT_TYPE_HANDSHAKE, 3, 1];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = scan(&bytes, CAP);
    }

    #[test]
    fn mutated_fixtures_never_panic(
        fixture in 0..FIXTURES.len(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        cap in 0usize..20_000,
    ) {
        let mut hello = FIXTURES[fixture].1.to_vec();
        for (index, byte) in edits {
            let at = index.index(hello.len());
            hello[at] = byte;
        }
        let len = cut.index(hello.len() + 1);
        let _ = scan(&hello[..len], cap);
    }

    #[test]
    fn refragmented_fixtures_keep_sni(
        fixture in 0..FIXTURES.len(),
        size in 1usize..600,
    ) {
        let (_, hello, sni) = FIXTURES[fixture];
        let records = refragment(hello, size);
        prop_assert_eq!(scan(&records, CAP), Ok(expected_scan(sni)));
    }
}

proptest! {
    // Each case scans every prefix, so fewer cases cover as many scans as above.
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn prefix_decision_is_final(
        fixture in 0..FIXTURES.len(),
        size in 1usize..300,
        edit in any::<prop::sample::Index>(),
        byte in any::<u8>(),
        cap in 512usize..3000,
    ) {
        // The proxy scans after every read, so a decision on a prefix must match the
        // decision on the whole input.
        let mut records = refragment(FIXTURES[fixture].1, size);
        let at = edit.index(records.len());
        records[at] = byte;
        let full = scan(&records, cap);
        for len in 0..records.len() {
            match scan(&records[..len], cap) {
                Ok(HelloScan::NeedMore) => {}
                prefix => prop_assert_eq!(&prefix, &full, "prefix of {} bytes", len),
            }
        }
    }
}
