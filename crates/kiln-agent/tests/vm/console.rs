//! The serial console of real guests reaches the instance's log as console lines: the guest
//! kernel's messages and kiln-init's own, kept on disk and shipped to the control plane.

use kiln_api::types::LogStream;

use super::*;

/// Interval of the log shipper in these tests.
const SHIP_INTERVAL: Duration = Duration::from_millis(100);

/// A kernel log message the workload writes to `/dev/kmsg` at error level, which the kernel
/// prints on the console even when booted with `quiet`.
const KERNEL_MARKER: &str = "kiln console marker from the guest kernel";

fn shipped_console(h: &VmHarness, id: InstanceId) -> Vec<String> {
    h.control
        .inner
        .lock()
        .unwrap()
        .shipped_lines
        .iter()
        .filter(|line| line.instance_id == id && line.stream == LogStream::Console)
        .map(|line| line.line.clone())
        .collect()
}

#[test]
fn real_vm_console_shipped_as_console() {
    let namespace = NetNs::create("vmcon").unwrap();
    let root = tempfile::tempdir().unwrap();
    let _guard = KillVmsOnDrop(root.path().to_path_buf());
    let rootfs = root.path().join("rootfs.ext4");
    kiln_testkit::guest::RootfsBuilder::new()
        .build(&rootfs)
        .unwrap();
    // Root in the guest: writing to /dev/kmsg takes it.
    let images = BusyboxImages { rootfs, uid: 0 };

    let mut kernel = vm_assignment(
        20,
        &format!("echo '<3>{KERNEL_MARKER}' > /dev/kmsg; echo READY; exec sleep 600"),
    );
    kernel.ports.clear();
    // kiln-init cannot start this workload and prints the error on the console before powering off.
    let mut broken = vm_assignment(21, "");
    broken.command = vec!["/nonexistent/app".to_owned()];
    broken.ports.clear();

    namespace
        .block_on(|| async {
            let mut h = vm_harness(root.path(), images);
            let shipper = tokio::spawn(kiln_agent::tasks::run_log_shipper(
                h.control.clone(),
                h.agent.shared(),
                SHIP_INTERVAL,
            ));
            let both = [kernel.clone(), broken.clone()];
            h.agent.set_desired(assignments(1, &both));
            h.pass_until("console lines shipped", HEALTHY_TIMEOUT, |h| {
                let from_kernel = shipped_console(h, kernel.instance_id);
                let from_init = shipped_console(h, broken.instance_id);
                from_kernel.iter().any(|line| line.contains(KERNEL_MARKER))
                    && from_init.iter().any(|line| line.starts_with("kiln-init: "))
            })
            .await;

            // The workload's own output stays on its stream.
            let stdout_lines: Vec<_> = h
                .control
                .inner
                .lock()
                .unwrap()
                .shipped_lines
                .iter()
                .filter(|line| line.instance_id == kernel.instance_id && line.line == "READY")
                .map(|line| line.stream)
                .collect();
            assert!(
                stdout_lines
                    .iter()
                    .all(|stream| *stream == LogStream::Stdout),
                "{stdout_lines:?}"
            );

            // The console is in the instance's log on disk too, marked as such.
            let state = StateDir::new(root.path()).unwrap();
            let on_disk =
                std::fs::read_to_string(state.log_dir(kernel.instance_id).join("current.log"))
                    .unwrap();
            assert!(
                on_disk
                    .lines()
                    .any(|line| line.contains(" console ") && line.contains(KERNEL_MARKER)),
                "{on_disk}"
            );

            h.agent.set_desired(assignments(2, &[]));
            h.pass_until("all forgotten", HEALTHY_TIMEOUT, |h| {
                h.agent.tracked().is_empty()
            })
            .await;
            shipper.abort();
        })
        .unwrap();
}
