//! kiln-init: PID 1 inside every Kiln microVM.
//!
//! It mounts the guest's filesystems, applies the instance config the host sent over the
//! host-guest channel (never anything the workload says), runs the workload and reports back:
//! its output, its exit status, and on request the guest's listening sockets. When the
//! workload exits, kiln-init powers the VM off.
//!
//! Boot steps, in order: mount `/proc`, `/sys`, `/dev`, `/run`; load the kernel modules listed
//! in the initramfs; open the channel and receive the config; seed the entropy pool; mount the
//! read-only image disk and the writable instance disk as an overlay and switch into it;
//! configure the network, hostname and secrets; run the startup scripts; run the workload.

mod boot;
mod channel;
mod network;
mod sockets;
mod supervise;
mod sys;

fn main() {
    if std::process::id() != 1 {
        eprintln!("kiln-init: must run as PID 1 inside a Kiln microVM");
        std::process::exit(2);
    }

    // Until the channel is open, the console is the only place errors can go.
    let channel = match boot::early() {
        Ok(channel) => channel,
        Err(error) => {
            eprintln!("kiln-init: boot failed: {error}");
            sys::power_off();
        }
    };

    let writer = channel.writer.clone();
    match boot::run(channel) {
        Ok(status) => writer.send(&kiln_guest_proto::GuestMessage::Exited(status)),
        Err(error) => {
            eprintln!("kiln-init: boot failed: {error}");
            writer.send(&kiln_guest_proto::GuestMessage::BootFailed {
                message: error.to_string(),
            });
        }
    }
    supervise::kill_everything();
    sys::power_off();
}
