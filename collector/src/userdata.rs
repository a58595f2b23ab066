//! What a new VM is given at boot: ebb's enrolment (the agent's configuration: collector address, CA
//! fingerprint, one-time join token, group) and, beside it, the operator's own user data (`#!` script,
//! `#cloud-config`, a MIME multipart, any of them gzipped), which starts their application.
//!
//! With cloud-init the two travel as one MIME multipart: the operator's part(s) first, byte for byte, then
//! ebb's `#cloud-config` with a `Merge-Type` that appends its `write_files` and `runcmd` to the operator's
//! rather than being replaced by them. Without cloud-init (`user_data_format = "shell"`) one script enrols
//! first, then runs the operator's script. The whole is gzipped when a cloud's size limit needs it.

use std::io::Write;

use serde::Deserialize;

/// How the agent's configuration reaches the VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UserDataFormat {
    /// cloud-init: `write_files` for /etc/ebb/agent.toml, then start the agent.
    #[default]
    CloudConfig,
    /// A POSIX shell script doing the same, for images without cloud-init.
    Shell,
}

/// `/etc/ebb/agent.toml` for a VM of `group`. The agent deletes the token line once enrolled.
pub fn agent_config(collector_url: &str, ca_sha256: &str, token: &str, group: &str) -> String {
    format!(
        "# Written at first boot by ebb. The agent removes the token once it has enrolled.\n\
         collector_url = \"{collector_url}\"\n\
         group = \"{group}\"\n\
         \n\
         [enrollment]\n\
         ca_sha256 = \"{ca_sha256}\"\n\
         token = \"{token}\"\n"
    )
}

/// An agent configuration as long as a launch's real one, for checking sizes before any launch.
pub fn agent_config_of_launch_size(collector_url: &str, group: &str) -> String {
    let token = format!("{}{}", crate::pki::tokens::TOKEN_PREFIX, "0".repeat(64));
    agent_config(collector_url, &"0".repeat(64), &token, group)
}

/// ebb's enrolment alone, as cloud-config or as a shell script.
pub fn render(format: UserDataFormat, agent_config: &str) -> String {
    match format {
        UserDataFormat::CloudConfig => {
            let content: String = agent_config.lines().map(|line| format!("      {line}\n")).collect();
            format!(
                "#cloud-config\n\
                 write_files:\n  \
                   - path: /etc/ebb/agent.toml\n    \
                     owner: root:root\n    \
                     permissions: '0600'\n    \
                     content: |\n{content}\
                 runcmd:\n  \
                   - [systemctl, enable, --now, ebb-agent.service]\n"
            )
        }
        UserDataFormat::Shell => format!(
            "#!/bin/sh\n\
             # ebb: join this VM to its group.\n\
             set -eu\n\
             umask 077\n\
             mkdir -p /etc/ebb\n\
             cat > /etc/ebb/agent.toml <<'EBB_AGENT_TOML'\n\
             {agent_config}\
             EBB_AGENT_TOML\n\
             systemctl enable --now ebb-agent.service\n"
        ),
    }
}

/// The content types cloud-init gives to user data by its first line (cloud-init's `INCLUSION_TYPES_MAP`),
/// longest prefix first.
const STARTS_WITH: [(&str, &str); 9] = [
    ("#cloud-config-archive", "text/cloud-config-archive"),
    ("#cloud-config-jsonp", "text/cloud-config-jsonp"),
    ("#cloud-config", "text/cloud-config"),
    ("#cloud-boothook", "text/cloud-boothook"),
    ("#include-once", "text/x-include-once-url"),
    ("#include", "text/x-include-url"),
    ("#part-handler", "text/part-handler"),
    ("## template: jinja", "text/jinja2"),
    ("#!", "text/x-shellscript"),
];

/// ebb's `#cloud-config` is merged last, appending its lists to the operator's (cloud-init's default would
/// let a later part replace `write_files` and `runcmd`) and never replacing the operator's other keys.
pub const EBB_MERGE_TYPE: &str = "list(append)+dict(no_replace,recurse_list)+str()";

