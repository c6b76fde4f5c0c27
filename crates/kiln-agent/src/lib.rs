//! kiln-agent: makes a host's desired state real and keeps it so.
//!
//! It watches the host's assignments, prepares images, networking and microVMs through
//! `kiln-image`, `kiln-net` and `kiln-vmm`, health-checks instances and reports their state.
//! Deciding is separate from doing: [`plan::plan`] is a pure function from desired and actual
//! state to actions, and [`agent::Agent`] executes them through the traits in [`runtime`].

pub mod agent;
pub mod backoff;
pub mod config;
pub mod console;
pub mod control;
pub mod health;
pub mod images;
pub mod logs;
pub mod network;
pub mod overlay_key;
pub mod plan;
pub mod records;
pub mod runtime;
pub mod status;
pub mod steps;
pub mod tasks;
pub mod vmm;
