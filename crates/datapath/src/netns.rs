//! Network namespaces: run code inside one without moving the caller.
//!
//! A network namespace is a property of a thread (setns(2) with CLONE_NEWNET changes only the
//! calling thread), so [`run_in_netns`] does its work on a fresh scoped thread that joins the
//! target namespace and dies afterwards; the caller's namespace never changes, and no thread of
//! a thread pool is ever left in a foreign namespace.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error(
        "cannot open network namespace {path}: {source} (does the namespace exist? it is created by the container runtime or `ip netns add`)"
    )]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot join network namespace {path}: {source} (is {path} a network namespace, and are we root?)"
    )]
    Join { path: PathBuf, source: nix::Error },
    #[error("cannot start a thread to work in network namespace {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs `f` on a fresh OS thread that has joined the network namespace at `path` (/run/netns/X
/// or /proc/PID/ns/net); the calling thread's namespace is never changed.
///
/// Anything that binds to the namespace (netlink sockets, /proc/sys/net writes) must be created
/// inside `f`. A panic in `f` is propagated to the caller.
pub fn run_in_netns<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let ns = open_netns(path)?;
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("netns-worker".into())
            .spawn_scoped(scope, move || {
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Spawn {
                path: path.to_path_buf(),
                source,
            })?;
        match worker.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the netns at `path` (for daemons that live in a node's netns;
/// call before spawning other threads, which then inherit it).
pub fn enter_netns(path: &Path) -> Result<(), NetnsError> {
    let ns = open_netns(path)?;
    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Join {
        path: path.to_path_buf(),
        source,
    })
}

/// True when `path` is a live namespace file (nsfs), not merely an existing path: a
/// /run/netns/X whose bind mount is gone is left behind as an empty regular file.
pub fn netns_exists(path: &Path) -> bool {
    match nix::sys::statfs::statfs(path) {
        // nsfs backs /proc/PID/ns/* and their bind mounts.
        Ok(fs) => fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC,
        Err(_) => false,
    }
}

/// Makes `cmd` start inside the network namespace at `path`: the child joins it between fork
/// and exec, so the program never runs a single instruction in the parent's namespace. The
/// namespace file is opened now (errors surface here, not at spawn) and kept by `cmd`.
pub fn command_in_netns(cmd: &mut std::process::Command, path: &Path) -> Result<(), NetnsError> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let ns = open_netns(path)?;
    // SAFETY: the closure runs between fork and exec and only calls setns(2), which is
    // async-signal-safe; `ns` is owned by the closure, so the fd is open until the Command goes.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Opens a namespace file for setns(2) or IFLA_NET_NS_FD.
pub fn open_netns(path: &Path) -> Result<File, NetnsError> {
    File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A named netns created with `ip netns add`, deleted on drop (even when the test panics).
    struct TestNetns {
        name: String,
    }

    impl TestNetns {
        fn new(tag: &str) -> Self {
            let name = format!("fe-nstest-{tag}-{}", std::process::id());
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip netns add");
            assert!(status.success(), "ip netns add {name} failed");
            Self { name }
        }
        fn path(&self) -> PathBuf {
            PathBuf::from(format!("/run/netns/{}", self.name))
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn current_netns_inode() -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/thread-self/ns/net")
            .expect("stat own netns")
            .ino()
    }

    #[test]
    fn run_in_netns_runs_inside_and_leaves_caller_alone() {
        let ns = TestNetns::new("run");
        let before = current_netns_inode();
        let target = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(ns.path()).expect("stat test netns").ino()
        };
        let inside = run_in_netns(&ns.path(), current_netns_inode).expect("run in netns");
        assert_eq!(inside, target, "closure must run in the target namespace");
        assert_ne!(inside, before);
        assert_eq!(
            current_netns_inode(),
            before,
            "caller must stay where it was"
        );
    }

    #[test]
    fn run_in_netns_borrows_from_the_caller() {
        let ns = TestNetns::new("borrow");
        let mut seen = Vec::new();
        run_in_netns(&ns.path(), || seen.push(1)).expect("run in netns");
        assert_eq!(seen, vec![1]);
    }

    #[test]
    fn missing_namespace_is_an_open_error_naming_the_path() {
        let path = PathBuf::from(format!("/run/netns/fe-missing-{}", std::process::id()));
        let err = run_in_netns(&path, || ()).expect_err("must fail");
        assert!(matches!(err, NetnsError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(!netns_exists(&path));
    }

    #[test]
    fn a_regular_file_is_not_a_namespace() {
        let file = std::env::temp_dir().join(format!("fe-notns-{}", std::process::id()));
        std::fs::write(&file, b"").expect("write temp file");
        assert!(!netns_exists(&file));
        let err = run_in_netns(&file, || ()).expect_err("setns on a regular file must fail");
        assert!(matches!(err, NetnsError::Join { .. }), "{err:?}");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn commands_start_inside_the_namespace() {
        use std::os::unix::fs::MetadataExt;
        let ns = TestNetns::new("cmd");
        let target = std::fs::metadata(ns.path()).expect("stat test netns").ino();
        let mut cmd = Command::new("stat");
        cmd.args(["-L", "-c", "%i", "/proc/self/ns/net"]);
        command_in_netns(&mut cmd, &ns.path()).expect("prepare command");
        let out = cmd.output().expect("run stat");
        assert!(out.status.success());
        let inode: u64 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("inode");
        assert_eq!(inode, target);
        assert_ne!(
            inode,
            current_netns_inode(),
            "the caller stays where it was"
        );
        let missing = PathBuf::from(format!("/run/netns/fe-missing-cmd-{}", std::process::id()));
        let err = command_in_netns(&mut Command::new("true"), &missing).expect_err("must fail");
        assert!(matches!(err, NetnsError::Open { .. }), "{err:?}");
    }

    #[test]
    fn live_namespaces_exist() {
        let ns = TestNetns::new("exists");
        assert!(netns_exists(&ns.path()));
        assert!(netns_exists(Path::new("/proc/self/ns/net")));
    }
}
