//! The deploy orchestrator: the control plane's singleton work that turns deploy intents into
//! plans (through `kiln-scheduler`) and carries them out step by step, recording each step's
//! outcome as an event so a restarted control plane resumes where the last one stopped.

pub mod convert;
pub mod engine;
pub mod pg;
pub mod preview;
mod snapshot;
