//! The figures of a running `protect` or `standby`, served over HTTP:
//! `/metrics` in the Prometheus text format, `/status` as JSON for
//! `remus-wan status`.
//!
//! The same endpoint takes control requests (`POST /switchover/<vm>`, from
//! `remus-wan switchover`): from loopback clients only, and only with the
//! process's control token. At start the process writes a random token to
//! [`control_token_path`] (mode 0600 in a 0700 directory of its own user,
//! root in production); a request must carry it as
//! `Authorization: Bearer <token>`, so only that user can move a VM. The
//! file's name holds the port and the network namespace, so processes on
//! one host (or in network namespaces of one host) never share one.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

/// One protected (or replicated) VM as `status` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VmStatus {
    pub vm: String,
    pub role: String,
    pub state: String,
    pub peer: String,
    pub epochs: u64,
    pub committed_epoch: u64,
    pub epoch_rate_hz: f64,
    pub pause_p50_us: Option<u64>,
    pub pause_p99_us: Option<u64>,
    pub dirty_pages_per_epoch: f64,
    pub raw_bytes_per_epoch: f64,
    pub wire_bytes_per_epoch: f64,
    pub compression_ratio: f64,
    pub lag_epochs: u64,
    pub rtt_ms: Option<f64>,
    pub output_held_bytes: u64,
    pub output_dropped_frames: u64,
    pub epochs_rejected: u64,
    pub interval_ms: u64,
    /// Forward error correction (primary): repair and mirror bytes and
    /// datagrams sent over every replication link of this VM; none when
    /// no FEC link was used.
    #[serde(default)]
    pub fec_redundant_bytes: Option<u64>,
    #[serde(default)]
    pub fec_datagrams: Option<u64>,
    /// Forward error correction (standby): data shards rebuilt from the
    /// primary's repairs instead of waiting for their retransmission.
    #[serde(default)]
    pub fec_rebuilt_shards: Option<u64>,
    /// The failover state, when a witness arbitrates.
    #[serde(default)]
    pub failover: Option<FailoverStatus>,
    /// The last (or running) online verify of the replica.
    #[serde(default)]
    pub verify: Option<crate::engine::verify::VerifyProgress>,
    /// Totals over every verify run of this process.
    #[serde(default)]
    pub verify_totals: VerifyTotals,
    /// For a consistency group (`vm` is then the group's name): its VMs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
}

/// Online verify totals (counters of `/metrics`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyTotals {
    pub runs: u64,
    pub pages_checked: u64,
    pub blocks_checked: u64,
    pub mismatches: u64,
    pub repaired: u64,
}

/// One VM's failover state at this site.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FailoverStatus {
    /// active, standby, candidate or idle.
    pub stance: String,
    /// The witness lease's fencing token this site knows.
    pub token: u64,
    /// This site may release the VM's output now (lease or peer promise).
    pub output_allowed: bool,
    pub peer_link_up: bool,
    pub witness_link_up: bool,
}

impl FailoverStatus {
    pub fn from_snapshot(s: &crate::arbiter::Snapshot) -> Self {
        Self {
            stance: format!("{:?}", s.stance).to_lowercase(),
            token: s.token,
            output_allowed: s
                .release_until
                .is_some_and(|t| std::time::Instant::now() < t),
            peer_link_up: s.peer_link_up,
            witness_link_up: s.witness_link_up,
        }
    }
}

/// What the process publishes; updated by the engine, read by the server.
pub type Published = Arc<Mutex<Vec<VmStatus>>>;

/// Replaces the status of `v.vm` (or adds it), keeping the list sorted by
/// VM name: a site daemon publishes every VM it serves into one list.
/// A group's members (set by the daemon, see [`set_members`]) stay when
/// the engine publishes without them.
pub fn publish_vm(p: &Published, mut v: VmStatus) {
    let mut list = p.lock().unwrap_or_else(|e| e.into_inner());
    match list.binary_search_by(|x| x.vm.as_str().cmp(&v.vm)) {
        Ok(i) => {
            if v.members.is_empty() {
                v.members = std::mem::take(&mut list[i].members);
            }
            list[i] = v
        }
        Err(i) => list.insert(i, v),
    }
}

