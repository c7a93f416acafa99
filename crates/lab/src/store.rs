//! The control plane's persistent state: every object and the store's revision, in one JSON
//! file replaced atomically (temp file, fsync, rename, fsync of the directory).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use ferrum_model::{Object, ObjectRef};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a valid control-plane store ({source}); move it away to start with an empty lab state"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct StoreFile {
    revision: u64,
    objects: Vec<Object>,
}

/// Objects by reference plus the revision of the last change, mirrored on disk.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    revision: u64,
    objects: BTreeMap<ObjectRef, Object>,
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl Store {
    /// Loads `path`, or starts empty at revision 0 when it does not exist.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let (revision, objects) = match fs::read(path) {
            Ok(bytes) => {
                let file: StoreFile =
                    serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                        path: path.to_path_buf(),
                        source,
                    })?;
                let objects = file
                    .objects
                    .into_iter()
                    .map(|o| (ObjectRef::of(&o), o))
                    .collect();
                (file.revision, objects)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, BTreeMap::new()),
            Err(e) => return Err(io_err("read", path)(e)),
        };
        Ok(Self {
            path: path.to_path_buf(),
            revision,
            objects,
        })
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn objects(&self) -> &BTreeMap<ObjectRef, Object> {
        &self.objects
    }

    /// Makes `objects` at `revision` the new state: on disk first, then in memory, so a failed
    /// write leaves both untouched.
    pub fn commit(
        &mut self,
        objects: BTreeMap<ObjectRef, Object>,
        revision: u64,
    ) -> Result<(), StoreError> {
        let file = StoreFile {
            revision,
            objects: objects.values().cloned().collect(),
        };
        let bytes = serde_json::to_vec(&file).map_err(|source| StoreError::Corrupt {
            path: self.path.clone(),
            source,
        })?;
        write_atomically(&self.path, &bytes)?;
        self.objects = objects;
        self.revision = revision;
        Ok(())
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    let tmp = path.with_extension("json.tmp");
    let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
    file.write_all(bytes).map_err(io_err("write", &tmp))?;
    file.sync_all().map_err(io_err("fsync", &tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync directory", dir))?;
    Ok(())
}
