//! Issue 8: ebb's AWS provider and target group against moto (EC2 and ELBv2 emulated), with a proxy in
//! front that injects throttling, capacity errors and slow answers.

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use ebb_collector::lb::aws::AwsTargetGroup;
use ebb_collector::lb::{LoadBalancer, Registration};
use ebb_collector::providers::aws::query::{EC2_VERSION, ELBV2_VERSION, Query, Service};
use ebb_collector::providers::aws::{Aws, AwsConfig, AwsProvider};
use ebb_collector::providers::{InstanceState, LaunchSpec, Provider};
use ebb_tests::aws::{Fault, Moto, element};

const CLUSTER: &str = "0123456789abcdef";

fn aws(moto: &Moto) -> Arc<Aws> {
    let credentials = SharedCredentialsProvider::new(Credentials::new("testing", "testing", None, None, "test"));
    let service = |signing_name, version| Service {
        signing_name,
        endpoint: moto.endpoint.clone(),
        version,
    };
    Arc::new(Aws {
        query: Query::new("us-east-1".into(), credentials)
            .unwrap()
            .with_first_backoff(Duration::from_millis(50)),
        ec2: service("ec2", EC2_VERSION),
        elbv2: service("elasticloadbalancing", ELBV2_VERSION),
    })
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// An AMI, two subnets in two zones, a target group with a 1 s deregistration delay, and a launch template
/// whose user data starts the application, as seed 004's `tastylog-dev-app-lt`.
struct World {
    image_id: String,
    subnets: Vec<String>,
    target_group_arn: String,
    launch_template_id: String,
}

/// The application's start-up script in seed 004's launch template.
const TEMPLATE_USER_DATA: &str = "#!/bin/bash\ncd /opt/tastylog\nsudo -u ec2-user npm start &\n";

async fn world(aws: &Aws) -> World {
    let images = aws.ec2("DescribeImages", &[]).await.unwrap();
    let image_id = element(&images, "imageId").unwrap().to_string();
    let vpc = aws
        .ec2("CreateVpc", &pairs(&[("CidrBlock", "10.0.0.0/16")]))
        .await
        .unwrap();
    let vpc_id = element(&vpc, "vpcId").unwrap().to_string();
    let mut subnets = Vec::new();
    for (cidr, zone) in [("10.0.1.0/24", "us-east-1a"), ("10.0.2.0/24", "us-east-1b")] {
        let params = pairs(&[("VpcId", &vpc_id), ("CidrBlock", cidr), ("AvailabilityZone", zone)]);
        let subnet = aws.ec2("CreateSubnet", &params).await.unwrap();
        subnets.push(element(&subnet, "subnetId").unwrap().to_string());
    }
    let params = pairs(&[
        ("Name", "tastylog-dev-app-tg"),
        ("Protocol", "HTTP"),
        ("Port", "80"),
        ("VpcId", &vpc_id),
        ("TargetType", "instance"),
    ]);
    let group = aws.elbv2("CreateTargetGroup", &params).await.unwrap();
    let target_group_arn = element(&group, "TargetGroupArn").unwrap().to_string();
    let params = pairs(&[
        ("TargetGroupArn", &target_group_arn),
        ("Attributes.member.1.Key", "deregistration_delay.timeout_seconds"),
        ("Attributes.member.1.Value", "1"),
    ]);
    aws.elbv2("ModifyTargetGroupAttributes", &params).await.unwrap();
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(TEMPLATE_USER_DATA);
    let params = pairs(&[
        ("LaunchTemplateName", "tastylog-dev-app-lt"),
        ("LaunchTemplateData.ImageId", &image_id),
        ("LaunchTemplateData.InstanceType", "t2.micro"),
        ("LaunchTemplateData.UserData", &encoded),
    ]);
    let template = aws.ec2("CreateLaunchTemplate", &params).await.unwrap();
    let launch_template_id = element(&template, "launchTemplateId").unwrap().to_string();
    World {
        image_id,
        subnets,
        target_group_arn,
        launch_template_id,
    }
}

fn provider(aws: Arc<Aws>, world: &World) -> AwsProvider {
    let config: AwsConfig = toml::from_str(&format!(
        r#"
        image_id = "{}"
        instance_type = "t2.micro"
        subnet_ids = ["{}", "{}"]
        security_group_ids = []
        key_name = "ops"
        "#,
        world.image_id, world.subnets[0], world.subnets[1]
    ))
    .unwrap();
    AwsProvider::new(config, aws, CLUSTER)
}

fn spec(member_id: &str) -> LaunchSpec {
    LaunchSpec {
        group: "web".into(),
        member_id: member_id.into(),
        cluster_id: CLUSTER.into(),
        launch_id: format!("{member_id}-1764000000000"),
        service_port: 80,
        agent_config: String::new(),
        user_data: format!("#cloud-config\n# {member_id}\n").into_bytes(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_are_launched_with_user_data_and_tags_found_by_tag_and_terminated() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    let provider = provider(aws.clone(), &world);
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    assert_eq!(instance.member_id, "web-1", "read from its ebb-member tag");
    assert_eq!(instance.state, InstanceState::Pending, "as RunInstances answers");
    assert_eq!(
        provider.describe(std::slice::from_ref(&instance.id)).await.unwrap(),
        [InstanceState::Running]
    );
    assert!(instance.address.is_some());
    let params = pairs(&[("InstanceId", &instance.id), ("Attribute", "userData")]);
    let attribute = aws.ec2("DescribeInstanceAttribute", &params).await.unwrap();
    let user_data = element(&attribute, "value").unwrap();
    use base64::Engine as _;
    let user_data = base64::engine::general_purpose::STANDARD.decode(user_data).unwrap();
    assert_eq!(user_data, b"#cloud-config\n# web-1\n");

    let listed = provider.list("web").await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (&listed[0].id, &listed[0].member_id),
        (&instance.id, &instance.member_id)
    );
    assert!(provider.list("api").await.unwrap().is_empty());
    // The same launch again (a lost answer, retried): the ClientToken gives the same instance.
    let again = provider.launch(&spec("web-1")).await;
    let running = provider
        .list("web")
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.state == InstanceState::Running)
        .count();
    assert_eq!(running, 1, "no second instance: {again:?}");

    provider.terminate(&instance.id).await.unwrap();
    let state = &provider.describe(std::slice::from_ref(&instance.id)).await.unwrap()[0];
    assert!(matches!(state, InstanceState::Terminated { .. }), "{state:?}");
    let unknown = provider.describe(&["i-0000000000000000".into()]).await.unwrap();
    assert!(matches!(unknown[0], InstanceState::Terminated { .. }));

    moto.reset();
    assert!(provider.list("web").await.unwrap().is_empty(), "reset empties moto");
    assert!(
        moto.calls().iter().all(|c| c == "DescribeInstances"),
        "{:?}",
        moto.calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_launch_templates_user_data_is_read_once_a_minute_for_many_launches() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    assert_eq!(
        provider(aws.clone(), &world).template_user_data().await.unwrap(),
        None,
        "no template"
    );
    let config: AwsConfig = toml::from_str(&format!(
        "launch_template_name = \"tastylog-dev-app-lt\"\nsubnet_ids = [\"{}\"]",
        world.subnets[0]
    ))
    .unwrap();
    let provider = AwsProvider::new(config, aws.clone(), CLUSTER);
    for _ in 0..3 {
        let found = provider.template_user_data().await.unwrap().unwrap();
        assert_eq!(found.bytes, TEMPLATE_USER_DATA.as_bytes());
        assert_eq!(
            found.source,
            format!("launch template {} version 1", world.launch_template_id)
        );
    }
    let reads = moto
        .calls()
        .iter()
        .filter(|c| *c == "DescribeLaunchTemplateVersions")
        .count();
    assert_eq!(reads, 1, "{:?}", moto.calls());

    let config: AwsConfig = toml::from_str("launch_template_name = \"no-such-template\"\nsubnet_ids = []").unwrap();
    let error = AwsProvider::new(config, aws, CLUSTER)
        .template_user_data()
        .await
        .unwrap_err();
    assert!(!error.is_retryable(), "an operator must fix it: {error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn launches_rotate_over_subnets_and_move_on_when_a_zone_has_no_capacity() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    let provider = provider(aws, &world);
    moto.fail_next(
        "RunInstances",
        Fault::Error(
            500,
            "InsufficientInstanceCapacity".into(),
            "no t2.micro in us-east-1a".into(),
        ),
    );
    provider.launch(&spec("web-1")).await.unwrap();
    provider.launch(&spec("web-2")).await.unwrap();
    let runs: Vec<String> = moto
        .calls()
        .into_iter()
        .filter(|c| c.starts_with("RunInstances"))
        .collect();
    let (a, b) = (&world.subnets[0], &world.subnets[1]);
    assert_eq!(
        runs,
        [
            format!("RunInstances {b}"),
            format!("RunInstances {a}"),
            format!("RunInstances {a}")
        ],
        "web-1 starts at the second subnet, whose zone had no capacity, and the first took it; web-2 starts at the first"
    );
    for _ in 0..2 {
        moto.fail_next(
            "RunInstances",
            Fault::Error(500, "InsufficientInstanceCapacity".into(), "none".into()),
        );
    }
    let error = provider.launch(&spec("web-3")).await.unwrap_err();
    assert!(
        error.is_retryable() && error.to_string().contains("no capacity for this instance type"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn throttling_is_waited_out_a_few_times_then_reported_never_a_retry_storm() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    let provider = provider(aws, &world);
    let describes = || moto.calls().iter().filter(|c| *c == "DescribeInstances").count();
    for _ in 0..2 {
        moto.fail_next(
            "DescribeInstances",
            Fault::Error(503, "RequestLimitExceeded".into(), "Request limit exceeded.".into()),
        );
    }
    assert!(provider.list("web").await.unwrap().is_empty());
    assert_eq!(describes(), 3);
    for _ in 0..10 {
        moto.fail_next(
            "DescribeInstances",
            Fault::Error(400, "Throttling".into(), "Rate exceeded".into()),
        );
    }
    let error = provider.list("web").await.unwrap_err();
    assert!(
        error.is_retryable() && error.to_string().contains("throttling"),
        "{error}"
    );
    assert_eq!(describes(), 3 + 4, "four attempts, then the error");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_launch_is_waited_for() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    moto.fail_next("RunInstances", Fault::Slow(Duration::from_secs(2)));
    let started = std::time::Instant::now();
    let instance = provider(aws, &world).launch(&spec("web-1")).await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(instance.state, InstanceState::Pending);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_target_group_registers_deregisters_and_reports_its_delay() {
    let moto = Moto::start(None);
    let aws = aws(&moto);
    let world = world(&aws).await;
    let provider = provider(aws.clone(), &world);
    let instance = provider.launch(&spec("web-1")).await.unwrap();
    let group = AwsTargetGroup::new(aws, &world.target_group_arn, false).await.unwrap();
    assert_eq!(group.deregistration_delay_secs(), 1);
    let registration = Registration {
        member_id: "web-1",
        instance_id: &instance.id,
        address: "127.0.12.1:80".parse().unwrap(),
    };
    group.register(&registration).await.unwrap();
    let targets: Vec<String> = group
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.instance_id)
        .collect();
    assert_eq!(targets, std::slice::from_ref(&instance.id));
    group.deregister("web-1", &instance.id).await.unwrap();
    let targets = group.members().await.unwrap();
    assert!(targets.is_empty(), "{targets:?}");
    let missing = AwsTargetGroup::new(
        Arc::new(Aws {
            query: Query::new(
                "us-east-1".into(),
                SharedCredentialsProvider::new(Credentials::new("testing", "testing", None, None, "test")),
            )
            .unwrap(),
            ec2: Service {
                signing_name: "ec2",
                endpoint: moto.endpoint.clone(),
                version: EC2_VERSION,
            },
            elbv2: Service {
                signing_name: "elasticloadbalancing",
                endpoint: moto.endpoint.clone(),
                version: ELBV2_VERSION,
            },
        }),
        "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/nope/0",
        false,
    )
    .await;
    assert!(
        missing.is_err(),
        "a target group that does not exist is an error at start"
    );
}

/// `ebb-collector serve` for one group `tastylog-dev` on moto (credentials and region from the environment,
/// as AWS's chain reads them), its provider from the launch template plus `provider` lines; the admin
/// address and state directory for [`admin`].
fn serve_on_moto(
    dir: &std::path::Path,
    moto: &Moto,
    world: &World,
    (min_size, max_size): (u32, u32),
    provider: &str,
    policies: &str,
) -> (ebb_tests::Running, String, std::path::PathBuf) {
    use ebb_tests::{Running, collector_bin, free_port};
    let (admin_address, state) = (format!("127.0.0.1:{}", free_port()), dir.join("state"));
    let config = format!(
        r#"
        [server]
        grpc_listen = "127.0.0.1:{grpc}"
        admin_listen = "{admin_address}"
        http_listen = "127.0.0.1:{http}"
        state_dir = "{state}"

        [[groups]]
        name = "tastylog-dev"
        min_size = {min_size}
        max_size = {max_size}
        cooldown_secs = 3
        warmup_secs = 3
        drain_secs = 1
        member_port = 8080
        reconcile_interval_secs = 2

        [groups.health_check]
        path = "/health"

        [groups.provider]
        type = "aws"
        region = "us-east-1"
        endpoint_url = "{endpoint}"
        launch_template_id = "{template}"
        subnet_ids = ["{a}", "{b}"]
        {provider}

        [groups.load_balancer]
        type = "aws_target_group"
        target_group_arn = "{arn}"
        {policies}
        "#,
        grpc = free_port(),
        http = free_port(),
        state = state.display(),
        endpoint = moto.endpoint,
        template = world.launch_template_id,
        a = world.subnets[0],
        b = world.subnets[1],
        arn = world.target_group_arn,
    );
    let config_path = dir.join("collector.toml");
    std::fs::write(&config_path, &config).unwrap();
    let collector = Running::spawn(
        std::process::Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("EBB_LOG", "warn")
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            // Never ask a metadata service: this test stays on loopback.
            .env("AWS_EC2_METADATA_DISABLED", "true"),
    );
    (collector, admin_address, state)
}

/// Issue 8's end-to-end test: the collector keeps a group of min 1, max 2 on moto with a target-tracking
/// CPU policy, as seed 004; local instances stand in for moto's, their agents enrolling from the UserData.
/// Under load it scales out to 2 with both in the target group, and back to 1 after it. Issue 24: the
/// launch template's user data (the application's start-up) is sent beside ebb's enrolment, and cloud-init
/// would run both.
#[test]
fn a_group_on_aws_scales_out_and_back_in_with_the_target_group_following() {
    use ebb_tests::{admin, load, serial, wait_for};
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let local = ebb_tests::stand_ins("127.0.13", &dir.path().join("instances"));
    let moto = Moto::start(Some(local));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = aws(&moto);
    let world = runtime.block_on(world(&client));
    let targets = || {
        runtime
            .block_on(client.elbv2(
                "DescribeTargetHealth",
                &pairs(&[("TargetGroupArn", &world.target_group_arn)]),
            ))
            .unwrap()
            .matches("<Target>")
            .count()
    };
    let policy = r#"
        [[groups.policies]]
        name = "cpu-target"
        type = "target_tracking"
        metric = "cpu"
        target = 40.0
        period_secs = 5
        stabilization_secs = 5
    "#;
    let overrides = format!("image_id = \"{}\"\ninstance_type = \"t2.micro\"", world.image_id);
    let (_collector, admin_address, state) = serve_on_moto(dir.path(), &moto, &world, (1, 2), &overrides, policy);
    let in_service = || {
        admin(&admin_address, &state, &["members", "tastylog-dev"])
            .1
            .lines()
            .filter(|l| l.contains(" in_service "))
            .count()
    };
    assert!(
        wait_for(Duration::from_secs(60), || in_service() == 1 && targets() == 1),
        "min 1 in service and in the target group: {}",
        admin(&admin_address, &state, &["members", "tastylog-dev"]).1
    );
    let members = admin(&admin_address, &state, &["members", "tastylog-dev"]).1;
    // What the instance was launched with: the template's start-up script and ebb's enrolment, both run.
    let instance_id = element(
        &runtime.block_on(client.ec2("DescribeInstances", &[])).unwrap(),
        "instanceId",
    )
    .unwrap()
    .to_string();
    let params = pairs(&[("InstanceId", &instance_id), ("Attribute", "userData")]);
    let attribute = runtime
        .block_on(client.ec2("DescribeInstanceAttribute", &params))
        .unwrap();
    use base64::Engine as _;
    let user_data = base64::engine::general_purpose::STANDARD
        .decode(element(&attribute, "value").unwrap())
        .unwrap();
    let read = ebb_tests::cloud_init_reads(&user_data);
    assert_eq!(read["scripts"]["operator-user-data"], TEMPLATE_USER_DATA, "{read:#}");
    assert!(
        read["cloud_config"]["write_files"][0]["path"] == "/etc/ebb/agent.toml",
        "{read:#}"
    );
    let activities = admin(&admin_address, &state, &["activities", "tastylog-dev"]).1;
    assert!(
        activities.contains(&format!(
            "user data: ebb's enrolment and the user data of launch template {} version 1 (a script)",
            world.launch_template_id
        )),
        "{activities}"
    );
    assert!(
        members
            .lines()
            .skip(1)
            .all(|l| l.split_whitespace().nth(2).is_some_and(|a| a.starts_with("127.0.13."))),
        "members are known at their stand-ins' loopback addresses only: {members}"
    );
    assert!(
        load(
            || moto
                .stand_ins()
                .into_iter()
                .map(|ip| std::net::SocketAddr::new(ip, 8080))
                .collect(),
            Duration::from_secs(90),
            || in_service() == 2 && targets() == 2
        ),
        "scaled out to 2 under load: {}",
        admin(&admin_address, &state, &["activities", "tastylog-dev"]).1
    );
    let explained = admin(&admin_address, &state, &["explain", "tastylog-dev", "--limit", "100"]).1;
    assert!(
        explained.contains(&format!(
            "The new members' user data: ebb's enrolment and the user data of launch template {} version 1 (a script).",
            world.launch_template_id
        )),
        "{explained}"
    );
    assert!(
        wait_for(Duration::from_secs(90), || in_service() == 1
            && targets() == 1
            && moto.stand_ins().len() == 1),
        "back to 1 after the load: {}",
        admin(&admin_address, &state, &["activities", "tastylog-dev"]).1
    );
    let runs = moto.calls().iter().filter(|c| c.starts_with("RunInstances")).count();
    assert_eq!(runs, 2, "one launch per member: {:?}", moto.calls());
}

/// Issue 24: a member that never registered with the target group (its VM never enrolled) is terminated
/// at once when the group scales in, as EC2 terminates pending instances: not after the target group's
/// 300 s deregistration delay.
#[test]
fn a_pending_member_scaled_in_is_terminated_at_once_despite_the_deregistration_delay() {
    use ebb_tests::{admin, serial, wait_for};
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    // No stand-ins: moto's instances run, but no agent ever enrols from them.
    let moto = Moto::start(None);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let client = aws(&moto);
    let world = runtime.block_on(world(&client));
    let params = pairs(&[
        ("TargetGroupArn", &world.target_group_arn),
        ("Attributes.member.1.Key", "deregistration_delay.timeout_seconds"),
        ("Attributes.member.1.Value", "300"),
    ]);
    runtime
        .block_on(client.elbv2("ModifyTargetGroupAttributes", &params))
        .unwrap();
    let (_collector, admin_address, state) = serve_on_moto(dir.path(), &moto, &world, (0, 2), "", "");
    let members = || admin(&admin_address, &state, &["members", "tastylog-dev"]).1;
    assert!(
        wait_for(Duration::from_secs(30), || admin(
            &admin_address,
            &state,
            &["scale", "tastylog-dev", "--to", "1"]
        )
        .0),
        "the collector answers"
    );
    assert!(
        wait_for(Duration::from_secs(30), || members().contains(" pending ")),
        "{}",
        members()
    );
    let (ok, text) = admin(&admin_address, &state, &["scale", "tastylog-dev", "--to", "0"]);
    assert!(ok, "{text}");
    let terminated = || moto.calls().iter().any(|c| c == "TerminateInstances");
    assert!(
        wait_for(Duration::from_secs(10), terminated),
        "terminated within seconds: {}",
        admin(&admin_address, &state, &["activities", "tastylog-dev"]).1
    );
    let activities = admin(&admin_address, &state, &["activities", "tastylog-dev"]).1;
    assert!(activities.contains("never in service"), "{activities}");
}

/// Issue 24: an unreachable endpoint's error names the action and the host.
#[tokio::test]
async fn an_unreachable_endpoint_is_named_in_the_error() {
    let port = ebb_tests::free_port();
    let credentials = SharedCredentialsProvider::new(Credentials::new("testing", "testing", None, None, "test"));
    let ec2 = Service {
        signing_name: "ec2",
        endpoint: format!("http://127.0.0.1:{port}/"),
        version: EC2_VERSION,
    };
    let query = Query::new("us-east-1".into(), credentials).unwrap();
    let error = query
        .call(&ec2, "DescribeInstances", &[])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("DescribeInstances") && error.contains(&format!("cannot reach 127.0.0.1:{port}")),
        "{error}"
    );
}
