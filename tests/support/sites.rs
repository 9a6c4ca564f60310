//! The daemons of a two-site deployment as the end-to-end tests start
//! them from a written configuration: dc1 protects, dc2 holds the replica,
//! a witness arbitrates. Each keeps its state under the test's folder
//! (`state/`, `witness/`) and logs to `<name>.log` there, so a failing
//! test can print any of them.

use std::path::Path;
use std::time::Duration;

use super::Proc;

/// How long a daemon may take to start listening on a loaded machine.
const START_LIMIT: Duration = Duration::from_secs(30);

fn under(dir: &Path, name: &str) -> String {
    dir.join(name)
        .to_str()
        .expect("utf-8 test folder")
        .to_owned()
}

/// `remus-wan standby --site dc2`, with `env` (fault points), returned
/// once it listens.
pub fn standby(cfg: &str, dir: &Path, env: &[(&str, String)]) -> Proc {
    let state = under(dir, "state");
    let standby = Proc::remus_env(
        "standby",
        &[
            "standby",
            "--config",
            cfg,
            "--site",
            "dc2",
            "--state-dir",
            &state,
        ],
        env,
        &dir.join("standby.log"),
    );
    standby.expect_log("standby listening", START_LIMIT);
    standby
}

/// `remus-wan standby --site dc1` with its state in `state-dc1/`, its
/// status on 127.0.0.1:9479 (dc2's standby has the default port) and its
/// log in `standby-dc1.log`: the old primary's site back as the backup of
/// what dc2 took over (failback). Not waited for: dc2 connects when it can.
pub fn standby_at_dc1(cfg: &str, dir: &Path) -> Proc {
    let state = under(dir, "state-dc1");
    Proc::remus(
        "standby at dc1 (failback)",
        &[
            "standby",
            "--config",
            cfg,
            "--site",
            "dc1",
            "--state-dir",
            &state,
            "--metrics",
            "127.0.0.1:9479",
        ],
        &dir.join("standby-dc1.log"),
    )
}

/// `remus-wan witness` of the deployment.
pub fn witness(cfg: &str, dir: &Path) -> Proc {
    let state = under(dir, "witness");
    Proc::remus(
        "witness",
        &["witness", "--config", cfg, "--state-dir", &state],
        &dir.join("witness.log"),
    )
}

/// The witness, then the standby once it listens.
pub fn witness_and_standby(cfg: &str, dir: &Path) -> (Proc, Proc) {
    let witness = witness(cfg, dir);
    (witness, standby(cfg, dir, &[]))
}

/// `remus-wan protect [VM] --site dc2` with `env`; with no VM, the daemon
/// protects every VM (and group) backed up at dc2.
pub fn protect(vm: Option<&str>, cfg: &str, dir: &Path, env: &[(&str, String)]) -> Proc {
    let mut args = vec!["protect"];
    args.extend(vm);
    args.extend(["--site", "dc2", "--config", cfg]);
    Proc::remus_env("protect", &args, env, &dir.join("protect.log"))
}
