//! etcd as the arbiter, through a real three-member etcd cluster on
//! loopback: two sites' etcd links (the same code `protect` and `standby`
//! run) are asked what a `failover::Site` asks the witness, and must answer
//! under the witness's rules: grant, renewal under the same token, refusal
//! to the other site while the lease lives, a handover that moves the lease
//! (and that the new holder's link notices by itself), a takeover only once
//! the holder's lease has run out on etcd, under a larger token. Killing
//! one member changes nothing.
//!
//! Needs Debian's etcd-server and etcd-client packages (`cargo xtask
//! deps`); fails with a clear message without them unless
//! REMUS_WAN_ALLOW_SKIP=1.

#![cfg(feature = "etcd")]

#[path = "support/etcd.rs"]
mod etcd_cluster;
mod support;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_cluster::{require_etcd, ClusterTls, EtcdCluster};
use failover::{Message, SiteId};
use remus_wan::arbiter::etcd::EtcdLink;
use remus_wan::arbiter::link::{self, LinkKind};
use tokio::sync::mpsc;

const A: SiteId = SiteId(1);
const B: SiteId = SiteId(2);
const WITNESS: SiteId = SiteId(0);
const TTL: Duration = Duration::from_secs(2);

type Reply = (Option<Duration>, u64, Option<SiteId>);

/// One site's etcd link, driven as its `Site` would drive it.
struct SiteLink {
    tx: mpsc::UnboundedSender<Message>,
    rx: mpsc::UnboundedReceiver<(SiteId, Message)>,
    req: u64,
    /// Unsolicited grants (a handover to this site), as they came.
    unsolicited: Vec<Reply>,
}

impl SiteLink {
    fn new(me: SiteId, endpoints: Vec<String>, vm: &str) -> Self {
        Self::with_tls(me, endpoints, vm, None, None)
    }

    /// `ca`: to verify the members; `client`: this site's certificate and
    /// key.
    fn with_tls(
        me: SiteId,
        endpoints: Vec<String>,
        vm: &str,
        ca: Option<PathBuf>,
        client: Option<(PathBuf, PathBuf)>,
    ) -> Self {
        let (inbox, rx) = mpsc::unbounded_channel();
        let (cert, key) = client.unzip();
        let tx = link::spawn(
            LinkKind::Etcd {
                link: EtcdLink {
                    endpoints,
                    ca,
                    cert,
                    key,
                    prefix: "/remus-wan-test".into(),
                    ttl_secs: TTL.as_secs() as i64,
                    op_timeout: Duration::from_secs(1),
                },
                me,
            },
            vm.to_owned(),
            WITNESS,
            inbox,
            Arc::new(AtomicBool::new(false)),
            Duration::from_millis(200),
        );
        Self {
            tx,
            rx,
            req: 0,
            unsolicited: Vec::new(),
        }
    }

    /// Sends `msg` (numbered here) and waits for its reply, up to 5 s.
    async fn ask(&mut self, make: impl FnOnce(u64) -> Message) -> Option<Reply> {
        self.req += 1;
        let req = self.req;
        self.tx.send(make(req)).expect("link running");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = tokio::time::timeout_at(deadline, self.rx.recv()).await;
            let Ok(Some((from, msg))) = got else {
                return None;
            };
            assert_eq!(from, WITNESS);
            let Message::LeaseReply {
                req: r,
                granted,
                token,
                holder,
            } = msg
            else {
                panic!("unexpected message {msg:?}");
            };
            if r == req {
                return Some((granted, token, holder));
            }
            if r == 0 {
                self.unsolicited.push((granted, token, holder));
            }
        }
    }

    async fn request(&mut self) -> Option<Reply> {
        self.ask(|req| Message::LeaseRequest { req, token: 0 })
            .await
    }

    /// Waits up to `limit` for an unsolicited grant.
    async fn unsolicited(&mut self, limit: Duration) -> Option<Reply> {
        if let Some(r) = self.unsolicited.pop() {
            return Some(r);
        }
        let deadline = tokio::time::Instant::now() + limit;
        while let Ok(Some((_, msg))) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if let Message::LeaseReply {
                req: 0,
                granted,
                token,
                holder,
            } = msg
            {
                return Some((granted, token, holder));
            }
        }
        None
    }
}

#[test]
fn lease_rules_through_a_three_member_cluster() {
    if !require_etcd("etcd_arbiter") {
        return;
    }
    // The links' warnings (etcd errors, timeouts) in the test's output.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("remus_wan=debug")
        .with_test_writer()
        .try_init();
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cluster = EtcdCluster::start(tmp.path());
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = rt.block_on(scenario(&mut cluster));
    if let Err(e) = result {
        panic!("{e}\n{}", cluster.logs());
    }
}