/// The operator's user data, checked once when the configuration is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorUserData {
    text: String,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq)]
enum Kind {
    /// One part of this content type.
    Part(&'static str),
    /// A MIME multipart: ebb's part is added before its closing delimiter.
    Multipart { boundary: String },
}

impl OperatorUserData {
    /// Checks user data as cloud-init would read it: gzip is undone, and the text must be UTF-8 and start
    /// as cloud-init expects (`#!`, `#cloud-config`, …, or a MIME multipart), or cloud-init would ignore it.
    pub fn parse(bytes: &[u8]) -> Result<Self, String> {
        let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
            gunzip(bytes)?
        } else {
            bytes.to_vec()
        };
        let text = String::from_utf8(bytes).map_err(|_| "is not UTF-8 text (after gunzip)".to_string())?;
        if text.contains('\0') {
            return Err("contains a NUL byte".into());
        }
        let head = text.trim_start_matches(['\n', '\r']);
        let lower = head.get(..head.len().min(64)).unwrap_or(head).to_ascii_lowercase();
        if lower.starts_with("content-type:") || lower.starts_with("mime-version:") {
            let boundary = multipart_boundary(&text)?;
            return Ok(Self {
                text,
                kind: Kind::Multipart { boundary },
            });
        }
        let Some((prefix, content_type)) = STARTS_WITH.iter().find(|(prefix, _)| head.starts_with(prefix)) else {
            let first = head.lines().next().unwrap_or_default();
            return Err(format!(
                "starts with `{}`, which cloud-init ignores: user data must start with `#!` (a script), \
                 `#cloud-config`, another cloud-init marker, or be a MIME multipart",
                first.chars().take(40).collect::<String>().escape_debug()
            ));
        };
        if *prefix == "#cloud-config" {
            match serde_yaml::from_str::<serde_yaml::Value>(&text) {
                Ok(serde_yaml::Value::Mapping(_)) => {}
                Ok(_) => return Err("is `#cloud-config` but not a YAML mapping of keys".into()),
                Err(e) => return Err(format!("is `#cloud-config` but not valid YAML: {e}")),
            }
        }
        Ok(Self {
            text,
            kind: Kind::Part(content_type),
        })
    }

    /// The user data's text (gunzipped).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// A multipart's boundary; `None` for one part.
    pub fn boundary(&self) -> Option<&str> {
        match &self.kind {
            Kind::Multipart { boundary } => Some(boundary),
            Kind::Part(_) => None,
        }
    }

    /// What it is, for activities and `explain`: "a shell script", "cloud-config", ….
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Part("text/x-shellscript") => "a script".into(),
            Kind::Part("text/cloud-config") => "cloud-config".into(),
            Kind::Part(content_type) => (*content_type).into(),
            Kind::Multipart { .. } => "a MIME multipart".into(),
        }
    }

    /// Whether images of `format` can run it: without cloud-init, only a script.
    pub fn check_format(&self, format: UserDataFormat) -> Result<(), String> {
        match (format, &self.kind) {
            (UserDataFormat::Shell, Kind::Part("text/x-shellscript")) | (UserDataFormat::CloudConfig, _) => Ok(()),
            (UserDataFormat::Shell, _) => Err(format!(
                "is {}, which needs cloud-init; with `user_data_format = \"shell\"` (images without \
                 cloud-init) it must be a `#!` script",
                self.describe()
            )),
        }
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut text = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_GUNZIPPED_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("is gzip but cannot be decompressed: {e}"))?;
    if text.len() as u64 > MAX_GUNZIPPED_BYTES {
        return Err(format!("decompresses to more than {MAX_GUNZIPPED_BYTES} bytes"));
    }
    Ok(text)
}

/// No cloud takes more than 64 KiB of user data; 1 MiB of gunzipped text is already a mistake.
const MAX_GUNZIPPED_BYTES: u64 = 1024 * 1024;

