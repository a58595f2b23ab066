//! OpenStack for the tests: a real Keystone (PyPI `keystone` under uWSGI, SQLite, bootstrapped here) whose
//! catalog points at [`FakeServices`], a fake Nova, Octavia, Glance and Neutron on loopback answering as the
//! API references describe: servers BUILD for a while then ACTIVE (or ERROR with a fault), members
//! PENDING_CREATE then ACTIVE, 409 while the load balancer is busy, and tokens that expire when told.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ebb_collector::providers::local::LocalProvider;
use ebb_collector::providers::{LaunchSpec, Provider};
use serde_json::{Value, json};

use crate::http::{Background, Handler, read_request, respond};
use crate::{Running, free_port, test_tool};

/// A Keystone of its own in `dir`, on a free loopback port.
pub struct Keystone {
    /// `http://127.0.0.1:PORT/v3`.
    pub url: String,
    _uwsgi: Running,
}

pub const ADMIN_PASSWORD: &str = "keystone-admin-secret";

impl Keystone {
    pub fn start(dir: &Path) -> Self {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}/v3");
        let config = dir.join("keystone.conf");
        std::fs::write(
            &config,
            format!(
                "[DEFAULT]\nlog_dir = {dir}\n[database]\nconnection = sqlite:///{dir}/keystone.db\n[fernet_tokens]\nkey_repository = {dir}/fernet-keys\n[credential]\nkey_repository = {dir}/credential-keys\n[identity]\npassword_hash_rounds = 4\n[token]\nexpiration = 3600\n",
                dir = dir.display()
            ),
        )
        .unwrap();
        let manage = |args: &[&str]| {
            let output = std::process::Command::new(test_tool("keystone-manage"))
                .arg("--config-file")
                .arg(&config)
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "keystone-manage {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        let id = |flag: &str| {
            let output = std::process::Command::new("id").arg(flag).output().unwrap();
            String::from_utf8(output.stdout).unwrap().trim().to_string()
        };
        let (user, group) = (id("-un"), id("-gn"));
        manage(&["db_sync"]);
        manage(&["fernet_setup", "--keystone-user", &user, "--keystone-group", &group]);
        manage(&["credential_setup", "--keystone-user", &user, "--keystone-group", &group]);
        manage(&[
            "bootstrap",
            "--bootstrap-password",
            ADMIN_PASSWORD,
            "--bootstrap-public-url",
            &url,
            "--bootstrap-region-id",
            "RegionOne",
        ]);
        let uwsgi = Running::spawn(
            std::process::Command::new(test_tool("keystone-uwsgi"))
                .args(["--http-socket", &format!("127.0.0.1:{port}")])
                .args([
                    "--module",
                    "keystone.wsgi.api:application",
                    "--master",
                    "--processes",
                    "1",
                ])
                .args(["--threads", "4", "--die-on-term"])
                // uWSGI's plain HTTP socket does not keep connections open; saying so stops clients
                // from reusing one it has closed.
                .args(["--add-header", "Connection: close"])
                .env("OS_KEYSTONE_CONFIG_FILES", &config)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(60), "Keystone did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { url, _uwsgi: uwsgi }
    }

