//! Issue 24: the CLI never leaves an operator guessing: `--state-dir`/`EBB_STATE_DIR` are honoured by
//! `serve` (and by `reload` after it), logs to a file carry no colour codes, every empty listing says so,
//! `validate` warns of an address VMs cannot reach, and `gen-config` has an example per provider.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ebb_collector::testing::GroupToml;
use ebb_tests::{Running, admin, collector_bin, free_port, idle_collector_config, running_in, serial, wait_for};

/// A config whose `server.state_dir` is `state_dir`, with one local group that launches nothing.
fn config(dir: &Path, state_dir: &Path, admin_address: &str) -> std::path::PathBuf {
    let path = dir.join("collector.toml");
    let grpc = format!("127.0.0.1:{}", free_port());
    std::fs::write(&path, idle_collector_config(&grpc, admin_address, state_dir)).unwrap();
    path
}

#[test]
fn serve_keeps_its_state_where_it_is_told_and_logs_plain_text_to_a_file() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let from_config = dir.path().join("from-config");
    for (how, state) in [
        ("flag", dir.path().join("from-flag")),
        ("env", dir.path().join("from-env")),
    ] {
        let admin_address = format!("127.0.0.1:{}", free_port());
        let path = config(dir.path(), &from_config, &admin_address);
        let log = dir.path().join(format!("{how}.log"));
        let mut command = Command::new(collector_bin());
        if how == "flag" {
            command.arg("--state-dir").arg(&state);
        } else {
            command.env("EBB_STATE_DIR", &state);
        }
        command
            .args(["serve", "--config"])
            .arg(&path)
            .env("EBB_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap());
        let mut collector = Running::spawn(&mut command);
        assert!(
            wait_for(Duration::from_secs(30), || admin(&admin_address, &state, &["groups"]).0),
            "{how}: the admin certificate is in {}: {}",
            state.display(),
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(!from_config.exists(), "{how}: server.state_dir is replaced");

        // A reload keeps the state directory it was started with (a changed [server] would be refused).
        let (ok, text) = admin(&admin_address, &state, &["reload"]);
        assert!(ok && text.contains("reloaded: nothing changed"), "{how}: {text}");

        if how == "env" {
            // Every empty listing says so, rather than printing nothing.
            let (ok, text) = admin(&admin_address, &state, &["activities", "web"]);
            assert!(ok && text.contains("no activities for group `web` yet"), "{text}");
            let (ok, text) = admin(
                &admin_address,
                &state,
                &["explain", "web", "--since", "2099-01-01T00:00:00Z"],
            );
            assert!(ok && text.contains("no evaluations of `web` in that time"), "{text}");
            let (ok, text) = admin(&admin_address, &state, &["members", "web"]);
            assert!(ok && text.contains("(no members)"), "{text}");
            let (ok, text) = admin(&admin_address, &state, &["token", "list"]);
            assert!(ok && text.contains("(no tokens"), "{text}");
        }
        collector.terminate(Duration::from_secs(10));
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains(" INFO "), "{logged}");
        assert!(!logged.contains('\x1b'), "no colour codes in a file: {logged:?}");
    }
}

