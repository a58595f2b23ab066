//! The provider's bookkeeping with stand-ins for qemu and qemu-img; real VMs boot in
//! `tests/tests/vm.rs`.

use std::os::unix::fs::PermissionsExt;

use super::*;

/// A directory with the stand-ins, the template and the VMs' directory, removed when dropped.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    /// `qemu` runs `qemu_script` (its arguments are saved in `args` in the VM's directory first).
    fn new(qemu_script: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let script = |name: &str, body: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        // The VM's directory is the one its console is in (`-serial file:DIR/console.log`).
        script(
            "qemu",
            &format!(
                "for a; do case \"$a\" in file:*) dir=$(dirname \"${{a#file:}}\");; esac; done\n\
                 printf '%s\\n' \"$@\" > \"$dir/args\"\n{qemu_script}"
            ),
        );
        script("qemu-img", "for a; do last=$a; done; echo overlay > \"$last\"");
        script(
            "qemu-img-refuses",
            "echo 'Could not open backing file: Permission denied' >&2; exit 1",
        );
        std::fs::write(dir.path().join("template.qcow2"), b"template").unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self) -> QemuConfig {
        QemuConfig {
            image: self.path("template.qcow2"),
            kernel: Some(self.path("template.qcow2")),
            initrd: None,
            kernel_args: default_kernel_args(),
            vcpus: 2,
            memory_mib: 512,
            address_prefix: "127.0.10".into(),
            accelerator: Accelerator::Tcg,
            stop_grace_secs: 1,
            qemu: self.path("qemu"),
            qemu_img: self.path("qemu-img"),
            collector_url: None,
            user_data_file: None,
            user_data: None,
            user_data_format: Default::default(),
        }
    }

    fn provider(&self) -> QemuProvider {
        QemuProvider::new(self.config(), self.path("vms")).unwrap()
    }
}

fn spec(member_id: &str) -> LaunchSpec {
    LaunchSpec {
        cluster_id: "test".into(),
        group: "web".into(),
        member_id: member_id.into(),
        launch_id: format!("{member_id}-1"),
        service_port: 8080,
        agent_config: String::new(),
        user_data: b"#cloud-config\nruncmd: [[true]]\n".to_vec(),
    }
}

