//! Where the sharing service keeps its verifier's replay floor (`imagefleet_rpc::auth`): in
//! Redis next to the maps (AOF, so it survives a restart of either), or in the embedded
//! fallback's directory.

use crate::redis_conn::{Redis, RedisTarget};
use imagefleet_rpc::auth::{BoxFuture, FloorStore};
use redis::AsyncCommands;
use std::time::Duration;

/// The Redis key holding the largest future-dated timestamp the sharing service accepted.
pub const FLOOR_KEY: &str = "imagefleet:auth:replay-floor:sharing";

/// The floor in Redis (one server or a cluster: one key, in one slot).
pub struct RedisFloor {
    redis: Redis,
}

impl RedisFloor {
    pub fn new(target: &RedisTarget) -> anyhow::Result<Self> {
        Ok(RedisFloor {
            redis: Redis::new(target)?,
        })
    }

    async fn connection(&self) -> Result<crate::redis_conn::RedisConnection, String> {
        self.redis.connection().await.map_err(|e| e.to_string())
    }
}

impl FloorStore for RedisFloor {
    fn load(&self) -> BoxFuture<'_, Result<i64, String>> {
        Box::pin(async move {
            let read = async {
                let mut c = self.connection().await?;
                let value: Option<i64> = c.get(FLOOR_KEY).await.map_err(|e| e.to_string())?;
                Ok(value.unwrap_or(0))
            };
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .map_err(|_| "redis did not answer".to_string())?
        })
    }

    fn raise(&self, timestamp: i64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let write = async {
                let mut c = self.connection().await?;
                let _: () = c
                    .set(FLOOR_KEY, timestamp)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(())
            };
            tokio::time::timeout(Duration::from_secs(5), write)
                .await
                .map_err(|_| "redis did not answer".to_string())?
        })
    }
}
