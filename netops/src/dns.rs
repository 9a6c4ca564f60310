//! DNS dynamic update (RFC 2136) signed with TSIG (RFC 8945), on
//! `hickory-proto` 0.26 (feature `dnssec-ring`): it builds the messages,
//! signs them with `TSigner` and verifies the signed answers with
//! `TSigVerifier`. Each exchange is one DNS-over-TCP round trip of our own
//! (RFC 1035 4.2.2) rather than `hickory-net`'s multiplexer: that
//! multiplexer rejects an unsigned answer before the caller sees it, and
//! servers answer TSIG failures unsigned (RFC 8945 5.3.2), so the operator
//! would get "missing tsig" instead of "NOTAUTH / BADSIG".
//!
//! One UPDATE message replaces the A and AAAA RRsets of every given name
//! with the given address, so a takeover moves all of a VM's names at once
//! or none of them (RFC 2136 section 3.7: an UPDATE is atomic).
//!
//! # Fencing: a stale site cannot overwrite a newer record
//!
//! Every name `N` has a fence record: a TXT RRset at `_remus-wan.N`
//! holding `remus-wan fencing-token=T site=S`, written in the same UPDATE
//! as `N`'s address. An update is a compare-and-swap:
//!
//! 1. read the fence TXT RRset of every name (a signed query);
//! 2. if one carries a token higher than ours, stop: [`DnsError::Stale`]
//!    (a site demoted since it decided to move the records);
//! 3. send the UPDATE with one prerequisite per name: "the TXT RRset is
//!    exactly what was read" (RFC 2136 2.4.2, value dependent) or "no TXT
//!    RRset" (2.4.3) when there was none; in the same message replace the
//!    A/AAAA RRsets and the fence TXT.
//!
//! If another site wrote in between, the server refuses the whole UPDATE
//! (NXRRSET / YXRRSET, [`DnsError::Conflict`]) and the updater reads
//! again: of two concurrent writers at most one wins each round, and a
//! lower token never replaces a higher one.
//!
//! # Retries
//!
//! [`DnsUpdater::update`] retries what may heal (no answer, connection
//! refused, SERVFAIL, a compare-and-swap conflict) with exponential
//! backoff ([`RetryPolicy`]), logging each failed attempt, and starts no
//! attempt after the policy's deadline. What retrying cannot fix (TSIG
//! errors, NOTAUTH, REFUSED, a stale token) is returned at once.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::{A, AAAA, TXT};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};
use tracing::{info, warn};

use crate::config::{read_secret, DnsSettings};

/// TSIG MAC algorithms we offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TsigAlgorithm {
    #[default]
    HmacSha256,
    HmacSha384,
    HmacSha512,
}

impl TsigAlgorithm {
    fn hickory(self) -> hickory_proto::rr::rdata::tsig::TsigAlgorithm {
        use hickory_proto::rr::rdata::tsig::TsigAlgorithm as H;
        match self {
            TsigAlgorithm::HmacSha256 => H::HmacSha256,
            TsigAlgorithm::HmacSha384 => H::HmacSha384,
            TsigAlgorithm::HmacSha512 => H::HmacSha512,
        }
    }
}

/// One record to point at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordUpdate {
    /// Fully qualified owner name inside the zone (`web1.example.com.`).
    pub name: String,
    pub ttl: u32,
    /// The new address: an A record for IPv4, AAAA for IPv6. The other
    /// type's RRset for the name is deleted.
    pub address: IpAddr,
}

/// Under which fencing token, and by which site, an update is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The witness lease's fencing token of the decision to move.
    pub token: u64,
    /// The site writing (shown in the fence record, for operators).
    pub site: String,
}

/// The label prepended to a name to make its fence record's owner.
pub const FENCE_LABEL: &str = "_remus-wan";

/// The owner name of `name`'s fence TXT record (`_remus-wan.web1.example.com.`).
pub fn fence_name(name: &str) -> String {
    let n = name.trim_end_matches('.');
    format!("{FENCE_LABEL}.{n}.")
}

