//! A three-member etcd cluster for the tests: Debian's `etcd` (package
//! etcd-server, installed by `cargo xtask deps`), on loopback or inside a
//! network namespace of the test's own ([`EtcdCluster::start_in`]), data in
//! a tempdir, members killed by PID on drop (through [`Proc`]), ready once
//! every member reports the same leader.
//!
//! Include with `#[path = "support/etcd.rs"] mod etcd_cluster;` next to
//! `mod support;`.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::support::{verdict, which, Proc};

pub struct Member {
    pub name: String,
    pub client_url: String,
    pub proc: Option<Proc>,
}

pub struct EtcdCluster {
    pub members: Vec<Member>,
    pub dir: PathBuf,
    pub tls: Option<ClusterTls>,
    /// The network namespace the members run in (None: the test's own).
    pub ns: Option<String>,
}

/// PEM files of a cluster that serves its clients over https and asks
/// them for a certificate: a CA, the members' certificate (127.0.0.1 and
/// localhost) and a client certificate, all signed by the CA.
#[derive(Clone)]
pub struct ClusterTls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl ClusterTls {
    pub fn generate(dir: &Path) -> ClusterTls {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        std::fs::create_dir_all(dir).expect("tls folder");
        let write = |name: &str, pem: String| {
            let p = dir.join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let ca_path = write("ca.pem", ca_cert.pem());
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose, stem: &str| {
            let key = KeyPair::generate().expect("key");
            let mut p = CertificateParams::new(names).expect("params");
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).expect("sign");
            (
                write(&format!("{stem}.pem"), cert.pem()),
                write(&format!("{stem}.key"), key.serialize_pem()),
            )
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
            "member",
        );
        let (client_cert, client_key) = leaf(
            vec!["remus-wan-site".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
            "client",
        );
        ClusterTls {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// A port free on 127.0.0.1 now (the OS picks it; it is closed again, and
/// etcd binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Whether the etcd binary is there; fails (or skips under
/// REMUS_WAN_ALLOW_SKIP=1) naming the package otherwise.
pub fn require_etcd(test: &str) -> bool {
    let missing: Vec<String> = ["etcd", "etcdctl"]
        .iter()
        .filter(|b| which(b).is_none())
        .map(|b| format!("`{b}`"))
        .collect();
    verdict(
        test,
        &missing,
        "Debian packages etcd-server and etcd-client: cargo xtask deps",
    )
}

impl EtcdCluster {
    /// Starts three members under `dir` (each its own data folder and
    /// log) and waits until they agree on a leader.
    pub fn start(dir: &Path) -> EtcdCluster {
        Self::start_with(dir, None)
    }

    /// As [`EtcdCluster::start`]; with `tls`, clients are served over https
    /// and must present a certificate signed by the CA.
    pub fn start_with(dir: &Path, tls: Option<ClusterTls>) -> EtcdCluster {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        Self::launch(dir, None, "127.0.0.1", &clients, &peers, tls)
    }

    /// Three members inside network namespace `ns` (one the test made, so
    /// nothing else listens there), all on `addr`, one of that namespace's
    /// addresses, with distinct ports (clients 2379, 2479, 2579; peers one
    /// above each); plain http. Spawned there by PID (`ip netns exec`
    /// execs etcd), killed on drop; waits until they agree on a leader.
    pub fn start_in(dir: &Path, ns: &str, addr: &str) -> EtcdCluster {
        Self::launch(
            dir,
            Some(ns),
            addr,
            &[2379, 2479, 2579],
            &[2380, 2480, 2580],
            None,
        )
    }

    fn launch(
        dir: &Path,
        ns: Option<&str>,
        host: &str,
        clients: &[u16],
        peers: &[u16],
        tls: Option<ClusterTls>,
    ) -> EtcdCluster {
        let etcd = which("etcd").expect("etcd installed");
        std::fs::create_dir_all(dir).expect("etcd folder");
        let names = ["m0", "m1", "m2"];
        let initial: Vec<String> = names
            .iter()
            .zip(peers)
            .map(|(n, p)| format!("{n}=http://{host}:{p}"))
            .collect();
        let initial = initial.join(",");
        let token = format!("remus-wan-test-{}", std::process::id());
        let mut members = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let data = dir.join(name);
            let scheme = if tls.is_some() { "https" } else { "http" };
            let client_url = format!("{scheme}://{host}:{}", clients[i]);
            let peer_url = format!("http://{host}:{}", peers[i]);
            let args: Vec<String> = vec![
                "--name".into(),
                (*name).into(),
                "--data-dir".into(),
                data.display().to_string(),
                "--listen-client-urls".into(),
                client_url.clone(),
                "--advertise-client-urls".into(),
                client_url.clone(),
                "--listen-peer-urls".into(),
                peer_url.clone(),
                "--initial-advertise-peer-urls".into(),
                peer_url,
                "--initial-cluster".into(),
                initial.clone(),
                "--initial-cluster-state".into(),
                "new".into(),
                "--initial-cluster-token".into(),
                token.clone(),
                "--log-level".into(),
                "warn".into(),
            ];
            let mut args = args;
            if let Some(t) = &tls {
                for (flag, path) in [
                    ("--cert-file", &t.server_cert),
                    ("--key-file", &t.server_key),
                    ("--trusted-ca-file", &t.ca),
                ] {
                    args.push(flag.into());
                    args.push(path.display().to_string());
                }
                args.push("--client-cert-auth".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let log = dir.join(format!("{name}.log"));
            let proc = match ns {
                Some(ns) => Proc::spawn_in(ns, "etcd", &etcd, &args, &log),
                None => Proc::spawn("etcd", &etcd, &args, &[], &log),
            };
            members.push(Member {
                name: (*name).into(),
                client_url,
                proc: Some(proc),
            });
        }
        let cluster = EtcdCluster {
            members,
            dir: dir.to_owned(),
            tls,
            ns: ns.map(str::to_owned),
        };
        if let Err(e) = cluster.wait_leader(Duration::from_secs(60)) {
            panic!("{e}\n{}", cluster.logs());
        }
        cluster
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The members still running.
    pub fn live(&self) -> Vec<&Member> {
        self.members.iter().filter(|m| m.proc.is_some()).collect()
    }

    /// `etcdctl endpoint status` of one member: (its id, the leader's id).
    fn status(&self, url: &str) -> Option<(u64, u64)> {
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns, "etcdctl"]);
                c
            }
            None => std::process::Command::new("etcdctl"),
        };
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        let out = cmd
            .args([
                "--endpoints",
                url,
                "--dial-timeout",
                "1s",
                "--command-timeout",
                "2s",
                "endpoint",
                "status",
                "-w",
                "json",
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let s = v.get(0)?.get("Status")?;
        let me = s.get("header")?.get("member_id")?.as_u64()?;
        let leader = s.get("leader")?.as_u64()?;
        (leader != 0).then_some((me, leader))
    }

    /// Waits until every live member names the same leader, itself live.
    pub fn wait_leader(&self, limit: Duration) -> Result<String, String> {
        let start = Instant::now();
        let mut last = String::new();
        // Bounded in time (limit) and count (each round takes >= 200 ms).
        for _ in 0..1000 {
            let st: Vec<(String, Option<(u64, u64)>)> = self
                .live()
                .iter()
                .map(|m| (m.name.clone(), self.status(&m.client_url)))
                .collect();
            let ids: Vec<u64> = st.iter().filter_map(|(_, s)| s.map(|s| s.0)).collect();
            let leaders: Vec<u64> = st.iter().filter_map(|(_, s)| s.map(|s| s.1)).collect();
            if leaders.len() == st.len()
                && leaders.windows(2).all(|w| w[0] == w[1])
                && ids.contains(&leaders[0])
            {
                let i = ids.iter().position(|id| *id == leaders[0]).unwrap_or(0);
                return Ok(st[i].0.clone());
            }
            last = format!("{st:?}");
            if start.elapsed() > limit {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err(format!(
            "etcd cluster: no agreed leader within {limit:?} (last: {last})"
        ))
    }

    /// SIGKILLs member `name`.
    pub fn kill(&mut self, name: &str) {
        if let Some(m) = self.members.iter_mut().find(|m| m.name == name) {
            if let Some(mut p) = m.proc.take() {
                p.kill();
            }
        }
    }

    /// The members' logs, for a failure message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let t = std::fs::read_to_string(self.dir.join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                format!("--- {}:\n{}", m.name, crate::support::tail(&t, 20))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
