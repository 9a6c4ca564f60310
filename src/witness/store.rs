//! The witness's durable state: who holds each VM's lease, its fencing
//! token, and the floor every new token exceeds. Written (and fsynced)
//! before the witness announces a grant, so a restarted witness never
//! hands out a token twice.
//!
//! The state file must exist for the witness to run: a missing file would
//! otherwise silently mean "no leases", tokens would restart low and the
//! sites, which ignore grants under a token older than theirs, would never
//! be granted a lease again. A state is created only by an explicit act:
//!
//! - [`LeaseStore::open`] on a state directory that does not exist at all
//!   (a first start) creates the directory with its file, atomically (the
//!   directory is prepared under another name and renamed into place, so a
//!   crash leaves either no directory or a complete one);
//! - [`LeaseStore::init`] (`remus-wan witness --init`) creates the file in
//!   a directory that lacks it, and never overwrites one.
//!
//! A directory that exists without the file, or with a corrupt one, is an
//! error that says what to do. A new state's tokens begin above the
//! witness host's clock in microseconds since 1970 (or above an
//! operator-given floor, if higher): every state begins at its creation
//! time and grants far fewer than one token per microsecond, so every token
//! any earlier state of this witness granted is below the clock, and a
//! re-initialised witness never repeats one, as long as the host's clock
//! has not been set back. (The witness also grants above every token a
//! site reports, see `failover::Witness`.)

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    /// Site name of the holder.
    pub holder: Option<String>,
    pub token: u64,
}

/// The state file: `{"remus_wan_witness_state": 1, "token_floor": N,
/// "leases": {"web1": {"holder": "dc1", "token": N + 3}}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    /// Format version; its presence marks a witness state file.
    remus_wan_witness_state: u32,
    token_floor: u64,
    leases: BTreeMap<String, StoredLease>,
}

const VERSION: u32 = 1;

/// What a file may hold: the current format, or the bare map of leases
/// the witness wrote before the format had a version (floor 0).
#[derive(Deserialize)]
#[serde(untagged)]
enum AnyStateFile {
    Current(StateFile),
    Unversioned(BTreeMap<String, StoredLease>),
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseStoreError {
    #[error("witness state {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "witness state directory {dir} exists but holds no {file}: refusing to start, since \
         the fencing tokens would restart and the sites would ignore the witness's grants. \
         If the file was moved or its disk is not mounted, put it back. If this witness \
         never ran with this directory, or its state is lost for good, create a new state \
         once with `remus-wan witness --init` and the same --config and --state-dir \
         (docs/failover.md, \"The witness's state\")",
        dir = dir.display(),
        file = LeaseStore::FILE
    )]
    Missing { dir: PathBuf },
    #[error(
        "witness state file {path} is corrupt ({message}); refusing to start: restore it \
         from a backup, or move it away and create a new state with `remus-wan witness \
         --init` (docs/failover.md, \"The witness's state\")",
        path = path.display()
    )]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "witness state file {path} already exists: --init never overwrites a state (its \
         tokens would be lost); start the witness without --init",
        path = path.display()
    )]
    Exists { path: PathBuf },
}

impl LeaseStoreError {
    /// The state on disk needs the operator (as opposed to an I/O error).
    pub fn is_state_problem(&self) -> bool {
        matches!(self, Self::Missing { .. } | Self::Corrupt { .. })
    }
}

/// How [`LeaseStore::open`] found the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// Read from the state file.
    Recovered,
    /// The directory did not exist: a first start created it.
    Created,
}

#[derive(Debug)]
pub struct LeaseStore {
    path: PathBuf,
    state: StateFile,
}

impl LeaseStore {
    pub const FILE: &'static str = "witness-leases.json";

