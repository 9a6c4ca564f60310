//! The shipped example configuration loads and validates, and every kind of
//! mistake is reported with the key that holds it.

use std::path::{Path, PathBuf};
use std::process::Command;

use remus_wan::certs::{init_site, InitOptions};
use remus_wan::config::{Config, ConfigError};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/two-site.toml")
}

fn example_text() -> String {
    std::fs::read_to_string(example()).expect("example config is in the repository")
}

fn no_env() -> Vec<(String, String)> {
    Vec::new()
}

/// Parses `text` and returns the issues as "key: problem" strings.
fn issues(text: &str) -> Vec<(String, String)> {
    match Config::parse(
        text,
        Path::new("test.toml"),
        Path::new("/nonexistent"),
        no_env(),
    ) {
        Ok(_) => panic!("expected the configuration to be rejected"),
        Err(e) => {
            let list: Vec<(String, String)> = e
                .issues()
                .iter()
                .map(|i| (i.key.clone(), i.problem.clone()))
                .collect();
            assert!(!list.is_empty(), "error without issues: {e}");
            list
        }
    }
}

fn assert_issue(text: &str, key: &str, needle: &str) {
    let found = issues(text);
    assert!(
        found.iter().any(|(k, p)| k == key && p.contains(needle)),
        "expected an issue at `{key}` mentioning {needle:?}, got {found:#?}"
    );
}

#[test]
fn example_loads_and_describes_two_sites_and_a_witness() {
    let cfg = Config::load_with_env(&example(), no_env()).expect("example is valid");
    let names: Vec<&str> = cfg.sites.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["dc1", "dc2"]);
    assert_eq!(
        cfg.witness.as_ref().map(|w| w.name.as_str()),
        Some("witness")
    );
    let vm = cfg.vm("web1").expect("web1 defined");
    assert_eq!((vm.primary.as_str(), vm.backup.as_str()), ("dc1", "dc2"));
    assert_eq!(cfg.replication_for(vm).epoch_interval_ms, 100);
    // dc2 listens on the wildcard and is dialled at its `connect` address.
    assert_eq!(
        cfg.site("dc2").map(|s| s.connect_addr().to_string()),
        Some("203.0.113.10:7700".to_owned())
    );
    // Relative paths are taken from the file's folder.
    let tls = &cfg.site("dc1").expect("dc1").tls;
    assert!(tls.cert.starts_with(example().parent().expect("folder")));
    assert!(cfg
        .netops
        .bgp
        .as_ref()
        .is_some_and(|b| b.speakers.len() == 2));
}

#[test]
fn environment_overrides_a_key() {
    let env = vec![
        (
            "REMUS_WAN_REPLICATION__EPOCH_INTERVAL_MS".to_owned(),
            "50".to_owned(),
        ),
        // Not an override (no section): belongs to the tools, ignored here.
        ("REMUS_WAN_ALLOW_SKIP".to_owned(), "1".to_owned()),
    ];
    let cfg = Config::load_with_env(&example(), env).expect("valid");
    assert_eq!(cfg.replication.epoch_interval_ms, 50);
}

#[test]
fn environment_override_with_a_bad_value_names_the_key() {
    let env = vec![(
        "REMUS_WAN_REPLICATION__EPOCH_INTERVAL_MS".to_owned(),
        "soon".to_owned(),
    )];
    let err = Config::load_with_env(&example(), env).expect_err("must be refused");
    assert_eq!(err.issues()[0].key, "replication.epoch_interval_ms");
}

#[test]
fn fec_is_on_unless_the_replication_section_turns_it_off() {
    let cfg = Config::load_with_env(&example(), no_env()).expect("valid");
    assert!(cfg.replication.fec(), "FEC is on by default");
    let env = vec![("REMUS_WAN_REPLICATION__FEC".to_owned(), "false".to_owned())];
    let cfg = Config::load_with_env(&example(), env).expect("valid");
    assert!(!cfg.replication.fec());
}

