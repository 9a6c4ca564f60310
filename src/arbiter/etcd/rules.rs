//! The witness's rules carried out on etcd, sans-IO: what one site's
//! `LeaseRequest` / `Handover` becomes in etcd operations, and which
//! `LeaseReply` it answers. The operations go through the [`Kv`] trait: the
//! real client in `client.rs`, an in-memory model with simulated time in
//! the tests.
//!
//! # How a VM's lease lives in etcd
//!
//! One key per VM, `<prefix>/vms/<vm>/holder`, whose value names the holding
//! site and the etcd lease the key is attached to (`"<site id> <lease id>"`).
//! The etcd lease's TTL is the configured witness lease: when the holder
//! stops renewing, etcd deletes the key once the TTL has run out on the
//! etcd leader's clock. The rules of the built-in witness follow:
//!
//! - one holder at a time: a site takes the lease only by creating the key,
//!   in a transaction conditioned on the key being absent;
//! - another site gets it only after the holder's lease has expired: the
//!   key exists until then. The holder counts its validity from its
//!   request's send time, which precedes etcd's grant or keep-alive, so its
//!   own view always ends first (minus the clock margin);
//! - the fencing token is the key's `mod_revision`. etcd's revision is
//!   cluster-wide and only grows, so a new holder (a new key, or a handover
//!   that rewrites it) always gets a larger token than every earlier one;
//!   renewals are keep-alives of the etcd lease and change no revision;
//! - a handover rewrites the key to name the new holder, in a transaction
//!   conditioned on the key's `mod_revision` being the old holder's token
//!   (so on the old holder still holding it, under that token). The key
//!   stays on the same etcd lease, refreshed first, which the new holder
//!   renews from then on.
//!
//! The built-in witness tells a handover's new holder at once; here the new
//! holder's own link notices (it watches the key, see [`Arbiter::observed`])
//! and hands its site the same unsolicited grant.

use std::future::Future;
use std::time::Duration;

use failover::{Message, SiteId};

/// The state of the holder key, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub mod_revision: i64,
    /// The etcd lease the key is attached to (0: none).
    pub lease: i64,
}

/// The etcd operations the rules need. Each is one etcd request (a range,
/// a lease grant / keep-alive / revoke, or a transaction).
pub trait Kv {
    type Error: std::fmt::Display;

    fn get(&mut self, key: &str) -> impl Future<Output = Result<Option<Entry>, Self::Error>>;

    /// A new etcd lease of `ttl` seconds: (its id, the TTL etcd granted,
    /// which may exceed the one asked for: etcd has a minimum).
    fn grant(&mut self, ttl: i64) -> impl Future<Output = Result<(i64, i64), Self::Error>>;

    /// Renews `lease`; the TTL it has from now, 0 if it no longer exists.
    fn keep_alive(&mut self, lease: i64) -> impl Future<Output = Result<i64, Self::Error>>;

    fn revoke(&mut self, lease: i64) -> impl Future<Output = Result<(), Self::Error>>;

