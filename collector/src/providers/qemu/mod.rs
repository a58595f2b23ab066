//! The qemu provider (`type = "qemu"`): each member is a real VM on this machine, booted from a
//! copy-on-write overlay of a template image that has `ebb-agent` installed (`cargo xtask image` builds
//! one; `docs/baking-templates.md` says how to bake your own). Its user data reaches cloud-init through a
//! NoCloud seed disk (`seed.rs`) with instance-id = member id. Networking is qemu's user mode only: the
//! guest reaches the collector through the user-mode gateway (10.0.2.2 is this machine's 127.0.0.1), and
//! the load balancer and health checks reach the guest's service port through a port forward on the
//! member's own loopback address (`<address_prefix>.N:<member_port>`), as the local provider's instances.
//!
//! Each VM lives in `<instances_dir>/<member_id>/`: `instance.json` (the qemu process, so that a restarted
//! collector adopts the VM instead of launching another), `disk.qcow2` (the overlay), `seed.img`,
//! `console.log` (the serial console), `qemu.log` and the QMP socket through which it is powered off
//! (ACPI, then killed after `stop_grace_secs`). The console is kept in `<instances_dir>/consoles/` after
//! the member goes; when a launch never becomes healthy, its last lines are in the activity.
//!
//! KVM is used when it works and TCG (emulation, several times slower) otherwise, said once in the log:
//! `/dev/kvm` may exist and still fail, so a tiny guest is booted with the VMs' own machine and CPU to
//! find out.

pub mod seed;

use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use super::local::{free_loopback_address, start_time, write_private};
use super::process::{ProcessRecord, ProcessRecords};
use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};

/// The guest's view of this machine's 127.0.0.1 under qemu's user-mode networking.
pub const GUEST_GATEWAY: &str = "10.0.2.2";

