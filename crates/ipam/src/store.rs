//! A [`Pool`] kept in one JSON file, replaced atomically on every change.
//!
//! Every change is written to `ipam.json.tmp` in the same directory and renamed over
//! `ipam.json` before the change is visible in memory, so a crash of the process at any point
//! leaves either the old or the new file in place; a leftover temp file is ignored. Changes to
//! the set of addresses are also fsynced (file and directory) so they survive a crash of the
//! machine; changes to owner data only ([`Store::set_owner`]) are not: what they record (veths,
//! attached programs) does not survive a reboot anyway, and an fsync costs ~10 ms on the
//! CNI ADD path.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::pool::{Pool, PoolError};

const FILE_NAME: &str = "ipam.json";
const TEMP_NAME: &str = "ipam.json.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("IPAM store {path}: {op} failed: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "IPAM store {path} is corrupt ({reason}); it was left untouched: repair or move it \
         aside (addresses it lists may still be in use by pods)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { path, op, source }
}

/// Which crash a write must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Written and renamed: the file is consistent after a crash of the process.
    ProcessCrash,
    /// Also fsynced, file and directory: consistent and current after a crash of the machine.
    MachineCrash,
}

/// A pool whose every change is on disk before the call returns.
#[derive(Debug)]
pub struct Store<K: Ord, V> {
    dir: PathBuf,
    pool: Pool<K, V>,
}

