//! Chooses the accelerator: KVM when the host has usable hardware virtualization, TCG
//! (software emulation) only when the agent's config permits it.
//!
//! "Usable" means more than `/dev/kvm` existing: the CPU must advertise `vmx` or `svm`,
//! `/dev/kvm` must open and report the stable API version, and the KVM provider must not be
//! `kvm_pvm`, a software hypervisor under which stock guest kernels crash.

use std::path::Path;

use crate::VmmError;

/// KVM API version every stable kernel reports (`KVM_GET_API_VERSION`).
const KVM_API_VERSION: i32 = 12;

/// Whether hardware virtualization is usable on this host, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HardwareVirt {
    /// KVM with hardware support works.
    Usable,
    /// Not usable, with the reason.
    Unusable(String),
}

/// Accelerator a VM runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM with hardware virtualization.
    Kvm,
    /// QEMU's TCG software emulation: a real VM boundary, much slower.
    Tcg,
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Accelerator::Kvm => f.write_str("kvm"),
            Accelerator::Tcg => f.write_str("tcg"),
        }
    }
}

/// Probes this host for usable hardware virtualization.
pub fn detect() -> HardwareVirt {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    let kvm = probe_kvm_device(Path::new("/dev/kvm"));
    classify(&cpuinfo, &modules, kvm)
}

/// Decides from the probed facts; separate from the probing so it can be tested.
fn classify(cpuinfo: &str, modules: &str, kvm_device: Result<(), String>) -> HardwareVirt {
    let has_flag = cpuinfo
        .lines()
        .filter(|line| line.starts_with("flags"))
        .any(|line| {
            line.split_whitespace()
                .any(|flag| flag == "vmx" || flag == "svm")
        });
    if !has_flag {
        return HardwareVirt::Unusable("the CPU advertises neither vmx nor svm".to_owned());
    }
    if modules.lines().any(|line| line.starts_with("kvm_pvm ")) {
        return HardwareVirt::Unusable(
            "/dev/kvm is provided by kvm_pvm, a software hypervisor that stock guest kernels \
             crash under"
                .to_owned(),
        );
    }
    if let Err(reason) = kvm_device {
        return HardwareVirt::Unusable(reason);
    }
    HardwareVirt::Usable
}

fn probe_kvm_device(path: &Path) -> Result<(), String> {
    let file = std::fs::File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|error| format!("opening {} failed: {error}", path.display()))?;

    const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let version = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            KVM_GET_API_VERSION,
            0,
        )
    };
    if version != KVM_API_VERSION {
        return Err(format!(
            "{} reports KVM API version {version}, expected {KVM_API_VERSION}",
            path.display()
        ));
    }
    Ok(())
}

/// Picks the accelerator for `hardware`, or explains why none is allowed.
pub fn choose(hardware: &HardwareVirt, allow_software: bool) -> Result<Accelerator, VmmError> {
    match hardware {
        HardwareVirt::Usable => Ok(Accelerator::Kvm),
        HardwareVirt::Unusable(_) if allow_software => Ok(Accelerator::Tcg),
        HardwareVirt::Unusable(reason) => Err(VmmError::NoAccelerator {
            reason: reason.clone(),
        }),
    }
}

/// Measures the host's TSC rate in kHz against the monotonic clock over `window`.
///
/// QEMU's TCG exposes the host TSC to the guest unscaled, so a guest on `-M microvm` (which has
/// no PIT, HPET or PM timer to calibrate against) can be told the rate with `tsc_early_khz=`.
pub fn measure_tsc_khz(window: std::time::Duration) -> u64 {
    let start_time = std::time::Instant::now();
    // SAFETY: rdtsc has no preconditions on x86_64.
    let start_ticks = unsafe { core::arch::x86_64::_rdtsc() };
    while start_time.elapsed() < window {
        std::hint::spin_loop();
    }
    // SAFETY: as above.
    let end_ticks = unsafe { core::arch::x86_64::_rdtsc() };
    let elapsed_us = start_time.elapsed().as_micros().max(1);
    let ticks = u128::from(end_ticks.wrapping_sub(start_ticks));
    u64::try_from(ticks * 1000 / elapsed_us).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae vmx sse2\n";
    const NO_VMX: &str = "processor\t: 0\nflags\t\t: fpu vme de pse tsc msr pae sse2\n";

    #[test]
    fn classify_no_cpu_flag() {
        let result = classify(NO_VMX, "", Ok(()));
        assert!(matches!(result, HardwareVirt::Unusable(reason) if reason.contains("vmx")));
    }

    #[test]
    fn classify_pvm_is_unusable() {
        let modules = "kvm_pvm 126976 0 - Live 0x0000000000000000\nkvm 1118208 1 kvm_pvm\n";
        let result = classify(VMX, modules, Ok(()));
        assert!(matches!(result, HardwareVirt::Unusable(reason) if reason.contains("kvm_pvm")));
    }

    #[test]
    fn classify_unopenable_device() {
        let result = classify(VMX, "", Err("opening /dev/kvm failed".to_owned()));
        assert!(matches!(result, HardwareVirt::Unusable(_)));
    }

    #[test]
    fn classify_usable() {
        assert_eq!(
            classify(VMX, "kvm_intel 1 0\n", Ok(())),
            HardwareVirt::Usable
        );
    }

    #[test]
    fn choose_refuses_tcg_unless_allowed() {
        let hardware = HardwareVirt::Unusable("no vmx".to_owned());
        let error = choose(&hardware, false).unwrap_err();
        assert!(error.to_string().contains("allow_software_virtualization"));
        assert_eq!(choose(&hardware, true).unwrap(), Accelerator::Tcg);
    }

    #[test]
    fn this_host_is_classified() {
        // On the build machines this is Unusable (kvm_pvm); the point is that it does not panic.
        let _ = detect();
    }

    #[test]
    fn tsc_rate_is_plausible() {
        let khz = measure_tsc_khz(std::time::Duration::from_millis(20));
        assert!(khz > 100_000, "TSC rate {khz} kHz below 100 MHz");
    }
}
