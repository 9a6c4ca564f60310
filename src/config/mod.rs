//! Configuration: TOML file + REMUS_WAN_* environment overrides.
