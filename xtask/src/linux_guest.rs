//! `cargo xtask guest-image --linux`: the Linux guest of the `qemu` backend.
//!
//! The kernel is Debian's `linux-image-amd64` (installed with apt, so the
//! version is whatever the distribution ships); the initramfs is written
//! here as a newc cpio archive, so no root, `cpio` or `fakeroot` is needed
//! for its `/dev/console` node. It holds busybox-static, the virtio
//! modules (the distribution kernel has them as modules, not built in) and
//! an `/init` script that loads them, configures `eth0` from the kernel
//! command line (`rw.ip=ADDR/PREFIX rw.gw=GATEWAY`) and starts:
//!
//! - a TCP counter service on port 7000: every line received is answered
//!   with the next value of one guest-wide counter (kept in guest RAM, so a
//!   replica continues it);
//! - with a disk (`/dev/vda`), a key-value service on port 7001: `SET k v`
//!   writes `v` into 512-byte block `k` and syncs it before answering
//!   `OK`; `GET k` answers `VALUE v` from the disk;
//! - `httpd` on port 80;
//! - a console ticker: `tick N` every 200 ms on the serial console, N kept
//!   in the shell's memory, which lets tests see that a replica continued
//!   the guest rather than rebooting it;
//! - with `rw.dirty=MIB` on the command line, a benchmark workload that
//!   rewrites the same MIB of guest memory with new bytes, pass after pass;
//! - with `rw.work=NAME`, a real workload for the codec's dirty-page traces
//!   (`cargo run -p hypervisor --example record_trace`, see docs/benchmarks.md): `gzip`
//!   (compress and decompress ~11 MiB of text and binaries), `sort` (sort
//!   ~9 MiB of text rows, by two keys), `db` (sqlite3 inserting rows in
//!   transactions into an indexed table; needs sqlite3 on the build host,
//!   which is copied into the image with its libraries; without it, an
//!   approximation: awk appending rows to a log file and re-sorting the
//!   index file, said on the console) or `copy` (cp and read back a
//!   ~11 MiB file through the page cache, over and over). The console
//!   says `workload NAME ready` once its input exists.
//!
//! Output: `vmlinuz` and `initrd.cpio` in the chosen folder (the names
//! `hypervisor::qemu::LinuxImage` expects).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::deps;

/// Debian packages the Linux guest is built from.
pub const LINUX_GUEST_APT_PACKAGES: &[&str] = &["linux-image-amd64", "busybox-static"];

/// Modules loaded by `/init`, in dependency order (each needs the ones
/// before it; insmod does not resolve dependencies). The qemu backend runs
/// the guest on QEMU's PC machine with virtio-pci devices; virtio_mmio is
/// kept for QEMU's microvm machine.
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
];

const INIT: &str = r#"#!/bin/busybox sh
# remus-wan Linux guest: /init of the initramfs (see xtask/src/linux_guest.rs).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
# devtmpfs gives /dev/vda and friends once virtio_blk binds; the console
# node of the archive was already opened by the kernel for our stdio.
mount -t devtmpfs dev /dev
mkdir -p /run /tmp
# insmod, unlike modprobe, does not read module parameters from the kernel
# command line (MODULE.PARAM=VALUE): pass them on.
for m in MODULES; do
  args=
  for arg in $(cat /proc/cmdline); do
    case "$arg" in "$m".*) args="$args ${arg#$m.}" ;; esac
  done
  if [ -f /lib/modules/$m.ko ]; then insmod /lib/modules/$m.ko $args || echo "insmod $m failed"; fi
done
IP=; GW=; DIRTY=; WORK=
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    rw.ip=*) IP="${arg#rw.ip=}" ;;
    rw.gw=*) GW="${arg#rw.gw=}" ;;
    rw.dirty=*) DIRTY="${arg#rw.dirty=}" ;;
    rw.work=*) WORK="${arg#rw.work=}" ;;
  esac
