//! Rate-limit store in Redis, shared by replicas.
//!
//! Every operation is one Lua script (sent as `EVALSHA`, loaded on `NOSCRIPT`) that reads Redis's own
//! clock (`TIME`) and does the check and the write atomically: the gateway never reads then writes,
//! and replica clocks do not matter. The scripts mirror the memory store's arithmetic
//! ([`crate::limit`]), so both pass the same conformance suite.
//!
//! Layout (one key per rule and limiter key, so a rule whose period or technique changes starts from
//! zero instead of misreading old counters):
//!
//! - fixed: hash `aigate:rl:f:<period_ms>:<key>` with fields `w` (window index, `start / period`) and
//!   `c` (usage), expiring at the window end (`PEXPIREAT`). The window index is stored so correctness
//!   never depends on the exact ms at which Redis expires the key.
//! - sliding: hash `aigate:rl:s:<period_ms>:<key>`, one field per sub-window index holding its usage;
//!   fields out of the period are deleted when seen, and the key expires one period plus one
//!   sub-window after its last reservation (`PEXPIRE`), when nothing in it counts any more.
//!
//! Numbers: Lua computes in doubles, so limits and costs are clamped to [`MAX_EXACT`] (2^53 − 1);
//! a larger limit is as good as unlimited.
//!
//! Failure behaviour: the connection is the cache store's (lazy, created in the background, paced
//! reconnects): [`RedisLimitStore::new`] never connects and succeeds while Redis is down; an
//! unreachable Redis makes operations fail fast with [`StoreError::Unavailable`]; every operation is
//! bounded by the operation timeout ([`LIMIT_REDIS_OP_TIMEOUT`] from [`crate::build_limit_store`])
//! and returns [`StoreError::Timeout`] past it. Whether a failing limiter allows or denies is the
//! caller's decision. Nothing panics.

use std::sync::Arc;
use std::time::Duration;

use crate::limit::decision;
use crate::{Decision, LimitSpec, RateLimitStore, RedisCacheStore, Reservation, StoreError, Technique};

/// Per-operation timeout of the Redis rate-limit store built by [`crate::build_limit_store`].
pub const LIMIT_REDIS_OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Largest limit, cost or amount sent to Redis (exact in Lua's doubles); larger values are clamped.
pub const MAX_EXACT: u64 = (1 << 53) - 1;

/// Redis time in ms, shared by every script.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Fixed window check (and reserve if ARGV[4] == '1').
/// ARGV: limit, period, cost, write. Returns {allowed, used, reset_ms, retry_after_ms, window}.
const FIXED_ACQUIRE: &str = r"
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local w = math.floor(now / period)
local wend = (w + 1) * period
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
local same = v[1] and tonumber(v[1]) == w
local used = 0
if same then used = tonumber(v[2]) or 0 end
local reset = wend - now
if used + cost > limit then
  local retry = reset
  if cost > limit then retry = period end
  return {0, used, reset, retry, w}
end
if ARGV[4] ~= '1' then return {1, used, reset, 0, w} end
if same then
  used = redis.call('HINCRBY', KEYS[1], 'c', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'w', string.format('%d', w), 'c', ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], string.format('%d', wend))
  used = cost
end
return {1, used, reset, 0, w}
";

/// Fixed window settlement. ARGV: period, window, reserved, actual. Returns 1 if applied.
const FIXED_SETTLE: &str = r"
local period = tonumber(ARGV[1])
local w = tonumber(ARGV[2])
if math.floor(now / period) ~= w then return 0 end
local v = redis.call('HMGET', KEYS[1], 'w', 'c')
if not v[1] or tonumber(v[1]) ~= w then return 0 end
local c = math.max((tonumber(v[2]) or 0) - tonumber(ARGV[3]), 0) + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'c', string.format('%d', c))
return 1
";

