//! The built-in load balancer: a TCP round-robin proxy on one front address. Each new connection goes to
//! the next registered member (trying the following ones if a member refuses); a deregistered member gets
//! no new connections while its open ones finish.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{Backend, LoadBalancer, Registration};
use crate::providers::CloudError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

struct Target {
    member_id: String,
    address: SocketAddr,
    connections: Arc<AtomicU64>,
}

#[derive(Default)]
struct Pool {
    targets: RwLock<Targets>,
    next: AtomicUsize,
}

/// The registered members in turn order, and their ids to find one without walking the list (a group of
/// thousands joins in one go).
#[derive(Default)]
struct Targets {
    list: Vec<Target>,
    ids: HashSet<String>,
}

impl Pool {
    /// The members to try for one connection, starting with the next in turn.
    fn candidates(&self) -> Vec<(SocketAddr, Arc<AtomicU64>)> {
        let targets = &self.targets.read().unwrap().list;
        if targets.is_empty() {
            return Vec::new();
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % targets.len();
        (0..targets.len())
            .map(|i| &targets[(start + i) % targets.len()])
            .map(|t| (t.address, t.connections.clone()))
            .collect()
    }
}

pub struct BuiltinLoadBalancer {
    pool: Arc<Pool>,
    front: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl BuiltinLoadBalancer {
    /// Listens on `listen` (port 0 picks a free port; see [`Self::front`]).
    pub async fn bind(listen: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let front = listener.local_addr()?;
        let pool = Arc::new(Pool::default());
        let accept_loop = tokio::spawn(accept(listener, pool.clone()));
        Ok(Self {
            pool,
            front,
            accept_loop,
        })
    }

    /// The address clients connect to.
    pub fn front(&self) -> SocketAddr {
        self.front
    }
}

impl Drop for BuiltinLoadBalancer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

async fn accept(listener: TcpListener, pool: Arc<Pool>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let pool = pool.clone();
        tokio::spawn(async move {
            // With no member in service the client's connection is closed at once.
            for (address, connections) in pool.candidates() {
                match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address)).await {
                    Ok(Ok(mut upstream)) => {
                        connections.fetch_add(1, Ordering::Relaxed);
                        let mut client = client;
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        return;
                    }
                    _ => {
                        tracing::debug!(%address, "A member refused a connection; trying the next.")
                    }
                }
            }
        });
    }
}

#[async_trait]
impl LoadBalancer for BuiltinLoadBalancer {
    async fn register(&self, member: &Registration<'_>) -> Result<(), CloudError> {
        let mut targets = self.pool.targets.write().unwrap();
        if targets.ids.insert(member.member_id.to_string()) {
            targets.list.push(Target {
                member_id: member.member_id.to_string(),
                address: member.address,
                connections: Arc::default(),
            });
        }
        Ok(())
    }

    async fn deregister(&self, member_id: &str, _instance_id: &str) -> Result<(), CloudError> {
        let mut targets = self.pool.targets.write().unwrap();
        if targets.ids.remove(member_id) {
            targets.list.retain(|t| t.member_id != member_id);
        }
        Ok(())
    }

    fn connections(&self) -> Vec<(String, u64)> {
        self.pool
            .targets
            .read()
            .unwrap()
            .list
            .iter()
            .map(|t| (t.member_id.clone(), t.connections.load(Ordering::Relaxed)))
            .collect()
    }

    async fn members(&self) -> Result<Vec<Backend>, CloudError> {
        Ok(self
            .pool
            .targets
            .read()
            .unwrap()
            .list
            .iter()
            .map(|t| Backend {
                member_id: t.member_id.clone(),
                instance_id: String::new(),
                address: t.address,
                connections: t.connections.load(Ordering::Relaxed),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A backend that answers every connection with its name.
    async fn backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let _ = socket.write_all(name.as_bytes()).await;
            }
        });
        address
    }

    async fn fetch(front: SocketAddr) -> String {
        let mut socket = TcpStream::connect(front).await.unwrap();
        let mut answer = String::new();
        let _ = socket.read_to_string(&mut answer).await;
        answer
    }

    #[tokio::test]
    async fn round_robin_over_registered_members_only() {
        let lb = BuiltinLoadBalancer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        assert_eq!(fetch(lb.front()).await, "", "no members: the connection is closed");

        let a = backend("a").await;
        lb.register(&at("a", a)).await.unwrap();
        lb.register(&at("b", backend("b").await)).await.unwrap();
        lb.register(&at("a", a)).await.unwrap();
        assert_eq!(
            lb.members().await.unwrap().len(),
            2,
            "registering twice adds a member once"
        );
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(fetch(lb.front()).await);
        }
        answers.sort();
        assert_eq!(answers, ["a", "a", "b", "b"]);

        lb.deregister("a", "i-a").await.unwrap();
        assert_eq!(fetch(lb.front()).await, "b");
        let members = lb.members().await.unwrap();
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].connections, 3);
        assert_eq!(lb.connections(), [("b".to_string(), 3)]);
        lb.register(&at("a", a)).await.unwrap();
        assert_eq!(
            lb.members().await.unwrap().len(),
            2,
            "a deregistered member can come back"
        );
    }

    fn at(member_id: &str, address: SocketAddr) -> Registration<'_> {
        Registration {
            member_id,
            instance_id: "i-test",
            address,
        }
    }

    #[tokio::test]
    async fn a_refusing_member_is_skipped() {
        let lb = BuiltinLoadBalancer::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        lb.register(&at("gone", closed)).await.unwrap();
        lb.register(&at("b", backend("b").await)).await.unwrap();
        for _ in 0..3 {
            assert_eq!(fetch(lb.front()).await, "b");
        }
    }
}
