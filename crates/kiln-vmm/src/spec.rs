//! What a driver needs to create one microVM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_core::InstanceId;

use crate::VmmError;

/// The guest kernel and initramfs that scripts/guest-kernel builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// Compressed kernel (bzImage) for QEMU.
    pub bzimage: PathBuf,
    /// Uncompressed ELF kernel for Firecracker.
    pub vmlinux: PathBuf,
    /// Initramfs with kiln-init as `/init` and its modules.
    pub initramfs: PathBuf,
}

impl GuestAssets {
    /// Returns the assets in a directory written by scripts/guest-kernel.
    pub fn in_dir(dir: &Path) -> GuestAssets {
        GuestAssets {
            bzimage: dir.join("bzImage"),
            vmlinux: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio"),
        }
    }

    /// Checks that every file exists.
    pub fn check(&self) -> Result<(), VmmError> {
        let hint = "build the guest assets with scripts/guest-kernel";
        for (what, path) in [
            ("guest kernel", &self.bzimage),
            ("guest kernel (vmlinux)", &self.vmlinux),
            ("guest initramfs", &self.initramfs),
        ] {
            if !path.is_file() {
                return Err(VmmError::MissingFile {
                    what,
                    path: path.clone(),
                    hint,
                });
            }
        }
        Ok(())
    }
}

/// Everything a driver needs to create one microVM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The instance this VM runs; names its files and appears in every log and error.
    pub instance: InstanceId,
    /// Directory for the VM's sockets, console log and state file. Created when missing.
    /// Keep it short: Unix socket paths are limited to 107 bytes.
    pub state_dir: PathBuf,
    /// Guest kernel and initramfs.
    pub assets: GuestAssets,
    /// The image's read-only root filesystem (ext4); the guest sees it as `/dev/vda`.
    pub image_disk: PathBuf,
    /// The instance's writable disk (ext4), `/dev/vdb` in the guest; without one the guest
    /// keeps its writes in memory.
    pub data_disk: Option<PathBuf>,
    /// Host TAP device prepared by the caller; `None` gives the guest no network device.
    pub tap: Option<String>,
    /// MAC address of the guest interface; derived from the instance id when `None`.
    pub mac: Option<String>,
    /// Number of vCPUs, at least 1.
    pub vcpus: u8,
    /// Guest memory in MiB (a hard limit), at least 64.
    pub memory_mib: u32,
    /// How long start() waits for kiln-init's hello before it kills the VMM and fails.
    pub boot_timeout: Duration,
    /// Maximum size of the console log in bytes before it is rotated (one old file is kept).
    pub console_limit_bytes: u64,
}

impl VmSpec {
    /// A spec with default sizes: 1 vCPU, 256 MiB, a 60 s boot timeout, a 1 MiB console log.
    pub fn new(
        instance: InstanceId,
        state_dir: PathBuf,
        assets: GuestAssets,
        image_disk: PathBuf,
    ) -> VmSpec {
        VmSpec {
            instance,
            state_dir,
            assets,
            image_disk,
            data_disk: None,
            tap: None,
            mac: None,
            vcpus: 1,
            memory_mib: 256,
            boot_timeout: Duration::from_secs(60),
            console_limit_bytes: 1024 * 1024,
        }
    }

    /// Checks sizes, names and files.
    pub fn validate(&self) -> Result<(), VmmError> {
        let invalid = |reason: String| VmmError::InvalidSpec {
            instance: self.instance,
            reason,
        };
        if self.vcpus == 0 {
            return Err(invalid("vcpus is 0; give at least 1".to_owned()));
        }
        if self.memory_mib < 64 {
            return Err(invalid(format!(
                "memory_mib is {}; the guest kernel needs at least 64",
                self.memory_mib
            )));
        }
        if let Some(tap) = &self.tap {
            let valid = !tap.is_empty()
                && tap.len() < 16
                && tap
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid {
                return Err(invalid(format!(
                    "TAP device name {tap:?} must be 1 to 15 letters, digits, '-' or '_'"
                )));
            }
        }
        // The longest socket name is "firecracker.sock_1024"; sun_path holds 107 bytes.
        if self.state_dir.as_os_str().len() > 80 {
            return Err(invalid(format!(
                "state_dir {} is longer than 80 bytes; Unix socket paths inside it would not fit",
                self.state_dir.display()
            )));
        }

        self.assets.check()?;
        let hint = "build the image's root filesystem first (kiln-agent image build)";
        if !self.image_disk.is_file() {
            return Err(VmmError::MissingFile {
                what: "image disk",
                path: self.image_disk.clone(),
                hint,
            });
        }
        if let Some(data_disk) = &self.data_disk
            && !data_disk.is_file()
        {
            return Err(VmmError::MissingFile {
                what: "instance data disk",
                path: data_disk.clone(),
                hint: "create it with mkfs.ext4",
            });
        }
        Ok(())
    }

    /// The guest's MAC address: the configured one, or a locally administered address from
    /// the instance id.
    pub fn mac_address(&self) -> String {
        if let Some(mac) = &self.mac {
            return mac.clone();
        }
        let bytes = self.instance.as_uuid().into_bytes();
        format!(
            "52:4b:{:02x}:{:02x}:{:02x}:{:02x}",
            bytes[12], bytes[13], bytes[14], bytes[15]
        )
    }
}
