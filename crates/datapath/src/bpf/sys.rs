//! The two bpf(2) commands aya does not expose: open a pinned object and force-detach a link.
//! Unpinning alone detaches a link only after an RCU grace period and a workqueue run; an
//! explicit BPF_LINK_DETACH makes detach_pod / remove_pins synchronous.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_DETACH: libc::c_long = 34;

/// A zeroed `union bpf_attr` large enough for both commands (the kernel ignores zero tails).
#[repr(C, align(8))]
struct Attr([u8; 64]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of the size we pass.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr,
            std::mem::size_of::<Attr>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = Attr([0; 64]);
    // struct { __aligned_u64 pathname; __u32 bpf_fd; __u32 file_flags; ... }
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Detaches the link pinned at `path` now and removes the pin. Ok if there is no pin.
pub(crate) fn detach_and_unpin(path: &Path) -> io::Result<()> {
    match obj_get(path) {
        Ok(fd) => {
            let mut attr = Attr([0; 64]);
            attr.0[0..4].copy_from_slice(&(fd.as_raw_fd() as u32).to_ne_bytes());
            // A link whose device is already gone is defunct; detaching it can fail harmlessly.
            if let Err(e) = bpf(BPF_LINK_DETACH, &mut attr) {
                tracing::debug!(path = %path.display(), error = %e, "BPF_LINK_DETACH failed");
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "cannot open the pinned link")
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
