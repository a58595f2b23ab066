//! A fake CloudStack API on loopback for the tests. It checks each request's signature the way the
//! CloudStack server does (its own implementation, not ebb's), answers in the shapes Apache libcloud
//! recorded from real CloudStack (read from the installed package's fixture files), runs deploy and
//! destroy as jobs that take `job_ms` whether anyone polls or not, and can inject faults. With a
//! [`LocalProvider`] its VMs are real local instances whose agents enrol from the user data.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Background, Handler, form, read_request, respond};
use base64::Engine as _;
use ebb_collector::providers::local::LocalProvider;
use ebb_collector::providers::{LaunchSpec, Provider};
use serde_json::{Value, json};

/// A fault for the next call of a command.
#[derive(Debug, Clone)]
pub enum Fault {
    /// An HTTP status with a body that is not CloudStack's JSON (a proxy in the way).
    Http(u16),
    /// No answer for this long (longer than the client waits: a timeout).
    Silence(Duration),
    /// CloudStack's own error answer.
    Error(u16, String),
    /// The call is accepted, and its job ends with jobstatus 2.
    JobFails(u16, String),
}

struct Vm {
    id: String,
    display_name: String,
    state: &'static str,
    address: String,
    tags: Vec<(String, String)>,
    /// The local instance running it, if any.
    local: Option<String>,
    /// As deployVirtualMachine received it (base64 decoded).
    user_data: Vec<u8>,
}

struct Job {
    done_at: Instant,
    /// `Ok(jobresult)` or `Err((errorcode, errortext))`.
    outcome: Result<Value, (u16, String)>,
    /// What happens when it ends.
    on_done: Option<JobEffect>,
}

enum JobEffect {
    Running(String),
    Destroyed(String),
}

struct State {
    vms: BTreeMap<String, Vm>,
    jobs: BTreeMap<String, Job>,
    rules: BTreeMap<String, BTreeSet<String>>,
    faults: BTreeMap<String, VecDeque<Fault>>,
    calls: Vec<String>,
    next_id: u64,
    job_ms: u64,
}

pub struct FakeCloudStack {
    pub endpoint: String,
    pub api_key: String,
    pub secret_key: String,
    state: Arc<Mutex<State>>,
    _server: Background,
}

/// What the fake answers with, from libcloud's fixtures.
struct Shapes {
    vm: Value,
    job_done: Value,
    job_failed: Value,
    error: Value,
    list_vms: Value,
    lb_instances: Value,
}

impl Shapes {
    fn load(fixtures: &Path) -> Self {
        let read = |name: &str| -> Value {
            let path = fixtures.join(name);
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::from_str(&text).unwrap()
        };
        let deployed = read("compute/queryAsyncJobResult_17164.json");
        Self {
            vm: deployed["queryasyncjobresultresponse"]["jobresult"]["virtualmachine"].clone(),
            job_done: deployed["queryasyncjobresultresponse"].clone(),
            job_failed: read("compute/queryAsyncJobResult_17177.json")["queryasyncjobresultresponse"].clone(),
            error: read("compute/deployVirtualMachine_deployfail.json")["deployvirtualmachineresponse"].clone(),
            list_vms: read("compute/listVirtualMachines_default.json")["listvirtualmachinesresponse"].clone(),
            lb_instances:
                read("loadbalancer/listLoadBalancerRuleInstances_default.json")["listloadbalancerruleinstancesresponse"]
                    .clone(),
        }
    }
}

impl FakeCloudStack {
    /// Starts the fake on 127.0.0.1 with a free port. With `local`, each VM is a local instance.
    pub fn start(local: Option<LocalProvider>) -> Self {
        let shapes = Arc::new(Shapes::load(&crate::libcloud_fixtures()));
        let state = Arc::new(Mutex::new(State {
            vms: BTreeMap::new(),
            jobs: BTreeMap::new(),
            rules: BTreeMap::new(),
            faults: BTreeMap::new(),
            calls: Vec::new(),
            next_id: 1,
            job_ms: 300,
        }));
        let local = local.map(Arc::new);
        let server = Arc::new(Server {
            state: state.clone(),
            shapes,
            api_key: "fake-api-key".into(),
            secret_key: "fake secret/key+=".into(),
            local: local.clone(),
        });
        let handler: Handler = Arc::new(move |stream| {
            let server = server.clone();
            Box::pin(async move { server.serve(stream).await })
        });
        let server = Background::start(handler, local);
        Self {
            endpoint: format!("http://{}/client/api", server.address),
            api_key: "fake-api-key".into(),
            secret_key: "fake secret/key+=".into(),
            state,
            _server: server,
        }
    }

