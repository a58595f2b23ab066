//! What a new VM needs to join its group: the agent's configuration (collector address, CA fingerprint,
//! one-time join token, group), wrapped as cloud-init `#cloud-config` or as a plain shell script.

use serde::Deserialize;

/// How the agent's configuration reaches the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UserDataFormat {
    /// cloud-init: `write_files` for /etc/ebb/agent.toml, then start the agent.
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
}