/// Sliding window check (and reserve if ARGV[5] == '1').
/// ARGV: limit, period, sub-window ms, cost, write, ring length. Sub-windows after the current one
/// (left by a backward clock step of less than a period) still count. Returns {allowed, used, reset_ms, retry_after_ms,
/// sub-window}.
const SLIDING_ACQUIRE: &str = r"
local limit = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local sub = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local write = ARGV[5] == '1'
local ring = tonumber(ARGV[6])
local cur = math.floor(now / sub)
local oldest = 0
if now + 1 >= period then oldest = math.floor((now + 1 - period) / sub) end
local function leave(j) return (j + 1) * sub + period - 1 end
local flat = redis.call('HGETALL', KEYS[1])
local live = {}
local stale = {}
local used = 0
for i = 1, #flat, 2 do
  local j = tonumber(flat[i])
  local c = tonumber(flat[i + 1]) or 0
  if j == nil or j < oldest or j >= cur + ring then
    stale[#stale + 1] = flat[i]
  elseif c > 0 then
    used = used + c
    live[#live + 1] = {j, c}
  end
end
table.sort(live, function(a, b) return a[1] < b[1] end)
if write and #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
if used + cost > limit then
  local reset = 0
  if #live > 0 then reset = leave(live[1][1]) - now end
  local retry = 0
  if cost > limit then
    retry = period
  else
    local left = used
    for _, e in ipairs(live) do
      left = left - e[2]
      retry = leave(e[1]) - now
      if left + cost <= limit then break end
    end
  end
  return {0, used, reset, retry, cur}
end
if write then
  redis.call('HINCRBY', KEYS[1], string.format('%d', cur), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], string.format('%d', period + sub))
  used = used + cost
end
local first = nil
if #live > 0 then first = live[1][1] elseif write and cost > 0 then first = cur end
local reset = 0
if first then reset = leave(first) - now end
return {1, used, reset, 0, cur}
";

/// Sliding window settlement. ARGV: period, sub-window ms, sub-window, reserved, actual. Returns 1 if
/// applied.
const SLIDING_SETTLE: &str = r"
local period = tonumber(ARGV[1])
local sub = tonumber(ARGV[2])
local j = tonumber(ARGV[3])
local oldest = 0
if now + 1 >= period then oldest = math.floor((now + 1 - period) / sub) end
if j < oldest then return 0 end
local c = redis.call('HGET', KEYS[1], ARGV[3])
if not c then return 0 end
c = math.max(tonumber(c) - tonumber(ARGV[4]), 0) + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], ARGV[3], string.format('%d', c))
return 1
";

/// The four scripts, hashed once.
struct Scripts {
    fixed_acquire: redis::Script,
    fixed_settle: redis::Script,
    sliding_acquire: redis::Script,
    sliding_settle: redis::Script,
}

impl Scripts {
    fn new() -> Scripts {
        let s = |body: &str| redis::Script::new(&format!("{NOW}{body}"));
        Scripts {
            fixed_acquire: s(FIXED_ACQUIRE),
            fixed_settle: s(FIXED_SETTLE),
            sliding_acquire: s(SLIDING_ACQUIRE),
            sliding_settle: s(SLIDING_SETTLE),
        }
    }
}

/// A rate-limit store in Redis, shared by replicas. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisLimitStore {
    /// The lazily connected, reconnecting connection of the cache store (only its connection is used).
    redis: RedisCacheStore,
    scripts: Arc<Scripts>,
}

impl std::fmt::Debug for RedisLimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimitStore").field("redis", &self.redis).finish()
    }
}

