//! Lifecycle hooks (EC2's semantics): a launching member is held out of the load balancer, and a leaving
//! member is kept from termination, until the operator's command for that transition confirms — exit 0
//! continues, any other exit abandons — or its timeout passes and `default_result` applies. Several
//! hooks of one transition run in order; the first to abandon decides. An abandoned launch is
//! terminated (and replaced like any missing member); an abandoned termination still terminates.
//!
//! The command gets `{member_id}`, `{instance_id}`, `{address}`, `{group}` and `{transition}` replaced in
//! its arguments. A hook may instead name an `http://` or `https://` URL: it is sent a POST with the same
//! facts as JSON (retried every 2 s while unreachable); a 2xx answer continues, any other status abandons.
//!
//! Where a member's hooks stand ([`HookWait`]: which hook, until when) is kept with the member in the
//! store. After a restart (or a reload) the hook that was running is run again, since its answer was lost
//! with the collector, but against its original deadline: a wait never starts over, and a hook whose
//! deadline passed while the collector was down takes its default result without running again.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Deserialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::engine::Millis;
pub use crate::model::{HookWait, Transition};

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
    /// An `http://` or `https://` endpoint to POST the member's facts to.
    pub url: Option<String>,
    /// For an `https://` URL: PEM certificates trusted besides the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u32,
    /// What a hook that does not answer in time decides.
    #[serde(default)]
    pub default_result: HookResult,
}

fn default_timeout_secs() -> u32 {
    300
}

/// Whom a transition's hooks run for: the facts a command's arguments and an endpoint's body carry.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub member_id: &'a str,
    pub instance_id: &'a str,
    pub address: Option<std::net::SocketAddr>,
}

struct Run {
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
    /// started here as needed, from where `wait` — the member's saved hook state — says they stand), then
    /// their verdict. Keeps `wait` up to date.
    pub fn check(
        &mut self,
        member: Subject<'_>,
        wait: &mut Option<HookWait>,
        transition: Transition,
        now: Millis,
    ) -> Option<Verdict> {
        let order: Vec<usize> = (0..self.hooks.len())
            .filter(|&i| self.hooks[i].transition == transition)
            .collect();
        let key = (member.member_id.to_string(), transition);
        let current = match *wait {
            Some(current) if current.transition == transition => current,
            _ => {
                let Some(&first) = order.first() else {
                    return Some(self.decided(wait, &key, HookResult::Continue, String::new()));
                };
                self.start(first, 0, member, wait, transition, now + self.timeout_ms(first))
            }
        };
        let position = current.position as usize;
        let Some(&index) = order.get(position) else {
            let why = "lifecycle hooks changed while the member waited; continuing".to_string();
            return Some(self.decided(wait, &key, HookResult::Continue, why));
        };
        let hook = &self.hooks[index];
        let timed_out = || {
            (
                hook.default_result,
                format!("gave no answer in {} s", hook.timeout_secs),
            )
        };
        let (result, how) = match self.running.get_mut(&key) {
            // Held since before a restart or a reload, and out of time.
            None if now >= current.deadline => timed_out(),
            None => {
                self.start(index, position, member, wait, transition, current.deadline);
                return None;
            }
            Some(run) => match run.answer.try_recv() {
                Ok(true) => (HookResult::Continue, "confirmed".to_string()),
                Ok(false) => (HookResult::Abandon, format!("abandoned ({})", run.refusal)),
                Err(oneshot::error::TryRecvError::Empty) if now < current.deadline => return None,
                Err(oneshot::error::TryRecvError::Empty) => {
                    run.task.abort();
                    timed_out()
                }
                Err(oneshot::error::TryRecvError::Closed) => (hook.default_result, "could not run".to_string()),
            },
        };
        let why = format!("lifecycle hook {} {how}", hook.name);
        match order.get(position + 1) {
            Some(&next) if result == HookResult::Continue => {
                self.start(
                    next,
                    position + 1,
                    member,
                    wait,
                    transition,
                    now + self.timeout_ms(next),
                );
                None
            }
            _ => Some(self.decided(wait, &key, result, why)),
        }
    }

