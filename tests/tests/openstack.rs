//! Issue 9: the OpenStack provider and Octavia pool authenticated by a real Keystone, against fake Nova,
//! Octavia, Glance and Neutron in its catalog.

use std::sync::Arc;
use std::time::Duration;

use ebb_collector::lb::octavia::OctaviaPool;
use ebb_collector::lb::{LoadBalancer, Registration};
use ebb_collector::providers::openstack::keystone::{Cloud, Credentials, Keystone};
use ebb_collector::providers::openstack::{OpenStackConfig, OpenStackProvider};
use ebb_collector::providers::{InstanceState, LaunchSpec, Provider};
use ebb_tests::openstack::{ADMIN_PASSWORD, FakeServices, Keystone as KeystoneServer};

const CLUSTER: &str = "0123456789abcdef";

/// A Keystone whose catalog names the fake services; the pieces stay alive together.
struct OpenStack {
    keystone: KeystoneServer,
    services: FakeServices,
    _dir: tempfile::TempDir,
}

async fn openstack(local: Option<ebb_collector::providers::local::LocalProvider>) -> OpenStack {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let keystone = tokio::task::spawn_blocking(move || KeystoneServer::start(&path))
        .await
        .unwrap();
    let services = FakeServices::start(local);
    let http = reqwest::Client::new();
    for (kind, path) in [
        ("compute", "/compute/v2.1"),
        ("load-balancer", "/load-balancer"),
        ("image", "/image"),
        ("network", "/network"),
    ] {
        keystone.register(&http, kind, &format!("{}{path}", services.url)).await;
    }
    OpenStack {
        keystone,
        services,
        _dir: dir,
    }
}

fn password_cloud(keystone: &KeystoneServer) -> Cloud {
    Cloud {
        credentials: Credentials {
            auth_url: keystone.url.clone(),
            username: Some("admin".into()),
            password: Some(ADMIN_PASSWORD.into()),
            user_domain_name: Some("Default".into()),
            project_name: Some("admin".into()),
            project_domain_name: Some("Default".into()),
            ..Credentials::default()
        },
        region: Some("RegionOne".into()),
        interface: "public".into(),
    }
}

fn config() -> OpenStackConfig {
    toml::from_str(
        r#"
        image = "web-image"
        flavor = "m1.small"
        networks = ["private"]
        key_name = "ops"
        security_groups = ["web"]
        "#,
    )
    .unwrap()
}

