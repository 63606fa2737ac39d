-- Rate-limit decisions, atomically: ban check, GCRA, strikes and escalating bans, for one or
-- more identities in order (a batch from one data-plane thread; each decision is what it would
-- be alone). The twin of gcra.rs `check`; keep them in step (the same tests run against both).
-- KEYS, three per decision (one hash tag per identity):
--   GCRA state, a string "<tat_ms> <interval_ms>";
--   ban, a string "<until_ms> <count>", kept for the decay period after the ban ends;
--   strike counter.
-- ARGV, nine per decision: now_ms, requests, period_ms, strikes, strike_window_ms, base_ban_ms,
--       multiplier, max_ban_ms, strike_decay_ms
-- Returns, five per decision: verdict (0 allowed, 1 limited, 2 banned), limit, remaining,
--       reset_ms, retry_after_ms.
-- Cost: one MGET for every state and ban of the batch, then one SET per identity whose state
-- changed, however many of its decisions the batch holds; a ban or a strike adds its own.

-- Numbers by their text: a batch repeats the same few arguments.
local numbers = {}
local function num(s)
  local v = numbers[s]
  if v == nil then
    v = tonumber(s)
    numbers[s] = v
  end
  return v
end

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

local function decide(K1, K2, K3, a)
  local now = num(ARGV[a + 1])
  local n = num(ARGV[a + 2])
  local p = num(ARGV[a + 3])
  local t = p / math.max(n, 1)

  local ban = state[K2]
  if ban[1] > now then
    return 2, n, 0, ban[1] - now, ban[1] - now
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
  local need = num(ARGV[a + 4])
  if need > 0 then
    local s = redis.call('INCR', K3)
    if s == 1 then
      redis.call('PEXPIRE', K3, math.max(num(ARGV[a + 5]), 1))
    end
    if s >= need then
      local base, mult = num(ARGV[a + 6]), num(ARGV[a + 7])
      local maxban, decay = num(ARGV[a + 8]), num(ARGV[a + 9])
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

local out = {}
for i = 0, #KEYS / 3 - 1 do
  local o = 5 * i
  out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5] =
    decide(KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3], 9 * i)
end
for _, key in ipairs(order) do
  local s = state[key]
  redis.call('SET', key, string.format('%.3f %.6f', s[1], s[2]), 'PX', ttl[key])
end
return out
