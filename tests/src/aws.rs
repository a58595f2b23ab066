//! moto's EC2/ELBv2 emulator for the tests, behind a fault-injecting proxy. moto checks no signature and
//! makes instances `running` and targets `healthy` at once, so the proxy adds what it lacks: AWS error
//! answers (throttling, no capacity) and slow answers for chosen actions, a record of every action, and —
//! with a [`LocalProvider`] — a local instance for each instance moto launches, whose agent enrols from the
//! UserData, stopped when moto's instance is terminated. The proxy then plays the network too: in moto's
//! answers an instance's private address becomes its stand-in's loopback address, so nothing ever tries
//! to reach moto's made-up 10.x addresses.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use ebb_collector::providers::local::LocalProvider;
use ebb_collector::providers::{LaunchSpec, Provider};
use tokio::io::AsyncWriteExt;

use crate::http::{Background, Handler, form, read_request, relay};
use crate::{Running, free_port, test_tool};

#[derive(Debug, Clone)]
pub enum Fault {
    /// An AWS error answer: HTTP status, code, message.
    Error(u16, String, String),
    /// The answer comes this much later.
    Slow(Duration),
}

#[derive(Default)]
struct State {
    faults: BTreeMap<String, VecDeque<Fault>>,
    /// `Action` or `Action SubnetId` per call.
    calls: Vec<String>,
    /// moto's instance id → the local instance standing in for it, and its address.
    local: BTreeMap<String, (String, std::net::IpAddr)>,
    /// moto's private address → the stand-in's loopback address, for rewriting moto's answers.
    addresses: BTreeMap<String, String>,
}

pub struct Moto {
    /// The proxy's URL, for `endpoint_url`.
    pub endpoint: String,
    moto_address: SocketAddr,
    state: Arc<Mutex<State>>,
    _server: Background,
    _moto: Running,
}

impl Moto {
    /// Starts moto on a free loopback port and the proxy in front of it.
    pub fn start(local: Option<LocalProvider>) -> Self {
        let port = free_port();
        let moto_address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let moto = Running::spawn(
            std::process::Command::new(test_tool("moto_server"))
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null()),
        );
        let started = Instant::now();
        while std::net::TcpStream::connect(moto_address).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto_server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let state = Arc::new(Mutex::new(State::default()));
        let local = local.map(Arc::new);
        let proxy = Arc::new(Proxy {
            moto: moto_address,
            state: state.clone(),
            local: local.clone(),
        });
        let handler: Handler = Arc::new(move |stream| {
            let proxy = proxy.clone();
            Box::pin(async move { proxy.serve(stream).await })
        });
        let server = Background::start(handler, local);
        Self {
            endpoint: format!("http://{}/", server.address),
            moto_address,
            state,
            _server: server,
            _moto: moto,
        }
    }

    /// moto back to empty, and the proxy's record and faults with it.
    pub fn reset(&self) {
        let mut stream = std::net::TcpStream::connect(self.moto_address).unwrap();
        std::io::Write::write_all(
            &mut stream,
            b"POST /moto-api/reset HTTP/1.1\r\nHost: moto\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        let mut answer = String::new();
        std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
        assert!(answer.contains("200"), "{answer}");
        let mut state = self.state.lock().unwrap();
        state.faults.clear();
        state.calls.clear();
    }

    pub fn fail_next(&self, action: &str, fault: Fault) {
        let mut state = self.state.lock().unwrap();
        state.faults.entry(action.to_string()).or_default().push_back(fault);
    }

    /// Every action called so far, in order (`RunInstances` with its subnet: `RunInstances subnet-…`).
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    /// The addresses of the local instances standing in for moto's running instances.
    pub fn stand_ins(&self) -> Vec<std::net::IpAddr> {
        self.state
            .lock()
            .unwrap()
            .local
            .values()
            .map(|(_, address)| *address)
            .collect()
    }
}

impl Drop for Moto {
    /// moto_server takes its time over SIGTERM.
    fn drop(&mut self) {
        self._moto.terminate(Duration::from_millis(500));
    }
}

struct Proxy {
    moto: SocketAddr,
    state: Arc<Mutex<State>>,
    local: Option<Arc<LocalProvider>>,
}

