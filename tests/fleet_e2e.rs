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
use std::path::Path;
use std::time::{Duration, Instant};

use remus_wan::testbed::{fleet_address, fleet_tap, LocalDeployment};
use support::wan::{Wan, WanSpec};
use support::{connect_retrying, Counter, Proc};

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
fn bridge_and_taps(vms: usize) {
    net(&["link", "add", BRIDGE, "type", "bridge"]);
    net(&["addr", "add", "192.0.2.1/24", "dev", BRIDGE]);
    net(&["link", "set", "dev", BRIDGE, "up"]);
    for i in 1..=vms {
        let tap = fleet_tap(TAP_PREFIX, i);
        net(&["tuntap", "add", "dev", &tap, "mode", "tap"]);
        net(&["link", "set", "dev", &tap, "master", BRIDGE]);
        net(&["link", "set", "dev", &tap, "up"]);
    }
}

/// The fleet's deployment in `dir`: sites on loopback ports 17951/17952,
/// dc2 reached through the WAN emulator on 17953, the witness on 17954.
fn deployment(dir: &std::path::Path) -> LocalDeployment {
    let images = hypervisor::guest_build::from_env_or_build(
        &std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-build"),
    )
    .expect("guest images (cargo xtask guest-image)");
    LocalDeployment {
        dir: dir.to_owned(),
        guest_image: images.net.clone(),
        epoch_interval_ms: 100,
        memory_mib: 32,
        ports: (DC1_PORT, DC2_PORT),
        dc2_connect_port: Some(EMULATOR_PORT),
        tap: TAP_PREFIX.into(),
        mac: "52:54:00:12:40:00".into(),
        witness_port: Some(WITNESS_PORT),
    }
}

const DC1_PORT: u16 = 17951;
const DC2_PORT: u16 = 17952;
const EMULATOR_PORT: u16 = 17953;
const WITNESS_PORT: u16 = 17954;

/// The WAN between the sites (10 ms RTT): dc1 reaches dc2 through it.
fn wan_emulator() -> Wan {
    Wan::start(WanSpec {
        netns: None,
        listen: format!("127.0.0.1:{EMULATOR_PORT}").parse().expect("addr"),
        upstream: format!("127.0.0.1:{DC2_PORT}").parse().expect("addr"),
        rtt: Duration::from_millis(10),
    })
}

/// The witness and the standby daemon of dc2 for `cfg` (state and logs in
/// `dir`), once the standby listens.
/// A client of VM `i`'s counter service.
fn client(i: usize, log: impl Fn() -> String) -> (TcpStream, Counter) {
    let addr = SocketAddr::new(fleet_address(i).into(), 9000);
    let conn = connect_retrying(&addr, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("VM {i}: {e}\nprotect log:\n{}", log()));
    conn.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    (conn, Counter::default())
}

#[test]
fn eight_vms_of_one_protect_daemon_all_take_over_with_their_connections() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = deployment(&dir).write_fleet(VMS).expect("fleet deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        bridge_and_taps(VMS);
        let _wan = wan_emulator();

        let (_witness, _standby) = support::sites::witness_and_standby(&cfg_s, &dir);
        // No VM name: the daemon protects every VM backed up at dc2.
        let mut protect = support::sites::protect(None, &cfg_s, &dir, &[]);
        let mut clients: Vec<(TcpStream, Counter)> =
            (1..=VMS).map(|i| client(i, || log("protect.log"))).collect();
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

/// `kill -HUP pid`.
fn hangup(p: &Proc) {
    let pid = p.pid().expect("running") as i32;
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid, libc::SIGHUP) };
}

/// The configuration text without VM `name`'s `[[vms]]` block.
fn without_vm(text: &str, name: &str) -> String {
    let mut parts = text.split("[[vms]]\n");
    let mut out = parts.next().unwrap_or_default().to_owned();
    for p in parts {
        if !p.starts_with(&format!("name = \"{name}\"")) {
            out.push_str("[[vms]]\n");
            out.push_str(p);
        }
    }
    out
}

