//! `remus-wan bench failback --rounds N`: a soak of failover and failback.
//!
//! One protected micro-VM moves back and forth between two sites N times
//! while a client streams the guest's TCP counter over one connection.
//! Odd rounds SIGKILL the process running the VM (the standby at the other
//! site takes over by itself), even rounds ask it for a planned switchover
//! (`remus-wan switchover`); `--switchover-first` swaps the two. After each
//! move a fresh `remus-wan standby` is started at the site that just lost
//! the VM, and the next round begins only once the running primary reports
//! `protected` with a checkpoint committed at that standby and the stream
//! has moved on.
//!
//! Everything runs as real processes of this binary inside a network
//! namespace the bench creates (a tap with 192.0.2.1/24, the guest at
//! 192.0.2.10, the sites and the witness on loopback). Every child is
//! killed and reaped on the way out, whatever happened, and the namespace
//! vanishes with them. Every wait is on a state (a process's /status, its
//! exit, the client's stream) with an upper bound; a bound that passes
//! fails the round with what was awaited.
//!
//! Figures per round: the fencing token after the move; "first byte": the
//! time from the kill (or the switchover request) to the arrival of the
//! first counter value the old site cannot have sent (see
//! [`Stream::arm`]); gaps and duplicates ([`CounterCheck`]); the longest
//! time without a new value; the bytes the new standby received until its
//! replica became consistent; and the time to be protected again.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::bench_client::ClientThread;

use crate::metrics::VmStatus;
use crate::testbed::{CounterCheck, LocalDeployment};

const TAP: &str = "rwfback0";
const MAC: &str = "52:54:00:12:3a:01";
const GUEST: &str = "192.0.2.10:9000";
/// UDP ports of dc1, dc2 and the witness (loopback of the bench's own
/// namespace, so nothing else can hold them).
const PORTS: (u16, u16) = (17851, 17852);
const WITNESS_PORT: u16 = 17853;
/// Status/control ports: one per process started (127.0.0.1:9600 + k).
const METRICS_BASE: u16 = 9600;
const EPOCH_MS: u64 = 50;
const GUEST_MIB: u64 = 64;
/// A time without a new counter value at least this long counts as a stall
/// (the failover timers' detection timeout is 1 s, so every kill has one).
const STALL_COUNTED: Duration = Duration::from_secs(1);
/// Times without a new value at least this long are listed in the round's
/// timeline (the stream delivers a burst per committed epoch, every 50 ms).
const GAP_LISTED: Duration = Duration::from_millis(250);
/// Values the stream must deliver once the VM is protected again before
/// the next round starts (proof that output flows under protection).
const VALUES_AFTER: u64 = 1000;

// Upper bounds of the waits.
const START_LIMIT: Duration = Duration::from_secs(30);
const SYNC_LIMIT: Duration = Duration::from_secs(120);
const TAKEOVER_LIMIT: Duration = Duration::from_secs(30);
const FIRST_BYTE_LIMIT: Duration = Duration::from_secs(60);
/// `remus-wan switchover` waits up to 130 s for its answer itself.
const SWITCHOVER_LIMIT: Duration = Duration::from_secs(150);
const EXIT_LIMIT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);
/// Attempts of a switchover the running process refuses (exit 4: e.g. the
/// backup a few epochs behind at that instant).
const SWITCHOVER_ATTEMPTS: u32 = 3;

/// What `bench failback` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub rounds: u32,
    pub guest_image: Option<PathBuf>,
    /// A round fails when the stream stalls longer than this.
    pub stall_limit: Duration,
    /// Logs and state; kept. Default: a folder under the temp dir, removed
    /// when every round passed.
    pub work_dir: Option<PathBuf>,
    /// Start with a switchover (then kill, switchover, ...): the kills hit
    /// dc2 and the switchovers go dc1 -> dc2, the other directions.
    pub switchover_first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Kill,
    Switchover,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kill => "kill",
            Kind::Switchover => "switchover",
        }
    }
}

/// Where the bench's processes keep their run-time files (the control
/// endpoint's files, for the processes that write any): the work folder's
/// `run/`, beside the log, rather than the host's shared default.
const RUN_DIR_ENV: &str = "REMUS_WAN_RUN_DIR";

fn run_dir(log: &Path) -> PathBuf {
    log.parent().unwrap_or(Path::new(".")).join("run")
}

/// One `remus-wan` process of the deployment; SIGKILLed and reaped on drop.
pub(super) struct Party {
    name: String,
    site: &'static str,
    child: Option<Child>,
    metrics: SocketAddr,
    log: PathBuf,
    /// Its state folder (standby and witness), removed when it is retired.
    state: Option<PathBuf>,
}

