//! `ferrum-agent install-cni`: the DaemonSet's init step. Copies the ferrum-cni binary into the
//! host's CNI binary directory and writes the conflist into its CNI config directory, each
//! atomically (a temporary file in the same directory, synced, then renamed over the target),
//! so the container runtime never sees a half-written plugin or config.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

/// The conflist's file name: sorted first among the usual CNI configs, as the runtime picks
/// the first one.
pub const CONFLIST_NAME: &str = "05-ferrum.conflist";

#[derive(Debug, Clone, Args)]
pub struct InstallCni {
    /// The ferrum-cni binary to install (inside the agent image).
    #[arg(long, default_value = "/usr/local/bin/ferrum-cni")]
    pub cni_bin: PathBuf,
    /// The host's CNI binary directory (mounted from /opt/cni/bin).
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI config directory (mounted from /etc/cni/net.d).
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The agent's CNI API socket, as the plugin on the host will see it.
    #[arg(long, default_value = ferrum_agent_api::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
}

/// Writes `contents` to `target` atomically with `mode`.
pub fn write_atomically(target: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = target
        .parent()
        .with_context(|| format!("{} has no parent directory", target.display()))?;
    let name = target
        .file_name()
        .with_context(|| format!("{} has no file name", target.display()))?;
    // A dot-name: CNI runtimes only read *.conf/*.conflist/*.json, and a crash leaves
    // nothing they would pick up.
    let tmp = dir.join(format!(".{}.ferrum-tmp", name.to_string_lossy()));
    let result = (|| {
        let mut f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(contents)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.set_permissions(fs::Permissions::from_mode(mode))
            .with_context(|| format!("setting the mode of {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Installs the plugin and the conflist. Checks everything first, so bad input changes nothing.
pub fn install_cni(args: &InstallCni) -> anyhow::Result<()> {
    let binary = fs::read(&args.cni_bin).with_context(|| {
        format!(
            "reading the CNI plugin {} (--cni-bin): is this the ferrum image?",
            args.cni_bin.display()
        )
    })?;
    if !binary.starts_with(b"\x7fELF") {
        bail!(
            "--cni-bin {} is not an executable (no ELF header)",
            args.cni_bin.display()
        );
    }
    for (flag, dir) in [
        ("--cni-bin-dir", &args.cni_bin_dir),
        ("--cni-conf-dir", &args.cni_conf_dir),
    ] {
        if !dir.is_dir() {
            bail!(
                "{flag} {} is not a directory: mount the host's CNI directory there",
                dir.display()
            );
        }
    }
    let conflist = ferrum_lab::runtime::conflist(&args.agent_socket);
    let text = serde_json::to_string_pretty(&conflist).context("encoding the conflist")?;

    // Plugin first: the runtime starts using the network once the conflist appears.
    let plugin = args.cni_bin_dir.join(ferrum_lab::runtime::CNI_PLUGIN);
    write_atomically(&plugin, &binary, 0o755)?;
    let conf = args.cni_conf_dir.join(CONFLIST_NAME);
    write_atomically(&conf, format!("{text}\n").as_bytes(), 0o644)?;
    tracing::info!(plugin = %plugin.display(), conflist = %conf.display(), "CNI plugin and conflist installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, InstallCni) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("ferrum-cni");
        fs::write(&bin, b"\x7fELF fake plugin").unwrap();
        fs::create_dir_all(dir.path().join("bin")).unwrap();
        fs::create_dir_all(dir.path().join("net.d")).unwrap();
        let args = InstallCni {
            cni_bin: bin,
            cni_bin_dir: dir.path().join("bin"),
            cni_conf_dir: dir.path().join("net.d"),
            agent_socket: "/run/ferrum/agent.sock".into(),
        };
        (dir, args)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn installs_plugin_and_conflist_and_replaces_old_ones() {
        let (_d, args) = setup();
        // An older plugin and config are replaced in place.
        fs::write(args.cni_bin_dir.join("ferrum-cni"), b"old").unwrap();
        fs::write(args.cni_conf_dir.join(CONFLIST_NAME), b"{}").unwrap();
        install_cni(&args).unwrap();
        let plugin = args.cni_bin_dir.join("ferrum-cni");
        assert_eq!(fs::read(&plugin).unwrap(), b"\x7fELF fake plugin");
        assert_eq!(
            fs::metadata(&plugin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let conf: serde_json::Value =
            serde_json::from_slice(&fs::read(args.cni_conf_dir.join(CONFLIST_NAME)).unwrap())
                .unwrap();
        assert_eq!(conf, ferrum_lab::runtime::conflist(&args.agent_socket));
        assert_eq!(conf["plugins"][0]["type"], "ferrum-cni");
        // No temporary files left behind; running again is idempotent.
        assert_eq!(names(&args.cni_bin_dir), ["ferrum-cni"]);
        assert_eq!(names(&args.cni_conf_dir), [CONFLIST_NAME]);
        install_cni(&args).unwrap();
        assert_eq!(names(&args.cni_conf_dir), [CONFLIST_NAME]);
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let (_d, mut args) = setup();
        let good = args.cni_bin.clone();
        args.cni_bin = good.with_file_name("missing");
        let e = install_cni(&args).unwrap_err().to_string();
        assert!(e.contains("--cni-bin"), "{e}");
        fs::write(&args.cni_bin, b"#!/bin/sh").unwrap();
        let e = format!("{:#}", install_cni(&args).unwrap_err());
        assert!(e.contains("not an executable"), "{e}");
        args.cni_bin = good;
        args.cni_conf_dir = args.cni_conf_dir.join("nope");
        let e = install_cni(&args).unwrap_err().to_string();
        assert!(e.contains("--cni-conf-dir"), "{e}");
        assert!(
            names(&args.cni_bin_dir).is_empty(),
            "the plugin was not installed either"
        );
    }
}
