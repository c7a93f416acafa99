//! The kernel edge: everything that talks to the kernel (bpf syscalls, netlink, network
//! namespaces) lives here behind narrow APIs, so the logic crates stay pure.

pub mod bpf;
pub mod cgroup;
pub mod link;
pub mod netns;
