//! `remus-wan certs init`: a CA and site certificates that chain, name the
//! site, are never overwritten, and keep their keys private.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use remus_wan::certs::{init_site, CertsError, InitOptions};
use x509_parser::extensions::GeneralName;
use x509_parser::pem::parse_x509_pem;

fn opts(site: &str, out: &Path) -> InitOptions {
    InitOptions {
        site: site.into(),
        out: out.to_owned(),
        ca_dir: None,
        days: 30,
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn sites_share_one_ca_and_chain_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = init_site(&opts("dc1", dir.path())).expect("dc1");
    assert!(a.ca_created);
    let b = init_site(&opts("dc2", dir.path())).expect("dc2");
    assert!(!b.ca_created, "the second site reuses the CA");

    let ca_pem = std::fs::read(dir.path().join("ca.pem")).expect("ca");
    let (_, ca_pem) = parse_x509_pem(&ca_pem).expect("pem");
    let ca = ca_pem.parse_x509().expect("ca x509");
    assert!(ca.is_ca());
    for (site, issued) in [("dc1", &a), ("dc2", &b)] {
        let pem = std::fs::read(&issued.cert).expect("cert");
        let (_, pem) = parse_x509_pem(&pem).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        assert!(!cert.is_ca());
        cert.verify_signature(Some(ca.public_key()))
            .expect("signed by the CA");
        assert_eq!(cert.issuer(), ca.subject());
        let san = cert
            .subject_alternative_name()
            .expect("valid extension")
            .expect("has SAN");
        assert_eq!(san.value.general_names, vec![GeneralName::DNSName(site)]);
        let eku = cert
            .extended_key_usage()
            .expect("valid")
            .expect("has EKU")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(mode(&issued.key), 0o600);
    }
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
}

#[test]
fn existing_keys_are_never_overwritten() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_site(&opts("dc1", dir.path())).expect("first");
    let before = std::fs::read(dir.path().join("dc1.key")).expect("key");
    let err = init_site(&opts("dc1", dir.path())).expect_err("second must refuse");
    assert!(matches!(err, CertsError::Exists(_)), "{err}");
    assert_eq!(
        std::fs::read(dir.path().join("dc1.key")).expect("key"),
        before
    );
}

#[test]
fn a_half_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    init_site(&opts("dc1", dir.path())).expect("first");
    std::fs::remove_file(dir.path().join("ca.key")).expect("rm");
    let err = init_site(&opts("dc2", dir.path())).expect_err("no CA key");
    assert!(matches!(err, CertsError::HalfCa { .. }), "{err}");
    assert!(!dir.path().join("dc2.key").exists());
}

#[test]
fn a_separate_ca_directory_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut o = opts("witness", &dir.path().join("witness"));
    o.ca_dir = Some(dir.path().join("ca"));
    init_site(&o).expect("issue");
    assert!(dir.path().join("ca/ca.key").exists());
    assert!(dir.path().join("witness/witness.pem").exists());
    assert!(!dir.path().join("witness/ca.key").exists());
}

#[test]
fn bad_site_names_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for bad in ["", "DC1", "dc_1", "-dc", "a/b"] {
        let err = init_site(&opts(bad, dir.path())).expect_err(bad);
        assert!(matches!(err, CertsError::BadSiteName(_)), "{bad}: {err}");
    }
}

#[test]
fn cli_refuses_to_overwrite_with_exit_code_4() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().to_str().expect("utf-8");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .args(["certs", "init", "--site", "dc1", "--out", out])
            .output()
            .expect("run")
    };
    let first = run();
    assert!(first.status.success(), "{first:?}");
    let second = run();
    assert_eq!(second.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&second.stderr).contains("refusing to overwrite"));
}