/// The text of a fence record.
pub fn fence_text(fence: &Fence) -> String {
    format!(
        "remus-wan fencing-token={} site={}",
        fence.token, fence.site
    )
}

/// The token and site in a fence record's text, if it is one of ours.
pub fn parse_fence_text(text: &str) -> Option<(u64, Option<String>)> {
    let mut token = None;
    let mut site = None;
    for word in text.split_whitespace() {
        if let Some(t) = word.strip_prefix("fencing-token=") {
            token = t.parse().ok();
        } else if let Some(s) = word.strip_prefix("site=") {
            site = Some(s.to_owned());
        }
    }
    token.map(|t| (t, site))
}

/// The fence record of one name as read from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FenceRead {
    /// The fence record's owner (`_remus-wan.web1.example.com.`).
    pub owner: String,
    /// The TXT RRset found there (`None`: no such RRset).
    pub rrset: Option<Vec<TXT>>,
    /// The highest fencing token in it (`None`: no RRset, or none of its
    /// records is ours).
    pub token: Option<u64>,
    /// The site that wrote that token.
    pub site: Option<String>,
}

/// What the zone held at the fence records of a set of names, read before
/// an update: the update's prerequisites.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FenceState {
    pub names: Vec<FenceRead>,
}

impl FenceState {
    /// The first name whose record was written under a higher token.
    pub fn newer_than(&self, token: u64) -> Option<&FenceRead> {
        self.names
            .iter()
            .find(|f| f.token.is_some_and(|t| t > token))
    }
}

/// How [`DnsUpdater::update`] retries: exponential backoff from `initial`
/// (doubling, capped at `max`, with up to 25 % jitter), no attempt started
/// after `deadline` from the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    pub deadline: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(5),
            deadline: Duration::from_secs(60),
        }
    }
}

/// How a successful update went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateReport {
    /// Attempts made (1: the first one succeeded).
    pub attempts: u32,
    pub elapsed: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS update configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] crate::config::SecretFileError),
    #[error("name {name:?} is not inside zone {zone:?}")]
    OutOfZone { name: String, zone: String },
    #[error("DNS server {server} refused the {during}: {rcode} ({hint})")]
    Rejected {
        server: std::net::SocketAddr,
        /// `"update"` or `"query of the fence records"`.
        during: &'static str,
        rcode: String,
        /// The numeric RCODE (2 = SERVFAIL is retried).
        code: u16,
        hint: &'static str,
    },
    #[error("TSIG verification failed talking to {server}: {detail} (wrong key name, secret or algorithm, or clock skew)")]
    BadTsig {
        server: std::net::SocketAddr,
        detail: String,
    },
    #[error("no answer from DNS server {server} within {timeout:?}")]
    Timeout {
        server: std::net::SocketAddr,
        timeout: Duration,
    },
    #[error("DNS exchange with {server} failed: {detail}")]
    Transport {
        server: std::net::SocketAddr,
        detail: String,
    },
    #[error("{name} was written under fencing token {current}{} and this site's token {ours} is older: not overwriting it", .current_site.as_deref().map(|s| format!(" by site {s}")).unwrap_or_default())]
    Stale {
        /// The fence record's owner.
        name: String,
        current: u64,
        current_site: Option<String>,
        ours: u64,
    },
    #[error("the records at {server} changed between reading and updating them (prerequisite failed: {rcode})")]
    Conflict {
        server: std::net::SocketAddr,
        rcode: String,
    },
    #[error("DNS update gave up after {attempts} attempts in {:.1} s: {last}", .elapsed.as_secs_f64())]
    GaveUp {
        attempts: u32,
        elapsed: Duration,
        last: Box<DnsError>,
    },
}

impl DnsError {
    /// Whether trying again may succeed (no answer, connection refused,
    /// SERVFAIL, a compare-and-swap conflict).
    pub fn is_transient(&self) -> bool {
        match self {
            DnsError::Timeout { .. } | DnsError::Transport { .. } | DnsError::Conflict { .. } => {
                true
            }
            DnsError::Rejected { code, .. } => *code == u16::from(ResponseCode::ServFail),
            _ => false,
        }
    }
}

