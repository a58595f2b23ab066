//! Fetching the VM's user data (and instance id) from the cloud's metadata service, for images where nothing
//! writes `/etc/ebb/agent.toml` at boot: EC2 (IMDSv2), OpenStack, and CloudStack's virtual router. The agent
//! takes its configuration from the user data ebb rendered (cloud-config, shell, or plain TOML) and keeps
//! the token in memory only.

use std::time::Duration;

use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::identity::IdentityError;

/// Which metadata service to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserDataSource {
    /// EC2's instance metadata service, version 2 (session token first).
    Ec2,
    /// OpenStack's metadata service (`openstack/latest/user_data`).
    Openstack,
    /// CloudStack's virtual router (`latest/user-data`), by default the VM's default gateway.
    Cloudstack,
}

const TIMEOUT: Duration = Duration::from_secs(5);
/// The most of a metadata service's answer read.
const MAX_ANSWER_BYTES: u64 = 1024 * 1024;
const LINK_LOCAL: &str = "http://169.254.169.254";

/// What the metadata service says about this VM.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetched {
    pub user_data: String,
    pub instance_id: String,
}

fn failed(reason: String) -> IdentityError {
    IdentityError::Invalid(format!("cannot fetch user data from the metadata service: {reason}"))
}

/// One HTTP/1.1 exchange (`Connection: close`); the status and the body.
async fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Result<(u16, String), IdentityError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| failed(format!("`{url}` is not an http:// URL")))?;
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&authority).await?;
        let mut head =
            format!("{method} {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\nContent-Length: 0\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        // No cloud serves more than 64 KiB of user data: a metadata service that sends more is cut short
        // (and its answer then holds no agent configuration) rather than taking the VM's memory.
        let mut response = Vec::new();
        (&mut stream).take(MAX_ANSWER_BYTES).read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(TIMEOUT, exchange)
        .await
        .map_err(|_| failed(format!("{url}: no answer within {} s", TIMEOUT.as_secs())))?
        .map_err(|e| failed(format!("{url}: {e}")))?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| failed(format!("{url}: not an HTTP response")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| failed(format!("{url}: not an HTTP response")))?;
    Ok((status, body.to_string()))
}

async fn get_ok(url: &str, headers: &[(&str, &str)]) -> Result<String, IdentityError> {
    match request("GET", url, headers).await? {
        (200, body) => Ok(body),
        (status, _) => Err(failed(format!("{url}: status {status}"))),
    }
}

/// Asks `source` (at `base_url`, or its usual address) for the user data and the instance id.
pub async fn fetch(source: UserDataSource, base_url: Option<&str>) -> Result<Fetched, IdentityError> {
    let base = match (base_url, source) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, UserDataSource::Cloudstack) => format!(
            "http://{}",
            default_gateway(&std::fs::read_to_string("/proc/net/route").unwrap_or_default()).ok_or_else(|| failed(
                "no default gateway to find the virtual router by; set enrollment.metadata_url".into()
            ))?
        ),
        (None, _) => LINK_LOCAL.to_string(),
    };
    match source {
        UserDataSource::Ec2 => {
            let (status, token) = request(
                "PUT",
                &format!("{base}/latest/api/token"),
                &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
            )
            .await?;
            if status != 200 {
                return Err(failed(format!("IMDSv2 session token: status {status}")));
            }
            let auth = [("X-aws-ec2-metadata-token", token.trim())];
            Ok(Fetched {
                user_data: get_ok(&format!("{base}/latest/user-data"), &auth).await?,
                instance_id: get_ok(&format!("{base}/latest/meta-data/instance-id"), &auth)
                    .await
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            })
        }
        UserDataSource::Openstack => {
            let meta = get_ok(&format!("{base}/openstack/latest/meta_data.json"), &[])
                .await
                .unwrap_or_default();
            Ok(Fetched {
                user_data: get_ok(&format!("{base}/openstack/latest/user_data"), &[]).await?,
                instance_id: json_string_field(&meta, "uuid").unwrap_or_default(),
            })
        }
        UserDataSource::Cloudstack => Ok(Fetched {
            user_data: get_ok(&format!("{base}/latest/user-data"), &[]).await?,
            instance_id: get_ok(&format!("{base}/latest/instance-id"), &[])
                .await
                .unwrap_or_default()
                .trim()
                .to_string(),
        }),
    }
}

