//! The ownership maps in Redis: one server, or a Redis Cluster (`redis_conn`), with one key
//! layout for both.
//!
//! Keys, all under `imagefleet:`; the part in braces is the hash tag, so every key of one
//! image lies in that image's hash slot:
//! - `imagefleet:{<image id>}:owner`: string, the owner account id.
//! - `imagefleet:{<image id>}:shares`: hash, account id -> `<unix time>:<token>`, the time of
//!   the share and the token of the request that made it.
//! - `imagefleet:{account-<account id>}:shared-with`: hash, image id -> token; the reverse
//!   index (images shared with the account), in the account's slot.
//!
//! The image's two keys are the truth: every change to them is one Lua script on the image's
//! slot (owner check, the share rules and the change together, atomic), and the share check
//! made on every launch reads them alone. The reverse index lies in another slot, so it cannot
//! change in the same script; it is kept a superset of the truth instead, and never trusted on
//! its own:
//! - a share writes the index entries first (each carrying the request's token) and changes
//!   the image's keys second, so every share in the image's keys has its entry;
//! - a cancel or an image removal changes the image's keys first, then deletes the entries
//!   still carrying the token of the share it removed (an entry a newer request rewrote is left);
//! - a read of the index checks every entry against the image's shares hash (in the image's
//!   slot) and returns only those it finds there; an entry not found there and older than
//!   [`REPAIR_GRACE_MS`] (its request has long finished) is deleted if it still carries the
//!   same token, and an entry whose token differs from the share's is given the share's token.
//!
//! On a cluster every write waits until `replica_acks` replicas hold it (`WAIT`), so a write
//! acknowledged to the caller survives the failover of its master. A write the replicas did
//! not confirm in time is answered `UNAVAILABLE` (it may or may not stay).

use crate::redis_conn::{Redis, RedisConnection, RedisTarget};
use crate::rules::{MapsError, OwnershipBackend, ShareChange, ShareRefusal, MAX_SHARES};
use futures::{StreamExt, TryStreamExt};
use redis::{AsyncCommands, Cmd, Value};
use std::future::Future;
use std::time::Duration;

pub const KEY_PREFIX: &str = "imagefleet:";

/// The longest a call waits for Redis before answering `UNAVAILABLE`.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest the reverse-index clean-up after a cancel or removal may take (it is best
/// effort: what it leaves, reads filter out and repair).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a write waits for its replicas (`WAIT`), in milliseconds.
const WAIT_MS: u64 = 1000;

/// An index entry whose share is not in the image's keys is deleted only once its token is
/// older than this: a younger one may belong to a share still on its way.
pub const REPAIR_GRACE_MS: i64 = 5 * 60 * 1000;

/// How many index writes or checks of one call run at once on a cluster.
const FAN_OUT: usize = 32;

/// Deletes an image's owner and shares; returns the shares hash it deleted (flat).
/// KEYS[1]: the image's owner key; KEYS[2]: the image's shares key.
const REMOVE_IMAGE: &str = r"
local shares = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
return shares
";

/// Shares an image or cancels shares, after checking every rule; all accounts or none.
/// KEYS[1]: the image's owner key; KEYS[2]: the image's shares key.
/// ARGV[1]: owner; ARGV[2]: `share` or `cancel`; ARGV[3]: the share's value (`<time>:<token>`);
/// ARGV[4]: the most shares per image; ARGV[5..]: accounts.
/// Returns `{OK}` (a share), `{OK, account, value, ...}` (a cancel: the shares removed),
/// `{NOT_OWNER}`, `{ALREADY, account}`, `{NOT_SHARED, account}` or `{TOO_MANY, current}`.
/// A share whose first account already holds this very value was made by this same request
/// (a retry after a lost reply) and is answered `OK` again.
const MODIFY_SHARES: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return {'NOT_OWNER'}
end
local accounts = {}
for i = 5, #ARGV do accounts[#accounts + 1] = ARGV[i] end
if ARGV[2] == 'share' then
  if redis.call('HGET', KEYS[2], accounts[1]) == ARGV[3] then
    return {'OK'}
  end
  for _, account in ipairs(accounts) do
    if redis.call('HEXISTS', KEYS[2], account) == 1 then
      return {'ALREADY', account}
    end
  end
  local current = redis.call('HLEN', KEYS[2])
  if current + #accounts > tonumber(ARGV[4]) then
    return {'TOO_MANY', tostring(current)}
  end
  for _, account in ipairs(accounts) do
    redis.call('HSET', KEYS[2], account, ARGV[3])
  end
  return {'OK'}
