//! cgroup v2 helpers for socket-level load balancing: where the unified hierarchy is mounted,
//! and per-node cgroups that hold a lab node's host processes (never the root cgroup).

use std::io;
use std::path::{Path, PathBuf};

/// The mount point of the cgroup v2 (unified) hierarchy, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_cgroup2_root(&info)
}

fn parse_cgroup2_root(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "... mount-point options - fstype source super-options"
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

/// Creates a cgroup (and its parents) below the cgroup v2 root.
pub fn create(path: &Path) -> io::Result<()> {
    std::fs::create_dir_all(path)
}

/// Moves a process into the cgroup.
pub fn add_process(cgroup: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
}

/// Removes a cgroup tree bottom-up (its processes must be gone). Ok if absent.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        }
    }
    std::fs::remove_dir(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_unified_mount_in_a_hybrid_layout() {
        let info = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                    27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_cgroup2_root(info),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            parse_cgroup2_root("1 2 0:1 / / rw - ext4 /dev/sda rw\n"),
            None
        );
    }
}
