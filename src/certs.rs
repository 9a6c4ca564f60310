//! Site PKI: one certificate authority per deployment and a certificate per
//! site (and for the witness), used for mutual TLS on every QUIC connection.
//!
//! The identity a peer proves is the DNS name in its certificate's
//! subjectAltName, which is exactly its site name (`dc1`). The CA signs
//! nothing else, so "chains to our CA and names the site we expect" is the
//! whole authentication rule.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Common name of every remus-wan site CA.
pub const CA_COMMON_NAME: &str = "remus-wan site CA";
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("invalid site name {0:?}: expected 1-63 lowercase letters, digits and inner hyphens")]
    BadSiteName(String),
    #[error("{0} already exists: refusing to overwrite a key or certificate (move it away first to re-issue)")]
    Exists(PathBuf),
    #[error("found {present} but not {missing}: a CA needs both its certificate and its key")]
    HalfCa { present: PathBuf, missing: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a usable remus-wan CA: {source}")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `init_site` wrote or reused.
#[derive(Debug, Clone)]
pub struct Issued {
    pub ca_cert: PathBuf,
    pub ca_created: bool,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Options of `remus-wan certs init`.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub site: String,
    /// Where the site's `<site>.pem` / `<site>.key` go.
    pub out: PathBuf,
    /// Where the CA lives (created there if absent); defaults to `out`.
    pub ca_dir: Option<PathBuf>,
    /// Validity of the site certificate.
    pub days: u32,
}

/// Creates (or reuses) the deployment CA and issues a certificate for one
/// site. Never overwrites an existing file.
pub fn init_site(opts: &InitOptions) -> Result<Issued, CertsError> {
    if !valid_site_name(&opts.site) {
        return Err(CertsError::BadSiteName(opts.site.clone()));
    }
    let ca_dir = opts.ca_dir.clone().unwrap_or_else(|| opts.out.clone());
    let cert_path = opts.out.join(format!("{}.pem", opts.site));
    let key_path = opts.out.join(format!("{}.key", opts.site));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertsError::Exists(p.clone()));
        }
    }
    make_dir(&opts.out)?;
    make_dir(&ca_dir)?;

    let (issuer, ca_cert, ca_created) = load_or_create_ca(&ca_dir)?;

    let site_key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![opts.site.clone()])?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, opts.site.as_str());
    params
        .distinguished_name
        .push(DnType::OrganizationName, "remus-wan");
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let now = time_now();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(i64::from(opts.days));
    let cert = params.signed_by(&site_key, &issuer)?;

    // Key first: if writing the certificate fails, a rerun reports the key
    // as existing rather than silently pairing a new key with an old cert.
    write_new(&key_path, site_key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(Issued {
        ca_cert,
        ca_created,
        cert: cert_path,
        key: key_path,
    })
}

fn load_or_create_ca(dir: &Path) -> Result<(Issuer<'static, KeyPair>, PathBuf, bool), CertsError> {
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|source| CertsError::BadCa {
                path: key_path.clone(),
                source,
            })?;
            let issuer =
                Issuer::from_ca_cert_pem(&pem, key).map_err(|source| CertsError::BadCa {
                    path: cert_path.clone(),
                    source,
                })?;
            Ok((issuer, cert_path, false))
        }
        (true, false) => Err(CertsError::HalfCa {
            present: cert_path,
            missing: key_path,
        }),
        (false, true) => Err(CertsError::HalfCa {
            present: key_path,
            missing: cert_path,
        }),
        (false, false) => {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = DistinguishedName::new();
            params
                .distinguished_name
                .push(DnType::CommonName, CA_COMMON_NAME);
            params
                .distinguished_name
                .push(DnType::OrganizationName, "remus-wan");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time_now();
            params.not_before = now - time::Duration::minutes(5);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key)?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
            write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
            Ok((Issuer::new(params, key), cert_path, true))
        }
    }
}

/// Site names are DNS labels: they are the certificate identity.
pub fn valid_site_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn make_dir(dir: &Path) -> Result<(), CertsError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertsError::Write {
            path: dir.to_owned(),
            source,
        })
}

fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Read {
        path: path.to_owned(),
        source,
    })
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CertsError> {
    let werr = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                CertsError::Exists(path.to_owned())
            } else {
                werr(e)
            }
        })?;
    f.write_all(data).map_err(werr)?;
    f.sync_all().map_err(werr)
}
