//! Writing migration streams: the one a replica QEMU (`-incoming`) loads
//! at takeover, and — for tests, benchmarks and the fuzzer's seeds — the
//! ones a primary QEMU sends (initial stream, COLO checkpoints).

use super::message::ColoMessage;
use super::records::{self, RamBlock};
use super::wire;

/// Appends a section header (START/FULL carry id, instance, version).
pub fn put_section_header(out: &mut Vec<u8>, kind: u8, sid: u32, id: &str, version: u32) {
    out.push(kind);
    out.extend_from_slice(&sid.to_be_bytes());
    if kind == wire::SECTION_START || kind == wire::SECTION_FULL {
        wire::put_idstr(out, id.as_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&version.to_be_bytes());
    }
}

/// Appends a section footer.
pub fn put_footer(out: &mut Vec<u8>, sid: u32) {
    out.push(wire::SECTION_FOOTER);
    out.extend_from_slice(&sid.to_be_bytes());
}

/// A configuration section for `machine` (no subsections).
pub fn configuration(machine: &str) -> Vec<u8> {
    let mut out = vec![wire::CONFIGURATION];
    out.extend_from_slice(&(machine.len() as u32).to_be_bytes());
    out.extend_from_slice(machine.as_bytes());
    out
}

/// The stream a replica QEMU loads: header, the primary's configuration
/// section, one RAM START section (block list, then `pages`: `(block,
/// offset, 4096 bytes)`), and the device part (FULL sections + EOF).
/// RAM not in `pages` keeps what the replica's RAM already holds (the main
/// RAM is written into the shared RAM file beforehand).
pub fn restore_stream<'a>(
    out: &mut Vec<u8>,
    configuration: &[u8],
    ram_sid: u32,
    blocks: &[RamBlock],
    pages: impl Iterator<Item = (usize, u64, &'a [u8])>,
    devices: &[u8],
) {
    out.extend_from_slice(&wire::HEADER);
    out.extend_from_slice(configuration);
    put_section_header(
        out,
        wire::SECTION_START,
        ram_sid,
        wire::RAM_IDSTR,
        wire::RAM_VERSION,
    );
    records::put_block_list(out, blocks);
    let mut last = None;
    for (block, offset, data) in pages {
        records::put_page(out, blocks, &mut last, block, offset, data);
    }
    records::put_eos(out);
    put_footer(out, ram_sid);
    out.extend_from_slice(devices);
}

/// A device part as QEMU writes one: a FULL section per `(name, body)`
/// (ids from 10), then EOF.
pub fn device_sections(devices: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, (name, body)) in devices.iter().enumerate() {
        let sid = 10 + i as u32;
        put_section_header(&mut out, wire::SECTION_FULL, sid, name, 1);
        out.extend_from_slice(body);
        put_footer(&mut out, sid);
    }
    out.push(wire::VM_EOF);
    out
}

/// The description QEMU appends after EOF, for `devices`.
pub fn description(devices: &[(&str, &[u8])]) -> Vec<u8> {
    let list: Vec<serde_json::Value> = devices
        .iter()
        .map(|(n, _)| serde_json::json!({"name": n, "instance_id": 0, "version": 1}))
        .collect();
    serde_json::json!({"page_size": 4096, "devices": list})
        .to_string()
        .into_bytes()
}

/// What a primary QEMU with `x-colo` sends up to its first wait: header,
/// configuration, ENABLE_COLO, a RAM START section with the block list,
/// `pages` in a PART section, `last_pages` in the END section, the
/// device sections, EOF and the description.
pub fn primary_initial<'a>(
    blocks: &[RamBlock],
    pages: impl Iterator<Item = (usize, u64, &'a [u8])>,
    last_pages: impl Iterator<Item = (usize, u64, &'a [u8])>,
    devices: &[(&str, &[u8])],
) -> Vec<u8> {
    let sid = 1;
    let mut out = wire::HEADER.to_vec();
    out.extend_from_slice(&configuration("pc-i440fx-10.0"));
    out.extend_from_slice(&[wire::COMMAND, 0, wire::CMD_ENABLE_COLO as u8, 0, 0]);
    put_section_header(
        &mut out,
        wire::SECTION_START,
        sid,
        wire::RAM_IDSTR,
        wire::RAM_VERSION,
    );
    records::put_block_list(&mut out, blocks);
    records::put_eos(&mut out);
    put_footer(&mut out, sid);
    let mut last = None;
    for (kind, list) in [
        (wire::SECTION_PART, &mut pages.collect::<Vec<_>>()),
        (wire::SECTION_END, &mut last_pages.collect::<Vec<_>>()),
    ] {
        put_section_header(&mut out, kind, sid, "", 0);
        for &(b, o, d) in list.iter() {
            records::put_page(&mut out, blocks, &mut last, b, o, d);
        }
        records::put_eos(&mut out);
        put_footer(&mut out, sid);
    }
    out.extend_from_slice(&device_sections(devices));
    let desc = description(devices);
    out.push(wire::VMDESCRIPTION);
    out.extend_from_slice(&(desc.len() as u32).to_be_bytes());
    out.extend_from_slice(&desc);
    out
}

/// What a primary sends for one COLO checkpoint, in two parts: the
/// request (before our reply), then VMSTATE_SEND, the RAM END section with
/// `pages`, EOF, VMSTATE_SIZE and the device blob.
pub fn primary_checkpoint<'a>(
    blocks: &[RamBlock],
    pages: impl Iterator<Item = (usize, u64, &'a [u8])>,
    blob: &[u8],
) -> (Vec<u8>, Vec<u8>) {
    let sid = 1;
    let request = ColoMessage::CheckpointRequest.encode().to_vec();
    let mut out = ColoMessage::VmstateSend.encode().to_vec();
    put_section_header(&mut out, wire::SECTION_END, sid, "", 0);
    let mut last = None;
    for (b, o, d) in pages {
        records::put_page(&mut out, blocks, &mut last, b, o, d);
    }
    records::put_eos(&mut out);
    put_footer(&mut out, sid);
    out.push(wire::VM_EOF);
    out.extend_from_slice(&ColoMessage::VmstateSize.encode());
    out.extend_from_slice(&(blob.len() as u64).to_be_bytes());
    out.extend_from_slice(blob);
    (request, out)
}
