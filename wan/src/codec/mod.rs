//! Checkpoint wire format and delta codec (see docs/wire-format.md).