#[test]
fn the_congestion_controller_is_loss_tolerant_unless_replication_names_another() {
    use wan::transport::CongestionControl;
    let cfg = Config::load_with_env(&example(), no_env()).expect("valid");
    assert_eq!(
        cfg.replication.congestion(),
        CongestionControl::LossTolerant
    );
    let env = vec![(
        "REMUS_WAN_REPLICATION__CONGESTION".to_owned(),
        "bbr".to_owned(),
    )];
    let cfg = Config::load_with_env(&example(), env).expect("valid");
    assert_eq!(cfg.replication.congestion(), CongestionControl::Bbr);
    let env = vec![(
        "REMUS_WAN_REPLICATION__CONGESTION".to_owned(),
        "vegas".to_owned(),
    )];
    let err = Config::load_with_env(&example(), env).expect_err("must be refused");
    assert_eq!(err.issues()[0].key, "replication.congestion");
    assert!(
        err.issues()[0].to_string().contains("loss-tolerant"),
        "{err}"
    );
}

#[test]
fn congestion_per_vm_is_refused_with_its_key() {
    let t = example_text().replace(
        "name = \"web1\"\n",
        "name = \"web1\"\nreplication = { congestion = \"bbr\" }\n",
    );
    assert_issue(
        &t,
        "vms[0].replication.congestion",
        "set it in [replication]",
    );
}

#[test]
fn fec_per_vm_is_refused_with_its_key() {
    let t = example_text().replace(
        "name = \"web1\"\n",
        "name = \"web1\"\nreplication = { fec = false }\n",
    );
    assert_issue(&t, "vms[0].replication.fec", "set it in [replication]");
}

#[test]
fn unknown_site_is_named() {
    let t = example_text().replace("primary = \"dc1\"", "primary = \"dc3\"");
    assert_issue(&t, "vms[0].primary", "found \"dc3\"");
}

#[test]
fn zero_interval_is_refused() {
    let t = example_text().replace("epoch_interval_ms = 100", "epoch_interval_ms = 0");
    assert_issue(&t, "replication.epoch_interval_ms", "from 1 to 60000");
}

#[test]
fn bad_cidr_is_refused_with_its_key() {
    let t = example_text().replace("\"198.51.100.80/32\"", "\"198.51.100.800/32\"");
    assert_issue(&t, "vms[0].service_prefixes[0]", "");
}

#[test]
fn prefix_with_host_bits_is_refused() {
    let t = example_text().replace("\"2001:db8:80::/48\"", "\"2001:db8:80::1/48\"");
    assert_issue(
        &t,
        "vms[0].service_prefixes[1]",
        "did you mean 2001:db8:80::/48",
    );
}

#[test]
fn duplicate_vm_is_refused() {
    let text = example_text();
    let start = text.find("[[vms]]").expect("vm table");
    let end = text.find("[netops.bgp]").expect("netops after vms");
    let vm = &text[start..end];
    // A second copy of web1 (with its own prefixes, so only the name clashes).
    let copy = vm
        .replace("198.51.100.80/32", "198.51.100.81/32")
        .replace("2001:db8:80::/48", "2001:db8:81::/48");
    let t = format!("{}{}{}", &text[..end], copy, &text[end..]);
    assert_issue(&t, "vms[1].name", "unique VM name");
}

#[test]
fn duplicate_site_is_refused() {
    let t = example_text().replace("name = \"dc2\"", "name = \"dc1\"");
    assert_issue(&t, "sites[1].name", "unique site name");
}

#[test]
fn backup_in_the_primary_site_is_refused() {
    let t = example_text().replace("backup = \"dc2\"", "backup = \"dc1\"");
    assert_issue(&t, "vms[0].backup", "other than the primary");
}

#[test]
fn misspelt_key_is_named() {
    let t = example_text().replace("vcpus = 1", "vcpu = 1");
    assert_issue(&t, "vms[0].vcpu", "unknown key");
}

#[test]
fn wrong_type_is_named() {
    let t = example_text().replace("memory_mib = 64", "memory_mib = \"lots\"");
    assert_issue(&t, "vms[0].memory_mib", "expected");
}

#[test]
fn bad_mac_and_odd_memory_are_both_reported() {
    let t = example_text()
        .replace("52:54:00:12:34:56", "53:54:00:12:34:56")
        .replace("memory_mib = 64", "memory_mib = 63");
    let found = issues(&t);
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"vms[0].network.mac"), "{found:?}");
    assert!(keys.contains(&"vms[0].memory_mib"), "{found:?}");
}

