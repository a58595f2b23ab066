//! An in-memory load balancer for tests: records registrations, can be told to fail.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Backend, LoadBalancer, Registration};
use crate::providers::CloudError;

#[derive(Debug, Default)]
struct State {
    backends: Vec<Backend>,
    fail_next: Option<CloudError>,
    calls: Vec<String>,
    deregistration_delay_secs: u32,
}

#[derive(Debug, Clone, Default)]
pub struct FakeLoadBalancer {
    state: Arc<Mutex<State>>,
}

impl FakeLoadBalancer {
    /// The next call fails with `error`.
    pub fn fail_next(&self, error: CloudError) {
        self.state.lock().unwrap().fail_next = Some(error);
    }

    /// As an ELBv2 target group's `deregistration_delay.timeout_seconds`.
    pub fn set_deregistration_delay_secs(&self, secs: u32) {
        self.state.lock().unwrap().deregistration_delay_secs = secs;
    }

    /// Registered member ids, in registration order.
    pub fn registered(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .backends
            .iter()
            .map(|b| b.member_id.clone())
            .collect()
    }

    /// `register web-1`, `deregister web-1`, ... in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }
}

#[async_trait]
impl LoadBalancer for FakeLoadBalancer {
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("register {}", member.member_id));
        if let Some(error) = state.fail_next.take() {
            return Err(error);
        }
        if !state.backends.iter().any(|b| b.member_id == member.member_id) {
            state.backends.push(Backend {
                member_id: member.member_id.to_string(),
                instance_id: member.instance_id.to_string(),
                address: member.address,
                connections: 0,
            });
        }
        Ok(())
    }

    async fn deregister(&self, member_id: &str, _instance_id: &str) -> Result<(), CloudError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("deregister {member_id}"));
        if let Some(error) = state.fail_next.take() {
            return Err(error);
        }
        state.backends.retain(|b| b.member_id != member_id);
        Ok(())
    }

    async fn members(&self) -> Result<Vec<Backend>, CloudError> {
        Ok(self.state.lock().unwrap().backends.clone())
    }

    fn deregistration_delay_secs(&self) -> u32 {
        self.state.lock().unwrap().deregistration_delay_secs
    }
}
