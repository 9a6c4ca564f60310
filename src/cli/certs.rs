//! `remus-wan certs init --site NAME --out DIR`.

use std::path::PathBuf;

use clap::Subcommand;

use super::exit::Code;
use crate::certs::{self, CertsError, InitOptions};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Issue a certificate for one site (or the witness), creating the
    /// deployment CA first if the CA directory has none.
    ///
    /// Run it once per party against the same CA directory, then copy to
    /// each host its own <site>.pem and <site>.key plus ca.pem. Keep ca.key
    /// off the sites. Existing keys are never overwritten; key files are
    /// written with mode 0600.
    #[command(verbatim_doc_comment)]
    Init {
        /// Site (or witness) name, as in the configuration: the certificate's identity.
        #[arg(long)]
        site: String,
        /// Directory for <site>.pem and <site>.key.
        #[arg(long)]
        out: PathBuf,
        /// Directory holding ca.pem and ca.key (created there if absent). Default: --out.
        #[arg(long)]
        ca_dir: Option<PathBuf>,
        /// Validity of the site certificate, in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
}

impl CertsCommand {
    pub fn run(self) -> Code {
        let CertsCommand::Init {
            site,
            out,
            ca_dir,
            days,
        } = self;
        match certs::init_site(&InitOptions {
            site,
            out,
            ca_dir,
            days,
        }) {
            Ok(issued) => {
                if issued.ca_created {
                    println!("created CA      {}", issued.ca_cert.display());
                } else {
                    println!("used CA         {}", issued.ca_cert.display());
                }
                println!("certificate     {}", issued.cert.display());
                println!("private key     {} (0600)", issued.key.display());
                Code::Success
            }
            Err(e) => {
                eprintln!("error: {e}");
                match e {
                    CertsError::Exists(_) | CertsError::HalfCa { .. } => Code::Refused,
                    CertsError::BadSiteName(_) => Code::Usage,
                    _ => Code::Failure,
                }
            }
        }
    }
}