/// Declares `unit` a consistency group of `members` in the status (an
/// entry in state `starting` until the engine publishes).
pub fn set_members(p: &Published, unit: &str, members: Vec<String>) {
    let mut list = p.lock().unwrap_or_else(|e| e.into_inner());
    match list.binary_search_by(|x| x.vm.as_str().cmp(unit)) {
        Ok(i) => list[i].members = members,
        Err(i) => list.insert(
            i,
            VmStatus {
                vm: unit.to_owned(),
                state: "starting".into(),
                members,
                ..Default::default()
            },
        ),
    }
}

/// Drops `vm` from the list (the daemon no longer serves it).
pub fn unpublish_vm(p: &Published, vm: &str) {
    let mut list = p.lock().unwrap_or_else(|e| e.into_inner());
    list.retain(|x| x.vm != vm);
}

/// Prometheus text exposition of the statuses.
pub fn render_prometheus(vms: &[VmStatus]) -> String {
    let mut out = String::new();
    let metric = |out: &mut String,
                  name: &str,
                  help: &str,
                  kind: &str,
                  f: &dyn Fn(&VmStatus) -> Option<f64>| {
        let _ = writeln!(out, "# HELP remus_wan_{name} {help}");
        let _ = writeln!(out, "# TYPE remus_wan_{name} {kind}");
        for v in vms {
            if let Some(x) = f(v) {
                let _ = writeln!(
                    out,
                    "remus_wan_{name}{{vm=\"{}\",role=\"{}\"}} {x}",
                    escape(&v.vm),
                    escape(&v.role)
                );
            }
        }
    };
    metric(
        &mut out,
        "epochs_total",
        "Epochs sent (primary) or received (standby).",
        "counter",
        &|v| Some(v.epochs as f64),
    );
    metric(
        &mut out,
        "committed_epoch",
        "Last epoch committed at the backup.",
        "gauge",
        &|v| Some(v.committed_epoch as f64),
    );
    metric(
        &mut out,
        "epoch_rate_hz",
        "Checkpoints per second.",
        "gauge",
        &|v| Some(v.epoch_rate_hz),
    );
    metric(
        &mut out,
        "pause_p50_seconds",
        "Median guest pause per checkpoint.",
        "gauge",
        &|v| v.pause_p50_us.map(|u| u as f64 / 1e6),
    );
    metric(
        &mut out,
        "pause_p99_seconds",
        "99th percentile guest pause per checkpoint.",
        "gauge",
        &|v| v.pause_p99_us.map(|u| u as f64 / 1e6),
    );
    metric(
        &mut out,
        "dirty_pages_per_epoch",
        "Mean dirty pages per epoch.",
        "gauge",
        &|v| Some(v.dirty_pages_per_epoch),
    );
    metric(
        &mut out,
        "raw_bytes_per_epoch",
        "Mean bytes per epoch before encoding.",
        "gauge",
        &|v| Some(v.raw_bytes_per_epoch),
    );
    metric(
        &mut out,
        "wire_bytes_per_epoch",
        "Mean bytes per epoch on the wire.",
        "gauge",
        &|v| Some(v.wire_bytes_per_epoch),
    );
    metric(
        &mut out,
        "compression_ratio",
        "Raw bytes over wire bytes.",
        "gauge",
        &|v| Some(v.compression_ratio),
    );
    metric(
        &mut out,
        "lag_epochs",
        "Epochs sent and not yet committed at the backup.",
        "gauge",
        &|v| Some(v.lag_epochs as f64),
    );
    metric(
        &mut out,
        "fec_redundant_bytes_total",
        "Forward error correction bytes sent (repair and mirror datagrams) beside the replication stream.",
        "counter",
        &|v| v.fec_redundant_bytes.map(|b| b as f64),
    );
    metric(
        &mut out,
        "fec_datagrams_total",
        "Forward error correction datagrams sent.",
        "counter",
        &|v| v.fec_datagrams.map(|n| n as f64),
    );
    metric(
        &mut out,
        "fec_rebuilt_shards_total",
        "Stream shards the backup rebuilt from forward error correction repairs instead of waiting for them.",
        "counter",
        &|v| v.fec_rebuilt_shards.map(|n| n as f64),
    );
    metric(
        &mut out,
        "link_rtt_seconds",
        "Smoothed round-trip time to the peer site.",
        "gauge",
        &|v| v.rtt_ms.map(|m| m / 1e3),
    );
    metric(
        &mut out,
        "output_held_bytes",
        "Guest output held until its epoch commits.",
        "gauge",
        &|v| Some(v.output_held_bytes as f64),
    );
    metric(
        &mut out,
        "output_dropped_frames_total",
        "Guest frames dropped because held output was full.",
        "counter",
        &|v| Some(v.output_dropped_frames as f64),
    );
    metric(
        &mut out,
        "epochs_rejected_total",
        "Epochs the standby refused (corrupt, wrong base).",
        "counter",
        &|v| Some(v.epochs_rejected as f64),
    );
    metric(
        &mut out,
        "epoch_interval_seconds",
        "Checkpoint interval in force (stretched when the link falls behind).",
        "gauge",
        &|v| Some(v.interval_ms as f64 / 1e3),
    );
    for (name, help, f) in [
        (
            "verify_runs_total",
            "Online verify runs started.",
            (|t: &VerifyTotals| t.runs) as fn(&VerifyTotals) -> u64,
        ),
        (
            "verify_pages_checked_total",
            "Memory pages compared with the replica by online verify.",
            |t| t.pages_checked,
        ),
        (
            "verify_blocks_checked_total",
            "Disk blocks compared with the replica by online verify.",
            |t| t.blocks_checked,
        ),
        (
            "verify_mismatches_total",
            "Pages and blocks online verify found different in the replica.",
            |t| t.mismatches,
        ),
        (
            "verify_repaired_total",
            "Differing pages and blocks resent and found equal afterwards.",
            |t| t.repaired,
        ),
    ] {
        metric(&mut out, name, help, "counter", &|v| {
            (v.role == "primary").then(|| f(&v.verify_totals) as f64)
        });
    }
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    metric(
        &mut out,
        "fencing_token",
        "Witness lease fencing token known at this site.",
        "gauge",
        &|v| v.failover.as_ref().map(|f| f.token as f64),
    );
    metric(
        &mut out,
        "output_allowed",
        "1 while this site may release the VM's output (witness lease or backup promise).",
        "gauge",
        &|v| v.failover.as_ref().map(|f| flag(f.output_allowed)),
    );
    metric(
        &mut out,
        "peer_link_up",
        "1 while the failover link to the other site is up.",
        "gauge",
        &|v| v.failover.as_ref().map(|f| flag(f.peer_link_up)),
    );
    metric(
        &mut out,
        "witness_link_up",
        "1 while the link to the witness is up.",
        "gauge",
        &|v| v.failover.as_ref().map(|f| flag(f.witness_link_up)),
    );
    if vms.iter().any(|v| !v.members.is_empty()) {
        let _ = writeln!(
            out,
            "# HELP remus_wan_group_member 1 for each VM of a consistency group (the group's series carry vm=\"<group>\")"
        );
        let _ = writeln!(out, "# TYPE remus_wan_group_member gauge");
        for v in vms {
            for m in &v.members {
                let _ = writeln!(
                    out,
                    "remus_wan_group_member{{group=\"{}\",vm=\"{}\"}} 1",
                    escape(&v.vm),
                    escape(m)
                );
            }
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// An operator's request to a running process (from this host only).
#[derive(Debug)]
pub enum ControlRequest {
    /// Planned move of the VM to its backup site.
    Switchover {
        vm: String,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
    /// Online verify of the replica (`remus-wan verify`): the answer comes
    /// as soon as the run starts (its number); progress is in `/status`.
    Verify {
        vm: String,
        scope: crate::engine::verify::Scope,
        repair: bool,
        reply: tokio::sync::oneshot::Sender<Result<String, String>>,
    },
}

/// Where control requests go: filled by whatever runs a VM in the process
/// (a standby only once it has taken over).
pub type ControlSlot = Arc<Mutex<Option<tokio::sync::mpsc::Sender<ControlRequest>>>>;

/// Environment variable naming the directory of control token files.
pub const RUN_DIR_ENV: &str = "REMUS_WAN_RUN_DIR";

/// Where control token files live: `$REMUS_WAN_RUN_DIR`, else
/// `/run/remus-wan` for root, else `$XDG_RUNTIME_DIR/remus-wan`, else
/// `remus-wan-<uid>` in the temporary directory.
pub fn run_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(RUN_DIR_ENV).filter(|d| !d.is_empty()) {
        return d.into();
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return "/run/remus-wan".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => Path::new(&d).join("remus-wan"),
        None => std::env::temp_dir().join(format!("remus-wan-{uid}")),
    }
}

/// The control token file of the process serving control requests on
/// `port` in this network namespace: `control-<port>-net<namespace
/// inode>.token` in `run_dir`.
pub fn control_token_path(run_dir: &Path, port: u16) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata("/proc/thread-self/ns/net") {
        Ok(m) => run_dir.join(format!("control-{port}-net{}.token", m.ino())),
        Err(_) => run_dir.join(format!("control-{port}.token")),
    }
}

/// The control token a process requires, and its file (removed when the
/// serving task ends).
struct ControlToken {
    token: String,
    path: PathBuf,
}

impl Drop for ControlToken {
    fn drop(&mut self) {
        // Only if still ours (never a later process's file).
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t.trim() == self.token) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Creates `dir` (mode 0700) if needed and checks that only this user can
/// write to it.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let m = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory owned by uid {uid} and writable by it only \
                 (found owner {}, mode {:o})",
                dir.display(),
                m.uid(),
                m.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// 32 random bytes as hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes a new random token to `path` (mode 0600, replacing the file at
/// once so that a reader never sees half of it).
fn write_token_file(path: &Path) -> std::io::Result<ControlToken> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    private_dir(dir)?;
    let token = random_token()?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("control"),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(ControlToken {
        token,
        path: path.to_owned(),
    })
}

/// Reads a control token file (for `remus-wan switchover`).
pub fn read_control_token(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}

/// Compares without stopping at the first difference.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// The bearer token of a request head, if any.
fn bearer(head: &str) -> Option<&str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return None;
        }
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    })
}

