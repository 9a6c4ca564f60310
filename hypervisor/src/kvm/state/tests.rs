use proptest::prelude::*;
use proptest::strategy::ValueTree;
use zerocopy::FromBytes;

use super::*;

fn pod<T: FromBytes>(bytes: &[u8]) -> T {
    T::read_from_bytes(&bytes[..std::mem::size_of::<T>()]).unwrap()
}

fn bytes(n: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), n)
}

fn queue() -> impl Strategy<Value = QueueState> {
    (
        any::<(u16, u16, u16, bool, u16, bool)>(),
        any::<(u64, u64, u64)>(),
    )
        .prop_map(|((m, a, u, e, s, r), (d, av, us))| QueueState {
            max_size: m,
            next_avail: a,
            next_used: u,
            event_idx_enabled: e,
            size: s,
            ready: r,
            desc_table: d,
            avail_ring: av,
            used_ring: us,
        })
}

fn vcpu(index: u32) -> impl Strategy<Value = VcpuState> {
    (
        any::<bool>(),
        bytes(8192),
        proptest::collection::vec(any::<(u32, u64)>(), 0..50),
        proptest::collection::vec(any::<[u32; 7]>(), 0..8),
    )
        .prop_map(move |(parked, raw, msrs, cpuid)| {
            let mut off = 0;
            let mut next = |n: usize| {
                let s = &raw[off..off + n];
                off += n;
                s
            };
            let fpu_raw = next(512);
            let mut fpu = kvm_fpu::default();
            for (i, r) in fpu.fpr.iter_mut().enumerate() {
                r.copy_from_slice(&fpu_raw[i * 16..i * 16 + 16]);
            }
            fpu.fcw = u16::from_le_bytes([fpu_raw[200], fpu_raw[201]]);
            fpu.last_ip = u64::from_le_bytes(fpu_raw[210..218].try_into().unwrap());
            fpu.mxcsr = u32::from_le_bytes(fpu_raw[300..304].try_into().unwrap());
            for (i, r) in fpu.xmm.iter_mut().enumerate() {
                r.copy_from_slice(&fpu_raw[256 - 16 + i * 16..256 + i * 16]);
            }
            let mut xcrs: kvm_xcrs = pod(next(std::mem::size_of::<kvm_xcrs>()));
            xcrs.nr_xcrs %= 17;
            VcpuState {
                index,
                parked,
                regs: pod(next(std::mem::size_of::<kvm_regs>())),
                sregs: pod(next(std::mem::size_of::<kvm_sregs>())),
                fpu,
                xsave: next(XSAVE_SIZE).to_vec(),
                xcrs,
                debugregs: pod(next(std::mem::size_of::<kvm_debugregs>())),
                events: pod(next(std::mem::size_of::<kvm_vcpu_events>())),
                mp_state: pod(next(4)),
                msrs,
                cpuid: cpuid
                    .iter()
                    .map(|c| kvm_bindings::kvm_cpuid_entry2 {
                        function: c[0],
                        index: c[1],
                        flags: c[2],
                        eax: c[3],
                        ebx: c[4],
                        ecx: c[5],
                        edx: c[6],
                        padding: [0; 3],
                    })
                    .collect(),
            }
        })
}

fn transport() -> impl Strategy<Value = TransportState> {
    (any::<u32>(), any::<[u32; 6]>()).prop_map(|(t, r)| TransportState {
        device_type: t,
        regs: MmioTransportState {
            features_select: r[0],
            acked_features_select: r[1],
            queue_select: r[2],
            device_status: r[3],
            config_generation: r[4],
            interrupt_status: r[5],
        },
    })
}

