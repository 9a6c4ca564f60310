//! Finding guest RAM in QEMU's address space: the line of
//! `/proc/PID/maps` that maps our RAM file from offset 0, matched by device
//! and inode (the file's name is gone by then, and paths can be renamed).

/// The start address of the mapping of file `(dev, ino)` at offset 0 with
/// exactly `len` bytes, if `maps` (the text of `/proc/PID/maps`) has one.
pub fn find(maps: &str, dev: u64, ino: u64, len: u64) -> Option<u64> {
    maps.lines().find_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (range, _perms, offset, device, inode) =
            (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        let offset = u64::from_str_radix(offset, 16).ok()?;
        let (major, minor) = device.split_once(':')?;
        let major = u64::from_str_radix(major, 16).ok()?;
        let minor = u64::from_str_radix(minor, 16).ok()?;
        let inode: u64 = inode.parse().ok()?;
        (offset == 0
            && inode == ino
            && libc::makedev(major as u32, minor as u32) == dev
            && end.checked_sub(start) == Some(len))
        .then_some(start)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0a00000-55d0c0b00000 r--p 00000000 fe:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0040000000 rw-s 00000000 00:1a 98765 /dev/shm/remus-wan-web1-1-primary0.ram (deleted)
7f0040000000-7f0040001000 rw-s 00001000 00:1a 98765 /dev/shm/remus-wan-web1-1-primary0.ram (deleted)
7f0050000000-7f0050200000 rw-p 00000000 00:00 0
";

    #[test]
    fn finds_the_whole_file_mapping_by_device_and_inode() {
        let dev = libc::makedev(0, 0x1a);
        assert_eq!(find(MAPS, dev, 98765, 1 << 30), Some(0x7f00_0000_0000));
    }

    #[test]
    fn other_inodes_sizes_offsets_and_devices_do_not_match() {
        let dev = libc::makedev(0, 0x1a);
        assert_eq!(find(MAPS, dev, 98766, 1 << 30), None);
        assert_eq!(find(MAPS, dev, 98765, 1 << 20), None);
        assert_eq!(
            find(MAPS, dev, 98765, 0x1000),
            None,
            "offset 0x1000 mapping"
        );
        assert_eq!(find(MAPS, libc::makedev(0, 0x1b), 98765, 1 << 30), None);
        assert_eq!(find("garbage\n\n1-2 x", dev, 98765, 1), None);
    }
}
