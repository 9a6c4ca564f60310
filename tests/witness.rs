//! The witness over real QUIC with mutual TLS on loopback: grants, refusals,
//! durable tokens across a restart, no grant before its record is durable,
//! only a VM's two sites served, a state directory without its file
//! refused, foreign certificates refused, garbage survived.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use failover::{Message, SiteId, Timers};
use remus_wan::witness::frame::{read_message, write_message};
use remus_wan::witness::{
    LeaseStore, LeaseStoreError, VmSites, WitnessError, WitnessOptions, WitnessServer,
};
use wan::transport::{Endpoint, TlsPaths, TransportConfig};

fn pki(dir: &Path) {
    support::pki(dir, &["dc1", "dc2", "dc3", "witness"]);
}

fn timers() -> Timers {
    Timers {
        heartbeat_interval: Duration::from_millis(50),
        detection_timeout: Duration::from_millis(600),
        lease: Duration::from_millis(400),
        renew_interval: Duration::from_millis(100),
        clock_margin: Duration::from_millis(20),
    }
}

/// No lease changes hands for this long after the witness starts.
fn quarantine() -> Duration {
    timers().lease + timers().clock_margin
}

/// Three sites; web1 runs at dc1 and dc2, db1 at dc2 and dc3.
fn options(pki: &Path, state: &Path) -> WitnessOptions {
    let vm = |vm: &str, primary: &str, backup: &str| VmSites {
        vm: vm.into(),
        primary: primary.into(),
        backup: backup.into(),
    };
    WitnessOptions {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: TlsPaths::in_dir(pki, "witness"),
        sites: vec!["dc1".into(), "dc2".into(), "dc3".into()],
        vms: vec![vm("web1", "dc1", "dc2"), vm("db1", "dc2", "dc3")],
        timers: timers(),
        state_dir: state.to_owned(),
    }
}

fn start(
    pki: &Path,
    state: &Path,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = WitnessServer::bind(options(pki, state)).expect("witness binds");
    let addr = server.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    (addr, tx, task)
}

struct Client {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _endpoint: Endpoint,
    _conn: wan::transport::Connection,
    req: u64,
}

impl Client {
    async fn connect(tls: TlsPaths, witness: SocketAddr) -> Result<Self, String> {
        let endpoint = Endpoint::bind(
            "127.0.0.1:0".parse().expect("addr"),
            TransportConfig::new(tls),
        )
        .map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect(witness, "witness")
            .await
            .map_err(|e| e.to_string())?;
        let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        Ok(Self {
            send,
            recv,
            _endpoint: endpoint,
            _conn: conn,
            req: 0,
        })
    }

    /// Asks for web1's lease; returns (granted, token, holder).
    async fn request(&mut self, token: u64) -> (bool, u64, Option<SiteId>) {
        self.request_vm("web1", token).await
    }

    async fn request_vm(&mut self, vm: &str, token: u64) -> (bool, u64, Option<SiteId>) {
        self.ask(vm, token, Duration::from_secs(10))
            .await
            .expect("witness answers in time")
    }

