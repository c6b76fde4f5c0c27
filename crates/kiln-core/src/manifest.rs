//! The `kiln.toml` manifest: parsing, per-environment overrides and validation.