/// SIGHUP changes the daemons' VMs without touching the others: vm2 added
/// to both daemons' configuration starts and is protected while vm1's
/// client connection goes on; vm1 removed stops while vm2's goes on.
#[test]
fn sighup_adds_and_removes_vms_without_touching_the_others() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let d = deployment(&dir);
    let cfg = d.write_fleet(1).expect("fleet deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let status = |port: u16| {
        let mut v: Vec<(String, String)> =
            remus_wan::metrics::fetch_status(format!("127.0.0.1:{port}").parse().expect("addr"))
                .unwrap_or_default()
                .into_iter()
                .map(|s| (s.vm, s.state))
                .collect();
        v.sort();
        v
    };

    hypervisor::netns::in_new_netns(|| {
        bridge_and_taps(2);
        let _wan = wan_emulator();
        let (_witness, standby) = support::sites::witness_and_standby(&cfg_s, &dir);
        let protect = support::sites::protect(None, &cfg_s, &dir, &[]);
        let (mut c1, mut n1) = client(1, || log("protect.log"));
        assert!(n1.read_more(&mut c1, 2_000, Duration::from_secs(60)) >= 2_000);

        // Add vm2: the configuration now lists vm1 and vm2.
        let two = d.write_fleet(2).expect("fleet deployment");
        assert_eq!(two, cfg);
        hangup(&standby);
        standby.expect_log("configuration reloaded", Duration::from_secs(30));
        hangup(&protect);
        let (mut c2, mut n2) = client(2, || log("protect.log"));
        // vm2 serves, and is protected: its standby holds a replica.
        assert!(n2.read_more(&mut c2, 2_000, Duration::from_secs(60)) >= 2_000);
        let replicas = support::wait_until(
            "vm2's replica at dc2",
            Duration::from_secs(60),
            || {
                status(9478)
                    .iter()
                    .any(|(vm, st)| vm == "vm2" && st == "replica ok")
            },
            || std::thread::sleep(Duration::from_millis(100)),
        );
        assert!(replicas.is_ok(), "standby status: {:?}", status(9478));
        // vm1's connection never noticed.
        assert!(
            n1.read_more(&mut c1, AFTER_KILL, Duration::from_secs(60)) >= AFTER_KILL,
            "vm1's stream stalled after the reload\nprotect log:\n{}",
            support::tail(&log("protect.log"), 40)
        );

        // Remove vm1 from both daemons.
        let text = std::fs::read_to_string(&cfg).expect("config");
        std::fs::write(&cfg, without_vm(&text, "vm1")).expect("config");
        hangup(&protect);
        hangup(&standby);
        let gone = support::wait_until(
            "vm1 gone from both daemons",
            Duration::from_secs(60),
            || {
                let p = status(9477);
                let s = status(9478);
                p.len() == 1 && p[0].0 == "vm2" && s.len() == 1 && s[0].0 == "vm2"
            },
            || std::thread::sleep(Duration::from_millis(100)),
        );
        assert!(
            gone.is_ok(),
            "protect status {:?}, standby status {:?}\nprotect log:\n{}",
            status(9477),
            status(9478),
            support::tail(&log("protect.log"), 30)
        );
        assert!(log("protect.log").contains("no longer in the configuration"));
        // vm2's connection never noticed.
        assert!(
            n2.read_more(&mut c2, AFTER_KILL, Duration::from_secs(60)) >= AFTER_KILL,
            "vm2's stream stalled after vm1's removal\nprotect log:\n{}",
            support::tail(&log("protect.log"), 40)
        );
    })
    .expect("network namespace");
}

/// A consistency group of two VMs (`shop` = vm1 + vm2) fails over as one,
/// wherever the primary dies (fault points: while the guests are paused
/// at a boundary, and right after an epoch left): one lease, one takeover,
/// both members resumed from the same committed epoch of the group's one
/// replica, and both clients' connections go on with no gap or duplicate.
#[test]
fn a_consistency_group_fails_over_as_one_wherever_the_primary_dies() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    at_random_fault_points("group", ["protect.paused", "protect.sent"], 20, group_run);
}

