//! The rules' etcd operations on the `etcd-client` crate, and the link
//! task that answers a site's witness messages from etcd.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
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
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

impl EtcdLink {
    /// A client of the cluster (the crate balances over the endpoints and
    /// reconnects by itself).
    pub async fn connect(&self) -> Result<Client, EtcdLinkError> {
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
        Ok(Client::connect(&self.endpoints, Some(opts)).await?)
    }
}

/// [`Kv`] over a real cluster.
pub struct EtcdKv {
    client: Client,
    /// The keep-alive stream of the lease we renew (one lease at a time).
    keeper: Option<(i64, LeaseKeeper, LeaseKeepAliveStream)>,
}

impl EtcdKv {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            keeper: None,
        }
    }

    async fn keep_alive_once(&mut self, lease: i64) -> Result<i64, etcd_client::Error> {
        if self.keeper.as_ref().is_none_or(|(id, _, _)| *id != lease) {
            let (k, s) = self.client.lease_keep_alive(lease).await?;
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
        let r = self.client.get(key, None).await?;
        Ok(r.kvs().first().map(entry))
    }

    async fn grant(&mut self, ttl: i64) -> Result<(i64, i64), Self::Error> {
        let r = self.client.lease_grant(ttl, None).await?;
        Ok((r.id(), r.ttl()))
    }

    async fn keep_alive(&mut self, lease: i64) -> Result<i64, Self::Error> {
        match self.keep_alive_once(lease).await {
            Ok(ttl) => Ok(ttl),
            Err(e) => {
                // The stream may have been on a member that went away:
                // one more try on a new stream (the channel balances to
                // the members still up).
                debug!(error = %e, "etcd keep-alive stream failed: opening another");
                self.keeper = None;
                self.keep_alive_once(lease).await
            }
        }
    }

    async fn revoke(&mut self, lease: i64) -> Result<(), Self::Error> {
        self.client.lease_revoke(lease).await.map(|_| ())
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
        let r = self.client.txn(txn).await?;
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
    let mut first = true;
    let mut logged_down = false;
    loop {
        let session = async {
            let client = cfg.connect().await?;
            let mut kv = EtcdKv::new(client.clone());
            let mut watch_client = client.clone();
            let (watcher, events) = watch_client.watch(key.as_str(), None).await?;
            // Read after the watch started: no change between is missed.
            let now = kv.get(&key).await?;
            Ok::<_, EtcdLinkError>((kv, now, watcher, events))
        };
        let (mut kv, now, _watcher, mut events) =
            match tokio::time::timeout(cfg.op_timeout * 2, session).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    if !logged_down {
                        warn!(vm, error = %e, "etcd arbiter: cannot reach etcd (retrying)");
                        logged_down = true;
                    }
                    if !wait_retry(&mut out, &inbox, retry).await {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    if !logged_down {
                        warn!(vm, "etcd arbiter: no answer from etcd (retrying)");
                        logged_down = true;
                    }
                    if !wait_retry(&mut out, &inbox, retry).await {
                        return;
                    }
                    continue;
                }
            };
        info!(vm, %key, "etcd arbiter up");
        logged_down = false;
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
                    match tokio::time::timeout(cfg.op_timeout, arb.handle(&mut kv, &m)).await {
                        Ok(Ok(Some(reply))) => {
                            up.store(true, Ordering::Relaxed);
                            if inbox.send((from, reply)).is_err() {
                                return;
                            }
                        }
                        Ok(Ok(None)) => {}
                        Ok(Err(e)) => {
                            up.store(false, Ordering::Relaxed);
                            warn!(vm, error = %e, "etcd arbiter: request failed (the site asks again)");
                        }
                        Err(_) => {
                            up.store(false, Ordering::Relaxed);
                            warn!(vm, "etcd arbiter: request timed out (the site asks again)");
                        }
                    }
                }
                ev = events.message() => {
                    match ev {
                        Ok(Some(resp)) => {
                            if resp.canceled() {
                                break;
                            }
                            for e in resp.events() {
                                let seen = e.kv().map(entry);
                                // A delete carries the key without value
                                // or lease: nothing to hand over.
                                let seen = seen.filter(|s| !s.value.is_empty());
                                if let Some(m) = arb.observed(seen.as_ref(), false) {
                                    if inbox.send((from, m)).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                        Ok(None) | Err(_) => {
                            debug!(vm, "etcd watch ended: watching again");
                            break;
                        }
                    }
                }
            }
        }
        up.store(false, Ordering::Relaxed);
        if !wait_retry(&mut out, &inbox, retry).await {
            return;
        }
    }
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
