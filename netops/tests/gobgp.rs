//! Our BGP speaker (passive side) against a real GoBGP daemon that
//! connects to us, in two network namespaces (GoBGP rejects 127/8 next hops).

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use netops::bgp::{PeerConfig, PeerMode, Route, RouteAttributes, Speaker, SpeakerConfig, State};

const OUR_AS: u32 = 65000;
const GOBGP_AS: u32 = 65001;
/// The gRPC API port; unique because it lives in the test's own namespace.
const API_PORT: u16 = 50051;

struct GoBgp {
    peer_ns: String,
    dir: PathBuf,
    daemon: Option<Daemon>,
}

impl GoBgp {
    fn start(topo: &Topology, dir: &Path) -> GoBgp {
        let conf = format!(
            r#"[global.config]
  as = {GOBGP_AS}
  router-id = "{PEER_V4}"
  port = 179
  local-address-list = ["{PEER_V4}"]

[[neighbors]]
  [neighbors.config]
    neighbor-address = "{LOCAL_V4}"
    peer-as = {OUR_AS}
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#
        );
        std::fs::write(dir.join("gobgpd.toml"), conf).unwrap();
        let mut g = GoBgp {
            peer_ns: topo.peer.clone(),
            dir: dir.into(),
            daemon: None,
        };
        g.spawn();
        g
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.peer_ns, "gobgpd", "-f"])
            .arg(self.dir.join("gobgpd.toml"))
            .args(["-p", &format!("--api-hosts=127.0.0.1:{API_PORT}")]);
        let mut d = Daemon::spawn("gobgpd", cmd, &self.dir.join("gobgpd.log"));
        // Bounded wait for the API.
        let mut up = false;
        for _ in 0..100 {
            d.assert_running();
            let out = output(&mut self.gobgp(&["global"]));
            if out.contains("AS") && out.contains(GOBGP_AS.to_string().as_str()) {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(up, "gobgpd API never came up:\n{}", d.log_text());
        self.daemon = Some(d);
    }

    fn kill(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill();
        }
    }

    fn gobgp(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.peer_ns, "gobgp", "-u", "127.0.0.1"])
            .args(["-p", &API_PORT.to_string()])
            .args(args);
        c
    }

    async fn rib(&self) -> String {
        let mut s = output_async(self.gobgp(&["global", "rib", "-a", "ipv4"])).await;
        s.push_str(&output_async(self.gobgp(&["global", "rib", "-a", "ipv6"])).await);
        s
    }

    async fn wait_rib(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        wait_until(what, 120, Duration::from_millis(500), || async {
            let r = self.rib().await;
            if pred(&r) {
                (true, r)
            } else {
                let n = output_async(self.gobgp(&["neighbor"])).await;
                let log = self
                    .daemon
                    .as_ref()
                    .map(|d| d.log_text())
                    .unwrap_or_default();
                (false, format!("{r}\n{n}\n--- gobgpd log ---\n{log}"))
            }
        })
        .await
    }
}

impl Drop for GoBgp {
    fn drop(&mut self) {
        self.kill();
    }
}

const V4: &str = "203.0.113.0/24";
const V6: &str = "2001:db8:100::/48";

#[test]
fn gobgp_connects_to_our_passive_speaker_and_sees_routes() {
    if !preflight(
        "gobgp_connects_to_our_passive_speaker",
        &["gobgpd", "gobgp", "ip"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let topo = Topology::new();
    let gobgp = GoBgp::start(&topo, dir.path());
    run_in_netns(&topo.local.clone(), move || async move {
        let mut gobgp = gobgp;
        let mut peer = PeerConfig::new(PEER_V4.parse().unwrap(), GOBGP_AS);
        peer.mode = PeerMode::Passive;
        peer.next_hop_v6 = Some(LOCAL_V6.parse().unwrap());
        let speaker = Speaker::start(SpeakerConfig {
            local_as: OUR_AS,
            router_id: LOCAL_V4.parse().unwrap(),
            hold_time_s: 9,
            connect_retry: Duration::from_secs(1),
            listen: Some(SocketAddr::new(LOCAL_V4.parse().unwrap(), 179)),
            peers: vec![peer],
        })
        .await
        .unwrap();
        let attrs = RouteAttributes {
            prepend: 1,
            communities: vec![(65000 << 16) | 100],
            large_communities: vec![(65000, 1, 2)],
            med: Some(50),
            ..Default::default()
        };
        speaker.set_routes(vec![
            Route::new(V4.parse().unwrap(), attrs.clone()),
            Route::new(V6.parse().unwrap(), attrs.clone()),
        ]);
        let rib = gobgp
            .wait_rib("both routes in GoBGP", |r| r.contains(V4) && r.contains(V6))
            .await;
        eprintln!("{rib}");
        assert!(rib.contains("65000 65000"), "{rib}");
        assert!(rib.contains("{Med: 50}"), "{rib}");
        assert!(rib.contains("65000:100"), "{rib}");
        assert!(rib.contains("65000:1:2"), "{rib}");
        assert!(rib.contains(LOCAL_V4) && rib.contains(LOCAL_V6), "{rib}");
        let st = speaker.status().await;
        assert_eq!(st.peers[0].state, State::Established, "{st}");

        speaker.withdraw(vec![V6.parse().unwrap()]);
        gobgp
            .wait_rib("IPv6 route withdrawn", |r| {
                r.contains(V4) && !r.contains(V6)
            })
            .await;

        // GoBGP restarts, reconnects to us, and gets everything again.
        gobgp.kill();
        gobgp.spawn();
        gobgp
            .wait_rib("route re-announced after GoBGP restart", |r| r.contains(V4))
            .await;

        // Our speaker dies: GoBGP drops the routes.
        drop(speaker);
        gobgp
            .wait_rib("routes gone after our speaker died", |r| !r.contains(V4))
            .await;
    });
    drop(topo);
}
