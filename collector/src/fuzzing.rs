//! Entry points for the fuzz targets in `fuzz/`: each feeds arbitrary input to one parser of what the
//! collector takes from outside (agents, operators, clouds), the way the collector does, and checks what
//! must hold whatever the input. Not an API: nothing else calls these.

use std::path::Path;

use ebb_proto::v1::{
    CreateTokenRequest, EnrollRequest, ExplainRequest, ListActivitiesRequest, ListMembersRequest, RenewRequest,
    ReportRequest, SetDesiredCapacityRequest, report_request,
};
use prost::Message;

use crate::engine::Millis;

const NOW: Millis = 1_800_000_000_000;

/// A message on an agent's Report stream: decoded, each sample validated, the ack no larger than the request.
pub fn report_request(bytes: &[u8]) {
    let Ok(request) = ReportRequest::decode(bytes) else {
        return;
    };
    if let Some(report_request::Message::Batch(batch)) = &request.message {
        let rejected: Vec<ebb_proto::v1::Rejection> = batch
            .samples
            .iter()
            .filter_map(|sample| {
                crate::ingest::validate_sample(sample, NOW)
                    .err()
                    .map(|r| (sample.seq, r))
            })
            .map(|(seq, rejection)| ebb_proto::v1::Rejection {
                seq,
                code: 3,
                message: rejection.message,
            })
            .collect();
        let highest = batch.samples.iter().map(|s| s.seq).max().unwrap_or(0);
        let ack = crate::server::bounded_ack(highest, rejected, request.encoded_len());
        // A request of a few bytes may still get the smallest ack there is.
        assert!(
            ack.encoded_len() <= request.encoded_len().max(12),
            "an ack larger than its request"
        );
    }
}

/// The other messages anyone (Enroll) or any member (Renew) or an operator (Admin) can send.
pub fn unary_request(bytes: &[u8]) {
    let _ = EnrollRequest::decode(bytes);
    let _ = RenewRequest::decode(bytes);
    let _ = CreateTokenRequest::decode(bytes);
    let _ = SetDesiredCapacityRequest::decode(bytes);
    let _ = ListMembersRequest::decode(bytes);
    let _ = ListActivitiesRequest::decode(bytes);
    let _ = ExplainRequest::decode(bytes);
}

/// A configuration file: parsed and validated; a valid one builds every group's engine.
pub fn config(text: &str) {
    if let Ok(config) = crate::config::parse(Path::new("fuzz.toml"), text) {
        let _ = config.warnings();
        for group in &config.groups {
            let _ = group.engine();
        }
    }
}

/// A snapshot for `evaluate`, decided by the local example's engine when its limits allow a capacity.
pub fn snapshot(text: &str) {
    let Ok(snapshot) = crate::engine::snapshot::Snapshot::parse(text) else {
        return;
    };
    let config =
        crate::config::parse(Path::new("local.toml"), crate::config::LOCAL_EXAMPLE).expect("the example is valid");
    let group = &config.groups[0];
    let engine = group.engine();
    let input = snapshot.input(&engine, group.min_size, group.max_size);
    if input.min_size <= input.max_size {
        let evaluation = engine.evaluate(&input);
        assert!(
            (input.min_size..=input.max_size).contains(&evaluation.desired),
            "desired {} outside {}..{}",
            evaluation.desired,
            input.min_size,
            input.max_size
        );
    }
}

/// An `.idcfrc` to import; what `import` writes is a valid configuration.
pub fn import_idcfrc(text: &str) {
    if let Ok(imported) = crate::import::idcfrc_from(text, Path::new("/nonexistent/fuzz.idcfrc"), "web") {
        crate::config::parse(Path::new("imported.toml"), &imported.config).expect("import writes only valid configs");
    }
}

/// A Heat or K5 template to import; what `import` writes is a valid configuration.
pub fn import_heat(text: &str) {
    if let Ok(imported) = crate::import::heat_from(text, Path::new("/nonexistent/fuzz.yaml"), "web") {
        crate::config::parse(Path::new("imported.toml"), &imported.config).expect("import writes only valid configs");
    }
}

/// An operator's user data: read as cloud-init would, then sent beside ebb's enrolment in both forms. What
/// is sent always holds ebb's agent configuration whole, and the operator's text unchanged.
pub fn user_data(bytes: &[u8]) {
    use crate::userdata::{self, OperatorUserData, SizeLimit, UserDataFormat};
    let Ok(operator) = OperatorUserData::parse(bytes) else {
        return;
    };
    let agent_config = userdata::agent_config_of_launch_size("https://10.0.0.5:7300", "web");
    for format in [UserDataFormat::CloudConfig, UserDataFormat::Shell] {
        if operator.check_format(format).is_err() {
            continue;
        }
        let Ok(text) = userdata::compose(format, &agent_config, Some(&operator)) else {
            continue;
        };
        assert!(
            text.contains(userdata::render(format, &agent_config).trim_end()),
            "ebb's part is whole"
        );
        let theirs = operator.text();
        match operator.boundary() {
            None => assert!(text.contains(theirs), "the operator's text is unchanged"),
            Some(boundary) => {
                // ebb's part goes in before the closing delimiter; everything else is as it was.
                let closing = theirs.rfind(&format!("\n--{boundary}--")).expect("checked when parsed") + 1;
                assert!(text.starts_with(&theirs[..closing]) && text.ends_with(&theirs[closing..]));
            }
        }
        if let Ok(sent) = userdata::fit(text, format, SizeLimit::EC2) {
            assert!(sent.len() <= SizeLimit::EC2.max_bytes);
        }
    }
}

/// What EC2 and ELBv2 answer (XML), what CloudStack answers (JSON), what Nova and Keystone answer (JSON).
pub fn cloud_answer(body: &str) {
    let _ = crate::providers::aws::instances_in(body);
    let _ = crate::providers::aws::template_user_data_in(body);
    let _ = crate::providers::aws::query::error_in(body);
    if let Ok(answer) = crate::providers::cloudstack::api::answer_of("listVirtualMachines", 200, body)
        && let Some(vms) = answer.get("virtualmachine").and_then(serde_json::Value::as_array)
    {
        for vm in vms {
            let _ = crate::providers::cloudstack::Vm::parse(vm);
        }
    }
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(body) {
        let _ = crate::providers::openstack::keystone::message(&value);
        for server in value["servers"].as_array().into_iter().flatten() {
            let _ = crate::providers::openstack::server_instance(server);
        }
    }
}

/// A guest's serial console (the VM's to fill), as an activity quotes its end: at most
/// [`CONSOLE_LINES`](crate::providers::qemu::CONSOLE_LINES) lines, none empty, no control character.
pub fn console_tail(bytes: &[u8]) {
    use crate::providers::qemu::{CONSOLE_LINES, last_lines};
    for cut in [false, true] {
        let lines = last_lines(bytes, cut, CONSOLE_LINES);
        assert!(lines.len() <= CONSOLE_LINES);
        assert!(lines.iter().all(|l| !l.is_empty() && !l.chars().any(char::is_control)));
    }
}
