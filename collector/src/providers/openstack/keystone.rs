//! Keystone v3: a project-scoped token from a password or an application credential, reused until five
//! minutes before it expires and fetched again when a service answers 401; endpoints from the token's
//! service catalog by type, interface and region. Credentials come the way `openstack` CLI users keep them:
//! a `clouds.yaml` entry (`cloud`, else `OS_CLOUD`), or the `OS_*` environment variables.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Mutex;

use crate::providers::CloudError;

/// How ebb authenticates. The secrets never leave it: not in `Debug`, logs or errors.
#[derive(Clone, PartialEq, Default, Deserialize)]
pub struct Credentials {
    pub auth_url: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub user_domain_name: Option<String>,
    #[serde(default)]
    pub user_domain_id: Option<String>,
    #[serde(default)]
    pub project_name: Option<String>,
    #[serde(default)]
    pub project_id: Option<String>,
    #[serde(default)]
    pub project_domain_name: Option<String>,
    #[serde(default)]
    pub project_domain_id: Option<String>,
    #[serde(default)]
    pub application_credential_id: Option<String>,
    #[serde(default)]
    pub application_credential_secret: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("auth_url", &self.auth_url)
            .field("username", &self.username)
            .field("project_name", &self.project_name)
            .field("application_credential_id", &self.application_credential_id)
            .finish_non_exhaustive()
    }
}

/// Where and how to reach the services.
#[derive(Debug, Clone, PartialEq)]
pub struct Cloud {
    pub credentials: Credentials,
    pub region: Option<String>,
    /// `public` (default), `internal` or `admin`.
    pub interface: String,
}

#[derive(Deserialize)]
struct CloudsYaml {
    clouds: BTreeMap<String, CloudEntry>,
}

#[derive(Deserialize)]
struct CloudEntry {
    auth: Credentials,
    region_name: Option<String>,
    interface: Option<String>,
}

impl Cloud {
    /// The `clouds.yaml` entry `name` (or `OS_CLOUD`), else the `OS_*` variables.
    pub fn load(name: Option<&str>) -> Result<Self, String> {
        let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
        if let Some(name) = name.map(str::to_string).or_else(|| env("OS_CLOUD")) {
            return Self::from_clouds_yaml(&name);
        }
        let Some(auth_url) = env("OS_AUTH_URL") else {
            return Err(
                "no OpenStack credentials: set provider.cloud (a clouds.yaml entry), OS_CLOUD, or the OS_* variables (OS_AUTH_URL, OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME, …)"
                    .into(),
            );
        };
        Ok(Self {
            credentials: Credentials {
                auth_url,
                username: env("OS_USERNAME"),
                user_id: env("OS_USER_ID"),
                password: env("OS_PASSWORD"),
                user_domain_name: env("OS_USER_DOMAIN_NAME"),
                user_domain_id: env("OS_USER_DOMAIN_ID"),
                project_name: env("OS_PROJECT_NAME").or_else(|| env("OS_TENANT_NAME")),
                project_id: env("OS_PROJECT_ID").or_else(|| env("OS_TENANT_ID")),
                project_domain_name: env("OS_PROJECT_DOMAIN_NAME"),
                project_domain_id: env("OS_PROJECT_DOMAIN_ID"),
                application_credential_id: env("OS_APPLICATION_CREDENTIAL_ID"),
                application_credential_secret: env("OS_APPLICATION_CREDENTIAL_SECRET"),
            },
            region: env("OS_REGION_NAME"),
            interface: env("OS_INTERFACE").unwrap_or_else(|| "public".into()),
        })
    }

