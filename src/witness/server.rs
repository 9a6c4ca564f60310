//! `remus-wan witness`: the failover arbiter at the third site, serving
//! the sites' lease requests over mutually authenticated QUIC.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use failover::{LeaseRecord, Message, SiteId, Timers, Witness, WitnessOutput};
use tokio::sync::{mpsc, Notify};
use tracing::{info, warn};
use wan::transport::{Connection, Endpoint, TlsPaths, TransportConfig, TransportError};

use super::frame::{read_message, write_message};
use super::store::{LeaseStore, LeaseStoreError, Opened, StoredLease};

/// What the witness needs to run.
#[derive(Debug, Clone)]
pub struct WitnessOptions {
    pub listen: SocketAddr,
    pub tls: TlsPaths,
    /// Site names, in configuration order (`SiteId(i + 1)` is `sites[i]`).
    pub sites: Vec<String>,
    /// The VMs the witness arbitrates, each with the two sites that may
    /// hold its lease (`vms.primary`, `vms.backup`); any other site, and
    /// any other VM, is refused.
    pub vms: Vec<VmSites>,
    pub timers: Timers,
    /// Where the lease records live (see [`LeaseStore::open`]).
    pub state_dir: PathBuf,
}

/// A VM and its two sites, by name.
#[derive(Debug, Clone)]
pub struct VmSites {
    pub vm: String,
    pub primary: String,
    pub backup: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Store(#[from] LeaseStoreError),
    #[error("VM {vm}: site {site:?} is not among the configured sites")]
    UnknownSite { vm: String, site: String },
}

struct Shared {
    witness: Witness,
    sites: Vec<String>,
    /// Records waiting for the next write (at most one per VM: the
    /// witness ignores a VM while its record is being written).
    to_persist: BTreeMap<String, StoredLease>,
    /// Wakes the writer when `to_persist` gains a record.
    persist_wake: Arc<Notify>,
    /// Per site and VM, the stream that last spoke about the VM: replies
    /// go there (one site may run several processes, one per VM).
    outbox: HashMap<(SiteId, String), mpsc::UnboundedSender<(String, Message)>>,
    /// The latest stream of each site, for a VM it has not spoken about
    /// yet (a standby learns of a handed-over lease this way).
    latest: HashMap<SiteId, mpsc::UnboundedSender<(String, Message)>>,
}

impl Shared {
    fn id_of(&self, name: &str) -> Option<SiteId> {
        self.sites
            .iter()
            .position(|s| s == name)
            .map(|i| SiteId(i as u32 + 1))
    }

    fn name_of(&self, id: SiteId) -> Option<&str> {
        self.sites
            .get((id.0 as usize).checked_sub(1)?)
            .map(String::as_str)
    }

    /// Feeds one message to the arbiter.
    fn handle(&mut self, vm: &str, from: SiteId, msg: Message) {
        let outputs = self.witness.handle(vm, from, msg, Instant::now());
        self.dispatch(vm, outputs);
    }

