//! `remus-wan bench ...`: measurements printed beside their baselines.

use clap::Subcommand;

use super::exit::Code;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The checkpoint codec beside per-page zstd-1: bytes and speed.
    ///
    /// Runs the synthetic dirtying patterns (sparse-write, streaming,
    /// random, zero-heavy), or with --trace the dirty-page traces recorded
    /// from a real guest (`cargo run --release -p hypervisor --example
    /// record_trace`). Each scheme takes the warm-up epochs unmeasured (for
    /// a trace: its epoch 0, the whole image, then --warmup more), and
    /// every replica is checked against the guest's final memory.
    ///
    /// Prints one line per workload: dirty KiB per epoch; bytes per epoch
    /// of zstd-1 per page and of ours; the ratio (how many times fewer
    /// bytes ours sends); encode MB/s of zstd-1 and of ours on one core
    /// (the thread's CPU time); ours by wall time on one thread and with
    /// the parallel encoder on every core (median of 3 passes each; the
    /// ratio of the two is what the second core brings), and per
    /// CPU-second of the process; decode MB/s of both on one core. MB/s count dirty page bytes. On a
    /// shared machine the speeds move with the neighbours: compare rows of
    /// one run. Figures: docs/benchmarks.md.
    Codec {
        /// A trace folder (epoch-NNNNNN.rwtrace files) or a folder of them.
        #[arg(long)]
        trace: Option<std::path::PathBuf>,
        /// Our encoder's page cache budget, MiB.
        #[arg(long, default_value_t = 64)]
        cache_mib: usize,
        /// Epochs after a trace's initial image taken unmeasured.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Also print each workload's full table: raw, zstd-1/3 per page,
        /// Remus XOR+RLE, QEMU XBZRLE and variants of ours.
        #[arg(long)]
        all_schemes: bool,
    },
    /// Stream synthetic checkpoint epochs over an emulated WAN (RTT 0/20/50/100 ms,
    /// loss 0/0.5/2 %, 200 Mbit/s): our QUIC transport beside a TCP + TLS
    /// baseline carrying the same framing; goodput and commit latency p50/p99.
    /// Needs root (the emulated link joins two network namespaces).
    Wan {
        /// Two RTTs and two loss rates only, shorter runs.
        #[arg(long)]
        quick: bool,
    },
    /// The guest's TCP services (counter stream throughput, echo round
    /// trip) unprotected and protected at 25/50/100 ms epochs over an
    /// emulated WAN of 0 and 50 ms RTT, with link rate, compression ratio
    /// and pause; and the guest's own memory-dirtying workload (page writes
    /// per second at 1, 16 and 64 MiB working sets) with its slowdown
    /// against the unprotected guest. Needs root and KVM.
    Protect {
        /// The network guest image (default: target/guest/netguest.elf).
        #[arg(long)]
        guest_image: Option<std::path::PathBuf>,
    },
    /// Soak of failover and failback: one protected micro-VM moved between
    /// two sites N times, alternating kills and switchovers, under one
    /// client TCP connection. Needs root and KVM.
    ///
    /// One protected micro-VM moves between dc1 and dc2 N times while one
    /// client TCP connection streams the guest's counter. Odd rounds
    /// SIGKILL the process running the VM (the standby takes over by
    /// itself), even rounds ask it for a planned switchover (`remus-wan
    /// switchover`); after each move a fresh standby starts at the site the
    /// VM left, and the next round begins once the VM is protected again
    /// (a checkpoint committed there) and the stream flows.
    ///
    /// Prints one line per round: fencing token, the time from the kill or
    /// switchover request to the first counter value only the new site can
    /// have sent, gaps/duplicates, the longest stall, the longest pause
    /// once the new site's values flow, the bytes resynchronised to the new
    /// standby and the time to be protected again; then a summary. Exits 1
    /// if a round fails, sees a gap or duplicate, or stalls longer than
    /// --stall-limit. Runs in a network namespace of its own (192.0.2.0/24
    /// on a tap, sites and witness on loopback, fast failover timers:
    /// detection 1 s). Not a CI test: about 3 s per round with a release
    /// build. Figures and definitions: docs/benchmarks.md.
    Failback {
        /// Number of moves.
        #[arg(long, default_value_t = 20)]
        rounds: u32,
        /// The network guest image (default: $REMUS_WAN_GUEST_DIR/netguest.elf,
        /// else target/guest/netguest.elf).
        #[arg(long)]
        guest_image: Option<std::path::PathBuf>,
        /// A round fails when the counter stream goes this many seconds
        /// without a new value.
        #[arg(long, default_value_t = 10.0)]
        stall_limit: f64,
        /// Folder for the configuration, logs and replicas (kept). Default:
        /// a new folder in the temp dir, removed when every round passed.
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Begin with a switchover (dc1 -> dc2), so that the kills hit dc2
        /// and the switchovers go dc1 -> dc2.
        #[arg(long)]
        switchover_first: bool,
    },
    /// One site daemon protecting 1, 4, 8, 16 micro-VMs towards one standby
    /// daemon (WAN emulator, witness), beside the same VMs unprotected:
    /// per-VM epoch rate, pause p50/p99, CPU per VM, link bytes, and each
    /// VM's kill-to-first-byte time when the protect daemon is SIGKILLed.
    /// Prints a Markdown table. Needs root and KVM; a few minutes.
    Fleet {
        /// VMs per daemon, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
        vms: Vec<usize>,
        /// Measuring window of each cell, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Checkpoint interval, ms.
        #[arg(long, default_value_t = 50)]
        epoch_ms: u64,
        /// RTT of the emulated WAN, ms.
        #[arg(long, default_value_t = 10)]
        rtt_ms: u64,
        /// What each client reads of its guest's counter stream, KiB/s.
        #[arg(long, default_value_t = 256)]
        client_kib_s: u64,
        /// The network guest image (default: $REMUS_WAN_GUEST_DIR/netguest.elf,
        /// else target/guest/netguest.elf).
        #[arg(long)]
        guest_image: Option<std::path::PathBuf>,
        /// Folder for the configurations and logs (kept; the replicas and
        /// disks are removed at the end).
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
    },
    /// Disk synchronisation at a real size: a protected micro-VM with a
    /// sparse disk (8 GiB by default, 256 MiB of data) copied whole to a
    /// new standby, then, after a share of its blocks changed with no
    /// usable block map (the failback case), resynchronised by block
    /// hashes. Prints bytes sent, share of the disk and time of each, and
    /// the peak resident memory (VmHWM) of protect and standby. Needs root
    /// and KVM; several minutes with a release build.
    Resync {
        /// Disk size in GiB.
        #[arg(long, default_value_t = 8)]
        disk_gib: u64,
        /// Share of the disk's 64 KiB blocks changed before the resync, %.
        #[arg(long, default_value_t = 1.0)]
        changed_percent: f64,
        /// The network guest image (default: $REMUS_WAN_GUEST_DIR/netguest.elf,
        /// else target/guest/netguest.elf).
        #[arg(long)]
        guest_image: Option<std::path::PathBuf>,
    },
}