async fn scenario(cluster: &mut EtcdCluster) -> Result<(), String> {
    let mut a = SiteLink::new(A, cluster.endpoints(), "web1");
    let mut b = SiteLink::new(B, cluster.endpoints(), "web1");

    // Grant, then renewal under the same token.
    let (g, t1, h) = a
        .request()
        .await
        .ok_or("A: no answer to its first request")?;
    check(
        g == Some(TTL) && h == Some(A) && t1 > 0,
        "A granted",
        (g, t1, h),
    )?;
    let r = a.request().await.ok_or("A: no answer to its renewal")?;
    check(r == (Some(TTL), t1, Some(A)), "A renewed", r)?;
    // Refused to the other site, which learns holder and token.
    let r = b.request().await.ok_or("B: no answer")?;
    check(r == (None, t1, Some(A)), "B refused", r)?;

    // Kill a member that is not the leader: every renewal over two TTLs
    // still answers, under the same token.
    let leader = tokio::task::block_in_place(|| cluster.wait_leader(Duration::from_secs(10)))?;
    let victim = cluster
        .members
        .iter()
        .map(|m| m.name.clone())
        .find(|n| *n != leader)
        .ok_or("no follower")?;
    cluster.kill(&victim);
    let until = Instant::now() + 2 * TTL;
    let mut renewals = 0;
    while Instant::now() < until {
        let r = a
            .request()
            .await
            .ok_or("A: renewal unanswered with a member down")?;
        check(r == (Some(TTL), t1, Some(A)), "A renewed, a member down", r)?;
        renewals += 1;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    check(renewals >= 5, "renewals with a member down", renewals)?;
    let r = b.request().await.ok_or("B: no answer, a member down")?;
    check(r == (None, t1, Some(A)), "B refused, a member down", r)?;

    // Handover: refused under a stale token, then moves the lease to B,
    // whose link notices by itself; B renews under the new token.
    let r = a
        .ask(|req| Message::Handover {
            req,
            token: t1 - 1,
            to: B,
        })
        .await
        .ok_or("A: no answer to a stale handover")?;
    check(r == (None, t1, Some(A)), "stale handover refused", r)?;
    let (g, t2, h) = a
        .ask(|req| Message::Handover {
            req,
            token: t1,
            to: B,
        })
        .await
        .ok_or("A: no answer to its handover")?;
    check(
        g.is_none() && h == Some(B) && t2 > t1,
        "handover to B",
        (g, t2, h),
    )?;
    let u = b
        .unsolicited(Duration::from_secs(5))
        .await
        .ok_or("B's link did not notice the handover")?;
    check(
        u == (Some(Duration::ZERO), t2, Some(B)),
        "B told of the handover",
        u,
    )?;
    let r = b.request().await.ok_or("B: no answer to its renewal")?;
    check(
        r == (Some(TTL), t2, Some(B)),
        "B renews the handed-over lease",
        r,
    )?;
    let r = a.request().await.ok_or("A: no answer after the handover")?;
    check(r == (None, t2, Some(B)), "A refused after the handover", r)?;

    // Takeover after expiry: B stops renewing; A is refused until B's
    // lease has run out on etcd, then granted under a larger token, never
    // before B's last renewal was sent + the TTL.
    let b_last = Instant::now();
    let r = b
        .request()
        .await
        .ok_or("B: no answer to its last renewal")?;
    check(r.0 == Some(TTL), "B's last renewal", r)?;
    let mut refused = 0;
    let deadline = b_last + TTL + Duration::from_secs(5);
    let (granted_at, t3) = loop {
        if Instant::now() > deadline {
            return Err(format!("A never took over ({refused} refusals)"));
        }
        if let Some((g, t, h)) = a.request().await {
            if g.is_some() {
                check(h == Some(A), "takeover names A", h)?;
                break (Instant::now(), t);
            }
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    check(refused > 0, "A refused while B's lease lived", refused)?;
    check(
        granted_at >= b_last + TTL,
        "takeover only after B's lease ran out",
        granted_at - b_last,
    )?;
    check(t3 > t2, "the takeover's token is larger", (t2, t3))?;
    let r = b.request().await.ok_or("B: no answer after the takeover")?;
    check(r == (None, t3, Some(A)), "B refused after the takeover", r)?;
    Ok(())
}

/// Over https with client certificates (`--client-cert-auth`): a site
/// with the CA and its certificate is granted the lease; one without a
/// client certificate is answered nothing (etcd refuses it), nor one that
/// does not trust the members' CA.
#[test]
fn lease_over_tls_with_a_client_certificate() {
    if !require_etcd("etcd_arbiter") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let tls = ClusterTls::generate(&tmp.path().join("tls"));
    let cluster = EtcdCluster::start_with(&tmp.path().join("etcd"), Some(tls.clone()));
    let other = ClusterTls::generate(&tmp.path().join("other"));
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result: Result<(), String> = rt.block_on(async {
        let client = Some((tls.client_cert.clone(), tls.client_key.clone()));
        let mut a = SiteLink::with_tls(A, cluster.endpoints(), "db1", Some(tls.ca.clone()), client);
        let (g, t, h) = a
            .request()
            .await
            .ok_or("A (with a client certificate): no answer")?;
        check(
            g == Some(TTL) && h == Some(A) && t > 0,
            "A granted over TLS",
            (g, t, h),
        )?;
        let mut b = SiteLink::with_tls(B, cluster.endpoints(), "db1", Some(tls.ca.clone()), None);
        let r = b.request().await;
        check(r.is_none(), "no answer without a client certificate", r)?;
        let client = Some((other.client_cert.clone(), other.client_key.clone()));
        let mut b = SiteLink::with_tls(
            B,
            cluster.endpoints(),
            "db1",
            Some(other.ca.clone()),
            client,
        );
        let r = b.request().await;
        check(r.is_none(), "no answer with another CA", r)?;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}\n{}", cluster.logs());
    }
}

fn check(ok: bool, what: &str, got: impl std::fmt::Debug) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(format!("{what}: unexpected {got:?}"))
    }
}
