//! A site full of VMs, end to end with the real binary: eight micro-VMs
//! (KVM, smoltcp guests) started and protected by ONE `remus-wan protect`
//! process towards ONE `remus-wan standby` process, over the WAN emulator
//! (10 ms RTT), a witness arbitrating. A client streams each guest's
//! counter over TCP; the protect process is SIGKILLed: every VM is taken
//! over by the standby process and every client's same connection goes on
//! with no gap and no duplicate.
//!
//! Everything runs in a network namespace the test creates: the guests'
//! taps hang on one bridge (192.0.2.1/24), VM i at 192.0.2.(10 + i).

mod support;

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use remus_wan::testbed::{fleet_address, fleet_tap, LocalDeployment};
use support::{connect_retrying, wait_for_log, Counter, Proc};

const VMS: usize = 8;
const TAP_PREFIX: &str = "rwfl";
const BRIDGE: &str = "rwflbr";
/// Counter values each client must read after the kill (400 KB, well
/// beyond the 32 KiB receive window and anything in flight).
const AFTER_KILL: u64 = 50_000;

fn net(args: &[&str]) {
    hypervisor::netns::ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
}

/// The bridge with the host side's address, and one persistent tap per VM
/// on it (they outlive the killed protect process, as in a real site).
fn bridge_and_taps() {
    net(&["link", "add", BRIDGE, "type", "bridge"]);
    net(&["addr", "add", "192.0.2.1/24", "dev", BRIDGE]);
    net(&["link", "set", "dev", BRIDGE, "up"]);
    for i in 1..=VMS {
        let tap = fleet_tap(TAP_PREFIX, i);
        net(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        net(&["link", "set", "dev", &tap, "master", BRIDGE]);
        net(&["link", "set", "dev", &tap, "up"]);
    }
}

#[test]
fn eight_vms_of_one_protect_daemon_all_take_over_with_their_connections() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    let images = hypervisor::guest_build::from_env_or_build(
        &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let (dc1, dc2, emu_port, witness) = (17951, 17952, 17953, 17954);
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 100,
        memory_mib: 32,
        ports: (dc1, dc2),
        dc2_connect_port: Some(emu_port),
        tap: TAP_PREFIX.into(),
        mac: "52:54:00:12:40:00".into(),
        witness_port: Some(witness),
    }
    .write_fleet(VMS)
    .expect("fleet deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let wstate_s = dir.join("witness").to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        bridge_and_taps();
        // The WAN between the sites: dc1 reaches dc2 through it.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let mut ecfg = wan::emulator::EmulatorConfig::new(
            format!("127.0.0.1:{dc2}").parse().expect("addr"),
        )
        .with_link(wan::emulator::LinkParams::symmetric(
            Duration::from_millis(10),
            0.0,
            None,
        ));
        ecfg.listen = format!("127.0.0.1:{emu_port}").parse().expect("addr");
        let _emulator = rt
            .block_on(wan::emulator::Emulator::start(ecfg))
            .expect("WAN emulator");

        let _witness = Proc::remus(
            "witness",
            &["witness", "--config", &cfg_s, "--state-dir", &wstate_s],
            &dir.join("witness.log"),
        );
        let _standby = Proc::remus(
            "standby",
            &["standby", "--config", &cfg_s, "--site", "dc2", "--state-dir", &state_s],
            &dir.join("standby.log"),
        );
        assert!(
            wait_for_log(&dir.join("standby.log"), "standby listening", Duration::from_secs(30)),
            "standby did not start: {}",
            log("standby.log")
        );
        // No VM name: the daemon protects every VM backed up at dc2.
        let mut protect = Proc::remus(
            "protect",
            &["protect", "--site", "dc2", "--config", &cfg_s],
            &dir.join("protect.log"),
        );
        let mut clients: Vec<(TcpStream, Counter)> = (1..=VMS)
            .map(|i| {
                let addr = SocketAddr::new(fleet_address(i).into(), 9000);
                let conn = connect_retrying(&addr, Duration::from_secs(120)).unwrap_or_else(|e| {
                    panic!("VM {i}: {e}\nprotect log:\n{}", log("protect.log"))
                });
                conn.set_read_timeout(Some(Duration::from_millis(100)))
                    .expect("timeout");
                (conn, Counter::default())
            })
            .collect();
        // Each client sees its VM serve while protected.
        for (i, (conn, counter)) in clients.iter_mut().enumerate() {
            let got = counter.read_more(conn, 2_000, Duration::from_secs(60));
            assert!(
                got >= 2_000,
                "VM {}: only {got} counter values while protected\nprotect log:\n{}",
                i + 1,
                support::tail(&log("protect.log"), 40)
            );
        }
        // Every VM reached the standby's status as a replica.
        let replicas = remus_wan::metrics::fetch_status("127.0.0.1:9478".parse().expect("addr"))
            .expect("standby status");
        assert_eq!(replicas.len(), VMS, "standby status: {replicas:?}");

        protect.kill();
        let killed = Instant::now();
        eprintln!("protect daemon SIGKILLed with {VMS} VMs");
        for (i, (conn, counter)) in clients.iter_mut().enumerate() {
            let before = counter.next();
            // Far more than the client's window and what was in flight:
            // these values can only come from the VM resumed at dc2.
            let more = counter.read_more(conn, AFTER_KILL, Duration::from_secs(120));
            assert!(
                more >= AFTER_KILL,
                "VM {}: after the kill only {more} more counter values (from {before})\nstandby log:\n{}\nwitness log:\n{}",
                i + 1,
                support::tail(&log("standby.log"), 60),
                support::tail(&log("witness.log"), 20)
            );
        }
        eprintln!(
            "all {VMS} VMs continued at dc2 within {:?} of the kill",
            killed.elapsed()
        );
        let text = log("standby.log");
        for i in 1..=VMS {
            let vm = format!("vm=vm{i} ");
            assert!(
                text.lines()
                    .any(|l| l.contains("takeover complete") && l.contains(&vm)),
                "no takeover of vm{i} in the standby log:\n{}",
                support::tail(&text, 60)
            );
        }
        // The standby daemon's status now shows every VM running there.
        let mut last = Vec::new();
        let shown = support::wait_until(
            "every VM shown as primary at dc2",
            Duration::from_secs(30),
            || {
                last = remus_wan::metrics::fetch_status("127.0.0.1:9478".parse().expect("addr"))
                    .unwrap_or_default();
                last.iter().filter(|v| v.role == "primary").count() == VMS
            },
            || std::thread::sleep(Duration::from_millis(100)),
        );
        assert!(
            shown.is_ok(),
            "after the takeover the standby daemon's status: {:?}",
            last.iter().map(|v| (&v.vm, &v.role, &v.state)).collect::<Vec<_>>()
        );
    })
    .expect("network namespace");
}
