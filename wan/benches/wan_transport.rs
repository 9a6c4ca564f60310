//! WAN transport benchmark: QUIC vs TCP + TLS through the emulated link.
//!
//!     cargo bench -p wan --bench wan_transport            # full grid (~4 min)
//!     cargo bench -p wan --bench wan_transport -- --quick # two cells
//!     ... -- --cc cubic                                    # QUIC controller of the main table
//!     ... -- --rtt-ms 50 --loss 0.5                        # chosen cells only
//!     ... -- --queue-kib 8192                              # bottleneck queue size
//!     ... -- --tcp-cc cubic                                # Linux controller of the baseline (default bbr)
//!     ... -- --rtt-ms 50 --loss 0.5 --compare-only         # only the controller table, there
//!     ... -- --controllers cubic,bbr --tcp-controllers cubic
//!     ... -- --trace                                       # QUIC counters every 100 ms
//!     ... -- --ack-delay-ms 5|default --bbr-headroom 1.5   # QUIC tuning experiments
//!     ... -- --paced 100                                   # epochs in the latency phase (default 15)
//!     ... -- --no-fec                                      # without the QUIC+FEC rows
//!     ... -- --no-tcp                                      # without the TCP + TLS rows
//!     ... -- --fec-only                                    # QUIC+FEC alone (no QUIC, no TCP rows)
//!     ... -- --fec-baseline bbr|none                       # QUIC+FEC with this controller too (default bbr)
//!
//! Needs root (it creates two network namespaces joined through TUN
//! devices). Run as a test (`cargo test --benches`, no `--bench` flag) it
//! does a tiny smoke run, and skips when it cannot create namespaces.

use std::time::Duration;

use wan::transport::bench::{run, BenchOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench_mode = args.iter().any(|a| a == "--bench");
    let mut opts = if args.iter().any(|a| a == "--quick") {
        BenchOptions::quick()
    } else if bench_mode {
        BenchOptions::full()
    } else {
        let mut o = BenchOptions::quick();
        o.rtts = vec![Duration::from_millis(20)];
        o.losses = vec![0.0];
        o.saturate_for = Duration::from_millis(500);
        o.paced_count = 3;
        o
    };
    if let Some(i) = args.iter().position(|a| a == "--cc") {
        match args.get(i + 1).map(|s| s.parse()) {
            Some(Ok(cc)) => opts.congestion = cc,
            _ => {
                eprintln!("--cc expects cubic, newreno, bbr, bbr-bounded or loss-tolerant");
                std::process::exit(2);
            }
        }
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--rtt-ms")
        .and_then(|i| args.get(i + 1))
    {
        opts.rtts = v
            .split(',')
            .map(|x| Duration::from_millis(x.parse().expect("--rtt-ms N[,N]")))
            .collect();
        opts.controller_cells.clear();
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--loss")
        .and_then(|i| args.get(i + 1))
    {
        opts.losses = v
            .split(',')
            .map(|x| x.parse::<f64>().expect("--loss PERCENT[,PERCENT]") / 100.0)
            .collect();
        opts.controller_cells.clear();
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--queue-kib")
        .and_then(|i| args.get(i + 1))
    {
        opts.queue_bytes = Some(v.parse::<usize>().expect("--queue-kib N") * 1024);
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--tcp-cc")
        .and_then(|i| args.get(i + 1))
    {
        opts.tcp_congestion = v.parse().expect("--tcp-cc cubic|reno|bbr");
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--controllers")
        .and_then(|i| args.get(i + 1))
    {
        opts.quic_controllers = v
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("--controllers CC[,CC]"))
            .collect();
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--tcp-controllers")
        .and_then(|i| args.get(i + 1))
    {
        opts.tcp_controllers = v
            .split(',')
            .filter(|x| !x.is_empty())
            .map(|x| x.parse().expect("--tcp-controllers CC[,CC]"))
            .collect();
    }
    if args.iter().any(|a| a == "--compare-only") {
        // Only the controller table, on the chosen cells.
        opts.controller_cells = opts
            .rtts
            .iter()
            .flat_map(|&r| opts.losses.iter().map(move |&l| (r, l)))
            .collect();
        opts.rtts.clear();
    }
    opts.trace = args.iter().any(|a| a == "--trace");
    if args.iter().any(|a| a == "--no-tcp") {
        opts.tcp = false;
    }
    if args.iter().any(|a| a == "--no-fec") {
        opts.fec = false;
    }
    if args.iter().any(|a| a == "--fec-only") {
        opts.quic = false;
        opts.tcp = false;
        opts.fec = true;
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--ack-delay-ms")
        .and_then(|i| args.get(i + 1))
    {
        opts.ack_delay = Some(match v.as_str() {
            "default" => None,
            ms => Some(Duration::from_millis(
                ms.parse().expect("--ack-delay-ms N|default"),
            )),
        });
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--fec-baseline")
        .and_then(|i| args.get(i + 1))
    {
        opts.fec_baseline = match v.as_str() {
            "none" => None,
            cc => Some(cc.parse().expect("--fec-baseline CC|none")),
        };
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--paced")
        .and_then(|i| args.get(i + 1))
    {
        opts.paced_count = v.parse().expect("--paced N");
    }
    if let Some(v) = args
        .iter()
        .position(|a| a == "--bbr-headroom")
        .and_then(|i| args.get(i + 1))
    {
        opts.bbr_headroom = Some(v.parse().expect("--bbr-headroom X"));
    }
    let started = std::time::Instant::now();
    match run(&opts) {
        Ok(table) => {
            println!("{table}");
            println!("(ran in {:.0} s)", started.elapsed().as_secs_f64());
        }
        Err(e) if !bench_mode => {
            println!("wan_transport benchmark skipped: {e}");
        }
        Err(e) => {
            eprintln!("wan_transport benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