done
ip link set lo up
if [ -n "$IP" ]; then
  ip link set eth0 up
  ip addr add "$IP" dev eth0
  if [ -n "$GW" ]; then ip route add default via "$GW"; fi
fi
echo 0 > /run/count
nc -ll -p 7000 -e /bin/counter &
if [ -b /dev/vda ]; then nc -ll -p 7001 -e /bin/disk & fi
httpd -p 80 -h /www
# rw.dirty=MIB: a benchmark workload rewriting the same MIB of page cache
# (a file in the initramfs' tmpfs, written in place) with new bytes on
# every pass, for ever.
if [ -n "$DIRTY" ]; then
  (i=0; while :; do
    i=$((i+1))
    yes "$i" | head -c $((DIRTY * 1048576)) | dd of=/run/dirty bs=64k conv=notrunc 2>/dev/null
  done) &
fi
# rw.work=NAME: a real workload for dirty-page traces (/bin/workload).
if [ -n "$WORK" ]; then /bin/workload "$WORK" & fi
echo "remus-wan guest ready"
n=0
while :; do
  n=$((n+1))
  echo "tick $n"
  # A little traffic of our own now and then (ARP for the gateway), so the
  # NIC backend sees frames even when nobody talks to the guest.
  if [ -n "$GW" ] && [ $((n % 5)) -eq 0 ]; then ping -c 1 -W 1 "$GW" >/dev/null 2>&1 & fi
  sleep 0.2
done
"#;

const COUNTER: &str = r#"#!/bin/busybox sh
# One line in, the next value of the guest-wide counter out.
while read -r _; do
  n=$(( $(cat /run/count) + 1 ))
  echo "$n" > /run/count
  echo "$n"
done
"#;

