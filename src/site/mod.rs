//! The site daemon: one process per host serves every VM of the site. One
//! QUIC endpoint, one BGP speaker, one status/metrics server and one
//! control port for all of them; per VM a task of its own (the protector
//! of a VM running here, or the standby holding its replica), so one VM's
//! failure (a bad epoch, a guest crash, a resync) never stalls another's
//! checkpoints or output.
//!
//! VMs come and go while the daemon runs: SIGHUP reloads the
//! configuration, starts the VMs it adds for this site and stops the VMs
//! it no longer lists, leaving the others untouched.

pub mod backend;
pub mod control;
pub mod group;
pub mod kvm_vm;
pub mod protect;
pub mod qemu_vm;
pub mod standby;
pub mod takeover;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::Config;
pub use group::Unit;

/// How one VM's task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEnd {
    /// Stopped by the operator (signal, or removed from the configuration).
    Stopped,
    /// Another site runs the VM now: this site must not restart it.
    Superseded { token: u64 },
    /// The VM's configuration cannot be served here.
    Config(String),
    /// A runtime failure (guest, replica, peer).
    Failed(String),
}

impl VmEnd {
    /// Which end speaks for the daemon when VMs ended differently (the
    /// highest): a failure above a configuration error above a
    /// supersession above a clean stop.
    pub fn severity(&self) -> u8 {
        match self {
            VmEnd::Stopped => 0,
            VmEnd::Superseded { .. } => 1,
            VmEnd::Config(_) => 2,
            VmEnd::Failed(_) => 3,
        }
    }
}

/// Tells a VM's task to stop; cheap to clone, one per VM.
#[derive(Clone)]
pub struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Completes when the VM must stop (also when the daemon is gone).
    pub async fn stopped(mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }
}

pub type VmTask = Pin<Box<dyn Future<Output = VmEnd> + Send>>;

/// What a daemon (protect or standby) does for each VM.
pub trait Launcher: Send + 'static {
    /// The units (VMs and consistency groups) of `cfg` this daemon serves.
    fn select(&self, cfg: &Config) -> Vec<Unit>;
    /// Prepares `unit` (routes, control) at once and returns its task.
    fn launch(&mut self, cfg: Arc<Config>, unit: Unit, stop: StopSignal) -> VmTask;
    /// `vm` is no longer served (its task ended): drop what `launch` set up.
    fn forget(&mut self, vm: &str);
}

/// Runs `launcher`'s VMs of `cfg` until `shutdown` or until no VM is left;
/// SIGHUP reloads `config_path`. Returns how each VM ended.
pub async fn run_fleet<L: Launcher>(
    mut launcher: L,
    cfg: Arc<Config>,
    config_path: PathBuf,
    shutdown: impl Future<Output = ()>,
) -> BTreeMap<String, VmEnd> {
    let mut tasks: JoinSet<(String, VmEnd)> = JoinSet::new();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut ends = BTreeMap::new();
    for unit in launcher.select(&cfg) {
        start(&mut launcher, &mut tasks, &mut running, cfg.clone(), unit);
    }
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "no SIGHUP handler: configuration reload disabled"))
        .ok();
    tokio::pin!(shutdown);
    loop {
        if tasks.is_empty() {
            break;
        }
        let hup = async {
            match &mut hangup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut shutdown => break,
            Some(_) = hup => {
                reload(&mut launcher, &mut tasks, &mut running, &config_path);
            }
            Some(joined) = tasks.join_next_with_id() => {
                let (name, end) = joined_end(&running, joined);
                finished(&mut launcher, &mut running, &name, &end);
                ends.insert(name, end);
            }
        }
    }
    for r in running.values() {
        let _ = r.stop.send(true);
    }
    while let Some(joined) = tasks.join_next_with_id().await {
        let (name, end) = joined_end(&running, joined);
        finished(&mut launcher, &mut running, &name, &end);
        ends.insert(name, end);
    }
    ends
}