    /// Asks for a VM's lease; `None` if no answer came within `wait`.
    async fn ask(
        &mut self,
        vm: &str,
        token: u64,
        wait: Duration,
    ) -> Option<(bool, u64, Option<SiteId>)> {
        self.req += 1;
        let msg = Message::LeaseRequest {
            req: self.req,
            token,
        };
        write_message(&mut self.send, vm, &msg).await.expect("send");
        let reply = tokio::time::timeout(wait, read_message(&mut self.recv))
            .await
            .ok()?
            .expect("valid reply")
            .expect("stream open");
        match reply {
            (
                name,
                Message::LeaseReply {
                    req,
                    granted,
                    token,
                    holder,
                },
            ) => {
                assert_eq!(name, vm);
                assert_eq!(req, self.req, "a reply to an earlier request came late");
                Some((granted.is_some(), token, holder))
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }

    /// Asks until granted (a started witness gives no lease away for one
    /// lease period); returns the token.
    async fn until_granted(&mut self, token: u64) -> u64 {
        let start = Instant::now();
        loop {
            let (granted, t, _) = self.request(token).await;
            if granted {
                return t;
            }
            assert!(
                start.elapsed() < quarantine() + Duration::from_secs(5),
                "never granted"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test]
async fn one_holder_at_a_time_and_tokens_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let state = dir.path().join("state");
    let (addr, stop, task) = start(&pki_dir, &state);

    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    // A first start (the state directory did not exist): nobody gets the
    // lease for one lease period, then the first to ask.
    let (granted, token, holder) = dc1.request(0).await;
    assert_eq!(
        (granted, token, holder),
        (false, 0, None),
        "before any grant a refusal names no token (a site demotes on a higher one)"
    );
    let t1 = dc1.until_granted(0).await;
    assert!(
        t1 > 1_000_000_000_000_000,
        "tokens begin above the state's floor (the clock in microseconds): {t1}"
    );
    assert_eq!(dc2.request(0).await, (false, t1, Some(SiteId(1))));
    assert_eq!(
        dc1.request(t1).await,
        (true, t1, Some(SiteId(1))),
        "renewal keeps the token"
    );
    let stored = std::fs::read_to_string(state.join("witness-leases.json")).expect("persisted");
    assert!(stored.contains("\"dc1\""), "{stored}");

    // Restart the witness on the same state.
    let _ = stop.send(());
    task.await.expect("witness task");
    drop((dc1, dc2));
    let (addr, stop, task) = start(&pki_dir, &state);
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    // Right after a restart nobody but the recorded holder gets the lease.
    assert_eq!(dc2.request(t1).await, (false, t1, Some(SiteId(1))));
    assert_eq!(dc1.request(t1).await, (true, t1, Some(SiteId(1))));
    // dc1 stops renewing: once its lease has run out, dc2 gets a new token.
    let mut granted = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = dc2.request(t1).await;
        if r.0 {
            granted = Some(r);
            break;
        }
    }
    assert_eq!(granted, Some((true, t1 + 1, Some(SiteId(2)))));
    // And the old holder is refused, learning the newer token.
    assert_eq!(dc1.request(t1).await, (false, t1 + 1, Some(SiteId(2))));
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let other = dir.path().join("other");
    pki(&other);
    let (addr, stop, task) = start(&pki_dir, &dir.path().join("state"));
    let err = match Client::connect(TlsPaths::in_dir(&other, "dc1"), addr).await {
        Ok(mut c) => {
            // The handshake may complete on the client before the server
            // refuses; then the first request fails instead.
            c.req += 1;
            let msg = Message::LeaseRequest { req: 1, token: 0 };
            let _ = write_message(&mut c.send, "web1", &msg).await;
            match tokio::time::timeout(Duration::from_secs(10), read_message(&mut c.recv)).await {
                Ok(Ok(Some(r))) => panic!("a foreign certificate got an answer: {r:?}"),
                _ => "refused after handshake".to_string(),
            }
        }
        Err(e) => e,
    };
    assert!(!err.is_empty());
    // The witness still serves its own sites.
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    dc1.until_granted(0).await;
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[tokio::test]
async fn garbage_closes_that_stream_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let (addr, stop, task) = start(&pki_dir, &dir.path().join("state"));
    let mut bad = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    bad.send
        .write_all(&[40, 0, 9, 9, 9, 9])
        .await
        .expect("write");
    bad.send.write_all(&[0u8; 40]).await.expect("write");
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    dc1.until_granted(0).await;
    let _ = stop.send(());
    task.await.expect("witness task");
}

#[test]
fn witness_cli_refuses_a_config_without_witness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/two-site.toml"),
    )
    .expect("example");
    let start = text.find("[witness]").expect("witness section");
    let end = text.find("[[vms]]").expect("vms");
    std::fs::write(&cfg, format!("{}{}", &text[..start], &text[end..])).expect("write");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .args(["witness", "--config"])
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("[witness]"));
}