/// Runs `run(point, nth)` for each fault point, `nth` from `first` to
/// `first + 39` at random (the seed printed, for reproduction).
fn at_random_fault_points(what: &str, points: [&str; 2], first: u64, run: fn(&str, u64)) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()).rotate_left(17);
    for (k, point) in points.into_iter().enumerate() {
        let nth = first + (seed >> (8 * k)) % 40;
        eprintln!("{what} run: protect dies at {point}@{nth} (seed {seed})");
        run(point, nth);
    }
}

/// The shop group (vm1 + vm2) in a fresh folder, inside a new network
/// namespace with the members' taps, the WAN emulator, the witness and the
/// standby daemon; its protect daemon dies at fault point `point@nth`.
/// `body` gets the folder, the configuration and the protect process.
fn with_group_dying_at(point: &str, nth: u64, body: impl FnOnce(&Path, &str, &mut Proc) + Send) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let cfg = deployment(&dir)
        .write_fleet_with(2, Some("shop"))
        .expect("group deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    if !fec_for(point) {
        let text = std::fs::read_to_string(&cfg).expect("config");
        let off = text.replacen("[replication]\n", "[replication]\nfec = false\n", 1);
        assert_ne!(text, off, "the deployment has a [replication] table");
        std::fs::write(&cfg, off).expect("config");
    }
    hypervisor::netns::in_new_netns(|| {
        bridge_and_taps(2);
        let _wan = wan_emulator();
        let (_witness, _standby) = support::sites::witness_and_standby(&cfg_s, &dir);
        let fault = [("REMUS_WAN_FAULT", format!("{point}@{nth}"))];
        let mut protect = support::sites::protect(Some("shop"), &cfg_s, &dir, &fault);
        body(&dir, &cfg_s, &mut protect);
    })
    .expect("network namespace");
}

fn group_run(point: &str, nth: u64) {
    with_group_dying_at(point, nth, |dir, _cfg, protect| {
        let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let mut clients: Vec<(TcpStream, Counter)> =
            (1..=2).map(|i| client(i, || log("protect.log"))).collect();
        // Both serve until the primary dies at its fault point.
        let died = support::wait_until(
            "the protect process reaching its fault point",
            Duration::from_secs(120),
            || protect.has_exited(),
            || {
                for (conn, counter) in clients.iter_mut() {
                    counter.read_more(conn, u64::MAX, Duration::from_millis(20));
                }
            },
        );
        assert!(
            died.is_ok(),
            "protect never reached {point}@{nth}\nprotect log:\n{}",
            support::tail(&log("protect.log"), 40)
        );
        for (i, (conn, counter)) in clients.iter_mut().enumerate() {
            let before = counter.next();
            let more = counter.read_more(conn, AFTER_KILL, Duration::from_secs(120));
            assert!(
                more >= AFTER_KILL,
                "vm{} after the primary died: only {more} more values (from {before})\nstandby log:\n{}",
                i + 1,
                support::tail(&log("standby.log"), 60)
            );
        }
        let text = log("standby.log");
        let takeovers: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("takeover complete"))
            .collect();
        assert_eq!(
            takeovers.len(),
            1,
            "one takeover for the whole group: {takeovers:?}"
        );
        assert!(takeovers[0].contains("vm=shop "), "{}", takeovers[0]);
        // The status shows the group, with its members, running at dc2.
        let status = remus_wan::metrics::fetch_status("127.0.0.1:9478".parse().expect("addr"))
            .expect("standby status");
        assert_eq!(status.len(), 1, "{status:?}");
        assert_eq!(
            (status[0].vm.as_str(), status[0].members.clone()),
            ("shop", vec!["vm1".to_owned(), "vm2".to_owned()])
        );
    });
}

/// Orders kept in flight at once by the shop client.
const ORDER_WINDOW: u64 = 4;
/// Orders the shop client must see confirmed after the primary died.
const ORDERS_AFTER_KILL: u64 = 20;

/// A line client: requests written whole, replies read one line at a time.
struct Lines {
    conn: TcpStream,
    buf: Vec<u8>,
}