/// Whether process `pid` is gone within 5 s: a SIGKILL takes effect a moment after it is sent.
async fn dies_soon(pid: i32) -> bool {
    for _ in 0..100 {
        if start_time(pid).is_none() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}

fn pid_of(provider: &QemuProvider, instance: &Instance) -> i32 {
    provider.records.find(&instance.id).expect("a recorded VM").pid
}

#[tokio::test]
async fn a_vm_boots_an_overlay_with_its_seed_and_a_port_forward_on_its_own_address() {
    let bench = Bench::new("exec sleep 30");
    let provider = bench.provider();
    let first = provider.launch(&spec("web-1")).await.unwrap();
    let second = provider.launch(&spec("web-2")).await.unwrap();
    assert_eq!(first.id, "qemu-web-1");
    assert_eq!(first.address, Some("127.0.10.1".parse().unwrap()));
    assert_eq!(second.address, Some("127.0.10.2".parse().unwrap()));
    assert_eq!(first.state, InstanceState::Running);

    let vm = bench.path("vms/web-1");
    let args = std::fs::read_to_string(vm.join("args")).unwrap();
    let args: Vec<&str> = args.lines().collect();
    let after = |flag: &str| -> Vec<&str> { args.windows(2).filter(|w| w[0] == flag).map(|w| w[1]).collect() };
    assert_eq!(after("-netdev"), ["user,id=net0,hostfwd=tcp:127.0.10.1:8080-:8080"]);
    assert_eq!(
        after("-drive"),
        [
            format!(
                "file={},if=virtio,format=qcow2,discard=unmap",
                vm.join("disk.qcow2").display()
            ),
            format!(
                "file={},if=virtio,format=raw,readonly=on",
                vm.join("seed.img").display()
            ),
        ]
    );
    assert_eq!(
        after("-accel"),
        ["tcg,thread=multi"],
        "two vCPUs under TCG use two host threads"
    );
    assert_eq!(after("-smp"), ["2"]);
    assert_eq!(after("-m"), ["512"]);
    assert_eq!(after("-append"), ["root=/dev/vda rw console=ttyS0"]);
    assert_eq!(std::fs::read_to_string(vm.join("disk.qcow2")).unwrap(), "overlay\n");
    let seed = std::fs::metadata(vm.join("seed.img")).unwrap();
    assert_eq!(seed.permissions().mode() & 0o777, 0o600, "the seed holds a join token");
    assert_eq!(
        std::fs::metadata(&vm).unwrap().permissions().mode() & 0o777,
        0o700,
        "the VM's directory is owner-only"
    );

    let pid = pid_of(&provider, &first);
    provider.terminate(&first.id).await.unwrap();
    assert!(start_time(pid).is_none(), "killed after the grace period (no QMP here)");
    assert!(!vm.exists(), "overlay, seed and record go with the member");
    assert!(bench.path("vms/consoles").is_dir());
    assert_eq!(
        provider.describe(std::slice::from_ref(&first.id)).await.unwrap(),
        vec![InstanceState::Terminated {
            reason: "no such VM".into()
        }]
    );
    let second_pid = pid_of(&provider, &second);
    provider.close().await;
    assert!(start_time(second_pid).is_none(), "close stops every VM");
}

#[tokio::test]
async fn vms_outlive_a_crashed_collector_and_the_next_one_adopts_them() {
    let bench = Bench::new("exec sleep 30");
    let crashed = bench.provider();
    let launched = crashed.launch(&spec("web-1")).await.unwrap();
    let pid = pid_of(&crashed, &launched);
    // A crash runs no destructor.
    std::mem::forget(crashed);

    let restarted = bench.provider();
    assert_eq!(
        restarted.list("web").await.unwrap(),
        vec![launched.clone()],
        "found again by listing"
    );
    assert!(restarted.list("other").await.unwrap().is_empty());
    assert_eq!(
        restarted.launch(&spec("web-1")).await.unwrap(),
        launched,
        "a retried launch finds its VM instead of booting another"
    );
    assert_eq!(pid_of(&restarted, &launched), pid);
    let other = restarted.launch(&spec("web-2")).await.unwrap();
    assert_ne!(other.address, launched.address, "a recorded address stays taken");
    drop(restarted);
    assert!(dies_soon(pid).await, "a dropped provider leaves no VM behind");
}

#[tokio::test]
async fn a_vm_whose_qemu_dies_is_terminated_with_the_reason() {
    let bench = Bench::new("sleep 1; exit 0");
    let provider = bench.provider();
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let states = provider.describe(std::slice::from_ref(&instance.id)).await.unwrap();
    assert!(
        matches!(&states[0], InstanceState::Terminated { reason } if reason.contains("qemu process exited")),
        "{states:?}"
    );
}

#[tokio::test]
async fn qemu_refusing_to_start_fails_the_launch_with_what_it_said_and_leaves_nothing() {
    let bench =
        Bench::new("echo 'qemu-system-x86_64: -netdev user: Could not set up host forwarding rule' >&2; exit 1");
    let provider = bench.provider();
    let error = provider.launch(&spec("web-1")).await.unwrap_err().to_string();
    assert!(error.contains("Could not set up host forwarding rule"), "{error}");
    assert!(!bench.path("vms/web-1").exists());

    let provider = QemuProvider::new(
        QemuConfig {
            qemu_img: bench.path("qemu-img-refuses"),
            ..bench.config()
        },
        bench.path("vms"),
    )
    .unwrap();
    let error = provider.launch(&spec("web-2")).await.unwrap_err().to_string();
    assert!(error.contains("Could not open backing file"), "{error}");
    assert!(!bench.path("vms/web-2").exists());
}

#[tokio::test]
async fn a_console_a_guest_filled_is_read_from_its_end_only() {
    let bench = Bench::new("exec sleep 30");
    let provider = bench.provider();
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    // 64 MiB of one endless line, then the boot's last words: only the end is read, the partial line dropped.
    let path = bench.path("vms/web-1/console.log");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(64 << 20).unwrap();
    drop(file);
    let mut console = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
    std::io::Write::write_all(&mut console, b"x".repeat(40_000).as_slice()).unwrap();
    std::io::Write::write_all(&mut console, b"\nlogin: \n").unwrap();
    drop(console);
    let tail = provider.console_tail(&instance.id).await.unwrap();
    assert!(tail.ends_with("): login:"), "only the last whole line: {tail}");
    provider.terminate(&instance.id).await.unwrap();
}

#[tokio::test]
async fn the_console_tail_names_the_file_and_its_last_lines() {
    let bench = Bench::new("exec sleep 30");
    let provider = bench.provider();
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    let mut console = String::from("SeaBIOS\r\n\x1b[0mBooting from ROM..\r\n");
    for n in 0..20 {
        console.push_str(&format!("[ {n}.000] line {n}\r\n"));
    }
    console.push_str("[   4.1] Kernel panic - not syncing: VFS: Unable to mount root fs\r\n\r\n");
    std::fs::write(bench.path("vms/web-1/console.log"), console).unwrap();
    let tail = provider.console_tail(&instance.id).await.unwrap();
    assert!(
        tail.contains(&bench.path("vms/web-1/console.log").display().to_string()),
        "{tail}"
    );
    assert!(
        tail.ends_with("| [   4.1] Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "{tail}"
    );
    assert!(
        !tail.contains("line 12") && tail.contains("line 13"),
        "the last 8 lines: {tail}"
    );
    assert!(!tail.contains('\x1b') && !tail.contains('\r'));

    provider.terminate(&instance.id).await.unwrap();
    let kept = provider.console_tail(&instance.id).await.unwrap();
    assert!(
        kept.contains("consoles/web-1.log") && kept.contains("Kernel panic"),
        "kept after: {kept}"
    );
    assert_eq!(provider.console_tail("local-web-1").await, None);
}

#[test]
fn settings_that_cannot_work_are_refused_with_the_key() {
    let bench = Bench::new("exit 0");
    let loopback: SocketAddr = "127.0.0.1:7300".parse().unwrap();
    assert!(bench.config().problems(loopback).is_empty());
    assert!(bench.config().problems("0.0.0.0:7300".parse().unwrap()).is_empty());
    let problems = QemuConfig {
        vcpus: 0,
        memory_mib: 64,
        address_prefix: "10.0.0".into(),
        kernel: None,
        initrd: Some("initrd.img".into()),
        ..bench.config()
    }
    .problems("10.0.0.5:7300".parse().unwrap());
    let keys: Vec<&str> = problems.iter().map(|p| p.split(':').next().unwrap()).collect();
    assert_eq!(
        keys,
        [
            "provider.vcpus",
            "provider.memory_mib",
            "provider.address_prefix",
            "provider.initrd",
            "provider.collector_url"
        ],
        "{problems:?}"
    );
    let http = QemuConfig {
        collector_url: Some("http://10.0.2.2:7300".into()),
        ..bench.config()
    };
    assert!(http.problems(loopback)[0].contains("https://"));
    assert_eq!(
        bench.config().guest_collector_url("127.0.0.1:7311".parse().unwrap()),
        "https://10.0.2.2:7311"
    );
}

#[test]
fn preflight_says_what_to_install_or_build() {
    let bench = Bench::new("exit 0");
    let missing_qemu = preflight(&QemuConfig {
        qemu: "/nonexistent/qemu-system-x86_64".into(),
        ..bench.config()
    })
    .unwrap_err()
    .to_string();
    assert!(
        missing_qemu.contains("apt-get install qemu-system-x86"),
        "{missing_qemu}"
    );
    let missing_image = preflight(&QemuConfig {
        image: bench.path("nonexistent.qcow2"),
        ..bench.config()
    })
    .unwrap_err()
    .to_string();
    assert!(missing_image.contains("cargo xtask image"), "{missing_image}");
    assert!(
        QemuProvider::new(
            QemuConfig {
                image: bench.path("nonexistent.qcow2"),
                ..bench.config()
            },
            bench.path("vms")
        )
        .is_err()
    );
}

#[test]
fn kvm_and_tcg_get_the_cpu_each_can_give() {
    let kvm = machine_arguments(Accelerator::Kvm, 1);
    assert!(kvm.windows(2).any(|w| w[0] == "-cpu" && w[1] == "host"));
    let tcg = machine_arguments(Accelerator::Tcg, 1);
    assert!(tcg.windows(2).any(|w| w[0] == "-accel" && w[1] == "tcg"));
    assert!(tcg.windows(2).any(|w| w[0] == "-cpu" && w[1] == "max"));
}