fn rcode_hint(rc: ResponseCode, during_query: bool) -> &'static str {
    match rc {
        ResponseCode::Refused if during_query => {
            "the server does not serve this zone, or its ACL refuses our queries"
        }
        ResponseCode::NotAuth => {
            "server not authoritative for the zone, or the TSIG key was not accepted"
        }
        ResponseCode::Refused => "the server's policy (ACL) does not allow this update",
        ResponseCode::NotZone => "a name is outside the zone",
        ResponseCode::ServFail => "server failure",
        ResponseCode::FormErr => "the server could not parse the message",
        ResponseCode::NotImp => "the server does not implement dynamic update",
        ResponseCode::BADSIG | ResponseCode::BADKEY | ResponseCode::BADTIME => {
            "TSIG rejected: check key name, secret, algorithm and clocks"
        }
        _ => "see the server log",
    }
}

/// Sends RFC 2136 updates for one zone.
#[derive(Clone)]
pub struct DnsUpdater {
    server: std::net::SocketAddr,
    zone: Name,
    signer: TSigner,
    timeout: Duration,
    retry: RetryPolicy,
}

impl std::fmt::Debug for DnsUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsUpdater")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("key", self.signer.signer_name())
            .field("retry", &self.retry)
            .finish()
    }
}

fn fqdn(s: &str) -> Result<Name, DnsError> {
    let mut n =
        Name::from_str(s).map_err(|e| DnsError::Config(format!("invalid DNS name {s:?}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl DnsUpdater {
    /// Builds an updater from its parts; `secret` is the raw key bytes.
    /// `timeout` bounds each exchange; retries follow
    /// [`RetryPolicy::default`] unless [`DnsUpdater::with_retry`] says
    /// otherwise.
    pub fn new(
        server: std::net::SocketAddr,
        zone: &str,
        key_name: &str,
        algorithm: TsigAlgorithm,
        secret: Vec<u8>,
        timeout: Duration,
    ) -> Result<Self, DnsError> {
        if secret.is_empty() {
            return Err(DnsError::Config("empty TSIG secret".into()));
        }
        let signer = TSigner::new(secret, algorithm.hickory(), fqdn(key_name)?, 300)
            .map_err(|e| DnsError::Config(format!("TSIG key {key_name:?}: {e}")))?;
        Ok(Self {
            server,
            zone: fqdn(zone)?,
            signer,
            timeout,
            retry: RetryPolicy::default(),
        })
    }

    /// The same updater with another retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Builds an updater from `[netops.dns]`, reading the base64 secret file.
    pub fn from_settings(s: &DnsSettings) -> Result<Self, DnsError> {
        let b64 = read_secret(&s.tsig_secret_file, "the TSIG secret")?;
        let secret = decode_base64(b64.trim()).ok_or_else(|| {
            DnsError::Config(format!(
                "TSIG secret in {} is not valid base64",
                s.tsig_secret_file.display()
            ))
        })?;
        Ok(Self::new(
            s.server,
            &s.zone,
            &s.tsig_key_name,
            s.tsig_algorithm,
            secret,
            Duration::from_secs(s.timeout_s.max(1) as u64),
        )?
        .with_retry(RetryPolicy {
            deadline: Duration::from_secs(s.retry_deadline_s as u64),
            ..RetryPolicy::default()
        }))
    }

    fn in_zone(&self, name: &str) -> Result<Name, DnsError> {
        let n = fqdn(name)?;
        if !self.zone.zone_of(&n) {
            return Err(DnsError::OutOfZone {
                name: name.to_owned(),
                zone: self.zone.to_string(),
            });
        }
        Ok(n)
    }

    /// The distinct fence owners of `records`, in order.
    fn fence_owners(&self, records: &[RecordUpdate]) -> Result<Vec<Name>, DnsError> {
        let mut owners: Vec<Name> = Vec::new();
        for r in records {
            self.in_zone(&r.name)?;
            let owner = fqdn(&fence_name(&r.name))?;
            if !owners.contains(&owner) {
                owners.push(owner);
            }
        }
        Ok(owners)
    }

    /// The UPDATE message (unsigned; signing happens when it is sent):
    /// prerequisites from `seen`, then the A/AAAA and fence TXT RRsets of
    /// every name replaced.
    pub fn build_message(
        &self,
        records: &[RecordUpdate],
        fence: &Fence,
        seen: &FenceState,
    ) -> Result<Message, DnsError> {
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        let mut message = Message::query();
        message.metadata.op_code = OpCode::Update;
        message.metadata.recursion_desired = false;
        message.add_zone(zone);
        for owner in self.fence_owners(records)? {
            let read = seen
                .names
                .iter()
                .find(|f| fqdn(&f.owner).is_ok_and(|n| n == owner))
                .ok_or_else(|| {
                    DnsError::Config(format!("fence record {owner} was not read before updating"))
                })?;
            match &read.rrset {
                // RFC 2136 2.4.3: RRset does not exist = class NONE, TTL 0,
                // no RDATA.
                None => {
                    let mut pre =
                        Record::update0(owner.clone(), 0, RecordType::TXT).into_record_of_rdata();
                    pre.dns_class = DNSClass::NONE;
                    message.add_pre_requisite(pre);
                }
                // RFC 2136 2.4.2: RRset exists (value dependent) = the whole
                // RRset, class of the zone, TTL 0.
                Some(rrset) => {
                    for txt in rrset {
                        let mut pre = Record::from_rdata(owner.clone(), 0, RData::TXT(txt.clone()));
                        pre.dns_class = DNSClass::IN;
                        message.add_pre_requisite(pre);
                    }
                }
            }
        }
        // RFC 2136 2.5.2: delete an RRset = class ANY, TTL 0, no RDATA.
        // All deletions first, so that two records of one name both stay.
        let mut deleted: Vec<Name> = Vec::new();
        for r in records {
            let name = self.in_zone(&r.name)?;
            if deleted.contains(&name) {
                continue;
            }
            let owner = fqdn(&fence_name(&r.name))?;
            for (n, t) in [
                (&name, RecordType::A),
                (&name, RecordType::AAAA),
                (&owner, RecordType::TXT),
            ] {
                let mut del = Record::update0(n.clone(), 0, t).into_record_of_rdata();
                del.dns_class = DNSClass::ANY;
                message.add_update(del);
            }
            deleted.push(name);
        }
        let mut fenced: Vec<Name> = Vec::new();
        for r in records {
            let name = self.in_zone(&r.name)?;
            let rdata = match r.address {
                IpAddr::V4(a) => RData::A(A(a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(a)),
            };
            let mut add = Record::from_rdata(name, r.ttl, rdata);
            add.dns_class = DNSClass::IN;
            message.add_update(add);
            let owner = fqdn(&fence_name(&r.name))?;
            if !fenced.contains(&owner) {
                let mut txt = Record::from_rdata(
                    owner.clone(),
                    r.ttl,
                    RData::TXT(TXT::new(vec![fence_text(fence)])),
                );
                txt.dns_class = DNSClass::IN;
                message.add_update(txt);
                fenced.push(owner);
            }
        }
        Ok(message)
    }

    /// Reads the fence records of `records`' names (one signed query per
    /// name; one attempt).
    pub async fn read_fences(&self, records: &[RecordUpdate]) -> Result<FenceState, DnsError> {
        let mut names = Vec::new();
        for owner in self.fence_owners(records)? {
            let mut q = Query::new();
            q.set_name(owner.clone())
                .set_query_class(DNSClass::IN)
                .set_query_type(RecordType::TXT);
            let mut message = Message::query();
            message.metadata.recursion_desired = false;
            message.add_query(q);
            let answer = self.exchange(message, "query of the fence records").await?;
            let rc = answer.metadata.response_code;
            let rrset: Vec<TXT> = answer
                .answers
                .iter()
                .filter(|r| r.name == owner)
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(t.clone()),
                    _ => None,
                })
                .collect();
            if rc != ResponseCode::NoError && rc != ResponseCode::NXDomain {
                return Err(self.rejected(rc, "query of the fence records"));
            }
            let mut best: Option<(u64, Option<String>)> = None;
            for t in &rrset {
                let text: String = t
                    .txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s))
                    .collect();
                match parse_fence_text(&text) {
                    Some((tok, site)) if best.as_ref().is_none_or(|(b, _)| tok > *b) => {
                        best = Some((tok, site))
                    }
                    Some(_) => {}
                    None => {
                        warn!(owner = %owner, text, "fence record holds a TXT that is not remus-wan's: it will be replaced")
                    }
                }
            }
            let (token, site) = best.map_or((None, None), |(t, s)| (Some(t), s));
            names.push(FenceRead {
                owner: owner.to_string(),
                rrset: (!rrset.is_empty()).then_some(rrset),
                token,
                site,
            });
        }
        Ok(FenceState { names })
    }

    /// One compare-and-swap UPDATE against what `seen` holds (one attempt;
    /// no read). A prerequisite that no longer holds is
    /// [`DnsError::Conflict`].
    pub async fn update_once(
        &self,
        records: &[RecordUpdate],
        fence: &Fence,
        seen: &FenceState,
    ) -> Result<(), DnsError> {
        if let Some(newer) = seen.newer_than(fence.token) {
            return Err(DnsError::Stale {
                name: newer.owner.clone(),
                current: newer.token.unwrap_or_default(),
                current_site: newer.site.clone(),
                ours: fence.token,
            });
        }
        let message = self.build_message(records, fence, seen)?;
        let answer = self.exchange(message, "update").await?;
        match answer.metadata.response_code {
            ResponseCode::NoError => Ok(()),
            rc @ (ResponseCode::NXRRSet | ResponseCode::YXRRSet) => Err(DnsError::Conflict {
                server: self.server,
                rcode: rc.to_string(),
            }),
            rc => Err(self.rejected(rc, "update")),
        }
    }

    /// Reads the fence records and replaces the A/AAAA records of each name
    /// with its address in one signed compare-and-swap UPDATE, retrying
    /// what may heal (see the module documentation). Refuses with
    /// [`DnsError::Stale`] when a name was written under a newer token.
    pub async fn update(
        &self,
        records: &[RecordUpdate],
        fence: &Fence,
    ) -> Result<UpdateReport, DnsError> {
        let start = Instant::now();
        let mut backoff = self.retry.initial;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = async {
                let seen = self.read_fences(records).await?;
                self.update_once(records, fence, &seen).await
            }
            .await;
            let e = match result {
                Ok(()) => {
                    let report = UpdateReport {
                        attempts,
                        elapsed: start.elapsed(),
                    };
                    if attempts > 1 {
                        info!(server = %self.server, attempts, ms = report.elapsed.as_millis() as u64, token = fence.token, "DNS update succeeded after retrying");
                    }
                    return Ok(report);
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => e,
            };
            let elapsed = start.elapsed();
            let left = self.retry.deadline.saturating_sub(elapsed);
            if left.is_zero() {
                warn!(server = %self.server, attempts, error = %e, "DNS update: giving up, retry deadline reached");
                return Err(DnsError::GaveUp {
                    attempts,
                    elapsed,
                    last: Box::new(e),
                });
            }
            // Up to 25 % jitter, so that two sites in conflict drift apart.
            let jitter = backoff.mul_f64((random_u64() % 1024) as f64 / 4096.0);
            let wait = (backoff + jitter).min(left);
            warn!(server = %self.server, attempt = attempts, error = %e, retry_in_ms = wait.as_millis() as u64, "DNS update failed; retrying");
            tokio::time::sleep(wait).await;
            backoff = (backoff * 2).min(self.retry.max);
        }
    }

    fn rejected(&self, rc: ResponseCode, during: &'static str) -> DnsError {
        DnsError::Rejected {
            server: self.server,
            during,
            rcode: rc.to_string(),
            code: u16::from(rc),
            hint: rcode_hint(rc, during != "update"),
        }
    }

    /// Signs `message`, sends it, and returns the parsed answer once its
    /// TSIG verifies. Answers the server could not sign (TSIG errors,
    /// RFC 8945 5.3.2) and other failures other than NXDOMAIN, YXRRSET
    /// and NXRRSET are returned as errors without verification: nothing
    /// is decided on them.
    async fn exchange(
        &self,
        mut message: Message,
        during: &'static str,
    ) -> Result<Message, DnsError> {
        message.metadata.id = random_u64() as u16;
        let verifier = message
            .finalize(&self.signer, unix_now())
            .map_err(|e| DnsError::Config(format!("signing the {during}: {e}")))?;
        let request = message
            .to_vec()
            .map_err(|e| DnsError::Config(format!("encoding the {during}: {e}")))?;
        let server = self.server;
        let timeout = self.timeout;
        let response = match tokio::time::timeout(timeout, exchange_tcp(server, &request)).await {
            Err(_) => return Err(DnsError::Timeout { server, timeout }),
            Ok(Err(e)) => {
                return Err(DnsError::Transport {
                    server,
                    detail: e.to_string(),
                })
            }
            Ok(Ok(r)) => r,
        };
        let parsed = Message::from_vec(&response).map_err(|e| DnsError::Transport {
            server,
            detail: format!("unparsable response: {e}"),
        })?;
        if parsed.metadata.id != message.metadata.id {
            return Err(DnsError::Transport {
                server,
                detail: "response id does not match the request".into(),
            });
        }
        let rc = parsed.metadata.response_code;
        // Servers answer TSIG failures unsigned (RFC 8945 5.3.2) with the
        // TSIG error in the TSIG record: report both.
        if let Some(te) = parsed
            .signature()
            .and_then(|t| t.data.error.as_ref().map(|e| format!("{e:?}")))
        {
            return Err(DnsError::BadTsig {
                server,
                detail: format!("server answered {rc} with TSIG error {te}"),
            });
        }
        let decisive = matches!(
            rc,
            ResponseCode::NoError
                | ResponseCode::NXDomain
                | ResponseCode::NXRRSet
                | ResponseCode::YXRRSet
        );
        if !decisive {
            return Err(self.rejected(rc, during));
        }
        match verifier {
            Some(mut v) => v
                .verify(&response)
                .map(|_| parsed)
                .map_err(|e| DnsError::BadTsig {
                    server,
                    detail: format!("the server's answer does not verify: {e}"),
                }),
            None => Err(DnsError::Config(format!("the {during} was not signed"))),
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// One DNS exchange over TCP (RFC 1035 4.2.2: two-octet length prefix).
async fn exchange_tcp(server: std::net::SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(server).await?;
    let len = u16::try_from(request.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "update too large"))?;
    let mut out = Vec::with_capacity(request.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(request);
    s.write_all(&out).await?;
    let mut l = [0u8; 2];
    s.read_exact(&mut l).await?;
    let mut resp = vec![0u8; u16::from_be_bytes(l) as usize];
    s.read_exact(&mut resp).await?;
    Ok(resp)
}

/// Standard base64 (with or without padding).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding (used by tests to write key files).
pub fn encode_base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = chunk.len();
        let v = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= n {
                out.push(T[((v >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip() {
        for n in 0..40u8 {
            let data: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37)).collect();
            assert_eq!(decode_base64(&encode_base64(&data)).unwrap(), data);
        }
        assert!(decode_base64("a*b").is_none());
    }

    fn updater() -> DnsUpdater {
        DnsUpdater::new(
            "127.0.0.1:53".parse().unwrap(),
            "example.com",
            "k",
            TsigAlgorithm::HmacSha256,
            vec![1; 32],
            Duration::from_secs(1),
        )
        .unwrap()
    }

    fn web1(address: &str) -> RecordUpdate {
        RecordUpdate {
            name: "web1.example.com".into(),
            ttl: 30,
            address: address.parse().unwrap(),
        }
    }

    fn fence(token: u64) -> Fence {
        Fence {
            token,
            site: "dc2".into(),
        }
    }

    #[test]
    fn message_replaces_both_families_and_the_fence_and_checks_zone() {
        let u = updater();
        let absent = FenceState {
            names: vec![FenceRead {
                owner: "_remus-wan.web1.example.com.".into(),
                rrset: None,
                token: None,
                site: None,
            }],
        };
        let m = u
            .build_message(&[web1("192.0.2.10")], &fence(7), &absent)
            .unwrap();
        assert_eq!(m.metadata.op_code, OpCode::Update);
        // Prerequisite: no fence TXT yet (RFC 2136 2.4.3).
        assert_eq!(m.prerequisites().len(), 1);
        assert_eq!(m.prerequisites()[0].dns_class, DNSClass::NONE);
        assert_eq!(m.prerequisites()[0].record_type(), RecordType::TXT);
        // Delete A, AAAA, fence TXT; add A and the fence TXT.
        assert_eq!(m.updates().len(), 5);
        let txt = m
            .updates()
            .iter()
            .find_map(|r| match &r.data {
                RData::TXT(t) => Some(String::from_utf8_lossy(&t.txt_data[0]).into_owned()),
                _ => None,
            })
            .unwrap();
        assert_eq!(txt, "remus-wan fencing-token=7 site=dc2");
        assert_eq!(parse_fence_text(&txt), Some((7, Some("dc2".into()))));

        // Value-dependent prerequisite on what was read (RFC 2136 2.4.2).
        let seen = FenceState {
            names: vec![FenceRead {
                owner: "_remus-wan.web1.example.com.".into(),
                rrset: Some(vec![TXT::new(vec![fence_text(&fence(5))])]),
                token: Some(5),
                site: Some("dc2".into()),
            }],
        };
        let m = u
            .build_message(&[web1("192.0.2.10")], &fence(7), &seen)
            .unwrap();
        assert_eq!(m.prerequisites().len(), 1);
        assert_eq!(m.prerequisites()[0].dns_class, DNSClass::IN);
        assert_eq!(m.prerequisites()[0].ttl, 0);

        let e = u
            .build_message(
                &[RecordUpdate {
                    name: "web1.example.net".into(),
                    ttl: 30,
                    address: "192.0.2.10".parse().unwrap(),
                }],
                &fence(7),
                &absent,
            )
            .unwrap_err();
        assert!(matches!(e, DnsError::OutOfZone { .. }));
    }

    #[tokio::test]
    async fn an_older_token_is_refused_before_anything_is_sent() {
        let seen = FenceState {
            names: vec![FenceRead {
                owner: "_remus-wan.web1.example.com.".into(),
                rrset: Some(vec![TXT::new(vec![fence_text(&fence(9))])]),
                token: Some(9),
                site: Some("dc1".into()),
            }],
        };
        let e = updater()
            .update_once(&[web1("192.0.2.10")], &fence(8), &seen)
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                DnsError::Stale {
                    current: 9,
                    ours: 8,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!e.is_transient());
        assert!(e.to_string().contains("by site dc1"), "{e}");
    }

    #[tokio::test]
    async fn retries_stop_at_the_deadline() {
        // A port nobody listens on: connection refused, retried.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let u = DnsUpdater::new(
            ([127, 0, 0, 1], port).into(),
            "example.com",
            "k",
            TsigAlgorithm::HmacSha256,
            vec![1; 32],
            Duration::from_secs(1),
        )
        .unwrap()
        .with_retry(RetryPolicy {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(80),
            deadline: Duration::from_millis(400),
        });
        let start = Instant::now();
        let e = u
            .update(&[web1("192.0.2.10")], &fence(1))
            .await
            .unwrap_err();
        let DnsError::GaveUp { attempts, last, .. } = &e else {
            panic!("{e:?}");
        };
        assert!(*attempts >= 3, "{e}");
        assert!(matches!(**last, DnsError::Transport { .. }), "{e}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }
}
