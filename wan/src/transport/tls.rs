//! Mutual TLS between sites: the site CA, this site's certificate and key,
//! and the checks made on the peer's certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use tracing::warn;

use super::TransportError;

/// Where a site's TLS material lives (as written by `remus-wan certs init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPaths {
    /// The site CA certificate (`ca.pem`).
    pub ca: PathBuf,
    /// This site's certificate (`<site>.pem`), signed by the CA.
    pub cert: PathBuf,
    /// This site's PKCS#8 private key (`<site>.key`).
    pub key: PathBuf,
}

impl TlsPaths {
    /// `dir/ca.pem`, `dir/<site>.pem`, `dir/<site>.key`.
    pub fn in_dir(dir: impl AsRef<Path>, site: &str) -> Self {
        let dir = dir.as_ref();
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{site}.pem")),
            key: dir.join(format!("{site}.key")),
        }
    }
}

/// Loaded TLS material.
#[derive(Clone)]
pub struct Identity {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("roots", &self.roots.len())
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::ReadFile {
        what,
        path: path.to_owned(),
        source,
    })
}

fn pem_err(path: &Path, what: &'static str, e: impl fmt::Display) -> TransportError {
    TransportError::Pem {
        what,
        path: path.to_owned(),
        message: e.to_string(),
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Identity {
    /// Reads and checks the CA, certificate and key.
    pub fn load(paths: &TlsPaths) -> Result<Self, TransportError> {
        let ca_pem = read(&paths.ca, "site CA certificate")?;
        let mut roots = RootCertStore::empty();
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&ca_pem) {
            let c = c.map_err(|e| pem_err(&paths.ca, "site CA certificate", e))?;
            roots
                .add(c)
                .map_err(|e| pem_err(&paths.ca, "site CA certificate", e))?;
            n += 1;
        }
        if n == 0 {
            return Err(pem_err(
                &paths.ca,
                "site CA certificate",
                "no CERTIFICATE block",
            ));
        }
        let cert_pem = read(&paths.cert, "site certificate")?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(&paths.cert, "site certificate", e))?;
        if chain.is_empty() {
            return Err(pem_err(
                &paths.cert,
                "site certificate",
                "no CERTIFICATE block",
            ));
        }
        let key_pem = read(&paths.key, "site private key")?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| pem_err(&paths.key, "site private key", e))?;
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
        })
    }

    /// Server side: requires a client certificate chaining to the site CA
    /// and, when `allowed_clients` is not empty, naming one of those sites.
    pub fn server_config(
        &self,
        allowed_clients: &[String],
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ServerConfig, TransportError> {
        let inner = WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .build()
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?;
        let verifier = Arc::new(SiteClientVerifier {
            inner,
            allowed: allowed_clients.to_vec(),
        });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TransportError::TlsConfig(format!("site certificate/key: {e}")))?;
        cfg.alpn_protocols = alpn;
        cfg.max_early_data_size = 0;
        Ok(cfg)
    }

    /// Client side: the server must chain to the site CA and carry the peer
    /// site's name (checked against the name given when connecting).
    pub fn client_config(
        &self,
        alpn: Vec<Vec<u8>>,
    ) -> Result<rustls::ClientConfig, TransportError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| TransportError::TlsConfig(e.to_string()))?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| TransportError::TlsConfig(format!("site certificate/key: {e}")))?;
        cfg.alpn_protocols = alpn;
        cfg.enable_early_data = false;
        Ok(cfg)
    }
}

/// The server name a peer site's certificate must carry.
pub(crate) fn server_name(site: &str) -> Result<ServerName<'static>, TransportError> {
    ServerName::try_from(site.to_string())
        .map_err(|_| TransportError::TlsConfig(format!("{site:?} is not a valid site (DNS) name")))
}

/// Which of `sites` the end-entity certificate is valid for.
pub(crate) fn cert_site(cert: &CertificateDer<'_>, sites: &[String]) -> Option<String> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    sites.iter().find_map(|s| {
        let name = ServerName::try_from(s.as_str()).ok()?;
        ee.verify_is_valid_for_subject_name(&name)
            .ok()
            .map(|_| s.clone())
    })
}

struct WrongSite {
    allowed: Vec<String>,
}

// rustls prints the error with `{:?}`: make that the readable sentence.
impl fmt::Debug for WrongSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for WrongSite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "client certificate chains to the site CA but names none of the expected sites {:?}",
            self.allowed
        )
    }
}

impl std::error::Error for WrongSite {}

/// WebPKI client verification plus a check of the site name (SAN).
#[derive(Debug)]
struct SiteClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for SiteClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| warn!(error = %e, "refused a peer site certificate"))?;
        if !self.allowed.is_empty() && cert_site(end_entity, &self.allowed).is_none() {
            let e = WrongSite {
                allowed: self.allowed.clone(),
            };
            warn!(error = %e, "refused a peer site certificate");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(e))),
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