/// `"name": "value"` in a flat JSON object, without a JSON parser in the agent.
fn json_string_field(json: &str, name: &str) -> Option<String> {
    let after = &json[json.find(&format!("\"{name}\""))? + name.len() + 2..];
    let value = after.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    Some(value[..value.find('"')?].to_string())
}

/// The default gateway in `/proc/net/route` (destination 0, gateway as little-endian hex).
fn default_gateway(route: &str) -> Option<std::net::Ipv4Addr> {
    route.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) != Some(&"00000000") {
            return None;
        }
        let gateway = u32::from_str_radix(fields.get(2)?, 16).ok()?;
        (gateway != 0).then(|| std::net::Ipv4Addr::from(gateway.swap_bytes()))
    })
}

/// ebb's own cloud-config part begins so, alone or inside a MIME multipart beside the operator's parts.
const EBB_CLOUD_CONFIG: &str = "#cloud-config\nwrite_files:\n  - path: /etc/ebb/agent.toml\n";

/// The agent configuration inside user data that ebb rendered: a cloud-config `write_files` entry for
/// /etc/ebb/agent.toml (alone, or ebb's part of a multipart), the shell variant's here-document, or the
/// TOML itself. (Gzipped user data, which only cloud-init images are sent, is left to cloud-init.)
pub fn agent_config_in(user_data: &str) -> Option<String> {
    // Inside a multipart, ebb's part is found by how it begins; the rest is read as if it stood alone.
    let user_data = match user_data.find(&format!("\n{EBB_CLOUD_CONFIG}")) {
        Some(part) if !user_data.starts_with("#!") => &user_data[part + 1..],
        _ => user_data,
    };
    if user_data.starts_with("#cloud-config") {
        let lines: Vec<&str> = user_data.lines().collect();
        let entry = lines
            .iter()
            .position(|l| l.trim_start().trim_start_matches("- ").trim() == "path: /etc/ebb/agent.toml")?;
        let content = entry + lines[entry..].iter().position(|l| l.trim() == "content: |")?;
        let body: Vec<&str> = lines[content + 1..]
            .iter()
            .take_while(|l| l.starts_with("      ") || l.is_empty())
            .copied()
            .collect();
        return Some(body.iter().map(|l| format!("{}\n", l.get(6..).unwrap_or(""))).collect());
    }
    if user_data.starts_with("#!") {
        let start = user_data.find("<<'EBB_AGENT_TOML'\n")? + "<<'EBB_AGENT_TOML'\n".len();
        let end = start + user_data[start..].find("\nEBB_AGENT_TOML")?;
        return Some(format!("{}\n", &user_data[start..end]));
    }
    user_data.contains("collector_url").then(|| user_data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    const AGENT_TOML: &str = "collector_url = \"https://10.0.0.5:7300\"\ngroup = \"web\"\n\n[enrollment]\nca_sha256 = \"ab\"\ntoken = \"ebbjt_1\"\n";

    fn cloud_config() -> String {
        let content: String = AGENT_TOML.lines().map(|l| format!("      {l}\n")).collect();
        format!(
            "#cloud-config\nwrite_files:\n  - path: /etc/ebb/agent.toml\n    owner: root:root\n    permissions: '0600'\n    content: |\n{content}runcmd:\n  - [systemctl, enable, --now, ebb-agent.service]\n"
        )
    }

    #[test]
    fn finds_the_agent_config_in_every_format_ebb_renders() {
        assert_eq!(
            agent_config_in(&cloud_config()).unwrap().trim_end(),
            AGENT_TOML.trim_end()
        );
        let shell = format!(
            "#!/bin/sh\nset -eu\ncat > /etc/ebb/agent.toml <<'EBB_AGENT_TOML'\n{AGENT_TOML}EBB_AGENT_TOML\nsystemctl enable --now ebb-agent.service\n"
        );
        assert_eq!(agent_config_in(&shell).unwrap(), AGENT_TOML);
        assert_eq!(agent_config_in(AGENT_TOML).unwrap(), AGENT_TOML);
        assert_eq!(agent_config_in("#cloud-config\npackages: [nginx]\n"), None);
        let multipart = format!(
            "Content-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: text/x-shellscript\n\n\
             #!/bin/sh\necho collector_url\n\n--B\nContent-Type: text/cloud-config\n\n{}\n--B--\n",
            cloud_config()
        );
        assert_eq!(agent_config_in(&multipart).unwrap().trim_end(), AGENT_TOML.trim_end());
    }

    #[test]
    fn default_gateway_from_proc_net_route() {
        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t0000A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_gateway(route), Some("192.168.0.1".parse().unwrap()));
        assert_eq!(default_gateway("Iface\tDestination\n"), None);
    }

    /// A fake metadata service speaking all three dialects; EC2 answers only with the session token.
    #[tokio::test]
    async fn an_endless_answer_is_read_only_up_to_its_bound() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = socket.read(&mut buf).await;
                    let _ = socket.write_all(b"HTTP/1.1 200 X\r\nConnection: close\r\n\r\n").await;
                    // 64 MiB of user data, more than any cloud serves, as fast as the agent reads it.
                    let chunk = vec![b'a'; 64 * 1024];
                    for _ in 0..1024 {
                        if socket.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let fetched = fetch(UserDataSource::Cloudstack, Some(&url)).await.unwrap();
        assert!(
            fetched.user_data.len() as u64 <= MAX_ANSWER_BYTES,
            "{}",
            fetched.user_data.len()
        );
        assert_eq!(agent_config_in(&fetched.user_data), None);
    }

    #[test]
    fn many_copies_of_ebbs_part_are_read_without_recursion() {
        let part = format!("\n{EBB_CLOUD_CONFIG}    content: |\n      collector_url = \"x\"\n");
        let text = format!("Content-Type: multipart/mixed\n{}", part.repeat(20_000));
        assert_eq!(agent_config_in(&text).unwrap().trim_end(), "collector_url = \"x\"");
    }

    async fn fake_metadata(user_data: String) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let user_data = user_data.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = socket.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]).to_string();
                    let line = request.lines().next().unwrap_or("").to_string();
                    let has_session = request.contains("X-aws-ec2-metadata-token: session-1");
                    let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>().as_slice() {
                        ["PUT", "/latest/api/token"]
                            if request.contains("X-aws-ec2-metadata-token-ttl-seconds: 300") =>
                        {
                            (200, "session-1".to_string())
                        }
                        ["GET", "/latest/user-data"] if has_session || !request.contains("aws") => (200, user_data),
                        ["GET", "/latest/meta-data/instance-id"] if has_session => (200, "i-0abc".to_string()),
                        ["GET", "/latest/instance-id"] => (200, "vm-7f3e".to_string()),
                        ["GET", "/openstack/latest/user_data"] => (200, user_data),
                        ["GET", "/openstack/latest/meta_data.json"] => {
                            (200, r#"{"name": "web", "uuid": "d8e02d56-2648"}"#.to_string())
                        }
                        _ => (401, String::new()),
                    };
                    let response = format!(
                        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        format!("http://{address}")
    }

    #[tokio::test]
    async fn fetches_from_ec2_imdsv2_openstack_and_cloudstack() {
        let url = fake_metadata(cloud_config()).await;
        let ec2 = fetch(UserDataSource::Ec2, Some(&url)).await.unwrap();
        assert_eq!(
            (ec2.user_data.as_str(), ec2.instance_id.as_str()),
            (cloud_config().as_str(), "i-0abc")
        );
        let openstack = fetch(UserDataSource::Openstack, Some(&url)).await.unwrap();
        assert_eq!(openstack.instance_id, "d8e02d56-2648");
        let cloudstack = fetch(UserDataSource::Cloudstack, Some(&url)).await.unwrap();
        assert_eq!(cloudstack.instance_id, "vm-7f3e");
        assert_eq!(
            agent_config_in(&cloudstack.user_data).unwrap().trim_end(),
            AGENT_TOML.trim_end()
        );
    }

    #[tokio::test]
    async fn an_unreachable_service_is_a_clear_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        let error = fetch(UserDataSource::Openstack, Some(&url))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("cannot fetch user data from the metadata service"),
            "{error}"
        );
    }
}