fn multipart_boundary(text: &str) -> Result<String, String> {
    let mail = mailparse::parse_mail(text.as_bytes()).map_err(|e| format!("is not a MIME message: {e}"))?;
    if !mail.ctype.mimetype.starts_with("multipart/") {
        return Err(format!(
            "has MIME headers but is `{}`, not a multipart",
            mail.ctype.mimetype
        ));
    }
    let boundary = mail
        .ctype
        .params
        .get("boundary")
        .filter(|b| !b.is_empty())
        .ok_or("is a multipart without a boundary")?;
    if !text.contains(&format!("\n--{boundary}--")) {
        return Err(format!("is a multipart without its closing delimiter `--{boundary}--`"));
    }
    Ok(boundary.clone())
}

/// The user data for one launch: ebb's enrolment with the operator's user data, if any, beside it.
pub fn compose(
    format: UserDataFormat,
    agent_config: &str,
    operator: Option<&OperatorUserData>,
) -> Result<String, String> {
    let Some(operator) = operator else {
        return Ok(render(format, agent_config));
    };
    operator.check_format(format)?;
    let ours = render(format, agent_config);
    match (format, &operator.kind) {
        (UserDataFormat::Shell, _) => {
            let script = &operator.text;
            let delimiter = unused_line("EBB_OPERATOR_USER_DATA", script);
            let newline = if script.ends_with('\n') { "" } else { "\n" };
            Ok(format!(
                "{ours}\
                 # Then the operator's user data, as it was given.\n\
                 mkdir -p /var/lib/ebb\n\
                 cat > /var/lib/ebb/operator-user-data <<'{delimiter}'\n\
                 {script}{newline}\
                 {delimiter}\n\
                 chmod 0700 /var/lib/ebb/operator-user-data\n\
                 exec /var/lib/ebb/operator-user-data\n"
            ))
        }
        (UserDataFormat::CloudConfig, Kind::Part(content_type)) => {
            let boundary = unused_line("==ebb-boundary", &format!("{}\n{ours}", operator.text));
            Ok(format!(
                "Content-Type: multipart/mixed; boundary=\"{boundary}\"\n\
                 MIME-Version: 1.0\n\
                 \n\
                 --{boundary}\n\
                 {}\
                 {}\n\
                 --{boundary}\n\
                 {}\
                 {ours}\n\
                 --{boundary}--\n",
                part_headers(content_type, "operator-user-data", None),
                operator.text,
                part_headers("text/cloud-config", "ebb-enrolment.yaml", Some(EBB_MERGE_TYPE)),
            ))
        }
        (UserDataFormat::CloudConfig, Kind::Multipart { boundary }) => {
            if ours.contains(&format!("--{boundary}")) {
                return Err(format!("the multipart's boundary `{boundary}` occurs in ebb's part"));
            }
            let closing = operator
                .text
                .rfind(&format!("\n--{boundary}--"))
                .expect("checked when parsed")
                + 1;
            let (before, after) = operator.text.split_at(closing);
            Ok(format!(
                "{before}--{boundary}\n{}{ours}\n{after}",
                part_headers("text/cloud-config", "ebb-enrolment.yaml", Some(EBB_MERGE_TYPE))
            ))
        }
    }
}

fn part_headers(content_type: &str, filename: &str, merge_type: Option<&str>) -> String {
    let merge = merge_type.map(|m| format!("Merge-Type: {m}\n")).unwrap_or_default();
    format!(
        "Content-Type: {content_type}; charset=\"utf-8\"\n\
         MIME-Version: 1.0\n\
         Content-Transfer-Encoding: 8bit\n\
         Content-Disposition: attachment; filename=\"{filename}\"\n\
         {merge}\n"
    )
}

/// `base`, or `base` with a number, such that it occurs nowhere in `text`.
fn unused_line(base: &str, text: &str) -> String {
    (0..)
        .map(|n| {
            if n == 0 {
                base.to_string()
            } else {
                format!("{base}_{n}")
            }
        })
        .find(|candidate| !text.contains(candidate.as_str()))
        .expect("some number is unused")
}

/// The most user data a cloud takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimit {
    pub cloud: &'static str,
    pub max_bytes: usize,
    /// The limit is on the base64 encoding, not on the raw bytes.
    pub of_base64: bool,
}