fn vm_state() -> impl Strategy<Value = VmState> {
    let vcpus = (1u32..4).prop_flat_map(|n| (0..n).map(vcpu).collect::<Vec<_>>());
    let net = proptest::option::of((
        any::<[u8; 6]>(),
        any::<u64>(),
        any::<bool>(),
        proptest::collection::vec(queue(), 0..3),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..1600), 0..4),
    ));
    let block = proptest::option::of((
        any::<(u64, u64, bool)>(),
        proptest::collection::vec(queue(), 0..2),
    ));
    (
        any::<(u64, u32, bool)>(),
        proptest::option::of(any::<(u64, u32)>()),
        vcpus,
        proptest::collection::vec(any::<u8>(), 0..100),
        proptest::collection::vec(transport(), 0..3),
        net,
        block,
    )
        .prop_map(
            |((mem, tsc, ready), clock, vcpus, partial, transports, net, block)| VmState {
                mem_size: mem,
                tsc_khz: tsc,
                ready,
                clock: clock.map(|(clock, flags)| ClockState { clock, flags }),
                vcpus,
                console: ConsoleState { partial },
                transports,
                net: net.map(
                    |(mac, acked_features, activated, queues, pending_rx)| NetState {
                        mac,
                        acked_features,
                        queues,
                        activated,
                        pending_rx,
                    },
                ),
                block: block.map(
                    |((capacity, acked_features, activated), queues)| BlockState {
                        capacity,
                        acked_features,
                        queues,
                        activated,
                    },
                ),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trips(s in vm_state()) {
        let blob = s.to_bytes();
        prop_assert_eq!(VmState::decode(&blob), Ok(s));
    }

    #[test]
    fn corruption_is_refused_not_panicked_on(
        s in vm_state(),
        flips in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4),
        cut in any::<usize>(),
    ) {
        let blob = s.to_bytes();
        let mut bad = blob.clone();
        for (pos, x) in flips {
            let i = pos % bad.len();
            bad[i] ^= x;
        }
        prop_assert!(VmState::decode(&bad).is_err());
        let cut = cut % blob.len();
        prop_assert!(VmState::decode(&blob[..cut]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = VmState::decode(&b);
    }

    /// Corruption behind a valid checksum (a buggy or hostile sender):
    /// refused or decoded, never a panic.
    #[test]
    fn resealed_corruption_never_panics(
        s in vm_state(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let mut bad = s.to_bytes();
        for (pos, x) in flips {
            let i = pos % bad.len();
            bad[i] ^= x;
        }
        let cut = HEADER + TRAILER + cut % (bad.len() - HEADER - TRAILER + 1);
        for blob in [&mut bad[..], &mut s.to_bytes()[..cut]] {
            reseal(blob);
            if let Ok(d) = VmState::decode(blob) {
                prop_assert_eq!(VmState::decode(&d.to_bytes()), Ok(d));
            }
        }
    }
}

use super::seal_checksum as reseal;

fn sample() -> VmState {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    vm_state().new_tree(&mut runner).unwrap().current()
}

#[test]
fn typed_errors_for_each_kind_of_bad_blob() {
    let blob = sample().to_bytes();
    assert_eq!(VmState::decode(b"nonsense"), Err(StateError::BadMagic));
    let mut v = blob.clone();
    v[8] = 2;
    assert_eq!(VmState::decode(&v), Err(StateError::UnsupportedVersion(2)));
    let mut v = blob.clone();
    let last = v.len() - 9;
    v[last] ^= 1;
    assert_eq!(VmState::decode(&v), Err(StateError::Checksum));
    // Section version 2 of the first section.
    let mut v = blob.clone();
    v[HEADER + 2] = 2;
    reseal(&mut v);
    assert_eq!(
        VmState::decode(&v),
        Err(StateError::UnsupportedSectionVersion {
            kind: KIND_VM,
            version: 2
        })
    );
    let mut v = blob.clone();
    v[HEADER] = 99;
    reseal(&mut v);
    assert_eq!(VmState::decode(&v), Err(StateError::UnknownSection(99)));
    // A section length that does not add up.
    let mut v = blob.clone();
    v[HEADER + 4] ^= 1;
    reseal(&mut v);
    assert!(matches!(
        VmState::decode(&v),
        Err(StateError::Malformed { .. })
    ));
    for cut in (0..blob.len()).filter(|c| c % 7 == 0 || *c < 64) {
        assert!(VmState::decode(&blob[..cut]).is_err(), "cut at {cut}");
    }
}
