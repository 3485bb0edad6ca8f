"""The queue's Lua scripts, each run atomically by Redis, and the numbers
they are run with: the claim (`CLAIM`), the sweep of a version's queue onto
the model's (`SWEEP`) and the requeue of a dead worker's claims (`REQUEUE`).
request_queue.py and liveness.py call them; their KEYS and ARGV are
described above each. Only Redis 6.2 commands.
"""

# Most wake-up tokens the list holds: enough to wake that many blocked
# workers (claim loops) on one shard at once; the others find the work when
# they next look, which they do before blocking again.
WAKEUP_TOKENS = 64

# KEYS: processing list, the wake-up lists (ARGV[4] of them), then the
# queues, highest level first, a version's queue and the model's at each
# level (the first ARGV[3] of them are "top": those of the worker's protected
# level and the levels above it). ARGV: how many, how many of them at most
# from below the top, top queues, wake-up lists. Returns {how many came from
# below the top, the items moved...}, highest level first, oldest first
# within a level. LMOVE moves a request without copying it inside Redis
# (LRANGE, LTRIM and RPUSH copied each 150 KB request once more): 30 % less
# Redis CPU per claim of ~15 ResNet50 requests (BENCHMARKS.md, "Redis per
# request").
CLAIM = """
local want, lower = tonumber(ARGV[1]), tonumber(ARGV[2])
local top, wakes = tonumber(ARGV[3]), tonumber(ARGV[4])
local first = 2 + wakes
local result, lowered, waiting = {0}, 0, 0
for i = first, #KEYS do
  local take = want - (#result - 1)
  local below = i >= first + top
  if below and take > lower - lowered then take = lower - lowered end
  for _ = 1, take do
    local item = redis.call('LMOVE', KEYS[i], KEYS[1], 'LEFT', 'RIGHT')
    if not item then break end
    result[#result + 1] = item
    if below then lowered = lowered + 1 end
  end
  waiting = waiting + redis.call('LLEN', KEYS[i])
end
if waiting == 0 then
  for i = 2, first - 1 do redis.call('DEL', KEYS[i]) end
end
result[1] = lowered
return result
"""

# Most requests one sweep call moves. One script call blocks every other
# client of that Redis while it runs, and a queued request is its decoded
# pixels (150 KB at 224x224): 7,900 of them moved by one call blocked Redis
# for 13.7 s on a loaded 2-core host, where calls of 32 (5 MB) took at most
# about 100 ms. (One call also could not take more than about 8,000: `unpack`
# puts each item on Lua's C stack, LUAI_MAXCSTACK.)
SWEEP_CHUNK = 32

# KEYS: the wake-up list, then a version's queues, then the model's, each
# highest level first (as many of each). ARGV: token cap, most to move.
# Moves up to that many requests from the head of the version's queues to
# the tail of the model's, highest level first, oldest first; returns how
# many. `sweep` calls it until a call moves less than a full chunk: each call
# is atomic, so two workers sweeping at once move each request once, in order.
SWEEP = """
local levels = (#KEYS - 1) / 2
local left = tonumber(ARGV[2])
local moved = 0
for level = 1, levels do
  if left > 0 then
    local source, target = KEYS[1 + level], KEYS[1 + levels + level]
    local items = redis.call('LRANGE', source, 0, left - 1)
    if #items > 0 then
      redis.call('RPUSH', target, unpack(items))
      redis.call('LTRIM', source, #items, -1)
      moved = moved + #items
      left = left - #items
    end
  end
end
local tokens = math.min(moved, tonumber(ARGV[1]) - redis.call('LLEN', KEYS[1]))
for i = 1, tokens do redis.call('RPUSH', KEYS[1], '1') end
return moved
"""

# KEYS: processing list, workers set, heartbeat, wake-up list, then the
# queues, highest level first. ARGV: worker id, "1" to act only if the
# heartbeat is gone, token cap. Puts each item back at the head of its own
# level's queue (its header's "priority"; none, or past the last level: the
# nearest level there is), oldest first; returns how many, or -1 if the
# worker is alive.
REQUEUE = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local levels = #KEYS - 4
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do
  local item = items[i]
  local level = 1
  local newline = string.find(item, '\\n', 1, true)
  local header = newline and string.sub(item, 1, newline - 1) or item
  if string.find(header, '"priority"', 1, true) then
    local ok, message = pcall(cjson.decode, header)
    if ok and type(message) == 'table' and type(message.priority) == 'number' then
      level = math.max(1, math.min(levels, math.floor(message.priority)))
    end
  end
  redis.call('LPUSH', KEYS[4 + level], item)
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('SREM', KEYS[2], ARGV[1]) end
local tokens = math.min(#items, tonumber(ARGV[3]) - redis.call('LLEN', KEYS[4]))
for i = 1, tokens do redis.call('RPUSH', KEYS[4], '1') end
return #items
"""
