-- Rate-limit decisions, atomically: ban check, GCRA, strikes and escalating bans, for one or
-- more identities in order (a batch from one data-plane thread; each decision is what it would
-- be alone). The twin of gcra.rs `check`; keep them in step (the same tests run against both).
-- The decisions come in groups: one identity's consecutive decisions under the same limits.
-- KEYS, three per group (one hash tag per identity):
--   GCRA state, a string "<tat_ms> <interval_ms>";
--   ban, a string "<until_ms> <count>", kept for the decay period after the ban ends;
--   strike counter.
-- ARGV, per group: the number of decisions c, requests, period_ms, strikes, strike_window_ms,
--       base_ban_ms, multiplier, max_ban_ms, strike_decay_ms, then c times now_ms (0: this
--       Redis's clock).
-- Returns, five per decision, groups in order: verdict (0 allowed, 1 limited, 2 banned), limit,
--       remaining, reset_ms, retry_after_ms.
-- Cost: one MGET for every state and ban of the batch, then one SET per identity whose state
-- changed, however many of its decisions the batch holds; a ban or a strike adds its own.

-- "<a> <b>" as {a, b}; absent or anything else reads as {0, 0}.
local function pair(v)
  if v then
    local a, b = string.match(v, '^(%S+) (%S+)$')
    a, b = tonumber(a), tonumber(b)
    if a and b then
      return {a, b}
    end
  end
  return {0, 0}
end

-- Parsed values by key name, read with one MGET and kept current below.
local state = {}
do
  local names = {}
  for i = 1, #KEYS, 3 do
    names[#names + 1] = KEYS[i]
    names[#names + 1] = KEYS[i + 1]
  end
  local got = redis.call('MGET', unpack(names))
  for j = 1, #names do
    if state[names[j]] == nil then
      state[names[j]] = pair(got[j])
    end
  end
end

-- GCRA states to write at the end, with their time to live.
local ttl = {}
local order = {}
local function store(key, tat, t, live)
  local s = state[key]
  s[1], s[2] = tat, t
  if not ttl[key] then
    order[#order + 1] = key
  end
  ttl[key] = live
end

-- One decision at `now` under the group's limits `L` = {requests, period_ms, strikes,
-- strike_window_ms, base_ban_ms, multiplier, max_ban_ms, strike_decay_ms}.
local function decide(K1, K2, K3, now, L)
  local n, p = L[1], L[2]
  local t = p / math.max(n, 1)

  local ban = state[K2]
  if ban[1] > now then
    return 2, n, 0, ban[1] - now, ban[1] - now
  end
  -- No limit to count against (requests 0): the ban alone was asked about.
  if n == 0 then
    return 0, 0, 0, 0, 0
  end

  local st = state[K1]
  local stored, st_t = st[1], st[2]
  local tat = math.max(stored, now)
  if stored > now and st_t > 0 and math.abs(st_t - t) > 1e-9 then
    tat = now + (stored - now) * t / st_t
  end
  local nxt = tat + t
  if nxt - now <= p + 1e-9 then
    store(K1, nxt, t, math.ceil(nxt - now) + 1000)
    local used = nxt - now
    return 0, n, math.max(math.floor((p - used) / t + 1e-9), 0), math.ceil(used), 0
  end

  store(K1, tat, t, math.ceil(tat - now) + 1000)
  local retry = math.max(math.ceil(nxt - now - p), 1)
  local reset = math.max(math.ceil(tat - now), 0)
  local need = L[3]
  if need > 0 then
    local s = redis.call('INCR', K3)
    if s == 1 then
      redis.call('PEXPIRE', K3, math.max(L[4], 1))
    end
    if s >= need then
      local base, mult, maxban, decay = L[5], L[6], L[7], L[8]
      -- The ban key outlives the ban by the decay period, carrying the count; once it expires
      -- the count starts again from zero.
      local count = ban[2] + 1
      local d = math.min(base, maxban)
      for _ = 2, count do
        d = d * math.max(mult, 1)
        if d >= maxban then
          d = maxban
          break
        end
      end
      ban[1], ban[2] = now + d, count
      redis.call('SET', K2, string.format('%d %d', now + d, count), 'PX', d + math.max(decay, 1))
      redis.call('DEL', K3)
      return 2, n, 0, d, d
    end
  end
  return 1, n, 0, reset, retry
end

-- A time of 0 is "now" on this Redis's clock, read once per call: the decisions of every data
-- plane then share one clock, in the order Redis makes them, however far apart the data planes'
-- own clocks are. (Tests pass times of their own.)
if redis.replicate_commands then
  redis.replicate_commands()
end
local server_now = nil
local function at(v)
  local t = tonumber(v)
  if t ~= 0 then
    return t
  end
  if not server_now then
    local r = redis.call('TIME')
    server_now = tonumber(r[1]) * 1000 + math.floor(tonumber(r[2]) / 1000)
  end
  return server_now
end

local out = {}
local o = 0
local a = 1
for g = 0, #KEYS / 3 - 1 do
  local K1, K2, K3 = KEYS[3 * g + 1], KEYS[3 * g + 2], KEYS[3 * g + 3]
  local c = tonumber(ARGV[a])
  local L = {}
  for j = 1, 8 do
    L[j] = tonumber(ARGV[a + j])
  end
  a = a + 9
  for _ = 1, c do
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] =
      decide(K1, K2, K3, at(ARGV[a]), L)
    o = o + 5
    a = a + 1
  end
end
for _, key in ipairs(order) do
  local s = state[key]
  redis.call('SET', key, string.format('%.3f %.6f', s[1], s[2]), 'PX', ttl[key])
end
return out
