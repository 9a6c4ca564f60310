//! Configuration: one TOML file per deployment, overridable by
//! `REMUS_WAN_<SECTION>__<KEY>` environment variables (double underscore
//! between levels, e.g. `REMUS_WAN_REPLICATION__EPOCH_INTERVAL_MS=50`).
//!
//! Loading never stops at the first mistake: every problem is reported with
//! the key's path and what was expected (see [`Issue`]).

mod error;
mod model;
mod validate;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use error::{ConfigError, Issue};
pub use model::*;
pub use validate::{parse_community, parse_large_community, parse_mac};

/// Environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "REMUS_WAN";

impl Config {
    /// Reads `path`, applies the process environment's overrides, and
    /// validates the structure (not the files: see [`Config::check_files`]).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, path, base, env)
    }

    /// Parses TOML text; relative paths in it are taken from `base`.
    pub fn parse(
        text: &str,
        origin: &Path,
        base: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let invalid = |issues| ConfigError::Invalid {
            path: origin.to_owned(),
            issues,
        };
        // Only `SECTION__KEY` variables are overrides: a bare REMUS_WAN_X
        // (say REMUS_WAN_ALLOW_SKIP) belongs to the tools, not the file.
        let overrides: HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| {
                k.strip_prefix(ENV_PREFIX)
                    .and_then(|r| r.strip_prefix('_'))
                    .is_some_and(|r| r.contains("__"))
            })
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(overrides.into_iter().collect())),
            )
            .build()
            .map_err(|e| ConfigError::Syntax {
                path: origin.to_owned(),
                message: e.to_string(),
            })?;
        let mut cfg: Config = serde_path_to_error::deserialize(built).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." {
                "(top level)".into()
            } else {
                key
            };
            invalid(vec![Issue::new(key, expected_text(e.inner()))])
        })?;
        cfg.resolve_paths(base);
        let issues = validate::structure(&cfg);
        if issues.is_empty() {
            Ok(cfg)
        } else {
            Err(invalid(issues))
        }
    }

    /// Checks the files the given party (site or witness name) needs on
    /// this host: certificates and key, VM images and disks, secrets.
    pub fn check_files(&self, party: &str) -> Vec<Issue> {
        validate::files_for(self, party)
    }

    pub fn site(&self, name: &str) -> Option<&Site> {
        self.sites.iter().find(|s| s.name == name)
    }

    pub fn vm(&self, name: &str) -> Option<&Vm> {
        self.vms.iter().find(|v| v.name == name)
    }

    /// The replication settings in force for `vm`.
    pub fn replication_for<'a>(&'a self, vm: &'a Vm) -> &'a Replication {
        vm.replication.as_ref().unwrap_or(&self.replication)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for s in &mut self.sites {
            s.tls.resolve(base);
        }
        if let Some(w) = &mut self.witness {
            // Absent (an etcd witness): stays empty, as validation expects.
            if !w.tls.ca.as_os_str().is_empty() {
                w.tls.resolve(base);
            }
            for p in [&mut w.ca, &mut w.cert, &mut w.key].into_iter().flatten() {
                fix(p);
            }
        }
        for vm in &mut self.vms {
            for p in [
                &mut vm.guest_image,
                &mut vm.kernel,
                &mut vm.initramfs,
                &mut vm.disk,
            ]
            .into_iter()
            .flatten()
            {
                fix(p);
            }
        }
        if let Some(bgp) = &mut self.netops.bgp {
            for p in bgp
                .speakers
                .iter_mut()
                .flat_map(|s| s.peers.iter_mut())
                .filter_map(|p| p.md5_password_file.as_mut())
            {
                fix(p);
            }
        }
        if let Some(dns) = &mut self.netops.dns {
            fix(&mut dns.tsig_secret_file);
        }
        for h in &mut self.netops.hooks {
            fix(&mut h.command);
        }
    }
}

impl Tls {
    fn resolve(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

/// serde's messages say "invalid type: string "x", expected u64"; turn
/// them into our "expected ..., found ..." shape where we recognise them.
fn expected_text(e: &config::ConfigError) -> String {
    let msg = e.to_string();
    // The config crate appends its own idea of the key; ours is better.
    let msg = msg
        .split(" for key `")
        .next()
        .unwrap_or(&msg)
        .trim()
        .to_owned();
    if let Some((name, value)) = msg
        .strip_prefix("enum ")
        .and_then(|r| r.split_once(" does not have variant constructor "))
    {
        return match enum_values(name) {
            Some(values) => format!("expected one of {values}, found {value:?}"),
            None => format!("unknown value {value:?}"),
        };
    }
    if msg.contains("invalid IP address syntax") || msg.contains("invalid IP network") {
        return format!(
            "expected an IP address or prefix such as 198.51.100.80, 198.51.100.0/24 or \
             2001:db8::/48, found something else ({msg})"
        );
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {expected}, found {found}");
        }
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        if let Some((found, expected)) = rest.split_once(", expected ") {
            return format!("expected {expected}, found {found}");
        }
    }
    if let Some(rest) = msg.strip_prefix("missing field ") {
        return format!("expected key {rest}, found nothing");
    }
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        return format!("unknown key {rest}");
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        return format!("unknown value {rest}");
    }
    msg
}

/// The accepted spellings of our enums, for error messages.
fn enum_values(name: &str) -> Option<&'static str> {
    Some(match name {
        "Backend" => "\"kvm\", \"qemu\", \"xen\"",
        "WitnessBackend" => "\"builtin\", \"etcd\"",
        "Accel" => "\"auto\", \"kvm\", \"tcg\"",
        "DirtyTracking" => "\"auto\", \"write-protect\", \"colo\", \"compare\"",
        "StandbyPolicy" => "\"none\", \"prepend\"",
        "PeerMode" => "\"active\", \"passive\", \"both\"",
        "TsigAlgorithm" => "\"hmac-sha256\", \"hmac-sha384\", \"hmac-sha512\"",
        "HookEvent" => {
            "\"promote\", \"demote\", \"fence\", \"protection-lost\", \"protection-restored\""
        }
        _ => return None,
    })
}
