//! COLO's control messages (migration/colo.c, qapi `COLOMessage`): a
//! be32 each, on the migration socket in both directions; VMSTATE_SIZE is
//! followed by a be64.

/// One COLO message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColoMessage {
    /// Secondary → primary: loaded the initial state, COLO may start.
    CheckpointReady,
    /// Primary → secondary: a checkpoint begins.
    CheckpointRequest,
    /// Secondary → primary: go ahead (the primary then stops its guest).
    CheckpointReply,
    /// Primary → secondary: the guest is stopped; RAM and state follow.
    VmstateSend,
    /// Primary → secondary: the device blob's size (a be64 follows).
    VmstateSize,
    /// Secondary → primary: all of the checkpoint arrived.
    VmstateReceived,
    /// Secondary → primary: loaded; the primary resumes its guest.
    VmstateLoaded,
}

impl ColoMessage {
    /// Wire value.
    pub fn code(self) -> u32 {
        match self {
            ColoMessage::CheckpointReady => 0,
            ColoMessage::CheckpointRequest => 1,
            ColoMessage::CheckpointReply => 2,
            ColoMessage::VmstateSend => 3,
            ColoMessage::VmstateSize => 4,
            ColoMessage::VmstateReceived => 5,
            ColoMessage::VmstateLoaded => 6,
        }
    }

    /// The message of a wire value, if it is one.
    pub fn from_code(v: u32) -> Option<ColoMessage> {
        Some(match v {
            0 => ColoMessage::CheckpointReady,
            1 => ColoMessage::CheckpointRequest,
            2 => ColoMessage::CheckpointReply,
            3 => ColoMessage::VmstateSend,
            4 => ColoMessage::VmstateSize,
            5 => ColoMessage::VmstateReceived,
            6 => ColoMessage::VmstateLoaded,
            _ => return None,
        })
    }

    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            ColoMessage::CheckpointReady => "checkpoint-ready",
            ColoMessage::CheckpointRequest => "checkpoint-request",
            ColoMessage::CheckpointReply => "checkpoint-reply",
            ColoMessage::VmstateSend => "vmstate-send",
            ColoMessage::VmstateSize => "vmstate-size",
            ColoMessage::VmstateReceived => "vmstate-received",
            ColoMessage::VmstateLoaded => "vmstate-loaded",
        }
    }

    /// The 4 bytes we send.
    pub fn encode(self) -> [u8; 4] {
        self.code().to_be_bytes()
    }
}

/// A wire value as text for errors (`vmstate-send` or `unknown 0x...`).
pub fn describe(v: u32) -> String {
    match ColoMessage::from_code(v) {
        Some(m) => m.name().to_owned(),
        None => format!("unknown 0x{v:08x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for v in 0..7 {
            let m = ColoMessage::from_code(v).expect("known");
            assert_eq!(m.code(), v);
            assert_eq!(m.encode(), v.to_be_bytes());
        }
        assert_eq!(ColoMessage::from_code(7), None);
        assert!(describe(99).contains("unknown"));
    }
}