/// The witness cannot write its state file (a directory sits where the
/// temporary file goes, which defeats even root): no lease is granted, not
/// even on a repeated request, and the witness's record stays as it was.
/// Once writes succeed the next request is granted, and a restarted witness
/// knows that grant.
#[tokio::test]
async fn no_grant_is_sent_before_its_record_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let state = dir.path().join("state");
    let (addr, stop, task) = start(&pki_dir, &state);
    let blocker = state.join("witness-leases.json.tmp");
    std::fs::create_dir(&blocker).expect("block writes");
    tokio::time::sleep(quarantine() + Duration::from_millis(50)).await;
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    for _ in 0..4 {
        assert_eq!(
            dc1.ask("web1", 0, Duration::from_millis(700)).await,
            None,
            "granted although the record could not be written"
        );
    }
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    // The lease is free (dc1 was granted nothing): dc2's request is a
    // grant too, and unanswered too.
    assert_eq!(dc2.ask("web1", 0, Duration::from_millis(700)).await, None);
    std::fs::remove_dir(&blocker).expect("unblock writes");
    // The unanswered requests left nothing behind: dc2 asks and gets it.
    let (granted, t, holder) = dc2.request(0).await;
    assert_eq!((granted, holder), (true, Some(SiteId(2))));
    let (store, _) = LeaseStore::open(&state).expect("state");
    assert_eq!(t, store.token_floor() + 1, "the first token of the state");
    assert_eq!(store.leases()["web1"].holder.as_deref(), Some("dc2"));
    assert_eq!(dc1.request(0).await, (false, t, Some(SiteId(2))));
    let _ = stop.send(());
    task.await.expect("witness task");
    drop((dc1, dc2));
    let (addr, stop, task) = start(&pki_dir, &state);
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    assert_eq!(
        dc1.request(0).await,
        (false, t, Some(SiteId(2))),
        "the restarted witness knows the grant"
    );
    let _ = stop.send(());
    task.await.expect("witness task");
}

/// dc3 is a site of the deployment but not of web1: it never gets web1's
/// lease, even when the lease is free; nobody gets a VM's lease the
/// witness does not know.
#[tokio::test]
async fn only_a_vms_primary_and_backup_may_hold_its_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let (addr, stop, task) = start(&pki_dir, &dir.path().join("state"));
    tokio::time::sleep(quarantine() + Duration::from_millis(50)).await;
    let mut dc3 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc3"), addr)
        .await
        .expect("dc3");
    for _ in 0..3 {
        assert_eq!(dc3.request(0).await, (false, 0, None));
    }
    assert_eq!(dc3.request_vm("mail", 0).await, (false, 0, None));
    // dc3 is one of db1's sites.
    assert!(dc3.request_vm("db1", 0).await.0);
    let mut dc1 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc1"), addr)
        .await
        .expect("dc1");
    assert!(dc1.request(0).await.0, "web1's lease was still free");
    assert_eq!(dc1.request_vm("db1", 0).await, (false, 0, None));
    let _ = stop.send(());
    task.await.expect("witness task");
}

/// A state directory that exists without the state file (a first start in
/// a directory created beforehand, an unmounted disk, a lost file) is
/// refused, with what to do; nothing is created in it.
#[test]
fn a_state_directory_without_its_file_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    match WitnessServer::bind(options(&pki_dir, &state)) {
        Err(WitnessError::Store(e @ LeaseStoreError::Missing { .. })) => {
            assert!(e.to_string().contains("--init"), "{e}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a witness started on a directory without its state file"),
    }
    assert_eq!(std::fs::read_dir(&state).expect("ls").count(), 0);
    std::fs::write(state.join(LeaseStore::FILE), "{\"web1\": ").expect("write");
    assert!(matches!(
        WitnessServer::bind(options(&pki_dir, &state)),
        Err(WitnessError::Store(LeaseStoreError::Corrupt { .. }))
    ));
}

/// A local deployment with a witness (its files written).
fn deployment(dir: &Path) -> std::path::PathBuf {
    remus_wan::testbed::LocalDeployment {
        dir: dir.to_owned(),
        guest_image: dir.join("netguest.elf"),
        epoch_interval_ms: 100,
        memory_mib: 64,
        ports: (17601, 17602),
        dc2_connect_port: None,
        tap: "rw-wtest".into(),
        mac: "52:54:00:12:34:99".into(),
        witness_port: Some(17603),
    }
    .write()
    .expect("deployment")
}