/// A VM the daemon runs.
struct Running {
    stop: watch::Sender<bool>,
    unit: Unit,
    task: tokio::task::Id,
}

/// The VM and end of a joined task (a panicked one failed).
fn joined_end(
    running: &HashMap<String, Running>,
    joined: Result<(tokio::task::Id, (String, VmEnd)), tokio::task::JoinError>,
) -> (String, VmEnd) {
    match joined {
        Ok((_, r)) => r,
        Err(e) => {
            let name = running
                .iter()
                .find(|(_, r)| r.task == e.id())
                .map(|(n, _)| n.clone())
                .unwrap_or_default();
            (name, VmEnd::Failed(format!("VM task panicked: {e}")))
        }
    }
}

fn start<L: Launcher>(
    launcher: &mut L,
    tasks: &mut JoinSet<(String, VmEnd)>,
    running: &mut HashMap<String, Running>,
    cfg: Arc<Config>,
    unit: Unit,
) {
    let (stop, stop_rx) = watch::channel(false);
    let name = unit.name().to_owned();
    let task = launcher.launch(cfg, unit.clone(), StopSignal(stop_rx));
    let n = name.clone();
    let task = tasks.spawn(async move { (n, task.await) }).id();
    running.insert(name, Running { stop, unit, task });
}

fn finished<L: Launcher>(
    launcher: &mut L,
    running: &mut HashMap<String, Running>,
    name: &str,
    end: &VmEnd,
) {
    running.remove(name);
    launcher.forget(name);
    match end {
        VmEnd::Stopped => info!(vm = name, "VM stopped here"),
        VmEnd::Superseded { token } => {
            warn!(vm = name, token, "another site runs the VM now")
        }
        VmEnd::Config(e) => error!(vm = name, error = %e, "VM not served: configuration"),
        VmEnd::Failed(e) => error!(vm = name, error = %e, "VM failed"),
    }
}

/// SIGHUP: starts the VMs the configuration now adds for this daemon and
/// stops those it dropped. A VM whose definition changed keeps running as
/// it was (remove it, reload, add it back to apply the change).
fn reload<L: Launcher>(
    launcher: &mut L,
    tasks: &mut JoinSet<(String, VmEnd)>,
    running: &mut HashMap<String, Running>,
    path: &std::path::Path,
) {
    let cfg = match Config::load(path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            error!(file = %path.display(), error = %e, "SIGHUP: configuration not reloaded (nothing changed)");
            return;
        }
    };
    let wanted = launcher.select(&cfg);
    let names: Vec<&str> = wanted.iter().map(|u| u.name()).collect();
    for (name, r) in running.iter() {
        if !names.contains(&name.as_str()) {
            info!(vm = %name, "SIGHUP: no longer in the configuration: stopping it");
            let _ = r.stop.send(true);
        }
    }
    let mut added = 0;
    for unit in wanted {
        match running.get(unit.name()) {
            Some(r) => {
                if format!("{:?}", r.unit) != format!("{unit:?}") {
                    warn!(vm = %unit.name(), "SIGHUP: its definition changed; it runs on as it was (remove it, reload, add it back to apply)");
                }
            }
            None => {
                info!(vm = %unit.name(), "SIGHUP: new in the configuration: starting it");
                start(launcher, tasks, running, cfg.clone(), unit);
                added += 1;
            }
        }
    }
    info!(file = %path.display(), added, "configuration reloaded");
}

/// The daemon's overall end: the most severe of its VMs' ends (all VMs
/// stopped cleanly when there is none).
pub fn overall(ends: &BTreeMap<String, VmEnd>) -> VmEnd {
    ends.values()
        .max_by_key(|e| e.severity())
        .cloned()
        .unwrap_or(VmEnd::Stopped)
}