#[test]
fn bgp_mistakes_are_named() {
    let t = example_text()
        .replace(
            "local_as = 64512\nrouter_id = \"203.0.113.10\"",
            "local_as = 23456\nrouter_id = \"203.0.113.10\"",
        )
        .replace(
            "communities = [\"64512:80\"]",
            "communities = [\"64512:99999\"]",
        )
        .replace("hold_time_s = 90", "hold_time_s = 2");
    let found = issues(&t);
    let keys: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        keys.contains(&"netops.bgp.speakers[1].local_as"),
        "{found:?}"
    );
    assert!(
        keys.contains(&"vms[0].announce.communities[0]"),
        "{found:?}"
    );
    assert!(keys.contains(&"netops.bgp.hold_time_s"), "{found:?}");
}

#[test]
fn dns_name_outside_the_zone_is_refused() {
    let t = example_text().replace("web1.example.net.", "web1.example.org.");
    assert_issue(&t, "vms[0].dns[0].name", "inside zone");
}

#[test]
fn syntax_error_is_reported() {
    let err = Config::parse(
        "[replication\nepoch_interval_ms = 1",
        Path::new("broken.toml"),
        Path::new("."),
        no_env(),
    )
    .expect_err("not TOML");
    assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
}

/// Lays out a deployment folder with the example and every file dc1 needs.
fn deployment() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("two-site.toml");
    // The guest image path points into the build tree; keep it inside the
    // deployment for this test.
    let text = example_text().replace("../target/guest/netguest.elf", "guest.elf");
    std::fs::write(&cfg, text).expect("write config");
    for site in ["dc1", "dc2", "witness"] {
        init_site(&InitOptions {
            site: site.into(),
            out: dir.path().join("pki"),
            ca_dir: None,
            days: 30,
        })
        .expect("certs");
    }
    std::fs::write(dir.path().join("guest.elf"), b"\x7fELF").expect("guest");
    std::fs::write(dir.path().join("web1.img"), vec![0u8; 4096]).expect("disk");
    std::fs::write(dir.path().join("pki/tsig.secret"), b"c2VjcmV0\n").expect("secret");
    std::fs::create_dir_all(dir.path().join("hooks")).expect("hooks");
    let hook = dir.path().join("hooks/notify.sh");
    std::fs::write(&hook, "#!/bin/sh\nexit 0\n").expect("hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    dir
}

#[test]
fn files_of_one_site_are_checked() {
    let dir = deployment();
    let path = dir.path().join("two-site.toml");
    let cfg = Config::load_with_env(&path, no_env()).expect("valid");
    assert_eq!(cfg.check_files("dc1"), vec![]);
    assert_eq!(cfg.check_files("witness"), vec![]);
    std::fs::remove_file(dir.path().join("pki/dc1.key")).expect("rm");
    let found = cfg.check_files("dc1");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].key, "sites[0].tls.key");
    assert!(!cfg.check_files("dc9").is_empty());
}

fn remus_wan(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run remus-wan");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_accepts_the_example_and_rejects_a_broken_copy() {
    let ex = example();
    let (code, out, _) = remus_wan(&["config", "check", ex.to_str().expect("utf-8 path")]);
    assert_eq!(code, 0);
    assert!(out.contains("valid"), "{out}");

    let dir = tempfile::tempdir().expect("tempdir");
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        example_text().replace("max_epochs_in_flight = 4", "max_epochs_in_flight = 0"),
    )
    .expect("write");
    let (code, _, err) = remus_wan(&["config", "check", broken.to_str().expect("utf-8")]);
    assert_eq!(code, 3, "exit code 3 means invalid configuration");
    assert!(err.contains("`replication.max_epochs_in_flight`"), "{err}");

    let deployment = deployment();
    let path = deployment.path().join("two-site.toml");
    let p = path.to_str().expect("utf-8");
    let (code, out, err) = remus_wan(&["config", "check", p, "--site", "dc2"]);
    assert_eq!(code, 0, "{out}{err}");
    std::fs::remove_file(deployment.path().join("web1.img")).expect("rm");
    let (code, _, err) = remus_wan(&["config", "check", p, "--site", "dc2"]);
    assert_eq!(code, 3);
    assert!(err.contains("`vms[0].disk`"), "{err}");
}

