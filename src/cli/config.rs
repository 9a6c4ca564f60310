//! `remus-wan config check FILE [--site NAME]`.

use std::path::PathBuf;

use clap::Subcommand;

use super::exit::Code;

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print a summary. Every problem is
    /// listed with its key path and what was expected. Environment
    /// overrides (REMUS_WAN_SECTION__KEY) are applied first.
    Check {
        /// The TOML configuration file.
        file: PathBuf,
        /// Also check the files this party (a site, or the witness) needs on
        /// this host: its certificate, key and CA, VM images, disks, secrets.
        #[arg(long)]
        site: Option<String>,
    },
}

impl ConfigCommand {
    pub fn run(self) -> Code {
        match self {
            ConfigCommand::Check { file, site } => check(file, site),
        }
    }
}

fn check(file: PathBuf, site: Option<String>) -> Code {
    let cfg = match super::common::load_config(&file) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(site) = &site {
        let issues = cfg.check_files(site);
        if !issues.is_empty() {
            eprintln!(
                "error: {}: files for {site:?} on this host: {} problem(s):",
                file.display(),
                issues.len()
            );
            for i in issues {
                eprintln!("  - {i}");
            }
            return Code::Config;
        }
    }
    println!("{}: valid", file.display());
    println!(
        "  sites: {}",
        cfg.sites
            .iter()
            .map(|s| format!("{} ({})", s.name, s.connect_addr()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match &cfg.witness {
        Some(w) if w.backend == crate::config::WitnessBackend::Etcd => {
            println!("  witness: etcd ({})", w.endpoints.join(", "))
        }
        Some(w) => println!("  witness: {} ({})", w.name, w.connect_addr()),
        None => println!("  witness: none (automatic failover needs one)"),
    }
    for vm in &cfg.vms {
        let r = cfg.replication_for(vm);
        println!(
            "  vm {}: {} -> {}, {:?}, {} MiB, {} vCPU, epoch {} ms, {} prefix(es)",
            vm.name,
            vm.primary,
            vm.backup,
            vm.backend,
            vm.memory_mib,
            vm.vcpus,
            r.epoch_interval_ms,
            vm.service_prefixes.len()
        );
    }
    for g in &cfg.groups {
        println!(
            "  group {}: {} (one replica, one lease)",
            g.name,
            g.vms.join(" + ")
        );
    }
    match &site {
        Some(s) => println!("  files for {s}: present"),
        None => println!("  files: not checked (pass --site NAME on each host)"),
    }
    Code::Success
}
