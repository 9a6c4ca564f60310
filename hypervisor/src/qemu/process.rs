//! The QEMU process: its command line, start, and a kill on drop.
//!
//! The command line is a pure function of the spec ([`command_line`]) so a
//! replica's QEMU is started with exactly the devices of the primary's (a
//! migration stream only loads into the same machine), plus
//! `-incoming defer` and `-S`.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Mutex, OnceLock};

use super::error::{Error, Result};
use super::spec::QemuSpec;

/// The files a QEMU instance uses.
#[derive(Debug, Clone)]
pub struct Paths {
    /// QMP socket (QEMU listens).
    pub qmp: PathBuf,
    /// Network backend socket (remus-wan listens, QEMU connects).
    pub net: PathBuf,
    /// Disk socket (remus-wan's NBD server listens, QEMU connects).
    pub nbd: PathBuf,
    /// Serial console output.
    pub console: PathBuf,
    /// QEMU's own stdout/stderr.
    pub log: PathBuf,
    /// Guest RAM (a file in tmpfs, shared with QEMU).
    pub ram: PathBuf,
}

impl Paths {
    /// The files of instance `tag` (primary, replica, ...) of `spec`.
    pub fn new(spec: &QemuSpec, tag: &str) -> Paths {
        let run = &spec.run_dir;
        // Unique per instance: several guests may share a run folder.
        let tag = format!("{tag}{}", unique());
        Paths {
            qmp: run.join(format!("{tag}.qmp")),
            net: run.join(format!("{tag}.net")),
            nbd: run.join(format!("{tag}.nbd")),
            console: run.join(format!("{tag}.console")),
            log: run.join(format!("{tag}.log")),
            ram: spec.ram_dir.join(format!(
                "remus-wan-{}-{}-{tag}.ram",
                spec.name,
                std::process::id(),
            )),
        }
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The kernel command line.
pub fn kernel_cmdline(spec: &QemuSpec) -> String {
    // panic=-1 with -no-reboot: a guest panic ends QEMU, which the backend
    // sees, instead of a silent reboot that would look like a running guest.
    let mut c = String::from("console=ttyS0 panic=-1 quiet");
    if let Some(net) = &spec.network {
        if let Some((a, p)) = net.address {
            c.push_str(&format!(" rw.ip={a}/{p}"));
        }
        if let Some(g) = net.gateway {
            c.push_str(&format!(" rw.gw={g}"));
        }
    }
    if !spec.cmdline_extra.is_empty() {
        c.push(' ');
        c.push_str(&spec.cmdline_extra);
    }
    c
}

/// QEMU's arguments for `spec` with files `paths`; `incoming` adds
/// `-incoming defer -S` (a replica waiting for its device state).
pub fn command_line(spec: &QemuSpec, paths: &Paths, accel: &str, incoming: bool) -> Vec<String> {
    let mib = spec.memory_mib;
    let mut a: Vec<String> = vec![
        "-name".into(),
        spec.name.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-nographic".into(),
        "-no-reboot".into(),
        // The i440fx PC, not microvm: microvm describes its virtio-mmio
        // devices either through ACPI (where the Debian kernel found no
        // timer interrupt under TCG here and hung after "Marking TSC
        // unstable") or on the kernel command line (which Debian's
        // virtio_mmio, built without VIRTIO_MMIO_CMDLINE_DEVICES, ignores).
        // virtio-pci on the PC works with the stock kernel; its device
        // state is larger (firmware ROM blocks) but still small.
        "-M".into(),
        "pc,memory-backend=mem".into(),
        "-accel".into(),
        accel.into(),
        "-cpu".into(),
        "max".into(),
        "-smp".into(),
        spec.vcpus.to_string(),
        "-m".into(),
        format!("{mib}M"),
        // share=on: QEMU and remus-wan map the same pages, so the compare
        // reads guest RAM without copying it through QEMU, and the
        // migration skips it (x-ignore-shared).
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={mib}M,mem-path={},share=on",
            paths.ram.display()
        ),
        "-kernel".into(),
        spec.image.kernel.display().to_string(),
        "-initrd".into(),
        spec.image.initrd.display().to_string(),
        "-append".into(),
        kernel_cmdline(spec),
        "-chardev".into(),
        format!("file,id=con,path={}", paths.console.display()),
        "-serial".into(),
        "chardev:con".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", paths.qmp.display()),
    ];
    if spec.disk.is_some() {
        a.extend([
            "-blockdev".into(),
            format!(
                "driver=nbd,node-name=disk0,server.type=unix,server.path={}",
                paths.nbd.display()
            ),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
        ]);
    }
    if let Some(net) = &spec.network {
        let m = net.mac;
        a.extend([
            "-netdev".into(),
            format!(
                "stream,id=net0,server=off,addr.type=unix,addr.path={}",
                paths.net.display()
            ),
            "-device".into(),
            format!(
                // romfile=: no iPXE option ROM (we boot the kernel
                // directly), one block less in every device state.
                "virtio-net-pci,netdev=net0,romfile=,mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            ),
        ]);
    }
    if incoming {
        a.extend(["-incoming".into(), "defer".into(), "-S".into()]);
    }
    a
}

/// A running QEMU; killed (SIGKILL, by PID) and reaped on drop, so no test
/// failure or engine error leaves one behind.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    log: PathBuf,
}

impl QemuProcess {
    /// Starts `binary` with `args` and the extra environment `env`, its
    /// output going to `log`.
    pub fn spawn(
        binary: &Path,
        args: &[String],
        env: &[(std::ffi::OsString, std::ffi::OsString)],
        log: &Path,
    ) -> Result<QemuProcess> {
        let out = File::create(log).map_err(Error::io(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(Error::io("duplicating the log fd"))?;
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe; the closure touches nothing
        // else between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                // If this process dies without running our Drop (SIGKILL,
                // a test harness timeout), the kernel kills QEMU too.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = spawn_from_long_lived_thread(cmd).map_err(|source| Error::QemuMissing {
            binary: binary.to_owned(),
            source,
        })?;
        Ok(QemuProcess {
            child,
            log: log.to_owned(),
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err(QemuExited)` if QEMU has exited (with what we were doing and
    /// the end of its log).
    pub fn check_alive(&mut self, what: &str) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::QemuExited {
                what: what.to_owned(),
                status: status.to_string(),
                log: self.log_tail(),
            }),
            Err(e) => Err(Error::io("waiting for QEMU")(e)),
        }
    }

    /// Whether QEMU still runs.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of QEMU's output.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

type SpawnJob = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from one thread that lives as long as the process.
///
/// PR_SET_PDEATHSIG fires when the *thread* that forked the child exits,
/// not the process: QEMU started from a short-lived thread (a test's, a
/// scoped worker's) would be killed with it. Forking from a thread that
/// never ends ties QEMU's life to the process instead. (That thread stays
/// in the process's first network namespace; QEMU needs none, remus-wan
/// being its NIC backend over a unix socket.)
fn spawn_from_long_lived_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        let started = std::thread::Builder::new()
            .name("qemu-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        if let Err(e) = started {
            tracing::warn!("cannot start the QEMU spawner thread: {e}");
        }
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    let sent = spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply_tx));
    if sent.is_err() {
        return Err(std::io::Error::other("the QEMU spawner thread is gone"));
    }
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("the QEMU spawner thread is gone"))?
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Child::kill signals this child's PID only (SIGKILL); wait reaps it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::spec::{Accel, LinuxImage, QemuNetSpec};

    #[test]
    fn replica_command_line_is_the_primary_plus_incoming() {
        let img = LinuxImage {
            kernel: "/k".into(),
            initrd: "/i".into(),
        };
        let spec = QemuSpec::new("t", img, "/run/x")
            .accel(Accel::Tcg)
            .network(QemuNetSpec {
                mac: [0x52, 0x54, 0, 1, 2, 3],
                address: Some(("192.0.2.10".parse().unwrap(), 24)),
                gateway: Some("192.0.2.1".parse().unwrap()),
            });
        let paths = Paths::new(&spec, "p");
        let primary = command_line(&spec, &paths, "tcg", false);
        let replica = command_line(&spec, &paths, "tcg", true);
        assert_eq!(&replica[..primary.len()], &primary[..]);
        assert_eq!(&replica[primary.len()..], ["-incoming", "defer", "-S"]);
        let joined = primary.join(" ");
        assert!(joined.contains("share=on"));
        assert!(joined.contains("mac=52:54:00:01:02:03"));
        assert!(kernel_cmdline(&spec).contains("rw.ip=192.0.2.10/24 rw.gw=192.0.2.1"));
    }
}