/// Serves `/metrics` and `/status` until the task is dropped.
pub async fn serve(addr: SocketAddr, published: Published) -> std::io::Result<SocketAddr> {
    serve_inner(addr, published, None).await
}

/// As [`serve`], also accepting `POST /switchover/<vm>` from loopback
/// clients carrying the control token (the `remus-wan switchover`
/// command) into `control`. The token file is
/// [`control_token_path`]`(`[`run_dir`]`(), port)`; if it cannot be
/// written, every control request is refused (and this is logged).
pub async fn serve_with_control(
    addr: SocketAddr,
    published: Published,
    control: ControlSlot,
) -> std::io::Result<SocketAddr> {
    serve_with_control_in(addr, published, control, &run_dir()).await
}

/// As [`serve_with_control`], with the token file in `run_dir`.
pub async fn serve_with_control_in(
    addr: SocketAddr,
    published: Published,
    control: ControlSlot,
    run_dir: &Path,
) -> std::io::Result<SocketAddr> {
    serve_inner(addr, published, Some((control, run_dir.to_owned()))).await
}

async fn serve_inner(
    addr: SocketAddr,
    published: Published,
    control: Option<(ControlSlot, PathBuf)>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics on http://{local}/metrics, status on /status");
    let (control, token) = match control {
        None => (ControlSlot::default(), None),
        Some((slot, dir)) => {
            let path = control_token_path(&dir, local.port());
            match write_token_file(&path) {
                Ok(t) => {
                    info!(file = %path.display(), "control token written (remus-wan switchover reads it)");
                    (slot, Some(Arc::new(t)))
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot write the control token: control requests (switchover) are refused");
                    (slot, None)
                }
            }
        }
    };
    tokio::spawn(async move {
        // Owns the token file: removed when this task ends.
        let token = token;
        loop {
            let Ok((mut sock, client)) = listener.accept().await else {
                continue;
            };
            let published = published.clone();
            let control = control.clone();
            let token = token.clone();
            tokio::spawn(async move {
                // The request head may arrive in several segments.
                let mut buf = vec![0u8; 2048];
                let mut n = 0;
                let read_head = async {
                    while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf[n..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(k) => n += k,
                        }
                    }
                };
                if tokio::time::timeout(std::time::Duration::from_secs(5), read_head)
                    .await
                    .is_err()
                    || n == 0
                {
                    return;
                }
                let req = String::from_utf8_lossy(&buf[..n]);
                let method = req.split_whitespace().next().unwrap_or("GET");
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let vms = published.lock().map(|v| v.clone()).unwrap_or_default();
                let switchover = path.strip_prefix("/switchover/").map(str::to_owned);
                let (code, ctype, body) = match (method, path) {
                    ("POST", _) if switchover.is_some() => {
                        let vm = switchover.unwrap_or_default();
                        let sender = control.lock().ok().and_then(|c| c.clone());
                        let (code, body) = control_request(
                            sender,
                            token.as_deref(),
                            &req,
                            client,
                            vm.clone(),
                            "switchover",
                            Box::new(move |reply| ControlRequest::Switchover { vm, reply }),
                        )
                        .await;
                        (code, "text/plain", body)
                    }
                    ("POST", p) if p.starts_with("/verify/") => {
                        let (code, body) = match parse_verify_path(p) {
                            Ok((vm, scope, repair)) => {
                                let sender = control.lock().ok().and_then(|c| c.clone());
                                control_request(
                                    sender,
                                    token.as_deref(),
                                    &req,
                                    client,
                                    vm.clone(),
                                    "verify",
                                    Box::new(move |reply| ControlRequest::Verify {
                                        vm,
                                        scope,
                                        repair,
                                        reply,
                                    }),
                                )
                                .await
                            }
                            Err(why) => ("400 Bad Request", format!("{why}\n")),
                        };
                        (code, "text/plain", body)
                    }
                    (_, path) => match path {
                        "/metrics" => (
                            "200 OK",
                            "text/plain; version=0.0.4",
                            render_prometheus(&vms),
                        ),
                        "/status" => (
                            "200 OK",
                            "application/json",
                            serde_json::to_string(&vms).unwrap_or_else(|_| "[]".into()),
                        ),
                        _ => (
                            "404 Not Found",
                            "text/plain",
                            "try /metrics or /status\n".into(),
                        ),
                    },
                };
                let head = format!(
                    "HTTP/1.1 {code}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                if sock.write_all(head.as_bytes()).await.is_err()
                    || sock.write_all(body.as_bytes()).await.is_err()
                {
                    warn!("metrics client went away");
                }
            });
        }
    });
    Ok(local)
}