    /// clouds.yaml from `OS_CLIENT_CONFIG_FILE`, `./clouds.yaml`, `~/.config/openstack/` or `/etc/openstack/`.
    fn from_clouds_yaml(name: &str) -> Result<Self, String> {
        let mut places: Vec<PathBuf> = Vec::new();
        if let Some(file) = std::env::var_os("OS_CLIENT_CONFIG_FILE") {
            places.push(file.into());
        }
        places.push("clouds.yaml".into());
        if let Some(home) = std::env::var_os("HOME") {
            places.push(PathBuf::from(home).join(".config/openstack/clouds.yaml"));
        }
        places.push("/etc/openstack/clouds.yaml".into());
        let Some(path) = places.iter().find(|p| p.is_file()) else {
            return Err(format!(
                "cloud `{name}` asked for, but no clouds.yaml in {}",
                places
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        let text = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut clouds: CloudsYaml = serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let entry = clouds
            .clouds
            .remove(name)
            .ok_or_else(|| format!("{} has no cloud named `{name}`", path.display()))?;
        Ok(Self {
            credentials: entry.auth,
            region: entry.region_name,
            interface: entry.interface.unwrap_or_else(|| "public".into()),
        })
    }
}

#[derive(Clone)]
struct Token {
    value: String,
    expires_at: jiff::Timestamp,
    catalog: Value,
}

pub struct Keystone {
    cloud: Cloud,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

/// An OpenStack service's answer: status and JSON body (`Null` when empty).
pub type Answer = (u16, Value);

impl Keystone {
    pub fn new(cloud: Cloud) -> Result<Self, CloudError> {
        Ok(Self {
            cloud,
            http: crate::http::client(None).map_err(CloudError::permanent)?,
            token: Mutex::new(None),
        })
    }

    fn auth_body(&self) -> Value {
        let c = &self.cloud.credentials;
        let domain = |name: &Option<String>, id: &Option<String>| match (id, name) {
            (Some(id), _) => json!({ "id": id }),
            (None, Some(name)) => json!({ "name": name }),
            (None, None) => json!({ "id": "default" }),
        };
        if let (Some(id), Some(secret)) = (&c.application_credential_id, &c.application_credential_secret) {
            // An application credential carries its own project scope.
            return json!({ "auth": { "identity": { "methods": ["application_credential"],
                "application_credential": { "id": id, "secret": secret } } } });
        }
        let user = match &c.user_id {
            Some(id) => json!({ "id": id, "password": c.password }),
            None => json!({ "name": c.username, "password": c.password,
                "domain": domain(&c.user_domain_name, &c.user_domain_id) }),
        };
        let project = match &c.project_id {
            Some(id) => json!({ "id": id }),
            None => json!({ "name": c.project_name,
                "domain": domain(&c.project_domain_name, &c.project_domain_id) }),
        };
        json!({ "auth": { "identity": { "methods": ["password"], "password": { "user": user } },
            "scope": { "project": project } } })
    }

    async fn authenticate(&self) -> Result<Token, CloudError> {
        let url = format!("{}/auth/tokens", self.cloud.credentials.auth_url.trim_end_matches('/'));
        let url = if url.contains("/v3/") {
            url
        } else {
            url.replace("/auth/tokens", "/v3/auth/tokens")
        };
        let response = self.http.post(&url).json(&self.auth_body()).send().await.map_err(|e| {
            let e = e.without_url();
            CloudError::retryable(format!("cannot reach Keystone at {url}: {e}")).caused_by(e)
        })?;
        let status = response.status().as_u16();
        let value = response
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = crate::http::text_capped(response, crate::http::MAX_ANSWER_BYTES)
            .await
            .unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        match (status, value) {
            (201, Some(value)) => {
                let expires_at = body["token"]["expires_at"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .unwrap_or_else(|| jiff::Timestamp::now() + jiff::SignedDuration::from_secs(3600));
                Ok(Token {
                    value,
                    expires_at,
                    catalog: body["token"]["catalog"].clone(),
                })
            }
            (401, _) => Err(CloudError::permanent(format!(
                "Keystone refused the credentials (401: {}): check the user or application credential, its password or secret, and the project",
                body["error"]["message"].as_str().unwrap_or("unauthorized")
            ))),
            (status, _) if status >= 500 => Err(CloudError::retryable(format!("Keystone answered {status}"))),
            (status, _) => Err(CloudError::permanent(format!(
                "Keystone answered {status}: {}",
                body["error"]["message"].as_str().unwrap_or("no reason given")
            ))),
        }
    }

    /// A valid token, fetched again if it expires within five minutes (or `renew`).
    async fn token(&self, renew: bool) -> Result<Token, CloudError> {
        let mut token = self.token.lock().await;
        let soon = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(300);
        match token.as_ref() {
            Some(t) if !renew && t.expires_at > soon => Ok(t.clone()),
            _ => {
                let fresh = self.authenticate().await?;
                *token = Some(fresh.clone());
                Ok(fresh)
            }
        }
    }

    /// The endpoint of `service_type` (`compute`, `load-balancer`, `image`, `network`) for this cloud's
    /// interface and region, from the catalog.
    async fn endpoint(&self, token: &Token, service_type: &str) -> Result<String, CloudError> {
        let services = token.catalog.as_array().cloned().unwrap_or_default();
        let service = services
            .iter()
            .find(|s| s["type"] == service_type)
            .ok_or_else(|| CloudError::permanent(format!("the service catalog has no `{service_type}` service")))?;
        service["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| {
                e["interface"] == self.cloud.interface.as_str()
                    && self
                        .cloud
                        .region
                        .as_deref()
                        .is_none_or(|r| e["region_id"] == r || e["region"] == r)
            })
            .and_then(|e| e["url"].as_str())
            .map(|url| url.trim_end_matches('/').to_string())
            .ok_or_else(|| {
                CloudError::permanent(format!(
                    "the `{service_type}` service has no {} endpoint{}",
                    self.cloud.interface,
                    self.cloud
                        .region
                        .as_ref()
                        .map(|r| format!(" in region {r}"))
                        .unwrap_or_default()
                ))
            })
    }

    /// Calls `method path` on `service_type` with the token (and `body`), authenticating again once if the
    /// service answers 401 (an expired or revoked token).
    pub async fn call(
        &self,
        service_type: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, CloudError> {
        let mut renew = false;
        loop {
            let token = self.token(renew).await?;
            let url = format!("{}{path}", self.endpoint(&token, service_type).await?);
            let mut request = self
                .http
                .request(method.clone(), &url)
                .header("X-Auth-Token", &token.value)
                .header("Accept", "application/json")
                .timeout(Duration::from_secs(30));
            for (name, value) in headers {
                request = request.header(*name, *value);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await.map_err(|e| {
                let e = e.without_url();
                let host = crate::http::host_of(&url);
                CloudError::retryable(format!("{service_type} {method} {path} at {host}: {e}")).caused_by(e)
            })?;
            let status = response.status().as_u16();
            if status == 401 && !renew {
                renew = true;
                continue;
            }
            let text = crate::http::text_capped(response, crate::http::MAX_ANSWER_BYTES)
                .await
                .unwrap_or_default();
            let body = serde_json::from_str(&text).unwrap_or(Value::Null);
            return Ok((status, body));
        }
    }
}

/// A refusal from an OpenStack service, `what` naming the call: 5xx, 409 (busy) and 429 are temporary.
pub fn refusal(what: &str, status: u16, body: &Value) -> CloudError {
    let text = format!("{what} → {status}: {}", message(body));
    if status >= 500 || status == 409 || status == 429 {
        CloudError::retryable(text)
    } else {
        CloudError::permanent(text)
    }
}

/// OpenStack's error text in an answer (`{"itemNotFound": {"message": …}}`, `{"faultstring": …}`, …).
pub fn message(body: &Value) -> String {
    body.get("faultstring")
        .or_else(|| body.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            body.as_object()
                .and_then(|o| o.values().find_map(|v| v.get("message")?.as_str().map(str::to_string)))
        })
        .unwrap_or_else(|| body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_and_application_credential_bodies_and_no_secret_in_debug() {
        let password = Keystone::new(Cloud {
            credentials: Credentials {
                auth_url: "http://k/v3".into(),
                username: Some("demo".into()),
                password: Some("pa55".into()),
                project_name: Some("web".into()),
                user_domain_name: Some("Default".into()),
                ..Credentials::default()
            },
            region: None,
            interface: "public".into(),
        })
        .unwrap();
        let body = password.auth_body();
        assert_eq!(
            body["auth"]["identity"]["password"]["user"]["domain"]["name"],
            "Default"
        );
        assert_eq!(body["auth"]["scope"]["project"]["name"], "web");
        assert_eq!(body["auth"]["scope"]["project"]["domain"]["id"], "default");
        assert!(!format!("{:?}", password.cloud).contains("pa55"));
        let credential = Keystone::new(Cloud {
            credentials: Credentials {
                auth_url: "http://k/v3".into(),
                application_credential_id: Some("ac".into()),
                application_credential_secret: Some("s3".into()),
                ..Credentials::default()
            },
            region: None,
            interface: "public".into(),
        })
        .unwrap();
        let body = credential.auth_body();
        assert_eq!(body["auth"]["identity"]["methods"][0], "application_credential");
        assert!(body["auth"].get("scope").is_none(), "it carries its own scope");
    }

    #[test]
    fn a_clouds_yaml_entry_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clouds.yaml");
        std::fs::write(
            &path,
            "clouds:\n  k5:\n    auth:\n      auth_url: https://identity.example/v3\n      username: demo\n      password: pw\n      project_name: web\n      user_domain_name: Default\n      project_domain_name: Default\n    region_name: jp-east-1\n",
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let mut clouds: CloudsYaml = serde_yaml::from_str(&text).unwrap();
        let entry = clouds.clouds.remove("k5").unwrap();
        assert_eq!(entry.auth.username.as_deref(), Some("demo"));
        assert_eq!(entry.region_name.as_deref(), Some("jp-east-1"));
    }
}