    /// Opens the state in `dir`; creates it if `dir` does not exist.
    pub fn open(dir: &Path) -> Result<(Self, Opened), LeaseStoreError> {
        let path = dir.join(Self::FILE);
        match fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let store = Self::create_dir(dir, fresh_floor(None))?;
                return Ok((store, Opened::Created));
            }
            Err(source) => return Err(LeaseStoreError::Io { path, source }),
            Ok(m) if !m.is_dir() => {
                return Err(LeaseStoreError::Io {
                    path: dir.to_owned(),
                    source: std::io::Error::other("not a directory"),
                })
            }
            Ok(_) => {}
        }
        let text = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(LeaseStoreError::Missing {
                    dir: dir.to_owned(),
                })
            }
            Err(source) => return Err(LeaseStoreError::Io { path, source }),
        };
        let corrupt = |message: String| LeaseStoreError::Corrupt {
            path: path.clone(),
            message,
        };
        let state = match serde_json::from_slice::<AnyStateFile>(&text) {
            Ok(AnyStateFile::Current(s)) if s.remus_wan_witness_state == VERSION => s,
            Ok(AnyStateFile::Current(s)) => {
                return Err(corrupt(format!(
                    "format version {} is not {VERSION}",
                    s.remus_wan_witness_state
                )))
            }
            Ok(AnyStateFile::Unversioned(leases)) => StateFile {
                remus_wan_witness_state: VERSION,
                token_floor: 0,
                leases,
            },
            Err(_) => {
                // The untagged error says nothing; the current format's does.
                let e = serde_json::from_slice::<StateFile>(&text)
                    .err()
                    .map_or_else(|| "unreadable".to_owned(), |e| e.to_string());
                return Err(corrupt(e));
            }
        };
        Ok((Self { path, state }, Opened::Recovered))
    }

    /// Creates a new state in `dir` (created if missing), whose tokens
    /// begin above `max(token_floor, the clock in microseconds)`. Refuses
    /// if `dir` already holds a state file, even a corrupt one.
    pub fn init(dir: &Path, token_floor: Option<u64>) -> Result<Self, LeaseStoreError> {
        let path = dir.join(Self::FILE);
        let io = |source| LeaseStoreError::Io {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(io)?;
        if fs::symlink_metadata(&path).is_ok() {
            return Err(LeaseStoreError::Exists { path });
        }
        let state = new_state(fresh_floor(token_floor));
        write_atomically(&path, &state)?;
        Ok(Self { path, state })
    }

    /// A first start: `dir` is prepared beside itself, then renamed into
    /// place.
    fn create_dir(dir: &Path, token_floor: u64) -> Result<Self, LeaseStoreError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| LeaseStoreError::Io { path, source }
        };
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return Err(io(dir)(std::io::Error::other(
                "not a usable state directory",
            )));
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        fs::create_dir_all(parent).map_err(io(parent))?;
        let mut staging_name = std::ffi::OsString::from(".");
        staging_name.push(name);
        staging_name.push(format!(".new-{}", std::process::id()));
        let staging = parent.join(staging_name);
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io(&staging))?;
        }
        fs::create_dir(&staging).map_err(io(&staging))?;
        let state = new_state(token_floor);
        write_atomically(&staging.join(Self::FILE), &state)?;
        fs::rename(&staging, dir).map_err(io(dir))?;
        sync_dir(parent).map_err(io(parent))?;
        Ok(Self {
            path: dir.join(Self::FILE),
            state,
        })
    }

    pub fn leases(&self) -> &BTreeMap<String, StoredLease> {
        &self.state.leases
    }

    /// Every token this state grants exceeds it.
    pub fn token_floor(&self) -> u64 {
        self.state.token_floor
    }

    /// Records a lease durably (write, fsync, rename, fsync the folder).
    /// On error the store is unchanged: the record is not counted as
    /// durable, and the next write does not carry it.
    pub fn put(&mut self, vm: &str, lease: StoredLease) -> Result<(), LeaseStoreError> {
        self.put_all([(vm.to_owned(), lease)])
    }

    /// Records several leases with one write (the witness's group commit:
    /// the records that queued while the previous write was syncing share
    /// the next one). All or none, as [`LeaseStore::put`].
    pub fn put_all(
        &mut self,
        leases: impl IntoIterator<Item = (String, StoredLease)>,
    ) -> Result<(), LeaseStoreError> {
        let mut next = self.state.clone();
        next.leases.extend(leases);
        write_atomically(&self.path, &next)?;
        self.state = next;
        Ok(())
    }
}

fn new_state(token_floor: u64) -> StateFile {
    StateFile {
        remus_wan_witness_state: VERSION,
        token_floor,
        leases: BTreeMap::new(),
    }
}

/// The floor of a new state: the clock in microseconds, or `given` if
/// higher.
fn fresh_floor(given: Option<u64>) -> u64 {
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    clock.max(given.unwrap_or(0))
}