/// Runs `remus-wan witness ARGS`; a witness still running after 10 s (it
/// started serving) is killed and reported as `None`.
fn witness_cli(args: &[&std::ffi::OsStr]) -> Option<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_remus-wan"))
        .arg("witness")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return Some(child.wait_with_output().expect("output"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `remus-wan witness` on a directory without its state file, or with a
/// corrupt one, exits with 3 (configuration/state) and says what to do;
/// `--init` creates the state once (exit 0) and refuses to overwrite it
/// (exit 4).
#[test]
fn witness_cli_refuses_a_missing_state_and_init_creates_it_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = deployment(dir.path());
    let state = dir.path().join("state");
    std::fs::create_dir(&state).expect("mkdir");
    let (cfg, state_os) = (cfg.as_os_str(), state.as_os_str());
    let run = |extra: &[&str]| {
        let mut args = vec!["--config".as_ref(), cfg, "--state-dir".as_ref(), state_os];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        witness_cli(&args)
    };
    let out = run(&[]).expect("a witness without its state file must not run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("witness --init"), "{stderr}");

    std::fs::write(state.join(LeaseStore::FILE), "not json").expect("write");
    let out = run(&[]).expect("a witness with a corrupt state file must not run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");

    let out = run(&["--init"]).expect("init exits");
    assert_eq!(out.status.code(), Some(4), "--init never overwrites a file");
    assert_eq!(
        std::fs::read_to_string(state.join(LeaseStore::FILE)).expect("read"),
        "not json"
    );
    std::fs::remove_file(state.join(LeaseStore::FILE)).expect("rm");
    let out = run(&["--init", "--token-floor", "18000000000000000000"]).expect("init exits");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (store, _) = LeaseStore::open(&state).expect("a state now");
    assert_eq!(store.token_floor(), 18_000_000_000_000_000_000);
}

/// A whole site's VMs ask for their leases at once (what a failed site's
/// backup does): the witness writes the records it queued while a write
/// was syncing together, and every VM gets its lease, all of them on
/// disk under the tokens granted.
#[tokio::test]
async fn a_site_full_of_vms_all_get_their_leases_and_all_are_durable() {
    const VMS: usize = 24;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki_dir = dir.path().join("pki");
    pki(&pki_dir);
    let state = dir.path().join("state");
    let names: Vec<String> = (0..VMS).map(|i| format!("vm{i}")).collect();
    let mut opts = options(&pki_dir, &state);
    opts.vms = names
        .iter()
        .map(|vm| VmSites {
            vm: vm.clone(),
            primary: "dc1".into(),
            backup: "dc2".into(),
        })
        .collect();
    let server = WitnessServer::bind(opts).expect("witness binds");
    let addr = server.local_addr().expect("addr");
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    let mut dc2 = Client::connect(TlsPaths::in_dir(&pki_dir, "dc2"), addr)
        .await
        .expect("dc2");
    tokio::time::sleep(quarantine()).await;

    // All requests back to back on one stream, then the replies in any
    // order; a VM refused (still in the start-up period) asks again.
    let mut tokens: std::collections::BTreeMap<String, u64> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokens.len() < VMS {
        assert!(Instant::now() < deadline, "granted only {tokens:?}");
        let asking: Vec<&String> = names.iter().filter(|n| !tokens.contains_key(*n)).collect();
        for vm in &asking {
            dc2.req += 1;
            let msg = Message::LeaseRequest {
                req: dc2.req,
                token: 0,
            };
            write_message(&mut dc2.send, vm, &msg).await.expect("send");
        }
        for _ in 0..asking.len() {
            let reply = tokio::time::timeout(Duration::from_secs(10), read_message(&mut dc2.recv))
                .await
                .expect("the witness answers every request")
                .expect("valid reply")
                .expect("stream open");
            match reply {
                (vm, Message::LeaseReply { granted, token, .. }) => {
                    if granted.is_some() {
                        tokens.insert(vm, token);
                    }
                }
                other => panic!("unexpected reply {other:?}"),
            }
        }
    }
    let _ = stop.send(());
    let _ = task.await;
    let (store, _) = LeaseStore::open(&state).expect("state");
    for (vm, token) in &tokens {
        assert!(*token > store.token_floor(), "{vm}: token {token}");
        let rec = &store.leases()[vm];
        assert_eq!(
            (rec.holder.as_deref(), rec.token),
            (Some("dc2"), *token),
            "{vm}'s grant is on disk"
        );
    }
}
