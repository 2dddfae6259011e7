//! The ownership maps in Redis, through one `ConnectionManager` (which reconnects by itself).
//!
//! Key layout, all under `imagefleet:`:
//! - `imagefleet:image-owner`: hash, image id -> owner account id.
//! - `imagefleet:image-shares:<image id>`: hash, account id -> unix time it was shared.
//! - `imagefleet:account-shares:<account id>`: hash, image id -> unix time it was shared.
//!
//! The two share hashes mirror each other; every update that touches more than one key runs as
//! one Lua script (atomic in Redis), like `REMOVE_IMAGE` below.

use crate::maps::MapsError;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::AsyncCommands;
use std::future::Future;
use std::time::Duration;
use tokio::sync::OnceCell;

pub const KEY_PREFIX: &str = "imagefleet:";
pub const IMAGE_OWNER_KEY: &str = "imagefleet:image-owner";
pub const IMAGE_SHARES_PREFIX: &str = "imagefleet:image-shares:";
pub const ACCOUNT_SHARES_PREFIX: &str = "imagefleet:account-shares:";

/// The longest a call waits for Redis before answering `UNAVAILABLE`.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Deletes an image's owner and every share of it, both directions.
/// KEYS[1]: the owner hash; KEYS[2]: the image's share hash.
/// ARGV[1]: the image id; ARGV[2]: the account-shares key prefix.
const REMOVE_IMAGE: &str = r"
local accounts = redis.call('HKEYS', KEYS[2])
for _, account in ipairs(accounts) do
  redis.call('HDEL', ARGV[2] .. account, ARGV[1])
end
redis.call('DEL', KEYS[2])
return redis.call('HDEL', KEYS[1], ARGV[1])
";

pub fn image_shares_key(image_id: &str) -> String {
    format!("{IMAGE_SHARES_PREFIX}{image_id}")
}

pub fn account_shares_key(account_id: &str) -> String {
    format!("{ACCOUNT_SHARES_PREFIX}{account_id}")
}

pub struct RedisMaps {
    client: redis::Client,
    /// Made on first use, not at start: Redis may come up after the service. A failed attempt
    /// leaves it empty, so the next call (or the health watcher's ping) tries again.
    connection: OnceCell<ConnectionManager>,
    remove_image: redis::Script,
}

impl RedisMaps {
    pub fn new(url: &str) -> anyhow::Result<RedisMaps> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid redis url: {e}"))?;
        Ok(RedisMaps {
            client,
            connection: OnceCell::new(),
            remove_image: redis::Script::new(REMOVE_IMAGE),
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

    async fn connection(&self) -> Result<ConnectionManager, MapsError> {
        let manager = self
            .connection
            .get_or_try_init(|| async {
                let manager =
                    ConnectionManager::new_with_config(self.client.clone(), Self::manager_config())
                        .await?;
                tracing::info!("connected to redis");
                Ok::<_, MapsError>(manager)
            })
            .await?;
        Ok(manager.clone())
    }

    /// Runs `f` on a connection, within `CALL_TIMEOUT`.
    async fn with_connection<T, F, Fut>(&self, f: F) -> Result<T, MapsError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        tokio::time::timeout(CALL_TIMEOUT, async {
            let connection = self.connection().await?;
            Ok(f(connection).await?)
        })
        .await
        .map_err(|_| MapsError::Timeout)?
    }

    pub async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        self.with_connection(|mut c| async move {
            c.hset::<_, _, _, ()>(IMAGE_OWNER_KEY, image_id, owner)
                .await
        })
        .await
    }

    pub async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        self.with_connection(|mut c| async move {
            self.remove_image
                .key(IMAGE_OWNER_KEY)
                .key(image_shares_key(image_id))
                .arg(image_id)
                .arg(ACCOUNT_SHARES_PREFIX)
                .invoke_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    pub async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        self.with_connection(|mut c| async move { c.hget(IMAGE_OWNER_KEY, image_id).await })
            .await
    }

    pub async fn ping(&self) -> Result<(), MapsError> {
        self.with_connection(|mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }
}
