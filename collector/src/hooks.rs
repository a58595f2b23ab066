//! Lifecycle hooks (EC2's semantics): a launching member is held out of the load balancer, and a leaving
//! member is kept from termination, until the operator's command for that transition confirms — exit 0
//! continues, any other exit abandons — or its timeout passes and `default_result` applies. Several
//! hooks of one transition run in order; the first to abandon decides. An abandoned launch is
//! terminated (and replaced like any missing member); an abandoned termination still terminates.
//!
//! The command gets `{member_id}`, `{instance_id}`, `{address}`, `{group}` and `{transition}` replaced in
//! its arguments. A hook may instead name an `http://` URL: it is sent a POST with the same facts as JSON
//! (retried every 2 s while unreachable); a 2xx answer continues, any other status abandons. A restart of
//! the collector runs a member's hooks again.

use std::collections::HashMap;

use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::engine::Millis;
use crate::reconcile::Member;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transition {
    Launching,
    Terminating,
}

impl Transition {
    fn name(self) -> &'static str {
        match self {
            Transition::Launching => "launching",
            Transition::Terminating => "terminating",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HookResult {
    #[default]
    Continue,
    Abandon,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    pub name: String,
    pub transition: Transition,
    /// argv; placeholders as in the module's documentation. Either this or `url`.
    #[serde(default)]
    pub command: Vec<String>,
    /// An `http://` endpoint to POST the member's facts to.
    pub url: Option<String>,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u32,
    /// What a hook that does not answer in time decides.
    #[serde(default)]
    pub default_result: HookResult,
}

fn default_timeout_secs() -> u32 {
    300
}

struct Run {
    /// Which of the transition's hooks is running.
    position: usize,
    deadline: Millis,
    answer: oneshot::Receiver<bool>,
    task: JoinHandle<()>,
    /// How a refusal reads: a command's non-zero exit, an endpoint's non-2xx answer.
    refusal: &'static str,
}

/// A group's hooks and the runs under way.
pub struct Hooks {
    hooks: Vec<HookConfig>,
    group: String,
    running: HashMap<(String, Transition), Run>,
}

/// A transition's hooks have answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub result: HookResult,
    /// Which hook decided and how, for the activity log; empty when the transition has no hooks.
    pub why: String,
}

impl Hooks {
    pub fn new(group: &str, hooks: Vec<HookConfig>) -> Self {
        Self {
            hooks,
            group: group.to_string(),
            running: HashMap::new(),
        }
    }

    /// Whether `member` may go through `transition`: `None` while its hooks are still running (they are
    /// started here as needed), then their verdict.
    pub fn check(&mut self, member: &Member, transition: Transition, now: Millis) -> Option<Verdict> {
        let order: Vec<usize> = (0..self.hooks.len())
            .filter(|&i| self.hooks[i].transition == transition)
            .collect();
        if order.is_empty() {
            return Some(Verdict {
                result: HookResult::Continue,
                why: String::new(),
            });
        }
        let key = (member.id.clone(), transition);
        let Some(run) = self.running.get_mut(&key) else {
            let run = self.start(order[0], 0, member, transition, now);
            self.running.insert(key, run);
            return None;
        };
        let hook = &self.hooks[order[run.position]];
        let (result, how) = match run.answer.try_recv() {
            Ok(true) => (HookResult::Continue, "confirmed".to_string()),
            Ok(false) => (HookResult::Abandon, format!("abandoned ({})", run.refusal)),
            Err(oneshot::error::TryRecvError::Empty) if now < run.deadline => return None,
            Err(oneshot::error::TryRecvError::Empty) => {
                run.task.abort();
                (
                    hook.default_result,
                    format!("gave no answer in {} s", hook.timeout_secs),
                )
            }
            Err(oneshot::error::TryRecvError::Closed) => (hook.default_result, "could not run".to_string()),
        };
        let why = format!("lifecycle hook {} {how}", hook.name);
        let next = run.position + 1;
        if result == HookResult::Continue && next < order.len() {
            let run = self.start(order[next], next, member, transition, now);
            self.running.insert(key, run);
            return None;
        }
        self.running.remove(&key);
        Some(Verdict { result, why })
    }

    /// Stops every run for `member` (it left the group some other way).
    pub fn forget(&mut self, member_id: &str) {
        self.running.retain(|(id, _), run| {
            if id == member_id {
                run.task.abort();
            }
            id != member_id
        });
    }