#[test]
fn cli_reports_a_missing_file() {
    let (code, _, err) = remus_wan(&["config", "check", "/nonexistent/remus.toml"]);
    assert_eq!(code, 3);
    assert!(err.contains("cannot read"), "{err}");
}

#[test]
fn unknown_enum_value_lists_the_accepted_ones() {
    let t = example_text().replace("backend = \"kvm\"", "backend = \"vmware\"");
    assert_issue(&t, "vms[0].backend", "\"kvm\", \"qemu\", \"xen\"");
    let t = example_text().replace("mode = \"both\"", "mode = \"sometimes\"");
    assert_issue(&t, "netops.bgp.speakers[1].peers[0].mode", "\"passive\"");
}

#[test]
fn qemu_needs_an_initramfs() {
    let t = example_text().replace(
        "backend = \"kvm\"",
        "backend = \"qemu\"\nkernel = \"vmlinuz\"",
    );
    assert_issue(&t, "vms[0].initramfs", "initramfs");
}

fn qemu_vm(extra: &str, memory_mib: u64) -> String {
    example_text()
        .replace(
            "backend = \"kvm\"",
            &format!("backend = \"qemu\"\nkernel = \"vmlinuz\"\ninitramfs = \"initrd\"\n{extra}"),
        )
        .replace("memory_mib = 64", &format!("memory_mib = {memory_mib}"))
}

fn accepted(text: &str) -> Config {
    Config::parse(
        text,
        Path::new("test.toml"),
        Path::new("/nonexistent"),
        no_env(),
    )
    .unwrap_or_else(|e| panic!("expected the configuration to load: {e}"))
}

#[test]
fn qemu_vms_take_up_to_64_gib_and_no_more() {
    let c = accepted(&qemu_vm("", 65_536));
    assert_eq!(c.vms[0].memory_mib, 65_536);
    assert_issue(&qemu_vm("", 65_538), "vms[0].memory_mib", "64 to 65536 MiB");
    assert_issue(&qemu_vm("", 32), "vms[0].memory_mib", "64 to 65536 MiB");
}

#[test]
fn accel_is_chosen_per_qemu_vm_and_checked() {
    use remus_wan::config::Accel;
    assert_eq!(accepted(&qemu_vm("", 1024)).vms[0].accel, Accel::Auto);
    assert_eq!(
        accepted(&qemu_vm("accel = \"tcg\"", 1024)).vms[0].accel,
        Accel::Tcg
    );
    assert_eq!(
        accepted(&qemu_vm("accel = \"kvm\"", 1024)).vms[0].accel,
        Accel::Kvm
    );
    assert_issue(
        &qemu_vm("accel = \"fast\"", 1024),
        "vms[0].accel",
        "\"auto\", \"kvm\", \"tcg\"",
    );
    let micro_vm =
        example_text().replace("backend = \"kvm\"", "backend = \"kvm\"\naccel = \"tcg\"");
    assert_issue(&micro_vm, "vms[0].accel", "only backend \"qemu\"");
}

/// The site-daemon example: three VMs, two of them a consistency group;
/// the daemon at dc1 (and at dc2) serves two units, the group and mail1.
#[test]
fn the_fleet_example_loads_with_its_group() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/site-fleet.toml");
    let cfg = Config::load_with_env(&path, no_env()).expect("configs/site-fleet.toml is valid");
    assert_eq!(cfg.vms.len(), 3);
    assert_eq!(cfg.groups.len(), 1);
    let units = remus_wan::site::group::units(&cfg, cfg.vms.clone());
    let names: Vec<(&str, usize)> = units.iter().map(|u| (u.name(), u.members.len())).collect();
    assert_eq!(names, [("shop", 2), ("mail1", 0)]);
    // The group as one VM: both members' memory and prefixes.
    assert_eq!(units[0].vm.memory_mib, 128);
    assert_eq!(units[0].vm.service_prefixes.len(), 2);
}