    /// The admin's token and user id.
    pub async fn admin(&self, http: &reqwest::Client) -> (String, String) {
        let body = json!({ "auth": { "identity": { "methods": ["password"], "password": { "user": {
            "name": "admin", "domain": { "id": "default" }, "password": ADMIN_PASSWORD } } },
            "scope": { "project": { "name": "admin", "domain": { "id": "default" } } } } });
        let response = http
            .post(format!("{}/auth/tokens", self.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        let token = response.headers()["x-subject-token"].to_str().unwrap().to_string();
        let body: Value = response.json().await.unwrap();
        (token, body["token"]["user"]["id"].as_str().unwrap().to_string())
    }

    /// Puts `service_type` at `url` in the catalog (public, RegionOne).
    pub async fn register(&self, http: &reqwest::Client, service_type: &str, url: &str) {
        let (token, _) = self.admin(http).await;
        let service: Value = http
            .post(format!("{}/services", self.url))
            .header("X-Auth-Token", &token)
            .json(&json!({ "service": { "type": service_type, "name": service_type } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let endpoint = json!({ "endpoint": { "service_id": service["service"]["id"], "interface": "public",
            "url": url, "region_id": "RegionOne" } });
        let status = http
            .post(format!("{}/endpoints", self.url))
            .header("X-Auth-Token", &token)
            .json(&endpoint)
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 201);
    }

    /// An application credential of the admin user: (id, secret).
    pub async fn application_credential(&self, http: &reqwest::Client) -> (String, String) {
        let (token, user) = self.admin(http).await;
        let answer: Value = http
            .post(format!("{}/users/{user}/application_credentials", self.url))
            .header("X-Auth-Token", &token)
            .json(&json!({ "application_credential": { "name": "ebb" } }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let credential = &answer["application_credential"];
        (
            credential["id"].as_str().unwrap().to_string(),
            credential["secret"].as_str().unwrap().to_string(),
        )
    }
}

struct Server {
    id: String,
    name: String,
    created: Instant,
    metadata: Value,
    address: String,
    /// ERROR with this fault once built.
    fault: Option<String>,
    stand_in: Option<String>,
    /// As the create call gave it (base64 decoded).
    user_data: Vec<u8>,
}

struct Member {
    id: String,
    name: String,
    address: String,
    port: u64,
    created: Instant,
}

#[derive(Default)]
struct State {
    servers: BTreeMap<String, Server>,
    members: BTreeMap<String, Member>,
    next: u64,
    build_ms: u64,
    member_ms: u64,
    fail_next_build: Option<String>,
    busy: u32,
    tokens: BTreeSet<String>,
    expired: BTreeSet<String>,
    /// `METHOD /path` of every call.
    calls: Vec<String>,
}

pub struct FakeServices {
    /// `http://127.0.0.1:PORT`; the services are under `/compute/v2.1`, `/load-balancer`, `/image`,
    /// `/network`.
    pub url: String,
    state: Arc<Mutex<State>>,
    _server: Background,
}

pub const IMAGE_ID: &str = "5a8c2d1e-0000-4000-8000-000000000001";
pub const FLAVOR_ID: &str = "5a8c2d1e-0000-4000-8000-000000000002";
pub const NETWORK_ID: &str = "5a8c2d1e-0000-4000-8000-000000000003";

impl FakeServices {
    pub fn start(local: Option<LocalProvider>) -> Self {
        let state = Arc::new(Mutex::new(State {
            build_ms: 500,
            member_ms: 300,
            ..State::default()
        }));
        let shared = state.clone();
        let local = local.map(Arc::new);
        let stand_ins = local.clone();
        let handler: Handler = Arc::new(move |mut stream| {
            let (state, local) = (shared.clone(), stand_ins.clone());
            Box::pin(async move {
                let Some(request) = read_request(&mut stream).await else {
                    return;
                };
                let (status, body) = answer(&state, local.as_deref(), &request).await;
                let _ = respond(&mut stream, status, &body.to_string()).await;
            })
        });
        let server = Background::start(handler, local);
        Self {
            url: format!("http://{}", server.address),
            state,
            _server: server,
        }
    }

    pub fn fail_next_build(&self, fault: &str) {
        self.state.lock().unwrap().fail_next_build = Some(fault.into());
    }

    /// The next `calls` calls to Octavia answer 409.
    pub fn busy(&self, calls: u32) {
        self.state.lock().unwrap().busy = calls;
    }

    /// Every token seen so far is expired from now on (services answer 401).
    pub fn expire_tokens(&self) {
        let mut state = self.state.lock().unwrap();
        let seen = state.tokens.clone();
        state.expired.extend(seen);
    }

    /// Distinct tokens used so far.
    pub fn tokens_seen(&self) -> usize {
        self.state.lock().unwrap().tokens.len()
    }

    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Servers not deleted, and pool members, by name.
    pub fn servers(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .servers
            .values()
            .map(|s| s.name.clone())
            .collect()
    }

    /// The user data each server was created with, in the order they were created.
    pub fn user_data(&self) -> Vec<Vec<u8>> {
        let state = self.state.lock().unwrap();
        let mut servers: Vec<&Server> = state.servers.values().collect();
        servers.sort_by(|a, b| a.id.cmp(&b.id));
        servers.iter().map(|s| s.user_data.clone()).collect()
    }

    pub fn members(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .members
            .values()
            .map(|m| m.name.clone())
            .collect()
    }

    /// The pool's member addresses, for a test that plays the load balancer.
    pub fn member_addresses(&self) -> Vec<(String, u16)> {
        self.state
            .lock()
            .unwrap()
            .members
            .values()
            .map(|m| (m.address.clone(), m.port as u16))
            .collect()
    }
}

fn not_found(what: &str) -> (u16, Value) {
    (
        404,
        json!({ "itemNotFound": { "code": 404, "message": format!("{what} could not be found.") } }),
    )
}

fn server_json(server: &Server, build_ms: u64) -> Value {
    let built = server.created.elapsed() >= Duration::from_millis(build_ms);
    let status = match (built, &server.fault) {
        (false, _) => "BUILD",
        (true, None) => "ACTIVE",
        (true, Some(_)) => "ERROR",
    };
    let mut value = json!({
        "id": server.id, "name": server.name, "status": status, "metadata": server.metadata,
        "addresses": { "private": [{ "addr": server.address, "version": 4, "OS-EXT-IPS:type": "fixed" }] },
        "flavor": { "id": FLAVOR_ID }, "image": { "id": IMAGE_ID },
    });
    if status == "ERROR" {
        value["fault"] = json!({ "code": 500, "message": server.fault });
    }
    value
}

async fn answer(state: &Mutex<State>, local: Option<&LocalProvider>, request: &crate::http::Request) -> (u16, Value) {
    let path = request.target.split('?').next().unwrap_or_default().to_string();
    let token = request
        .raw
        .split(|&b| b == b'\n')
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("x-auth-token")
                .then(|| value.trim().to_string())
        });
    {
        let mut s = state.lock().unwrap();
        s.calls.push(format!("{} {path}", request.method));
        let Some(token) = token else {
            return (
                401,
                json!({ "error": { "code": 401, "message": "The request you have made requires authentication." } }),
            );
        };
        if s.expired.contains(&token) {
            return (
                401,
                json!({ "error": { "code": 401, "message": "The token has expired." } }),
            );
        }
        s.tokens.insert(token);
    }
    let body: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (request.method.as_str(), parts.as_slice()) {
        ("GET", ["image", "v2", "images"]) => (200, json!({ "images": [{ "id": IMAGE_ID, "name": "web-image" }] })),
        ("GET", ["network", "v2.0", "networks"]) => {
            (200, json!({ "networks": [{ "id": NETWORK_ID, "name": "private" }] }))
        }
        ("GET", ["compute", "v2.1", "flavors", "detail"]) => (
            200,
            json!({ "flavors": [{ "id": FLAVOR_ID, "name": "m1.small", "vcpus": 1, "ram": 2048 }] }),
        ),
        ("POST", ["compute", "v2.1", "servers"]) => {
            let server = &body["server"];
            let sent_user_data = server["user_data"]
                .as_str()
                .and_then(|u| {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD.decode(u).ok()
                })
                .unwrap_or_default();
            let user_data = crate::user_data_text(&sent_user_data);
            let id = {
                let mut s = state.lock().unwrap();
                s.next += 1;
                format!("5e7e0000-0000-4000-8000-{:012}", s.next)
            };
            let name = server["name"].as_str().unwrap_or_default().to_string();
            let (address, stand_in) = match (local, ebb_agent::metadata::agent_config_in(&user_data)) {
                (Some(local), Some(agent_config)) => {
                    let spec = LaunchSpec {
                        group: "openstack".into(),
                        member_id: name.clone(),
                        cluster_id: "fake-openstack".into(),
                        launch_id: id.clone(),
                        service_port: 8080,
                        agent_config,
                        user_data: user_data.into_bytes(),
                    };
                    match local.launch(&spec).await {
                        Ok(instance) => (
                            instance.address.map(|a| a.to_string()).unwrap_or_default(),
                            Some(instance.id),
                        ),
                        Err(e) => {
                            return (
                                500,
                                json!({ "computeFault": { "code": 500, "message": e.to_string() } }),
                            );
                        }
                    }
                }
                _ => ("127.0.12.9".to_string(), None),
            };
            let mut s = state.lock().unwrap();
            let fault = s.fail_next_build.take();
            s.servers.insert(
                id.clone(),
                Server {
                    id: id.clone(),
                    name,
                    created: Instant::now(),
                    metadata: server["metadata"].clone(),
                    address,
                    fault,
                    stand_in,
                    user_data: sent_user_data,
                },
            );
            (
                202,
                json!({ "server": { "id": id, "links": [], "OS-DCF:diskConfig": "MANUAL" } }),
            )
        }
        ("GET", ["compute", "v2.1", "servers", "detail"]) => {
            let s = state.lock().unwrap();
            let servers: Vec<Value> = s.servers.values().map(|v| server_json(v, s.build_ms)).collect();
            (200, json!({ "servers": servers }))
        }
        ("GET", ["compute", "v2.1", "servers", id]) => {
            let s = state.lock().unwrap();
            match s.servers.get(*id) {
                Some(server) => (200, json!({ "server": server_json(server, s.build_ms) })),
                None => not_found(&format!("Instance {id}")),
            }
        }
        ("DELETE", ["compute", "v2.1", "servers", id]) => {
            let removed = state.lock().unwrap().servers.remove(*id);
            match removed {
                Some(server) => {
                    if let (Some(local), Some(stand_in)) = (local, server.stand_in) {
                        let _ = local.terminate(&stand_in).await;
                    }
                    (204, Value::Null)
                }
                None => not_found(&format!("Instance {id}")),
            }
        }
        (method, ["load-balancer", "v2", "lbaas", "pools", _pool, "members", rest @ ..]) => {
            let mut s = state.lock().unwrap();
            if s.busy > 0 {
                s.busy -= 1;
                return (
                    409,
                    json!({ "faultcode": "Client", "faultstring": "Load Balancer is immutable and cannot be updated.", "debuginfo": null }),
                );
            }
            let member_json = |m: &Member, member_ms: u64| {
                let status = if m.created.elapsed() >= Duration::from_millis(member_ms) {
                    "ACTIVE"
                } else {
                    "PENDING_CREATE"
                };
                json!({ "id": m.id, "name": m.name, "address": m.address, "protocol_port": m.port,
                    "provisioning_status": status, "operating_status": "NO_MONITOR", "weight": 1 })
            };
            match (method, rest) {
                ("GET", []) => {
                    let members: Vec<Value> = s.members.values().map(|m| member_json(m, s.member_ms)).collect();
                    (200, json!({ "members": members }))
                }
                ("POST", []) => {
                    s.next += 1;
                    let member = Member {
                        id: format!("3e3b0000-0000-4000-8000-{:012}", s.next),
                        name: body["member"]["name"].as_str().unwrap_or_default().to_string(),
                        address: body["member"]["address"].as_str().unwrap_or_default().to_string(),
                        port: body["member"]["protocol_port"].as_u64().unwrap_or(80),
                        created: Instant::now(),
                    };
                    let answer = json!({ "member": member_json(&member, s.member_ms) });
                    s.members.insert(member.id.clone(), member);
                    (201, answer)
                }
                ("GET", [id]) => match s.members.get(*id) {
                    Some(m) => (200, json!({ "member": member_json(m, s.member_ms) })),
                    None => not_found(&format!("Member {id}")),
                },
                ("DELETE", [id]) => match s.members.remove(*id) {
                    Some(_) => (204, Value::Null),
                    None => not_found(&format!("Member {id}")),
                },
                _ => (405, json!({ "faultstring": "Method not allowed" })),
            }
        }
        _ => not_found(&format!("{} {path}", request.method)),
    }
}