    /// An owner-only `.idcfrc` with this fake's endpoint and keys, as ssh_scale.py users have one.
    pub fn idcfrc(&self, dir: &Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(".idcfrc");
        let text = format!(
            "[account]\nhost={}\napi_key={}\nsecret_key={}\n",
            self.endpoint, self.api_key, self.secret_key
        );
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }

    /// How long deploy and destroy jobs take.
    pub fn set_job_ms(&self, job_ms: u64) {
        self.state.lock().unwrap().job_ms = job_ms;
    }

    /// The next call of `command` meets `fault`.
    pub fn fail_next(&self, command: &str, fault: Fault) {
        let mut state = self.state.lock().unwrap();
        state.faults.entry(command.to_string()).or_default().push_back(fault);
    }

    /// Calls so far, in order, as `METHOD command`.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The user data each VM was deployed with, in the order they were deployed.
    pub fn user_data(&self) -> Vec<Vec<u8>> {
        let state = self.state.lock().unwrap();
        let mut vms: Vec<&Vm> = state.vms.values().collect();
        vms.sort_by(|a, b| a.id.cmp(&b.id));
        vms.iter().map(|vm| vm.user_data.clone()).collect()
    }

    /// Display names of the VMs not destroyed, sorted.
    pub fn running(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .state
            .lock()
            .unwrap()
            .vms
            .values()
            .filter(|vm| vm.state != "Destroyed")
            .map(|vm| vm.display_name.clone())
            .collect();
        names.sort();
        names
    }

    /// Display names of the VMs assigned to a load-balancer rule, sorted.
    pub fn rule_members(&self, rule_id: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        let mut names: Vec<String> = state
            .rules
            .get(rule_id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.vms.get(id).map(|vm| vm.display_name.clone()))
            .collect();
        names.sort();
        names
    }

    /// The addresses of a rule's VMs, for a test that plays the load balancer.
    pub fn rule_addresses(&self, rule_id: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .rules
            .get(rule_id)
            .into_iter()
            .flatten()
            .filter_map(|id| state.vms.get(id).map(|vm| vm.address.clone()))
            .collect()
    }

    /// Adds a VM that ebb did not launch (the seeds' monitored VM) to a rule.
    pub fn add_vm(&self, display_name: &str, rule_id: Option<&str>) -> String {
        let mut state = self.state.lock().unwrap();
        let id = state.new_id();
        // Loopback, with nothing listening: tests never reach beyond this machine.
        let address = format!("127.0.12.{}", state.next_id % 250);
        state.vms.insert(
            id.clone(),
            Vm {
                id: id.clone(),
                display_name: display_name.into(),
                state: "Running",
                address,
                tags: Vec::new(),
                local: None,
                user_data: Vec::new(),
            },
        );
        if let Some(rule) = rule_id {
            state.rules.entry(rule.into()).or_default().insert(id.clone());
        }
        id
    }
}

impl State {
    fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("00000000-0000-4000-8000-{:012}", self.next_id)
    }

    /// Ends the jobs whose time has come, applying their effects.
    fn settle(&mut self) -> Vec<String> {
        let now = Instant::now();
        let mut to_stop = Vec::new();
        for job in self.jobs.values_mut() {
            if job.done_at > now {
                continue;
            }
            match job.on_done.take() {
                Some(JobEffect::Running(id)) => {
                    if let Some(vm) = self.vms.get_mut(&id) {
                        vm.state = "Running";
                    }
                }
                Some(JobEffect::Destroyed(id)) => {
                    if let Some(vm) = self.vms.get_mut(&id) {
                        vm.state = "Destroyed";
                        to_stop.extend(vm.local.take());
                    }
                    for members in self.rules.values_mut() {
                        members.remove(&id);
                    }
                }
                None => {}
            }
        }
        to_stop
    }
}