/// Consoles of members that are gone, kept for reading after the fact.
const KEPT_CONSOLES: usize = 32;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// The template disk (qcow2 or raw) with `ebb-agent` installed; each member boots an overlay of it.
    pub image: PathBuf,
    /// A kernel to boot directly (the template then needs no boot loader), with `initrd` and
    /// `kernel_args`; without it the image boots its own.
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    #[serde(default = "default_kernel_args")]
    pub kernel_args: String,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Members' port forwards listen on `<address_prefix>.1` to `.254`, one address each.
    #[serde(default = "default_address_prefix")]
    pub address_prefix: String,
    #[serde(default)]
    pub accelerator: Accelerator,
    /// After the ACPI power-off, how long a VM has to shut down before it is killed.
    #[serde(default = "default_stop_grace_secs")]
    pub stop_grace_secs: u32,
    #[serde(default = "default_qemu")]
    pub qemu: PathBuf,
    #[serde(default = "default_qemu_img")]
    pub qemu_img: PathBuf,
    /// The collector's address as the guests reach it; default `https://10.0.2.2:<port of
    /// server.grpc_listen>`, which needs the collector to listen on 127.0.0.1 or on every address.
    pub collector_url: Option<String>,
    pub user_data_file: Option<PathBuf>,
    pub user_data: Option<String>,
    #[serde(default)]
    pub user_data_format: crate::userdata::UserDataFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accelerator {
    /// KVM if it works here, else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

fn default_kernel_args() -> String {
    "root=/dev/vda rw console=ttyS0".into()
}
fn default_vcpus() -> u32 {
    1
}
fn default_memory_mib() -> u32 {
    512
}
fn default_address_prefix() -> String {
    "127.0.9".into()
}
fn default_stop_grace_secs() -> u32 {
    60
}
fn default_qemu() -> PathBuf {
    "qemu-system-x86_64".into()
}
fn default_qemu_img() -> PathBuf {
    "qemu-img".into()
}

impl QemuConfig {
    /// The URL written into each VM's agent configuration.
    pub fn guest_collector_url(&self, grpc_address: SocketAddr) -> String {
        self.collector_url
            .clone()
            .unwrap_or_else(|| format!("https://{GUEST_GATEWAY}:{}", grpc_address.port()))
    }

    /// What is wrong with the settings alone, keyed under `provider.`.
    pub fn problems(&self, grpc_listen: SocketAddr) -> Vec<String> {
        let mut problems = Vec::new();
        if !(1..=64).contains(&self.vcpus) {
            problems.push("provider.vcpus: must be 1 to 64".into());
        }
        if self.memory_mib < 128 {
            problems
                .push("provider.memory_mib: must be at least 128 (a cloud kernel with cloud-init needs ~300)".into());
        }
        if format!("{}.1", self.address_prefix)
            .parse::<IpAddr>()
            .map_or(true, |ip| !ip.is_loopback())
        {
            problems.push(format!(
                "provider.address_prefix: `{}` must be three octets of a loopback address, like `127.0.9`",
                self.address_prefix
            ));
        }
        if self.initrd.is_some() && self.kernel.is_none() {
            problems.push("provider.initrd: only with provider.kernel".into());
        }
        match &self.collector_url {
            Some(url) if !url.starts_with("https://") => {
                problems.push(format!("provider.collector_url: `{url}` must start with https://"));
            }
            Some(_) => {}
            None => {
                let ip = grpc_listen.ip();
                if !(ip.is_unspecified() || ip == IpAddr::from([127, 0, 0, 1])) {
                    problems.push(format!(
                        "provider.collector_url: guests reach this machine's 127.0.0.1 as {GUEST_GATEWAY}, but \
                         server.grpc_listen is {grpc_listen}; listen on 127.0.0.1 or 0.0.0.0, or set \
                         provider.collector_url to an address the guests reach"
                    ));
                }
            }
        }
        problems
    }
}

/// What `validate` and `serve` check on this machine: qemu and qemu-img found, the template and kernel
/// readable.
pub fn preflight(config: &QemuConfig) -> Result<(), CloudError> {
    for (key, program, package) in [
        ("qemu", &config.qemu, "qemu-system-x86"),
        ("qemu_img", &config.qemu_img, "qemu-utils"),
    ] {
        if find_program(program).is_none() {
            return Err(CloudError::permanent(format!(
                "provider.{key}: {} not found; install Debian's {package} (apt-get install {package}) or set \
                 provider.{key}",
                program.display()
            )));
        }
    }
    let files = [
        ("image", Some(&config.image)),
        ("kernel", config.kernel.as_ref()),
        ("initrd", config.initrd.as_ref()),
    ];
    for (key, path) in files {
        let Some(path) = path else { continue };
        if let Err(e) = std::fs::File::open(path) {
            let hint = if key == "image" {
                " (`cargo xtask image` builds one in target/images/)"
            } else {
                ""
            };
            return Err(CloudError::permanent(format!(
                "provider.{key}: cannot read {}: {e}{hint}",
                path.display()
            )));
        }
    }
    Ok(())
}

/// `program` itself when it holds a `/`, else the first match on `PATH`.
fn find_program(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
}

pub struct QemuProvider {
    config: QemuConfig,
    /// The VMs, each in `<instances_dir>/<member_id>/`.
    records: ProcessRecords,
    /// The template, absolute: overlays name their backing file by path.
    image: PathBuf,
    accelerator: tokio::sync::OnceCell<Accelerator>,
    /// Held while a launch picks its address and writes its record, so two launches never share one.
    launching: tokio::sync::Mutex<()>,
}

impl QemuProvider {
    /// Checks the machine (`preflight`); each VM is kept in `<instances_dir>/<member_id>/`.
    pub fn new(config: QemuConfig, instances_dir: PathBuf) -> Result<Self, CloudError> {
        preflight(&config)?;
        let image = std::fs::canonicalize(&config.image).map_err(|e| {
            CloudError::permanent(format!("provider.image: {}: {e}", config.image.display())).caused_by(e)
        })?;
        Ok(Self {
            config,
            records: ProcessRecords {
                dir: instances_dir,
                kind: "qemu",
                exited: "the VM's qemu process exited",
            },
            image,
            accelerator: tokio::sync::OnceCell::new(),
            launching: tokio::sync::Mutex::new(()),
        })
    }

    fn console_path(&self, member_id: &str) -> PathBuf {
        let live = self.records.dir.join(member_id).join("console.log");
        if live.exists() {
            live
        } else {
            self.records.dir.join("consoles").join(format!("{member_id}.log"))
        }
    }

    /// KVM or TCG, decided at the first launch and said once.
    async fn accelerator(&self) -> Accelerator {
        *self
            .accelerator
            .get_or_init(|| async {
                let chosen = match self.config.accelerator {
                    Accelerator::Auto => match probe_kvm(&self.config.qemu, &self.records.dir).await {
                        Ok(()) => Accelerator::Kvm,
                        Err(why) => {
                            tracing::warn!(
                                "KVM is not usable here ({why}); VMs run under TCG, emulated and several times slower."
                            );
                            Accelerator::Tcg
                        }
                    },
                    chosen => chosen,
                };
                if chosen == Accelerator::Kvm {
                    tracing::info!("VMs run under KVM.");
                }
                chosen
            })
            .await
    }

    /// The first `<prefix>.N` that no running VM uses and where `port` is free.
    fn free_address(&self, port: u16) -> Result<IpAddr, CloudError> {
        let taken: Vec<IpAddr> = self
            .records
            .all()
            .into_iter()
            .filter(ProcessRecord::running)
            .map(|r| r.address)
            .collect();
        free_loopback_address(&self.config.address_prefix, port, &taken)
    }

    /// qemu's arguments for one VM in `dir`.
    fn arguments(
        &self,
        accelerator: Accelerator,
        dir: &Path,
        address: IpAddr,
        port: u16,
        member_id: &str,
    ) -> Vec<OsString> {
        let path = |name: &str| dir.join(name).into_os_string();
        let joined = |prefix: &str, name: &str, suffix: &str| {
            let mut arg = OsString::from(prefix);
            arg.push(path(name));
            arg.push(suffix);
            arg
        };
        let mut args: Vec<OsString> = machine_arguments(accelerator, self.config.vcpus);
        args.extend(
            [
                "-name",
                &format!("ebb-{member_id}"),
                "-m",
                &self.config.memory_mib.to_string(),
                "-smp",
                &self.config.vcpus.to_string(),
                "-netdev",
                &format!("user,id=net0,hostfwd=tcp:{address}:{port}-:{port}"),
                "-device",
                "virtio-net-pci,netdev=net0",
                "-device",
                "virtio-rng-pci",
            ]
            .map(OsString::from),
        );
        args.extend([
            "-drive".into(),
            joined("file=", "disk.qcow2", ",if=virtio,format=qcow2,discard=unmap"),
            "-drive".into(),
            joined("file=", "seed.img", ",if=virtio,format=raw,readonly=on"),
            "-serial".into(),
            joined("file:", "console.log", ""),
            "-qmp".into(),
            joined("unix:", "qmp.sock", ",server=on,wait=off"),
        ]);
        if let Some(kernel) = &self.config.kernel {
            args.extend(["-kernel".into(), kernel.clone().into_os_string()]);
            if let Some(initrd) = &self.config.initrd {
                args.extend(["-initrd".into(), initrd.clone().into_os_string()]);
            }
            args.extend(["-append".into(), self.config.kernel_args.clone().into()]);
        }
        args
    }

    /// Creates the overlay and the seed, starts qemu and records it; all of it undone if a step fails.
    async fn start(&self, spec: &LaunchSpec, dir: &Path) -> Result<ProcessRecord, CloudError> {
        let accelerator = self.accelerator().await;
        let address = self.free_address(spec.service_port)?;
        let failed = |what: &str, e: &dyn std::fmt::Display| CloudError::permanent(format!("{what}: {e}"));
        // A directory left by an earlier attempt of this member holds nothing worth keeping.
        let _ = std::fs::remove_dir_all(dir);
        write_private(dir, ".launching", b"").map_err(|e| failed(&format!("cannot create {}", dir.display()), &e))?;
        let socket = dir.join("qmp.sock");
        if socket.as_os_str().len() > 100 {
            return Err(CloudError::permanent(format!(
                "{} is too long for a Unix socket; use a shorter server.state_dir",
                socket.display()
            )));
        }
        let undo = |error: CloudError| {
            let _ = std::fs::remove_dir_all(dir);
            error
        };
        seed::write(&dir.join("seed.img"), &spec.member_id, &spec.user_data)
            .map_err(|e| undo(failed("cannot write the NoCloud seed", &e)))?;
        let overlay = Command::new(&self.config.qemu_img)
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(&self.image)
            .arg(dir.join("disk.qcow2"))
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| undo(failed(&format!("cannot run {}", self.config.qemu_img.display()), &e)))?;
        if !overlay.status.success() {
            return Err(undo(CloudError::permanent(format!(
                "qemu-img could not make the overlay of {}: {}",
                self.image.display(),
                String::from_utf8_lossy(&overlay.stderr).trim()
            ))));
        }
        let log =
            std::fs::File::create(dir.join("qemu.log")).map_err(|e| undo(failed("cannot create qemu.log", &e)))?;
        let child = Command::new(&self.config.qemu)
            .args(self.arguments(accelerator, dir, address, spec.service_port, &spec.member_id))
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| undo(failed("qemu.log", &e)))?)
            .stderr(log)
            .spawn()
            .map_err(|e| undo(failed(&format!("cannot start {}", self.config.qemu.display()), &e)))?;
        let pid = child.id().expect("a process that was just spawned has a pid") as i32;
        let record = ProcessRecord {
            group: spec.group.clone(),
            member_id: spec.member_id.clone(),
            launch_id: spec.launch_id.clone(),
            cluster_id: spec.cluster_id.clone(),
            address,
            pid,
            started: start_time(pid).unwrap_or(0),
        };
        let json = serde_json::to_vec_pretty(&record).expect("a record serializes");
        if let Err(e) = write_private(dir, ProcessRecord::FILE, &json) {
            record.signal(Signal::SIGKILL);
            return Err(undo(failed(&format!("cannot write {}", dir.display()), &e)));
        }
        let _ = std::fs::remove_file(dir.join(".launching"));
        // qemu refuses a bad argument or a busy port at once; a VM that boots badly is the health check's.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !record.running() {
            let said = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
            return Err(undo(CloudError::permanent(format!(
                "qemu exited at once: {}",
                said.trim().lines().last().unwrap_or("(it said nothing)")
            ))));
        }
        tracing::info!(member = %spec.member_id, %address, pid, "Started a VM.");
        Ok(record)
    }

    /// ACPI power-off for all of them at once, SIGKILL for those still running after the grace period;
    /// each one's console kept, the rest of its directory removed.
    async fn stop(&self, records: Vec<ProcessRecord>) {
        for record in records.iter().filter(|r| r.running()) {
            let socket = self.records.dir.join(&record.member_id).join("qmp.sock");
            if let Err(e) = power_off(&socket).await {
                tracing::warn!(member = %record.member_id, error = %e, "Cannot ask the VM to power off; killing it.");
                record.signal(Signal::SIGKILL);
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(self.config.stop_grace_secs.into());
        while records.iter().any(ProcessRecord::running) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for record in records {
            if record.running() {
                tracing::warn!(member = %record.member_id, "The VM did not power off in stop_grace_secs; killing it.");
                record.signal(Signal::SIGKILL);
                exits_within(&record, Duration::from_secs(5)).await;
            }
            self.keep_console(&record.member_id);
            let _ = std::fs::remove_dir_all(self.records.dir.join(&record.member_id));
        }
    }

    /// Moves a member's console to `consoles/`, keeping the newest `KEPT_CONSOLES`.
    fn keep_console(&self, member_id: &str) {
        let kept = self.records.dir.join("consoles");
        if std::fs::create_dir_all(&kept).is_err() {
            return;
        }
        let _ = std::fs::rename(
            self.records.dir.join(member_id).join("console.log"),
            kept.join(format!("{member_id}.log")),
        );
        let Ok(entries) = std::fs::read_dir(&kept) else { return };
        let mut consoles: Vec<(std::time::SystemTime, PathBuf)> = entries
            .flatten()
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .collect();
        consoles.sort();
        let excess = consoles.len().saturating_sub(KEPT_CONSOLES);
        for (_, path) in consoles.into_iter().take(excess) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The machine every VM (and the KVM probe) runs on.
fn machine_arguments(accelerator: Accelerator, vcpus: u32) -> Vec<OsString> {
    let (accel, cpu) = match accelerator {
        Accelerator::Kvm => ("kvm".to_string(), "host"),
        _ if vcpus > 1 => ("tcg,thread=multi".to_string(), "max"),
        _ => ("tcg".to_string(), "max"),
    };
    [
        "-machine",
        "q35",
        "-accel",
        &accel,
        "-cpu",
        cpu,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]
    .map(OsString::from)
    .to_vec()
}

/// Boots a 512-byte guest under KVM that tells qemu to exit through the debug-exit port: KVM works when it
/// does so within seconds. (On some hosts `/dev/kvm` opens, then qemu aborts on the CPU's MSRs or the guest
/// never runs.)
async fn probe_kvm(qemu: &Path, dir: &Path) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    // mov al, 0; out 0xf4, al; hlt; jmp $-1 … and the boot signature.
    let mut sector = vec![0xB0, 0x00, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD];
    sector.resize(510, 0);
    sector.extend([0x55, 0xAA]);
    let image = dir.join(format!(".kvm-probe-{}.img", std::process::id()));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&image, &sector).map_err(|e| format!("{}: {e}", image.display()))?;
    let mut drive = OsString::from("format=raw,if=ide,file=");
    drive.push(&image);
    let probe = Command::new(qemu)
        .args(machine_arguments(Accelerator::Kvm, 1))
        .args([
            "-m",
            "32",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
        ])
        .arg(drive)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    let outcome = tokio::time::timeout(Duration::from_secs(20), probe).await;
    let _ = std::fs::remove_file(&image);
    match outcome {
        Err(_) => Err("a test guest did not run within 20 s".into()),
        Ok(Err(e)) => Err(format!("cannot run {}: {e}", qemu.display())),
        // The guest's exit code 0 reaches the host as (0 << 1) | 1.
        Ok(Ok(output)) if output.status.code() == Some(1) => Ok(()),
        Ok(Ok(output)) => Err(format!(
            "a test guest failed: {}",
            String::from_utf8_lossy(&output.stderr)
                .trim()
                .lines()
                .last()
                .unwrap_or("no message")
        )),
    }
}

/// Asks the VM to power off through its QMP socket (the ACPI power button).
async fn power_off(socket: &Path) -> std::io::Result<()> {
    let talk = async {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        lines.next_line().await?; // the greeting
        for command in ["qmp_capabilities", "system_powerdown"] {
            write
                .write_all(format!("{{\"execute\":\"{command}\"}}\n").as_bytes())
                .await?;
            // Events may come before the answer.
            loop {
                let line = lines.next_line().await?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
                if line.contains("\"return\"") {
                    break;
                }
                if line.contains("\"error\"") {
                    return Err(std::io::Error::other(line));
                }
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(5), talk)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn exits_within(record: &ProcessRecord, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while record.running() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
}

/// How much of a console's end is read for its last lines: a guest may print without end, and the file
/// is the guest's to fill.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;

/// The last lines of the console at `path`, from its last [`CONSOLE_TAIL_BYTES`] only.
fn console_last_lines(path: &Path) -> std::io::Result<Vec<String>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let start = file.metadata()?.len().saturating_sub(CONSOLE_TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::new();
    file.take(CONSOLE_TAIL_BYTES).read_to_end(&mut tail)?;
    Ok(last_lines(&tail, start > 0, CONSOLE_LINES))
}

/// How many of a console's lines an activity quotes.
pub const CONSOLE_LINES: usize = 8;

/// The last `count` non-empty lines of console bytes, without terminal control characters; when `cut`
/// (the bytes start inside the file), the first line, likely partial, is dropped.
pub fn last_lines(bytes: &[u8], cut: bool, count: usize) -> Vec<String> {
    let bytes = match (cut, bytes.iter().position(|b| *b == b'\n')) {
        (true, Some(newline)) => &bytes[newline + 1..],
        (true, None) => &[][..],
        (false, _) => bytes,
    };
    let lines: Vec<String> = String::from_utf8_lossy(bytes)
        .lines()
        .map(|line| line.chars().filter(|c| !c.is_control()).collect::<String>())
        .map(|line| line.trim().to_string())
        .filter(|line| !line.is_empty())
        .collect();
    lines[lines.len().saturating_sub(count)..].to_vec()
}

#[async_trait]
impl Provider for QemuProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        let _launching = self.launching.lock().await;
        let dir = self.records.dir.join(&spec.member_id);
        // A launch retried after it already happened finds its VM instead of starting a second one.
        if let Some(record) = ProcessRecord::read(&dir).filter(|r| r.launch_id == spec.launch_id && r.running()) {
            return Ok(self.records.instance(&record));
        }
        Ok(self.records.instance(&self.start(spec, &dir).await?))
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        Ok(ids
            .iter()
            .map(|id| match self.records.find(id) {
                Some(record) => self.records.state(&record),
                None => InstanceState::Terminated {
                    reason: "no such VM".into(),
                },
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        if let Some(record) = self.records.find(id) {
            self.stop(vec![record]).await;
        }
        Ok(())
    }

    async fn list(&self, group: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self
            .records
            .all()
            .iter()
            .filter(|r| r.group == group)
            .map(|record| self.records.instance(record))
            .collect())
    }

    async fn console_tail(&self, id: &str) -> Option<String> {
        let path = self.console_path(self.records.member_of(id)?);
        let lines = console_last_lines(&path).ok()?;
        Some(if lines.is_empty() {
            format!("its console ({}) is empty: the VM printed nothing", path.display())
        } else {
            format!("its console's last lines ({}): {}", path.display(), lines.join(" | "))
        })
    }

    async fn close(&self) {
        self.stop(self.records.all()).await;
    }
}

impl Drop for QemuProvider {
    /// A provider dropped without `close` (a panic, an early return) still leaves no VM behind; only a
    /// collector that dies without unwinding leaves its VMs for the next one to adopt.
    fn drop(&mut self) {
        for record in self.records.all() {
            record.signal(Signal::SIGKILL);
            let _ = std::fs::remove_dir_all(self.records.dir.join(&record.member_id));
        }
    }
}

#[cfg(test)]
mod tests;
