//! The rules' etcd operations on the `etcd-client` crate, and the link
//! task that answers a site's witness messages from etcd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchStream, Watcher,
};
use failover::{Message, SiteId};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::rules::{holder_key, Arbiter, Entry, Kv};
use crate::arbiter::link::Inbox;

/// Where a site's etcd arbiter finds etcd, and its lease's shape.
#[derive(Debug, Clone)]
pub struct EtcdLink {
    /// `http(s)://host:port` of the cluster's members.
    pub endpoints: Vec<String>,
    /// CA to verify the members with (https), and this site's client
    /// certificate and key when the cluster asks for one.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Key prefix of this deployment (no trailing slash).
    pub prefix: String,
    /// TTL of the VM's etcd lease, in whole seconds.
    pub ttl_secs: i64,
    /// Bound of one message's etcd operations: a site asks again at its
    /// next renewal, so an answer later than that helps nobody.
    pub op_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum EtcdLinkError {
    #[error("etcd TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl EtcdLink {
    fn options(&self) -> Result<ConnectOptions, EtcdLinkError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| EtcdLinkError::TlsFile {
                path: p.clone(),
                source,
            })
        };
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(self.op_timeout)
            .with_timeout(self.op_timeout)
            .with_keep_alive(Duration::from_secs(2), self.op_timeout);
        if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            opts = opts.with_tls(tls);
        }
        Ok(opts)
    }
}

/// [`Kv`] over a real cluster: one client per member, used one at a time.
/// The crate's own balancing over several endpoints keeps sending a share
/// of the requests to a member that is down (each fails), so we stick to
/// one member and move to the next after a failure instead: the rules'
/// operations are safe to repeat from the start (a repeat finds the key as
/// the lost attempt left it, and answers from it).
pub struct EtcdKv {
    endpoints: Vec<String>,
    opts: ConnectOptions,
    clients: Vec<Option<Client>>,
    current: usize,
    /// The keep-alive stream of the lease we renew (one lease at a time),
    /// on the current member.
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdKv {
    pub fn new(link: &EtcdLink) -> Result<Self, EtcdLinkError> {
        Ok(Self {
            endpoints: link.endpoints.clone(),
            opts: link.options()?,
            clients: link.endpoints.iter().map(|_| None).collect(),
            current: 0,
            keeper: None,
        })
    }

    pub fn members(&self) -> usize {
        self.endpoints.len().max(1)
    }

    /// Moves on to the next member (after a failure on this one).
    pub fn next_member(&mut self) {
        self.keeper = None;
        if let Some(c) = self.clients.get_mut(self.current) {
            // Reconnect from scratch when we come back to it.
            *c = None;
        }
        self.current = (self.current + 1) % self.members();
    }

    pub fn member(&self) -> &str {
        self.endpoints
            .get(self.current)
            .map(String::as_str)
            .unwrap_or("")
    }

    async fn client(&mut self) -> Result<&mut Client, etcd_client::Error> {
        let i = self.current;
        let ep = self.endpoints.get(i).cloned().unwrap_or_default();
        let slot = self
            .clients
            .get_mut(i)
            .ok_or_else(|| etcd_client::Error::InvalidArgs("no etcd endpoint".into()))?;
        if slot.is_none() {
            *slot = Some(Client::connect([ep], Some(self.opts.clone())).await?);
        }
        slot.as_mut()
            .ok_or_else(|| etcd_client::Error::InvalidArgs("no etcd client".into()))
    }

    /// Starts watching `key` on the current member, then reads it (after
    /// the watch started: no change between is missed).
    pub async fn watch(
        &mut self,
        key: &str,
    ) -> Result<(Watcher, WatchStream, Option<Entry>), etcd_client::Error> {
        let c = self.client().await?;
        let (watcher, events) = c.watch(key, None).await?;
        let now = c.get(key, None).await?.kvs().first().map(entry);
        Ok((watcher, events, now))
    }

    async fn keep_alive_once(&mut self, lease: i64) -> Result<i64, etcd_client::Error> {
        if self.keeper.as_ref().is_none_or(|(id, _, _)| *id != lease) {
            let (k, s) = self.client().await?.lease_keep_alive(lease).await?;
            self.keeper = Some((lease, k, s));
        }
        let Some((_, keeper, stream)) = self.keeper.as_mut() else {
            return Ok(0);
        };
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) => Ok(r.ttl()),
            // The stream ended: no answer about the lease.
            None => Err(etcd_client::Error::WatchError(
                "lease keep-alive stream closed".into(),
            )),
        }
    }
}

fn entry(kv: &etcd_client::KeyValue) -> Entry {
    Entry {
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        lease: kv.lease(),
    }
}

impl Kv for EtcdKv {
    type Error = etcd_client::Error;

    async fn get(&mut self, key: &str) -> Result<Option<Entry>, Self::Error> {
        let r = self.client().await?.get(key, None).await?;
        Ok(r.kvs().first().map(entry))
    }

    async fn grant(&mut self, ttl: i64) -> Result<(i64, i64), Self::Error> {
        let r = self.client().await?.lease_grant(ttl, None).await?;
        Ok((r.id(), r.ttl()))
    }

    async fn keep_alive(&mut self, lease: i64) -> Result<i64, Self::Error> {
        match self.keep_alive_once(lease).await {
            Ok(ttl) => Ok(ttl),
            Err(e) => {
                // A stream left over from before may have broken (its
                // member restarted): one more try on a new stream.
                debug!(error = %e, "etcd keep-alive stream failed: opening another");
                self.keeper = None;
                self.keep_alive_once(lease).await
            }
        }
    }

    async fn revoke(&mut self, lease: i64) -> Result<(), Self::Error> {
        self.client().await?.lease_revoke(lease).await.map(|_| ())
    }

