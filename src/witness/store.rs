//! The witness's durable lease records: who holds each VM's lease and the
//! fencing token. Written (and fsynced) before the witness answers, so a
//! restarted witness never hands out a token twice.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    /// Site name of the holder.
    pub holder: Option<String>,
    pub token: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseStoreError {
    #[error("lease file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lease file {path} is corrupt ({message}); refusing to start: restore it from a backup or, if every VM is stopped, remove it")]
    Corrupt { path: PathBuf, message: String },
}

#[derive(Debug)]
pub struct LeaseStore {
    path: PathBuf,
    leases: BTreeMap<String, StoredLease>,
}

impl LeaseStore {
    pub const FILE: &'static str = "witness-leases.json";

    pub fn open(dir: &Path) -> Result<Self, LeaseStoreError> {
        let path = dir.join(Self::FILE);
        let io = |source| LeaseStoreError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        let leases = match fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| LeaseStoreError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(e)),
        };
        Ok(Self { path, leases })
    }

    pub fn leases(&self) -> &BTreeMap<String, StoredLease> {
        &self.leases
    }

    /// Records a lease durably (write, fsync, rename, fsync the folder).
    pub fn put(&mut self, vm: &str, lease: StoredLease) -> Result<(), LeaseStoreError> {
        self.leases.insert(vm.to_owned(), lease);
        let io = |source| LeaseStoreError::Io {
            path: self.path.clone(),
            source,
        };
        let text = serde_json::to_string_pretty(&self.leases)
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        }
        Ok(())
    }
}
