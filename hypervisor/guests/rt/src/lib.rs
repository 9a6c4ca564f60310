//! Runtime for ring-3 guests of the remus-wan micro-VM: entry point, debug
//! console, exit, heap, TSC clock, and the memory functions `core` expects
//! from a libc we do not have.
#![no_std]

extern crate alloc;

#[path = "../../../src/kvm/abi.rs"]
pub mod abi;
pub mod console;
pub mod mem;
pub mod port;
pub mod time;

use core::panic::PanicInfo;

pub use abi::BootInfo;

#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

extern "C" {
    /// End of the image (from the linker script).
    static _end: u8;
    /// The guest program's main function; its return value is the exit code.
    fn guest_main(info: &'static BootInfo) -> u32;
}

core::arch::global_asm!(
    ".section .text.start, \"ax\"",
    ".global _start",
    "_start:",
    "    and rsp, -16",
    "    xor ebp, ebp",
    "    call {start}",
    "    ud2",
    start = sym rt_start,
);

/// Rust entry: `rdi` = boot info, `rsi` = vCPU index.
extern "C" fn rt_start(info: *const BootInfo, vcpu: u64) -> ! {
    if vcpu != 0 {
        port::out32(abi::PORT_PARK, 0);
        loop {
            core::hint::spin_loop();
        }
    }
    // SAFETY: the VMM put a BootInfo at this address before starting us.
    let info: &'static BootInfo = unsafe { &*info };
    if info.magic != abi::BOOT_MAGIC || info.version != abi::BOOT_VERSION {
        exit(0xbad0_0001);
    }
    // SAFETY: `_end` is a linker symbol; only its address is used.
    let heap_start = (core::ptr::addr_of!(_end) as u64 + 4095) & !4095;
    let heap_end = info.mem_size - u64::from(info.vcpus) * abi::STACK_SIZE;
    // SAFETY: [heap_start, heap_end) is RAM nobody else uses: above the
    // image, below the stacks.
    unsafe {
        HEAP.lock()
            .init(heap_start as *mut u8, (heap_end - heap_start) as usize)
    };
    time::init(info.tsc_khz);
    // SAFETY: defined by the guest program.
    let code = unsafe { guest_main(info) };
    console::flush();
    exit(code)
}

/// Ends the VM with `code`.
pub fn exit(code: u32) -> ! {
    console::flush();
    port::out32(abi::PORT_EXIT, code);
    loop {
        core::hint::spin_loop();
    }
}

/// Sleeps up to `micros` (capped by the VMM) or until a device has work.
pub fn idle(micros: u32) {
    console::flush();
    port::out32(abi::PORT_IDLE, micros);
}

/// Tells the VMM the guest is ready.
pub fn report_ready() {
    console::flush();
    port::out32(abi::PORT_EVENT, abi::EVENT_READY);
}

/// The precompiled `alloc` for this target refers to it; with
/// `panic = "abort"` it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

/// Referenced by landing pads in the precompiled `alloc`; unreachable with
/// `panic = "abort"`.
#[no_mangle]
pub extern "C" fn _Unwind_Resume() -> ! {
    exit(0xdead_0002)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("guest panic: {info}");
    exit(0xdead)
}