/// `/verify/<vm>?scope=all|memory|disk&repair=0|1` (what `remus-wan
/// verify` posts).
pub fn parse_verify_path(
    path: &str,
) -> Result<(String, crate::engine::verify::Scope, bool), String> {
    let rest = path
        .strip_prefix("/verify/")
        .ok_or("not a verify request")?;
    let (vm, query) = rest.split_once('?').unwrap_or((rest, ""));
    if vm.is_empty() {
        return Err("no VM named: /verify/<vm>".into());
    }
    let mut scope = crate::engine::verify::Scope {
        memory: true,
        disk: true,
    };
    let mut repair = false;
    for kv in query.split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=').unwrap_or((kv, "")) {
            ("scope", "all") => {}
            ("scope", "memory") => scope.disk = false,
            ("scope", "disk") => scope.memory = false,
            ("repair", "1") => repair = true,
            ("repair", "0") => repair = false,
            _ => return Err(format!("unknown verify parameter {kv:?}")),
        }
    }
    Ok((vm.to_owned(), scope, repair))
}

/// The closure that makes the engine's request from its reply channel.
type MakeRequest =
    Box<dyn FnOnce(tokio::sync::oneshot::Sender<Result<String, String>>) -> ControlRequest + Send>;

async fn control_request(
    control: Option<tokio::sync::mpsc::Sender<ControlRequest>>,
    token: Option<&ControlToken>,
    head: &str,
    client: SocketAddr,
    vm: String,
    what: &'static str,
    make: MakeRequest,
) -> (&'static str, String) {
    // Whoever reaches the metrics port must not be able to move a VM:
    // control requests come from this host only...
    if !client.ip().is_loopback() {
        warn!(%client, vm, "control request refused: not from this host");
        return (
            "403 Forbidden",
            "control requests are accepted from this host only\n".into(),
        );
    }
    // ...and from the user running this process (who alone can read the
    // token file).
    let Some(token) = token else {
        warn!(%client, vm, "control request refused: this process has no control token file");
        return (
            "403 Forbidden",
            "control requests are disabled: this process could not write its control token file (see its log)\n".into(),
        );
    };
    match bearer(head) {
        Some(t) if same_secret(t, &token.token) => {}
        given => {
            let why = if given.is_some() {
                "wrong control token"
            } else {
                "no control token"
            };
            warn!(%client, vm, file = %token.path.display(), "control request refused: {why}");
            return (
                "403 Forbidden",
                format!(
                    "{why}: a control request must carry the token in {} (readable by the user running the process)\n",
                    token.path.display()
                ),
            );
        }
    }
    let Some(control) = control else {
        return (
            "404 Not Found",
            "this process takes no control requests\n".into(),
        );
    };
    info!(%client, vm, "{what} requested");
    let (tx, rx) = tokio::sync::oneshot::channel();
    if control.send(make(tx)).await.is_err() {
        return ("503 Service Unavailable", "the engine is stopping\n".into());
    }
    match tokio::time::timeout(std::time::Duration::from_secs(120), rx).await {
        Ok(Ok(Ok(msg))) => ("200 OK", format!("{msg}\n")),
        Ok(Ok(Err(msg))) => ("409 Conflict", format!("{msg}\n")),
        _ => (
            "504 Gateway Timeout",
            "no answer from the engine within 120 s\n".into(),
        ),
    }
}

