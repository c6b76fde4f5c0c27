//! Fuzzes the ClientHello scanner: any bytes, any cap, must give a result and never panic.
//! Prefixes are scanned too, as the proxy does while bytes arrive.

#![no_main]

use kiln_ingress::client_hello::{HelloScan, scan};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the cap, so small caps get exercised as well.
    let (cap, bytes) = match data {
        [high, low, rest @ ..] => (usize::from(u16::from_be_bytes([*high, *low])), rest),
        _ => (16 * 1024, data),
    };
    let full = scan(bytes, cap);
    for len in 0..bytes.len() {
        // A result for a prefix is final unless it asks for more bytes.
        match scan(&bytes[..len], cap) {
            Ok(HelloScan::NeedMore) => {}
            prefix => assert_eq!(prefix, full, "prefix of {len} bytes decided differently"),
        }
    }
});
