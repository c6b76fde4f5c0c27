//! The image config as the guest needs it (argv parts, env, working directory, user as
//! numeric ids, exposed ports, stop signal), and the manifest's command overrides.
//!
//! The user is resolved against the image's own `/etc/passwd` and `/etc/group`, read from
//! the unpacked tree with `RESOLVE_IN_ROOT` so a symlinked `/etc/passwd` resolves as it would
//! inside the guest and never reads a host file.

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::dirfd::Dir;
use crate::manifest::RuntimeConfig;

/// The largest `/etc/passwd` or `/etc/group` read, in bytes.
const MAX_ACCOUNT_FILE: u64 = 4 * 1024 * 1024;

/// What the guest needs from the image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `ENTRYPOINT`.
    pub entrypoint: Vec<String>,
    /// `CMD`.
    pub cmd: Vec<String>,
    /// `ENV`, as `NAME=value` entries in image order.
    pub env: Vec<String>,
    /// `WORKDIR`; `/` when the image sets none.
    pub working_dir: String,
    /// `USER`, resolved to numeric ids.
    pub user: ResolvedUser,
    /// `EXPOSE`d ports.
    pub exposed_ports: Vec<ExposedPort>,
    /// `STOPSIGNAL` (a name like `SIGQUIT` or a number); `None` means SIGTERM.
    pub stop_signal: Option<String>,
}

/// A user resolved to numeric ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedUser {
    /// The `USER` value as written in the image (empty means root).
    pub spec: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids from `/etc/group` memberships.
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd`, when the user is listed there.
    pub home: Option<String>,
}

/// An exposed port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExposedPort {
    /// Port number.
    pub port: u16,
    /// `tcp` or `udp`.
    pub protocol: String,
}

/// A `USER` value that does not resolve in the image.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The user name is not in the image's `/etc/passwd`.
    #[error(
        "user {name:?} is not in the image's /etc/passwd: use a numeric uid or add the user to the image"
    )]
    UnknownUser {
        /// The name.
        name: String,
    },
    /// The group name is not in the image's `/etc/group`.
    #[error(
        "group {name:?} is not in the image's /etc/group: use a numeric gid or add the group to the image"
    )]
    UnknownGroup {
        /// The name.
        name: String,
    },
    /// The value has an empty user or group part.
    #[error("user {spec:?} is invalid: write NAME, UID, NAME:GROUP or UID:GID")]
    Invalid {
        /// The value.
        spec: String,
    },
    /// The account files could not be read.
    #[error("failed to read {file} in the image")]
    Read {
        /// Which file.
        file: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An exposed port key that is not `PORT[/tcp|udp]`.
#[derive(Debug, thiserror::Error)]
#[error("exposed port {value:?} is invalid: write PORT, PORT/tcp or PORT/udp")]
pub struct PortError {
    /// The key.
    pub value: String,
}

/// The parsed `/etc/passwd` and `/etc/group` of an image.
#[derive(Debug, Default, Clone)]
pub struct Accounts {
    users: Vec<PasswdEntry>,
    groups: Vec<GroupEntry>,
}

#[derive(Debug, Clone)]
struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

#[derive(Debug, Clone)]
struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

impl Accounts {
    /// Reads the account files of the unpacked tree `root`; a missing file is empty.
    pub(crate) fn read(root: &Dir) -> Result<Self, UserError> {
        let passwd = read_account_file(root, "/etc/passwd")?;
        let group = read_account_file(root, "/etc/group")?;
        Ok(Self::parse(&passwd, &group))
    }

    /// Parses the text of `/etc/passwd` and `/etc/group`; malformed lines are skipped, as
    /// libc does.
    pub fn parse(passwd: &str, group: &str) -> Self {
        let users = passwd
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 7 {
                    return None;
                }
                Some(PasswdEntry {
                    name: fields[0].to_owned(),
                    uid: fields[2].parse().ok()?,
                    gid: fields[3].parse().ok()?,
                    home: fields[5].to_owned(),
                })
            })
            .collect();
        let groups = group
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(':').collect();
                if fields.len() < 4 {
                    return None;
                }
                Some(GroupEntry {
                    name: fields[0].to_owned(),
                    gid: fields[2].parse().ok()?,
                    members: fields[3]
                        .split(',')
                        .filter(|member| !member.is_empty())
                        .map(str::to_owned)
                        .collect(),
                })
            })
            .collect();
        Self { users, groups }
    }

    /// Resolves a `USER` value (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`, any mix) the way
    /// Docker does: a numeric uid need not be listed, and then its group is 0.
    pub fn resolve(&self, spec: &str) -> Result<ResolvedUser, UserError> {
        if spec.is_empty() {
            return Ok(ResolvedUser {
                home: Some("/root".to_owned()),
                ..ResolvedUser::default()
            });
        }
        let (user_part, group_part) = match spec.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (spec, None),
        };
        if user_part.is_empty() || group_part == Some("") {
            return Err(UserError::Invalid {
                spec: spec.to_owned(),
            });
        }

        let entry = match user_part.parse::<u32>() {
            Ok(uid) => self.users.iter().find(|user| user.uid == uid),
            Err(_) => Some(
                self.users
                    .iter()
                    .find(|user| user.name == user_part)
                    .ok_or_else(|| UserError::UnknownUser {
                        name: user_part.to_owned(),
                    })?,
            ),
        };
        let uid = match entry {
            Some(entry) => entry.uid,
            None => user_part.parse().unwrap_or_default(),
        };

        let gid = match group_part {
            None => entry.map_or(0, |entry| entry.gid),
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => self
                    .groups
                    .iter()
                    .find(|entry| entry.name == group)
                    .map(|entry| entry.gid)
                    .ok_or_else(|| UserError::UnknownGroup {
                        name: group.to_owned(),
                    })?,
            },
        };

        let additional_gids = match (entry, group_part) {
            (Some(entry), None) => {
                let mut gids: Vec<u32> = self
                    .groups
                    .iter()
                    .filter(|group| group.gid != gid && group.members.contains(&entry.name))
                    .map(|group| group.gid)
                    .collect();
                gids.sort_unstable();
                gids.dedup();
                gids
            }
            _ => Vec::new(),
        };

        Ok(ResolvedUser {
            spec: spec.to_owned(),
            uid,
            gid,
            additional_gids,
            home: entry.map(|entry| entry.home.clone()),
        })
    }
}

