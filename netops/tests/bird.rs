//! Our BGP speaker against a real BIRD 2 daemon, in two network namespaces
//! joined by a veth link (BIRD marks 127/8 next hops unreachable).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use netops::bgp::{PeerConfig, PeerMode, Route, RouteAttributes, Speaker, SpeakerConfig, State};

const OUR_AS: u32 = 65000;
const BIRD_AS: u32 = 65001;

fn bird_config(dir: &Path, password: Option<&str>) -> String {
    let pw = password
        .map(|p| format!("  password \"{p}\";\n"))
        .unwrap_or_default();
    format!(
        r#"log "{log}" all;
router id {PEER_V4};
protocol device {{ scan time 1; }}
protocol bgp remus {{
  local {PEER_V4} as {BIRD_AS};
  neighbor {LOCAL_V4} as {OUR_AS};
  passive on;
  hold time 9;
  keepalive time 3;
  connect retry time 1;
  error wait time 1, 3;
{pw}  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
"#,
        log = dir.join("bird.log").display(),
    )
}

struct Bird {
    peer_ns: String,
    dir: std::path::PathBuf,
    sock: String,
    daemon: Option<Daemon>,
}

impl Bird {
    fn start(topo: &Topology, dir: &Path, password: Option<&str>) -> Bird {
        Self::start_with(topo, dir, bird_config(dir, password))
    }

    fn start_with(topo: &Topology, dir: &Path, config: String) -> Bird {
        let conf = dir.join("bird.conf");
        std::fs::write(&conf, config).unwrap();
        let sock = dir.join("bird.ctl").display().to_string();
        let mut b = Bird {
            peer_ns: topo.peer.clone(),
            dir: dir.into(),
            sock,
            daemon: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.peer_ns, "bird", "-f", "-c"])
            .arg(self.dir.join("bird.conf"))
            .args(["-s", &self.sock, "-P"])
            .arg(self.dir.join("bird.pid"));
        let mut d = Daemon::spawn("bird", cmd, &self.dir.join("bird.stdout"));
        // Wait (bounded) for the control socket.
        for _ in 0..200 {
            if Path::new(&self.sock).exists() {
                break;
            }
            d.assert_running();
            std::thread::sleep(Duration::from_millis(50));
        }
        d.assert_running();
        self.daemon = Some(d);
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
        let _ = std::fs::remove_file(&self.sock);
    }

    fn birdc(&self, args: &[&str]) -> Command {
        let mut c = Command::new("birdc");
        c.args(["-s", &self.sock]).args(args);
        c
    }

    async fn routes(&self) -> String {
        let mut s = output_async(self.birdc(&["show", "route", "all", "table", "master4"])).await;
        s.push_str(&output_async(self.birdc(&["show", "route", "all", "table", "master6"])).await);
        s
    }

    async fn protocol(&self) -> String {
        output_async(self.birdc(&["show", "protocols", "all", "remus"])).await
    }

    async fn routes_of(&self, protocol: &str) -> String {
        let mut s = String::new();
        for t in ["master4", "master6"] {
            s.push_str(
                &output_async(
                    self.birdc(&["show", "route", "all", "table", t, "protocol", protocol]),
                )
                .await,
            );
        }
        s
    }

    async fn diagnostics(&self) -> String {
        let proto = output_async(self.birdc(&["show", "protocols", "all"])).await;
        let log = std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default();
        format!("{proto}\n--- bird.log ---\n{log}")
    }

    /// Waits until the route table satisfies `pred`.
    async fn wait_routes(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_until(what, 120, Duration::from_millis(500), || async {
            let r = self.routes().await;
            if pred(&r) {
                (true, r)
            } else {
                (false, format!("{r}\n{}", self.diagnostics().await))
            }
        })
        .await
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

fn attrs() -> RouteAttributes {
    RouteAttributes {
        prepend: 2,
        communities: vec![(65000 << 16) | 100],
        large_communities: vec![(65000, 1, 2)],
        med: Some(50),
        ..Default::default()
    }
}

fn speaker_config(password: Option<&str>) -> SpeakerConfig {
    let mut peer = PeerConfig::new(PEER_V4.parse().unwrap(), BIRD_AS);
    peer.mode = PeerMode::Active;
    peer.next_hop_v6 = Some(LOCAL_V6.parse().unwrap());
    peer.md5_password = password.map(str::to_owned);
    SpeakerConfig {
        local_as: OUR_AS,
        router_id: LOCAL_V4.parse().unwrap(),
        hold_time_s: 9,
        connect_retry: Duration::from_secs(1),
        listen: None,
        peers: vec![peer],
    }
}

const V4: &str = "203.0.113.0/24";
const V6: &str = "2001:db8:100::/48";

#[test]
fn bird_sees_announcements_withdrawals_restarts_and_our_death() {
    if !preflight("bird_sees_announcements", &["bird", "birdc", "ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new();
    let bird = Bird::start(&topo, dir.path(), None);
    run_in_netns(&topo.local.clone(), move || async move {
        let mut bird = bird;
        let speaker = Speaker::start(speaker_config(None)).await.unwrap();
        speaker.set_routes(vec![
            Route::new(V4.parse().unwrap(), attrs()),
            Route::new(V6.parse().unwrap(), attrs()),
        ]);
        let routes = bird
            .wait_routes("both routes in BIRD", |r| r.contains(V4) && r.contains(V6))
            .await;
        assert!(
            routes.contains("BGP.as_path: 65000 65000 65000"),
            "{routes}"
        );
        assert!(routes.contains("BGP.med: 50"), "{routes}");
        assert!(routes.contains("(65000,100)"), "{routes}");
        assert!(routes.contains("(65000, 1, 2)"), "{routes}");
        assert!(routes.contains("BGP.next_hop: 192.0.2.1"), "{routes}");
        assert!(routes.contains("BGP.next_hop: 2001:db8::1"), "{routes}");

        let st = speaker.status().await;
        assert_eq!(st.peers[0].state, State::Established, "{st}");
        assert_eq!(st.peers[0].announced.len(), 2, "{st}");
        assert!(st.to_string().contains("Established"), "{st}");

        // Withdraw removes the route; announcing again brings it back.
        speaker.withdraw(vec![V4.parse().unwrap()]);
        bird.wait_routes("IPv4 route withdrawn", |r| {
            !r.contains(V4) && r.contains(V6)
        })
        .await;
        speaker.announce(vec![Route::new(V4.parse().unwrap(), attrs())]);
        bird.wait_routes("IPv4 route announced again", |r| r.contains(V4))
            .await;

        // BIRD restarts: the session comes back and everything is re-announced.
        bird.kill();
        bird.spawn();
        bird.wait_routes("routes re-announced after BIRD restart", |r| {
            r.contains(V4) && r.contains(V6)
        })
        .await;
        let st = speaker.status().await;
        assert!(st.peers[0].stats.established_count >= 2, "{st}");

        // Our speaker dies (no CEASE): BIRD drops our routes.
        drop(speaker);
        bird.wait_routes("routes gone after our speaker died", |r| {
            !r.contains(V4) && !r.contains(V6)
        })
        .await;
    });
    drop(topo);
}

#[test]
fn bird_with_tcp_md5_and_clean_shutdown() {
    if !preflight("bird_with_tcp_md5", &["bird", "birdc", "ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new();
    let bird = Bird::start(&topo, dir.path(), Some("s3cret-md5"));
    run_in_netns(&topo.local.clone(), move || async move {
        let bird = bird;
        // With the wrong password the kernel drops every segment: no session.
        let wrong = Speaker::start(speaker_config(Some("wrong-password")))
            .await
            .unwrap();
        wrong.set_routes(vec![Route::new(V4.parse().unwrap(), attrs())]);
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let st = wrong.status().await;
            assert_ne!(st.peers[0].state, State::Established, "{st}");
        }
        drop(wrong);
        let speaker = Speaker::start(speaker_config(Some("s3cret-md5")))
            .await
            .unwrap();
        speaker.set_routes(vec![Route::new(V4.parse().unwrap(), attrs())]);
        bird.wait_routes("route over an MD5-signed session", |r| r.contains(V4))
            .await;
        // A clean shutdown sends CEASE / administrative shutdown.
        speaker.shutdown().await;
        bird.wait_routes("routes gone after shutdown", |r| !r.contains(V4))
            .await;
        let proto = wait_until(
            "BIRD reports our CEASE",
            60,
            Duration::from_millis(500),
            || async {
                let p = bird.protocol().await;
                (p.to_lowercase().contains("administrative shutdown"), p)
            },
        )
        .await;
        assert!(proto.contains("Received"), "{proto}");
    });
    drop(topo);
}

const IBGP_PEER_V4: &str = "192.0.2.3";
/// Our source address towards the iBGP peer (BIRD tells its protocols
/// apart by neighbor address).
const IBGP_LOCAL_V4: &str = "192.0.2.4";

fn two_protocol_config(dir: &Path) -> String {
    format!(
        r#"log "{log}" all;
router id {PEER_V4};
protocol device {{ scan time 1; }}
protocol direct {{ ipv4; ipv6; }}
protocol bgp remus_ext {{
  local {PEER_V4} as {BIRD_AS};
  neighbor {LOCAL_V4} as {OUR_AS};
  passive on;
  hold time 9;
  connect retry time 1;
  error wait time 1, 3;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
protocol bgp remus_int {{
  local {IBGP_PEER_V4} as {OUR_AS};
  neighbor {IBGP_LOCAL_V4} as {OUR_AS};
  direct;
  passive on;
  hold time 9;
  connect retry time 1;
  error wait time 1, 3;
  ipv4 {{ import all; export none; gateway direct; }};
  ipv6 {{ import all; export none; gateway direct; }};
}}
"#,
        log = dir.join("bird.log").display(),
    )
}

#[test]
fn one_speaker_ebgp_and_ibgp_peers_with_route_groups() {
    if !preflight("one_speaker_ebgp_and_ibgp_peers", &["bird", "birdc", "ip"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new();
    topo.add_peer_address(&format!("{IBGP_PEER_V4}/24"));
    topo.add_local_address(&format!("{IBGP_LOCAL_V4}/24"));
    let bird = Bird::start_with(&topo, dir.path(), two_protocol_config(dir.path()));
    run_in_netns(&topo.local.clone(), move || async move {
        let bird = bird;
        let mut ebgp = PeerConfig::new(PEER_V4.parse().unwrap(), BIRD_AS);
        ebgp.next_hop_v6 = Some(LOCAL_V6.parse().unwrap());
        let mut ibgp = PeerConfig::new(IBGP_PEER_V4.parse().unwrap(), OUR_AS);
        ibgp.next_hop_v6 = Some(LOCAL_V6.parse().unwrap());
        ibgp.local_address = Some(IBGP_LOCAL_V4.parse().unwrap());
        let speaker = Speaker::start(SpeakerConfig {
            local_as: OUR_AS,
            router_id: LOCAL_V4.parse().unwrap(),
            hold_time_s: 9,
            connect_retry: Duration::from_secs(1),
            listen: None,
            peers: vec![ebgp, ibgp],
        })
        .await
        .unwrap();
        let mut a = attrs();
        a.local_pref = Some(250);
        speaker
            .set_group_routes("web1", 7, vec![Route::new(V4.parse().unwrap(), a.clone())])
            .unwrap();
        speaker
            .set_group_routes("web2", 3, vec![Route::new(V6.parse().unwrap(), a.clone())])
            .unwrap();
        // A decision taken under an older lease is refused.
        let stale = speaker.set_group_routes("web1", 6, vec![]).unwrap_err();
        assert_eq!(stale.current, 7);
        let check = |proto: &'static str| {
            let b = &bird;
            async move {
                wait_until(proto, 120, Duration::from_millis(500), || async {
                    let r = b.routes_of(proto).await;
                    (
                        r.contains(V4) && r.contains(V6),
                        format!("{r}\n{}", b.diagnostics().await),
                    )
                })
                .await
            }
        };
        let e = check("remus_ext").await;
        assert!(e.contains("BGP.as_path: 65000 65000 65000"), "{e}");
        assert!(
            !e.contains("BGP.local_pref: 250"),
            "no LOCAL_PREF towards eBGP: {e}"
        );
        let i = check("remus_int").await;
        assert!(i.contains("BGP.local_pref: 250"), "{i}");
        assert!(!i.contains("65000 65000"), "no AS path inside the AS: {i}");
        let st = speaker.status().await;
        assert_eq!(st.peers.len(), 2);
        assert!(
            st.peers.iter().all(|p| p.state == State::Established),
            "{st}"
        );

        // Removing one group withdraws only its prefix, on both sessions.
        speaker.set_group_routes("web1", 8, vec![]).unwrap();
        for proto in ["remus_ext", "remus_int"] {
            wait_until(proto, 120, Duration::from_millis(500), || async {
                let r = bird.routes_of(proto).await;
                (!r.contains(V4) && r.contains(V6), r)
            })
            .await;
        }
    });
    drop(topo);
}

#[test]
fn bird_and_our_speaker_both_connect_collision_is_resolved() {
    if !preflight(
        "bird_and_our_speaker_both_connect",
        &["bird", "birdc", "ip"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new();
    // BIRD connects too (no `passive on`).
    let config = bird_config(dir.path(), None).replace("  passive on;\n", "");
    let bird = Bird::start_with(&topo, dir.path(), config);
    run_in_netns(&topo.local.clone(), move || async move {
        let bird = bird;
        let mut cfg = speaker_config(None);
        cfg.peers[0].mode = PeerMode::Both;
        cfg.listen = Some(std::net::SocketAddr::new(LOCAL_V4.parse().unwrap(), 179));
        let speaker = Speaker::start(cfg).await.unwrap();
        speaker.set_routes(vec![Route::new(V4.parse().unwrap(), attrs())]);
        bird.wait_routes("route over the surviving connection", |r| r.contains(V4))
            .await;
        let st = speaker.status().await;
        assert_eq!(st.peers[0].state, State::Established, "{st}");
        // Still one healthy session a few keepalive intervals later.
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let r = bird.routes().await;
            assert!(r.contains(V4), "{r}\n{}", bird.diagnostics().await);
        }
        let st = speaker.status().await;
        assert_eq!(st.peers[0].state, State::Established, "{st}");
    });
    drop(topo);
}