/// The text of the first `<name>…</name>` in `xml`.
pub fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let start = xml.find(&format!("<{name}>"))? + name.len() + 2;
    let end = start + xml[start..].find(&format!("</{name}>"))?;
    Some(&xml[start..end])
}

impl Proxy {
    async fn serve(&self, mut stream: tokio::net::TcpStream) {
        let Some(request) = read_request(&mut stream).await else {
            return;
        };
        let params = form(&request.body);
        let action = params.get("Action").cloned().unwrap_or_default();
        let fault = {
            let mut state = self.state.lock().unwrap();
            let call = match params.get("SubnetId") {
                Some(subnet) => format!("{action} {subnet}"),
                None => action.clone(),
            };
            state.calls.push(call);
            state.faults.get_mut(&action).and_then(VecDeque::pop_front)
        };
        match fault {
            Some(Fault::Error(status, code, message)) => {
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>fault</RequestID></Response>"
                );
                let _ = write(&mut stream, status, body.as_bytes()).await;
                return;
            }
            Some(Fault::Slow(delay)) => tokio::time::sleep(delay).await,
            None => {}
        }
        let Some((status, answer)) = relay(self.moto, &request).await else {
            return;
        };
        let split = answer
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map_or(answer.len(), |p| p + 4);
        let body = &answer[split..];
        if status == 200 {
            self.stand_in(&action, &params, body).await;
        }
        let mut body = String::from_utf8_lossy(body).into_owned();
        for (moto_ip, loopback) in &self.state.lock().unwrap().addresses {
            body = body.replace(&format!(">{moto_ip}<"), &format!(">{loopback}<"));
        }
        let _ = write(&mut stream, status, body.as_bytes()).await;
    }

    /// Boots (or stops) the local instance standing in for moto's.
    async fn stand_in(&self, action: &str, params: &BTreeMap<String, String>, body: &[u8]) {
        let Some(local) = &self.local else { return };
        let xml = String::from_utf8_lossy(body);
        match action {
            "RunInstances" => {
                let Some(instance_id) = element(&xml, "instanceId").map(str::to_string) else {
                    return;
                };
                let user_data = params
                    .get("UserData")
                    .and_then(|u| base64::engine::general_purpose::STANDARD.decode(u).ok())
                    .map(|u| crate::user_data_text(&u))
                    .unwrap_or_default();
                let member_id = (1..)
                    .map_while(|i| {
                        let key = params.get(&format!("TagSpecification.1.Tag.{i}.Key"))?;
                        Some((
                            key.clone(),
                            params.get(&format!("TagSpecification.1.Tag.{i}.Value"))?.clone(),
                        ))
                    })
                    .find(|(k, _)| k == "ebb-member")
                    .map(|(_, v)| v)
                    .unwrap_or_else(|| instance_id.clone());
                if self.state.lock().unwrap().local.contains_key(&instance_id) {
                    return;
                }
                let Some(agent_config) = ebb_agent::metadata::agent_config_in(&user_data) else {
                    return;
                };
                let spec = LaunchSpec {
                    group: "aws".into(),
                    member_id,
                    cluster_id: "moto".into(),
                    launch_id: instance_id.clone(),
                    service_port: 8080,
                    agent_config,
                    user_data: user_data.into_bytes(),
                };
                if let Ok(instance) = local.launch(&spec).await
                    && let Some(address) = instance.address
                {
                    let mut state = self.state.lock().unwrap();
                    if let Some(moto_ip) = element(&xml, "privateIpAddress") {
                        state.addresses.insert(moto_ip.to_string(), address.to_string());
                    }
                    state.local.insert(instance_id, (instance.id, address));
                }
            }
            "TerminateInstances" => {
                let Some(id) = params.get("InstanceId.1") else { return };
                let stand_in = self.state.lock().unwrap().local.remove(id);
                if let Some((stand_in, _)) = stand_in {
                    let _ = local.terminate(&stand_in).await;
                }
            }
            _ => {}
        }
    }
}

async fn write(stream: &mut tokio::net::TcpStream, status: u16, body: &[u8]) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