const WORKLOAD: &str = r#"#!/bin/busybox sh
# rw.work=NAME: gzip | sort | db | copy, for ever (see xtask/src/linux_guest.rs).
mkdir -p /tmp/w && cd /tmp/w || exit 1
# Text rows: a random key, a counter, words (about 9 MiB).
seq 1 150000 | awk 'BEGIN { srand(7) } { printf "%08d %d row-%d user%d@example.org status=%s\n", int(rand() * 1e8), $1, $1 * 7, int(rand() * 5000), (rand() < 0.5 ? "active" : "idle") }' > rows.txt
case "$1" in
  gzip)
    cat rows.txt /bin/busybox /lib/modules/*.ko > data
    echo "workload gzip ready"
    while :; do gzip -c data > data.gz; gzip -dc data.gz > data.out; rm -f data.out; done ;;
  sort)
    echo "workload sort ready"
    while :; do sort rows.txt > by-key; sort -t ' ' -k4 by-key > by-user; rm -f by-key by-user; done ;;
  db)
    if [ -x /bin/sqlite3 ]; then
      sqlite3 db.sqlite 'CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, name TEXT, email TEXT); CREATE INDEX t_k ON t(k);'
      echo "workload db ready (sqlite3)"
      b=0
      while :; do
        b=$((b + 1))
        awk -v b=$b 'BEGIN { srand(b); print "BEGIN;"; for (i = 0; i < 500; i++) printf "INSERT INTO t(k, name, email) VALUES(%d, \047name-%d-%d\047, \047user%d@example.org\047);\n", int(rand() * 1e9), b, i, int(rand() * 1e6); print "COMMIT;" }' | sqlite3 db.sqlite
      done
    else
      # No sqlite3 in the image: rows appended to a log, and an index
      # file (key, offset) kept sorted, batch after batch.
      echo "workload db ready (approximation: no sqlite3 in the image)"
      b=0; : > log; : > index
      while :; do
        b=$((b + 1))
        awk -v b=$b 'BEGIN { srand(b); for (i = 0; i < 500; i++) printf "%09d name-%d-%d user%d@example.org\n", int(rand() * 1e9), b, i, int(rand() * 1e6) }' > batch
        cat batch >> log
        cut -d ' ' -f 1 batch | sort -m - index > index.new && mv index.new index
      done
    fi ;;
  copy)
    cat rows.txt /bin/busybox /lib/modules/*.ko > data
    echo "workload copy ready"
    while :; do cp data copy; cat copy > /dev/null; rm -f copy; done ;;
  *) echo "workload $1: unknown (gzip, sort, db, copy)" ;;
esac
"#;

const DISK: &str = r#"#!/bin/busybox sh
# "SET k v": v into 512-byte block k of the disk, on the disk (fsync)
# before "OK"; "GET k": "VALUE v" read back from the disk.
while read -r cmd k v; do
  case "$cmd" in
    SET) printf '%s\n' "$v" | dd of=/dev/vda bs=512 seek="$k" count=1 conv=notrunc,sync,fsync 2>/dev/null && echo OK || echo ERR ;;
    GET) echo "VALUE $(dd if=/dev/vda bs=512 skip="$k" count=1 2>/dev/null | head -n 1)" ;;
    *) echo ERR ;;
  esac
done
"#;

/// Builds the Linux guest into `out_dir` (`vmlinuz`, `initrd.cpio`),
/// installing the Debian packages first when they are missing.
pub fn build(out_dir: &Path) -> Result<PathBuf> {
    deps::ensure_apt(LINUX_GUEST_APT_PACKAGES)?;
    let version = kernel_version()?;
    let kernel = PathBuf::from(format!("/boot/vmlinuz-{version}"));
    let modules_dir = PathBuf::from(format!("/lib/modules/{version}"));
    let busybox = PathBuf::from("/bin/busybox");

    let mut cpio = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "www",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(d);
    }
    // The kernel opens /dev/console for init's stdio before init can
    // mount anything: without this node the guest's output is lost.
    cpio.char_dev("dev/console", 0o600, 5, 1);
    cpio.file(
        "bin/busybox",
        0o755,
        &std::fs::read(&busybox).with_context(|| format!("reading {}", busybox.display()))?,
    );
    let init = INIT.replace("MODULES", &MODULES.join(" "));
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("bin/counter", 0o755, COUNTER.as_bytes());
    cpio.file("bin/disk", 0o755, DISK.as_bytes());
    cpio.file("bin/workload", 0o755, WORKLOAD.as_bytes());
    add_sqlite(&mut cpio)?;
    cpio.file(
        "www/index.html",
        0o644,
        b"<html><body>remus-wan Linux guest</body></html>\n",
    );
    let builtin = std::fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    for m in MODULES {
        if builtin.lines().any(|l| l.ends_with(&format!("/{m}.ko"))) {
            continue;
        }
        let path = find_module(&modules_dir, m)?;
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        if path.extension().is_some_and(|e| e != "ko") {
            bail!(
                "module {} is compressed; busybox insmod here takes plain .ko files",
                path.display()
            );
        }
        cpio.file(&format!("lib/modules/{m}.ko"), 0o644, &bytes);
    }

    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let initrd = out_dir.join("initrd.cpio");
    std::fs::write(&initrd, cpio.finish())
        .with_context(|| format!("writing {}", initrd.display()))?;
    std::fs::copy(&kernel, out_dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", kernel.display()))?;
    std::fs::write(out_dir.join("kernel-version"), format!("{version}\n"))?;
    Ok(out_dir.to_owned())
}

/// sqlite3 of the build host (the `db` workload), with the libraries `ldd`
/// names, when the host has it: the guest's workload falls back to an
/// approximation without it.
fn add_sqlite(cpio: &mut Cpio) -> Result<()> {
    let sqlite = Path::new("/usr/bin/sqlite3");
    if !sqlite.exists() {
        eprintln!("xtask: no /usr/bin/sqlite3 here: the guest's db workload is an approximation");
        return Ok(());
    }
    let out = Command::new("ldd")
        .arg(sqlite)
        .output()
        .context("running ldd")?;
    let libs = parse_ldd(&String::from_utf8_lossy(&out.stdout));
    let mut dirs: Vec<String> = Vec::new();
    for lib in &libs {
        let mut parent = Path::new(lib.trim_start_matches('/')).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_string_lossy().into_owned());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if !dirs.contains(&d) && d != "lib" && d != "bin" {
                cpio.dir(&d);
                dirs.push(d);
            }
        }
    }
    for lib in &libs {
        let bytes = std::fs::read(lib).with_context(|| format!("reading {lib}"))?;
        cpio.file(lib.trim_start_matches('/'), 0o755, &bytes);
    }
    cpio.file(
        "bin/sqlite3",
        0o755,
        &std::fs::read(sqlite).with_context(|| format!("reading {}", sqlite.display()))?,
    );
    Ok(())
}

/// Absolute library paths in `ldd` output (`name => /path (addr)` and the
/// interpreter's `/path (addr)`).
fn parse_ldd(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l
                .split("=>")
                .nth(1)
                .unwrap_or(l)
                .split_whitespace()
                .next()?;
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect()
}

/// The kernel version `linux-image-amd64` points at (its dependency
/// `linux-image-<version>`).
fn kernel_version() -> Result<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Depends}", "linux-image-amd64"])
        .output()
        .context("running dpkg-query")?;
    let depends = String::from_utf8_lossy(&out.stdout);
    parse_kernel_version(&depends).with_context(|| {
        format!("cannot find the kernel version in linux-image-amd64's dependencies {depends:?}")
    })
}

fn parse_kernel_version(depends: &str) -> Option<String> {
    depends
        .split(',')
        .filter_map(|d| d.split_whitespace().next())
        .find_map(|d| d.strip_prefix("linux-image-"))
        .map(str::to_owned)
}

fn find_module(dir: &Path, name: &str) -> Result<PathBuf> {
    let mut stack = vec![dir.join("kernel")];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))?;
        for e in entries {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .and_then(|f| f.to_str())
                .is_some_and(|f| f.split('.').next() == Some(name) && f.contains(".ko"))
            {
                return Ok(p);
            }
        }
    }
    bail!("kernel module {name} not found under {}", dir.display())
}

/// A newc ("070701") cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so the archive is reproducible
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, 0o020000 | perm, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_from_depends() {
        assert_eq!(
            parse_kernel_version("linux-image-6.1.0-56-amd64 (= 6.1.192-2)").as_deref(),
            Some("6.1.0-56-amd64")
        );
        assert_eq!(parse_kernel_version(""), None);
    }

    #[test]
    fn ldd_output_gives_library_paths() {
        let out = "\tlinux-vdso.so.1 (0x00007f)\n\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x7f)\n\t/lib64/ld-linux-x86-64.so.2 (0x7f)\n";
        assert_eq!(
            parse_ldd(out),
            [
                "/lib/x86_64-linux-gnu/libz.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        c.char_dev("dev/console", 0o600, 5, 1);
        let out = c.finish();
        assert_eq!(out.len() % 4, 0);
        assert!(out.starts_with(b"070701"));
        let trailer = b"TRAILER!!!\0";
        assert!(out.windows(trailer.len()).any(|w| w == trailer));
        // The console node: mode 020600, rdev 5:1.
        let hdr = out
            .windows(6)
            .enumerate()
            .filter(|(_, w)| *w == b"070701")
            .map(|(i, _)| i)
            .nth(2)
            .expect("third header");
        let field = |n: usize| {
            let s = std::str::from_utf8(&out[hdr + 6 + n * 8..hdr + 14 + n * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        assert_eq!(field(1), 0o020600);
        assert_eq!((field(9), field(10)), (5, 1));
    }
}
