//! An in-memory provider for tests, driven through a [`FakeProvider`] handle: inject failures and latency,
//! make instances die, and see every call that was made.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{CloudError, Instance, InstanceState, LaunchSpec, Provider};

pub mod dir;

#[derive(Debug, Default)]
struct State {
    instances: Vec<Instance>,
    launched: u32,
    /// Errors the next launches return, in order.
    launch_failures: Vec<CloudError>,
    /// Errors the next terminations return, in order.
    terminate_failures: Vec<CloudError>,
    latency: Duration,
    calls: Vec<String>,
    launches_in_flight: u32,
    most_launches_in_flight: u32,
    describes: u32,
}

#[derive(Debug, Clone, Default)]
pub struct FakeProvider {
    state: Arc<Mutex<State>>,
}

impl FakeProvider {
    /// The next launch fails with `error`.
    pub fn fail_next_launch(&self, error: CloudError) {
        self.state.lock().unwrap().launch_failures.push(error);
    }

    /// The next termination fails with `error`.
    pub fn fail_next_terminate(&self, error: CloudError) {
        self.state.lock().unwrap().terminate_failures.push(error);
    }

    /// Every call waits this long.
    pub fn set_latency(&self, latency: Duration) {
        self.state.lock().unwrap().latency = latency;
    }

    /// The instance of `member_id` dies on its own.
    pub fn kill(&self, member_id: &str, reason: &str) {
        let mut state = self.state.lock().unwrap();
        for instance in state.instances.iter_mut().filter(|i| i.member_id == member_id) {
            instance.state = InstanceState::Terminated { reason: reason.into() };
        }
    }

    /// Members with a running instance.
    pub fn running(&self) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .instances
            .iter()
            .filter(|i| i.state == InstanceState::Running)
            .map(|i| i.member_id.clone())
            .collect()
    }

    /// How many times the instances were described.
    pub fn describes(&self) -> u32 {
        self.state.lock().unwrap().describes
    }

    /// The most launch calls that were in flight at once.
    pub fn most_launches_in_flight(&self) -> u32 {
        self.state.lock().unwrap().most_launches_in_flight
    }

    /// `launch web-1`, `terminate fake-1`, ... in order.
    pub fn calls(&self) -> Vec<String> {
        self.state.lock().unwrap().calls.clone()
    }

    async fn delay(&self) {
        let latency = self.state.lock().unwrap().latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
    }
}

#[async_trait]
impl Provider for FakeProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, CloudError> {
        {
            let mut state = self.state.lock().unwrap();
            state.launches_in_flight += 1;
            state.most_launches_in_flight = state.most_launches_in_flight.max(state.launches_in_flight);
        }
        self.delay().await;
        let mut state = self.state.lock().unwrap();
        state.launches_in_flight -= 1;
        state.calls.push(format!("launch {}", spec.member_id));
        if !state.launch_failures.is_empty() {
            return Err(state.launch_failures.remove(0));
        }
        state.launched += 1;
        let instance = Instance {
            id: format!("fake-{}", state.launched),
            member_id: spec.member_id.clone(),
            address: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, state.launched as u8))),
            state: InstanceState::Running,
        };
        state.instances.push(instance.clone());
        Ok(instance)
    }

    async fn describe(&self, ids: &[String]) -> Result<Vec<InstanceState>, CloudError> {
        self.delay().await;
        let mut state = self.state.lock().unwrap();
        state.describes += 1;
        Ok(ids
            .iter()
            .map(|id| {
                state
                    .instances
                    .iter()
                    .find(|i| &i.id == id)
                    .map(|i| i.state.clone())
                    .unwrap_or(InstanceState::Terminated {
                        reason: "unknown instance".into(),
                    })
            })
            .collect())
    }

    async fn terminate(&self, id: &str) -> Result<(), CloudError> {
        self.delay().await;
        let mut state = self.state.lock().unwrap();
        state.calls.push(format!("terminate {id}"));
        if !state.terminate_failures.is_empty() {
            return Err(state.terminate_failures.remove(0));
        }
        for instance in state.instances.iter_mut().filter(|i| i.id == id) {
            instance.state = InstanceState::Terminated {
                reason: "terminated by ebb".into(),
            };
        }
        Ok(())
    }

    async fn list(&self, _group: &str) -> Result<Vec<Instance>, CloudError> {
        Ok(self.state.lock().unwrap().instances.clone())
    }
}
