//! DNS dynamic update (RFC 2136) signed with TSIG (RFC 8945), on hickory
//! 0.26: `hickory-proto` builds the message and signs it (`TSigner`),
//! `hickory-net` carries it over TCP (`TcpClientStream` + `DnsMultiplexer`
//! with the signer, which also verifies the TSIG of the response).
//!
//! One UPDATE message replaces the A and AAAA RRsets of every given name
//! with the given address, so a takeover moves all of a VM's names at once
//! or none of them (RFC 2136 section 3.7: an UPDATE is atomic).

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use hickory_net::client::Client;
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::xfer::{DnsHandle, DnsMultiplexer, FirstAnswer};
use hickory_proto::op::{
    DnsRequest, DnsRequestOptions, Message, OpCode, Query, ResponseCode, UpdateMessage,
};
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
        ResponseCode::NotAuth => "server not authoritative for the zone, or the TSIG key was not accepted",
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
    /// signed UPDATE. Fails with a clear error on any non-NOERROR answer.
    pub async fn update(&self, records: &[RecordUpdate]) -> Result<(), DnsError> {
        let message = self.build_message(records)?;
        let server = self.server;
        let timeout = self.timeout;
        let work = async {
            let provider = TokioRuntimeProvider::default();
            let (connect, handle) =
                TcpClientStream::new(server, None, Some(timeout), provider);
            let stream = match connect.await {
                Ok(s) => s,
                Err(e) => {
                    return Err(DnsError::Transport {
                        server,
                        detail: format!("connect: {e}"),
                    })
                }
            };
            let mux = DnsMultiplexer::new(stream, handle)
                .with_timeout(timeout)
                .with_signer(self.signer.clone());
            let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(mux);
            let bg = tokio::spawn(bg);
            let mut opts = DnsRequestOptions::default();
            opts.use_edns = false;
            let res = client.send(DnsRequest::new(message, opts)).first_answer().await;
            bg.abort();
            Ok(res)
        };
        let res = match tokio::time::timeout(timeout + Duration::from_secs(1), work).await {
            Err(_) => return Err(DnsError::Timeout { server, timeout }),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(r)) => r,
        };
        match res {
            Ok(resp) => {
                let rc = resp.metadata.response_code;
                if rc == ResponseCode::NoError {
                    Ok(())
                } else {
                    Err(DnsError::Rejected {
                        server,
                        rcode: rc.to_string(),
                        hint: rcode_hint(rc),
                    })
                }
            }
            Err(e) => Err(classify(server, timeout, e)),
        }
    }
}

fn classify(
    server: std::net::SocketAddr,
    timeout: Duration,
    e: hickory_net::NetError,
) -> DnsError {
    use hickory_net::{DnsError as HD, NetError as N};
    match e {
        N::Dns(HD::ResponseCode(rc)) => DnsError::Rejected {
            server,
            rcode: rc.to_string(),
            hint: rcode_hint(rc),
        },
        N::Timeout => DnsError::Timeout { server, timeout },
        other => {
            let detail = other.to_string();
            let lower = detail.to_lowercase();
            if lower.contains("tsig") || lower.contains("sig") || lower.contains("badkey") {
                DnsError::BadTsig { server, detail }
            } else {
                DnsError::Transport { server, detail }
            }
        }
    }
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
