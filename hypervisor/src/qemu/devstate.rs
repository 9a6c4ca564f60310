//! Device state through QEMU's migration: `migrate` with capability
//! `x-ignore-shared`, so the shared guest RAM is skipped and the stream
//! carries only vCPU and device state (plus the small ROM blocks), written
//! to a memfd handed over with `getfd`.
//!
//! The blob is QEMU's own migration stream, self-describing and versioned
//! by QEMU ("QEVM" magic, stream version 3, a section per device): a
//! replica loads it with `migrate-incoming` into a QEMU started with the
//! same command line and `-incoming defer`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, FromRawFd};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::error::{Error, Result};
use super::qmp::Qmp;

/// The first bytes of a QEMU migration stream: "QEVM" and version 3.
pub const STREAM_MAGIC: [u8; 8] = [b'Q', b'E', b'V', b'M', 0, 0, 0, 3];
/// How long a save or load may take.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(10);
const FD_NAME: &str = "remus-wan-state";

/// Turns on `x-ignore-shared` (both sides need it, before any migration).
pub fn enable_ignore_shared(qmp: &mut Qmp) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )?;
    Ok(())
}

/// The memfd the state goes through, reused every checkpoint.
#[derive(Debug)]
pub struct StateChannel {
    file: File,
}

impl StateChannel {
    /// A new channel (an anonymous memory file).
    pub fn new() -> Result<StateChannel> {
        // SAFETY: the name is a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(c"remus-wan-state".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is a fresh descriptor we own.
        Ok(StateChannel {
            file: unsafe { File::from_raw_fd(fd) },
        })
    }

    /// Empties the memfd and hands QEMU a descriptor of it under our name.
    /// QEMU's copy shares the file offset with ours, so both start at 0.
    fn hand_over(&mut self, qmp: &mut Qmp) -> Result<()> {
        self.file
            .set_len(0)
            .map_err(Error::io("truncating the state memfd"))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(Error::io("rewinding the state memfd"))?;
        qmp.execute_with_fd("getfd", Some(json!({"fdname": FD_NAME})), self.file.as_fd())?;
        Ok(())
    }

    /// Saves the device state of a stopped guest into `out`. QEMU is left
    /// in runstate `postmigrate`, from which `cont` resumes the guest.
    pub fn save(&mut self, qmp: &mut Qmp, out: &mut Vec<u8>) -> Result<()> {
        self.start_save(qmp)?;
        self.finish_save(qmp, out)
    }

    /// Starts saving the device state of a stopped guest: QEMU writes it
    /// from its migration thread while we do something else (the RAM
    /// compare: the stream does not touch the shared RAM).
    pub fn start_save(&mut self, qmp: &mut Qmp) -> Result<()> {
        self.hand_over(qmp)?;
        qmp.execute("migrate", Some(json!({"uri": format!("fd:{FD_NAME}")})))?;
        Ok(())
    }

    /// Waits for the save started by [`StateChannel::start_save`] and reads
    /// the state into `out`.
    pub fn finish_save(&mut self, qmp: &mut Qmp, out: &mut Vec<u8>) -> Result<()> {
        wait_migration(qmp, "save", "query-migrate")?;
        out.clear();
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(Error::io("rewinding the state memfd"))?;
        self.file
            .read_to_end(out)
            .map_err(Error::io("reading the device state"))?;
        if !out.starts_with(&STREAM_MAGIC) {
            return Err(Error::Migration {
                what: "save",
                desc: format!(
                    "the stream ({} bytes) does not start with QEVM v3",
                    out.len()
                ),
            });
        }
        Ok(())
    }

    /// Loads `state` into a QEMU waiting with `-incoming defer` (and `-S`:
    /// the guest stays paused until `cont`).
    pub fn load(&mut self, qmp: &mut Qmp, state: &[u8]) -> Result<()> {
        if !state.starts_with(&STREAM_MAGIC) {
            return Err(Error::Restore(
                "the device state is not a QEMU migration stream (no QEVM v3 header)".into(),
            ));
        }
        use std::io::Write;
        self.file
            .set_len(0)
            .and_then(|_| self.file.seek(SeekFrom::Start(0)))
            .and_then(|_| self.file.write_all(state))
            .and_then(|_| self.file.seek(SeekFrom::Start(0)))
            .map_err(Error::io("writing the state memfd"))?;
        qmp.execute_with_fd("getfd", Some(json!({"fdname": FD_NAME})), self.file.as_fd())?;
        qmp.execute(
            "migrate-incoming",
            Some(json!({"uri": format!("fd:{FD_NAME}")})),
        )?;
        // The incoming side reports through query-status: `inmigrate`
        // until the stream is loaded, then `paused` (-S); a bad stream
        // ends QEMU or leaves it in inmigrate with a failed migration.
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let st = qmp.execute("query-status", None)?;
            match st.get("status").and_then(Value::as_str) {
                Some("inmigrate") => {}
                Some("paused") | Some("postmigrate") | Some("prelaunch") => {
                    // Paused also when loading failed early: ask migration.
                    let m = qmp.execute("query-migrate", None)?;
                    if let Some("failed") = m.get("status").and_then(Value::as_str) {
                        return Err(migration_error("load", &m));
                    }
                    return Ok(());
                }
                other => {
                    return Err(Error::Migration {
                        what: "load",
                        desc: format!("unexpected runstate {other:?}"),
                    })
                }
            }
            let m = qmp.execute("query-migrate", None)?;
            if let Some("failed") = m.get("status").and_then(Value::as_str) {
                return Err(migration_error("load", &m));
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout {
                    what: "loading the device state".into(),
                    after: MIGRATION_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

fn migration_error(what: &'static str, m: &Value) -> Error {
    Error::Migration {
        what,
        desc: m
            .get("error-desc")
            .and_then(Value::as_str)
            .unwrap_or("no reason given")
            .to_owned(),
    }
}

/// Polls `query-migrate` until the migration completed (or failed).
fn wait_migration(qmp: &mut Qmp, what: &'static str, query: &str) -> Result<()> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let mut polls = 0u32;
    loop {
        let m = qmp.execute(query, None)?;
        match m.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => return Err(migration_error(what, &m)),
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(Error::Timeout {
                what: format!("device state {what}"),
                after: MIGRATION_TIMEOUT,
            });
        }
        // The stream is ~70 KB and done in a few ms: poll tightly first
        // (each poll is a QMP round trip anyway), then back off.
        polls += 1;
        if polls > 20 {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}
