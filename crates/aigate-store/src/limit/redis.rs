//! Rate-limit store in Redis, shared by replicas.
//!
//! Every operation is one Lua script (sent as `EVALSHA`, loaded on `NOSCRIPT`) that reads Redis's own
//! clock (`TIME`) and does the check and the write atomically: the gateway never reads then writes,
//! and replica clocks do not matter. All the rules of a request are checked by one script call
//! ([`RateLimitStore::acquire_all`]: all or nothing), and the requests that arrive while a call is
//! out go together in the next one (a batcher task, at most [`ACQUIRE_BATCH`] requests a call,
//! each still all or nothing and seeing the reservations of those before it): one round trip and
//! one script run for many requests. The log writer's settlements go in one call per batch
//! ([`RateLimitStore::settle_all`]). The scripts mirror the memory store's arithmetic
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
//!   sub-window after the first reservation of its newest sub-window (`PEXPIRE`, set when that
//!   sub-window starts), when nothing in it counts any more.
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

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

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

/// Check (and reserve if ARGV[1] == '1') of groups of rules, each group the rules of one request,
/// all or nothing per group; the groups one after the other, so a group sees what the ones before
/// it reserved (concurrent requests batched into one call stay exact).
/// KEYS: the rules' keys, group after group. ARGV[1]: write; ARGV[2]: the number of groups; then
/// per group its number of rules followed by six per rule: technique (`f` or `s`), limit, period,
/// sub-window ms, cost, ring length. A group stops at its first rule that refuses and writes only
/// when none does. Returns per group the number of rules checked, then five numbers per rule
/// checked: allowed, used, reset_ms, retry_after_ms, slot (the fixed window or sliding sub-window
/// index).
///
/// Sliding sub-windows after the current one (left by a backward clock step of less than a period)
/// still count.
const ACQUIRE: &str = r"
local write = ARGV[1] == '1'
local function leave(j, period, sub) return (j + 1) * sub + period - 1 end
local out = {}
local function group(k0, a0, n)
  local rules = {}
  local at = #out + 1
  out[at] = 0
  local refused = false
  for i = 1, n do
    local b = a0 + (i - 1) * 6
    local r = {
      key = KEYS[k0 + i], sliding = ARGV[b + 1] == 's', limit = tonumber(ARGV[b + 2]),
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
          if not r.first or j < r.first then r.first = j end
        end
      end
      if r.first then reset = leave(r.first, r.period, r.sub) - now end
      if used + r.cost > r.limit then
        if r.cost > r.limit then
          retry = r.period
        else
          -- Oldest first, until enough has left for the cost to fit.
          table.sort(live, function(x, y) return x[1] < y[1] end)
          local left = used
          for _, e in ipairs(live) do
            left = left - e[2]
            retry = leave(e[1], r.period, r.sub) - now
            if left + r.cost <= r.limit then break end
          end
        end
      end
    end
    r.used, r.at = used, #out + 1
    rules[i] = r
    local ok = used + r.cost <= r.limit
    out[at] = i
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
  if not write then return end
  for _, r in ipairs(rules) do
    if r.sliding and #r.stale > 0 then redis.call('HDEL', r.key, unpack(r.stale)) end
  end
  if refused then return end
  for _, r in ipairs(rules) do
    if not r.sliding then
      if r.same then
        out[r.at + 1] = redis.call('HINCRBY', r.key, 'c', r.costarg)
      else
        redis.call('HSET', r.key, 'w', string.format('%d', r.slot), 'c', r.costarg)
        redis.call('PEXPIREAT', r.key, string.format('%d', r.wend))
        out[r.at + 1] = r.cost
      end
    else
      -- The key lives a period and a sub-window past the first reservation of its newest
      -- sub-window: by then nothing in it counts. Set when that sub-window starts, not per call.
      if redis.call('HINCRBY', r.key, string.format('%d', r.slot), r.costarg) == r.cost then
        redis.call('PEXPIRE', r.key, string.format('%d', r.period + r.sub))
      end
      out[r.at + 1] = r.used + r.cost
      if not r.first and r.cost > 0 then out[r.at + 2] = leave(r.slot, r.period, r.sub) - now end
    end
  end
end
local k0, a = 0, 3
for g = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  group(k0, a, n)
  k0, a = k0 + n, a + 1 + n * 6
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

/// A rate-limit store in Redis, shared by replicas. Cloning shares the connection and the batcher.
#[derive(Clone)]
pub struct RedisLimitStore {
    inner: Arc<Inner>,
    /// Acquisitions for the batcher task, started on the first one.
    queue: Arc<OnceLock<mpsc::Sender<Pending>>>,
}

/// The connection and the scripts (what the batcher task holds).
struct Inner {
    /// The lazily connected, reconnecting connection of the cache store (only its connection is used).
    redis: RedisCacheStore,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisLimitStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLimitStore").field("redis", &self.inner.redis).finish()
    }
}

/// Acquisitions waiting for the batcher; beyond, an acquisition makes its own call.
pub const ACQUIRE_QUEUE: usize = 1024;

/// Most requests' acquisitions in one script call.
pub const ACQUIRE_BATCH: usize = 64;

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

/// The rules of one request as the acquire script takes them: Redis keys, and per rule its spec
/// and cost (clamped to [`MAX_EXACT`]).
struct Group {
    keys: Vec<String>,
    rules: Vec<(LimitSpec, u64)>,
}

