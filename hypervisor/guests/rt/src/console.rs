//! Debug console: bytes gather in the shared console page and leave in one
//! port write per line (or per full page).

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::abi::{CONSOLE_BUF, CONSOLE_BUF_SIZE, PORT_CONSOLE_FLUSH};
use crate::port::out32;

static LEN: AtomicUsize = AtomicUsize::new(0);

fn push(b: u8) {
    let len = LEN.load(Ordering::Relaxed);
    // SAFETY: the console page is RAM reserved for this, identity-mapped.
    unsafe { ((CONSOLE_BUF as usize + len) as *mut u8).write_volatile(b) };
    LEN.store(len + 1, Ordering::Relaxed);
    if b == b'\n' || len + 1 == CONSOLE_BUF_SIZE {
        flush();
    }
}

/// Sends what is buffered.
pub fn flush() {
    let len = LEN.swap(0, Ordering::Relaxed);
    if len > 0 {
        out32(PORT_CONSOLE_FLUSH, len as u32);
    }
}

/// The console as a `fmt::Write`.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(push);
        Ok(())
    }
}

/// Prints to the debug console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        let _ = core::fmt::Write::write_fmt(&mut $crate::console::Console, format_args!($($arg)*));
    }};
}

/// Prints a line to the debug console.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        $crate::print!($($arg)*);
        $crate::print!("\n");
    }};
}
