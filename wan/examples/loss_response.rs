//! Minimal reproduction of the loss response of quinn's congestion
//! controllers: two quinn endpoints on loopback, one bulk stream through the
//! user-space WAN emulator (UDP relay, no root needed), quinn's own counters
//! read straight from the connection once a second.
//!
//!     cargo run --release -p wan --example loss_response -- \
//!         --cc cubic --rtt-ms 50 --loss 0.5 --rate-mbit 200 --secs 20
//!
//! Prints, per second: delivered Mbit/s, cwnd (KiB and packets), smoothed
//! RTT, lost packets, congestion events; then the steady state a
//! loss-based controller reaches at that loss rate (Reno-friendly window
//! sqrt(2 a / ((1 + b)(1 - b) p)) with RFC 9438's a = 0.53, b = 0.7), for
//! comparison. See docs/transport.md.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wan::emulator::{Emulator, EmulatorConfig, LinkParams};
use wan::transport::bench::write_test_pki;
use wan::transport::{CongestionControl, Endpoint, TlsPaths, TransportConfig};

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}: cannot parse {v:?}"))
        })
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cc: CongestionControl = arg(&args, "--cc", CongestionControl::Cubic);
    let rtt = Duration::from_millis(arg(&args, "--rtt-ms", 50u64));
    let loss = arg(&args, "--loss", 0.5f64) / 100.0;
    let rate = arg(&args, "--rate-mbit", 200u64) * 1_000_000;
    let secs = arg(&args, "--secs", 20u64);

    let dir = std::env::temp_dir().join(format!("loss-response-{}", std::process::id()));
    write_test_pki(&dir).expect("certificates");
    let cfg = |site: &str| {
        let mut c = TransportConfig::new(TlsPaths::in_dir(&dir, site));
        c.congestion = cc;
        c
    };
    let mut cb = cfg("dc2");
    cb.allowed_clients = vec!["dc1".into()];
    let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Endpoint::bind(local, cb).expect("bind server");
    let emu = Emulator::start(
        EmulatorConfig::new(server.local_addr().unwrap()).with_link(LinkParams::symmetric(
            rtt,
            loss,
            Some(rate),
        )),
    )
    .await
    .expect("emulator");
    let received = Arc::new(AtomicU64::new(0));
    let rx = received.clone();
    let srv = server.clone();
    tokio::spawn(async move {
        let conn = srv.accept().await.expect("accept");
        let (_send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(Some(n)) = recv.read(&mut buf).await {
            rx.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    let client = Endpoint::bind(local, cfg("dc1")).expect("bind client");
    let conn = client
        .connect(emu.local_addr(), "dc2")
        .await
        .expect("connect");
    let (mut send, _recv) = conn.open_bi().await.expect("stream");
    let chunk = vec![0x5au8; 1 << 20];
    tokio::spawn(async move { while send.write_all(&chunk).await.is_ok() {} });

    println!(
        "quinn {cc} over the emulator: RTT {} ms, loss {:.2} % both ways, {} Mbit/s",
        rtt.as_millis(),
        loss * 100.0,
        rate / 1_000_000
    );
    println!(
        "t s | delivered Mbit/s | cwnd KiB | cwnd pkts | srtt ms | lost pkts | congestion events"
    );
    let start = Instant::now();
    let mut last = 0u64;
    let mut rates = Vec::new();
    for t in 1..=secs {
        tokio::time::sleep_until((start + Duration::from_secs(t)).into()).await;
        let s = conn.quinn().stats();
        let got = received.load(Ordering::Relaxed);
        let mbit = (got - last) as f64 * 8.0 / 1e6;
        last = got;
        if t > secs / 2 {
            rates.push(mbit);
        }
        println!(
            "{t} | {mbit:.1} | {} | {} | {:.0} | {} | {}",
            s.path.cwnd / 1024,
            s.path.cwnd / u64::from(s.path.current_mtu.max(1)),
            s.path.rtt.as_secs_f64() * 1000.0,
            s.path.lost_packets,
            s.path.congestion_events
        );
    }
    let s = conn.quinn().stats();
    let mtu = f64::from(s.path.current_mtu);
    let mean = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    if loss > 0.0 {
        let (a, b) = (0.53, 0.7);
        let peak = (2.0 * a / ((1.0 + b) * (1.0 - b) * loss)).sqrt();
        let avg = peak * (1.0 + b) / 2.0;
        println!(
            "second half: {mean:.1} Mbit/s delivered; a Reno-friendly loss-based controller settles at ~{avg:.0} packets (peak {peak:.0}) = ~{:.1} Mbit/s at this RTT; Mathis (NewReno): {:.0} packets = {:.1} Mbit/s",
            avg * mtu * 8.0 / rtt.as_secs_f64() / 1e6,
            1.22 / loss.sqrt(),
            1.22 / loss.sqrt() * mtu * 8.0 / rtt.as_secs_f64() / 1e6
        );
    } else {
        println!("second half: {mean:.1} Mbit/s delivered");
    }
    let st = emu.handle().stats();
    println!(
        "emulator: forward {} delivered, {} lost, {} queue drops; backward {} delivered, {} lost",
        st.forward.packets,
        st.forward.lost,
        st.forward.queue_drops,
        st.backward.packets,
        st.backward.lost
    );
    conn.close(0, b"done");
    client.close();
    server.close();
    let _ = std::fs::remove_dir_all(&dir);
}