#[test]
fn validate_warns_when_vms_could_not_reach_the_collector() {
    let dir = tempfile::tempdir().unwrap();
    let clouds = dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        "clouds:\n  overcloud:\n    auth:\n      auth_url: https://identity.example.invalid/v3\n      \
         username: ops\n      password: secret\n      project_name: web\n",
    )
    .unwrap();
    let path = dir.path().join("collector.toml");
    let write = |server: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\n{server}\n{}",
                GroupToml::local("web")
                    .set("min_size", 1)
                    .set("max_size", 2)
                    .provider_type("openstack")
                    .provider("cloud", "overcloud")
                    .provider("image", "web")
                    .provider("flavor", "m1.small")
                    .load_balancer_type("octavia")
                    .load_balancer("pool_id", "pool-1")
                    .to_toml()
            ),
        )
        .unwrap();
        let output = Command::new(collector_bin())
            .args(["validate", "--config"])
            .arg(&path)
            .env("OS_CLIENT_CONFIG_FILE", &clouds)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let text = write("grpc_listen = \"0.0.0.0:7300\"");
    assert!(
        text.contains("warning: server.advertise_url: not set, so new VMs are told to connect to https://0.0.0.0:7300"),
        "{text}"
    );
    let text = write("grpc_listen = \"0.0.0.0:7300\"\nadvertise_url = \"https://10.0.0.5:7300\"");
    assert!(!text.contains("advertise_url"), "{text}");

    // What serve would refuse, validate refuses too, saying what to do: a local group whose agent binary
    // is missing (a packaged collector without the ebb-agent package), an operator CA that cannot be read.
    let refused = |config: &str| {
        std::fs::write(&path, config).unwrap();
        let output = Command::new(collector_bin())
            .args(["validate", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{config}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let local = ebb_collector::config::LOCAL_EXAMPLE.replacen(
        "type = \"local\"\n",
        "type = \"local\"\nagent_path = \"/nonexistent/ebb-agent\"\n",
        1,
    );
    assert!(local.contains("/nonexistent/ebb-agent"));
    let text = refused(&local);
    assert!(
        text.contains("needs ebb-agent") && text.contains("install the ebb-agent package"),
        "{text}"
    );
    let text = refused("[server]\nca_cert = \"/nonexistent/ca.pem\"\nca_key = \"/nonexistent/ca.key\"\n");
    assert!(
        text.contains("server.ca_cert, server.ca_key:") && text.contains("/nonexistent/ca.pem"),
        "{text}"
    );
}

#[test]
fn gen_config_prints_a_valid_example_for_each_provider() {
    for provider in ["local", "cloudstack", "aws", "openstack", "qemu"] {
        let output = Command::new(collector_bin())
            .args(["gen-config", "--provider", provider])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{provider}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        assert!(text.contains(&format!("type = \"{provider}\"")), "{provider}: {text}");
        ebb_collector::config::parse(Path::new(provider), &text).unwrap_or_else(|e| panic!("{provider}: {e}"));
    }
    let output = Command::new(collector_bin())
        .args(["gen-config", "--provider", "vmware"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("possible values: local, cloudstack, aws, openstack, qemu")
    );
}

/// Issue 25: the packaged configuration starts a collector without groups; a group added to the file is
/// started by `reload`, all or nothing, and a group taken out of the file is refused.
#[test]
fn a_group_added_to_the_packaged_config_starts_at_reload() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cloud = dir.path().join("cloud");
    let admin_address = format!("127.0.0.1:{}", free_port());
    let packaged = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/collector.toml"))
        .unwrap()
        .replace("127.0.0.1:7300", &format!("127.0.0.1:{}", free_port()))
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{}", free_port()))
        .replace("/var/lib/ebb", &state.display().to_string())
        .replace("[server]\n", &format!("[server]\nadmin_listen = \"{admin_address}\"\n"));
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, &packaged).unwrap();
    let mut collector = Running::collector(
        Command::new(collector_bin()).args(["serve", "--config"]).arg(&path),
        &state,
    );
    assert!(wait_for(Duration::from_secs(30), || admin(
        &admin_address,
        &state,
        &["groups"]
    )
    .0));
    let (_, text) = admin(&admin_address, &state, &["groups"]);
    assert!(text.contains("no groups: add a [[groups]] table"), "{text}");

    let with_group = |listen: &str| {
        let group = GroupToml::fake("api", &cloud)
            .set("min_size", 1)
            .set("max_size", 2)
            .load_balancer("listen", listen);
        format!("{packaged}\n{}", group.to_toml())
    };
    // A group that cannot start (its load balancer's port is taken) is refused, and nothing starts.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std::fs::write(&path, with_group(&taken.local_addr().unwrap().to_string())).unwrap();
    let (ok, text) = admin(&admin_address, &state, &["reload"]);
    assert!(
        !ok && text.contains("cannot listen on load_balancer.listen") && text.contains("running configuration is kept"),
        "{text}"
    );
    let (_, text) = admin(&admin_address, &state, &["groups"]);
    assert!(text.contains("no groups"), "{text}");

    std::fs::write(&path, with_group("127.0.0.1:0")).unwrap();
    let (ok, text) = admin(&admin_address, &state, &["reload"]);
    assert!(ok && text.contains("api: added"), "{text}");
    assert!(
        wait_for(Duration::from_secs(30), || running_in(&cloud).len() == 1),
        "the added group launches its minimum: {:?}",
        running_in(&cloud)
    );
    let (_, text) = admin(&admin_address, &state, &["groups"]);
    assert!(text.lines().any(|l| l.starts_with("api ")), "{text}");
    let (ok, text) = admin(&admin_address, &state, &["reload"]);
    assert!(ok && text.contains("nothing changed"), "{text}");

    std::fs::write(&path, &packaged).unwrap();
    let (ok, text) = admin(&admin_address, &state, &["reload"]);
    assert!(!ok && text.contains("api are no longer in the file"), "{text}");
    let (_, text) = admin(&admin_address, &state, &["groups"]);
    assert!(text.lines().any(|l| l.starts_with("api ")), "{text}");
    collector.terminate(Duration::from_secs(10));
}