    /// Sends the replies, and queues a record to persist for the writer
    /// (see [`persist_batches`]): the replies that wait for it stay inside
    /// the witness until the write's outcome comes back.
    fn dispatch(&mut self, vm: &str, outputs: Vec<WitnessOutput>) {
        let mut outputs: VecDeque<_> = outputs.into();
        while let Some(o) = outputs.pop_front() {
            match o {
                WitnessOutput::Persist { vm, record } => {
                    let holder = record
                        .holder
                        .and_then(|h| self.name_of(h))
                        .map(str::to_owned);
                    let stored = StoredLease {
                        holder,
                        token: record.token,
                    };
                    self.to_persist.insert(vm, stored);
                    self.persist_wake.notify_one();
                }
                WitnessOutput::Send { to, msg } => {
                    let tx = self
                        .outbox
                        .get(&(to, vm.to_owned()))
                        .filter(|tx| !tx.is_closed())
                        .or_else(|| self.latest.get(&to));
                    if let Some(tx) = tx {
                        let _ = tx.send((vm.to_owned(), msg));
                    }
                }
            }
        }
    }
}

/// The witness's one writer: takes every record queued since its last
/// write and writes them all at once (written, synced, renamed, folder
/// synced), then reports the outcome of each to the witness, which
/// releases the replies that waited for it. Why a group commit: at a
/// site's failure every VM of the site asks for its lease at about the
/// same time, and one sync per grant made the last VM wait for all the
/// others' syncs (arbitration grew with the number of VMs per site). The
/// write runs off the runtime threads, without the lock, so messages keep
/// being handled (and queued) meanwhile.
async fn persist_batches(shared: Arc<Mutex<Shared>>, mut store: LeaseStore, wake: Arc<Notify>) {
    loop {
        wake.notified().await;
        let batch: Vec<(String, StoredLease)> = match shared.lock() {
            Ok(mut s) => std::mem::take(&mut s.to_persist).into_iter().collect(),
            Err(_) => return,
        };
        if batch.is_empty() {
            continue;
        }
        let vms: Vec<String> = batch.iter().map(|(vm, _)| vm.clone()).collect();
        let written = tokio::task::spawn_blocking(move || {
            let r = store.put_all(batch);
            (store, r)
        })
        .await;
        let durable = match written {
            Ok((back, r)) => {
                store = back;
                match r {
                    Ok(()) => true,
                    Err(e) => {
                        warn!(error = %e, vms = ?vms, "cannot persist lease records: nothing granted");
                        false
                    }
                }
            }
            Err(e) => {
                warn!(error = %e, "the lease writer stopped: nothing more is granted");
                return;
            }
        };
        let Ok(mut s) = shared.lock() else {
            return;
        };
        for vm in &vms {
            let outputs = s.witness.persisted(vm, durable, Instant::now());
            s.dispatch(vm, outputs);
        }
    }
}

pub struct WitnessServer {
    endpoint: Endpoint,
    shared: Arc<Mutex<Shared>>,
    /// The lease records' file, handed to the writer task by `run`.
    store: LeaseStore,
    persist_wake: Arc<Notify>,
}

impl WitnessServer {
    /// Opens the state (see [`LeaseStore::open`]: a first start creates
    /// it, a missing or corrupt file is an error), binds the endpoint and
    /// recovers the lease records.
    pub fn bind(opts: WitnessOptions) -> Result<Self, WitnessError> {
        let id_of = |vm: &str, name: &str| {
            opts.sites
                .iter()
                .position(|s| s == name)
                .map(|i| SiteId(i as u32 + 1))
                .ok_or_else(|| WitnessError::UnknownSite {
                    vm: vm.to_owned(),
                    site: name.to_owned(),
                })
        };
        let mut parties = Vec::with_capacity(opts.vms.len());
        for v in &opts.vms {
            parties.push((
                v.vm.clone(),
                [id_of(&v.vm, &v.primary)?, id_of(&v.vm, &v.backup)?],
            ));
        }
        let (store, opened) = LeaseStore::open(&opts.state_dir)?;
        let records: Vec<(String, LeaseRecord)> = store
            .leases()
            .iter()
            .map(|(vm, l)| {
                let holder = l.holder.as_ref().and_then(|h| id_of(vm, h).ok());
                (
                    vm.clone(),
                    LeaseRecord {
                        holder,
                        token: l.token,
                    },
                )
            })
            .collect();
        match opened {
            Opened::Created => info!(
                dir = %opts.state_dir.display(),
                token_floor = store.token_floor(),
                "first start: new witness state created"
            ),
            Opened::Recovered => info!(
                dir = %opts.state_dir.display(),
                leases = records.len(),
                token_floor = store.token_floor(),
                "witness state recovered"
            ),
        }
        info!(
            vms = parties.len(),
            wait_ms = (opts.timers.lease + opts.timers.clock_margin).as_millis() as u64,
            "no lease changes hands until one lease period has passed"
        );
        let witness = Witness::recover(
            opts.timers,
            parties,
            store.token_floor(),
            records,
            Instant::now(),
        );
        let mut cfg = TransportConfig::new(opts.tls.clone());
        cfg.allowed_clients = opts.sites.clone();
        let endpoint = Endpoint::bind(opts.listen, cfg)?;
        info!(addr = %endpoint.local_addr()?, "witness listening");
        let persist_wake = Arc::new(Notify::new());
        Ok(Self {
            endpoint,
            shared: Arc::new(Mutex::new(Shared {
                witness,
                sites: opts.sites,
                to_persist: BTreeMap::new(),
                persist_wake: persist_wake.clone(),
                outbox: HashMap::new(),
                latest: HashMap::new(),
            })),
            store,
            persist_wake,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, WitnessError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// Current lease of a VM: (holder site, token).
    pub fn lease(&self, vm: &str) -> Option<(Option<String>, u64)> {
        let s = self.shared.lock().ok()?;
        let r = s.witness.record(vm)?;
        Some((
            r.holder.and_then(|h| s.name_of(h)).map(str::to_owned),
            r.token,
        ))
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let writer = tokio::spawn(persist_batches(
            self.shared.clone(),
            self.store,
            self.persist_wake.clone(),
        ));
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                conn = self.endpoint.accept() => match conn {
                    Ok(conn) => {
                        let shared = self.shared.clone();
                        tokio::spawn(serve_connection(conn, shared));
                    }
                    Err(TransportError::Closed) => break,
                    Err(e) => warn!(error = %e, "witness refused a connection"),
                }
            }
        }
        info!("witness shutting down");
        writer.abort();
        self.endpoint.close();
    }
}

async fn serve_connection(conn: Connection, shared: Arc<Mutex<Shared>>) {
    let Some(site) = conn.peer_site().map(str::to_owned) else {
        warn!("connection without a site identity closed");
        return;
    };
    let Some(id) = shared.lock().ok().and_then(|s| s.id_of(&site)) else {
        warn!(
            site,
            "connection from a site not in the configuration closed"
        );
        return;
    };
    info!(site, "site connected to the witness");
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let (tx, mut rx) = mpsc::unbounded_channel::<(String, Message)>();
        if let Ok(mut s) = shared.lock() {
            s.latest.insert(id, tx.clone());
        }
        let writer = tokio::spawn(async move {
            while let Some((vm, msg)) = rx.recv().await {
                if write_message(&mut send, &vm, &msg).await.is_err() {
                    break;
                }
            }
        });
        loop {
            match read_message(&mut recv).await {
                Ok(Some((vm, msg))) => {
                    if let Ok(mut s) = shared.lock() {
                        s.outbox.insert((id, vm.clone()), tx.clone());
                        s.handle(&vm, id, msg);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(site, error = %e, "bad message from site: closing its stream");
                    break;
                }
            }
        }
        writer.abort();
    }
    info!(site, "site disconnected from the witness");
}