end
for _, account in ipairs(accounts) do
  if redis.call('HEXISTS', KEYS[2], account) == 0 then
    return {'NOT_SHARED', account}
  end
end
local removed = {'OK'}
for _, account in ipairs(accounts) do
  removed[#removed + 1] = account
  removed[#removed + 1] = redis.call('HGET', KEYS[2], account)
  redis.call('HDEL', KEYS[2], account)
end
return removed
";

/// Changes one reverse-index entry only if it still carries the expected token.
/// KEYS[1]: the account's index key. ARGV[1]: image id; ARGV[2]: the expected token;
/// ARGV[3]: the new token, or empty to delete the entry. Returns 1 if it changed it.
const SWAP_ENTRY: &str = r"
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  return 0
end
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
end
return 1
";

/// The key of an image's owner.
pub fn owner_key(image_id: &str) -> String {
    format!("{KEY_PREFIX}{{{image_id}}}:owner")
}

/// The key of the hash of an image's shares.
pub fn shares_key(image_id: &str) -> String {
    format!("{KEY_PREFIX}{{{image_id}}}:shares")
}

/// The key of the reverse index of an account (the images shared with it).
pub fn shared_with_key(account_id: &str) -> String {
    format!("{KEY_PREFIX}{{account-{account_id}}}:shared-with")
}

/// The token part of a share's value (`<time>:<token>`).
fn token_of(value: &str) -> &str {
    value.split_once(':').map(|(_, t)| t).unwrap_or("")
}

/// The time part of a share's value (`<time>:<token>`).
fn time_of(value: &str) -> i64 {
    value
        .split(':')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A request's token: when it was made (unix milliseconds) and 64 random bits.
fn new_token() -> String {
    format!("{}-{:016x}", unix_ms(), rand::random::<u64>())
}

/// When a token was made (unix milliseconds); 0 for one that does not say.
fn token_ms(token: &str) -> i64 {
    token
        .split('-')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn eval(script: &str, keys: &[String], args: &[&str]) -> Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for key in keys {
        cmd.arg(key);
    }
    for arg in args {
        cmd.arg(*arg);
    }
    cmd
}

pub struct RedisMaps {
    redis: Redis,
    /// How many replicas must hold a write before it is acknowledged (0: none asked).
    replica_acks: usize,
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
    /// The maps in Redis at `target`. On a cluster, writes wait for `replica_acks` replicas;
    /// on a single server, for none.
    pub fn new(target: &RedisTarget, replica_acks: usize) -> anyhow::Result<RedisMaps> {
        Ok(RedisMaps {
            redis: Redis::new(target)?,
            replica_acks: if target.is_cluster() { replica_acks } else { 0 },
            metrics: RedisMetrics::new(),
        })
    }

    /// Runs `f` on a connection, within `CALL_TIMEOUT`.
    async fn with_connection<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, MapsError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, MapsError>>,
    {
        self.within(op, CALL_TIMEOUT, f).await
    }

    /// Runs `f` on a connection, within `timeout`.
    async fn within<T, F, Fut>(
        &self,
        op: &'static str,
        timeout: Duration,
        f: F,
    ) -> Result<T, MapsError>
    where
        F: FnOnce(RedisConnection) -> Fut,
        Fut: Future<Output = Result<T, MapsError>>,
    {
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(timeout, async {
            let connection = self.redis.connection().await?;
            f(connection).await
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

    /// Runs `commands` as one pipeline (on a cluster: on the master of their slot) and, when
    /// replicas are asked for, waits until that many hold the writes; fewer fail the call.
    async fn write(
        &self,
        connection: &mut RedisConnection,
        commands: Vec<Cmd>,
    ) -> Result<Vec<Value>, MapsError> {
        let mut pipe = redis::pipe();
        for command in commands {
            pipe.add_command(command);
        }
        if self.replica_acks > 0 {
            pipe.cmd("WAIT").arg(self.replica_acks).arg(WAIT_MS);
        }
        let mut values: Vec<Value> = pipe.query_async(connection).await?;
        if self.replica_acks > 0 {
            let acked: usize = redis::from_owned_redis_value(values.pop().unwrap_or(Value::Nil))?;
            if acked < self.replica_acks {
                return Err(MapsError::Unreplicated {
                    wanted: self.replica_acks,
                    got: acked,
                });
            }
        }
        Ok(values)
    }

    /// Runs one script (through `write`) and returns its reply as strings.
    async fn script(
        &self,
        connection: &mut RedisConnection,
        script: Cmd,
    ) -> Result<Vec<String>, MapsError> {
        let mut values = self.write(connection, vec![script]).await?;
        let reply = if values.is_empty() {
            Value::Nil
        } else {
            values.swap_remove(0)
        };
        Ok(redis::from_owned_redis_value(reply)?)
    }

    /// Writes the reverse-index entries of a share about to be made: `token` under `image_id`
    /// in every account's index, each made durable (and replicated) before the share itself.
    async fn add_entries(
        &self,
        connection: &RedisConnection,
        image_id: &str,
        accounts: &[String],
        token: &str,
    ) -> Result<(), MapsError> {
        let hset = |account: &String| {
            let mut cmd = redis::cmd("HSET");
            cmd.arg(shared_with_key(account)).arg(image_id).arg(token);
            cmd
        };
        if !self.redis.is_cluster() {
            let mut c = connection.clone();
            self.write(&mut c, accounts.iter().map(hset).collect())
                .await?;
            return Ok(());
        }
        // Each account's index lies in its own slot: one pipeline (with its WAIT) each.
        let commands: Vec<Cmd> = accounts.iter().map(hset).collect();
        futures::stream::iter(commands)
            .map(|cmd| {
                let mut c = connection.clone();
                async move { self.write(&mut c, vec![cmd]).await.map(|_| ()) }
            })
            .buffer_unordered(FAN_OUT)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Swaps reverse-index entries of `account` from one token to another (or deletes them),
    /// as long as they still carry the expected token. Best effort, within `CLEANUP_TIMEOUT`:
    /// whatever it leaves, reads filter out and repair later.
    async fn swap_entries(&self, op: &'static str, swaps: Vec<(String, String, String, String)>) {
        if swaps.is_empty() {
            return;
        }
        let outcome = self
            .within(op, CLEANUP_TIMEOUT, |connection| async move {
                futures::stream::iter(swaps)
                    .map(|(account, image, expected, new)| {
                        let mut c = connection.clone();
                        async move {
                            let cmd = eval(
                                SWAP_ENTRY,
                                &[shared_with_key(&account)],
                                &[&image, &expected, &new],
                            );
                            cmd.query_async::<i64>(&mut c).await.map(|_| ())
                        }
                    })
                    .buffer_unordered(FAN_OUT)
                    .try_collect::<Vec<()>>()
                    .await?;
                Ok(())
            })
            .await;
        if let Err(e) = outcome {
            tracing::warn!(error = %e, op, "reverse index not cleaned up now (reads filter it out)");
        }
    }

    /// Deletes the reverse-index entries of shares just removed from `image_id` (pairs of
    /// account and the share's value), if they still carry the share's token.
    async fn forget_entries(&self, op: &'static str, image_id: &str, removed: Vec<String>) {
        let swaps = removed
            .chunks_exact(2)
            .map(|pair| {
                (
                    pair[0].clone(),
                    image_id.to_string(),
                    token_of(&pair[1]).to_string(),
                    String::new(),
                )
            })
            .collect();
        self.swap_entries(op, swaps).await;
    }

    async fn share(
        &self,
        image_id: &str,
        owner: &str,
        accounts: &[String],
        now: i64,
    ) -> Result<Vec<String>, MapsError> {
        let token = new_token();
        let value = format!("{now}:{token}");
        let max = MAX_SHARES.to_string();
        self.with_connection("modify_shares", |mut c| async move {
            // Not the owner: refused before any index entry is written (the script checks
            // again, atomically with the change).
            let current: Option<String> = c.get(owner_key(image_id)).await?;
            if current.as_deref() != Some(owner) {
                return Ok(vec!["NOT_OWNER".to_string()]);
            }
            self.add_entries(&c, image_id, accounts, &token).await?;
            let mut args = vec![owner, "share", value.as_str(), max.as_str()];
            args.extend(accounts.iter().map(String::as_str));
            let script = eval(
                MODIFY_SHARES,
                &[owner_key(image_id), shares_key(image_id)],
                &args,
            );
            self.script(&mut c, script).await
        })
        .await
    }

    async fn cancel(
        &self,
        image_id: &str,
        owner: &str,
        accounts: &[String],
    ) -> Result<Vec<String>, MapsError> {
        let max = MAX_SHARES.to_string();
        let mut outcome = self
            .with_connection("modify_shares", |mut c| async move {
                let mut args = vec![owner, "cancel", "", max.as_str()];
                args.extend(accounts.iter().map(String::as_str));
                let script = eval(
                    MODIFY_SHARES,
                    &[owner_key(image_id), shares_key(image_id)],
                    &args,
                );
                self.script(&mut c, script).await
            })
            .await?;
        if outcome.first().map(String::as_str) == Some("OK") {
            let removed = outcome.split_off(1);
            self.forget_entries("cancel_cleanup", image_id, removed)
                .await;
        }
        Ok(outcome)
    }
}

#[tonic::async_trait]
impl OwnershipBackend for RedisMaps {
    async fn set_owner(&self, image_id: &str, owner: &str) -> Result<(), MapsError> {
        self.with_connection("set_owner", |mut c| async move {
            let mut set = redis::cmd("SET");
            set.arg(owner_key(image_id)).arg(owner);
            self.write(&mut c, vec![set]).await.map(|_| ())
        })
        .await
    }

    async fn remove_image(&self, image_id: &str) -> Result<(), MapsError> {
        let removed = self
            .with_connection("remove_image", |mut c| async move {
                let script = eval(
                    REMOVE_IMAGE,
                    &[owner_key(image_id), shares_key(image_id)],
                    &[],
                );
                self.script(&mut c, script).await
            })
            .await?;
        self.forget_entries("remove_image_cleanup", image_id, removed)
            .await;
        Ok(())
    }

    async fn owner(&self, image_id: &str) -> Result<Option<String>, MapsError> {
        self.with_connection("owner", |mut c| async move {
            Ok(c.get(owner_key(image_id)).await?)
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
        if accounts.is_empty() {
            return Ok(Ok(()));
        }
        let outcome = match change {
            ShareChange::Share => self.share(image_id, owner, accounts, now).await?,
            ShareChange::Cancel => self.cancel(image_id, owner, accounts).await?,
        };
        let word = outcome.first().map(String::as_str).unwrap_or("");
        let detail = outcome.get(1).cloned().unwrap_or_default();
        Ok(match word {
            "OK" => Ok(()),
            "NOT_OWNER" => Err(ShareRefusal::NotOwner),
            "ALREADY" => Err(ShareRefusal::AlreadyShared(detail)),
            "NOT_SHARED" => Err(ShareRefusal::NotShared(detail)),
            _ => Err(ShareRefusal::TooMany {
                current: detail.parse().unwrap_or(MAX_SHARES),
                adding: accounts.len(),
            }),
        })
    }

    async fn shares(&self, image_id: &str) -> Result<Vec<(String, i64)>, MapsError> {
        let shares: Vec<(String, String)> = self
            .with_connection("shares", |mut c| async move {
                Ok(c.hgetall(shares_key(image_id)).await?)
            })
            .await?;
        Ok(shares
            .into_iter()
            .map(|(account, value)| (account, time_of(&value)))
            .collect())
    }

    async fn is_shared(&self, image_id: &str, account: &str) -> Result<bool, MapsError> {
        self.with_connection("is_shared", |mut c| async move {
            Ok(c.hexists(shares_key(image_id), account).await?)
        })
        .await
    }

    async fn are_shared(&self, checks: &[(&str, &str)]) -> Result<Vec<bool>, MapsError> {
        if self.redis.is_cluster() {
            // Each on its own slot's master.
            return futures::future::try_join_all(checks.iter().map(|(i, a)| self.is_shared(i, a)))
                .await;
        }
        // One server: every check in one round trip.
        self.with_connection("are_shared", |mut c| async move {
            let mut pipe = redis::pipe();
            for (image_id, account) in checks {
                pipe.hexists(shares_key(image_id), *account);
            }
            Ok(pipe.query_async(&mut c).await?)
        })
        .await
    }

    async fn shared_with(&self, account: &str) -> Result<Vec<String>, MapsError> {
        // The index says which images to look at; the images' own shares hashes say which of
        // them are shared. An image whose slot does not answer fails the call (never taken
        // on the index's word).
        let checked: Vec<(String, String, Option<String>)> = self
            .with_connection("shared_with", |mut c| async move {
                let entries: Vec<(String, String)> = c.hgetall(shared_with_key(account)).await?;
                if entries.is_empty() {
                    return Ok(Vec::new());
                }
                if !self.redis.is_cluster() {
                    // One server: every check in one round trip.
                    let mut pipe = redis::pipe();
                    for (image, _) in &entries {
                        pipe.hget(shares_key(image), account);
                    }
                    let shares: Vec<Option<String>> = pipe.query_async(&mut c).await?;
                    return Ok(entries
                        .into_iter()
                        .zip(shares)
                        .map(|((image, token), share)| (image, token, share))
                        .collect());
                }
                // A cluster: each image's check on its own slot's master.
                futures::stream::iter(entries)
                    .map(|(image, token)| {
                        let mut c = c.clone();
                        async move {
                            let share: Option<String> = c.hget(shares_key(&image), account).await?;
                            Ok::<_, MapsError>((image, token, share))
                        }
                    })
                    .buffered(FAN_OUT)
                    .try_collect()
                    .await
            })
            .await?;
        let now = unix_ms();
        let mut images = Vec::new();
        let mut repairs = Vec::new();
        for (image, token, share) in checked {
            match share {
                Some(value) => {
                    let actual = token_of(&value);
                    if actual != token {
                        repairs.push((
                            account.to_string(),
                            image.clone(),
                            token,
                            actual.to_string(),
                        ));
                    }
                    images.push(image);
                }
                None if now - token_ms(&token) > REPAIR_GRACE_MS => {
                    repairs.push((account.to_string(), image, token, String::new()));
                }
                None => {}
            }
        }
        self.swap_entries("shared_with_repair", repairs).await;
        Ok(images)
    }

    async fn ping(&self) -> Result<(), MapsError> {
        self.with_connection("ping", |mut c| async move { Ok(c.ping().await?) })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_of_an_image_shares_its_hash_tag() {
        assert_eq!(owner_key("img-abc12345"), "imagefleet:{img-abc12345}:owner");
        assert_eq!(
            shares_key("img-abc12345"),
            "imagefleet:{img-abc12345}:shares"
        );
        assert_eq!(
            shared_with_key("100000000002"),
            "imagefleet:{account-100000000002}:shared-with"
        );
    }

    #[test]
    fn share_values_and_tokens_parse() {
        let token = new_token();
        assert!((unix_ms() - token_ms(&token)).abs() < 60_000);
        let value = format!("1700000000:{token}");
        assert_eq!(time_of(&value), 1_700_000_000);
        assert_eq!(token_of(&value), token);
        assert_eq!(time_of("1700000000"), 1_700_000_000);
        assert_eq!(token_of("1700000000"), "");
        assert_eq!(token_ms("junk"), 0);
    }
}
