//! Builds the guest programs in `hypervisor/guests` (outside the main
//! workspace) as static, non-PIE, libc-free ELF images for
//! `x86_64-unknown-linux-gnu`. `cargo xtask guest-image` calls [`build`].

use std::path::{Path, PathBuf};
use std::process::Command;

/// The target the guests are built for (the host's; no bare-metal target
/// is needed).
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// File name of the trivial counter guest.
pub const COUNTER_GUEST: &str = "counter-guest";
/// File name of the network guest.
pub const NET_GUEST: &str = "net-guest";

/// Why a guest build failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// cargo could not be run.
    #[error("cannot run {cargo}: {source}")]
    Spawn {
        /// The cargo binary.
        cargo: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// cargo failed.
    #[error("building the guest images failed ({status}); run `cargo build --release --target {TARGET}` in {dir} to see why", dir = dir.display())]
    Failed {
        /// Exit status.
        status: std::process::ExitStatus,
        /// The guests folder.
        dir: PathBuf,
    },
    /// An image could not be copied to its destination.
    #[error("cannot install guest image {path}: {source}", path = path.display())]
    Install {
        /// The destination.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The build succeeded but an image is missing.
    #[error("guest image {} missing after the build", .0.display())]
    Missing(PathBuf),
}

/// The built images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImages {
    /// The counter guest.
    pub counter: PathBuf,
    /// The network guest.
    pub net: PathBuf,
}

/// The guests' source folder.
pub fn guests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("guests")
}

/// The rustc flags that make a freestanding image.
pub fn rustflags() -> Vec<String> {
    let script = guests_dir().join("linker.ld");
    [
        "-C",
        "relocation-model=static",
        "-C",
        "link-arg=-nostdlib",
        "-C",
        "link-arg=-static",
        "-C",
        "link-arg=-no-pie",
        "-C",
        "link-arg=-Wl,--build-id=none",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-C".to_string(),
        format!("link-arg=-Wl,-T,{}", script.display()),
    ])
    .collect()
}

/// Where [`build`] puts the images for a given target dir.
pub fn image_paths(target_dir: &Path) -> GuestImages {
    let dir = target_dir.join(TARGET).join("release");
    GuestImages {
        counter: dir.join(COUNTER_GUEST),
        net: dir.join(NET_GUEST),
    }
}

/// Builds all guests (release) into `target_dir`; cargo's output goes to
/// our stderr.
pub fn build(target_dir: &Path) -> Result<GuestImages, BuildError> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let dir = guests_dir();
    let status = Command::new(&cargo)
        .current_dir(&dir)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags().join("\x1f"))
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .map_err(|source| BuildError::Spawn { cargo, source })?;
    if !status.success() {
        return Err(BuildError::Failed { status, dir });
    }
    let images = image_paths(target_dir);
    for p in [&images.counter, &images.net] {
        if !p.is_file() {
            return Err(BuildError::Missing(p.clone()));
        }
    }
    Ok(images)
}

/// Builds all guests into `target_dir` and copies them into `out_dir` as
/// `netguest.elf` and `counter.elf` (the names the example configuration
/// uses).
pub fn install(target_dir: &Path, out_dir: &Path) -> Result<GuestImages, BuildError> {
    let built = build(target_dir)?;
    let installed = installed_paths(out_dir);
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(out_dir)
            .and_then(|_| std::fs::copy(from, to))
            .map(|_| ())
            .map_err(|source| BuildError::Install {
                path: to.to_owned(),
                source,
            })
    };
    copy(&built.counter, &installed.counter)?;
    copy(&built.net, &installed.net)?;
    Ok(installed)
}

/// Environment variable naming a folder with prebuilt images (as written by
/// [`install`]); tests and benchmarks use it instead of building.
pub const GUEST_DIR_ENV: &str = "REMUS_WAN_GUEST_DIR";

/// The installed image names inside `dir` (see [`install`]).
pub fn installed_paths(dir: &Path) -> GuestImages {
    GuestImages {
        counter: dir.join("counter.elf"),
        net: dir.join("netguest.elf"),
    }
}

/// The images from `$REMUS_WAN_GUEST_DIR` when set, else built into
/// `target_dir`.
pub fn from_env_or_build(target_dir: &Path) -> Result<GuestImages, BuildError> {
    match std::env::var_os(GUEST_DIR_ENV) {
        Some(dir) => {
            let images = installed_paths(Path::new(&dir));
            for p in [&images.counter, &images.net] {
                if !p.is_file() {
                    return Err(BuildError::Missing(p.clone()));
                }
            }
            Ok(images)
        }
        None => build(target_dir),
    }
}
