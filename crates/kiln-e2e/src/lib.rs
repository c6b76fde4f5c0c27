//! Kiln's end-to-end test lives in `tests/e2e/`; this library is empty.
//!
//! The test drives the real binaries (`kiln`, `kiln-control`, `kiln-agent`, `kiln-ingress`)
//! through `scripts/dev` inside a network namespace of its own, so it checks what a user runs
//! rather than any one crate's API. It builds none of them itself: a `cargo test` holds the
//! lock of the target directory, so the binaries must be built first (see `tests/e2e/stack.rs`).
