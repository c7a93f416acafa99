//! `ferrum-bench`: pod<->pod throughput and request/response latency against baselines built in
//! the same run (a plain veth pair, plain kernel VXLAN), and CNI ADD/DEL latency on a lab node.
//!
//! - [`topo`]: the baseline namespaces and links, removed on drop;
//! - the lab itself is the test harness's [`crate::Lab`] (torn down on drop);
//! - [`traffic`]: iperf3 throughput and a TCP ping-pong, both inside namespaces;
//! - [`cni`]: timing the real `ferrum-cni` binary run the way the lab runtime runs it;
//! - [`report`]: statistics, the result table and its JSON.

pub mod cni;
pub mod policy;
pub mod report;
pub mod topo;
pub mod traffic;

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT/SIGTERM into a flag the phases check, so the run unwinds through its Drop
/// guards (namespaces, lab) instead of dying with everything left behind.
pub fn install_interrupt_handler() -> Result<()> {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("cannot install a handler for {signal}"))?;
    }
    Ok(())
}

/// Fails once SIGINT/SIGTERM has arrived.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}
