//! Issue 24: the operator's user data beside ebb's enrolment, read by cloud-init's own code as at first
//! boot. Each kind of user data an operator brings keeps every part, and ebb's `write_files` and `runcmd`
//! survive an operator's cloud-config that has its own.

use ebb_collector::userdata::{self, OperatorUserData, SizeLimit, UserDataFormat};
use ebb_tests::cloud_init_reads;
use serde_json::Value;

const SCRIPT: &str = "#!/bin/bash -v\n\nyum -y install httpd php\nsystemctl enable httpd\nsystemctl start httpd\n";

const CLOUD_CONFIG: &str = "#cloud-config\npackages: [httpd]\nwrite_files:\n  - path: /var/www/html/index.html\n    \
                            content: hello\nruncmd:\n  - [systemctl, start, httpd]\n";

fn agent_config() -> String {
    userdata::agent_config_of_launch_size("https://10.0.0.5:7300", "web")
}

fn compose(operator: &[u8]) -> Vec<u8> {
    let operator = OperatorUserData::parse(operator).unwrap();
    let text = userdata::compose(UserDataFormat::CloudConfig, &agent_config(), Some(&operator)).unwrap();
    userdata::fit(text, UserDataFormat::CloudConfig, SizeLimit::EC2).unwrap()
}

/// The paths of the merged cloud-config's `write_files`, in order.
fn files(read: &Value) -> Vec<&str> {
    read["cloud_config"]["write_files"]
        .as_array()
        .map(|files| files.iter().filter_map(|f| f["path"].as_str()).collect())
        .unwrap_or_default()
}

fn runcmd(read: &Value) -> String {
    read["cloud_config"]["runcmd"].to_string()
}

/// ebb's part, as cloud-init merged it: agent.toml owner-only with the configuration, the agent started.
fn assert_enrols(read: &Value) {
    let agent = read["cloud_config"]["write_files"]
        .as_array()
        .and_then(|files| files.iter().find(|f| f["path"] == "/etc/ebb/agent.toml"))
        .unwrap_or_else(|| panic!("no agent.toml: {read:#}"));
    assert_eq!(agent["permissions"], "0600");
    assert_eq!(agent["content"].as_str().unwrap(), agent_config());
    assert!(runcmd(read).contains("ebb-agent.service"), "{read:#}");
    assert_eq!(read["schema_error"], Value::Null, "{read:#}");
}

#[test]
fn an_operators_script_runs_beside_ebbs_enrolment() {
    let read = cloud_init_reads(&compose(SCRIPT.as_bytes()));
    assert_eq!(
        read["parts"],
        serde_json::json!(["text/x-shellscript", "text/cloud-config"])
    );
    assert_eq!(read["scripts"]["operator-user-data"], SCRIPT, "byte for byte: {read:#}");
    assert_enrols(&read);
}

#[test]
fn an_operators_cloud_config_keeps_its_files_and_commands_and_ebbs_are_appended() {
    let read = cloud_init_reads(&compose(CLOUD_CONFIG.as_bytes()));
    assert_eq!(files(&read), ["/var/www/html/index.html", "/etc/ebb/agent.toml"]);
    assert_eq!(read["cloud_config"]["packages"], serde_json::json!(["httpd"]));
    let commands = runcmd(&read);
    assert!(
        commands.find("httpd").unwrap() < commands.find("ebb-agent").unwrap(),
        "{commands}"
    );
    assert_enrols(&read);

    // Without ebb's Merge-Type, cloud-init's default merge lets one part's write_files replace the other's:
    // the header is what keeps both.
    let sent = String::from_utf8(compose(CLOUD_CONFIG.as_bytes())).unwrap();
    let plain = sent.replace(&format!("Merge-Type: {}\n", userdata::EBB_MERGE_TYPE), "");
    assert_ne!(plain, sent);
    assert_eq!(files(&cloud_init_reads(plain.as_bytes())), ["/etc/ebb/agent.toml"]);
}

#[test]
fn an_operators_multipart_keeps_every_part_and_gzip_is_undone() {
    let multipart = format!(
        "Content-Type: multipart/mixed; boundary=\"===operator==\"\nMIME-Version: 1.0\n\n\
         --===operator==\nContent-Type: text/x-shellscript; charset=\"us-ascii\"\n\
         Content-Disposition: attachment; filename=\"install.sh\"\n\n{SCRIPT}\n\
         --===operator==\nContent-Type: text/cloud-config; charset=\"us-ascii\"\n\
         Content-Disposition: attachment; filename=\"site.yaml\"\n\n{CLOUD_CONFIG}\n\
         --===operator==--\n"
    );
    let mut gzipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gzipped, multipart.as_bytes()).unwrap();
    for given in [multipart.into_bytes(), gzipped.finish().unwrap()] {
        let read = cloud_init_reads(&compose(&given));
        assert_eq!(
            read["parts"],
            serde_json::json!(["text/x-shellscript", "text/cloud-config", "text/cloud-config"])
        );
        assert_eq!(read["scripts"]["install.sh"], SCRIPT);
        assert_eq!(files(&read), ["/var/www/html/index.html", "/etc/ebb/agent.toml"]);
        assert_enrols(&read);
    }
}

#[test]
fn user_data_over_a_clouds_limit_is_sent_gzipped_and_cloud_init_reads_it_whole() {
    // 20 KB of script: over EC2's 16 KB raw limit.
    let large = format!("#!/bin/sh\n{}", "echo preparing the application server\n".repeat(540));
    assert!(large.len() > 16 * 1024);
    let sent = compose(large.as_bytes());
    assert!(sent.starts_with(&[0x1f, 0x8b]) && sent.len() <= 16 * 1024);
    let read = cloud_init_reads(&sent);
    assert_eq!(read["scripts"]["operator-user-data"], large.as_str());
    assert_enrols(&read);
}
