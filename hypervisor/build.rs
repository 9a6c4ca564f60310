//! Builds the LD_PRELOAD library that gives remus-wan a userfaultfd of
//! QEMU's address space (src/qemu/write_protect/preload.c). The library is
//! embedded in the crate (`include_bytes!`) and written next to the VM's
//! sockets when a QEMU starts, so nothing has to be installed.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "src/qemu/write_protect/preload.c";
    println!("cargo:rerun-if-changed={src}");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let lib = out.join("libremus_wan_uffd.so");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&lib)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}` for {src}: {e} (install gcc)"));
    assert!(status.success(), "`{cc}` failed on {src} ({status})");
}
