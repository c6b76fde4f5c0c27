//! Exit codes of `kiln`, one per kind of outcome, so scripts can branch on them.
//!
//! The numbers are part of the CLI's public contract (documented in `docs/cli.md`); never
//! renumber one.

use std::process::ExitCode;

/// The kind of outcome a command ended with, mapped to a documented exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExitKind {
    /// The command did what was asked (0).
    Success,
    /// Any failure without a more specific code: network errors, server errors, bad local
    /// files (1).
    Failure,
    /// The command line is invalid: unknown flag, missing argument, a flag that is required
    /// because stdin is not a terminal (2, as clap and most Unix tools use).
    Usage,
    /// The org, app, env, release, token or host named does not exist (3).
    NotFound,
    /// The request conflicts with current state: the name is taken, or the env changed since
    /// the plan was made (4).
    Conflict,
    /// No token, an invalid or revoked token, or a token without permission (5).
    Auth,
    /// The deploy was accepted but failed or was rolled back (6).
    DeployFailed,
    /// The user pressed Ctrl-C while following a deploy or logs; the server-side work goes on
    /// (130, the shell's code for SIGINT).
    Interrupted,
}

impl ExitKind {
    /// Every kind, in code order, for the documentation table.
    pub(crate) const ALL: [ExitKind; 8] = [
        ExitKind::Success,
        ExitKind::Failure,
        ExitKind::Usage,
        ExitKind::NotFound,
        ExitKind::Conflict,
        ExitKind::Auth,
        ExitKind::DeployFailed,
        ExitKind::Interrupted,
    ];

    /// The process exit code.
    pub(crate) const fn code(self) -> u8 {
        match self {
            ExitKind::Success => 0,
            ExitKind::Failure => 1,
            ExitKind::Usage => 2,
            ExitKind::NotFound => 3,
            ExitKind::Conflict => 4,
            ExitKind::Auth => 5,
            ExitKind::DeployFailed => 6,
            ExitKind::Interrupted => 130,
        }
    }

    /// A one-line description for `kiln --help`.
    pub(crate) const fn describe(self) -> &'static str {
        match self {
            ExitKind::Success => "success",
            ExitKind::Failure => "failure (network, server or local file error)",
            ExitKind::Usage => "usage error (invalid flags or arguments, or a flag is needed)",
            ExitKind::NotFound => "not found (org, app, env, release, token or host)",
            ExitKind::Conflict => "conflict (name taken, or the env changed since the plan)",
            ExitKind::Auth => "authentication or permission error",
            ExitKind::DeployFailed => "deploy failed or was rolled back",
            ExitKind::Interrupted => "interrupted with Ctrl-C (server-side work continues)",
        }
    }
}

impl From<ExitKind> for ExitCode {
    fn from(kind: ExitKind) -> Self {
        ExitCode::from(kind.code())
    }
}
