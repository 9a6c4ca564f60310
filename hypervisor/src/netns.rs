//! Network namespaces for tests and tools: run code in a fresh namespace
//! that vanishes with it, and configure links with iproute2.

use std::io;
use std::process::Command;

/// Runs `f` on a new thread inside a fresh network namespace (with `lo`
/// up). Every thread and process it starts inherits the namespace, which
/// disappears when they are gone: nothing is left behind, even on panic
/// (the panic is passed on to the caller).
pub fn in_new_netns<T: Send>(f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: unshare(CLONE_NEWNET) affects only the calling thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            ip(&["link", "set", "lo", "up"])?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Runs `ip ARGS`; its stderr becomes the error.
pub fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
