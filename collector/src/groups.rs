//! The running groups: each one's controller task, its handle and its built-in load balancer's front. The
//! groups of the file are started by `serve`; a group the file gains is started by `reload`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::StartError;
use crate::config::{GroupConfig, ServerConfig};
use crate::lb::LoadBalancer;
use crate::providers::{CloudError, Provider};
use crate::reconcile::{Dependencies, GroupController, GroupHandle, Services};

/// What every group's controller is given besides its own provider and load balancer.
pub struct Shared {
    pub server: ServerConfig,
    pub grpc_address: SocketAddr,
    pub services: Services,
    /// Fires when the collector shuts down; every controller stops then.
    pub stop: watch::Receiver<bool>,
}

#[derive(Clone)]
struct RunningGroup {
    handle: GroupHandle,
    /// The built-in load balancer's front address, for a group that has one.
    front: Option<SocketAddr>,
}

/// The running groups, shared by the gRPC services, reload and shutdown.
pub struct Groups {
    shared: Shared,
    running: RwLock<BTreeMap<String, RunningGroup>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Groups {
    pub fn new(shared: Shared) -> Arc<Self> {
        Arc::new(Self {
            shared,
            running: RwLock::default(),
            tasks: Mutex::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<GroupHandle> {
        self.running.read().unwrap().get(name).map(|g| g.handle.clone())
    }

    /// Every group, by name.
    pub fn all(&self) -> Vec<(String, GroupHandle)> {
        let running = self.running.read().unwrap();
        running
            .iter()
            .map(|(name, g)| (name.clone(), g.handle.clone()))
            .collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.running.read().unwrap().keys().cloned().collect()
    }

    /// Where the group's built-in load balancer listens, if it has one.
    pub fn front(&self, name: &str) -> Option<SocketAddr> {
        self.running.read().unwrap().get(name).and_then(|g| g.front)
    }

    /// Starts `groups`: every provider and load balancer is made first, so that when one cannot be (a
    /// missing key, a port in use) none of them starts; then their controllers.
    pub async fn start(&self, groups: Vec<GroupConfig>) -> Result<(), StartError> {
        let mut parts = Vec::new();
        for group in groups {
            let (provider, load_balancer, front) = self.connect(&group).await?;
            parts.push((group, provider, load_balancer, front));
        }
        let mut started = Vec::new();
        for (group, provider, load_balancer, front) in parts {
            let shared = &self.shared;
            let deps = Dependencies {
                provider,
                load_balancer,
                services: shared.services.clone(),
                collector_url: group.collector_url(&shared.server, shared.grpc_address),
            };
            let name = group.name.clone();
            let (controller, handle, commands) =
                GroupController::new(group, deps).await.map_err(|e| StartError::Group {
                    group: name.clone(),
                    what: "cannot read its state from the store",
                    source: Box::new(e),
                })?;
            started.push((name, controller, handle, commands, front));
        }
        let mut running = self.running.write().unwrap();
        let mut tasks = self.tasks.lock().unwrap();
        for (name, controller, handle, commands, front) in started {
            tasks.push(tokio::spawn(controller.run(commands, self.shared.stop.clone())));
            running.insert(name, RunningGroup { handle, front });
        }
        Ok(())
    }

    /// Waits for every controller to stop (after the stop signal).
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for task in tasks {
            let _ = task.await;
        }
    }

    /// The group's provider and load balancer, with the built-in load balancer's front address.
    async fn connect(
        &self,
        group: &GroupConfig,
    ) -> Result<(Arc<dyn Provider>, Arc<dyn LoadBalancer>, Option<SocketAddr>), StartError> {
        let failed = |what: &'static str| {
            move |e: CloudError| StartError::Group {
                group: group.name.clone(),
                what,
                source: Box::new(e),
            }
        };
        let (state_dir, cluster_id) = (&self.shared.server.state_dir, &self.shared.services.cluster_id);
        let (provider, cloud) = group
            .provider
            .build(state_dir, cluster_id)
            .await
            .map_err(failed("provider"))?;
        let (load_balancer, front) = group
            .load_balancer
            .build(&cloud, cluster_id)
            .await
            .map_err(failed("load_balancer"))?;
        Ok((provider, load_balancer, front))
    }
}