impl Group {
    fn new(checks: &[Check<'_>]) -> Group {
        Group {
            keys: checks.iter().map(|c| redis_limit_key(c.key, &c.spec)).collect(),
            rules: checks.iter().map(|c| (c.spec, c.cost.min(MAX_EXACT))).collect(),
        }
    }
}

/// What the script answered for one group: `[allowed, used, reset_ms, retry_after_ms, slot]` per
/// rule checked.
type GroupReply = Vec<[i64; 5]>;

/// An acquisition waiting for the batcher, and where its answer goes.
struct Pending {
    group: Group,
    reply: oneshot::Sender<Result<GroupReply, StoreError>>,
}

/// A store error for each of the requests of a failed batch.
fn for_each_waiter(e: &StoreError) -> StoreError {
    match e {
        StoreError::Timeout => StoreError::Timeout,
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// Sends the acquisitions queued while the previous call was out in one script call, so
/// concurrent requests share a round trip (and Redis's per-call cost) instead of queueing one call
/// each on the connection. Ends when every handle of the store is gone.
async fn batcher(inner: Arc<Inner>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch = Vec::with_capacity(ACQUIRE_BATCH);
    while rx.recv_many(&mut batch, ACQUIRE_BATCH).await > 0 {
        // A request that stopped waiting (its timeout) reserves nothing.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let groups: Vec<&Group> = batch.iter().map(|p| &p.group).collect();
        match inner.acquire(&groups, true).await {
            Ok(replies) => {
                for (p, r) in batch.drain(..).zip(replies) {
                    let _ = p.reply.send(Ok(r));
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(for_each_waiter(&e)));
                }
            }
        }
    }
}

impl Inner {
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

    /// The acquire script over `groups` (`write`: reserve); one reply per group.
    async fn acquire(&self, groups: &[&Group], write: bool) -> Result<Vec<GroupReply>, StoreError> {
        let lua = &self.scripts.acquire;
        let mut call = lua.call(groups.iter().map(|g| g.keys.len()).sum());
        for key in groups.iter().flat_map(|g| &g.keys) {
            call.arg(key);
        }
        call.arg(if write { "1" } else { "0" }).arg(groups.len());
        for g in groups {
            call.arg(g.rules.len());
            for (spec, cost) in &g.rules {
                call.arg(technique_arg(spec))
                    .arg(spec.limit.min(MAX_EXACT))
                    .arg(spec.period())
                    .arg(spec.sub_window_ms())
                    .arg(*cost)
                    .arg(spec.ring_len());
            }
        }
        let reply: Vec<i64> = self.run(lua, &call).await?;
        let corrupt = || StoreError::Corrupt(format!("rate-limit script returned {reply:?}"));
        let mut rest = &reply[..];
        let mut out = Vec::with_capacity(groups.len());
        for g in groups {
            let (&n, tail) = rest.split_first().ok_or_else(corrupt)?;
            let n = usize::try_from(n).map_err(|_| corrupt())?;
            if n > g.rules.len() || (n == 0 && !g.rules.is_empty()) || tail.len() < n * 5 {
                return Err(corrupt());
            }
            let (mine, tail) = tail.split_at(n * 5);
            out.push(mine.chunks_exact(5).map(|r| [r[0], r[1], r[2], r[3], r[4]]).collect());
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(corrupt());
        }
        Ok(out)
    }
}

impl RedisLimitStore {
    /// A store for the Redis at `url` (`redis://` or `rediss://`), bounding every operation by
    /// `op_timeout`. Does not connect: fails only on a malformed URL.
    pub fn new(url: &str, op_timeout: Duration) -> Result<RedisLimitStore, StoreError> {
        let inner = Inner { redis: RedisCacheStore::new(url, op_timeout)?, scripts: Scripts::new() };
        Ok(RedisLimitStore { inner: Arc::new(inner), queue: Arc::new(OnceLock::new()) })
    }

    /// The per-operation timeout.
    pub fn op_timeout(&self) -> Duration {
        self.inner.redis.op_timeout()
    }

    /// A request's acquisition, through the batcher (its own call when the batcher's queue is
    /// full or there is no runtime to run it on).
    async fn acquire_batched(&self, group: Group) -> Result<GroupReply, StoreError> {
        let queue = tokio::runtime::Handle::try_current().ok().map(|rt| {
            self.queue.get_or_init(|| {
                let (tx, rx) = mpsc::channel(ACQUIRE_QUEUE);
                rt.spawn(batcher(self.inner.clone(), rx));
                tx
            })
        });
        let (tx, rx) = oneshot::channel();
        let pending = Pending { group, reply: tx };
        let pending = match queue {
            Some(q) => match q.try_send(pending) {
                Ok(()) => {
                    // A call in flight and this one's own: bounded by the operation timeout.
                    return match tokio::time::timeout(self.op_timeout(), rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err(StoreError::Unavailable("redis: the limit batcher stopped".into())),
                        Err(_) => Err(StoreError::Timeout),
                    };
                }
                Err(mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p)) => p,
            },
            None => pending,
        };
        let group = pending.group;
        let mut replies = self.inner.acquire(&[&group], true).await?;
        replies.pop().ok_or_else(|| StoreError::Corrupt("rate-limit script returned nothing".into()))
    }

    /// The acquire / peek script over `checks`: `write` reserves.
    async fn check(&self, checks: &[Check<'_>], write: bool) -> Result<Vec<Decision>, StoreError> {
        if checks.is_empty() {
            return Ok(Vec::new());
        }
        let group = Group::new(checks);
        let reply = if write {
            self.acquire_batched(group).await?
        } else {
            let mut replies = self.inner.acquire(&[&group], false).await?;
            replies.pop().ok_or_else(|| StoreError::Corrupt("rate-limit script returned nothing".into()))?
        };
        let all_allowed = reply.iter().all(|r| r[0] == 1);
        Ok(reply
            .iter()
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
        let lua = &self.inner.scripts.settle;
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
        let _applied: i64 = self.inner.run(lua, &call).await?;
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