impl Party {
    pub(super) fn spawn(
        bin: &Path,
        name: String,
        site: &'static str,
        args: &[String],
        metrics: SocketAddr,
        log: PathBuf,
        state: Option<PathBuf>,
    ) -> Result<Party> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("creating log {}", log.display()))?;
        let child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .env("REMUS_WAN_LOG_FORMAT", "text")
            .env(RUN_DIR_ENV, run_dir(&log))
            .env_remove("REMUS_WAN_FAULT")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Party {
            name,
            site,
            child: Some(child),
            metrics,
            log,
            state,
        })
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL and reap (nothing if it already ended and was reaped).
    pub(super) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Its exit status if it has ended (reaped then).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(s)) => {
                self.child = None;
                Some(s)
            }
            _ => None,
        }
    }

    /// Waits up to `limit` for it to end by itself.
    fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if self.child.is_none() {
                bail!("{} was already reaped", self.name);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            std::thread::sleep(POLL);
        }
    }

    pub(super) fn status(&self) -> Option<VmStatus> {
        crate::metrics::fetch_status(self.metrics)
            .ok()?
            .into_iter()
            .next()
    }

    pub(super) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it if it still runs and removes its state folder.
    fn retire(mut self) {
        self.kill();
        if let Some(s) = self.state.take() {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

impl Drop for Party {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What one round saw on the stream.
#[derive(Debug, Clone, Default)]
struct StreamRound {
    longest_gap: Duration,
    /// Times without a new value of at least [`STALL_COUNTED`], and their sum.
    stalls: u32,
    stalled: Duration,
    gaps: u32,
    duplicates: u32,
    /// The first few anomalies, described.
    anomalies: Vec<String>,
    /// Where the stream paused for at least [`GAP_LISTED`]: (the last
    /// value before, length).
    gap_list: Vec<(Instant, Duration)>,
}

struct Watch {
    threshold: u64,
    hit: Option<Instant>,
    /// The first value of any kind after the watch began.
    any: Option<Instant>,
}

struct StreamState {
    check: CounterCheck,
    partial: Vec<u8>,
    /// Values received (whatever their order).
    received: u64,
    last_data: Instant,
    round: StreamRound,
    watch: Option<Watch>,
    /// The connection ended or failed: the bench cannot go on.
    fatal: Option<String>,
}

impl StreamState {
    fn on_bytes(&mut self, bytes: &[u8], now: Instant) {
        let gap = now.saturating_duration_since(self.last_data);
        self.round.longest_gap = self.round.longest_gap.max(gap);
        if gap >= STALL_COUNTED {
            self.round.stalls += 1;
            self.round.stalled += gap;
        }
        if gap >= GAP_LISTED && self.round.gap_list.len() < 32 {
            self.round.gap_list.push((self.last_data, gap));
        }
        self.last_data = now;
        let mut partial = std::mem::take(&mut self.partial);
        partial.extend_from_slice(bytes);
        let whole = partial.len() / 8 * 8;
        for c in partial[..whole].chunks_exact(8) {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            let v = u64::from_be_bytes(b);
            // One value at a time: after a gap or a duplicate the check
            // starts again after the value received, so later rounds are
            // still checked.
            if let Err(e) = self.check.feed(c) {
                if v < self.check.next {
                    self.round.duplicates += 1;
                } else {
                    self.round.gaps += 1;
                }
                if self.round.anomalies.len() < 5 {
                    self.round.anomalies.push(e);
                }
                self.check = CounterCheck::default();
                self.check.next = v.saturating_add(1);
            }
            self.received += 1;
            if let Some(w) = &mut self.watch {
                if w.hit.is_none() && v >= w.threshold {
                    w.hit = Some(now);
                }
                w.any.get_or_insert(now);
            }
        }
        partial.drain(..whole);
        self.partial = partial;
    }
}

/// The client: one TCP connection to the guest's counter service, read by
/// a thread of its own until the bench ends.
type Stream = ClientThread<StreamState>;

impl ClientThread<StreamState> {
    fn connect_counter(limit: Duration) -> Result<Stream> {
        let state = StreamState {
            check: CounterCheck::default(),
            partial: Vec::new(),
            received: 0,
            last_data: Instant::now(),
            round: StreamRound::default(),
            watch: None,
            fatal: None,
        };
        let addr: SocketAddr = GUEST.parse()?;
        Stream::connect(
            "counter-client",
            addr,
            limit,
            Duration::from_millis(200),
            state,
            read_stream,
        )
    }

    fn received(&self) -> u64 {
        self.with(|s| s.received)
    }

    fn fatal(&self) -> Option<String> {
        self.with(|s| s.fatal.clone())
    }

    /// Starts a round's figures afresh.
    fn start_round(&self) {
        self.with(|s| {
            s.round = StreamRound::default();
            s.watch = None;
        });
    }

    /// Ends a round: its figures, the time without data so far included.
    fn end_round(&self) -> StreamRound {
        self.with(|s| {
            let mut r = std::mem::take(&mut s.round);
            r.longest_gap = r.longest_gap.max(s.last_data.elapsed());
            r
        })
    }

    /// Called once the old site can send nothing more (killed and reaped,
    /// or handed over and exited): watches for the first value the new
    /// site must have produced. The guest's TCP never sends beyond the
    /// window the client advertised, and that window's right edge never
    /// passes what the client had read plus its receive buffer. So a value
    /// at or beyond (next expected value now) + rcvbuf / 8 was sent after
    /// this moment's reads, i.e. by the VM at the new site; values below it
    /// may be old output still in the kernel's queues. Returns the
    /// threshold.
    fn arm(&self) -> u64 {
        let extra = self.rcvbuf / 8;
        self.with(|s| {
            let threshold = s.check.next + extra;
            s.watch = Some(Watch {
                threshold,
                hit: None,
                any: None,
            });
            threshold
        })
    }

    fn first_new_value(&self) -> Option<Instant> {
        self.with(|s| s.watch.as_ref().and_then(|w| w.hit))
    }

    /// The first value of any kind received after [`Stream::arm`].
    fn first_value_after_arm(&self) -> Option<Instant> {
        self.with(|s| s.watch.as_ref().and_then(|w| w.any))
    }
}

fn read_stream(mut sock: TcpStream, state: &Mutex<StreamState>, stop: &AtomicBool) {
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        let r = sock.read(&mut buf);
        let now = Instant::now();
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        match r {
            Ok(0) => {
                s.fatal = Some("the guest closed the counter connection".into());
                return;
            }
            Ok(n) => s.on_bytes(&buf[..n], now),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                s.fatal = Some(format!("the counter connection failed: {e}"));
                return;
            }
        }
    }
}

/// One round's figures.
#[derive(Debug, Clone)]
struct RoundResult {
    kind: Kind,
    from: &'static str,
    to: &'static str,
    token: u64,
    /// Kill or switchover request -> first value the new site produced.
    first_byte: Duration,
    /// From the new primary's `takeover complete` line.
    activation_ms: Option<f64>,
    stream: StreamRound,
    /// The longest pause of the stream once the new site's values had
    /// begun to arrive (during the resync and after it); `None`: none of at
    /// least [`GAP_LISTED`].
    pause_after_resume: Option<Duration>,
    /// Bytes the new standby received until its replica was consistent.
    resync_bytes: Option<u64>,
    /// New standby started -> protected with a committed checkpoint.
    reprotect: Duration,
    notes: Vec<String>,
}

struct Bench<'a> {
    bin: PathBuf,
    cfg: String,
    dir: &'a Path,
    next_port: u16,
    stall_limit: Duration,
}