    fn start(&self, index: usize, position: usize, member: &Member, transition: Transition, now: Millis) -> Run {
        let hook = &self.hooks[index];
        let argv: Vec<String> = hook
            .command
            .iter()
            .map(|arg| {
                arg.replace("{member_id}", &member.id)
                    .replace("{instance_id}", &member.instance_id)
                    .replace("{address}", &member.address.map(|a| a.to_string()).unwrap_or_default())
                    .replace("{group}", &self.group)
                    .replace("{transition}", transition.name())
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let name = hook.name.clone();
        if let Some(url) = hook.url.clone() {
            let body = serde_json::json!({
                "group": self.group,
                "member_id": member.id,
                "instance_id": member.instance_id,
                "address": member.address.map(|a| a.to_string()).unwrap_or_default(),
                "transition": transition.name(),
                "hook": hook.name,
            })
            .to_string();
            let task = tokio::spawn(async move {
                loop {
                    match post(&url, &body).await {
                        Ok(status) => {
                            let _ = reply.send((200..300).contains(&status));
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(hook = %name, url = %url, error = %e, "Cannot reach a lifecycle hook; retrying.");
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                    }
                }
            });
            return Run {
                position,
                deadline: now + Millis::from(hook.timeout_secs) * 1000,
                answer,
                task,
                refusal: "non-2xx answer",
            };
        }
        let task = tokio::spawn(async move {
            let Some((program, args)) = argv.split_first() else {
                return;
            };
            let status = tokio::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .kill_on_drop(true)
                .status()
                .await;
            match status {
                Ok(status) => {
                    let _ = reply.send(status.success());
                }
                Err(e) => tracing::warn!(hook = %name, error = %e, "Cannot run a lifecycle hook."),
            }
        });
        Run {
            position,
            deadline: now + Millis::from(hook.timeout_secs) * 1000,
            answer,
            task,
            refusal: "non-zero exit",
        }
    }
}

/// POSTs `body` as JSON to an `http://host:port/path` URL; the response's status code.
async fn post(url: &str, body: &str) -> std::io::Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("only http:// URLs"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_string()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() > 8192 {
            return Err(invalid("no HTTP status line"));
        }
        head.extend_from_slice(&chunk[..n]);
    }
    // "HTTP/1.1 200 OK"
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no HTTP status code"))
}

impl Drop for Hooks {
    fn drop(&mut self) {
        for run in self.running.values() {
            run.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(name: &str, transition: Transition, script: &str, default_result: HookResult) -> HookConfig {
        HookConfig {
            name: name.into(),
            transition,
            url: None,
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs: 5,
            default_result,
        }
    }

    fn member() -> Member {
        Member::pending("web-3", "i-3", Some("10.0.0.3:80".parse().unwrap()), 0)
    }

    /// Checks until the hooks answer (bounded).
    async fn answer(hooks: &mut Hooks, transition: Transition, now: Millis) -> Verdict {
        for _ in 0..200 {
            if let Some(verdict) = hooks.check(&member(), transition, now) {
                return verdict;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("no answer within 4 s")
    }

    #[tokio::test]
    async fn hooks_run_in_order_with_placeholders_and_the_first_abandon_decides() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let record = format!("echo {{transition}} {{member_id}} {{address}} >> {}", log.display());
        let mut hooks = Hooks::new(
            "web",
            vec![
                hook("dns", Transition::Launching, &record, HookResult::Abandon),
                hook("cmdb", Transition::Launching, "exit 3", HookResult::Continue),
                hook("never", Transition::Launching, "exit 0", HookResult::Continue),
            ],
        );
        let verdict = answer(&mut hooks, Transition::Launching, 0).await;
        assert_eq!(verdict.result, HookResult::Abandon);
        assert_eq!(verdict.why, "lifecycle hook cmdb abandoned (non-zero exit)");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "launching web-3 10.0.0.3:80\n");
        // No hooks for terminating: it continues at once.
        assert_eq!(
            hooks.check(&member(), Transition::Terminating, 0).unwrap().result,
            HookResult::Continue
        );
    }

    /// An endpoint that answers each request with the next status, recording the bodies.
    async fn endpoint(statuses: Vec<u16>) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hooks/ebb", listener.local_addr().unwrap());
        let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = bodies.clone();
        tokio::spawn(async move {
            for status in statuses {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 4096];
                let n = stream.read(&mut request).await.unwrap();
                seen.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&request[..n]).to_string());
                let response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                stream.write_all(response.as_bytes()).await.unwrap();
            }
        });
        (url, bodies)
    }

    #[tokio::test]
    async fn an_http_hook_continues_on_2xx_and_abandons_otherwise() {
        let (url, bodies) = endpoint(vec![204, 409]).await;
        let http = |name: &str| HookConfig {
            name: name.into(),
            transition: Transition::Launching,
            command: Vec::new(),
            url: Some(url.clone()),
            timeout_secs: 5,
            default_result: HookResult::Continue,
        };
        let mut hooks = Hooks::new("web", vec![http("first"), http("second")]);
        let verdict = answer(&mut hooks, Transition::Launching, 0).await;
        assert_eq!(verdict.why, "lifecycle hook second abandoned (non-2xx answer)");
        let bodies = bodies.lock().unwrap();
        assert!(bodies[0].starts_with("POST /hooks/ebb HTTP/1.1"), "{}", bodies[0]);
        assert!(bodies[0].contains(r#""member_id":"web-3""#) && bodies[0].contains(r#""transition":"launching""#));
    }

    #[tokio::test]
    async fn a_hook_that_never_answers_takes_its_default_result() {
        let mut hooks = Hooks::new(
            "web",
            vec![hook("slow", Transition::Terminating, "sleep 30", HookResult::Abandon)],
        );
        assert!(
            hooks.check(&member(), Transition::Terminating, 0).is_none(),
            "started, waiting"
        );
        assert!(
            hooks.check(&member(), Transition::Terminating, 4_000).is_none(),
            "before its timeout"
        );
        let verdict = hooks.check(&member(), Transition::Terminating, 5_000).unwrap();
        assert_eq!(verdict.result, HookResult::Abandon);
        assert_eq!(verdict.why, "lifecycle hook slow gave no answer in 5 s");
    }
}