impl BenchCommand {
    pub fn run(self) -> Code {
        match self {
            BenchCommand::Codec {
                trace,
                cache_mib,
                warmup,
                all_schemes,
            } => {
                let opts = super::bench_codec::Options {
                    trace,
                    cache_mib,
                    all_schemes,
                    warmup,
                };
                match super::bench_codec::run(opts) {
                    Ok(()) => Code::Success,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Code::Failure
                    }
                }
            }
            BenchCommand::Protect { guest_image } => match super::bench_protect::run(guest_image) {
                Ok(()) => Code::Success,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    Code::Failure
                }
            },
            BenchCommand::Failback {
                rounds,
                guest_image,
                stall_limit,
                work_dir,
                switchover_first,
            } => {
                let Ok(stall_limit) = std::time::Duration::try_from_secs_f64(stall_limit) else {
                    eprintln!(
                        "error: --stall-limit must be a number of seconds, not {stall_limit}"
                    );
                    return Code::Usage;
                };
                let opts = super::bench_failback::Options {
                    rounds,
                    guest_image,
                    stall_limit,
                    work_dir,
                    switchover_first,
                };
                match super::bench_failback::run(opts) {
                    Ok(true) => Code::Success,
                    Ok(false) => Code::Failure,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Code::Failure
                    }
                }
            }
            BenchCommand::Fleet {
                vms,
                seconds,
                epoch_ms,
                rtt_ms,
                client_kib_s,
                guest_image,
                work_dir,
            } => {
                let opts = super::bench_fleet::Options {
                    counts: vms,
                    seconds,
                    epoch_ms,
                    rtt_ms,
                    client_kib_s,
                    guest_image,
                    work_dir,
                };
                match super::bench_fleet::run(opts) {
                    Ok(true) => Code::Success,
                    Ok(false) => Code::Failure,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Code::Failure
                    }
                }
            }
            BenchCommand::Resync {
                disk_gib,
                changed_percent,
                guest_image,
            } => {
                let opts = super::bench_resync::Options {
                    disk_gib,
                    changed_percent,
                    guest_image,
                };
                match super::bench_resync::run(opts) {
                    Ok(()) => Code::Success,
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        Code::Failure
                    }
                }
            }
            BenchCommand::Wan { quick } => {
                let opts = if quick {
                    wan::transport::bench::BenchOptions::quick()
                } else {
                    wan::transport::bench::BenchOptions::full()
                };
                match wan::transport::bench::run(&opts) {
                    Ok(table) => {
                        println!("{table}");
                        Code::Success
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        Code::Failure
                    }
                }
            }
        }
    }
}
