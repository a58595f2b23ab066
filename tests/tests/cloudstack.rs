//! Issue 7: ebb's CloudStack client, provider and load-balancer rule against the fake CloudStack API
//! (signatures checked the server's way, answers shaped like libcloud's recordings of real CloudStack).

use std::sync::Arc;
use std::time::Duration;

use ebb_collector::lb::cloudstack::CloudStackLoadBalancer;
use ebb_collector::lb::{LoadBalancer, Registration};
use ebb_collector::providers::cloudstack::api::{Api, Credentials, SignatureVersion};
use ebb_collector::providers::cloudstack::{CloudStackConfig, CloudStackProvider};
use ebb_collector::providers::{InstanceState, LaunchSpec, Provider};
use ebb_tests::cloudstack::{FakeCloudStack, Fault};

const CLUSTER: &str = "0123456789abcdef";

fn api(fake: &FakeCloudStack, secret: &str, signature: SignatureVersion) -> Arc<Api> {
    let credentials = Credentials {
        endpoint: fake.endpoint.clone(),
        api_key: fake.api_key.clone(),
        secret_key: secret.into(),
    };
    Arc::new(
        Api::new(credentials, signature, Duration::from_secs(3))
            .unwrap()
            .with_pace(Duration::from_millis(50), Duration::from_millis(1500)),
    )
}

fn config() -> CloudStackConfig {
    toml::from_str(
        r#"
        zone_id = "f0954b9b-2626-4549-82ad-ca421073b3bc"
        template_id = "3525"
        service_offering_id = "24"
        network_ids = ["n-1", "n-2"]
        keypair = "ops"
        "#,
    )
    .unwrap()
}

fn provider(fake: &FakeCloudStack) -> CloudStackProvider {
    CloudStackProvider::new(config(), api(fake, &fake.secret_key, SignatureVersion::V3), CLUSTER)
}

fn spec(member_id: &str, user_data: &str) -> LaunchSpec {
    LaunchSpec {
        group: "web".into(),
        member_id: member_id.into(),
        cluster_id: CLUSTER.into(),
        launch_id: format!("{member_id}-1"),
        service_port: 80,
        agent_config: String::new(),
        user_data: user_data.into(),
    }
}