impl SizeLimit {
    /// EC2: 16 KB, before base64.
    pub const EC2: SizeLimit = SizeLimit {
        cloud: "EC2",
        max_bytes: 16 * 1024,
        of_base64: false,
    };
    /// Nova: 65,535 bytes of base64.
    pub const NOVA: SizeLimit = SizeLimit {
        cloud: "OpenStack Nova",
        max_bytes: 65_535,
        of_base64: true,
    };
    /// qemu's NoCloud seed disk (`providers::qemu::seed`).
    pub const NOCLOUD_SEED: SizeLimit = SizeLimit {
        cloud: "the NoCloud seed",
        max_bytes: crate::providers::qemu::seed::MAX_USER_DATA_BYTES,
        of_base64: false,
    };
    /// CloudStack, sent by POST: 32,768 bytes of base64 (`vm.userdata.max.length`).
    pub const CLOUDSTACK: SizeLimit = SizeLimit {
        cloud: "CloudStack",
        max_bytes: 32_768,
        of_base64: true,
    };

    fn measure(&self, bytes: &[u8]) -> usize {
        if self.of_base64 {
            bytes.len().div_ceil(3) * 4
        } else {
            bytes.len()
        }
    }
}

/// The bytes to send: as they are if they fit, else gzipped (cloud-init decompresses user data), else an
/// error naming the cloud and the sizes.
pub fn fit(text: String, format: UserDataFormat, limit: SizeLimit) -> Result<Vec<u8>, String> {
    let plain = text.into_bytes();
    if limit.measure(&plain) <= limit.max_bytes {
        return Ok(plain);
    }
    let what = if limit.of_base64 { "base64-encoded " } else { "" };
    if format == UserDataFormat::Shell {
        return Err(format!(
            "the user data is {} bytes {what}with ebb's enrolment; {} takes at most {} (images without \
             cloud-init cannot take it gzipped): shorten the operator's user data",
            limit.measure(&plain),
            limit.cloud,
            limit.max_bytes
        ));
    }
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(&plain).expect("writing to memory");
    let gzipped = encoder.finish().expect("writing to memory");
    if limit.measure(&gzipped) <= limit.max_bytes {
        return Ok(gzipped);
    }
    Err(format!(
        "the user data is {} bytes {what}with ebb's enrolment, {} gzipped; {} takes at most {}: shorten \
         the operator's user data",
        limit.measure(&plain),
        limit.measure(&gzipped),
        limit.cloud,
        limit.max_bytes
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "collector_url = \"https://10.0.0.5:7300\"\n[enrollment]\ntoken = \"ebbjt_x\"\n";

    #[test]
    fn cloud_config_writes_the_agent_config_owner_only_and_starts_the_agent() {
        let text = render(UserDataFormat::CloudConfig, CONFIG);
        assert!(text.starts_with("#cloud-config\n"));
        assert!(
            text.contains("  - path: /etc/ebb/agent.toml\n    owner: root:root\n    permissions: '0600'\n"),
            "{text}"
        );
        assert!(
            text.contains("      [enrollment]\n      token = \"ebbjt_x\"\n"),
            "{text}"
        );
        assert!(
            text.ends_with("runcmd:\n  - [systemctl, enable, --now, ebb-agent.service]\n"),
            "{text}"
        );
    }

    #[test]
    fn shell_writes_the_same_file() {
        let text = render(UserDataFormat::Shell, CONFIG);
        assert!(text.starts_with("#!/bin/sh\n"));
        assert!(text.contains("umask 077\n"));
        assert!(
            text.contains(&format!("<<'EBB_AGENT_TOML'\n{CONFIG}EBB_AGENT_TOML\n")),
            "{text}"
        );
    }

    #[test]
    fn the_agent_config_names_everything_the_agent_needs() {
        let config = agent_config("https://c:7300", "ab12", "ebbjt_y", "web");
        for needle in [
            "collector_url = \"https://c:7300\"",
            "group = \"web\"",
            "ca_sha256 = \"ab12\"",
            "token = \"ebbjt_y\"",
        ] {
            assert!(config.contains(needle), "{config}");
        }
    }

    const SCRIPT: &str = "#!/bin/bash\nyum -y install httpd\nsystemctl start httpd\n";

    fn operator(text: &str) -> OperatorUserData {
        OperatorUserData::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn without_operator_user_data_only_ebbs_enrolment_is_sent() {
        for format in [UserDataFormat::CloudConfig, UserDataFormat::Shell] {
            assert_eq!(compose(format, CONFIG, None).unwrap(), render(format, CONFIG));
        }
    }

    #[test]
    fn a_script_and_ebbs_cloud_config_travel_as_a_multipart_operator_first() {
        let text = compose(UserDataFormat::CloudConfig, CONFIG, Some(&operator(SCRIPT))).unwrap();
        let mail = mailparse::parse_mail(text.as_bytes()).unwrap();
        assert_eq!(mail.ctype.mimetype, "multipart/mixed");
        let parts: Vec<_> = mail
            .subparts
            .iter()
            .map(|p| (p.ctype.mimetype.clone(), p.get_body().unwrap()))
            .collect();
        assert_eq!(parts.len(), 2, "{text}");
        assert_eq!(parts[0], ("text/x-shellscript".to_string(), SCRIPT.to_string()));
        assert_eq!(
            parts[1],
            (
                "text/cloud-config".to_string(),
                render(UserDataFormat::CloudConfig, CONFIG)
            )
        );
        assert_eq!(
            mail.subparts[1]
                .headers
                .iter()
                .find(|h| h.get_key() == "Merge-Type")
                .map(|h| h.get_value()),
            Some(EBB_MERGE_TYPE.to_string())
        );
    }

    #[test]
    fn a_boundary_never_occurs_in_the_parts() {
        let sneaky = "#!/bin/sh\necho ==ebb-boundary\necho ==ebb-boundary_1\n";
        let text = compose(UserDataFormat::CloudConfig, CONFIG, Some(&operator(sneaky))).unwrap();
        assert!(
            text.starts_with("Content-Type: multipart/mixed; boundary=\"==ebb-boundary_2\"\n"),
            "{text}"
        );
        let mail = mailparse::parse_mail(text.as_bytes()).unwrap();
        assert_eq!(mail.subparts[0].get_body().unwrap(), sneaky);
    }

    #[test]
    fn an_operators_multipart_keeps_its_bytes_and_gets_ebbs_part_appended() {
        let multipart = "Content-Type: multipart/mixed; boundary=\"XYZ\"\nMIME-Version: 1.0\n\n--XYZ\n\
                         Content-Type: text/x-shellscript\n\n#!/bin/sh\necho one\n\n--XYZ\n\
                         Content-Type: text/cloud-config\n\n#cloud-config\npackages: [httpd]\n\n--XYZ--\n";
        let text = compose(UserDataFormat::CloudConfig, CONFIG, Some(&operator(multipart))).unwrap();
        let (head, tail) = multipart.split_at(multipart.find("--XYZ--").unwrap());
        assert!(text.starts_with(head) && text.ends_with(tail), "{text}");
        let mail = mailparse::parse_mail(text.as_bytes()).unwrap();
        let types: Vec<_> = mail.subparts.iter().map(|p| p.ctype.mimetype.as_str()).collect();
        assert_eq!(types, ["text/x-shellscript", "text/cloud-config", "text/cloud-config"]);
        assert_eq!(
            mail.subparts[2].get_body().unwrap(),
            render(UserDataFormat::CloudConfig, CONFIG)
        );
    }

    #[test]
    fn without_cloud_init_the_enrolment_runs_first_then_the_operators_script() {
        let text = compose(UserDataFormat::Shell, CONFIG, Some(&operator(SCRIPT))).unwrap();
        let enrol = text.find("systemctl enable --now ebb-agent.service").unwrap();
        let theirs = text.find(SCRIPT).unwrap();
        assert!(enrol < theirs, "{text}");
        assert!(text.ends_with("exec /var/lib/ebb/operator-user-data\n"), "{text}");
        // A script without a final newline, and one that holds the usual delimiter, both survive.
        let odd = "#!/bin/sh\necho EBB_OPERATOR_USER_DATA";
        let text = compose(UserDataFormat::Shell, CONFIG, Some(&operator(odd))).unwrap();
        assert!(
            text.contains(&format!(
                "<<'EBB_OPERATOR_USER_DATA_1'\n{odd}\nEBB_OPERATOR_USER_DATA_1\n"
            )),
            "{text}"
        );
    }

    #[test]
    fn images_without_cloud_init_take_only_a_script() {
        let error = compose(
            UserDataFormat::Shell,
            CONFIG,
            Some(&operator("#cloud-config\npackages: [httpd]\n")),
        )
        .unwrap_err();
        assert!(error.contains("needs cloud-init"), "{error}");
    }

    #[test]
    fn user_data_cloud_init_would_ignore_is_refused_with_the_reason() {
        for (text, expected) in [
            (&b"yum install httpd\n"[..], "cloud-init ignores"),
            (&b"\xff\xfe#!/bin/sh\n"[..], "not UTF-8"),
            (&b"#cloud-config\npackages: [httpd\n"[..], "not valid YAML"),
            (&b"#cloud-config\n- a list\n"[..], "not a YAML mapping"),
            (&b"Content-Type: text/plain\n\nhello\n"[..], "not a multipart"),
            (
                &b"Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\n\nx\n"[..],
                "closing delimiter",
            ),
            (&[0x1f, 0x8b, 0, 1, 2][..], "cannot be decompressed"),
        ] {
            let error = OperatorUserData::parse(text).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
    }

    #[test]
    fn gzip_is_undone_when_read_and_a_gzip_bomb_is_refused() {
        let gzip = |bytes: &[u8]| {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            encoder.write_all(bytes).unwrap();
            encoder.finish().unwrap()
        };
        assert_eq!(
            OperatorUserData::parse(&gzip(SCRIPT.as_bytes())).unwrap().text(),
            SCRIPT
        );
        let bomb = gzip(
            &[b'#', b'!']
                .into_iter()
                .chain(std::iter::repeat_n(b'a', 64 << 20))
                .collect::<Vec<_>>(),
        );
        assert!(
            bomb.len() as u64 <= crate::config::MAX_SMALL_FILE_BYTES,
            "a file ebb reads"
        );
        let error = OperatorUserData::parse(&bomb).unwrap_err();
        assert!(error.contains("decompresses to more than"), "{error}");
    }

    #[test]
    fn too_large_user_data_is_gzipped_and_past_that_refused_naming_the_cloud() {
        let small = "#!/bin/sh\necho hi\n".to_string();
        assert_eq!(
            fit(small.clone(), UserDataFormat::CloudConfig, SizeLimit::EC2).unwrap(),
            small.as_bytes()
        );
        // 20 KB of a repetitive script: over EC2's 16 KB, well under once gzipped.
        let large = format!("#!/bin/sh\n{}", "echo installing the application\n".repeat(640));
        let sent = fit(large.clone(), UserDataFormat::CloudConfig, SizeLimit::EC2).unwrap();
        assert!(sent.starts_with(&[0x1f, 0x8b]) && sent.len() < 16 * 1024);
        assert_eq!(OperatorUserData::parse(&sent).unwrap().text(), large);
        let error = fit(large.clone(), UserDataFormat::Shell, SizeLimit::EC2).unwrap_err();
        assert!(error.contains("EC2 takes at most 16384"), "{error}");
        // Random text does not compress: refused, with both sizes.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let noise: String = (0..100_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect();
        let error = fit(
            format!("#!/bin/sh\n# {noise}\n"),
            UserDataFormat::CloudConfig,
            SizeLimit::NOVA,
        )
        .unwrap_err();
        assert!(
            error.contains("OpenStack Nova takes at most 65535") && error.contains("gzipped"),
            "{error}"
        );
    }
}