fn write_atomically(path: &Path, state: &StateFile) -> Result<(), LeaseStoreError> {
    let io = |source| LeaseStoreError::Io {
        path: path.to_owned(),
        source,
    };
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let tmp = path.with_extension("json.tmp");
    let mut f = fs::File::create(&tmp).map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, token: u64) -> StoredLease {
        StoredLease {
            holder: Some(holder.to_owned()),
            token,
        }
    }

    #[test]
    fn a_first_start_creates_the_state_and_a_restart_reads_it() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("a/witness");
        let (mut s, how) = LeaseStore::open(&dir).expect("first start");
        assert_eq!(how, Opened::Created);
        let floor = s.token_floor();
        // Above the clock in microseconds: 2020-01-01 is 1.5e15.
        assert!(floor > 1_577_836_800_000_000, "{floor}");
        s.put("web1", lease("dc1", floor + 1)).expect("put");
        let (s, how) = LeaseStore::open(&dir).expect("restart");
        assert_eq!(how, Opened::Recovered);
        assert_eq!(s.token_floor(), floor);
        assert_eq!(s.leases()["web1"], lease("dc1", floor + 1));
        // Nothing of the staging directory is left.
        let names: Vec<_> = fs::read_dir(tmp.path().join("a"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("witness")]);
    }

    #[test]
    fn an_existing_directory_without_the_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let e = LeaseStore::open(tmp.path()).expect_err("no state file");
        assert!(matches!(e, LeaseStoreError::Missing { .. }), "{e}");
        assert!(e.is_state_problem());
        assert!(e.to_string().contains("--init"), "{e}");
        // Still nothing created.
        assert!(!tmp.path().join(LeaseStore::FILE).exists());
    }

    #[test]
    fn a_corrupt_or_foreign_file_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let path = tmp.path().join(LeaseStore::FILE);
        for text in [
            "",
            "{\"web1\": {\"holder\": \"dc1\"",
            "[1, 2]",
            "{\"remus_wan_witness_state\": 2, \"token_floor\": 0, \"leases\": {}}",
        ] {
            fs::write(&path, text).expect("write");
            let e = LeaseStore::open(tmp.path()).expect_err(text);
            assert!(matches!(e, LeaseStoreError::Corrupt { .. }), "{text}: {e}");
            assert!(e.is_state_problem());
        }
    }

    #[test]
    fn the_unversioned_file_of_earlier_witnesses_is_read() {
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::write(
            tmp.path().join(LeaseStore::FILE),
            "{\"web1\": {\"holder\": \"dc2\", \"token\": 7}}",
        )
        .expect("write");
        let (mut s, _) = LeaseStore::open(tmp.path()).expect("open");
        assert_eq!(s.token_floor(), 0);
        assert_eq!(s.leases()["web1"], lease("dc2", 7));
        s.put("web1", lease("dc1", 8)).expect("put");
        let text = fs::read_to_string(tmp.path().join(LeaseStore::FILE)).expect("read");
        assert!(text.contains("remus_wan_witness_state"), "{text}");
    }

    #[test]
    fn init_creates_a_state_once_and_never_overwrites_one() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let far = u64::MAX / 2;
        let s = LeaseStore::init(tmp.path(), Some(far)).expect("init");
        assert_eq!(s.token_floor(), far);
        let (s, how) = LeaseStore::open(tmp.path()).expect("open");
        assert_eq!((how, s.token_floor()), (Opened::Recovered, far));
        let e = LeaseStore::init(tmp.path(), None).expect_err("exists");
        assert!(matches!(e, LeaseStoreError::Exists { .. }), "{e}");
        // Not even a corrupt one.
        fs::write(tmp.path().join(LeaseStore::FILE), "garbage").expect("write");
        assert!(matches!(
            LeaseStore::init(tmp.path(), None),
            Err(LeaseStoreError::Exists { .. })
        ));
    }

    #[test]
    fn a_failed_write_leaves_the_store_as_it_was() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("w");
        let (mut s, _) = LeaseStore::open(&dir).expect("open");
        s.put("web1", lease("dc1", 5)).expect("put");
        // A directory where the temporary file goes: the write fails, even
        // for root.
        let tmp_file = dir.join(LeaseStore::FILE).with_extension("json.tmp");
        fs::create_dir(&tmp_file).expect("mkdir");
        s.put("web1", lease("dc2", 6)).expect_err("write fails");
        assert_eq!(s.leases()["web1"], lease("dc1", 5));
        fs::remove_dir(&tmp_file).expect("rmdir");
        // The next write carries only what was durable, plus its own record.
        s.put("db1", lease("dc2", 9)).expect("put");
        let (s, _) = LeaseStore::open(&dir).expect("open");
        assert_eq!(s.leases()["web1"], lease("dc1", 5));
        assert_eq!(s.leases()["db1"], lease("dc2", 9));
    }
}
