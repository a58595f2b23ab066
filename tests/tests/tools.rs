//! The collector seen through real third-party tools: grpcurl (reflection, health, the Admin API under
//! mTLS) and cloud-init's own schema validator (the user data ebb renders).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ebb_tests::{Running, collector_bin, free_port, idle_collector_config, serial, test_tool, wait_for};

/// A collector with one group that launches nothing, on free ports; its state directory is `state`.
fn start(state: &Path) -> (Running, String, String) {
    let (grpc, admin) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let config = idle_collector_config(&grpc, &admin, state);
    let path = state.with_extension("toml");
    std::fs::write(&path, config).unwrap();
    let collector = Running::spawn(
        Command::new(collector_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("EBB_LOG", "warn"),
    );
    assert!(wait_for(Duration::from_secs(30), || state.join("admin.pem").exists()
        && std::net::TcpStream::connect(&admin).is_ok()));
    (collector, grpc, admin)
}

fn grpcurl(state: &Path, client_cert: bool, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(test_tool("grpcurl"));
    command.arg("-cacert").arg(state.join("ca.pem"));
    if client_cert {
        command
            .arg("-cert")
            .arg(state.join("admin.pem"))
            .arg("-key")
            .arg(state.join("admin.key"));
    }
    let output = command.args(args).output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), text)
}

#[test]
fn grpcurl_lists_describes_checks_health_and_calls_the_admin_api() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_collector, grpc, admin) = start(&state);

    let (ok, services) = grpcurl(&state, true, &[&admin, "list"]);
    assert!(ok, "{services}");
    for service in [
        "ebb.v1.Admin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.lines().any(|l| l == service),
            "{service} missing from:\n{services}"
        );
    }
    let (ok, agents_port) = grpcurl(&state, false, &[&grpc, "list"]);
    assert!(
        ok && agents_port.contains("ebb.v1.Telemetry") && agents_port.contains("ebb.v1.Enrollment"),
        "{agents_port}"
    );

    let (ok, description) = grpcurl(&state, true, &[&admin, "describe", "ebb.v1.Admin"]);
    assert!(ok && description.contains("rpc SetDesiredCapacity"), "{description}");

    let (ok, health) = grpcurl(&state, true, &[&admin, "grpc.health.v1.Health/Check"]);
    assert!(ok && health.contains("\"status\": \"SERVING\""), "{health}");
    let (ok, health) = grpcurl(
        &state,
        false,
        &[
            "-d",
            r#"{"service":"ebb.v1.Telemetry"}"#,
            &grpc,
            "grpc.health.v1.Health/Check",
        ],
    );
    assert!(ok && health.contains("SERVING"), "{health}");

    let (ok, groups) = grpcurl(&state, true, &[&admin, "ebb.v1.Admin/ListGroups"]);
    assert!(ok && groups.contains("\"name\": \"web\""), "{groups}");
    let (ok, refused) = grpcurl(&state, false, &[&admin, "ebb.v1.Admin/ListGroups"]);
    assert!(!ok && refused.contains("Unauthenticated"), "{refused}");
    // Without the admin certificate the admin listener answers nothing, reflection and health included.
    for args in [&[admin.as_str(), "list"][..], &[&admin, "grpc.health.v1.Health/Check"]] {
        let (ok, refused) = grpcurl(&state, false, args);
        assert!(!ok && refused.contains("Unauthenticated"), "{args:?}: {refused}");
    }
    // On the agents' port, an Admin call says where the Admin API is.
    let (ok, elsewhere) = grpcurl(&state, true, &[&grpc, "ebb.v1.Admin/ListGroups"]);
    assert!(
        !ok && elsewhere.contains("Unimplemented") && elsewhere.contains("admin.sock"),
        "{elsewhere}"
    );
}

#[test]
fn rendered_user_data_passes_cloud_inits_own_schema_validator() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_collector, _grpc, admin) = start(&state);
    let output = Command::new(collector_bin())
        .args(["--server", &format!("https://{admin}"), "--state-dir"])
        .arg(&state)
        .args(["user-data", "--group", "web", "--format", "cloud-config"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let user_data = dir.path().join("user-data.yaml");
    std::fs::write(&user_data, &output.stdout).unwrap();
    let validator = test_tool("cloud-init-schema");
    let check = |path: &Path| {
        let output = Command::new(&validator).arg(path).output().unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let (ok, text) = check(&user_data);
    assert!(ok && text.contains("Valid cloud-config"), "{text}");

    // The validator is not a rubber stamp: a typo'd key fails.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        String::from_utf8_lossy(&output.stdout).replace("permissions:", "permisions:"),
    )
    .unwrap();
    let (ok, text) = check(&broken);
    assert!(!ok && text.contains("permisions"), "{text}");
}
