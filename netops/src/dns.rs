//! DNS dynamic update (RFC 2136) signed with TSIG (RFC 8945), on
//! `hickory-proto` 0.26 (feature `dnssec-ring`): it builds the UPDATE,
//! signs it with `TSigner` and verifies the signed answer with
//! `TSigVerifier`. The exchange itself is one DNS-over-TCP round trip of
//! our own (RFC 1035 4.2.2) rather than `hickory-net`'s multiplexer: that
//! multiplexer rejects an unsigned answer before the caller sees it, and
//! servers answer TSIG failures unsigned (RFC 8945 5.3.2), so the operator
//! would get "missing tsig" instead of "NOTAUTH / BADSIG".
//!
//! One UPDATE message replaces the A and AAAA RRsets of every given name
//! with the given address, so a takeover moves all of a VM's names at once
//! or none of them (RFC 2136 section 3.7: an UPDATE is atomic).

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, OpCode, Query, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType, TSigner};

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

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS update configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Secret(#[from] crate::config::SecretFileError),
    #[error("name {name:?} is not inside zone {zone:?}")]
    OutOfZone { name: String, zone: String },
    #[error("DNS server {server} refused the update: {rcode} ({hint})")]
    Rejected {
        server: std::net::SocketAddr,
        rcode: String,
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
    #[error("DNS update to {server} failed: {detail}")]
    Transport {
        server: std::net::SocketAddr,
        detail: String,
    },
}

fn rcode_hint(rc: ResponseCode) -> &'static str {
    match rc {
        ResponseCode::NotAuth => {
            "server not authoritative for the zone, or the TSIG key was not accepted"
        }
        ResponseCode::Refused => "the server's policy (ACL) does not allow this update",
        ResponseCode::NotZone => "a name is outside the zone",
        ResponseCode::ServFail => "server failure",
        ResponseCode::FormErr => "the server could not parse the update",
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
}

impl std::fmt::Debug for DnsUpdater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsUpdater")
            .field("server", &self.server)
            .field("zone", &self.zone)
            .field("key", self.signer.signer_name())
            .finish()
    }
}

fn fqdn(s: &str) -> Result<Name, DnsError> {
    let mut n =
        Name::from_str(s).map_err(|e| DnsError::Config(format!("invalid DNS name {s:?}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

impl DnsUpdater {
    /// Builds an updater from its parts; `secret` is the raw key bytes.
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
        })
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
        Self::new(
            s.server,
            &s.zone,
            &s.tsig_key_name,
            s.tsig_algorithm,
            secret,
            Duration::from_secs(s.timeout_s.max(1) as u64),
        )
    }

    /// The UPDATE message (unsigned; signing happens when it is sent).
    pub fn build_message(&self, records: &[RecordUpdate]) -> Result<Message, DnsError> {
        let mut zone = Query::new();
        zone.set_name(self.zone.clone())
            .set_query_class(DNSClass::IN)
            .set_query_type(RecordType::SOA);
        let mut message = Message::query();
        message.metadata.op_code = OpCode::Update;
        message.metadata.recursion_desired = false;
        message.add_zone(zone);
        for r in records {
            let name = fqdn(&r.name)?;
            if !self.zone.zone_of(&name) {
                return Err(DnsError::OutOfZone {
                    name: r.name.clone(),
                    zone: self.zone.to_string(),
                });
            }
            // RFC 2136 2.5.2: delete an RRset = class ANY, TTL 0, no RDATA.
            for t in [RecordType::A, RecordType::AAAA] {
                let mut del = Record::update0(name.clone(), 0, t).into_record_of_rdata();
                del.dns_class = DNSClass::ANY;
                message.add_update(del);
            }
            let rdata = match r.address {
                IpAddr::V4(a) => RData::A(A(a)),
                IpAddr::V6(a) => RData::AAAA(AAAA(a)),
            };
            let mut add = Record::from_rdata(name, r.ttl, rdata);
            add.dns_class = DNSClass::IN;
            message.add_update(add);
        }
        Ok(message)
    }

    /// Replaces the A/AAAA records of each name with its address, in one
    /// signed UPDATE. Fails with a clear error on any non-NOERROR answer;
    /// a NOERROR answer counts only if its TSIG verifies.
    pub async fn update(&self, records: &[RecordUpdate]) -> Result<(), DnsError> {
        let mut message = self.build_message(records)?;
        message.metadata.id = random_id();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let verifier = message
            .finalize(&self.signer, now)
            .map_err(|e| DnsError::Config(format!("signing the update: {e}")))?;
        let request = message
            .to_vec()
            .map_err(|e| DnsError::Config(format!("encoding the update: {e}")))?;
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
        if rc != ResponseCode::NoError {
            // Servers answer TSIG failures unsigned (RFC 8945 5.3.2) with the
            // TSIG error in the TSIG record: report both.
            let tsig_error = parsed
                .signature()
                .and_then(|t| t.data.error.as_ref().map(|e| format!("{e:?}")));
            return Err(match tsig_error {
                Some(te) => DnsError::BadTsig {
                    server,
                    detail: format!("server answered {rc} with TSIG error {te}"),
                },
                None => DnsError::Rejected {
                    server,
                    rcode: rc.to_string(),
                    hint: rcode_hint(rc),
                },
            });
        }
        match verifier {
            Some(mut v) => v
                .verify(&response)
                .map(|_| ())
                .map_err(|e| DnsError::BadTsig {
                    server,
                    detail: format!("the server's answer does not verify: {e}"),
                }),
            None => Err(DnsError::Config("the update was not signed".into())),
        }
    }
}

fn random_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u16
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

    #[test]
    fn message_replaces_both_families_and_checks_zone() {
        let u = DnsUpdater::new(
            "127.0.0.1:53".parse().unwrap(),
            "example.com",
            "k",
            TsigAlgorithm::HmacSha256,
            vec![1; 32],
            Duration::from_secs(1),
        )
        .unwrap();
        let m = u
            .build_message(&[RecordUpdate {
                name: "web1.example.com".into(),
                ttl: 30,
                address: "192.0.2.10".parse().unwrap(),
            }])
            .unwrap();
        assert_eq!(m.metadata.op_code, OpCode::Update);
        assert_eq!(m.updates().len(), 3);
        let e = u
            .build_message(&[RecordUpdate {
                name: "web1.example.net".into(),
                ttl: 30,
                address: "192.0.2.10".parse().unwrap(),
            }])
            .unwrap_err();
        assert!(matches!(e, DnsError::OutOfZone { .. }));
    }
}
