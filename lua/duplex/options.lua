--- The options of duplex.listen, its routes, duplex.connect and
--- duplex.redis.connect: each one's kind and range, in one place, checked
--- when the call is made. A typo (`timeot`) or a wrong value
--- (`max_connections = "many"`) is an error that names the option, raised
--- to the caller, not a failure much later in some connection.
---
--- Runs on Lua 5.4 and on LuaJIT: no integer operators here.
local options = {}

local INT_MAX = 2 ^ 53

local function integer(lo, hi)
  return function(v)
    if type(v) ~= "number" or v % 1 ~= 0 or v < lo or v > hi then
      return "an integer from " .. lo .. " to " .. (hi == INT_MAX and "2^53" or hi)
    end
  end
end

local function number(lo, hi)
  return function(v)
    if type(v) ~= "number" or v ~= v or v < lo or v > hi then return "a number from " .. lo .. " to " .. hi end
  end
end

local function kind(t)
  return function(v)
    if type(v) ~= t then return "a " .. t end
  end
end

local function either(a, b, what)
  return function(v)
    if a(v) and b(v) then return what end
  end
end

local function strings(v)
  if type(v) ~= "table" then return "a list of strings" end
  for _, s in ipairs(v) do
    if type(s) ~= "string" then return "a list of strings" end
  end
end

-- A table whose own keys are known too (tls = { cert =, key = }).
local function fields(known)
  return function(v)
    if type(v) ~= "table" then return "a table" end
    for k, x in pairs(v) do
      local check = known[k]
      if not check then return "a table without the field '" .. tostring(k) .. "'" end
      local bad = check(x)
      if bad then return "a table whose '" .. k .. "' is " .. bad end
    end
  end
end

local boolean, func, str, tbl = kind("boolean"), kind("function"), kind("string"), kind("table")
local seconds = number(0, 86400 * 365)
local bytes = integer(0, INT_MAX)

-- What each connection takes: for listen, for every route, for connect.
local CONNECTION = {
  max_message = integer(1, INT_MAX),
  max_frame = bytes,
  streaming = boolean,
  ping_interval = seconds,
  ping_timeout = seconds,
  close_timeout = seconds,
  high_water = bytes,
  low_water = bytes,
  max_buffered = bytes,
  send_timeout = seconds,
  compress_threshold = bytes,
  deflate = either(boolean, tbl, "true, false or a table"),
  protocols = strings,
  headers = tbl,
}

local ROUTE = {
  handler = func,
  on_open = func,
  on_message = func,
  select_protocol = func,
  origins = strings,
  on_request = func,
  on_close = func,
}

local LISTEN = {
  host = str,
  port = integer(0, 65535),
  path = str,
  routes = tbl,
  on_http = func,
  trusted_proxies = strings,
  tls = fields { cert = str, key = str, chain = str },
  max_connections = integer(1, INT_MAX),
  handshake_timeout = seconds,
  max_header_size = integer(64, INT_MAX),
  max_headers = integer(1, INT_MAX),
  backlog = integer(1, 65535),
  reuseport = boolean,
  log = func,
}

local CONNECT = {
  origin = str,
  timeout = seconds,
  tls = fields { ca = str, servername = str, verify = boolean, context = function(v)
    if type(v) ~= "userdata" then return "a context from duplex.core.tls_context" end
  end },
  proxy = str,
  follow_redirects = either(boolean, integer(0, 10), "true, false or a count 0..10"),
  bind = str,
  max_header_size = integer(64, INT_MAX),
}

local function union(...)
  local all = {}
  for _, set in ipairs { ... } do
    for k, v in pairs(set) do all[k] = v end
  end
  return all
end

-- What a host that reads the upgrade request itself takes besides a route's.
local HOSTED = {
  handshake_timeout = seconds,
  max_header_size = integer(64, INT_MAX),
  max_headers = integer(1, INT_MAX),
}

options.listen = union(CONNECTION, ROUTE, LISTEN)
options.route = union(CONNECTION, ROUTE)
options.connect = union(CONNECTION, CONNECT)
options.accept = union(CONNECTION, ROUTE, HOSTED, { request = str, remote_address = str })
options.cqueues_listen = union(CONNECTION, ROUTE, HOSTED, { host = str, port = integer(0, 65535) })
-- nginx has read the request (and timed it) itself
options.nginx = union(CONNECTION, ROUTE, { max_header_size = HOSTED.max_header_size,
  max_headers = HOSTED.max_headers })

-- duplex.redis.connect. A zero timeout or backoff would fail every call or
-- redial in a tight loop: they start at a millisecond.
local positive = number(0.001, 86400 * 365)
options.redis = {
  url = str,
  name = function(v)
    if type(v) ~= "string" or not v:match("^[!-~]+$") then return "a name without spaces (CLIENT SETNAME)" end
  end,
  user = str,
  password = str,
  db = integer(0, INT_MAX),
  tls = CONNECT.tls,
  connect_timeout = positive,
  timeout = positive,
  ping_interval = seconds,
  max_reply = integer(1, INT_MAX),
  backoff_min = positive,
  backoff_max = positive,
  on_status = func,
  connect = func,
  stream = function(v)
    if type(v) ~= "table" and type(v) ~= "userdata" then return "a stream (read, write, close)" end
  end,
}

-- duplex.redis.broker: the client's connection options, and its own.
-- history is checked by duplex.pubsub.history (a rule or a list of them).
options.broker = {
  url = str,
  tls = CONNECT.tls,
  connect_timeout = positive,
  ping_interval = seconds,
  max_reply = integer(1, INT_MAX),
  backoff_min = positive,
  backoff_max = positive,
  on_status = func,
  client = tbl,
  nodes = strings,
  retry_timeout = positive,
  sharded = boolean,
  prefix = str,
  history = tbl,
  presence_ttl = integer(1, 86400),
  max_pending = integer(1, INT_MAX),
  node_id = str,
}
-- duplex.redis.cluster: the client's options for every node (a cluster has
-- database 0 only, and more than one stream), its seeds, and its patience.
options.cluster = union(options.redis, {
  nodes = strings,
  retry_timeout = positive,
  max_redirects = integer(0, 1000),
})
options.cluster.db, options.cluster.stream, options.cluster.connect = nil, nil, nil

--- Raise an error (at level) naming the first option of opts that set does
--- not know or whose value it refuses; who is the function's name.
function options.check(who, opts, set, level)
  for k, v in pairs(opts) do
    local check = set[k]
    if not check then
      error(string.format("%s: unknown option '%s'", who, tostring(k)), level + 1)
    end
    local bad = check(v)
    if bad then
      error(string.format("%s: option '%s' must be %s, got %s", who, k, bad,
        type(v) == "string" and string.format("%q", v) or tostring(v)), level + 1)
    end
  end
end

return options
