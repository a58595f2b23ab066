//! `cargo xtask image`: the VM template the qemu provider boots, baked as `docs/baking-templates.md` tells
//! an operator to bake one, from Debian's packages only: bookworm with systemd, cloud-init and the cloud
//! kernel, and our own `ebb-agent` .deb installed and enabled (its unit waits for the `/etc/ebb/agent.toml`
//! that each VM's user data writes). Nothing secret or collector-specific is in it.
//!
//! Output in `target/images/`: `template.qcow2`, `vmlinuz`, `initrd.img` (booted directly, so the disk
//! needs no boot loader) and `template.json` (what went in, its size, how long it took). It is rebuilt
//! only when its inputs change: the recipe below and the agent package's bytes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail, ensure};

use crate::root;

/// Debian's packages in the template, beside the essential ones.
const PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    // systemd-logind needs it; logind turns the ACPI power button (the provider's power-off) into a
    // clean shutdown.
    "dbus",
    "cloud-init",
    "linux-image-cloud-amd64",
    // Debian 12's cloud images configure the network with ifupdown, which cloud-init renders for.
    "ifupdown",
    "isc-dhcp-client",
    "iproute2",
    "netbase",
];

const SUITE: &str = "bookworm";

/// The archive, with its updates and security suites, as a template should have them.
const SOURCES: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// Run in the finished tree (`$1`): the agent installed from its package and enabled, then what the
/// baking guide's last step removes so that no copy inherits another's identity.
/// (The package is copied in to `/tmp/ebb-agent.deb` first.)
const CUSTOMIZE: &[&str] = &[
    "chroot \"$1\" dpkg -i /tmp/ebb-agent.deb",
    "rm \"$1/tmp/ebb-agent.deb\"",
    "chroot \"$1\" systemctl enable ebb-agent.service",
    "echo '/dev/vda / ext4 rw,discard,errors=remount-ro 0 1' > \"$1/etc/fstab\"",
    "echo ebb-template > \"$1/etc/hostname\"",
    "rm -rf \"$1/var/lib/ebb-agent\" \"$1/etc/ebb/agent.toml\" \"$1/var/lib/cloud\"",
    ": > \"$1/etc/machine-id\"",
];

/// The root file system's size; the overlays grow into its free space.
const DISK_BYTES: &str = "3G";

/// Debian packages the build needs: the command, and its package.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("mke2fs", "e2fsprogs"),
    ("qemu-img", "qemu-utils"),
    ("qemu-system-x86_64", "qemu-system-x86"),
];

pub fn images_dir() -> PathBuf {
    root().join("target/images")
}

pub fn image(args: &[String]) -> anyhow::Result<()> {
    ensure!(args.is_empty(), "usage: cargo xtask image");
    let built = build()?;
    println!("{}", built.display());
    Ok(())
}