fn spec(member_id: &str) -> LaunchSpec {
    LaunchSpec {
        group: "web".into(),
        member_id: member_id.into(),
        cluster_id: CLUSTER.into(),
        launch_id: format!("{member_id}-1"),
        service_port: 81,
        agent_config: String::new(),
        user_data: "#cloud-config\n".into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn servers_are_built_listed_and_deleted_with_a_keystone_token_renewed_when_it_expires() {
    let os = openstack(None).await;
    let keystone = Arc::new(Keystone::new(password_cloud(&os.keystone)).unwrap());
    let provider = OpenStackProvider::new(config(), keystone, CLUSTER).with_poll(Duration::from_millis(100));
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    assert_eq!(instance.state, InstanceState::Running, "BUILD waited out");
    assert_eq!(instance.member_id, "web-1");
    let calls = os.services.calls();
    let polls = calls
        .iter()
        .filter(|c| c.starts_with("GET /compute/v2.1/servers/5e7e"))
        .count();
    assert!(polls >= 2, "{calls:?}");
    assert!(calls.contains(&"GET /image/v2/images".to_string()), "the image by name");
    assert!(
        calls.contains(&"GET /network/v2.0/networks".to_string()),
        "the network by name"
    );
    assert_eq!(provider.list("web").await.unwrap(), vec![instance.clone()]);
    assert!(provider.list("api").await.unwrap().is_empty());

    // The token expires mid-run: the next call is refused once, a new token is fetched, the call succeeds.
    assert_eq!(os.services.tokens_seen(), 1, "one token reused");
    os.services.expire_tokens();
    assert_eq!(
        provider.describe(std::slice::from_ref(&instance.id)).await.unwrap(),
        [InstanceState::Running]
    );
    assert_eq!(os.services.tokens_seen(), 2);

    provider.terminate(&instance.id).await.unwrap();
    assert!(os.services.servers().is_empty());
    provider.terminate(&instance.id).await.expect("deleting twice succeeds");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_that_goes_to_error_is_reported_with_novas_fault_and_deleted() {
    let os = openstack(None).await;
    let keystone = Arc::new(Keystone::new(password_cloud(&os.keystone)).unwrap());
    let provider = OpenStackProvider::new(config(), keystone, CLUSTER).with_poll(Duration::from_millis(100));
    os.services
        .fail_next_build("No valid host was found. There are not enough hosts available.");
    let error = provider.launch(&spec("web-1")).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert!(
        error.to_string().contains("went to ERROR: No valid host was found") && error.to_string().contains("(deleted)"),
        "{error}"
    );
    assert!(os.services.servers().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_application_credential_and_a_wrong_password() {
    let os = openstack(None).await;
    let (id, secret) = os.keystone.application_credential(&reqwest::Client::new()).await;
    let cloud = Cloud {
        credentials: Credentials {
            auth_url: os.keystone.url.clone(),
            application_credential_id: Some(id),
            application_credential_secret: Some(secret),
            ..Credentials::default()
        },
        region: None,
        interface: "public".into(),
    };
    let provider = OpenStackProvider::new(config(), Arc::new(Keystone::new(cloud).unwrap()), CLUSTER);
    assert!(provider.list("web").await.unwrap().is_empty());

    let mut wrong = password_cloud(&os.keystone);
    wrong.credentials.password = Some("not-the-password".into());
    let provider = OpenStackProvider::new(config(), Arc::new(Keystone::new(wrong).unwrap()), CLUSTER);
    let error = provider.list("web").await.unwrap_err();
    assert!(
        !error.is_retryable() && error.to_string().contains("Keystone refused the credentials"),
        "{error}"
    );
    assert!(!error.to_string().contains("not-the-password"));
}

#[tokio::test(flavor = "multi_thread")]
async fn pool_members_wait_out_a_busy_load_balancer_and_pending_create() {
    let os = openstack(None).await;
    let keystone = Arc::new(Keystone::new(password_cloud(&os.keystone)).unwrap());
    let pool = OctaviaPool::new(keystone, "pool-1", Some("subnet-1".into()), Some(1))
        .with_first_wait(Duration::from_millis(50));
    os.services.busy(2);
    let registration = Registration {
        member_id: "web-1",
        instance_id: "5e7e0000-0000-4000-8000-000000000001",
        address: "127.0.12.9:81".parse().unwrap(),
    };
    pool.register(&registration).await.unwrap();
    let calls = os.services.calls();
    let posts = calls.iter().filter(|c| c.starts_with("POST /load-balancer")).count();
    assert_eq!(posts, 1, "the 409s came before: {calls:?}");
    let member_reads = calls
        .iter()
        .filter(|c| c.starts_with("GET /load-balancer/v2/lbaas/pools/pool-1/members/"))
        .count();
    assert!(member_reads >= 2, "PENDING_CREATE waited out: {calls:?}");
    pool.register(&registration)
        .await
        .expect("registering twice changes nothing");
    assert_eq!(os.services.members(), ["web-1"]);
    let members = pool.members().await.unwrap();
    assert_eq!(members[0].member_id, "web-1");
    assert_eq!(members[0].address, registration.address);
    os.services.busy(1);
    pool.deregister("web-1", "").await.unwrap();
    assert!(os.services.members().is_empty());
    pool.deregister("web-1", "")
        .await
        .expect("deregistering what is gone succeeds");
}

/// Issue 9's end-to-end test: the collector, with its credentials in a clouds.yaml entry, keeps seed 002's
/// group (min 1, max 3, CPU > 50 → +1, < 10 → −1) on Nova behind Keystone, each server a local instance
/// whose agent enrols from the user data; under load it scales out with the Octavia pool following, and back
/// in after it.
/// Seed 002's `user_data`: the Heat template's web server start-up.
const SEED_002_USER_DATA: &str = "#!/bin/bash -v\n\nyum -y install httpd php\nsystemctl enable httpd\nsystemctl start httpd\ncat <<EOF > /var/www/html/hostname.php\n<?php echo \"Hello, My name is \" . php_uname('n'); ?>\nEOF\n";

#[test]
fn a_group_on_openstack_scales_out_and_in_with_the_pool_following() {
    use ebb_tests::{Running, admin, collector_bin, free_port, load, serial, wait_for};
    use std::process::Command;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let local = ebb_tests::stand_ins("127.0.14", &dir.path().join("servers"));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let os = runtime.block_on(openstack(Some(local)));
    let clouds = dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  overcloud:\n    auth:\n      auth_url: {}\n      username: admin\n      password: {ADMIN_PASSWORD}\n      project_name: admin\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: RegionOne\n",
            os.keystone.url
        ),
    )
    .unwrap();
    let (admin_address, state) = (format!("127.0.0.1:{}", free_port()), dir.path().join("state"));
    let config = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:{grpc}"
        admin_listen = "{admin_address}"
        http_listen = "127.0.0.1:{http}"
        state_dir = "{state}"

        [[groups]]
        name = "web"
        min_size = 1
        max_size = 3
        cooldown_secs = 3
        warmup_secs = 3
        drain_secs = 1
        member_port = 8080
        reconcile_interval_secs = 2

        [groups.health_check]
        path = "/health"

        [groups.provider]
        type = "openstack"
        cloud = "overcloud"
        image = "web-image"
        flavor = "m1.small"
        networks = ["private"]
        user_data = '''{seed_user_data}'''

        [groups.load_balancer]
        type = "octavia"
        pool_id = "pool-1"

        [[groups.policies]]
        name = "cpu_alarm_high"
        metric = "cpu"
        statistic = "avg"
        period_secs = 5
        comparison = "gt"
        threshold = 50.0
        adjustment = 1

        [[groups.policies]]
        name = "cpu_alarm_low"
        metric = "cpu"
        statistic = "avg"
        period_secs = 5
        comparison = "lt"
        threshold = 10.0
        adjustment = -1
        "#,
        grpc = free_port(),
        http = free_port(),
        state = state.display(),
        seed_user_data = SEED_002_USER_DATA,
    );
    let config_path = dir.path().join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let _collector = Running::spawn(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn")
            .env("OS_CLIENT_CONFIG_FILE", &clouds),
    );
    let in_service = || {
        admin(&admin_address, &state, &["members", "web"])
            .1
            .lines()
            .filter(|l| l.contains(" in_service "))
            .count()
    };
    let pool = || os.services.members().len();
    assert!(
        wait_for(Duration::from_secs(60), || in_service() == 1 && pool() == 1),
        "min 1 in service and in the pool: {}",
        admin(&admin_address, &state, &["members", "web"]).1
    );
    // The server was created with seed 002's script beside ebb's enrolment (issue 24).
    let sent = os.services.user_data();
    let read = ebb_tests::cloud_init_reads(&sent[0]);
    assert_eq!(read["scripts"]["operator-user-data"], SEED_002_USER_DATA, "{read:#}");
    assert_eq!(
        read["cloud_config"]["write_files"][0]["path"], "/etc/ebb/agent.toml",
        "{read:#}"
    );
    assert_eq!(read["schema_error"], serde_json::Value::Null, "{read:#}");
    assert!(
        load(
            || {
                os.services
                    .member_addresses()
                    .into_iter()
                    .filter_map(|(address, port)| Some(std::net::SocketAddr::new(address.parse().ok()?, port)))
                    .collect()
            },
            Duration::from_secs(120),
            || in_service() >= 2 && pool() == in_service()
        ),
        "scaled out under load: {}",
        admin(&admin_address, &state, &["activities", "web"]).1
    );
    assert!(
        wait_for(Duration::from_secs(120), || in_service() == 1
            && pool() == 1
            && os.services.servers().len() == 1),
        "back to 1 after the load: {:?}\n{}",
        os.services.servers(),
        admin(&admin_address, &state, &["activities", "web"]).1
    );
}

/// The other way openstack CLI users keep credentials: the `OS_*` variables (an openrc file), read by the
/// collector when the provider names no cloud.
#[test]
fn the_collector_authenticates_from_os_variables() {
    use ebb_tests::{Running, collector_bin, free_port, wait_for};
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let os = runtime.block_on(openstack(None));
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:{}"
        http_listen = "127.0.0.1:{}"
        state_dir = "{}"

        {}"#,
        free_port(),
        free_port(),
        dir.path().join("state").display(),
        ebb_collector::testing::GroupToml::local("web")
            .set("min_size", 1)
            .set("max_size", 1)
            .provider_type("openstack")
            .provider("image", "web-image")
            .provider("flavor", "m1.small")
            .load_balancer_type("octavia")
            .load_balancer("pool_id", "pool-1")
            .to_toml()
    );
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, config).unwrap();
    let _collector = Running::spawn(
        std::process::Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("EBB_LOG", "warn")
            .env_remove("OS_CLOUD")
            .env("OS_AUTH_URL", &os.keystone.url)
            .env("OS_USERNAME", "admin")
            .env("OS_PASSWORD", ADMIN_PASSWORD)
            .env("OS_PROJECT_NAME", "admin")
            .env("OS_USER_DOMAIN_NAME", "Default")
            .env("OS_PROJECT_DOMAIN_NAME", "Default")
            .env("OS_REGION_NAME", "RegionOne"),
    );
    assert!(
        wait_for(Duration::from_secs(30), || os.services.servers().len() == 1),
        "a server launched with a token from the OS_* credentials: {:?}",
        os.services.calls()
    );
}
