//! `remus-wan status`: the figures of the protect/standby processes on
//! this host.

use clap::Args;

use super::exit::Code;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Metrics/status endpoints to ask (protect serves 127.0.0.1:9477 and
    /// standby 127.0.0.1:9478 by default).
    #[arg(long = "endpoint", default_values = ["127.0.0.1:9477", "127.0.0.1:9478"])]
    endpoints: Vec<std::net::SocketAddr>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl StatusArgs {
    pub fn run(self) -> Code {
        let mut all = Vec::new();
        let mut errors = Vec::new();
        for e in &self.endpoints {
            match crate::metrics::fetch_status(*e) {
                Ok(v) => all.extend(v),
                Err(err) => errors.push(format!("{e}: {err}")),
            }
        }
        if all.is_empty() {
            eprintln!(
                "error: no remus-wan process answered ({})",
                errors.join("; ")
            );
            return Code::Failure;
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
        } else {
            print!("{}", crate::metrics::render_table(&all));
        }
        Code::Success
    }
}
