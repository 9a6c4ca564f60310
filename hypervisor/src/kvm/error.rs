//! Errors of the `kvm` backend, worded so a user can act on them.

use std::path::PathBuf;

/// Everything that can go wrong building or running a micro-VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available on this host, and may this user open /dev/kvm? try running as root or joining the 'kvm' group)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest image file is missing or unreadable.
    #[error("guest image {path}: {source} (build it with `cargo xtask guest-image`)")]
    GuestImage {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The guest image is not an ELF file we can load.
    #[error("guest image {path} is not a loadable guest: {reason}")]
    BadElf {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The disk image is missing or unreadable.
    #[error("disk image {path}: {source} (create it, e.g. `truncate -s 64M {path}`)", path = path.display())]
    DiskImage {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The tap device could not be created or attached.
    #[error("cannot create tap device {name:?}: {source} (needs CAP_NET_ADMIN, i.e. root, and /dev/net/tun)")]
    Tap {
        /// The tap name.
        name: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VM description is invalid.
    #[error("invalid VM specification: {0}")]
    Spec(String),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The guest faulted (no IDT: the fault becomes a shutdown).
    #[error("guest vCPU {vcpu} faulted: {} (vector {vector}), error code {error_code:#x}, at rip {rip:#x} (rsp {rsp:#x}, cr2 {cr2:#x}); the guest has no IDT, so the fault stopped it", exception_name(*vector))]
    GuestFault {
        /// vCPU index.
        vcpu: usize,
        /// Exception vector.
        vector: u8,
        /// Error code (0 when the exception has none).
        error_code: u32,
        /// Instruction pointer.
        rip: u64,
        /// Stack pointer.
        rsp: u64,
        /// Faulting address for page faults (CR2).
        cr2: u64,
    },
    /// KVM could not enter or continue the guest.
    #[error("vCPU {vcpu}: {what}")]
    VcpuFailed {
        /// vCPU index.
        vcpu: usize,
        /// What happened.
        what: String,
    },
    /// A checkpoint state blob was refused (corrupt, truncated, unknown
    /// version).
    #[error("checkpoint state refused: {0}")]
    State(#[from] crate::kvm::state::StateError),
    /// A replica does not fit the VM it is restored into.
    #[error("cannot restore the replica: {0}")]
    Restore(String),
    /// Operating-system error outside KVM.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with this module's error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Mnemonic and name of an x86 exception vector.
pub fn exception_name(vector: u8) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 floating point",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD floating point",
        _ => "exception",
    }
}