impl Lines {
    fn connect(addr: SocketAddr, log: impl Fn() -> String) -> Lines {
        let conn = connect_retrying(&addr, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{addr}: {e}\nprotect log:\n{}", log()));
        conn.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        Lines {
            conn,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, text: &str) {
        use std::io::Write;
        self.conn.write_all(text.as_bytes()).expect("request");
    }

    /// The next reply line, or None if none came within `limit`.
    fn line(&mut self, limit: Duration) -> Option<String> {
        use std::io::Read;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            if Instant::now() >= deadline {
                return None;
            }
            let mut chunk = [0u8; 4096];
            match self.conn.read(&mut chunk) {
                Ok(0) => panic!("connection closed by the guest"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
}

/// A group whose members talk to each other: the client orders at vm1
/// (the shop front, TCP 7100), which numbers each order and records it in
/// vm2's key-value database before it confirms. The primary dies at a
/// random moment (two fault points); after the group's takeover the
/// client's same connection goes on, every confirmation it ever got came
/// in order with no gap or duplicate, and vm2's database holds exactly the
/// orders vm1 has taken, each under the number the client was told: the
/// database is neither behind nor ahead of the front.
#[test]
fn a_group_s_database_always_holds_what_its_front_confirmed() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    at_random_fault_points("shop", ["protect.sent", "protect.paused"], 15, shop_run);
}

/// `[replication] fec`: on (the default) for the first fault point's run,
/// off for the other's (written into the configuration).
fn fec_for(point: &str) -> bool {
    point == "protect.sent"
}

fn shop_run(point: &str, nth: u64) {
    with_group_dying_at(point, nth, |dir, cfg_s, protect| {
        let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let (front, db) = (fleet_address(1), fleet_address(2));
        let mut shop = Lines::connect(SocketAddr::new(front.into(), 7100), || {
            support::tail(&log("protect.log"), 40)
        });
        shop.send(&format!("DB {db}\n"));
        assert_eq!(
            shop.line(Duration::from_secs(60)).as_deref(),
            Some("OK"),
            "the front accepts its database"
        );
        // Orders flow (a window of them in flight) until the primary has
        // died, then until enough more are confirmed by the new primary.
        let (mut sent, mut confirmed) = (0u64, 0u64);
        let mut after_kill: Option<u64> = None;
        let started = Instant::now();
        let mut rate = 0.0;
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            if after_kill.is_none() && protect.has_exited() {
                after_kill = Some(confirmed);
                rate = confirmed as f64 / started.elapsed().as_secs_f64();
            }
            if after_kill.is_some_and(|at| confirmed >= at + ORDERS_AFTER_KILL) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "orders stalled: {confirmed} confirmed, primary {}\nprotect log:\n{}\nstandby log:\n{}",
                if after_kill.is_some() { "dead" } else { "alive" },
                support::tail(&log("protect.log"), 30),
                support::tail(&log("standby.log"), 60)
            );
            while sent < confirmed + ORDER_WINDOW {
                sent += 1;
                shop.send(&format!("ORDER o{sent}\n"));
            }
            if let Some(reply) = shop.line(Duration::from_millis(200)) {
                confirmed += 1;
                assert_eq!(
                    reply,
                    format!("OK o{confirmed} {confirmed}"),
                    "confirmations come in order, numbered with no gap or duplicate"
                );
            }
        }
        // Let the orders in flight finish, then compare both VMs' state.
        while confirmed < sent {
            let reply = shop
                .line(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("order o{} never confirmed", confirmed + 1));
            confirmed += 1;
            assert_eq!(reply, format!("OK o{confirmed} {confirmed}"));
        }
        shop.send("TOTAL\n");
        assert_eq!(
            shop.line(Duration::from_secs(60)),
            Some(format!("TOTAL {confirmed}")),
            "the front took exactly the orders it confirmed"
        );
        let mut database = Lines::connect(SocketAddr::new(db.into(), 7000), || {
            support::tail(&log("standby.log"), 40)
        });
        let mut requests = String::from("COUNT\n");
        for i in 1..=confirmed {
            requests.push_str(&format!("GET o{i}\n"));
        }
        database.send(&requests);
        assert_eq!(
            database.line(Duration::from_secs(60)),
            Some(format!("COUNT {confirmed}")),
            "the database holds as many orders as the front took"
        );
        for i in 1..=confirmed {
            assert_eq!(
                database.line(Duration::from_secs(60)),
                Some(format!("VALUE {i}")),
                "order o{i} in the database under the number the client was told"
            );
        }
        // The database's disk went with it: its part of the group's
        // replica (after the front's image) holds every order's record,
        // in order, written before the database answered.
        let replica = dir.join("state/replicas/shop/disk.img");
        let front_disk = std::fs::metadata(dir.join("vm1.img"))
            .expect("vm1's image")
            .len();
        assert_eq!(
            kv_log(&replica, front_disk),
            (1..=confirmed)
                .map(|i| (format!("o{i}"), i.to_string()))
                .collect::<Vec<_>>(),
            "the database's disk in the group's replica holds each order once, in order"
        );
        let takeovers = log("standby.log")
            .lines()
            .filter(|l| l.contains("takeover complete"))
            .count();
        assert_eq!(takeovers, 1, "one takeover for the whole group");
        group_fails_back_by_checksum(dir, cfg_s, fec_for(point));
        eprintln!(
            "shop run at {point}@{nth}: {confirmed} orders, {} before the primary died \
             ({rate:.1} orders/s with {ORDER_WINDOW} in flight, 100 ms epochs)",
            after_kill.unwrap_or(0)
        );
    });
}

/// dc1 comes back after the group's takeover: a standby there holds the
/// members' old images (where they ran before the primary died), which
/// seed its new replica back to back; dc2 protects the group back towards
/// it and only the blocks that differ travel (a checksum resync of the
/// group's disk, not the whole of it). At the end dc1's replica disk is
/// the disk dc2's members run from, byte for byte. The protection back
/// replicates with forward error correction exactly when the site's
/// `[replication] fec` says so.
fn group_fails_back_by_checksum(dir: &std::path::Path, cfg_s: &str, fec: bool) {
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let _standby1 = support::sites::standby_at_dc1(cfg_s, dir);
    support::wait_until(
        "dc2 protects the group back towards dc1",
        Duration::from_secs(120),
        || !support::disk_syncs(&log("standby.log")).is_empty(),
        || std::thread::sleep(Duration::from_millis(100)),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nstandby (dc2) log:\n{}\nstandby (dc1) log:\n{}",
            support::tail(&log("standby.log"), 40),
            support::tail(&log("standby-dc1.log"), 40)
        )
    });
    let syncs = support::disk_syncs(&log("standby.log"));
    let (mode, blocks, bytes) = syncs.last().expect("a disk sync").clone();
    eprintln!(
        "group failback disk sync: mode {mode}, {blocks} blocks, {bytes} bytes of a 2 MiB disk"
    );
    assert_eq!(mode, "checksum", "{syncs:?}");
    // Of the group's 32 blocks of 64 KiB, those the database wrote after
    // the takeover and those dc1's last epochs wrote without a commit.
    assert!(
        (1..=8).contains(&blocks),
        "only the blocks that differ travel, not the group's disk: {syncs:?}"
    );
    let ours = dir.join("state/replicas/shop/disk.img");
    let theirs = dir.join("state-dc1/replicas/shop/disk.img");
    support::wait_until(
        "dc1's replica disk equals the disk dc2's members run from",
        Duration::from_secs(60),
        || support::image_hash(&ours) == support::image_hash(&theirs),
        || std::thread::sleep(Duration::from_millis(200)),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nstandby (dc1) log:\n{}",
            support::tail(&log("standby-dc1.log"), 40)
        )
    });
    // dc2's protector publishes FEC figures once a FEC link carried its
    // epochs, and none without.
    let datagrams = support::vm_status("127.0.0.1:9478").and_then(|v| v.fec_datagrams);
    if fec {
        assert!(
            datagrams.is_some_and(|n| n > 0),
            "no FEC datagram with fec on: {datagrams:?}"
        );
    } else {
        assert_eq!(datagrams, None, "FEC figures with `fec = false`");
    }
}

