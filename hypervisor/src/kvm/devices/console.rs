//! The debug console: bytes from the guest, split into lines, sent to a log
//! file and/or the terminal, and kept (bounded) in memory for callers.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Most lines kept in memory.
const KEPT_LINES: usize = 10_000;
/// Longest line; longer ones are split.
const MAX_LINE: usize = 4096;

/// Saved state of the console (a partial line not yet printed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleState {
    /// Bytes after the last newline.
    pub partial: Vec<u8>,
}

/// The console device.
#[derive(Debug)]
pub struct Console {
    name: String,
    partial: Vec<u8>,
    lines: VecDeque<String>,
    log: Option<File>,
    to_terminal: bool,
}

impl Console {
    /// A console for VM `name`; `log` receives every line.
    pub fn new(name: &str, log: Option<&Path>, to_terminal: bool) -> std::io::Result<Self> {
        let log = match log {
            Some(p) => Some(File::options().create(true).append(true).open(p)?),
            None => None,
        };
        Ok(Console {
            name: name.to_owned(),
            partial: Vec::new(),
            lines: VecDeque::new(),
            log,
            to_terminal,
        })
    }

    /// Bytes from the guest.
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' || self.partial.len() >= MAX_LINE {
                self.flush_line();
                if b == b'\n' {
                    continue;
                }
            }
            if b != b'\r' {
                self.partial.push(b);
            }
        }
    }

    fn flush_line(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        tracing::debug!(vm = %self.name, "console: {line}");
        if let Some(f) = &mut self.log {
            let _ = writeln!(f, "{line}");
        }
        if self.to_terminal {
            eprintln!("[{}] {line}", self.name);
        }
        if self.lines.len() == KEPT_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Lines printed so far (the last `KEPT_LINES`).
    pub fn lines(&self) -> Vec<String> {
        self.lines.iter().cloned().collect()
    }

    /// Saves the state.
    pub fn save(&self) -> ConsoleState {
        ConsoleState {
            partial: self.partial.clone(),
        }
    }

    /// Restores a saved state.
    pub fn restore(&mut self, s: &ConsoleState) {
        self.partial = s.partial.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_lines() {
        let mut c = Console::new("t", None, false).unwrap();
        c.write(b"hello\r\nwor");
        c.write(b"ld\n");
        c.write(b"tail");
        assert_eq!(c.lines(), vec!["hello", "world"]);
        assert_eq!(c.save().partial, b"tail");
    }
}