/// The Redis key of a limiter key under a rule.
pub fn redis_limit_key(key: &str, spec: &LimitSpec) -> String {
    let t = match spec.technique {
        Technique::Fixed => 'f',
        Technique::Sliding => 's',
    };
    format!("aigate:rl:{t}:{}:{key}", spec.period())
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl RedisLimitStore {
    /// A store for the Redis at `url` (`redis://` or `rediss://`), bounding every operation by
    /// `op_timeout`. Does not connect: fails only on a malformed URL.
    pub fn new(url: &str, op_timeout: Duration) -> Result<RedisLimitStore, StoreError> {
        Ok(RedisLimitStore { redis: RedisCacheStore::new(url, op_timeout)?, scripts: Arc::new(Scripts::new()) })
    }

    /// The per-operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.redis.op_timeout()
    }

    /// Runs one script invocation, bounded by the operation timeout.
    async fn run<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        tokio::time::timeout(self.redis.op_timeout(), async {
            let mut conn = self.redis.conn().await?;
            inv.invoke_async::<T>(&mut conn).await.map_err(|e| StoreError::Unavailable(format!("redis: {e}")))
        })
        .await
        .map_err(|_| StoreError::Timeout)?
    }

    /// The acquire / peek script: `write` reserves.
    async fn check(&self, key: &str, spec: &LimitSpec, cost: u64, write: bool) -> Result<Decision, StoreError> {
        let limit = spec.limit.min(MAX_EXACT);
        let cost = cost.min(MAX_EXACT);
        let rkey = redis_limit_key(key, spec);
        let w = if write { "1" } else { "0" };
        let reply: Vec<i64> = match spec.technique {
            Technique::Fixed => {
                let mut inv = self.scripts.fixed_acquire.key(rkey);
                inv.arg(limit).arg(spec.period()).arg(cost).arg(w);
                self.run(&inv).await?
            }
            Technique::Sliding => {
                let mut inv = self.scripts.sliding_acquire.key(rkey);
                inv.arg(limit).arg(spec.period()).arg(spec.sub_window_ms()).arg(cost).arg(w).arg(spec.ring_len());
                self.run(&inv).await?
            }
        };
        let [allowed, used, reset, retry, slot] = reply[..] else {
            return Err(StoreError::Corrupt(format!("rate-limit script returned {reply:?}")));
        };
        let mut d = decision(spec.limit, allowed == 1, to_u64(used), to_u64(reset), to_u64(retry));
        if write && d.allowed {
            d.reservation = Some(Reservation { key: Arc::from(key), spec: *spec, slot: to_u64(slot), amount: cost });
        }
        Ok(d)
    }
}

#[async_trait::async_trait]
impl RateLimitStore for RedisLimitStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn acquire(&self, key: &str, spec: &LimitSpec, cost: u64) -> Result<Decision, StoreError> {
        self.check(key, spec, cost, true).await
    }

    async fn settle(&self, reservation: &Reservation, actual: u64) -> Result<(), StoreError> {
        let spec = &reservation.spec;
        let rkey = redis_limit_key(&reservation.key, spec);
        let (amount, actual) = (reservation.amount.min(MAX_EXACT), actual.min(MAX_EXACT));
        let _applied: i64 = match spec.technique {
            Technique::Fixed => {
                let mut inv = self.scripts.fixed_settle.key(rkey);
                inv.arg(spec.period()).arg(reservation.slot).arg(amount).arg(actual);
                self.run(&inv).await?
            }
            Technique::Sliding => {
                let mut inv = self.scripts.sliding_settle.key(rkey);
                inv.arg(spec.period()).arg(spec.sub_window_ms()).arg(reservation.slot).arg(amount).arg(actual);
                self.run(&inv).await?
            }
        };
        Ok(())
    }

    async fn peek(&self, key: &str, spec: &LimitSpec) -> Result<Decision, StoreError> {
        self.check(key, spec, 1, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_namespaced_per_rule() {
        let f = LimitSpec { limit: 1, period_ms: 60_000, technique: Technique::Fixed };
        let s = LimitSpec { technique: Technique::Sliding, ..f };
        assert_eq!(redis_limit_key("gw:prod:user=a", &f), "aigate:rl:f:60000:gw:prod:user=a");
        assert_eq!(redis_limit_key("gw:prod:user=a", &s), "aigate:rl:s:60000:gw:prod:user=a");
    }
}
