//! `kvm`: the built-in micro-VM. A small VMM on the rust-vmm crates: guest
//! RAM with dirty logging, ring-3 long-mode entry, ELF loading, vCPU
//! threads, a debug console, virtio-mmio net (tap) and block (raw file).
//!
//! ```no_run
//! use hypervisor::kvm::{Vm, VmSpec, Seams};
//! let vm = Vm::start(&VmSpec::new("demo", "counter.elf"), Seams::default())?;
//! let exit = vm.shutdown()?;
//! # Ok::<(), hypervisor::kvm::Error>(())
//! ```

pub mod abi;
pub mod affinity;
pub mod arch;
pub mod builder;
pub mod checkpoint;
pub mod devices;
pub mod error;
pub mod hot_pages;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod spec;
pub mod state;
pub mod termination;
mod vcpu;
pub mod vm;

pub use builder::restore;
pub use error::{Error, Result};
pub use spec::{ConsoleSpec, HotPagesConfig, NetSpec, Seams, VmSpec, Workload};
pub use state::{StateError, VmState};
pub use vm::{Exit, ExitCounts, Stopper, Vm};

impl Vm {
    /// Builds the VM described by `spec` and starts it.
    pub fn start(spec: &VmSpec, seams: Seams) -> Result<Vm> {
        builder::start(spec, seams)
    }
}

/// Whether `/dev/kvm` can be opened by this process.
pub fn available() -> std::result::Result<(), Error> {
    kvm_ioctls::Kvm::new()
        .map(|_| ())
        .map_err(Error::KvmUnavailable)
}
