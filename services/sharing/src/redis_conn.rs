//! One way to reach Redis, whichever shape it has: a single server, through a
//! `ConnectionManager` (which reconnects by itself), or a Redis Cluster, through a cluster
//! connection (which follows the slot map, `MOVED`/`ASK` redirects and failovers). The maps
//! and the replay floor speak to either through [`RedisConnection`].

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};
use std::time::Duration;
use tokio::sync::OnceCell;

/// The scheme of a Redis Cluster URL: `redis+cluster://host:port,host:port`.
pub const CLUSTER_SCHEME: &str = "redis+cluster://";

/// Where Redis is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, e.g. `redis://127.0.0.1:6379`.
    Single { url: String },
    /// A Redis Cluster, by some of its nodes (`redis://host:port` each); the rest of the
    /// cluster is learnt from them.
    Cluster { nodes: Vec<String> },
}

impl RedisTarget {
    /// A `redis://` URL (one server) or a `redis+cluster://host:port,host:port` URL (a cluster).
    pub fn from_url(url: &str) -> anyhow::Result<RedisTarget> {
        match url.strip_prefix(CLUSTER_SCHEME) {
            Some(nodes) => RedisTarget::cluster(nodes.trim_end_matches('/')),
            None => Ok(RedisTarget::Single {
                url: url.to_string(),
            }),
        }
    }

    /// A cluster from a comma-separated list of `host:port` (or `redis://host:port`) nodes.
    pub fn cluster(nodes: &str) -> anyhow::Result<RedisTarget> {
        let nodes: Vec<String> = nodes
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(|n| {
                if n.contains("://") {
                    n.to_string()
                } else {
                    format!("redis://{n}")
                }
            })
            .collect();
        anyhow::ensure!(
            !nodes.is_empty(),
            "a Redis Cluster needs at least one node (host:port)"
        );
        Ok(RedisTarget::Cluster { nodes })
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisTarget::Cluster { .. })
    }
}

/// A connection to a single Redis or to a Redis Cluster. Cheap to clone (both kinds are
/// multiplexed); commands and pipelines run on it through `redis::aio::ConnectionLike`. On a
/// cluster, a command goes to the master of its keys' slot, and a pipeline to the master of
/// its first keyed command's slot.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(cmd, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

impl RedisConnection {
    /// Whether Redis answers: the server, or any one node of a cluster (a cluster whose
    /// nodes are partly down still serves the slots whose masters are up; calls on the others
    /// fail on their own).
    pub async fn ping(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            RedisConnection::Single(c) => ping.query_async::<String>(c).await.map(|_| ()),
            RedisConnection::Cluster(c) => c
                .route_command(
                    &ping,
                    RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllNodes,
                        Some(ResponsePolicy::OneSucceeded),
                    )),
                )
                .await
                .map(|_| ()),
        }
    }
}

enum Client {
    Single(redis::Client),
    Cluster(ClusterClient),
}

/// A connection made on first use, not at start: Redis may come up after the service. A
/// failed attempt leaves it unmade, so the next call tries again.
pub struct Redis {
    client: Client,
    connection: OnceCell<RedisConnection>,
}

impl Redis {
    pub fn new(target: &RedisTarget) -> anyhow::Result<Redis> {
        let client = match target {
            RedisTarget::Single { url } => Client::Single(
                redis::Client::open(url.as_str())
                    .map_err(|e| anyhow::anyhow!("invalid redis url: {e}"))?,
            ),
            // Short timeouts, quick retries: a call that meets a redirect or a failover
            // retries within its own deadline; one that meets a slot without a master fails
            // with `UNAVAILABLE` once the deadline passes.
            RedisTarget::Cluster { nodes } => Client::Cluster(
                ClusterClient::builder(nodes.clone())
                    .connection_timeout(Duration::from_secs(1))
                    .response_timeout(Duration::from_secs(2))
                    .retries(8)
                    .min_retry_wait(20)
                    .max_retry_wait(400)
                    .build()
                    .map_err(|e| anyhow::anyhow!("invalid redis cluster nodes: {e}"))?,
            ),
        };
        Ok(Redis {
            client,
            connection: OnceCell::new(),
        })
    }

    /// Short timeouts and few retries: while Redis is down, calls fail fast with
    /// `UNAVAILABLE` and the manager tries again on the next call.
    fn manager_config() -> ConnectionManagerConfig {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Duration::from_secs(1))
            .set_response_timeout(Duration::from_secs(2))
            .set_number_of_retries(1)
            .set_factor(100)
            .set_max_delay(500)
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.client, Client::Cluster(_))
    }

    /// The connection, made now if it is not yet.
    pub async fn connection(&self) -> RedisResult<RedisConnection> {
        let connection = self
            .connection
            .get_or_try_init(|| async {
                let connection = match &self.client {
                    Client::Single(client) => RedisConnection::Single(
                        ConnectionManager::new_with_config(client.clone(), Self::manager_config())
                            .await?,
                    ),
                    Client::Cluster(client) => {
                        RedisConnection::Cluster(client.get_async_connection().await?)
                    }
                };
                tracing::info!(cluster = self.is_cluster(), "connected to redis");
                Ok::<_, redis::RedisError>(connection)
            })
            .await?;
        Ok(connection.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_server_or_a_cluster() {
        assert_eq!(
            RedisTarget::from_url("redis://127.0.0.1:6379").unwrap(),
            RedisTarget::Single {
                url: "redis://127.0.0.1:6379".into()
            }
        );
        assert_eq!(
            RedisTarget::from_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000/").unwrap(),
            RedisTarget::Cluster {
                nodes: vec![
                    "redis://10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ]
            }
        );
        assert_eq!(
            RedisTarget::cluster(" a:1 , redis://b:2 ,").unwrap(),
            RedisTarget::Cluster {
                nodes: vec!["redis://a:1".into(), "redis://b:2".into()]
            }
        );
        assert!(RedisTarget::cluster(" , ").is_err());
    }
}