    /// Puts `value` on `lease` if `key` has `mod_revision == expect` (0:
    /// the key does not exist). `Ok(Ok(revision of the put))`, or
    /// `Ok(Err(the key as it is))` when the condition failed.
    fn put_if(
        &mut self,
        key: &str,
        expect: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> impl Future<Output = Result<Result<i64, Option<Entry>>, Self::Error>>;
}

/// The key of a VM's lease under `prefix` (no trailing slash).
pub fn holder_key(prefix: &str, vm: &str) -> String {
    format!("{}/vms/{vm}/holder", prefix.trim_end_matches('/'))
}

pub fn encode(holder: SiteId, lease: i64) -> Vec<u8> {
    format!("{} {lease}", holder.0).into_bytes()
}

/// The site a holder value names, if it is one this code wrote.
pub fn decode(value: &[u8]) -> Option<(SiteId, i64)> {
    let s = std::str::from_utf8(value).ok()?;
    let (site, lease) = s.split_once(' ')?;
    Some((SiteId(site.parse().ok()?), lease.parse().ok()?))
}

/// A revision as a token: etcd revisions are positive.
fn token(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// One site's arbiter over etcd, for one VM.
#[derive(Debug)]
pub struct Arbiter {
    me: SiteId,
    key: String,
    /// TTL asked for new etcd leases, in whole seconds.
    ttl: i64,
    /// The highest revision this arbiter has seen the key at (through
    /// its own operations or by watching): a watched change newer than it
    /// that names us is a handover to us.
    seen: i64,
}

impl Arbiter {
    pub fn new(me: SiteId, key: String, ttl: i64) -> Self {
        Self {
            me,
            key,
            ttl,
            seen: 0,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// What the witness would answer to `msg` from this site; `None` for
    /// messages a witness ignores. An etcd error leaves the site without an
    /// answer, as a lost message would: it asks again at its next renewal.
    pub async fn handle<K: Kv>(
        &mut self,
        kv: &mut K,
        msg: &Message,
    ) -> Result<Option<Message>, K::Error> {
        match *msg {
            Message::LeaseRequest { req, .. } => self.request(kv, req).await.map(Some),
            Message::Handover { req, token, to } => {
                self.handover(kv, req, token, to).await.map(Some)
            }
            _ => Ok(None),
        }
    }

    async fn request<K: Kv>(&mut self, kv: &mut K, req: u64) -> Result<Message, K::Error> {
        match kv.get(&self.key).await? {
            None => {
                let (lease, ttl) = kv.grant(self.ttl).await?;
                match kv
                    .put_if(&self.key, 0, encode(self.me, lease), lease)
                    .await?
                {
                    Ok(rev) => {
                        self.seen = self.seen.max(rev);
                        tracing::info!(key = %self.key, token = rev, "etcd lease taken");
                        Ok(self.grant(req, ttl, rev))
                    }
                    Err(now) => {
                        // Another site was faster: our lease holds nothing.
                        if let Err(e) = kv.revoke(lease).await {
                            tracing::debug!(key = %self.key, error = %e, "etcd lease revoke failed (it expires by itself)");
                        }
                        Ok(self.refusal(req, now.as_ref()))
                    }
                }
            }
            Some(e) => match decode(&e.value) {
                Some((holder, lease)) if holder == self.me && lease == e.lease => {
                    self.seen = self.seen.max(e.mod_revision);
                    let ttl = kv.keep_alive(lease).await?;
                    if ttl > 0 {
                        Ok(self.grant(req, ttl, e.mod_revision))
                    } else {
                        // Expired between the read and the renewal: the
                        // key is gone or going; the next request takes it
                        // anew (under a new token). Nothing is granted now.
                        Ok(LeaseReply::refused(req, e.mod_revision, None))
                    }
                }
                _ => Ok(self.refusal(req, Some(&e))),
            },
        }
    }

    async fn handover<K: Kv>(
        &mut self,
        kv: &mut K,
        req: u64,
        token_: u64,
        to: SiteId,
    ) -> Result<Message, K::Error> {
        let cur = kv.get(&self.key).await?;
        let Some(e) = cur else {
            return self.hand_lapsed(kv, req, token_, to).await;
        };
        let named = decode(&e.value);
        let fresh =
            to != self.me && named == Some((self.me, e.lease)) && token(e.mod_revision) == token_;
        // Already handed over (our reply was lost): tell us again.
        let repeat = named.map(|(h, _)| h) == Some(to) && token(e.mod_revision) > token_;
        if repeat {
            return Ok(LeaseReply::refused(req, e.mod_revision, Some(to)));
        }
        if !fresh {
            return Ok(self.refusal(req, Some(&e)));
        }
        // A full TTL for the new holder, which renews from its first
        // request on; if the lease ran out meanwhile, the put fails (the
        // key's revision changed) and the switchover is refused.
        if kv.keep_alive(e.lease).await? <= 0 {
            return Ok(self.refusal(req, None));
        }
        match kv
            .put_if(&self.key, e.mod_revision, encode(to, e.lease), e.lease)
            .await?
        {
            Ok(rev) => {
                self.seen = self.seen.max(rev);
                tracing::info!(key = %self.key, token = rev, to = to.0, "etcd lease handed over");
                Ok(LeaseReply::refused(req, rev, Some(to)))
            }
            Err(now) => Ok(self.refusal(req, now.as_ref())),
        }
    }

    /// A handover whose lease ran out before it reached etcd (the sender
    /// was cut off from etcd, or its renewals were late): etcd deleted the
    /// key, so nobody holds the lease and `to` gets it under a new etcd
    /// lease, as if it had asked. The built-in witness does the same: its
    /// record outlives the lease, so the handover is still fresh there.
    ///
    /// Refusing instead (the key names nobody, under no token) told the
    /// sender nothing it could act on: with its output held, it asked again
    /// and again, and the VM ran nowhere until the engine abandoned the
    /// switchover, or for good without that deadline. Safe because the
    /// lease is free: the sender releases nothing once it has asked for a
    /// handover, and the new token is larger than any earlier one.
    ///
    /// As the witness checks that its record still holds the sender's
    /// token, a lapsed key is handed over only when no later holder is
    /// known here: a handover that a newer grant overtook is stale, and the
    /// sender is told the newer token (superseding it if it did not know).
    async fn hand_lapsed<K: Kv>(
        &mut self,
        kv: &mut K,
        req: u64,
        token_: u64,
        to: SiteId,
    ) -> Result<Message, K::Error> {
        if to == self.me {
            return Ok(self.refusal(req, None));
        }
        if token(self.seen) > token_ {
            return Ok(LeaseReply::refused(req, self.seen, None));
        }
        let (lease, _) = kv.grant(self.ttl).await?;
        match kv.put_if(&self.key, 0, encode(to, lease), lease).await? {
            Ok(rev) => {
                self.seen = self.seen.max(rev);
                tracing::info!(key = %self.key, token = rev, to = to.0, "lapsed etcd lease handed over");
                Ok(LeaseReply::refused(req, rev, Some(to)))
            }
            Err(now) => {
                // Someone took the key meanwhile: the sender learns who,
                // under which token, as from any refusal.
                if let Err(e) = kv.revoke(lease).await {
                    tracing::debug!(key = %self.key, error = %e, "etcd lease revoke failed (it expires by itself)");
                }
                Ok(self.refusal(req, now.as_ref()))
            }
        }
    }

    /// The key as a watch (or a read) saw it. Returns the grant to hand
    /// this site when the key names it under a revision it did not make
    /// itself: a handover to us. The first observation only sets the
    /// starting point (a key naming us from before this process is not a
    /// handover: our site's own request renews it or lets it lapse).
    pub fn observed(&mut self, e: Option<&Entry>, first: bool) -> Option<Message> {
        let e = e?;
        let newer = e.mod_revision > self.seen;
        self.seen = self.seen.max(e.mod_revision);
        if first || !newer {
            return None;
        }
        match decode(&e.value) {
            Some((holder, _)) if holder == self.me => {
                tracing::info!(key = %self.key, token = e.mod_revision, "etcd lease handed over to this site");
                Some(Message::LeaseReply {
                    req: 0,
                    granted: Some(Duration::ZERO),
                    token: token(e.mod_revision),
                    holder: Some(self.me),
                })
            }
            _ => None,
        }
    }

    fn grant(&self, req: u64, ttl: i64, rev: i64) -> Message {
        Message::LeaseReply {
            req,
            granted: Some(secs(ttl)),
            token: token(rev),
            holder: Some(self.me),
        }
    }

    /// A refusal stating the key as it is. A value this code did not write
    /// names no holder: the site only learns the token.
    fn refusal(&mut self, req: u64, e: Option<&Entry>) -> Message {
        match e {
            None => LeaseReply::refused(req, 0, None),
            Some(e) => {
                self.seen = self.seen.max(e.mod_revision);
                LeaseReply::refused(req, e.mod_revision, decode(&e.value).map(|(h, _)| h))
            }
        }
    }
}

struct LeaseReply;

impl LeaseReply {
    fn refused(req: u64, rev: i64, holder: Option<SiteId>) -> Message {
        Message::LeaseReply {
            req,
            granted: None,
            token: token(rev),
            holder,
        }
    }
}