/// The records of the guest's key-value log (one 512-byte sector per
/// `SET` from sector 1: `KV01`, key and value lengths, key, value) on the
/// disk that begins at byte `start` of `image`.
fn kv_log(image: &std::path::Path, start: u64) -> Vec<(String, String)> {
    let bytes = std::fs::read(image).expect("the replica's disk");
    let disk = bytes
        .get(start as usize..)
        .expect("the member's part of the disk");
    disk.chunks_exact(512)
        .skip(1)
        .take_while(|s| s.starts_with(b"KV01"))
        .map(|s| {
            let kl = usize::from(u16::from_le_bytes([s[4], s[5]]));
            let vl = usize::from(u16::from_le_bytes([s[6], s[7]]));
            let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&s[r]).into_owned();
            (text(8..8 + kl), text(8 + kl..8 + kl + vl))
        })
        .collect()
}

/// Without a witness, a group's replica is activated by hand as a whole:
/// `standby --activate --vm shop` resumes both members at the group's last
/// committed checkpoint, and both clients' connections go on with no gap
/// or duplicate; naming a member instead is refused, naming the group.
#[test]
fn a_group_is_activated_by_hand_as_a_whole() {
    if !support::require_kvm_root("fleet_e2e") {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_owned();
    let mut d = deployment(&dir);
    d.witness_port = None;
    let cfg = d
        .write_fleet_with(2, Some("shop"))
        .expect("group deployment");
    let cfg_s = cfg.to_str().expect("utf-8").to_owned();
    let state_s = dir.join("state").to_str().expect("utf-8").to_owned();
    let log = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();

    hypervisor::netns::in_new_netns(|| {
        bridge_and_taps(2);
        let _wan = wan_emulator();
        let mut standby = support::sites::standby(&cfg_s, &dir, &[]);
        let mut protect = support::sites::protect(Some("shop"), &cfg_s, &dir, &[]);
        let mut clients: Vec<(TcpStream, Counter)> =
            (1..=2).map(|i| client(i, || log("protect.log"))).collect();
        // Protected: values reach the clients only once the checkpoints
        // holding them are committed at dc2.
        for (i, (conn, counter)) in clients.iter_mut().enumerate() {
            let got = counter.read_more(conn, 10_000, Duration::from_secs(120));
            assert!(
                got >= 10_000,
                "vm{} streams only {got} values while protected\nprotect log:\n{}",
                i + 1,
                support::tail(&log("protect.log"), 30)
            );
        }
        protect.kill();
        assert_eq!(standby.term(), Some(0), "standby exits cleanly on SIGTERM");

        // A member's name is refused, naming its group.
        let member = std::process::Command::new(env!("CARGO_BIN_EXE_remus-wan"))
            .args([
                "standby",
                "--config",
                &cfg_s,
                "--site",
                "dc2",
                "--state-dir",
                &state_s,
                "--activate",
                "--vm",
                "vm1",
            ])
            .output()
            .expect("remus-wan runs");
        let err = String::from_utf8_lossy(&member.stderr);
        assert!(
            !member.status.success() && err.contains("consistency group shop"),
            "{err}"
        );

        let mut active = Proc::remus(
            "activate",
            &[
                "standby",
                "--config",
                &cfg_s,
                "--site",
                "dc2",
                "--state-dir",
                &state_s,
                "--activate",
                "--vm",
                "shop",
            ],
            &dir.join("activate.log"),
        );
        active.expect_log("VM activated", Duration::from_secs(60));
        for (i, (conn, counter)) in clients.iter_mut().enumerate() {
            let before = counter.next();
            let more = counter.read_more(conn, AFTER_KILL, Duration::from_secs(120));
            assert!(
                more >= AFTER_KILL,
                "vm{} after activation: only {more} more values (from {before})\nactivate log:\n{}",
                i + 1,
                support::tail(&log("activate.log"), 40)
            );
        }
        assert_eq!(
            active.term(),
            Some(0),
            "activated group stops cleanly on SIGTERM\n{}",
            log("activate.log")
        );
    })
    .expect("network namespace");
}