impl<K, V> Store<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    V: Clone + PartialEq + Serialize + DeserializeOwned,
{
    /// Opens the store in `dir` (created 0700 if missing). A missing file is an empty pool with
    /// no block; a file that does not parse or breaks an invariant is an error naming it.
    /// `max_allocations` replaces the saved limit (it is configuration, not state).
    pub fn open(dir: &Path, max_allocations: u32) -> Result<Self, StoreError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir, "creating the directory"))?;
        let path = dir.join(FILE_NAME);
        let mut pool = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<Pool<K, V>>(&bytes).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Pool::new(max_allocations),
            Err(e) => return Err(io(&path, "reading")(e)),
        };
        pool.set_max_allocations(max_allocations);
        // A temp file is a write that never got renamed: the main file is the truth.
        let temp = dir.join(TEMP_NAME);
        match fs::remove_file(&temp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&temp, "removing the leftover temp file")(e)),
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            pool,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    pub fn pool(&self) -> &Pool<K, V> {
        &self.pool
    }

    /// Applies `change` to a copy of the pool, writes the copy durably if it differs, and only
    /// then makes it current. If `change` or the write fails, nothing changes.
    pub fn update<R>(
        &mut self,
        change: impl FnOnce(&mut Pool<K, V>) -> Result<R, PoolError>,
    ) -> Result<R, StoreError> {
        self.update_with(Durability::MachineCrash, change)
    }

    fn update_with<R>(
        &mut self,
        durability: Durability,
        change: impl FnOnce(&mut Pool<K, V>) -> Result<R, PoolError>,
    ) -> Result<R, StoreError> {
        let mut next = self.pool.clone();
        let result = change(&mut next)?;
        if next != self.pool {
            self.write(&next, durability)?;
            self.pool = next;
        }
        Ok(result)
    }

    /// See [`Pool::allocate`]; durable before it returns.
    pub fn allocate(&mut self, key: K, owner: V) -> Result<(std::net::Ipv4Addr, bool), StoreError> {
        self.update(|p| p.allocate(key, owner))
    }

    pub fn release(&mut self, key: &K) -> Result<Option<crate::Lease<V>>, StoreError> {
        self.update(|p| Ok(p.release(key)))
    }

    pub fn gc(
        &mut self,
        keep: impl Fn(&K) -> bool,
    ) -> Result<Vec<(K, crate::Lease<V>)>, StoreError> {
        self.update(|p| Ok(p.gc(keep)))
    }

    pub fn set_block(&mut self, block: Ipv4Net) -> Result<bool, StoreError> {
        self.update(|p| p.set_block(block))
    }

    /// Replaces the owner data of `key`; returns false if the key holds no address. Survives a
    /// crash of the process, not necessarily one of the machine (see the module docs).
    pub fn set_owner(&mut self, key: &K, owner: V) -> Result<bool, StoreError> {
        self.update_with(Durability::ProcessCrash, |p| match p.owner_mut(key) {
            Some(o) => {
                *o = owner;
                Ok(true)
            }
            None => Ok(false),
        })
    }

    fn write(&self, pool: &Pool<K, V>, durability: Durability) -> Result<(), StoreError> {
        let path = self.path();
        let temp = self.dir.join(TEMP_NAME);
        let bytes = serde_json::to_vec_pretty(pool).map_err(|e| StoreError::Corrupt {
            path: path.clone(),
            reason: format!("cannot serialize the state: {e}"),
        })?;
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io(&temp, "creating"))?;
        f.write_all(&bytes).map_err(io(&temp, "writing"))?;
        if durability == Durability::MachineCrash {
            f.sync_all().map_err(io(&temp, "fsync"))?;
        }
        drop(f);
        fs::rename(&temp, &path).map_err(io(&path, "renaming the temp file over"))?;
        if durability == Durability::MachineCrash {
            // The rename is durable only once the directory entry is.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir, "fsync of the directory"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    type S = Store<String, u32>;

    fn block() -> Ipv4Net {
        "10.244.5.0/24".parse().unwrap()
    }

    #[test]
    fn missing_file_is_an_empty_pool_without_block() {
        let dir = tempfile::tempdir().unwrap();
        let s = S::open(dir.path(), 250).unwrap();
        assert_eq!(s.pool().block(), None);
        assert!(!s.path().exists(), "opening alone must not write");
    }

    #[test]
    fn state_survives_reopen_including_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = S::open(dir.path(), 250).unwrap();
        s.set_block(block()).unwrap();
        let (a, _) = s.allocate("a".into(), 7).unwrap();
        s.allocate("b".into(), 8).unwrap();
        s.release(&"b".to_string()).unwrap();
        drop(s);
        let mut s = S::open(dir.path(), 250).unwrap();
        assert_eq!(s.pool().get(&"a".to_string()).unwrap().ip, a);
        assert_eq!(s.pool().get(&"a".to_string()).unwrap().owner, 7);
        // The cursor survived: b's freed address is not reused by the next allocation.
        let (c, _) = s.allocate("c".into(), 9).unwrap();
        assert_eq!(c, Ipv4Addr::new(10, 244, 5, 3));
    }

    #[test]
    fn torn_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = S::open(dir.path(), 250).unwrap();
        s.set_block(block()).unwrap();
        s.allocate("a".into(), 1).unwrap();
        drop(s);
        fs::write(dir.path().join(TEMP_NAME), b"{\"version\":1,\"blo").unwrap();
        let s = S::open(dir.path(), 250).unwrap();
        assert_eq!(s.pool().used(), 1);
        assert!(!dir.path().join(TEMP_NAME).exists());
    }

    #[test]
    fn corrupt_main_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = S::open(dir.path(), 250).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }));
        assert!(err.to_string().contains("ipam.json"), "{err}");
        // Never silently reset: the file is still there, unchanged.
        assert_eq!(fs::read(dir.path().join(FILE_NAME)).unwrap(), b"{not json");
    }

    #[test]
    fn failed_change_leaves_memory_and_disk_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = S::open(dir.path(), 1).unwrap();
        s.set_block(block()).unwrap();
        s.allocate("a".into(), 1).unwrap();
        let before = fs::read(s.path()).unwrap();
        assert!(matches!(
            s.allocate("b".into(), 2),
            Err(StoreError::Pool(PoolError::Exhausted { .. }))
        ));
        assert_eq!(fs::read(s.path()).unwrap(), before);
        assert_eq!(s.pool().used(), 1);
    }

    #[test]
    fn write_failure_is_reported_and_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = S::open(dir.path(), 250).unwrap();
        s.set_block(block()).unwrap();
        // A directory where the temp file should go makes the write fail.
        fs::create_dir(dir.path().join(TEMP_NAME)).unwrap();
        let err = s.allocate("a".into(), 1).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        assert_eq!(s.pool().used(), 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Allocate(u8),
        Release(u8),
        Gc(BTreeSet<u8>),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Re-opening the store after every step sees exactly the in-memory state: whatever
        /// instant a crash hits, the file on disk is a complete, valid state.
        #[test]
        fn reopen_after_each_step_matches_memory(
            ops in proptest::collection::vec(prop_oneof![
                3 => (0u8..12).prop_map(Op::Allocate),
                2 => (0u8..12).prop_map(Op::Release),
                1 => proptest::collection::btree_set(0u8..12, 0..8).prop_map(Op::Gc),
            ], 1..30)
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = S::open(dir.path(), 8).unwrap();
            s.set_block("10.9.0.0/28".parse().unwrap()).unwrap();
            for op in ops {
                match op {
                    Op::Allocate(k) => { let _ = s.allocate(k.to_string(), u32::from(k)); }
                    Op::Release(k) => { s.release(&k.to_string()).unwrap(); }
                    Op::Gc(v) => { s.gc(|k| v.iter().any(|x| x.to_string() == *k)).unwrap(); }
                }
                let reopened = S::open(dir.path(), 8).unwrap();
                prop_assert_eq!(reopened.pool(), s.pool());
                let ips: BTreeSet<_> = reopened.pool().leases().map(|(_, l)| l.ip).collect();
                prop_assert_eq!(ips.len() as u32, reopened.pool().used());
                prop_assert_eq!(reopened.pool().free() + reopened.pool().used(), 8);
                s = reopened;
            }
        }
    }
}
