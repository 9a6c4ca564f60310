//! The figures of a running `protect` or `standby`, served over HTTP:
//! `/metrics` in the Prometheus text format, `/status` as JSON for
//! `remus-wan status`.

use std::fmt::Write as _;
use std::net::SocketAddr;
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
    /// The failover state, when a witness arbitrates.
    #[serde(default)]
    pub failover: Option<FailoverStatus>,
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
}

/// Serves `/metrics` and `/status` until the task is dropped.
pub async fn serve(addr: SocketAddr, published: Published) -> std::io::Result<SocketAddr> {
    serve_with_control(addr, published, None).await
}

/// As [`serve`], also accepting `POST /switchover/<vm>` from loopback
/// clients (the `remus-wan switchover` command) into `control`.
pub async fn serve_with_control(
    addr: SocketAddr,
    published: Published,
    control: Option<tokio::sync::mpsc::Sender<ControlRequest>>,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    info!(addr = %local, "metrics on http://{local}/metrics, status on /status");
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, client)) = listener.accept().await else {
                continue;
            };
            let published = published.clone();
            let control = control.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    sock.read(&mut buf),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let req = String::from_utf8_lossy(&buf[..n]);
                let method = req.split_whitespace().next().unwrap_or("GET");
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let vms = published.lock().map(|v| v.clone()).unwrap_or_default();
                let switchover = path.strip_prefix("/switchover/").map(str::to_owned);
                let (code, ctype, body) = match (method, path) {
                    ("POST", _) if switchover.is_some() => {
                        let vm = switchover.unwrap_or_default();
                        let (code, body) = control_request(control, client, vm).await;
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

async fn control_request(
    control: Option<tokio::sync::mpsc::Sender<ControlRequest>>,
    client: SocketAddr,
    vm: String,
) -> (&'static str, String) {
    // Whoever reaches the metrics port must not be able to move a VM:
    // control requests come from this host only.
    if !client.ip().is_loopback() {
        return (
            "403 Forbidden",
            "control requests are accepted from this host only\n".into(),
        );
    }
    let Some(control) = control else {
        return (
            "404 Not Found",
            "this process takes no control requests\n".into(),
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    if control
        .send(ControlRequest::Switchover { vm, reply: tx })
        .await
        .is_err()
    {
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

/// Sends a control request to a running process; returns its answer.
pub fn post_control(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(3))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(130)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: remus-wan\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
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
            ..Default::default()
        };
        let text = render_prometheus(&[v]);
        assert!(text.contains("# TYPE remus_wan_committed_epoch gauge"));
        assert!(text.contains("remus_wan_committed_epoch{vm=\"web\\\"1\",role=\"primary\"} 42"));
        assert!(
            text.contains("remus_wan_pause_p50_seconds{vm=\"web\\\"1\",role=\"primary\"} 0.0015")
        );
        // No sample for a figure that is unknown.
        assert!(!text.contains("remus_wan_link_rtt_seconds{"));
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
}