/// Sends a control request to a running process, with its control token
/// (see [`control_token_path`]); returns its answer.
pub fn post_control(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(130)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: remus-wan\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    Ok((code, body.trim_end().to_owned()))
}

/// Fetches `/status` from a running process (for `remus-wan status`).
pub fn fetch_status(addr: SocketAddr) -> std::io::Result<Vec<VmStatus>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: remus-wan\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
    serde_json::from_str(body).map_err(|e| std::io::Error::other(format!("bad status JSON: {e}")))
}

/// The table `remus-wan status` prints.
pub fn render_table(vms: &[VmStatus]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {:<8} {:<13} {:<6} {:>8} {:>8} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>5} {:>8} {:>10}",
        "VM", "ROLE", "STATE", "PEER", "EPOCHS", "RATE/s", "PAUSE50", "PAUSE99", "DIRTY/ep", "RAW/ep", "WIRE/ep", "RATIO", "LAG", "RTT", "HELD"
    );
    for v in vms {
        let us = |x: Option<u64>| x.map_or("-".into(), |u| format!("{:.2}ms", u as f64 / 1e3));
        let _ = writeln!(
            out,
            "{:<10} {:<8} {:<13} {:<6} {:>8} {:>8.1} {:>9} {:>9} {:>8.0} {:>9} {:>9} {:>6.1} {:>5} {:>8} {:>10}",
            v.vm,
            v.role,
            v.state,
            v.peer,
            v.epochs,
            v.epoch_rate_hz,
            us(v.pause_p50_us),
            us(v.pause_p99_us),
            v.dirty_pages_per_epoch,
            human(v.raw_bytes_per_epoch),
            human(v.wire_bytes_per_epoch),
            v.compression_ratio,
            v.lag_epochs,
            v.rtt_ms.map_or("-".into(), |r| format!("{r:.1}ms")),
            human(v.output_held_bytes as f64),
        );
        if !v.members.is_empty() {
            let _ = writeln!(out, "{:<10} group of: {}", "", v.members.join(", "));
        }
        if let Some(f) = &v.failover {
            let up = |b: bool| if b { "up" } else { "DOWN" };
            let _ = writeln!(
                out,
                "{:<10} failover: {} token {}, output {}, peer link {}, witness link {}",
                "",
                f.stance,
                f.token,
                if f.output_allowed { "allowed" } else { "HELD" },
                up(f.peer_link_up),
                up(f.witness_link_up),
            );
        }
        if let Some(p) = &v.verify {
            let _ = writeln!(
                out,
                "{:<10} verify run {}: {}, {}/{} slices, {} pages + {} blocks checked, {} differences ({} repaired){}",
                "",
                p.run,
                p.state,
                p.slices_done,
                p.slices_total,
                p.pages_checked,
                p.blocks_checked,
                p.mismatches,
                p.repaired,
                p.error.as_ref().map_or(String::new(), |e| format!(": {e}")),
            );
        }
    }
    out
}

