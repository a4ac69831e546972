//! Rate-limit store in Redis, shared by replicas.
//!
//! Every operation is one Lua script (sent as `EVALSHA`, loaded on `NOSCRIPT`) that reads Redis's own
//! clock (`TIME`) and does the check and the write atomically: the gateway never reads then writes,
//! and replica clocks do not matter. All the rules of a request are checked by one script call
//! ([`RateLimitStore::acquire_all`]: one round trip, all or nothing), and the log writer's
//! settlements go in one call per batch ([`RateLimitStore::settle_all`]). The scripts mirror the memory store's arithmetic
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
use crate::{Check, Decision, LimitSpec, RateLimitStore, RedisCacheStore, Reservation, StoreError, Technique};

/// Per-operation timeout of the Redis rate-limit store built by [`crate::build_limit_store`].
pub const LIMIT_REDIS_OP_TIMEOUT: Duration = Duration::from_millis(250);

/// Largest limit, cost or amount sent to Redis (exact in Lua's doubles); larger values are clamped.
pub const MAX_EXACT: u64 = (1 << 53) - 1;

/// Redis time in ms, shared by every script.
const NOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// Check (and reserve if ARGV[1] == '1') of every rule of a request, all or nothing.
/// KEYS: one per rule. ARGV[1]: write; then six per rule: technique (`f` or `s`), limit, period,
/// sub-window ms, cost, ring length (the last two only read for sliding). Stops at the first rule
/// that refuses; writes only when none does. Returns five numbers per rule checked: allowed, used,
/// reset_ms, retry_after_ms, slot (the fixed window or sliding sub-window index).
///
/// Sliding sub-windows after the current one (left by a backward clock step of less than a period)
/// still count.
const ACQUIRE: &str = r"
local write = ARGV[1] == '1'
local function leave(j, period, sub) return (j + 1) * sub + period - 1 end
local rules = {}
local out = {}
local refused = false
for i = 1, #KEYS do
  local b = 1 + (i - 1) * 6
  local r = {
    key = KEYS[i], sliding = ARGV[b + 1] == 's', limit = tonumber(ARGV[b + 2]),
    period = tonumber(ARGV[b + 3]), sub = tonumber(ARGV[b + 4]), cost = tonumber(ARGV[b + 5]),
    costarg = ARGV[b + 5], ring = tonumber(ARGV[b + 6])
  }
  local used, reset, retry = 0, 0, 0
  if not r.sliding then
    r.slot = math.floor(now / r.period)
    r.wend = (r.slot + 1) * r.period
    local v = redis.call('HMGET', r.key, 'w', 'c')
    r.same = v[1] and tonumber(v[1]) == r.slot
    if r.same then used = tonumber(v[2]) or 0 end
    reset = r.wend - now
    if used + r.cost > r.limit then
      retry = reset
      if r.cost > r.limit then retry = r.period end
    end
  else
    r.slot = math.floor(now / r.sub)
    local oldest = 0
    if now + 1 >= r.period then oldest = math.floor((now + 1 - r.period) / r.sub) end
    local flat = redis.call('HGETALL', r.key)
    local live = {}
    r.stale = {}
    for k = 1, #flat, 2 do
      local j = tonumber(flat[k])
      local c = tonumber(flat[k + 1]) or 0
      if j == nil or j < oldest or j >= r.slot + r.ring then
        r.stale[#r.stale + 1] = flat[k]
      elseif c > 0 then
        used = used + c
        live[#live + 1] = {j, c}
      end
    end
    table.sort(live, function(a, b) return a[1] < b[1] end)
    r.first = live[1] and live[1][1]
    if r.first then reset = leave(r.first, r.period, r.sub) - now end
    if used + r.cost > r.limit then
      if r.cost > r.limit then
        retry = r.period
      else
        local left = used
        for _, e in ipairs(live) do
          left = left - e[2]
          retry = leave(e[1], r.period, r.sub) - now
          if left + r.cost <= r.limit then break end
        end
      end
    end
  end
  r.used, r.reset = used, reset
  rules[i] = r
  local ok = used + r.cost <= r.limit
  out[#out + 1] = ok and 1 or 0
  out[#out + 1] = used
  out[#out + 1] = reset
  out[#out + 1] = ok and 0 or retry
  out[#out + 1] = r.slot
  if not ok then
    refused = true
    break
  end
end
if not write then return out end
for i, r in ipairs(rules) do
  if r.sliding and #r.stale > 0 then redis.call('HDEL', r.key, unpack(r.stale)) end
end
if refused then return out end
for i, r in ipairs(rules) do
  local o = (i - 1) * 5
  if not r.sliding then
    if r.same then
      out[o + 2] = redis.call('HINCRBY', r.key, 'c', r.costarg)
    else
      redis.call('HSET', r.key, 'w', string.format('%d', r.slot), 'c', r.costarg)
      redis.call('PEXPIREAT', r.key, string.format('%d', r.wend))
      out[o + 2] = r.cost
    end
  else
    redis.call('HINCRBY', r.key, string.format('%d', r.slot), r.costarg)
    redis.call('PEXPIRE', r.key, string.format('%d', r.period + r.sub))
    out[o + 2] = r.used + r.cost
    if not r.first and r.cost > 0 then out[o + 3] = leave(r.slot, r.period, r.sub) - now end
  end
end
return out
";

/// Settlement of reservations. KEYS: one per reservation. ARGV: six per reservation: technique
/// (`f` or `s`), period, sub-window ms, slot, reserved, actual. A reservation whose window or
/// sub-window no longer counts is skipped. Returns how many were applied.
const SETTLE: &str = r"
local applied = 0
for i = 1, #KEYS do
  local b = (i - 1) * 6
  local period = tonumber(ARGV[b + 2])
  local sub = tonumber(ARGV[b + 3])
  local slot = tonumber(ARGV[b + 4])
  local reserved = tonumber(ARGV[b + 5])
  local actual = tonumber(ARGV[b + 6])
  if ARGV[b + 1] == 'f' then
    if math.floor(now / period) == slot then
      local v = redis.call('HMGET', KEYS[i], 'w', 'c')
      if v[1] and tonumber(v[1]) == slot then
        local c = math.max((tonumber(v[2]) or 0) - reserved, 0) + actual
        redis.call('HSET', KEYS[i], 'c', string.format('%d', c))
        applied = applied + 1
      end
    end
  else
    local oldest = 0
    if now + 1 >= period then oldest = math.floor((now + 1 - period) / sub) end
    if slot >= oldest then
      local c = redis.call('HGET', KEYS[i], ARGV[b + 4])
      if c then
        c = math.max(tonumber(c) - reserved, 0) + actual
        redis.call('HSET', KEYS[i], ARGV[b + 4], string.format('%d', c))
        applied = applied + 1
      end
    end
  end
end
return applied
";

/// A Lua script, hashed once: called with `EVALSHA`, loaded on `NOSCRIPT`.
///
/// Called by hand rather than through `redis::Script::invoke_async`, which copies the keys and
/// arguments twice and the whole source once per call (to have its `SCRIPT LOAD` ready): this runs
/// for every request with limits.
struct Lua {
    code: String,
    hash: String,
}

impl Lua {
    fn new(body: &str) -> Lua {
        let code = format!("{NOW}{body}");
        let hash = redis::Script::new(&code).get_hash().to_owned();
        Lua { code, hash }
    }

    /// `EVALSHA <hash> <nkeys>`: the keys and then the arguments follow.
    fn call(&self, nkeys: usize) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(&self.hash).arg(nkeys);
        c
    }
}

/// The two scripts.
struct Scripts {
    acquire: Lua,
    settle: Lua,
}

impl Scripts {
    fn new() -> Scripts {
        Scripts { acquire: Lua::new(ACQUIRE), settle: Lua::new(SETTLE) }
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

    /// Runs one script call (built by [`Lua::call`]), loading the script if Redis does not have
    /// it; bounded by the operation timeout.
    async fn run<T: redis::FromRedisValue>(&self, lua: &Lua, call: &redis::Cmd) -> Result<T, StoreError> {
        let failed = |e: redis::RedisError| StoreError::Unavailable(format!("redis: {e}"));
        tokio::time::timeout(self.redis.op_timeout(), async {
            let mut conn = self.redis.conn().await?;
            match call.query_async::<T>(&mut conn).await {
                Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
                    redis::cmd("SCRIPT")
                        .arg("LOAD")
                        .arg(&lua.code)
                        .query_async::<()>(&mut conn)
                        .await
                        .map_err(failed)?;
                    call.query_async::<T>(&mut conn).await.map_err(failed)
                }
                r => r.map_err(failed),
            }
        })
        .await
        .map_err(|_| StoreError::Timeout)?
    }

    /// The acquire / peek script over `checks`: `write` reserves.
    async fn check(&self, checks: &[Check<'_>], write: bool) -> Result<Vec<Decision>, StoreError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let lua = &self.scripts.acquire;
        let mut call = lua.call(checks.len());
        for c in checks {
            call.arg(redis_limit_key(c.key, &c.spec));
        }
        call.arg(if write { "1" } else { "0" });
        for c in checks {
            let spec = &c.spec;
            call.arg(technique_arg(spec))
                .arg(spec.limit.min(MAX_EXACT))
                .arg(spec.period())
                .arg(spec.sub_window_ms())
                .arg(c.cost.min(MAX_EXACT))
                .arg(spec.ring_len());
        }
        let reply: Vec<i64> = self.run(lua, &call).await?;
        if reply.is_empty() || !reply.len().is_multiple_of(5) || reply.len() / 5 > checks.len() {
            return Err(StoreError::Corrupt(format!("rate-limit script returned {reply:?}")));
        }
        let all_allowed = reply.chunks(5).all(|r| r[0] == 1);
        Ok(reply
            .chunks(5)
            .zip(checks)
            .map(|(r, c)| {
                let mut d = decision(c.spec.limit, r[0] == 1, to_u64(r[1]), to_u64(r[2]), to_u64(r[3]));
                if write && all_allowed {
                    d.reservation = Some(Reservation {
                        key: Arc::from(c.key),
                        spec: c.spec,
                        slot: to_u64(r[4]),
                        amount: c.cost.min(MAX_EXACT),
                    });
                }
                d
            })
            .collect())
    }

    /// One decision of a single check.
    async fn check_one(&self, key: &str, spec: &LimitSpec, cost: u64, write: bool) -> Result<Decision, StoreError> {
        let mut ds = self.check(&[Check { key, spec: *spec, cost }], write).await?;
        ds.pop().ok_or_else(|| StoreError::Corrupt("rate-limit script returned nothing".into()))
    }
}

/// A rule's technique as the scripts read it.
fn technique_arg(spec: &LimitSpec) -> &'static str {
    match spec.technique {
        Technique::Fixed => "f",
        Technique::Sliding => "s",
    }
}

#[async_trait::async_trait]
impl RateLimitStore for RedisLimitStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn acquire(&self, key: &str, spec: &LimitSpec, cost: u64) -> Result<Decision, StoreError> {
        self.check_one(key, spec, cost, true).await
    }

    async fn settle(&self, reservation: &Reservation, actual: u64) -> Result<(), StoreError> {
        self.settle_all(&[(reservation.clone(), actual)]).await
    }

    async fn peek(&self, key: &str, spec: &LimitSpec) -> Result<Decision, StoreError> {
        self.check_one(key, spec, 1, false).await
    }

    /// One script call for every rule of the request: one round trip, and all or nothing in Redis.
    async fn acquire_all(&self, checks: &[Check<'_>]) -> Result<Vec<Decision>, StoreError> {
        self.check(checks, true).await
    }

    /// One script call for all the settlements.
    async fn settle_all(&self, settlements: &[(Reservation, u64)]) -> Result<(), StoreError> {
        if settlements.is_empty() {
            return Ok(());
        }
        let lua = &self.scripts.settle;
        let mut call = lua.call(settlements.len());
        for (r, _) in settlements {
            call.arg(redis_limit_key(&r.key, &r.spec));
        }
        for (r, actual) in settlements {
            let spec = &r.spec;
            call.arg(technique_arg(spec))
                .arg(spec.period())
                .arg(spec.sub_window_ms())
                .arg(r.slot)
                .arg(r.amount.min(MAX_EXACT))
                .arg((*actual).min(MAX_EXACT));
        }
        let _applied: i64 = self.run(lua, &call).await?;
        Ok(())
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
