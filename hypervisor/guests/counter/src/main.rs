//! The fastest guest for VMM tests. `BootInfo::arg` picks what it does:
//! 0 counts to 10 on the console and exits with the sum of its native-speed
//! loop; 1 executes `ud2`; 2 writes to an unmapped address; 3 spins forever
//! (for stop tests); 4 dirties `dirty_set_pages` pages once, reports ready,
//! then spins; 5 dirties its `dirty_set_pages` pages over and over (one
//! 8-byte write per page per pass) and counts finished passes in the u64
//! just below the set (checkpoint benchmarks).
#![no_std]
#![no_main]

use guest_rt::{abi::BootInfo, println};

#[no_mangle]
extern "C" fn guest_main(info: &'static BootInfo) -> u32 {
    println!(
        "counter guest: {} MiB, tsc {} kHz, mode {}",
        info.mem_size >> 20,
        info.tsc_khz,
        info.arg
    );
    match info.arg {
        1 => unsafe { core::arch::asm!("ud2") },
        2 => unsafe { (0x1_4000_0000u64 as *mut u64).write_volatile(1) },
        3 => {
            guest_rt::report_ready();
            loop {
                core::hint::spin_loop();
            }
        }
        4 => {
            let base = (info.mem_size / 2) & !4095;
            for i in 0..info.dirty_set_pages {
                // SAFETY: inside RAM, between heap start and the stacks for
                // the sizes the tests use.
                unsafe { ((base + i * 4096) as *mut u64).write_volatile(i + 1) };
            }
            guest_rt::report_ready();
            loop {
                core::hint::spin_loop();
            }
        }
        5 => {
            let base = (info.mem_size / 2) & !4095;
            let passes = (base - 8) as *mut u64;
            let mut pass = 0u64;
            loop {
                for i in 0..info.dirty_set_pages {
                    // SAFETY: as in mode 4.
                    unsafe { ((base + i * 4096) as *mut u64).write_volatile(pass) };
                }
                pass += 1;
                // SAFETY: the page below the set, also free RAM.
                unsafe { passes.write_volatile(pass) };
                if pass == 1 {
                    guest_rt::report_ready();
                }
            }
        }
        _ => {}
    }
    let mut sum: u64 = 0;
    for i in 0..10_000_000u64 {
        sum = sum.wrapping_add(i ^ (sum >> 3));
        core::hint::black_box(sum);
    }
    let x = core::hint::black_box(2.0f64);
    println!("sse: sqrt(2) = {:.6}", sqrt(x));
    for i in 1..=10 {
        println!("count {i}");
    }
    guest_rt::report_ready();
    println!("loop sum {sum:#x}");
    42
}

fn sqrt(x: f64) -> f64 {
    let mut r = x;
    for _ in 0..20 {
        r = 0.5 * (r + x / r);
    }
    r
}