    async fn put_if(
        &mut self,
        key: &str,
        expect: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Result<i64, Option<Entry>>, Self::Error> {
        // An absent key compares as revision 0.
        let cmp = Compare::mod_revision(key, CompareOp::Equal, expect);
        let txn = Txn::new()
            .when([cmp])
            .and_then([TxnOp::put(
                key,
                value,
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let r = self.client().await?.txn(txn).await?;
        if r.succeeded() {
            return Ok(Ok(r.header().map_or(0, |h| h.revision())));
        }
        let now = r.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(g) => Some(g.kvs().first().map(entry)),
            _ => None,
        });
        Ok(Err(now.flatten()))
    }
}

/// The link task: answers the site's witness messages from etcd and
/// watches the key for a lease handed over to this site.
// The link's parts, as `link::spawn` hands them to every kind of link.
#[allow(clippy::too_many_arguments)]
pub async fn etcd_loop(
    cfg: EtcdLink,
    vm: String,
    me: SiteId,
    from: SiteId,
    inbox: Inbox,
    up: Arc<AtomicBool>,
    mut out: mpsc::UnboundedReceiver<Message>,
    retry: Duration,
) {
    let key = holder_key(&cfg.prefix, &vm);
    let mut arb = Arbiter::new(me, key.clone(), cfg.ttl_secs);
    let mut kv = loop {
        match EtcdKv::new(&cfg) {
            Ok(kv) => break kv,
            Err(e) => {
                // The files may appear (a certificate being rotated in).
                warn!(vm, error = %e, "etcd arbiter: cannot set up the etcd client (retrying)");
                if !wait_retry(&mut out, &inbox, retry.max(Duration::from_secs(5))).await {
                    return;
                }
            }
        }
    };
    let mut first = true;
    let mut failures = 0usize;
    loop {
        let watched = tokio::time::timeout(cfg.op_timeout, kv.watch(&key)).await;
        let (_watcher, mut events, now) = match watched {
            Ok(Ok(w)) => w,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer".to_owned(),
                };
                up.store(false, Ordering::Relaxed);
                // Quiet while trying the members in turn; a warning once
                // every member failed.
                failures += 1;
                if failures == kv.members() {
                    warn!(vm, error = %why, "etcd arbiter: no etcd member reachable (retrying)");
                } else {
                    debug!(vm, member = kv.member(), error = %why, "etcd member unreachable: trying the next");
                }
                kv.next_member();
                let wait = if failures.is_multiple_of(kv.members()) {
                    retry
                } else {
                    Duration::ZERO
                };
                if !wait_retry(&mut out, &inbox, wait).await {
                    return;
                }
                continue;
            }
        };
        if failures >= kv.members() || first {
            info!(vm, %key, member = kv.member(), "etcd arbiter up");
        }
        failures = 0;
        up.store(true, Ordering::Relaxed);
        if let Some(m) = arb.observed(now.as_ref(), first) {
            let _ = inbox.send((from, m));
        }
        first = false;
        loop {
            tokio::select! {
                m = out.recv() => {
                    let Some(mut m) = m else { return };
                    // Only the latest request matters: earlier ones queued
                    // while etcd was slow are answered by it.
                    while let Ok(n) = out.try_recv() {
                        m = n;
                    }
                    match answer(&mut arb, &mut kv, &m, cfg.op_timeout, &vm).await {
                        Some(Some(reply)) => {
                            up.store(true, Ordering::Relaxed);
                            if inbox.send((from, reply)).is_err() {
                                return;
                            }
                        }
                        Some(None) => {}
                        None => up.store(false, Ordering::Relaxed),
                    }
                }
                ev = events.message() => {
                    match ev {
                        Ok(Some(resp)) if !resp.canceled() => {
                            for e in resp.events() {
                                // A delete carries the key without value
                                // or lease: nothing to hand over.
                                let seen = e.kv().map(entry).filter(|s| !s.value.is_empty());
                                if let Some(m) = arb.observed(seen.as_ref(), false) {
                                    if inbox.send((from, m)).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        _ => {
                            debug!(vm, member = kv.member(), "etcd watch ended: watching again");
                            break;
                        }
                    }
                }
            }
        }
        // The watch's member may be gone: watch from the next one.
        kv.next_member();
    }
}

/// One message's answer, trying each member at most once (each try
/// bounded by `timeout`). `None`: no member answered (the site asks
/// again at its next renewal, as after a lost message).
async fn answer(
    arb: &mut Arbiter,
    kv: &mut EtcdKv,
    m: &Message,
    timeout: Duration,
    vm: &str,
) -> Option<Option<Message>> {
    for _ in 0..kv.members() {
        match tokio::time::timeout(timeout, arb.handle(kv, m)).await {
            Ok(Ok(reply)) => return Some(reply),
            Ok(Err(e)) => {
                debug!(vm, member = kv.member(), error = %e, "etcd request failed: trying the next member");
            }
            Err(_) => {
                debug!(
                    vm,
                    member = kv.member(),
                    "etcd request timed out: trying the next member"
                );
            }
        }
        kv.next_member();
    }
    warn!(
        vm,
        "etcd arbiter: no etcd member answered (the site asks again)"
    );
    None
}

/// Waits `retry`, dropping what the site sends meanwhile (it repeats its
/// requests); false once the site's shell is gone.
async fn wait_retry(
    out: &mut mpsc::UnboundedReceiver<Message>,
    inbox: &Inbox,
    retry: Duration,
) -> bool {
    let until = tokio::time::Instant::now() + retry;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return !inbox.is_closed(),
            m = out.recv() => if m.is_none() { return false },
        }
    }
}
