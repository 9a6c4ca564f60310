#![no_std]
#![no_main]
#[no_mangle]
extern "C" fn guest_main(_: &guest_rt::BootInfo) -> u32 { 0 }
