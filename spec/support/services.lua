-- Real servers for the deployment specs: redis-server, nginx and haproxy on
-- 127.0.0.1, each with its files in a private temp directory, run through
-- support.proc (so proc.killall stops them too).
--
--   local services = require "support.services"
--   local r = services.redis()           -- r.port, r.url; r:stop(); r:start() on the same port
--   local c = services.redis_cluster { masters = 3, replicas = 1 } -- c.ports, c.urls, c:masters(), c:kill(port)
--   local conf = services.render("deploy/nginx.conf", { {"listen 80;", "listen 127.0.0.1:" .. port .. ";"} })
--   local n = services.nginx(conf, port) -- waits until port accepts connections; n:stop()
--   local h = services.haproxy(cfg, port)
--
-- They are not under test: the sanitizer runtime that scripts/asan-env
-- preloads is kept out of them.
local proc = require "support.proc"
local core = require "duplex.core"
local runtime = require "duplex.runtime"

local services = {}

services.env = { LD_PRELOAD = false }

local function read_file(path) return assert(proc.read_file(path), "cannot read " .. path) end
local write_file, temp_dir = proc.write_file, proc.temp_dir

--- A TCP port that was free a moment ago (the kernel picks it).
function services.free_port()
  local l = assert(core.listen { host = "127.0.0.1", port = 0 })
  local _, port = l:address()
  l:close()
  return port
end

--- Whether something accepts TCP connections on 127.0.0.1:port.
function services.accepts(port)
  return runtime.blocking(function()
    local sock = core.connect { host = "127.0.0.1", port = port, timeout = 1 }
    if not sock then return false end
    sock:close()
    return true
  end)
end

--- Polls pred() every 20 ms (without running the duplex loop) until it
--- returns a true value, or fails the spec after timeout seconds.
function services.wait_for(what, timeout, pred)
  local deadline = proc.now() + timeout
  while true do
    local v = pred()
    if v then return v end
    if proc.now() >= deadline then error("timed out waiting for " .. what, 2) end
    proc.sleep(0.02)
  end
end