impl Bench<'_> {
    fn metrics_addr(&mut self) -> SocketAddr {
        let a = SocketAddr::from(([127, 0, 0, 1], METRICS_BASE + self.next_port));
        self.next_port += 1;
        a
    }

    fn standby(&mut self, site: &'static str, round: u32) -> Result<Party> {
        let metrics = self.metrics_addr();
        let state = self.dir.join("state").join(format!("r{round:02}-{site}"));
        let args: Vec<String> = [
            "standby",
            "--config",
            &self.cfg,
            "--site",
            site,
            "--state-dir",
            &state.to_string_lossy(),
            "--metrics",
            &metrics.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Party::spawn(
            &self.bin,
            format!("standby at {site} (round {round})"),
            site,
            &args,
            metrics,
            self.dir.join(format!("r{round:02}-{site}-standby.log")),
            Some(state),
        )
    }

    /// Waits until `party` answers on its status endpoint.
    fn wait_answering(&self, party: &mut Party) -> Result<()> {
        let deadline = Instant::now() + START_LIMIT;
        while crate::metrics::fetch_status(party.metrics).is_err() {
            if let Some(s) = party.exited() {
                bail!("{} exited ({s}) before serving its status", party.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not serve its status within {START_LIMIT:?}",
                    party.name
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Waits until `primary` protects the VM towards `standby` with a
    /// checkpoint committed there beyond `committed_before`; returns the
    /// bytes the standby received until its replica was consistent.
    fn wait_protected(
        &self,
        primary: &mut Party,
        standby: &mut Party,
        committed_before: u64,
        stream: Option<&Stream>,
    ) -> Result<Option<u64>> {
        let deadline = Instant::now() + SYNC_LIMIT;
        let mut resync_bytes = None;
        let mut last: Option<VmStatus> = None;
        loop {
            for p in [&mut *primary, &mut *standby] {
                if let Some(s) = p.exited() {
                    bail!(
                        "{} exited ({s}) while the VM was being protected again",
                        p.name
                    );
                }
            }
            if let Some(f) = stream.and_then(Stream::fatal) {
                bail!("{f}");
            }
            if resync_bytes.is_none() {
                if let Some(s) = standby.status() {
                    if s.state == "replica ok" {
                        // The standby publishes the mean wire bytes per
                        // committed epoch; times the epochs, the total.
                        resync_bytes =
                            Some((s.wire_bytes_per_epoch * s.epochs as f64).round() as u64);
                    }
                }
            }
            let p = primary.status();
            let done = p.as_ref().is_some_and(|p| {
                p.role == "primary"
                    && p.state == "protected"
                    && p.committed_epoch > committed_before
            });
            if done && resync_bytes.is_some() {
                return Ok(resync_bytes);
            }
            if p.is_some() {
                last = p;
            }
            if Instant::now() > deadline {
                let seen = last.map_or("no status".into(), |s| {
                    format!(
                        "role {}, state {}, committed epoch {} (needed > {committed_before})",
                        s.role, s.state, s.committed_epoch
                    )
                });
                bail!(
                    "{} did not protect the VM towards {} within {SYNC_LIMIT:?}: {seen}; standby replica consistent: {}",
                    primary.name,
                    standby.name,
                    resync_bytes.is_some()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Waits until the stream has delivered `more` values beyond `from`.
    fn wait_values(&self, stream: &Stream, from: u64, more: u64, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        while stream.received() < from + more {
            if let Some(f) = stream.fatal() {
                bail!("{f}");
            }
            if Instant::now() > deadline {
                bail!(
                    "the stream delivered only {} of {more} values within {limit:?}",
                    stream.received().saturating_sub(from)
                );
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Runs the switchover command against `primary`; its success line.
    fn switchover(&self, primary: &Party, to: &str, round: u32) -> Result<(String, Vec<String>)> {
        let mut notes = Vec::new();
        for attempt in 1..=SWITCHOVER_ATTEMPTS {
            let log = self
                .dir
                .join(format!("r{round:02}-switchover-{attempt}.log"));
            let out = std::fs::File::create(&log)?;
            let mut child = Command::new(&self.bin)
                .args([
                    "switchover",
                    "web1",
                    "--to",
                    to,
                    "--config",
                    &self.cfg,
                    "--control",
                    &primary.metrics.to_string(),
                ])
                .env("REMUS_WAN_LOG_FORMAT", "text")
                .env(RUN_DIR_ENV, run_dir(&log))
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .context("spawning remus-wan switchover")?;
            let deadline = Instant::now() + SWITCHOVER_LIMIT;
            let status = loop {
                if let Some(s) = child.try_wait()? {
                    break s;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("remus-wan switchover gave no answer within {SWITCHOVER_LIMIT:?}");
                }
                std::thread::sleep(POLL);
            };
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match status.code() {
                Some(0) => {
                    let line = text
                        .lines()
                        .find(|l| l.contains("handed over"))
                        .unwrap_or("")
                        .trim()
                        .to_owned();
                    return Ok((line, notes));
                }
                Some(4) if attempt < SWITCHOVER_ATTEMPTS => {
                    notes.push(format!("switchover refused once: {}", text.trim()));
                    // Retry once the backup has caught up (bounded).
                    let until = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < until
                        && primary.status().is_none_or(|s| s.lag_epochs > 1)
                    {
                        std::thread::sleep(POLL);
                    }
                }
                _ => bail!("remus-wan switchover failed ({status}): {}", text.trim()),
            }
        }
        bail!("remus-wan switchover refused {SWITCHOVER_ATTEMPTS} times")
    }

    /// One move of the VM away from `primary` (to `standby`), then a fresh
    /// standby at the site it left. On success `primary` and `standby`
    /// hold the new pair.
    fn round(
        &mut self,
        round: u32,
        kind: Kind,
        primary: &mut Party,
        standby: &mut Party,
        stream: &Stream,
    ) -> Result<RoundResult> {
        let from = primary.site;
        let to = standby.site;
        let mut notes = Vec::new();
        stream.start_round();
        let t0 = Instant::now();
        let wall0 = std::time::SystemTime::now();
        match kind {
            Kind::Kill => primary.kill(),
            Kind::Switchover => {
                let (line, n) = self.switchover(primary, to, round)?;
                notes.extend(n);
                if !line.is_empty() {
                    notes.push(line);
                }
                let status = primary.wait_exit(EXIT_LIMIT)?;
                if status.code() != Some(0) {
                    bail!(
                        "{} exited with {status} after handing over (expected 0)",
                        primary.name
                    );
                }
            }
        }
        let mut marks = vec![("old site stopped", Instant::now())];
        stream.arm();
        // The standby becomes the VM's primary.
        let deadline = Instant::now() + TAKEOVER_LIMIT;
        loop {
            if let Some(s) = standby.exited() {
                bail!(
                    "{} exited ({s}) instead of taking the VM over",
                    standby.name
                );
            }
            if standby.status().is_some_and(|s| s.role == "primary") {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not report itself primary within {TAKEOVER_LIMIT:?}",
                    standby.name
                );
            }
            std::thread::sleep(POLL);
        }
        let deadline = Instant::now() + FIRST_BYTE_LIMIT;
        let first = loop {
            if let Some(t) = stream.first_new_value() {
                break t;
            }
            if let Some(f) = stream.fatal() {
                bail!("{f}");
            }
            if Instant::now() > deadline {
                bail!("no counter value from {to} within {FIRST_BYTE_LIMIT:?} of the move");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        if let Some(any) = stream.first_value_after_arm() {
            marks.push(("first value", any));
        }
        marks.push(("first byte", first));
        let log = standby.log_text();
        let takeover = log
            .lines()
            .find(|l| l.contains("takeover complete"))
            .map(str::to_owned);
        let Some(takeover) = takeover else {
            bail!(
                "{} runs the VM but logged no `takeover complete`",
                standby.name
            );
        };
        let activation_ms = field(&takeover, "activation_ms=");
        // Swap: the old standby is the primary now; a new standby at the
        // site the VM left.
        let mut new_standby = self.standby(from, round)?;
        std::mem::swap(primary, standby);
        // `standby` now holds the old primary process (ended): retire it
        // once the new one is in its place.
        std::mem::swap(standby, &mut new_standby);
        let old_log = new_standby.log_text();
        new_standby.retire();
        let committed_before = primary.status().map_or(0, |s| s.committed_epoch);
        let started = Instant::now();
        marks.push(("standby started", started));
        let resync_bytes = self.wait_protected(primary, standby, committed_before, Some(stream))?;
        let reprotect = started.elapsed();
        marks.push(("protected", Instant::now()));
        let token = primary
            .status()
            .and_then(|s| s.failover)
            .map_or(0, |f| f.token);
        let at = stream.received();
        self.wait_values(stream, at, VALUES_AFTER, self.stall_limit)?;
        marks.push(("stream on", Instant::now()));
        // Milestones from the processes' own logs (same host, same clock).
        let new_log = primary.log_text();
        for (text, needle, what) in [
            (&old_log, "switchover done", "lease handed over"),
            (&new_log, "takeover complete", "VM resumed at new site"),
            (&new_log, "a standby answers", "standby connected"),
        ] {
            if let Some(t) = text
                .lines()
                .find(|l| l.contains(needle))
                .and_then(|l| log_instant(l, t0, wall0))
            {
                marks.push((what, t));
            }
        }
        marks.sort_by_key(|m| m.1);
        let stream_figures = stream.end_round();
        notes.push(timeline(t0, &marks, &stream_figures));
        let pause_after_resume = stream_figures
            .gap_list
            .iter()
            .filter(|(from, _)| *from >= first)
            .map(|(_, len)| *len)
            .max();
        Ok(RoundResult {
            kind,
            from,
            to,
            token,
            first_byte: first.saturating_duration_since(t0),
            activation_ms,
            stream: stream_figures,
            pause_after_resume,
            resync_bytes,
            reprotect,
            notes,
        })
    }
}

/// When things happened in a round, in seconds from the kill or the
/// switchover request, and where the stream stalled.
fn timeline(t0: Instant, marks: &[(&str, Instant)], s: &StreamRound) -> String {
    let at = |t: Instant| {
        if t >= t0 {
            t.duration_since(t0).as_secs_f64()
        } else {
            -t0.duration_since(t).as_secs_f64()
        }
    };
    let mut out = String::from("timeline (s):");
    for (what, t) in marks {
        out += &format!(" {what} {:.2},", at(*t));
    }
    out.pop();
    if !s.gap_list.is_empty() {
        out += &format!("; pauses >= {} ms:", GAP_LISTED.as_millis());
        for (from, len) in &s.gap_list {
            out += &format!(" {:.2}-{:.2}", at(*from), at(*from + *len));
        }
    }
    out
}

/// When a log line (starting with an RFC 3339 UTC timestamp, as the text
/// log format writes it) was written, on the bench's monotonic clock:
/// `t0` and `wall0` are the same instant read on both clocks.
fn log_instant(line: &str, t0: Instant, wall0: std::time::SystemTime) -> Option<Instant> {
    // 2026-12-02T20:11:08.382404Z: the time of day is enough (a round
    // lasts seconds; a midnight in between is folded below).
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let time = time.trim_end_matches('Z');
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let sec: f64 = parts.next()?.parse().ok()?;
    let of_day = h * 3600.0 + m * 60.0 + sec;
    let since_epoch = wall0.duration_since(std::time::UNIX_EPOCH).ok()?;
    let wall0_of_day = since_epoch.as_secs_f64() % 86400.0;
    let mut d = of_day - wall0_of_day;
    if d > 43200.0 {
        d -= 86400.0;
    } else if d < -43200.0 {
        d += 86400.0;
    }
    if d >= 0.0 {
        t0.checked_add(Duration::from_secs_f64(d))
    } else {
        t0.checked_sub(Duration::from_secs_f64(-d))
    }
}

/// The number after `key` in a log line (`activation_ms=58.1`).
fn field(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let num: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Bytes as kB below 10 MB, MB above.
fn mb(b: Option<u64>) -> String {
    match b {
        None => "-".into(),
        Some(b) if b < 10_000_000 => format!("{:.0} kB", b as f64 / 1e3),
        Some(b) => format!("{:.1} MB", b as f64 / 1e6),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(i).copied()
}

fn header() -> String {
    format!(
        "{:>5} {:<10} {:<12} {:>6} {:>10} {:>10} {:>8} {:>13} {:>12} {:>7} {:>11} {:>10}  {}",
        "round",
        "kind",
        "move",
        "token",
        "first byte",
        "activation",
        "gap/dup",
        "longest stall",
        "after resume",
        "stalls",
        "resync",
        "reprotect",
        "verdict"
    )
}

/// A token as an offset from the set-up's (tokens start above the
/// witness host's clock in microseconds: long numbers).
fn token_offset(token: u64, base: u64) -> String {
    if token >= base {
        format!("T+{}", token - base)
    } else {
        format!("T-{}", base - token)
    }
}

fn line(round: u32, r: &RoundResult, base_token: u64, stall_limit: Duration) -> (String, bool) {
    let gd = if r.stream.gaps + r.stream.duplicates == 0 {
        "none".to_string()
    } else {
        format!("{}/{}", r.stream.gaps, r.stream.duplicates)
    };
    let ok = r.stream.gaps + r.stream.duplicates == 0 && r.stream.longest_gap <= stall_limit;
    let verdict = if ok {
        "ok".to_string()
    } else if r.stream.longest_gap > stall_limit {
        format!("FAIL: stall over {}", secs(stall_limit))
    } else {
        format!("FAIL: {}", r.stream.anomalies.join("; "))
    };
    (
        format!(
            "{round:>5} {:<10} {:<12} {:>6} {:>10} {:>10} {:>8} {:>13} {:>12} {:>7} {:>11} {:>10}  {verdict}",
            r.kind.name(),
            format!("{} -> {}", r.from, r.to),
            token_offset(r.token, base_token),
            secs(r.first_byte),
            r.activation_ms.map_or("-".into(), |a| format!("{a:.0} ms")),
            gd,
            secs(r.stream.longest_gap),
            r.pause_after_resume.map_or("< 0.25 s".into(), secs),
            r.stream.stalls,
            mb(r.resync_bytes),
            secs(r.reprotect),
        ),
        ok,
    )
}

pub(super) fn resolve_image(image: Option<PathBuf>) -> Result<PathBuf> {
    let image = match image {
        Some(i) => i,
        None => {
            let dir = std::env::var_os(hypervisor::guest_build::GUEST_DIR_ENV)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("target/guest"));
            hypervisor::guest_build::installed_paths(&dir).net
        }
    };
    std::fs::canonicalize(&image).with_context(|| {
        format!(
            "guest image {} missing: run `cargo xtask guest-image`, set {} or pass --guest-image",
            image.display(),
            hypervisor::guest_build::GUEST_DIR_ENV
        )
    })
}

/// Runs the soak; `Ok(true)` when every round passed.
pub fn run(opts: Options) -> Result<bool> {
    if !Path::new("/dev/kvm").exists() {
        bail!("bench failback runs a micro-VM: /dev/kvm is missing");
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench failback needs root (it creates a network namespace and a tap)");
    }
    if opts.rounds == 0 || opts.rounds > 10_000 {
        bail!("--rounds must be between 1 and 10000 (one status port per process started)");
    }
    let bin = std::env::current_exe()?;
    let image = resolve_image(opts.guest_image.clone())?;
    let (dir, keep) = match &opts.work_dir {
        Some(d) => (d.clone(), true),
        None => (
            std::env::temp_dir().join(format!("remus-wan-bench-failback-{}", std::process::id())),
            false,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = crate::testbed::absolute(&dir);
    let cfg = LocalDeployment {
        dir: dir.clone(),
        guest_image: image,
        epoch_interval_ms: EPOCH_MS,
        memory_mib: GUEST_MIB,
        ports: PORTS,
        dc2_connect_port: None,
        tap: TAP.into(),
        mac: MAC.into(),
        witness_port: Some(WITNESS_PORT),
    }
    .write()?;
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "bench failback: {} rounds, {build} build, micro-VM {GUEST_MIB} MiB, epochs {EPOCH_MS} ms, \
         failover timers heartbeat 100 ms / detection 1 s / lease 800 ms, sites on loopback (no WAN emulator)",
        opts.rounds
    );
    println!("work folder: {}", dir.display());
    let outcome = hypervisor::netns::in_new_netns(|| soak(&opts, &bin, &cfg, &dir))?;
    let passed = match outcome {
        Ok(p) => p,
        Err(e) => {
            println!("bench failback stopped: {e:#}");
            false
        }
    };
    let _ = std::fs::remove_dir_all(dir.join("state"));
    if passed && !keep {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        println!("logs of every process: {}", dir.display());
    }
    Ok(passed)
}

fn soak(opts: &Options, bin: &Path, cfg: &Path, dir: &Path) -> Result<bool> {
    crate::testbed::gateway_tap(TAP)?;
    let mut bench = Bench {
        bin: bin.to_owned(),
        cfg: cfg.to_string_lossy().into_owned(),
        dir,
        next_port: 0,
        stall_limit: opts.stall_limit,
    };
    let wstate = dir.join("state").join("witness");
    let mut witness = Party::spawn(
        bin,
        "witness".into(),
        "witness",
        &[
            "witness".into(),
            "--config".into(),
            bench.cfg.clone(),
            "--state-dir".into(),
            wstate.to_string_lossy().into_owned(),
        ],
        "127.0.0.1:1".parse()?,
        dir.join("witness.log"),
        Some(wstate),
    )?;
    wait_witness_ready(&mut witness)?;
    let mut standby = bench.standby("dc2", 0)?;
    bench.wait_answering(&mut standby)?;
    let metrics = bench.metrics_addr();
    let mut primary = Party::spawn(
        bin,
        "protect at dc1".into(),
        "dc1",
        &[
            "protect".into(),
            "web1".into(),
            "--site".into(),
            "dc2".into(),
            "--config".into(),
            bench.cfg.clone(),
            "--metrics".into(),
            metrics.to_string(),
        ],
        metrics,
        dir.join("r00-dc1-protect.log"),
        None,
    )?;
    bench.wait_protected(&mut primary, &mut standby, 0, None)?;
    let stream = Stream::connect_counter(Duration::from_secs(60))?;
    bench.wait_values(&stream, 0, VALUES_AFTER, Duration::from_secs(30))?;
    let token = primary
        .status()
        .and_then(|s| s.failover)
        .map_or(0, |f| f.token);
    println!(
        "set-up: dc1 protects web1 towards dc2 (fencing token T = {token}); one client connection streams the counter \
         (receive buffer {} bytes: a value {} beyond what it had read when the old site stopped comes from the new site)",
        stream.rcvbuf,
        stream.rcvbuf / 8
    );
    println!("{}", header());
    let mut results: Vec<(u32, RoundResult, bool)> = Vec::new();
    let mut failure = None;
    for round in 1..=opts.rounds {
        let kill = (round % 2 == 1) != opts.switchover_first;
        let kind = if kill { Kind::Kill } else { Kind::Switchover };
        let pid = |p: &Party| p.pid().map_or("-".to_string(), |p| p.to_string());
        let pids = (pid(&primary), pid(&standby));
        match bench.round(round, kind, &mut primary, &mut standby, &stream) {
            Ok(r) => {
                let (text, ok) = line(round, &r, token, opts.stall_limit);
                println!("{text}");
                for n in &r.notes {
                    println!("      {n}");
                }
                results.push((round, r, ok));
            }
            Err(e) => {
                let s = stream.end_round();
                println!(
                    "{round:>5} {:<10} FAILED: {e:#} (primary pid {}, standby pid {} at the round's start; longest stall so far {}, gaps {}, duplicates {})",
                    kind.name(),
                    pids.0,
                    pids.1,
                    secs(s.longest_gap),
                    s.gaps,
                    s.duplicates
                );
                failure = Some(round);
                break;
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    summary(opts, &results, failure);
    let passed = failure.is_none() && results.iter().all(|(_, _, ok)| *ok);
    drop(stream);
    primary.retire();
    standby.retire();
    Ok(passed)
}

/// Waits until the witness listens and, when it says it grants no lease
/// for a while after its start ("no lease changes hands until one lease
/// period has passed ... wait_ms=N"), until that while is over: a fresh
/// `protect` whose first lease request is refused in that period with the
/// new state's token floor takes it for a newer grant and exits 5
/// (superseded) before protecting anything. A witness normally runs long
/// before a VM is protected; the rounds never restart it.
fn wait_witness_ready(witness: &mut Party) -> Result<()> {
    let deadline = Instant::now() + START_LIMIT;
    let t0 = Instant::now();
    let wall0 = std::time::SystemTime::now();
    loop {
        let log = witness.log_text();
        if log.contains("witness listening") {
            let quiet_until = log
                .lines()
                .find(|l| l.contains("no lease changes hands until"))
                .and_then(|l| Some((log_instant(l, t0, wall0)?, field(l, "wait_ms=")?)))
                .map(|(at, ms)| at + Duration::from_secs_f64(ms / 1e3));
            match quiet_until {
                Some(t) if Instant::now() < t && t < deadline => {}
                _ => return Ok(()),
            }
        }
        if let Some(s) = witness.exited() {
            bail!("the witness exited ({s}): {}", witness.log_text().trim());
        }
        if Instant::now() > deadline {
            bail!("the witness was not ready within {START_LIMIT:?}");
        }
        std::thread::sleep(POLL);
    }
}

fn summary(opts: &Options, results: &[(u32, RoundResult, bool)], failure: Option<u32>) {
    let passed = results.iter().filter(|(_, _, ok)| *ok).count();
    println!();
    println!(
        "summary: {passed} of {} rounds passed{}",
        opts.rounds,
        failure.map_or(String::new(), |r| format!(
            " (round {r} failed; {} not run)",
            opts.rounds - r
        ))
    );
    for kind in [Kind::Kill, Kind::Switchover] {
        let mut t: Vec<Duration> = results
            .iter()
            .filter(|(_, r, _)| r.kind == kind)
            .map(|(_, r, _)| r.first_byte)
            .collect();
        t.sort();
        if let (Some(p50), Some(max)) = (percentile(&t, 0.5), t.last()) {
            println!(
                "  {} -> first byte from the new site: p50 {}, max {} ({} rounds)",
                kind.name(),
                secs(p50),
                secs(*max),
                t.len()
            );
        }
    }
    let stalls: u32 = results.iter().map(|(_, r, _)| r.stream.stalls).sum();
    let stalled: Duration = results.iter().map(|(_, r, _)| r.stream.stalled).sum();
    let longest = results
        .iter()
        .map(|(_, r, _)| r.stream.longest_gap)
        .max()
        .unwrap_or_default();
    let over = results
        .iter()
        .filter(|(_, r, _)| r.stream.longest_gap > opts.stall_limit)
        .count();
    println!(
        "  stalls (>= {} without a counter value): {stalls}, {} in all; longest {}; rounds over the {} limit: {over}",
        secs(STALL_COUNTED),
        secs(stalled),
        secs(longest),
        secs(opts.stall_limit)
    );
    let gaps: u32 = results.iter().map(|(_, r, _)| r.stream.gaps).sum();
    let dups: u32 = results.iter().map(|(_, r, _)| r.stream.duplicates).sum();
    println!("  gaps: {gaps}, duplicates: {dups} (one TCP connection throughout)");
    let mut resync: Vec<u64> = results
        .iter()
        .filter_map(|(_, r, _)| r.resync_bytes)
        .collect();
    resync.sort_unstable();
    if let (Some(lo), Some(hi)) = (resync.first(), resync.last()) {
        println!(
            "  resync to each new standby: {} to {}",
            mb(Some(*lo)),
            mb(Some(*hi))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> StreamState {
        StreamState {
            check: CounterCheck::default(),
            partial: Vec::new(),
            received: 0,
            last_data: Instant::now(),
            round: StreamRound::default(),
            watch: None,
            fatal: None,
        }
    }

    fn bytes(vals: impl IntoIterator<Item = u64>) -> Vec<u8> {
        vals.into_iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    #[test]
    fn counts_gaps_and_duplicates_and_goes_on_checking() {
        let mut s = state();
        let now = Instant::now();
        let b = bytes([0, 1, 2, 5, 6, 6, 7]);
        s.on_bytes(&b[..13], now);
        s.on_bytes(&b[13..], now);
        assert_eq!((s.round.gaps, s.round.duplicates), (1, 1));
        assert_eq!(s.check.next, 8);
        assert_eq!(s.received, 7);
        s.on_bytes(&bytes([8, 9]), now);
        assert_eq!((s.round.gaps, s.round.duplicates), (1, 1));
    }

    #[test]
    fn watch_fires_at_the_first_value_beyond_the_threshold() {
        let mut s = state();
        s.watch = Some(Watch {
            threshold: 3,
            hit: None,
            any: None,
        });
        let t1 = Instant::now();
        s.on_bytes(&bytes([0, 1, 2]), t1);
        assert!(s.watch.as_ref().unwrap().hit.is_none());
        let t2 = t1 + Duration::from_millis(10);
        s.on_bytes(&bytes([3]), t2);
        assert_eq!(s.watch.as_ref().unwrap().hit, Some(t2));
    }

    #[test]
    fn stalls_are_the_times_without_a_value() {
        let mut s = state();
        let t = s.last_data;
        s.on_bytes(&bytes([0]), t + Duration::from_millis(100));
        s.on_bytes(&bytes([1]), t + Duration::from_millis(1600));
        assert_eq!(s.round.longest_gap, Duration::from_millis(1500));
        assert_eq!(s.round.stalls, 1);
    }

    #[test]
    fn log_timestamps_land_on_the_monotonic_clock() {
        let t0 = Instant::now();
        // 1970-01-02T00:00:10Z as the bench's wall clock at t0.
        let wall0 = std::time::UNIX_EPOCH + Duration::from_secs(86400 + 10);
        let at = |l: &str| log_instant(l, t0, wall0);
        let later = at("1970-01-02T00:00:11.500000Z  INFO x: takeover complete").unwrap();
        assert_eq!(later - t0, Duration::from_millis(1500));
        let earlier = at("1970-01-01T23:59:59.000000Z  INFO x: y").unwrap();
        assert_eq!(t0 - earlier, Duration::from_secs(11));
        assert!(at("no timestamp here").is_none());
    }

    #[test]
    fn reads_numbers_from_log_fields() {
        let l = "takeover complete vm=web1 token=2 detection_ms=1000.5 activation_ms=58.1 announce_ms=0.0";
        assert_eq!(field(l, "activation_ms="), Some(58.1));
        assert_eq!(field(l, "missing="), None);
    }
}
