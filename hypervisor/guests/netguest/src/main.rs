//! The network guest: a ring-3 unikernel with virtio-net and virtio-blk
//! (virtio-drivers, polling) and smoltcp, serving on its configured address:
//!
//! * TCP 7: echo;
//! * TCP 9000: counter stream, consecutive big-endian u64 from 0, so a
//!   client detects any loss or duplication;
//! * TCP 7000: key-value (`SET k v`, `GET k`, `COUNT`, one per line), writes
//!   on the block device before the `OK`;
//! * TCP 9100: memory-dirtying workload on request (`DIRTY <kib> <ms>`,
//!   see `dirty.rs`), for benchmarks;
//! * TCP 7100: a shop front that records each order in another guest's
//!   key-value service (`front.rs`), for consistency-group tests.
//!
//! Beside that it can dirty memory at a configured rate (benchmarks).
#![no_std]
#![no_main]

extern crate alloc;

mod dirty;
mod front;
mod hal;
mod kvstore;
mod netdev;
mod services;

use alloc::rc::Rc;
use core::cell::RefCell;
use core::ptr::NonNull;

use guest_rt::abi::{BootInfo, MmioWindow};
use guest_rt::{println, time};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address};
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};

const NET: u32 = 1;
const BLOCK: u32 = 2;

fn transport(w: &MmioWindow) -> Option<MmioTransport<'static>> {
    let header = NonNull::new(w.base as *mut VirtIOHeader)?;
    // SAFETY: the VMM put a virtio-mmio window there.
    unsafe { MmioTransport::new(header, w.size as usize) }.ok()
}

fn now() -> Instant {
    Instant::from_micros(time::micros() as i64)
}

#[no_mangle]
extern "C" fn guest_main(info: &'static BootInfo) -> u32 {
    let windows = &info.mmio[..(info.mmio_count as usize).min(info.mmio.len())];
    let mut nic = None;
    let mut disk = None;
    for w in windows {
        match w.device_id {
            NET if nic.is_none() => nic = transport(w).and_then(netdev::Nic::new),
            BLOCK if disk.is_none() => disk = transport(w).and_then(|t| kvstore::Disk::new(t).ok()),
            _ => {}
        }
    }
    let Some(nic) = nic else {
        println!("net guest: no virtio-net device");
        return 2;
    };
    if info.has_ipv4 == 0 {
        println!("net guest: no IPv4 address configured");
        return 3;
    }
    let has_disk = disk.is_some();
    let kv = kvstore::KvStore::open(disk);
    println!(
        "net guest: disk {}, {} keys restored",
        if has_disk { "yes" } else { "no" },
        kv.len()
    );

    let mut device = netdev::Device(Rc::new(RefCell::new(nic)));
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(info.mac)));
    let mut iface = Interface::new(config, &mut device, now());
    let [a, b, c, d] = info.ipv4;
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(IpAddress::v4(a, b, c, d), info.prefix_len));
    });
    if info.has_gateway != 0 {
        let [a, b, c, d] = info.gateway;
        let _ = iface
            .routes_mut()
            .add_default_ipv4_route(Ipv4Address::new(a, b, c, d));
    }
    let mut sockets = SocketSet::new(alloc::vec![]);
    let mut services = services::Services::new(&mut sockets, kv);
    let mut dirtier = dirty::Dirtier::new(&mut sockets);
    let mut front = front::Front::new(&mut sockets);
    let mut workload = services::Workload::new(info.dirty_set_pages, info.dirty_pages_per_ms);
    println!(
        "net guest: {}.{}.{}.{}/{} up: echo 7, counter 9000, kv 7000, dirty 9100, front 7100",
        a, b, c, d, info.prefix_len
    );
    guest_rt::report_ready();
    loop {
        let ts = now();
        iface.poll(ts, &mut device, &mut sockets);
        let busy = services.serve(&mut sockets) | front.serve(&mut iface, &mut sockets);
        // Runs at most one slice (about 1 ms) of a dirtying job, so the
        // loop comes back to poll the network stack in between.
        let dirtying = dirtier.serve(&mut sockets);
        workload.run();
        if busy || dirtying || dirtier.active() || workload.active() {
            continue;
        }
        // Nothing to do: sleep until a frame arrives or a timer is due.
        let us = iface
            .poll_delay(now(), &sockets)
            .map_or(10_000, |d| d.total_micros().min(10_000));
        if us > 0 {
            guest_rt::idle(us as u32);
        }
    }
}