--- The template's text with every { old, new } pair replaced; each old
--- string must occur (so that a changed template breaks the spec loudly
--- instead of silently testing something else).
function services.render(path, substitutions)
  local text = read_file(path)
  for _, s in ipairs(substitutions) do
    local old, new = s[1], s[2]
    local i, j = text:find(old, 1, true)
    if not i then error(path .. ": the template no longer contains " .. string.format("%q", old), 2) end
    repeat
      text = text:sub(1, i - 1) .. new .. text:sub(j + 1)
      i, j = text:find(old, i + #new, true)
    until not i
  end
  return text
end

local Service = {}
Service.__index = Service

function Service:start()
  assert(not (self.h and self.h:running()), "already running")
  self.h = proc.spawn(self.argv, { env = services.env, cwd = self.dir, limit = 300 })
  local ok = pcall(services.wait_for, self.name .. " on port " .. self.port, 10, function()
    if not self.h:running() then error(self.name .. " exited:\n" .. self:log()) end
    return services.accepts(self.port)
  end)
  if not ok then
    local log = self:log()
    self.h:cleanup(1)
    error(self.name .. " did not start on port " .. self.port .. ":\n" .. log, 2)
  end
  return self
end

--- Stop it (SIGTERM, or the given signal: "KILL" for a crash).
function Service:stop(sig)
  if not self.h then return end
  if sig then self.h:kill(sig) end
  self.h:cleanup(3)
  self.h = nil
end

--- What it printed, and its error log if it keeps one.
function Service:log()
  local out = self.h and self.h:output() or ""
  if self.error_log then
    local f = io.open(self.error_log, "rb")
    if f then out = out .. f:read("a"); f:close() end
  end
  return out
end

--- Stop it and remove its files.
function Service:cleanup()
  self:stop()
  os.execute("rm -rf " .. proc.quote(self.dir))
end

local function service(name, argv_fn, port, dir)
  local self = setmetatable({ name = name, port = port, dir = dir or temp_dir() }, Service)
  self.argv = argv_fn(self)
  return self:start()
end

--- redis-server on a free port, nothing saved to disk. r:stop("KILL") and
--- r:start() bring it down and back on the same port. With opts.tls (from
--- support.certs) it also listens with TLS on r.tls_port, and r.url is the
--- rediss:// one. opts.args: more arguments ({ "--requirepass", "secret" }).
function services.redis(port, opts)
  port = port or services.free_port()
  local tls_port = opts and opts.tls and services.free_port()
  local r = service("redis-server", function(self)
    local argv = { "redis-server", "--port", tostring(port), "--bind", "127.0.0.1", "--save", "",
      "--appendonly", "no", "--dir", self.dir }
    if tls_port then
      for _, a in ipairs { "--tls-port", tostring(tls_port), "--tls-cert-file", opts.tls.cert,
        "--tls-key-file", opts.tls.key, "--tls-ca-cert-file", opts.tls.ca, "--tls-auth-clients", "no" } do
        argv[#argv + 1] = a
      end
    end
    for _, a in ipairs(opts and opts.args or {}) do argv[#argv + 1] = a end
    return argv
  end, port)
  r.tls_port = tls_port
  r.url = tls_port and ("rediss://127.0.0.1:" .. tls_port) or ("redis://127.0.0.1:" .. port)
  return r
end

--- nginx with this configuration text, as the current user, every file
--- (pid, logs, temp paths) in its own directory. The config must listen on
--- port; its http block gets the log and temp path lines added here.
--- One command to the redis-server on 127.0.0.1:port, on a connection of
--- its own: the reply (an error reply as { err = }), or nil, err when the
--- server cannot be reached.
function services.redis_call(port, ...)
  local resp = require "duplex.resp"
  local bytes = resp.command(...)
  return runtime.blocking(function()
    local sock, cerr = core.connect { host = "127.0.0.1", port = port, timeout = 2 }
    if not sock then return nil, cerr end
    sock:write(bytes)
    local p = resp.parser()
    while true do
      local v, err = p:next()
      assert(err == nil, err)
      if v ~= nil then sock:close(); return v end
      local data, rerr = sock:read(nil, 5)
      if not data then sock:close(); return nil, rerr end
      p:feed(data)
    end
  end)
end

-- Subscribers of a Redis channel, as Redis counts them (PUBSUB NUMSUB).
function services.numsub(port, channel)
  return assert(services.redis_call(port, "PUBSUB", "NUMSUB", channel))[2]
end

-- Shard-channel subscribers at one node (PUBSUB SHARDNUMSUB).
function services.shardnumsub(port, channel)
  return assert(services.redis_call(port, "PUBSUB", "SHARDNUMSUB", channel))[2]
end

local Cluster = {}
Cluster.__index = Cluster

--- The ports of the nodes that are masters now (ROLE), the dead left out.
function Cluster:masters()
  local out = {}
  for _, port in ipairs(self.ports) do
    local role = self.nodes[port].h and services.redis_call(port, "ROLE")
    if type(role) == "table" and role[1] == "master" then out[#out + 1] = port end
  end
  return out
end

--- The port of a live replica of the master on port, or nil.
function Cluster:replica_of(port)
  for _, p in ipairs(self.ports) do
    local role = self.nodes[p].h and services.redis_call(p, "ROLE")
    if type(role) == "table" and role[1] == "slave" and role[3] == port then return p end
  end
end

--- Until the replica on port replica has applied everything the master on
--- port master had written when called. (WAIT cannot say so here: it
--- counts the acks of the calling connection's own writes, and each
--- redis_call is a new connection that wrote nothing.)
function services.wait_replicated(master, replica, timeout)
  local function offset(port, field)
    local info = services.redis_call(port, "INFO", "replication")
    return tonumber(type(info) == "string" and info:match(field .. ":(%d+)"))
  end
  local written = assert(offset(master, "master_repl_offset"), "no replication offset on the master")
  services.wait_for("the replica on " .. replica .. " to apply offset " .. written, timeout or 10, function()
    local applied = offset(replica, "slave_repl_offset")
    return applied and applied >= written
  end)
end

--- The port of the master serving slot, as that node's CLUSTER SLOTS says.
function Cluster:owner(slot, asked)
  local ranges = assert(services.redis_call(asked or self:masters()[1], "CLUSTER", "SLOTS"))
  for _, r in ipairs(ranges) do
    if slot >= r[1] and slot <= r[2] then return r[3][2] end
  end
end

--- SIGKILL the node on port (it stays dead).
function Cluster:kill(port)
  self.nodes[port]:stop("KILL")
end

--- Stop every node and remove their files.
function Cluster:stop()
  for _, port in ipairs(self.ports) do self.nodes[port]:cleanup() end
end

-- Until every live node says cluster_state:ok and sees the same slot
-- owners, every replica's link to its master is up, and every master sees
-- its replicas online.
function Cluster:wait_ok(timeout)
  services.wait_for("the cluster to be ok", timeout or 30, function()
    local masters = 0
    for _, port in ipairs(self.ports) do
      if self.nodes[port].h then
        local info = services.redis_call(port, "CLUSTER", "INFO")
        if type(info) ~= "string" or not info:find("cluster_state:ok", 1, true) then return false end
        local role = services.redis_call(port, "ROLE")
        if type(role) ~= "table" then return false end
        if role[1] == "master" then
          masters = masters + 1
          -- each of its replicas online: past its first sync, streaming
          -- (a replica still loading would come up with none of the writes)
          local repl = services.redis_call(port, "INFO", "replication")
          if type(repl) ~= "string" then return false end
          for state in repl:gmatch("\nslave%d+:[^\n]*state=(%a+)") do
            if state ~= "online" then return false end
          end
        end
        if role[1] == "slave" and role[4] ~= "connected" then return false end
      end
    end
    return masters == self.masters_wanted
  end)
  return self
end

--- A Redis Cluster of real servers on 127.0.0.1: opts.masters (3) masters
--- with opts.replicas (1) replicas each, made by redis-cli --cluster create,
--- returned once it is ok. c.ports: every node's port; c.urls: their URLs;
--- c:masters(), c:replica_of(port), c:owner(slot), c:kill(port), c:stop().
--- With opts.tls (from support.certs) the nodes also listen with TLS and
--- speak it among themselves (the bus): c.tls_ports, c.tls_urls.
function services.redis_cluster(opts)
  opts = opts or {}
  local masters, replicas = opts.masters or 3, opts.replicas or 1
  local c = setmetatable({ ports = {}, nodes = {}, urls = {}, tls_ports = {}, tls_urls = {},
    masters_wanted = masters }, Cluster)
  local addrs, taken = {}, {}
  -- each port free a moment ago, and not one already given to another node
  local function fresh_port()
    local p
    repeat p = services.free_port() until not taken[p]
    taken[p] = true
    return p
  end
  for i = 1, masters * (1 + replicas) do
    local port, bus = fresh_port(), fresh_port()
    local tls_port = opts.tls and fresh_port()
    -- the bus port given, not port + 10000, which may be taken or past 65535
    c.nodes[port] = service("redis-server", function(self)
      local argv = { "redis-server", "--port", tostring(port), "--cluster-port", tostring(bus),
        "--bind", "127.0.0.1", "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
        "--repl-diskless-sync-delay", "0",
        "--cluster-config-file", self.dir .. "/nodes.conf", "--save", "", "--appendonly", "no", "--dir", self.dir }
      if tls_port then
        -- each node is a TLS client of the others on the bus: a certificate for both ends
        for _, a in ipairs { "--tls-port", tostring(tls_port), "--tls-cluster", "yes", "--tls-replication", "yes",
          "--tls-cert-file", opts.tls.node_cert, "--tls-key-file", opts.tls.node_key,
          "--tls-ca-cert-file", opts.tls.ca, "--tls-auth-clients", "no" } do
          argv[#argv + 1] = a
        end
      end
      return argv
    end, port)
    c.ports[i], c.urls[i], addrs[i] = port, "redis://127.0.0.1:" .. port, "127.0.0.1:" .. port
    if tls_port then
      c.tls_ports[i], c.tls_urls[i] = tls_port, "rediss://127.0.0.1:" .. tls_port
      addrs[i] = "127.0.0.1:" .. tls_port -- with tls-cluster, the nodes name each other by their TLS ports
    end
  end
  local argv = { "redis-cli", "--cluster", "create" }
  if opts.tls then argv = { "redis-cli", "--tls", "--cacert", opts.tls.ca, "--cluster", "create" } end
  for _, a in ipairs(addrs) do argv[#argv + 1] = a end
  for _, a in ipairs { "--cluster-replicas", tostring(replicas), "--cluster-yes" } do argv[#argv + 1] = a end
  local code, out, err = proc.run(argv, { env = services.env, timeout = 30 })
  if code ~= 0 then
    c:stop()
    error("redis-cli --cluster create failed:\n" .. out .. err, 2)
  end
  return c:wait_ok(30)
end

--- conf written into a new private prefix directory, with nginx's temp
--- paths and access log moved into it (so nothing of the system's nginx is
--- touched): returns the directory and the argv prefix that runs it.
function services.nginx_prefix(conf)
  local dir = temp_dir()
  conf = conf:gsub("\nhttp%s*{\n", function()
    local lines = { "\nhttp {" }
    for _, d in ipairs { "client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path",
      "uwsgi_temp_path", "scgi_temp_path" } do
      lines[#lines + 1] = "    " .. d .. " " .. dir .. "/" .. d .. ";"
    end
    lines[#lines + 1] = "    access_log " .. dir .. "/access.log;"
    return table.concat(lines, "\n") .. "\n"
  end, 1)
  write_file(dir .. "/nginx.conf", conf)
  return dir, { "nginx", "-p", dir .. "/", "-e", dir .. "/error.log", "-c", dir .. "/nginx.conf" }
end

function services.nginx(conf, port)
  local dir, argv = services.nginx_prefix(conf)
  local n = service("nginx", function()
    local a = { table.unpack(argv) }
    a[#a + 1], a[#a + 2] = "-g", "daemon off; pid " .. dir .. "/nginx.pid;"
    return a
  end, port, dir)
  n.error_log = dir .. "/error.log"
  return n
end

--- haproxy in the foreground with this configuration text.
function services.haproxy(cfg, port)
  local dir = temp_dir()
  write_file(dir .. "/haproxy.cfg", cfg)
  return service("haproxy", function()
    return { "haproxy", "-db", "-f", dir .. "/haproxy.cfg" }
  end, port, dir)
end

return services