/// The TLS files of a configured site, as the transport takes them.
pub fn tls_paths(tls: &crate::config::Tls) -> wan::transport::TlsPaths {
    wan::transport::TlsPaths {
        ca: tls.ca.clone(),
        cert: tls.cert.clone(),
        key: tls.key.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Units `a` (ends at once, failed), `b` (runs until stopped) and
    /// `c` (superseded at once); records what the daemon forgot.
    struct Fake {
        forgotten: Arc<Mutex<Vec<String>>>,
    }

    fn unit(name: &str) -> Unit {
        let text = format!(
            "[[sites]]\nname = \"dc1\"\nlisten = \"127.0.0.1:1\"\n[sites.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[sites]]\nname = \"dc2\"\nlisten = \"127.0.0.1:2\"\n[sites.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
             [[vms]]\nname = \"{name}\"\nprimary = \"dc1\"\nbackup = \"dc2\"\nguest_image = \"g\"\nmemory_mib = 32\n\
             [vms.network]\ntap = \"t\"\nmac = \"52:54:00:12:34:56\"\naddress = \"192.0.2.10/24\"\n"
        );
        let cfg = Config::parse(
            &text,
            std::path::Path::new("t"),
            std::path::Path::new("/"),
            Vec::new(),
        )
        .expect("config");
        Unit {
            vm: cfg.vms[0].clone(),
            members: Vec::new(),
        }
    }

    impl Launcher for Fake {
        fn select(&self, _: &Config) -> Vec<Unit> {
            vec![unit("a"), unit("b"), unit("c")]
        }
        fn launch(&mut self, _: Arc<Config>, unit: Unit, stop: StopSignal) -> VmTask {
            let name = unit.name().to_owned();
            Box::pin(async move {
                match name.as_str() {
                    "a" => VmEnd::Failed("guest crashed".into()),
                    "c" => VmEnd::Superseded { token: 9 },
                    _ => {
                        stop.stopped().await;
                        VmEnd::Stopped
                    }
                }
            })
        }
        fn forget(&mut self, vm: &str) {
            self.forgotten.lock().unwrap().push(vm.to_owned());
        }
    }

    #[tokio::test]
    async fn one_units_end_leaves_the_others_running_until_shutdown() {
        let forgotten = Arc::new(Mutex::new(Vec::new()));
        let cfg = Arc::new(
            Config::parse(
                "[[sites]]\nname = \"dc1\"\nlisten = \"127.0.0.1:1\"\n[sites.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
                std::path::Path::new("t"),
                std::path::Path::new("/"),
                Vec::new(),
            )
            .expect("config"),
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let f = forgotten.clone();
        let daemon = tokio::spawn(run_fleet(
            Fake { forgotten: f },
            cfg,
            PathBuf::from("/nonexistent"),
            async move {
                let _ = rx.await;
            },
        ));
        // a and c end on their own; b runs on until the shutdown.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while forgotten.lock().unwrap().len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a and c never ended"
            );
            tokio::task::yield_now().await;
        }
        assert!(!daemon.is_finished(), "b still runs");
        let _ = tx.send(());
        let ends = daemon.await.expect("daemon");
        assert_eq!(ends.get("a"), Some(&VmEnd::Failed("guest crashed".into())));
        assert_eq!(ends.get("b"), Some(&VmEnd::Stopped));
        assert_eq!(ends.get("c"), Some(&VmEnd::Superseded { token: 9 }));
        assert_eq!(overall(&ends), VmEnd::Failed("guest crashed".into()));
        let mut f = forgotten.lock().unwrap().clone();
        f.sort();
        assert_eq!(f, ["a", "b", "c"]);
    }

    #[test]
    fn the_most_severe_end_speaks_for_the_daemon() {
        let mut ends = BTreeMap::new();
        assert_eq!(overall(&ends), VmEnd::Stopped);
        ends.insert("a".to_owned(), VmEnd::Stopped);
        ends.insert("b".to_owned(), VmEnd::Superseded { token: 3 });
        assert_eq!(overall(&ends), VmEnd::Superseded { token: 3 });
        ends.insert("c".to_owned(), VmEnd::Failed("x".into()));
        ends.insert("d".to_owned(), VmEnd::Config("y".into()));
        assert_eq!(overall(&ends), VmEnd::Failed("x".into()));
    }
}
