-- Rate-limit decisions, atomically: ban check, GCRA, strikes and escalating bans, for one or
-- more identities in order (a batch from one data-plane thread; each decision is exactly what
-- it would be alone). The twin of gcra.rs `check`; keep them in step (the same tests run
-- against both).
-- KEYS, three per decision: gcra hash {tat, t}, ban hash {until, count}, strikes counter; one
--       hash tag per identity.
-- ARGV, nine per decision: now_ms, requests, period_ms, strikes, strike_window_ms, base_ban_ms,
--       multiplier, max_ban_ms, strike_decay_ms
-- Returns, five per decision: verdict (0 allowed, 1 limited, 2 banned), limit, remaining,
--       reset_ms, retry_after_ms.
local function decide(K1, K2, K3, a)
  local now = tonumber(ARGV[a + 1])
  local n = tonumber(ARGV[a + 2])
  local p = tonumber(ARGV[a + 3])
  local need = tonumber(ARGV[a + 4])
  local window = tonumber(ARGV[a + 5])
  local base = tonumber(ARGV[a + 6])
  local mult = tonumber(ARGV[a + 7])
  local maxban = tonumber(ARGV[a + 8])
  local decay = tonumber(ARGV[a + 9])
  local t = p / math.max(n, 1)

  local ban = redis.call('HMGET', K2, 'until', 'count')
  local ban_until = tonumber(ban[1]) or 0
  if ban_until > now then
    return {2, n, 0, ban_until - now, ban_until - now}
  end

  local st = redis.call('HMGET', K1, 'tat', 't')
  local stored = tonumber(st[1]) or 0
  local st_t = tonumber(st[2]) or 0
  local tat = math.max(stored, now)
  if stored > now and st_t > 0 and math.abs(st_t - t) > 1e-9 then
    tat = now + (stored - now) * t / st_t
  end
  local nxt = tat + t
  if nxt - now <= p + 1e-9 then
    redis.call('HSET', K1, 'tat', string.format('%.3f', nxt), 't', string.format('%.6f', t))
    redis.call('PEXPIRE', K1, math.ceil(nxt - now) + 1000)
    local used = nxt - now
    return {0, n, math.max(math.floor((p - used) / t + 1e-9), 0), math.ceil(used), 0}
  end

  redis.call('HSET', K1, 'tat', string.format('%.3f', tat), 't', string.format('%.6f', t))
  redis.call('PEXPIRE', K1, math.ceil(tat - now) + 1000)
  local retry = math.max(math.ceil(nxt - now - p), 1)
  local reset = math.max(math.ceil(tat - now), 0)
  if need > 0 then
    local s = redis.call('INCR', K3)
    if s == 1 then
      redis.call('PEXPIRE', K3, math.max(window, 1))
    end
    if s >= need then
      -- The ban key outlives the ban by the decay period, carrying the count; once it expires
      -- the count starts again from zero.
      local count = (tonumber(ban[2]) or 0) + 1
      local d = math.min(base, maxban)
      for _ = 2, count do
        d = d * math.max(mult, 1)
        if d >= maxban then
          d = maxban
          break
        end
      end
      redis.call('HSET', K2, 'until', now + d, 'count', count)
      redis.call('PEXPIRE', K2, d + math.max(decay, 1))
      redis.call('DEL', K3)
      return {2, n, 0, d, d}
    end
  end
  return {1, n, 0, reset, retry}
end

local out = {}
for i = 0, #KEYS / 3 - 1 do
  local r = decide(KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3], 9 * i)
  for j = 1, 5 do
    out[5 * i + j] = r[j]
  end
end
return out
