//! The ownership maps in Redis, through one `ConnectionManager` (which reconnects by itself).
//!
//! Key layout, all under `imagefleet:`:
//! - `imagefleet:image-owner`: hash, image id -> owner account id.
//! - `imagefleet:image-shares:<image id>`: hash, account id -> unix time it was shared.
//! - `imagefleet:account-shares:<account id>`: hash, image id -> unix time it was shared.
//!
//! The two share hashes mirror each other; every update that touches more than one key runs as
//! one Lua script (atomic in Redis), like `REMOVE_IMAGE` below.

use crate::rules::{MapsError, OwnershipBackend, ShareChange, ShareRefusal, MAX_SHARES};
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

/// Shares an image or cancels shares, after checking every rule; all accounts or none.
/// KEYS[1]: the owner hash; KEYS[2]: the image's share hash.
/// ARGV[1]: image id; ARGV[2]: owner; ARGV[3]: `share` or `cancel`; ARGV[4]: unix time;
/// ARGV[5]: the account-shares key prefix; ARGV[6]: the most shares per image; ARGV[7..]: accounts.
/// Returns `OK`, `NOT_OWNER`, `ALREADY <account>`, `NOT_SHARED <account>` or `TOO_MANY <current>`.
const MODIFY_SHARES: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 'NOT_OWNER'
end
local accounts = {}
for i = 7, #ARGV do accounts[#accounts + 1] = ARGV[i] end
if ARGV[3] == 'share' then
  for _, account in ipairs(accounts) do
    if redis.call('HEXISTS', KEYS[2], account) == 1 then
      return 'ALREADY ' .. account
    end
  end
  local current = redis.call('HLEN', KEYS[2])
  if current + #accounts > tonumber(ARGV[6]) then
    return 'TOO_MANY ' .. current
  end
  for _, account in ipairs(accounts) do
    redis.call('HSET', KEYS[2], account, ARGV[4])
    redis.call('HSET', ARGV[5] .. account, ARGV[1], ARGV[4])
  end
else
  for _, account in ipairs(accounts) do
    if redis.call('HEXISTS', KEYS[2], account) == 0 then
      return 'NOT_SHARED ' .. account
    end
  end
  for _, account in ipairs(accounts) do
    redis.call('HDEL', KEYS[2], account)
    redis.call('HDEL', ARGV[5] .. account, ARGV[1])
  end
end
return 'OK'
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
    modify_shares: redis::Script,
    metrics: RedisMetrics,
}

/// Latency and failures of the Redis calls, by operation (`imagefleet_redis_*`).
struct RedisMetrics {
    registry: std::sync::Arc<imagefleet_rpc::metrics::Registry>,
    latency: std::sync::RwLock<
        std::collections::HashMap<&'static str, std::sync::Arc<imagefleet_rpc::metrics::Series>>,
    >,
}

impl RedisMetrics {
    fn new() -> RedisMetrics {
        RedisMetrics {
            registry: imagefleet_rpc::metrics::registry(imagefleet_rpc::identity::SHARING),
            latency: Default::default(),
        }
    }

    fn observe(&self, op: &'static str, elapsed: Duration, outcome: Result<(), &'static str>) {
        let known = self
            .latency
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(op)
            .cloned();
        let histogram = known.unwrap_or_else(|| {
            let h = self.registry.histogram(
                "imagefleet_redis_call_duration_seconds",
                "Time of each Redis operation of the ownership maps, failures included.",
                imagefleet_rpc::metrics::STORE_BUCKETS,
                &[("op", op)],
            );
            self.latency
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(op, h.clone());
            h
        });
        histogram.observe(elapsed);
        if let Err(kind) = outcome {
            self.registry
                .counter(
                    "imagefleet_redis_errors_total",
                    "Redis operations that failed, by operation and kind (error, timeout).",
                    &[("op", op), ("kind", kind)],
                )
                .inc();
        }
    }
}

impl RedisMaps {
    pub fn new(url: &str) -> anyhow::Result<RedisMaps> {
        let client =
            redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid redis url: {e}"))?;
        Ok(RedisMaps {
            client,
            connection: OnceCell::new(),
            remove_image: redis::Script::new(REMOVE_IMAGE),
            modify_shares: redis::Script::new(MODIFY_SHARES),
            metrics: RedisMetrics::new(),
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
    async fn with_connection<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, MapsError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(CALL_TIMEOUT, async {
            let connection = self.connection().await?;
            Ok(f(connection).await?)
        })
        .await;
        let (result, outcome) = match result {
            Err(_) => (Err(MapsError::Timeout), Err("timeout")),
            Ok(Err(e)) => (Err(e), Err("error")),
            Ok(Ok(v)) => (Ok(v), Ok(())),
        };
        self.metrics.observe(op, started.elapsed(), outcome);
        result
    }
}

#[tonic::async_trait]
impl OwnershipBackend for RedisMaps {
    async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        self.with_connection("set_owner", |mut c| async move {
            c.hset::<_, _, _, ()>(IMAGE_OWNER_KEY, image_id, owner)
                .await
        })
        .await
    }

    async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        self.with_connection("remove_image", |mut c| async move {
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

    async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        self.with_connection("owner", |mut c| async move {
            c.hget(IMAGE_OWNER_KEY, image_id).await
        })
        .await
    }

    async fn modify_shares(
        &self,
        image_id: &str,
        owner: &str,
        change: ShareChange,
        accounts: &[String],
        now: i64,
    ) -> Result<Result<(), ShareRefusal>, MapsError> {
        let outcome: String = self
            .with_connection("modify_shares", |mut c| async move {
                let mut invocation = self.modify_shares.key(IMAGE_OWNER_KEY);
                invocation
                    .key(image_shares_key(image_id))
                    .arg(image_id)
                    .arg(owner)
                    .arg(match change {
                        ShareChange::Share => "share",
                        ShareChange::Cancel => "cancel",
                    })
                    .arg(now)
                    .arg(ACCOUNT_SHARES_PREFIX)
                    .arg(MAX_SHARES);
                for account in accounts {
                    invocation.arg(account);
                }
                invocation.invoke_async::<String>(&mut c).await
            })
            .await?;
        let (word, detail) = outcome.split_once(' ').unwrap_or((outcome.as_str(), ""));
        Ok(match word {
            "OK" => Ok(()),
            "NOT_OWNER" => Err(ShareRefusal::NotOwner),
            "ALREADY" => Err(ShareRefusal::AlreadyShared(detail.to_string())),
            "NOT_SHARED" => Err(ShareRefusal::NotShared(detail.to_string())),
            _ => Err(ShareRefusal::TooMany {
                current: detail.parse().unwrap_or(MAX_SHARES),
                adding: accounts.len(),
            }),
        })
    }

    async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError> {
        self.with_connection("shares", |mut c| async move {
            c.hgetall::<_, Vec<(String, i64)>>(image_shares_key(image_id))
                .await
        })
        .await
    }

    async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError> {
        self.with_connection("is_shared", |mut c| async move {
            c.hexists(image_shares_key(image_id), account).await
        })
        .await
    }

    async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError> {
        self.with_connection("shared_with", |mut c| async move {
            c.hkeys(account_shares_key(account)).await
        })
        .await
    }

    async fn ping(&self) -> Result<(), MapsError> {
        self.with_connection("ping", |mut c| async move {
            redis::cmd("PING")
                .query_async::<String>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }
}