/// Builds the template if its inputs changed; returns the directory that holds it.
pub fn build() -> anyhow::Result<PathBuf> {
    install_tools()?;
    let agent_deb = crate::package_agent_deb()?;
    let out = images_dir();
    let inputs = inputs_digest(&std::fs::read(&agent_deb)?);
    let manifest = out.join("template.json");
    if let Ok(text) = std::fs::read_to_string(&manifest)
        && let Ok(previous) = serde_json::from_str::<serde_json::Value>(&text)
        && previous["inputs"] == inputs.as_str()
        && ["template.qcow2", "vmlinuz", "initrd.img"]
            .iter()
            .all(|f| out.join(f).exists())
    {
        eprintln!("image: target/images is up to date (inputs {})", &inputs[..12]);
        return Ok(out);
    }
    let started = Instant::now();
    let work = out.join("build");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let rootfs = work.join("rootfs");
    std::fs::copy(&agent_deb, work.join("ebb-agent.deb"))?;
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--variant=minbase", "--quiet"])
        .arg(format!("--include={}", PACKAGES.join(",")));
    mmdebstrap.arg(format!(
        "--customize-hook=copy-in {} /tmp",
        work.join("ebb-agent.deb").display()
    ));
    for hook in CUSTOMIZE {
        mmdebstrap.arg(format!("--customize-hook={hook}"));
    }
    mmdebstrap.arg(SUITE).arg(&rootfs).args(SOURCES);
    run(&mut mmdebstrap, "mmdebstrap")?;
    let boot = rootfs.join("boot");
    let kernel = find(&boot, "vmlinuz-")?;
    let initrd = find(&boot, "initrd.img-")?;
    let raw = work.join("root.raw");
    run(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", "ebb-root", "-d"])
            .arg(&rootfs)
            .arg(&raw)
            .arg(DISK_BYTES),
        "mke2fs",
    )?;
    run(
        Command::new("qemu-img")
            .args(["convert", "-O", "qcow2"])
            .arg(&raw)
            .arg(work.join("template.qcow2")),
        "qemu-img convert",
    )?;
    std::fs::copy(&kernel, work.join("vmlinuz"))?;
    std::fs::copy(&initrd, work.join("initrd.img"))?;
    // Published by rename: running VMs keep the files they opened, new ones get the new template.
    for file in ["template.qcow2", "vmlinuz", "initrd.img"] {
        std::fs::rename(work.join(file), out.join(file))?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let qcow2_bytes = std::fs::metadata(out.join("template.qcow2"))?.len();
    let record = serde_json::json!({
        "inputs": inputs,
        "suite": SUITE,
        "packages": PACKAGES,
        "agent_deb": agent_deb.file_name().map(|n| n.to_string_lossy().into_owned()),
        "kernel": kernel.file_name().map(|n| n.to_string_lossy().into_owned()),
        "build_secs": seconds.round(),
        "qcow2_bytes": qcow2_bytes,
    });
    std::fs::write(&manifest, serde_json::to_string_pretty(&record)? + "\n")?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "image: built target/images/template.qcow2 ({:.0} MB) with {} in {seconds:.0} s",
        qcow2_bytes as f64 / 1e6,
        record["kernel"].as_str().unwrap_or("a kernel"),
    );
    Ok(out)
}

/// What the template is made of: the recipe and the agent package.
fn inputs_digest(agent_deb: &[u8]) -> String {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [PACKAGES, SOURCES, CUSTOMIZE, &[SUITE, DISK_BYTES]] {
        for item in part {
            context.update(item.as_bytes());
            context.update(b"\n");
        }
    }
    context.update(agent_deb);
    context.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The Debian packages the build runs, installed when missing (as root; otherwise it says what to run).
/// Checked again after installing: apt may remove one to install another (qemu-system-x86 from Debian
/// replaces a backported qemu-utils it conflicts with), and then that one is installed from Debian too.
pub fn install_tools() -> anyhow::Result<()> {
    for _ in 0..2 {
        let missing: Vec<&str> = TOOLS
            .iter()
            .filter(|(command, _)| !on_path(command))
            .map(|(_, package)| *package)
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        install_packages(&missing)?;
    }
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(command, _)| !on_path(command))
        .map(|(command, _)| *command)
        .collect();
    ensure!(
        missing.is_empty(),
        "after apt-get install, {} still missing: install the packages by hand (`apt-get install {}`)",
        missing.join(", "),
        TOOLS.iter().map(|(_, p)| *p).collect::<Vec<_>>().join(" ")
    );
    Ok(())
}

fn install_packages(missing: &[&str]) -> anyhow::Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !is_root {
        bail!(
            "the VM image needs {}: run `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("image: installing {} from Debian", missing.join(", "));
    let install = |update: bool| {
        let script = format!(
            "{}apt-get install -y -qq {} >/dev/null",
            if update { "apt-get update -qq && " } else { "" },
            missing.join(" ")
        );
        Command::new("sh")
            .args(["-c", &script])
            .status()
            .is_ok_and(|s| s.success())
    };
    ensure!(
        install(false) || install(true),
        "apt-get install {} failed",
        missing.join(" ")
    );
    Ok(())
}

fn on_path(command: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(command).is_file()))
}

fn find(dir: &Path, prefix: &str) -> anyhow::Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

fn run(command: &mut Command, what: &str) -> anyhow::Result<()> {
    let status = command.status().with_context(|| format!("cannot run {what}"))?;
    ensure!(status.success(), "{what} failed ({status})");
    Ok(())
}