fn human(b: f64) -> String {
    if b >= 1e6 {
        format!("{:.1}MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1}kB", b / 1e3)
    } else {
        format!("{b:.0}B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_has_help_type_and_labelled_samples() {
        let v = VmStatus {
            vm: "web\"1".into(),
            role: "primary".into(),
            committed_epoch: 42,
            pause_p50_us: Some(1500),
            fec_redundant_bytes: Some(4096),
            ..Default::default()
        };
        let text = render_prometheus(&[v]);
        assert!(text.contains("# TYPE remus_wan_committed_epoch gauge"));
        assert!(text.contains("remus_wan_committed_epoch{vm=\"web\\\"1\",role=\"primary\"} 42"));
        assert!(
            text.contains("remus_wan_pause_p50_seconds{vm=\"web\\\"1\",role=\"primary\"} 0.0015")
        );
        assert!(text.contains("# TYPE remus_wan_fec_redundant_bytes_total counter"));
        assert!(text.contains(
            "remus_wan_fec_redundant_bytes_total{vm=\"web\\\"1\",role=\"primary\"} 4096"
        ));
        // No sample for a figure that is unknown.
        assert!(!text.contains("remus_wan_link_rtt_seconds{"));
        assert!(!text.contains("remus_wan_fec_datagrams_total{"));
    }

    #[test]
    fn a_daemon_publishes_each_vm_once_and_keeps_group_members() {
        let p = Published::default();
        set_members(&p, "shop", vec!["web1".into(), "db1".into()]);
        for (vm, epochs) in [("web2", 1), ("shop", 2), ("web2", 3), ("alpha", 4)] {
            publish_vm(
                &p,
                VmStatus {
                    vm: vm.into(),
                    role: "primary".into(),
                    epochs,
                    ..Default::default()
                },
            );
        }
        let list = p.lock().unwrap().clone();
        let names: Vec<(&str, u64)> = list.iter().map(|v| (v.vm.as_str(), v.epochs)).collect();
        assert_eq!(names, [("alpha", 4), ("shop", 2), ("web2", 3)]);
        assert_eq!(list[1].members, ["web1", "db1"]);
        let text = render_prometheus(&list);
        assert!(text.contains("remus_wan_group_member{group=\"shop\",vm=\"db1\"} 1"));
        assert!(render_table(&list).contains("group of: web1, db1"));
        unpublish_vm(&p, "shop");
        assert_eq!(p.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn status_round_trips_over_http() {
        let published = Published::default();
        published.lock().unwrap().push(VmStatus {
            vm: "web1".into(),
            role: "standby".into(),
            epochs: 7,
            ..Default::default()
        });
        let addr = serve("127.0.0.1:0".parse().unwrap(), published)
            .await
            .unwrap();
        let got = tokio::task::spawn_blocking(move || fetch_status(addr))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].epochs, 7);
        assert!(render_table(&got).contains("web1"));
    }

    /// A control request without the token, or with a wrong one, is
    /// refused (403) and never reaches the engine; with the token from the
    /// file it is.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn switchover_requests_need_the_control_token() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let slot = ControlSlot::default();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        *slot.lock().unwrap() = Some(tx);
        // The engine: answers every switchover.
        let engine = tokio::spawn(async move {
            let mut asked = Vec::new();
            while let Some(ControlRequest::Switchover { vm, reply }) = rx.recv().await {
                asked.push(vm.clone());
                let _ = reply.send(Ok(format!("{vm} handed over")));
            }
            asked
        });
        let addr = serve_with_control_in(
            "127.0.0.1:0".parse().unwrap(),
            Published::default(),
            slot.clone(),
            &run,
        )
        .await
        .unwrap();
        let file = control_token_path(&run, addr.port());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(&run), 0o700);
        let token = read_control_token(&file).unwrap();
        assert_eq!(token.len(), 64);

        let post = move |t: Option<String>| {
            tokio::task::spawn_blocking(move || {
                post_control(addr, "/switchover/web1", t.as_deref()).unwrap()
            })
        };
        let (code, msg) = post(None).await.unwrap();
        assert_eq!(code, 403, "{msg}");
        assert!(msg.contains("no control token"), "{msg}");
        let (code, msg) = post(Some("0".repeat(64))).await.unwrap();
        assert_eq!(code, 403, "{msg}");
        assert!(msg.contains("wrong control token"), "{msg}");
        let (code, msg) = post(Some(token.clone())).await.unwrap();
        assert_eq!((code, msg.as_str()), (200, "web1 handed over"));

        slot.lock().unwrap().take();
        assert_eq!(
            engine.await.unwrap(),
            ["web1"],
            "refused requests reached the engine"
        );
    }

    /// Processes in different network namespaces never share a token file.
    #[test]
    fn token_files_differ_by_port_and_network_namespace() {
        let run = Path::new("/run/remus-wan");
        assert_ne!(control_token_path(run, 9477), control_token_path(run, 9478));
        let here = control_token_path(run, 9477);
        // SAFETY: unshare(CLONE_NEWNET) affects only this new thread.
        let other = std::thread::spawn(|| {
            (unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0)
                .then(|| control_token_path(Path::new("/run/remus-wan"), 9477))
        })
        .join()
        .unwrap();
        match other {
            Some(p) => assert_ne!(p, here),
            None => eprintln!("not root: network namespace part not checked"),
        }
    }
}