struct Server {
    state: Arc<Mutex<State>>,
    shapes: Arc<Shapes>,
    api_key: String,
    secret_key: String,
    local: Option<Arc<LocalProvider>>,
}

/// Java's URLEncoder.encode(value, "UTF-8"): letters, digits and `.-*_` stay, space is `+`, every other
/// byte `%XX`.
fn java_url_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'*' | b'_' => (b as char).to_string(),
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Server {
    /// ApiServer.verifyRequest: every parameter but `signature`, names sorted as they came, values
    /// URL-encoded with `+` replaced by `%20`, lowercased, HMAC-SHA1, base64; a v3 request must not have
    /// expired.
    fn verify(&self, params: &BTreeMap<String, String>) -> Result<(), String> {
        let signature = params.get("signature").ok_or("no signature")?;
        if params.get("apiKey").or(params.get("apikey")) != Some(&self.api_key) {
            return Err("unknown api key".into());
        }
        // A BTreeMap iterates its String keys in byte order, as Java's Collections.sort orders them.
        let unsigned = params
            .iter()
            .filter(|(k, _)| !k.eq_ignore_ascii_case("signature"))
            .map(|(k, v)| format!("{k}={}", java_url_encode(v).replace('+', "%20")))
            .collect::<Vec<_>>()
            .join("&")
            .to_lowercase();
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, self.secret_key.as_bytes());
        let expected = base64::engine::general_purpose::STANDARD.encode(ring::hmac::sign(&key, unsigned.as_bytes()));
        if &expected != signature {
            return Err("signature mismatch".into());
        }
        if params.get("signatureVersion").map(String::as_str) == Some("3") {
            let expires = params.get("expires").ok_or("v3 without expires")?;
            let expires = jiff::fmt::strtime::parse("%Y-%m-%dT%H:%M:%S%z", expires)
                .and_then(|t| t.to_timestamp())
                .map_err(|e| format!("bad expires: {e}"))?;
            if expires < jiff::Timestamp::now() {
                return Err("expired".into());
            }
        }
        Ok(())
    }

    async fn serve(&self, mut stream: tokio::net::TcpStream) {
        let Some(request) = read_request(&mut stream).await else {
            return;
        };
        let query = request.target.split_once('?').map(|(_, q)| q).unwrap_or("");
        let mut params = form(query);
        params.extend(form(&request.body));
        let method = request.method;
        let command = params.get("command").cloned().unwrap_or_default();
        let fault = {
            let mut state = self.state.lock().unwrap();
            state.calls.push(format!("{method} {command}"));
            state.faults.get_mut(&command).and_then(VecDeque::pop_front)
        };
        let (status, answer) = match fault {
            Some(Fault::Http(status)) => {
                let _ = respond(&mut stream, status, "<html>Service Unavailable</html>").await;
                return;
            }
            Some(Fault::Silence(delay)) => {
                tokio::time::sleep(delay).await;
                return;
            }
            Some(Fault::Error(code, text)) => (code, self.error(code, &text)),
            Some(Fault::JobFails(code, text)) => (200, self.failing_job(code, &text)),
            None => match self.verify(&params) {
                Err(_) => (
                    401,
                    self.error(401, "unable to verify user credentials and/or request signature"),
                ),
                Ok(()) => self.answer(&command, &params).await,
            },
        };
        let body = json!({ format!("{}response", command.to_lowercase()): answer }).to_string();
        let _ = respond(&mut stream, status, &body).await;
    }

    fn error(&self, code: u16, text: &str) -> Value {
        let mut error = self.shapes.error.clone();
        error["errorcode"] = json!(code);
        error["errortext"] = json!(text);
        error
    }

    fn failing_job(&self, code: u16, text: &str) -> Value {
        let mut state = self.state.lock().unwrap();
        let id = state.new_id();
        let done_at = Instant::now() + Duration::from_millis(state.job_ms);
        state.jobs.insert(
            id.clone(),
            Job {
                done_at,
                outcome: Err((code, text.to_string())),
                on_done: None,
            },
        );
        json!({ "jobid": id })
    }

    fn vm_json(&self, vm: &Vm) -> Value {
        let mut value = self.shapes.vm.clone();
        value["id"] = json!(vm.id);
        value["name"] = json!(format!("VM-{}", vm.id));
        value["displayname"] = json!(vm.display_name);
        value["state"] = json!(vm.state);
        value["nic"][0]["ipaddress"] = json!(vm.address);
        value["tags"] = json!(
            vm.tags
                .iter()
                .map(|(k, v)| json!({"key": k, "value": v, "resourcetype": "UserVm", "resourceid": vm.id}))
                .collect::<Vec<_>>()
        );
        value
    }

    fn job(&self, state: &mut State, result: Value, on_done: Option<JobEffect>) -> Value {
        let id = state.new_id();
        let done_at = Instant::now() + Duration::from_millis(state.job_ms);
        state.jobs.insert(
            id.clone(),
            Job {
                done_at,
                outcome: Ok(result),
                on_done,
            },
        );
        json!({ "jobid": id })
    }

    async fn answer(&self, command: &str, params: &BTreeMap<String, String>) -> (u16, Value) {
        let to_stop = self.state.lock().unwrap().settle();
        if let Some(local) = &self.local {
            for instance in to_stop {
                let _ = local.terminate(&instance).await;
            }
        }
        let param = |name: &str| params.get(name).cloned().unwrap_or_default();
        match command {
            "deployVirtualMachine" => self.deploy(params).await,
            "queryAsyncJobResult" => {
                let state = self.state.lock().unwrap();
                let Some(job) = state.jobs.get(&param("jobid")) else {
                    return (431, self.error(431, "Unable to find the job"));
                };
                let mut answer = self.shapes.job_done.clone();
                answer["jobid"] = json!(param("jobid"));
                match &job.outcome {
                    _ if job.done_at > Instant::now() => {
                        answer["jobstatus"] = json!(0);
                        answer.as_object_mut().unwrap().remove("jobresult");
                    }
                    Ok(result) => {
                        let mut result = result.clone();
                        // A VM's latest state, as the job ends.
                        if let Some(vm) = result
                            .get("virtualmachine")
                            .and_then(|v| v["id"].as_str())
                            .and_then(|id| state.vms.get(id))
                        {
                            result["virtualmachine"] = self.vm_json(vm);
                        }
                        answer["jobresult"] = result;
                    }
                    Err((code, text)) => {
                        answer = self.shapes.job_failed.clone();
                        answer["jobid"] = json!(param("jobid"));
                        answer["jobresult"] = json!({ "errorcode": code, "errortext": text });
                    }
                }
                (200, answer)
            }
            "listVirtualMachines" => {
                let state = self.state.lock().unwrap();
                let tag = (param("tags[0].key"), param("tags[0].value"));
                let keyword = param("keyword");
                let vms: Vec<Value> = state
                    .vms
                    .values()
                    .filter(|vm| vm.state != "Destroyed")
                    .filter(|vm| keyword.is_empty() || vm.display_name.contains(&keyword))
                    .filter(|vm| tag.0.is_empty() || vm.tags.contains(&tag))
                    .map(|vm| self.vm_json(vm))
                    .collect();
                if vms.is_empty() {
                    return (200, json!({}));
                }
                let mut answer = self.shapes.list_vms.clone();
                answer["count"] = json!(vms.len());
                answer["virtualmachine"] = json!(vms);
                (200, answer)
            }
            "createTags" => {
                let mut state = self.state.lock().unwrap();
                let id = param("resourceids");
                let tags: Vec<(String, String)> = (0..)
                    .map_while(|i| {
                        Some((
                            params.get(&format!("tags[{i}].key"))?.clone(),
                            params.get(&format!("tags[{i}].value"))?.clone(),
                        ))
                    })
                    .collect();
                let Some(vm) = state.vms.get_mut(&id) else {
                    return (431, self.error(431, &format!("Unable to find resource by id {id}")));
                };
                vm.tags.extend(tags);
                (200, self.job(&mut state, json!({"success": true}), None))
            }
            "destroyVirtualMachine" => {
                let mut state = self.state.lock().unwrap();
                let id = param("id");
                match state.vms.get_mut(&id) {
                    Some(vm) if vm.state != "Destroyed" => {
                        vm.state = "Stopping";
                        let result = json!({ "virtualmachine": { "id": id } });
                        (
                            200,
                            self.job(&mut state, result, Some(JobEffect::Destroyed(id.clone()))),
                        )
                    }
                    _ => (
                        431,
                        self.error(431, &format!("Unable to find virtual machine by id {id}")),
                    ),
                }
            }
            "assignToLoadBalancerRule" | "removeFromLoadBalancerRule" => {
                let mut state = self.state.lock().unwrap();
                let (rule, vm) = (param("id"), param("virtualmachineids"));
                if !state.vms.contains_key(&vm) {
                    return (
                        431,
                        self.error(431, &format!("Unable to find virtual machine by id {vm}")),
                    );
                }
                let members = state.rules.entry(rule).or_default();
                if command == "assignToLoadBalancerRule" {
                    members.insert(vm);
                } else {
                    members.remove(&vm);
                }
                (200, self.job(&mut state, json!({"success": true}), None))
            }
            "listLoadBalancerRuleInstances" => {
                let state = self.state.lock().unwrap();
                let vms: Vec<Value> = state
                    .rules
                    .get(&param("id"))
                    .into_iter()
                    .flatten()
                    .filter_map(|id| state.vms.get(id))
                    .map(|vm| self.vm_json(vm))
                    .collect();
                let mut answer = self.shapes.lb_instances.clone();
                answer["loadbalancerruleinstance"] = json!(vms);
                (200, answer)
            }
            _ => (
                432,
                self.error(432, &format!("The given command {command} does not exist")),
            ),
        }
    }

    async fn deploy(&self, params: &BTreeMap<String, String>) -> (u16, Value) {
        for required in ["zoneid", "templateid", "serviceofferingid"] {
            if params.get(required).is_none_or(String::is_empty) {
                return (
                    431,
                    self.error(
                        431,
                        &format!(
                            "Unable to execute API command deployvirtualmachine due to missing parameter {required}"
                        ),
                    ),
                );
            }
        }
        let display_name = params.get("displayname").cloned().unwrap_or_default();
        let sent_user_data = params
            .get("userdata")
            .and_then(|u| base64::engine::general_purpose::STANDARD.decode(u).ok())
            .unwrap_or_default();
        let user_data = crate::user_data_text(&sent_user_data);
        let id = self.state.lock().unwrap().new_id();
        // A VM whose agent enrols from its user data, when the fake runs them locally.
        let (address, local) = match (&self.local, ebb_agent::metadata::agent_config_in(&user_data)) {
            (Some(local), Some(agent_config)) => {
                let member_id = display_name.rsplit('.').next().unwrap_or(&display_name).to_string();
                let spec = LaunchSpec {
                    group: "cloudstack".into(),
                    member_id,
                    cluster_id: "fake-cloudstack".into(),
                    launch_id: id.clone(),
                    service_port: 8080,
                    agent_config,
                    user_data: user_data.clone().into_bytes(),
                };
                match local.launch(&spec).await {
                    Ok(instance) => (
                        instance.address.map(|a| a.to_string()).unwrap_or_default(),
                        Some(instance.id),
                    ),
                    Err(e) => return (533, self.error(533, &format!("Insufficient capacity: {e}"))),
                }
            }
            _ => (format!("127.0.12.{}", self.state.lock().unwrap().next_id % 250), None),
        };
        let mut state = self.state.lock().unwrap();
        state.vms.insert(
            id.clone(),
            Vm {
                id: id.clone(),
                display_name,
                state: "Starting",
                address,
                tags: Vec::new(),
                local,
                user_data: sent_user_data,
            },
        );
        let result = json!({ "virtualmachine": { "id": id } });
        let mut answer = self.job(&mut state, result, Some(JobEffect::Running(id.clone())));
        answer["id"] = json!(id);
        (200, answer)
    }
}