fn read_account_file(root: &Dir, file: &'static str) -> Result<String, UserError> {
    let opened = match root.open_file_in_root(file.as_bytes()) {
        Ok(opened) => opened,
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => return Ok(String::new()),
        Err(source) => return Err(UserError::Read { file, source }),
    };
    let mut bytes = Vec::new();
    opened
        .take(MAX_ACCOUNT_FILE)
        .read_to_end(&mut bytes)
        .map_err(|source| UserError::Read { file, source })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// An image config that cannot be turned into the guest's config.
#[derive(Debug, thiserror::Error)]
pub enum ImageConfigError {
    /// The user does not resolve.
    #[error(transparent)]
    User(#[from] UserError),
    /// An exposed port is malformed.
    #[error(transparent)]
    Port(#[from] PortError),
}

impl ImageConfig {
    /// Builds the guest's config from the image config's runtime section and the image's
    /// accounts.
    pub fn from_runtime(
        runtime: &RuntimeConfig,
        accounts: &Accounts,
    ) -> Result<Self, ImageConfigError> {
        let user = accounts.resolve(runtime.user.as_deref().unwrap_or_default())?;
        let mut exposed_ports = Vec::new();
        for key in runtime.exposed_ports.iter().flat_map(|ports| ports.keys()) {
            exposed_ports.push(parse_port(key)?);
        }
        let working_dir = runtime
            .working_dir
            .clone()
            .filter(|dir| !dir.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        Ok(Self {
            entrypoint: runtime.entrypoint.clone().unwrap_or_default(),
            cmd: runtime.cmd.clone().unwrap_or_default(),
            env: runtime.env.clone().unwrap_or_default(),
            working_dir,
            user,
            exposed_ports,
            stop_signal: runtime
                .stop_signal
                .clone()
                .filter(|signal| !signal.is_empty()),
        })
    }
}

fn parse_port(key: &str) -> Result<ExposedPort, PortError> {
    let error = || PortError {
        value: key.to_owned(),
    };
    let (port, protocol) = key.split_once('/').unwrap_or((key, "tcp"));
    let protocol = protocol.to_ascii_lowercase();
    if protocol != "tcp" && protocol != "udp" && protocol != "sctp" {
        return Err(error());
    }
    Ok(ExposedPort {
        port: port.parse().map_err(|_| error())?,
        protocol,
    })
}

/// A process command that cannot run.
#[derive(Debug, thiserror::Error)]
#[error(
    "the process has no command: the image sets no ENTRYPOINT or CMD, so set `command` for it in kiln.toml"
)]
pub struct EmptyCommand;

/// Computes the argv of a process from the image config and the manifest's overrides, with
/// Docker's semantics: an `entrypoint` override replaces ENTRYPOINT and drops the image's
/// CMD; a `command` override replaces CMD and keeps ENTRYPOINT.
pub fn effective_argv(
    image: &ImageConfig,
    entrypoint: Option<&[String]>,
    command: Option<&[String]>,
) -> Result<Vec<String>, EmptyCommand> {
    let (entrypoint, cmd): (&[String], &[String]) = match (entrypoint, command) {
        (Some(entrypoint), Some(command)) => (entrypoint, command),
        (Some(entrypoint), None) => (entrypoint, &[]),
        (None, Some(command)) => (&image.entrypoint, command),
        (None, None) => (&image.entrypoint, &image.cmd),
    };
    let argv: Vec<String> = entrypoint.iter().chain(cmd).cloned().collect();
    if argv.is_empty() {
        return Err(EmptyCommand);
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    fn image(entrypoint: &[&str], cmd: &[&str]) -> ImageConfig {
        ImageConfig {
            entrypoint: strings(entrypoint),
            cmd: strings(cmd),
            ..ImageConfig::default()
        }
    }

    #[test]
    fn argv_without_overrides() {
        let image = image(&["/entry", "-v"], &["serve"]);
        assert_eq!(
            effective_argv(&image, None, None).unwrap(),
            ["/entry", "-v", "serve"]
        );
    }

    #[test]
    fn command_override_keeps_entrypoint() {
        let image = image(&["/entry"], &["serve"]);
        let command = strings(&["migrate", "--up"]);
        assert_eq!(
            effective_argv(&image, None, Some(&command)).unwrap(),
            ["/entry", "migrate", "--up"]
        );
    }

    #[test]
    fn entrypoint_override_clears_cmd() {
        let image = image(&["/entry"], &["serve"]);
        let entrypoint = strings(&["/bin/sh", "-c"]);
        assert_eq!(
            effective_argv(&image, Some(&entrypoint), None).unwrap(),
            ["/bin/sh", "-c"]
        );
    }

    #[test]
    fn both_overrides_replace_both() {
        let image = image(&["/entry"], &["serve"]);
        let entrypoint = strings(&["/bin/sh", "-c"]);
        let command = strings(&["echo hi"]);
        assert_eq!(
            effective_argv(&image, Some(&entrypoint), Some(&command)).unwrap(),
            ["/bin/sh", "-c", "echo hi"]
        );
    }

    #[test]
    fn cmd_only_image_and_empty_image() {
        assert_eq!(
            effective_argv(&image(&[], &["/bin/app"]), None, None).unwrap(),
            ["/bin/app"]
        );
        assert!(effective_argv(&image(&[], &[]), None, None).is_err());
        assert!(
            effective_argv(&image(&["/entry"], &[]), Some(&[]), None).is_err(),
            "empty entrypoint override leaves nothing"
        );
    }

    fn accounts() -> Accounts {
        Accounts::parse(
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\nbroken line\n",
            "root:x:0:\napp:x:1000:\nwheel:x:10:app\naudio:x:29:other\n",
        )
    }

    #[test]
    fn user_forms_resolve() {
        let accounts = accounts();
        let app = accounts.resolve("app").unwrap();
        assert_eq!((app.uid, app.gid), (1000, 1000));
        assert_eq!(app.additional_gids, [10]);
        assert_eq!(app.home.as_deref(), Some("/home/app"));

        let numeric = accounts.resolve("1000").unwrap();
        assert_eq!((numeric.uid, numeric.gid), (1000, 1000));
        let unlisted = accounts.resolve("4242").unwrap();
        assert_eq!((unlisted.uid, unlisted.gid), (4242, 0));
        let pair = accounts.resolve("app:wheel").unwrap();
        assert_eq!((pair.uid, pair.gid), (1000, 10));
        let numeric_pair = accounts.resolve("5:7").unwrap();
        assert_eq!((numeric_pair.uid, numeric_pair.gid), (5, 7));
        let root = accounts.resolve("").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
    }

    #[test]
    fn unknown_user_and_group_rejected() {
        let accounts = accounts();
        assert!(matches!(
            accounts.resolve("nobody"),
            Err(UserError::UnknownUser { .. })
        ));
        assert!(matches!(
            accounts.resolve("app:nogroup"),
            Err(UserError::UnknownGroup { .. })
        ));
        assert!(matches!(
            accounts.resolve(":1"),
            Err(UserError::Invalid { .. })
        ));
        assert!(matches!(
            accounts.resolve("app:"),
            Err(UserError::Invalid { .. })
        ));
    }

    #[test]
    fn ports_parse() {
        assert_eq!(
            parse_port("8080/tcp").unwrap(),
            ExposedPort {
                port: 8080,
                protocol: "tcp".into()
            }
        );
        assert_eq!(parse_port("53/udp").unwrap().protocol, "udp");
        assert_eq!(parse_port("80").unwrap().protocol, "tcp");
        assert!(parse_port("http/tcp").is_err());
        assert!(parse_port("70000/tcp").is_err());
        assert!(parse_port("80/icmp").is_err());
    }
}
