//! The seams through which the replication engine takes over a guest's
//! output, whatever the backend: transmitted network frames (held until
//! their epoch commits) and disk writes (captured before they reach the
//! image). Every backend (the micro-VM's virtio devices, QEMU's NIC and NBD
//! servers) feeds the same two traits.

/// Where transmitted frames go.
pub trait FrameSink: Send {
    /// One Ethernet frame (without virtio header) from the guest.
    fn send(&mut self, frame: &[u8]);
}

/// Sees every disk write before it is applied.
pub trait WriteHook: Send {
    /// `data` is about to be written at byte `offset` of the image.
    fn on_write(&mut self, offset: u64, data: &[u8]);
    /// The guest asked for a flush (writes so far must be durable).
    fn on_flush(&mut self) {}
}

/// Seams through which the engine takes over the devices' output.
#[derive(Default)]
pub struct Seams {
    /// Transmitted frames go here instead of the tap.
    pub frame_sink: Option<Box<dyn FrameSink>>,
    /// Called with every disk write before it reaches the image.
    pub write_hook: Option<Box<dyn WriteHook>>,
}

impl std::fmt::Debug for Seams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seams")
            .field("frame_sink", &self.frame_sink.is_some())
            .field("write_hook", &self.write_hook.is_some())
            .finish()
    }
}
