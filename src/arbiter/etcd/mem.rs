//! An in-memory etcd for the rules' tests: keys with revisions, leases
//! that expire on a simulated clock (deleting their keys, as etcd's leader
//! does), a minimum TTL, and clients that can be cut off.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::rules::{Entry, Kv};

#[derive(Debug)]
pub struct MemEtcd {
    pub now: Instant,
    pub rev: i64,
    next_lease: i64,
    pub min_ttl: i64,
    kv: BTreeMap<String, Entry>,
    /// Lease id -> (TTL, expiry).
    leases: BTreeMap<i64, (i64, Instant)>,
}

impl MemEtcd {
    pub fn new(now: Instant) -> Self {
        Self {
            now,
            rev: 1,
            next_lease: 100,
            min_ttl: 2,
            kv: BTreeMap::new(),
            leases: BTreeMap::new(),
        }
    }

    /// Moves the clock; expired leases delete their keys, each delete a
    /// new revision.
    pub fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, (_, exp))| *exp <= self.now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.drop_lease(id);
        }
    }

    fn drop_lease(&mut self, id: i64) {
        self.leases.remove(&id);
        let keys: Vec<String> = self
            .kv
            .iter()
            .filter(|(_, e)| e.lease == id)
            .map(|(k, _)| k.clone())
            .collect();
        for k in keys {
            self.rev += 1;
            self.kv.remove(&k);
        }
    }

    /// Another party's write: `key` = `value` on a new lease of `ttl` s.
    pub fn put_new(&mut self, key: &str, value: Vec<u8>, ttl: i64) -> i64 {
        self.next_lease += 1;
        let id = self.next_lease;
        let exp = self.now + Duration::from_secs(ttl as u64);
        self.leases.insert(id, (ttl, exp));
        self.rev += 1;
        self.kv.insert(
            key.to_owned(),
            Entry {
                value,
                mod_revision: self.rev,
                lease: id,
            },
        );
        self.rev
    }

    pub fn entry(&self, key: &str) -> Option<Entry> {
        self.kv.get(key).cloned()
    }

    /// How many etcd leases exist.
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// When `lease` runs out, if it exists.
    pub fn expiry(&self, lease: i64) -> Option<Instant> {
        self.leases.get(&lease).map(|(_, e)| *e)
    }
}

/// What another party does to etcd between two operations of a client
/// (a race), run once before the client's next operation of that kind.
pub type Interloper = Box<dyn FnOnce(&mut MemEtcd)>;

/// One site's connection to the shared [`MemEtcd`].
#[derive(Clone)]
pub struct MemClient {
    pub etcd: Rc<RefCell<MemEtcd>>,
    pub up: Rc<Cell<bool>>,
    /// Runs just before this client's next conditional put.
    pub before_put: Rc<RefCell<Option<Interloper>>>,
    /// Runs just before this client's next keep-alive.
    pub before_keep_alive: Rc<RefCell<Option<Interloper>>>,
}

impl MemClient {
    pub fn new(etcd: Rc<RefCell<MemEtcd>>) -> Self {
        Self {
            etcd,
            up: Rc::new(Cell::new(true)),
            before_put: Rc::default(),
            before_keep_alive: Rc::default(),
        }
    }

    fn interlope(&self, hook: &RefCell<Option<Interloper>>) {
        if let Some(f) = hook.borrow_mut().take() {
            f(&mut self.etcd.borrow_mut());
        }
    }

    fn reach(&self) -> Result<std::cell::RefMut<'_, MemEtcd>, &'static str> {
        if !self.up.get() {
            return Err("etcd unreachable");
        }
        let mut e = self.etcd.borrow_mut();
        let now = e.now;
        e.advance(now);
        Ok(e)
    }
}

impl Kv for MemClient {
    type Error = &'static str;

    async fn get(&mut self, key: &str) -> Result<Option<Entry>, Self::Error> {
        Ok(self.reach()?.entry(key))
    }

    async fn grant(&mut self, ttl: i64) -> Result<(i64, i64), Self::Error> {
        let mut e = self.reach()?;
        let ttl = ttl.max(e.min_ttl);
        e.next_lease += 1;
        let id = e.next_lease;
        let exp = e.now + Duration::from_secs(ttl as u64);
        e.leases.insert(id, (ttl, exp));
        Ok((id, ttl))
    }

    async fn keep_alive(&mut self, lease: i64) -> Result<i64, Self::Error> {
        self.interlope(&self.before_keep_alive);
        let mut e = self.reach()?;
        let now = e.now;
        match e.leases.get_mut(&lease) {
            Some((ttl, exp)) => {
                *exp = now + Duration::from_secs(*ttl as u64);
                Ok(*ttl)
            }
            None => Ok(0),
        }
    }

    async fn revoke(&mut self, lease: i64) -> Result<(), Self::Error> {
        self.reach()?.drop_lease(lease);
        Ok(())
    }

    async fn put_if(
        &mut self,
        key: &str,
        expect: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Result<i64, Option<Entry>>, Self::Error> {
        self.interlope(&self.before_put);
        let mut e = self.reach()?;
        let cur = e.entry(key);
        if cur.as_ref().map_or(0, |c| c.mod_revision) != expect {
            return Ok(Err(cur));
        }
        if !e.leases.contains_key(&lease) {
            // etcd refuses a put on a lease it does not know.
            return Err("lease not found");
        }
        e.rev += 1;
        let rev = e.rev;
        e.kv.insert(
            key.to_owned(),
            Entry {
                value,
                mod_revision: rev,
                lease,
            },
        );
        Ok(Ok(rev))
    }
}

/// Runs a future that never waits (the in-memory client's) to its end.
pub fn now_or_never<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("the in-memory etcd never waits"),
    }
}
