//! The etcd witness in the configuration: the shipped example loads, and
//! each mistake is reported at its key with what is expected.

use std::path::{Path, PathBuf};

use remus_wan::config::{Config, WitnessBackend};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/etcd-witness.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example()).expect("example config is in the repository")
}

fn parse(text: &str) -> Result<Config, Vec<(String, String)>> {
    Config::parse(
        text,
        Path::new("test.toml"),
        Path::new("/nonexistent"),
        Vec::new(),
    )
    .map_err(|e| {
        e.issues()
            .iter()
            .map(|i| (i.key.clone(), i.problem.clone()))
            .collect()
    })
}

fn assert_issue(text: &str, key: &str, needle: &str) {
    let found = parse(text).expect_err("expected the configuration to be rejected");
    assert!(
        found.iter().any(|(k, p)| k == key && p.contains(needle)),
        "expected an issue at `{key}` mentioning {needle:?}, got {found:#?}"
    );
}

/// The example with its `[witness]` table replaced by `witness`.
fn with_witness(witness: &str) -> String {
    let text = example_text();
    let start = text.find("[witness]").expect("example has a [witness]");
    let end = start + text[start..].find("[[vms]]").expect("vms follow");
    format!("{}{witness}\n{}", &text[..start], &text[end..])
}

#[test]
fn example_loads_with_the_etcd_witness() {
    let cfg = Config::load_with_env(&example(), Vec::new()).expect("example is valid");
    let w = cfg.witness.as_ref().expect("a witness");
    assert_eq!(w.backend, WitnessBackend::Etcd);
    assert_eq!(w.endpoints.len(), 3);
    assert_eq!(w.etcd_prefix(), "/remus-wan/prod");
    // Relative TLS paths are taken from the file's folder.
    let ca = w.ca.as_ref().expect("ca");
    assert!(ca.starts_with(example().parent().expect("folder")));
    assert_eq!(cfg.vms.len(), 2);
}

#[test]
fn the_builtin_witness_stays_the_default() {
    let text = with_witness(
        "[witness]\nlisten = \"192.0.2.10:7710\"\n[witness.tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n",
    );
    let text = text.replace("lease_ms = 2000", "lease_ms = 1500");
    let cfg = parse(&text).expect("a valid built-in witness");
    let w = cfg.witness.expect("witness");
    assert_eq!(w.backend, WitnessBackend::Builtin);
}

#[test]
fn builtin_witness_needs_listen_and_tls_and_refuses_etcd_keys() {
    let text = with_witness("[witness]\nendpoints = [\"http://127.0.0.1:2379\"]\n");
    assert_issue(&text, "witness.listen", "non-zero UDP port");
    assert_issue(&text, "witness.tls", "[witness.tls] table");
    assert_issue(&text, "witness.endpoints", "backend = \"etcd\"");
}

#[test]
fn etcd_mistakes_name_their_key() {
    assert_issue(
        &with_witness("[witness]\nbackend = \"etcd\"\n"),
        "witness.endpoints",
        "at least one etcd member",
    );
    assert_issue(
        &with_witness("[witness]\nbackend = \"etcd\"\nendpoints = [\"127.0.0.1:2379\"]\n"),
        "witness.endpoints[0]",
        "http://host:port",
    );
    assert_issue(
        &with_witness("[witness]\nbackend = \"etcd\"\nendpoints = [\"https://e1:2379\"]\n"),
        "witness.ca",
        "CA file",
    );
    assert_issue(
        &with_witness(
            "[witness]\nbackend = \"etcd\"\nendpoints = [\"https://e1:2379\", \"http://e2:2379\"]\nca = \"ca.pem\"\n",
        ),
        "witness.endpoints",
        "found both",
    );
    assert_issue(
        &with_witness(
            "[witness]\nbackend = \"etcd\"\nendpoints = [\"https://e1:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\n",
        ),
        "witness.key",
        "together",
    );
    assert_issue(
        &with_witness(
            "[witness]\nbackend = \"etcd\"\nendpoints = [\"http://e1:2379\"]\nprefix = \"remus\"\n",
        ),
        "witness.prefix",
        "starting with /",
    );
    assert_issue(
        &with_witness(
            "[witness]\nbackend = \"etcd\"\nendpoints = [\"http://e1:2379\"]\nlisten = \"192.0.2.10:7710\"\n",
        ),
        "witness.listen",
        "built-in witness",
    );
    assert_issue(
        &with_witness("[witness]\nbackend = \"zookeeper\"\n"),
        "witness.backend",
        "\"builtin\", \"etcd\"",
    );
}

#[test]
fn etcd_lease_is_whole_seconds_of_at_least_two() {
    for lease in ["1500", "1000"] {
        let text = example_text().replace("lease_ms = 2000", &format!("lease_ms = {lease}"));
        assert_issue(&text, "failover.lease_ms", "whole number of seconds");
    }
}

#[test]
fn the_etcd_witness_is_no_process_to_run() {
    let cfg = Config::load_with_env(&example(), Vec::new()).expect("example is valid");
    let issues = cfg.check_files("witness");
    assert!(
        issues
            .iter()
            .any(|i| i.key == "--site" && i.problem.contains("is etcd")),
        "{issues:#?}"
    );
    // A site checks the etcd TLS files it reads.
    let issues = cfg.check_files("dc1");
    assert!(issues.iter().any(|i| i.key == "witness.ca"), "{issues:#?}");
}
