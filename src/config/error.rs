//! Configuration errors: each names the key and what was expected.

use std::fmt;
use std::path::PathBuf;

/// One problem found in a configuration, at a key path such as
/// `vms[0].network.mac` or `netops.bgp.speakers[1].site`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub key: String,
    pub problem: String,
}

impl Issue {
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: {}", self.key, self.problem)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: {}", Self::list(.issues))]
    Invalid { path: PathBuf, issues: Vec<Issue> },
}

impl ConfigError {
    fn list(issues: &[Issue]) -> String {
        match issues {
            [one] => one.to_string(),
            many => {
                let mut s = format!("{} problems:", many.len());
                for i in many {
                    s.push_str("\n  - ");
                    s.push_str(&i.to_string());
                }
                s
            }
        }
    }

    /// The individual problems, for callers that present them their own way.
    pub fn issues(&self) -> &[Issue] {
        match self {
            ConfigError::Invalid { issues, .. } => issues,
            _ => &[],
        }
    }
}