    fn decided(
        &mut self,
        wait: &mut Option<HookWait>,
        key: &(String, Transition),
        result: HookResult,
        why: String,
    ) -> Verdict {
        if let Some(run) = self.running.remove(key) {
            run.task.abort();
        }
        *wait = None;
        Verdict { result, why }
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

    fn timeout_ms(&self, index: usize) -> Millis {
        Millis::from(self.hooks[index].timeout_secs) * 1000
    }

    /// Starts the hook `index`, the `position`-th of `transition`, for `member`, and records the wait.
    fn start(
        &mut self,
        index: usize,
        position: usize,
        member: Subject<'_>,
        wait: &mut Option<HookWait>,
        transition: Transition,
        deadline: Millis,
    ) -> HookWait {
        let hook = &self.hooks[index];
        let (reply, answer) = oneshot::channel();
        let name = hook.name.clone();
        let address = member.address.map(|a| a.to_string()).unwrap_or_default();
        let (task, refusal) = if let Some(url) = hook.url.clone() {
            let body = serde_json::json!({
                "group": self.group,
                "member_id": member.member_id,
                "instance_id": member.instance_id,
                "address": address,
                "transition": transition.name(),
                "hook": hook.name,
            });
            let client = crate::http::client(hook.ca_file.as_deref());
            let task = tokio::spawn(async move {
                let client = match client {
                    Ok(client) => client,
                    Err(e) => return tracing::warn!(hook = %name, error = %e, "Cannot run a lifecycle hook."),
                };
                loop {
                    match client.post(&url).json(&body).send().await {
                        Ok(response) => {
                            let _ = reply.send(response.status().is_success());
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(hook = %name, url = %url, error = %e, "Cannot reach a lifecycle hook; retrying.");
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                        }
                    }
                }
            });
            (task, "non-2xx answer")
        } else {
            let argv: Vec<String> = hook
                .command
                .iter()
                .map(|arg| {
                    arg.replace("{member_id}", member.member_id)
                        .replace("{instance_id}", member.instance_id)
                        .replace("{address}", &address)
                        .replace("{group}", &self.group)
                        .replace("{transition}", transition.name())
                })
                .collect();
            let task = tokio::spawn(async move {
                let Some((program, args)) = argv.split_first() else {
                    return;
                };
                let spawned = tokio::process::Command::new(program)
                    .args(args)
                    .stdin(std::process::Stdio::null())
                    .process_group(0)
                    .spawn();
                let mut child = match spawned {
                    Ok(child) => child,
                    Err(e) => return tracing::warn!(hook = %name, error = %e, "Cannot run a lifecycle hook."),
                };
                // A hook cut short (timed out, or its member gone) is killed with everything it started.
                let group = child.id().map(|pid| KillGroupOnDrop(pid as i32));
                let status = child.wait().await;
                std::mem::forget(group);
                match status {
                    Ok(status) => {
                        let _ = reply.send(status.success());
                    }
                    Err(e) => tracing::warn!(hook = %name, error = %e, "Cannot run a lifecycle hook."),
                }
            });
            (task, "non-zero exit")
        };
        let started = HookWait {
            transition,
            position: position as u32,
            deadline,
        };
        *wait = Some(started);
        if let Some(old) = self.running.insert(
            (member.member_id.to_string(), transition),
            Run { answer, task, refusal },
        ) {
            old.task.abort();
        }
        started
    }
}

struct KillGroupOnDrop(i32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.0), nix::sys::signal::Signal::SIGKILL);
    }
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
    use crate::model::Member;

    impl Hooks {
        /// `check` for a whole member.
        fn check_member(&mut self, member: &mut Member, transition: Transition, now: Millis) -> Option<Verdict> {
            let subject = Subject {
                member_id: &member.id,
                instance_id: &member.instance_id,
                address: member.address,
            };
            self.check(subject, &mut member.hook, transition, now)
        }
    }

    fn hook(name: &str, transition: Transition, script: &str, default_result: HookResult) -> HookConfig {
        HookConfig {
            name: name.into(),
            transition,
            url: None,
            ca_file: None,
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs: 5,
            default_result,
        }
    }

    fn http(name: &str, url: &str, ca_file: Option<PathBuf>) -> HookConfig {
        HookConfig {
            command: Vec::new(),
            url: Some(url.into()),
            ca_file,
            ..hook(name, Transition::Launching, "", HookResult::Abandon)
        }
    }

    fn member() -> Member {
        Member::pending("web-3", "i-3", Some("10.0.0.3:80".parse().unwrap()), 0)
    }

    /// Checks until the hooks answer (bounded).
    async fn answer(hooks: &mut Hooks, member: &mut Member, transition: Transition, now: Millis) -> Verdict {
        for _ in 0..200 {
            if let Some(verdict) = hooks.check_member(member, transition, now) {
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
        let mut member = member();
        let verdict = answer(&mut hooks, &mut member, Transition::Launching, 0).await;
        assert_eq!(verdict.result, HookResult::Abandon);
        assert_eq!(verdict.why, "lifecycle hook cmdb abandoned (non-zero exit)");
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "launching web-3 10.0.0.3:80\n");
        assert_eq!(member.hook, None, "decided: nothing holds the member");
        // No hooks for terminating: it continues at once.
        assert_eq!(
            hooks
                .check_member(&mut member, Transition::Terminating, 0)
                .unwrap()
                .result,
            HookResult::Continue
        );
    }

    /// An endpoint that answers each request with the next status, recording the requests whole.
    async fn endpoint(
        statuses: Vec<u16>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
        async fn exchange(mut stream: impl AsyncRead + AsyncWrite + Unpin, status: u16) -> String {
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then as many bytes as Content-Length says.
            loop {
                let n = stream.read(&mut chunk).await.unwrap();
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= length || n == 0 {
                        break;
                    }
                }
            }
            let response = format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            stream.write_all(response.as_bytes()).await.unwrap();
            stream.shutdown().await.unwrap();
            String::from_utf8_lossy(&request).to_string()
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            let mut statuses = statuses.into_iter();
            while let Ok((stream, _)) = listener.accept().await {
                let request = match &tls {
                    // A client that does not trust the certificate gives up in the handshake.
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => exchange(stream, statuses.next().unwrap()).await,
                        Err(_) => continue,
                    },
                    None => exchange(stream, statuses.next().unwrap()).await,
                };
                seen.lock().unwrap().push(request);
            }
        });
        (address, requests)
    }

    #[tokio::test]
    async fn an_http_hook_continues_on_2xx_and_abandons_otherwise() {
        let (address, requests) = endpoint(vec![204, 409], None).await;
        let url = format!("http://{address}/hooks/ebb");
        let mut hooks = Hooks::new("web", vec![http("first", &url, None), http("second", &url, None)]);
        let verdict = answer(&mut hooks, &mut member(), Transition::Launching, 0).await;
        assert_eq!(verdict.why, "lifecycle hook second abandoned (non-2xx answer)");
        let requests = requests.lock().unwrap();
        assert!(requests[0].starts_with("POST /hooks/ebb HTTP/1.1"), "{}", requests[0]);
        assert!(
            requests[0].contains(r#""member_id":"web-3""#) && requests[0].contains(r#""transition":"launching""#),
            "{}",
            requests[0]
        );
    }

    #[tokio::test]
    async fn an_https_hook_trusts_the_ca_it_is_given_and_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let pki =
            crate::pki::Pki::load_or_create(dir.path(), &["127.0.0.1".into()], std::time::Duration::from_secs(3600))
                .unwrap();
        // The collector's own TLS settings, speaking HTTP/1.1 instead of gRPC's HTTP/2.
        let mut tls = (*crate::tls::server_config(pki.server_chain_pem(), pki.server_key_pem()).unwrap()).clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let (address, requests) = endpoint(vec![200], Some(std::sync::Arc::new(tls).into())).await;
        let url = format!("https://{address}/hooks/ebb");
        let ca_file = dir.path().join("hook-ca.pem");
        std::fs::write(&ca_file, pki.ca_pem()).unwrap();

        // Without the CA the endpoint cannot be trusted, so it never answers: the default result.
        let mut untrusting = Hooks::new("web", vec![http("private", &url, None)]);
        let mut member = member();
        assert!(untrusting.check_member(&mut member, Transition::Launching, 0).is_none());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let verdict = untrusting
            .check_member(&mut member, Transition::Launching, 5_000)
            .unwrap();
        assert_eq!(verdict.why, "lifecycle hook private gave no answer in 5 s");
        assert!(requests.lock().unwrap().is_empty());

        let mut hooks = Hooks::new("web", vec![http("private", &url, Some(ca_file))]);
        let verdict = answer(&mut hooks, &mut member, Transition::Launching, 0).await;
        assert_eq!(verdict.why, "lifecycle hook private confirmed");
        assert!(requests.lock().unwrap()[0].contains(r#""hook":"private""#));
    }

    #[tokio::test]
    async fn a_hook_that_never_answers_takes_its_default_result() {
        let mut hooks = Hooks::new(
            "web",
            vec![hook("slow", Transition::Terminating, "sleep 30", HookResult::Abandon)],
        );
        let mut member = member();
        assert!(
            hooks.check_member(&mut member, Transition::Terminating, 0).is_none(),
            "started, waiting"
        );
        assert!(
            hooks
                .check_member(&mut member, Transition::Terminating, 4_000)
                .is_none(),
            "before its timeout"
        );
        let verdict = hooks.check_member(&mut member, Transition::Terminating, 5_000).unwrap();
        assert_eq!(verdict.result, HookResult::Abandon);
        assert_eq!(verdict.why, "lifecycle hook slow gave no answer in 5 s");
    }

    #[tokio::test]
    async fn a_restart_runs_the_waiting_hook_again_against_its_first_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let script = format!("echo ran >> {}; sleep 30", log.display());
        let config = vec![
            hook("first", Transition::Terminating, "exit 0", HookResult::Continue),
            hook("slow", Transition::Terminating, &script, HookResult::Abandon),
        ];
        let runs = || std::fs::read_to_string(&log).unwrap_or_default().lines().count();
        let mut member = member();
        let mut hooks = Hooks::new("web", config.clone());
        // The first confirms at 1 s; the second starts then, with 5 s to answer.
        assert!(hooks.check_member(&mut member, Transition::Terminating, 0).is_none());
        for _ in 0..200 {
            if runs() == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            assert!(
                hooks
                    .check_member(&mut member, Transition::Terminating, 1_000)
                    .is_none()
            );
        }
        let expected = HookWait {
            transition: Transition::Terminating,
            position: 1,
            deadline: 6_000,
        };
        assert_eq!(member.hook, Some(expected));
        drop(hooks);

        // The collector restarts at 3 s with the member as the store kept it: the slow hook runs again
        // (its answer was lost), still due at 6 s.
        let mut restarted = Hooks::new("web", config.clone());
        assert!(
            restarted
                .check_member(&mut member, Transition::Terminating, 3_000)
                .is_none()
        );
        assert_eq!(member.hook, Some(expected), "the wait does not start over");
        for _ in 0..200 {
            if runs() == 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(runs(), 2, "ran again after the restart");
        assert!(
            restarted
                .check_member(&mut member, Transition::Terminating, 5_999)
                .is_none()
        );
        let verdict = restarted
            .check_member(&mut member, Transition::Terminating, 6_000)
            .unwrap();
        assert_eq!(verdict.why, "lifecycle hook slow gave no answer in 5 s");
        drop(restarted);

        // Down past the deadline: the default result at once, without running the hook a third time.
        member.hook = Some(expected);
        let mut late = Hooks::new("web", config);
        let verdict = late.check_member(&mut member, Transition::Terminating, 60_000).unwrap();
        assert_eq!(verdict.result, HookResult::Abandon);
        assert_eq!(member.hook, None);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert_eq!(runs(), 2);
    }
}