fn count(calls: &[String], call: &str) -> usize {
    calls.iter().filter(|c| *c == call).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_is_deployed_tagged_listed_and_destroyed() {
    let fake = FakeCloudStack::start(None);
    let provider = provider(&fake);
    let instance = provider.launch(&spec("web-1", "#cloud-config\n")).await.unwrap();
    assert_eq!(instance.member_id, "web-1");
    assert_eq!(instance.state, InstanceState::Running, "deploy waits for its job");
    assert!(instance.address.is_some());
    assert_eq!(fake.running(), [format!("ebb.{CLUSTER}.web-1")]);
    let calls = fake.calls();
    assert_eq!(count(&calls, "GET deployVirtualMachine"), 1);
    assert!(
        count(&calls, "GET queryAsyncJobResult") >= 2,
        "a job that takes a few polls: {calls:?}"
    );
    assert_eq!(count(&calls, "GET createTags"), 1);

    let listed = provider.list("web").await.unwrap();
    assert_eq!(listed, vec![instance.clone()]);
    assert!(provider.list("api").await.unwrap().is_empty());
    assert_eq!(
        provider.describe(&[instance.id.clone(), "nope".into()]).await.unwrap()[0],
        InstanceState::Running
    );

    // A launch retried after a lost answer finds its VM.
    let again = provider.launch(&spec("web-1", "#cloud-config\n")).await.unwrap();
    assert_eq!(again.id, instance.id);
    assert_eq!(count(&fake.calls(), "GET deployVirtualMachine"), 1);

    provider.terminate(&instance.id).await.unwrap();
    assert!(fake.running().is_empty());
    assert!(provider.list("web").await.unwrap().is_empty());
    provider
        .terminate(&instance.id)
        .await
        .expect("terminating a destroyed VM succeeds");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_user_data_goes_by_post_and_signature_version_1_works_too() {
    let fake = FakeCloudStack::start(None);
    let provider = CloudStackProvider::new(config(), api(&fake, &fake.secret_key, SignatureVersion::V1), CLUSTER);
    let big = format!("#cloud-config\n# {}\n", "x".repeat(3000));
    provider.launch(&spec("web-1", &big)).await.unwrap();
    assert_eq!(count(&fake.calls(), "POST deployVirtualMachine"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_secret_is_refused_and_the_error_says_what_to_check_without_the_secret() {
    let fake = FakeCloudStack::start(None);
    let provider = CloudStackProvider::new(config(), api(&fake, "not-the-secret", SignatureVersion::V3), CLUSTER);
    let error = provider.list("web").await.unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("check api_key and secret_key") && text.contains("401"),
        "{text}"
    );
    assert!(!text.contains("not-the-secret"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_jobs_and_refusals_become_clear_errors() {
    let fake = FakeCloudStack::start(None);
    let provider = provider(&fake);
    fake.fail_next(
        "deployVirtualMachine",
        Fault::JobFails(533, "Unable to create a deployment for VM".into()),
    );
    let error = provider.launch(&spec("web-1", "")).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(
        error.to_string().contains("no capacity left") && error.to_string().contains("Unable to create a deployment"),
        "{error}"
    );
    fake.fail_next(
        "deployVirtualMachine",
        Fault::Error(431, "Unable to find service offering: 24".into()),
    );
    let error = provider.launch(&spec("web-2", "")).await.unwrap_err();
    assert!(!error.is_retryable(), "{error:?}");
    assert!(error.to_string().contains("check the provider settings"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_are_retried_after_a_5xx_or_a_timeout_but_changes_are_not() {
    let fake = FakeCloudStack::start(None);
    let provider = provider(&fake);
    fake.fail_next("listVirtualMachines", Fault::Http(503));
    fake.fail_next("listVirtualMachines", Fault::Silence(Duration::from_secs(3)));
    assert!(provider.list("web").await.unwrap().is_empty(), "retried to success");

    fake.fail_next("deployVirtualMachine", Fault::Http(502));
    let error = provider.launch(&spec("web-1", "")).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(
        count(&fake.calls(), "GET deployVirtualMachine"),
        1,
        "never retried by the client"
    );

    for _ in 0..3 {
        fake.fail_next("listVirtualMachines", Fault::Silence(Duration::from_secs(3)));
    }
    let error = provider.list("web").await.unwrap_err();
    assert!(
        error.is_retryable() && error.to_string().contains("timed out"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_never_ends_is_given_up_after_the_job_timeout() {
    let fake = FakeCloudStack::start(None);
    fake.set_job_ms(60_000);
    let error = provider(&fake).launch(&spec("web-1", "")).await.unwrap_err();
    assert!(error.to_string().contains("still running after 3 s"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_load_balancer_rule_follows_register_and_deregister() {
    let fake = FakeCloudStack::start(None);
    let monitored = fake.add_vm("scale01", Some("rule-1"));
    let provider = provider(&fake);
    let lb = CloudStackLoadBalancer::new(api(&fake, &fake.secret_key, SignatureVersion::V3), "rule-1", CLUSTER);
    let instance = provider.launch(&spec("web-1", "")).await.unwrap();
    let registration = Registration {
        member_id: "web-1",
        instance_id: &instance.id,
        address: "127.0.12.1:80".parse().unwrap(),
    };
    lb.register(&registration).await.unwrap();
    let mut members: Vec<String> = lb.members().await.unwrap().into_iter().map(|b| b.member_id).collect();
    members.sort();
    assert_eq!(
        members,
        ["scale01", "web-1"],
        "ebb's member by its id, the hand-made VM by its name"
    );
    assert_eq!(fake.rule_members("rule-1").len(), 2);
    lb.deregister("web-1", &instance.id).await.unwrap();
    assert_eq!(fake.rule_members("rule-1"), ["scale01"]);
    lb.deregister("scale01-is-not-ours", &format!("{monitored}-gone"))
        .await
        .expect("deregistering what is not there succeeds");
}

/// An ssh_scale.py `.idcfrc` for the fake: seed 000's layout, min 2, max 4, the fake's rule.
fn idcfrc(fake: &FakeCloudStack, dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(".idcfrc");
    let text = format!(
        "[account]\nhost={}\napi_key={}\nsecret_key={}\n\n[monitoring]\nhost=scale01\nuser=root\nprivate_key_path=/root/.ssh/id_rsa\npass_phrase=x\n\n[launch_config]\nserviceofferingid=24\ntemplateid=3525\nzoneid=2\n\n[scaling]\nmin_size=2\nmax_size=4\nload_balancer=rule-1\n\n[scaling_policy_out]\nthreshold=2\n\n[scaling_policy_in]\nthreshold=1\n",
        fake.endpoint, fake.api_key, fake.secret_key
    );
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Issue 7's end-to-end test: the collector, configured by `import idcfrc`, keeps min 2 VMs on the fake
/// CloudStack (each VM a local instance whose agent enrols from its user data), scales to 4 under load and
/// back to 2 after it with the load-balancer rule following, and a crash in the middle of a deploy leaves
/// neither a duplicate nor an orphan once the collector is back.
/// An operator's user data, as the IDCF guide's templates start their web server.
const OPERATOR_SCRIPT: &str = "#!/bin/bash\nyum -y install httpd\nsystemctl enable --now httpd\n";

#[test]
fn a_group_on_cloudstack_scales_out_and_in_and_survives_a_crash_mid_deploy() {
    use ebb_tests::{Running, admin, collector_bin, free_port, load, serial, wait_for};
    use std::process::Command;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let local = ebb_tests::stand_ins("127.0.11", &dir.path().join("vms"));
    let fake = FakeCloudStack::start(Some(local));
    fake.add_vm("scale01", Some("rule-1"));

    let output = Command::new(collector_bin())
        .args(["import", "idcfrc", "--group", "web"])
        .arg(idcfrc(&fake, dir.path()))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let notes = String::from_utf8_lossy(&output.stderr);
    assert!(notes.contains("monitored VM `scale01`"), "{notes}");
    let imported = String::from_utf8(output.stdout).unwrap();
    // This machine's ports and directories, and policies that react within seconds for the test.
    let (grpc, admin_address, http) = (free_port(), format!("127.0.0.1:{}", free_port()), free_port());
    let state = dir.path().join("state");
    let policies = imported.find("# [scaling_policy_out]").unwrap();
    let config = imported[..policies]
        .replace(
            "grpc_listen = \"0.0.0.0:7300\"",
            &format!(
                "grpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"{admin_address}\"\nstate_dir = \"{}\"",
                state.display()
            ),
        )
        .lines()
        .filter(|l| !l.starts_with("advertise_url") && !l.starts_with("# advertise_url"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("127.0.0.1:7301", &format!("127.0.0.1:{http}"))
        .replace(
            "member_port = 80",
            "member_port = 8080\ndrain_secs = 1\nreconcile_interval_secs = 2",
        )
        .replace("cooldown_secs = 60", "cooldown_secs = 3")
        .replace("warmup_secs = 60", "warmup_secs = 3")
        + r#"
[groups.health_check]
path = "/health"

[[groups.policies]]
name = "cpu-high"
metric = "cpu"
statistic = "avg"
period_secs = 5
comparison = "gt"
threshold = 50.0
adjustment = 1

[[groups.policies]]
name = "cpu-low"
metric = "cpu"
statistic = "avg"
period_secs = 5
comparison = "lt"
threshold = 10.0
adjustment = -1
"#;
    // The operator's own start-up script goes beside ebb's enrolment (issue 24).
    let start_script = dir.path().join("start-httpd.sh");
    std::fs::write(&start_script, OPERATOR_SCRIPT).unwrap();
    let config = config.replace(
        "type = \"cloudstack\"\ncredentials_file",
        &format!(
            "type = \"cloudstack\"\nuser_data_file = \"{}\"\ncredentials_file",
            start_script.display()
        ),
    );
    assert!(config.contains("user_data_file"), "{config}");
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let (ok, text) = admin(
        "127.0.0.1:1",
        std::path::Path::new("/nonexistent"),
        &["validate", "--config", config_path.to_str().unwrap()],
    );
    assert!(ok, "{text}\n{config}");

    let serve = || {
        Running::spawn(
            Command::new(collector_bin())
                .args(["serve", "--config"])
                .arg(&config_path)
                .env("EBB_LOG", "warn"),
        )
    };
    let in_service = || {
        admin(&admin_address, &state, &["members", "web"])
            .1
            .lines()
            .filter(|l| l.contains(" in_service "))
            .count()
    };
    let ours = |fake: &FakeCloudStack| fake.running().into_iter().filter(|n| n.starts_with("ebb.")).count();
    let mut collector = serve();
    assert!(
        wait_for(Duration::from_secs(60), || in_service() == 2
            && fake.rule_members("rule-1").len() == 3),
        "min 2 in service and in the rule beside scale01: {}\n{:?}",
        admin(&admin_address, &state, &["members", "web"]).1,
        fake.rule_members("rule-1")
    );

    // Every VM was deployed with both: cloud-init would run the script and write the agent's file.
    let sent: Vec<Vec<u8>> = fake.user_data().into_iter().filter(|u| !u.is_empty()).collect();
    assert_eq!(sent.len(), 2, "two deployed by ebb (scale01, added by hand, has none)");
    for user_data in &sent {
        let read = ebb_tests::cloud_init_reads(user_data);
        assert_eq!(read["scripts"]["operator-user-data"], OPERATOR_SCRIPT, "{read:#}");
        assert_eq!(
            read["cloud_config"]["write_files"][0]["path"], "/etc/ebb/agent.toml",
            "{read:#}"
        );
        assert_eq!(read["schema_error"], serde_json::Value::Null, "{read:#}");
    }
    assert!(
        load(
            || {
                fake.rule_addresses("rule-1")
                    .iter()
                    .filter_map(|a| Some(std::net::SocketAddr::new(a.parse().ok()?, 8080)))
                    .collect()
            },
            Duration::from_secs(120),
            || ours(&fake) == 4 && in_service() == 4
        ),
        "scaled out to 4 under load: {}",
        admin(&admin_address, &state, &["activities", "web"]).1
    );
    assert_eq!(
        fake.rule_members("rule-1").len(),
        5,
        "the rule follows: {:?}",
        fake.rule_members("rule-1")
    );
    assert!(
        wait_for(Duration::from_secs(120), || ours(&fake) == 2
            && fake.rule_members("rule-1").len() == 3),
        "back to 2 after the load: {:?}\n{}",
        fake.running(),
        admin(&admin_address, &state, &["activities", "web"]).1
    );

    // A deploy that takes 3 s, and the collector killed while it runs. Policies are suspended (and stay so
    // across the restart) so that only the operator's desired capacity counts.
    let (ok, text) = admin(&admin_address, &state, &["suspend", "web", "--process", "decide"]);
    assert!(ok, "{text}");
    fake.set_job_ms(3000);
    let deploys = |fake: &FakeCloudStack| {
        fake.calls()
            .iter()
            .filter(|c| c.ends_with(" deployVirtualMachine"))
            .count()
    };
    let before = deploys(&fake);
    let (ok, text) = admin(&admin_address, &state, &["scale", "web", "--to", "3"]);
    assert!(ok, "{text}");
    assert!(wait_for(Duration::from_secs(10), || deploys(&fake) > before));
    nix::sys::signal::kill(collector.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    collector.child.wait().unwrap();
    let _restarted = serve();
    assert!(
        wait_for(Duration::from_secs(60), || in_service() == 3 && ours(&fake) == 3),
        "reconciled to 3: {:?}\n{}",
        fake.running(),
        admin(&admin_address, &state, &["activities", "web"]).1
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ours(&fake), 3, "no duplicate and no orphan: {:?}", fake.running());
    assert_eq!(fake.rule_members("rule-1").len(), 4);
}

/// Issue 24: an unreachable cloud's error names the host and the command, never the signed URL.
#[tokio::test]
async fn an_unreachable_endpoint_is_named_in_the_error() {
    let port = ebb_tests::free_port();
    let credentials = Credentials {
        endpoint: format!("http://127.0.0.1:{port}/client/api"),
        api_key: "key".into(),
        secret_key: "secret".into(),
    };
    let api = Api::new(credentials, SignatureVersion::V3, Duration::from_secs(3)).unwrap();
    let error = api.call("listVirtualMachines", &[]).await.unwrap_err();
    let text = ebb_collector::providers::CloudError::from(error).to_string();
    assert!(
        text.contains("listVirtualMachines") && text.contains(&format!("127.0.0.1:{port}")),
        "{text}"
    );
    assert!(!text.contains("signature"), "{text}");
}
