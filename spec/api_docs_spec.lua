-- README's API reference and the LuaLS annotations (lua/duplex/*.lua and
-- types/duplex/core.lua) must name the same things, so that neither can
-- gain a function, a field or an option the other lacks:
--
-- * README side: the first column of the tables in the API sections (and
--   headings that are calls, `duplex.listen(opts) -> ...`). A
--   table whose header ends in "option" lists the options of the class
--   OPTION_TABLES maps its heading to; any other table names members as
--   `owner.member` or `owner:member`, the owner mapped to a class or a
--   module by OWNERS (README's instance names: ws, server, hub...).
-- * Annotation side: `---@class` with its `---@field`s, and `function X.y(`
--   / `function X:y(` definitions with a `---` doc block above, X being the
--   table a class block annotates (`---@class` right above `local X =`) or
--   the module a file returns.
--
-- Every file and every class is classified below (public, option class or
-- internal, with the reason), so a new one cannot slip past unclassified.
-- The option classes must also be the sets lua/duplex/options.lua checks,
-- and the C module's stub what the built duplex.core really exports.
local options = require "duplex.options"

-- ---- what the names mean ----------------------------------------------------

-- Files: the module each defines, when public; false when internal.
local FILES = {
  ["lua/duplex/init.lua"] = "duplex",
  ["lua/duplex/pubsub.lua"] = "duplex.pubsub",
  ["lua/duplex/redis.lua"] = "duplex.redis",
  ["lua/duplex/poll.lua"] = "duplex.poll",
  ["lua/duplex/cqueues.lua"] = "duplex.cqueues",
  ["lua/duplex/nginx.lua"] = "duplex.nginx",
  ["lua/duplex/transport.lua"] = "duplex.transport",
  ["types/duplex/core.lua"] = "duplex.core",
  -- Internal: reached through duplex (listen, connect, run) or used by the
  -- modules above; their public classes are checked all the same.
  ["lua/duplex/core.lua"] = false, -- loads the C module, which types/duplex/core.lua describes
  ["lua/duplex/server.lua"] = false, -- duplex.listen
  ["lua/duplex/client.lua"] = false, -- duplex.connect
  ["lua/duplex/websocket.lua"] = false, -- the ws class
  ["lua/duplex/workers.lua"] = false, -- duplex.run{ workers = N }
  ["lua/duplex/handshake.lua"] = false, -- the hosts' shared handshake code
  ["lua/duplex/options.lua"] = false, -- the checks of the option classes
  ["lua/duplex/runtime.lua"] = false, -- blocking calls, the sweep timer
  ["lua/duplex/url.lua"] = false, -- URL parsing
  ["lua/duplex/addr.lua"] = false, -- trusted proxies
  ["lua/duplex/resp.lua"] = false, -- the Redis protocol
  ["lua/duplex/callbacks.lua"] = false, -- routes served by on_message
  ["lua/duplex/compat.lua"] = false, -- what LuaJIT lacks, for the modules that run on both
  ["lua/duplex/cli.lua"] = false, -- the duplex command (README: Command line)
  ["lua/duplex/redis/client.lua"] = false, -- redis.connect
  ["lua/duplex/redis/broker.lua"] = false, -- redis.broker
  ["lua/duplex/pubsub/history.lua"] = false, -- history rules and recovery, for the brokers
  ["lua/duplex/pubsub/memory.lua"] = false, -- pubsub.memory_broker
  ["lua/duplex/pubsub/roster.lua"] = false, -- presence counting, for the brokers
  ["lua/duplex/redis/cluster.lua"] = false, -- redis.cluster
}

-- README's owners of members: a class, or "module:" and a module.
local OWNERS = {
  duplex = "module:duplex",
  ["duplex.nginx"] = "module:duplex.nginx",
  pubsub = "module:duplex.pubsub",
  redis = "module:duplex.redis",
  poll = "module:duplex.poll",
  dcq = "module:duplex.cqueues",
  transport = "module:duplex.transport",
  core = "module:duplex.core",
  ws = "duplex.WebSocket",
  server = "duplex.Server",
  request = "duplex.Request",
  response = "duplex.Response",
  hub = "duplex.Hub",
  broker = "duplex.RedisBroker",
  c = "duplex.PollClient",
  stream = "duplex.Stream",
  e = "duplex.core.Engine",
  sock = "duplex.core.Socket",
  listener = "duplex.core.Listener",
  timer = "duplex.core.Timer",
  hs = "duplex.core.HandshakeServer",
  hc = "duplex.core.HandshakeClient",
  codec = "duplex.core.Codec",
  r = "duplex.core.Reader",
  w = "duplex.core.Watcher",
  db = "duplex.RedisClient",
  rc = "duplex.RedisCluster",
}

-- Owners that mean something else under a heading (a plain substring of it).
local HEADING_OWNERS = {
  ["`duplex.cqueues`"] = { server = "duplex.CqueuesServer" },
}

-- README's option tables: the heading they are under, their header's first
-- cell, their class. all: the table lists every option, inherited ones too;
-- otherwise its own, the parent's being listed where the parent is.
local OPTION_TABLES = {
  { heading = "duplex.listen(", header = "option", class = "duplex.ListenOptions", all = true },
  { heading = "duplex.listen(", header = "route option", class = "duplex.RouteOptions", all = true },
  { heading = "duplex.connect(", header = "option", class = "duplex.ConnectOptions", all = true },
  { heading = "Topics and broadcast", header = "option", class = "duplex.HubOptions", all = true },
  { heading = "Across processes", header = "option", class = "duplex.RedisOptions", all = true },
  { heading = "Redis Cluster", header = "option", class = "duplex.RedisClusterOptions", all = true },
  { heading = "Worker processes", header = "option", class = "duplex.RunOptions", all = true },
  { heading = "Game loops", header = "option", class = "duplex.PollOptions" },
  { heading = "Game loops", header = "reconnect option", class = "duplex.ReconnectOptions", all = true },
  { heading = "`duplex.cqueues`", header = "option", class = "duplex.CqueuesListenOptions" },
  { heading = "`duplex.nginx`", header = "option", class = "duplex.NginxOptions" },
  { heading = "`duplex.transport`", header = "accept option", class = "duplex.AcceptOptions" },
  { heading = "permessage-deflate", header = "option", class = "duplex.DeflateOptions", all = true },
}

-- Classes that README need not describe member by member.
local INTERNAL = {
  ["duplex.HostedWebSocket"] = "a connection on a host's stream: the API of duplex.WebSocket",
  ["duplex.CallbackWebSocket"] = "a callback route's connection: the API of duplex.WebSocket (README: Callbacks)",
  ["duplex.URL"] = "duplex.url's parse result, described where it shows (ws.url)",
  ["duplex.Conduit"] = "the socket interface duplex.transport gives duplex.websocket",
  ["duplex.CqueuesStream"] = "implements duplex.Stream",
  ["duplex.NginxStream"] = "implements duplex.Stream",
  ["duplex.WorkersOptions"] = "what duplex.run hands the workers module: part of duplex.RunOptions",
  ["duplex.core.TLSContext"] = "opaque: no field, no method",
  ["duplex.RequestRead"] = "duplex.handshake's result, between the hosts and the shared handshake code",
  ["duplex.Answer"] = "duplex.handshake's result, between the hosts and the shared handshake code",
  ["duplex.ResponseRead"] = "duplex.handshake's result, between the hosts and the shared handshake code",
  ["duplex.MemoryBroker"] = "the methods of duplex.RedisBroker, in one process (README: pubsub.memory_broker)",
  ["duplex.MemoryBrokerOptions"] = "its one option, history, is duplex.HistoryOptions",
  ["duplex.HistoryOptions"] = "described in README's History and recovery",
  ["duplex.Position"] = "described in README's History and recovery",
  ["duplex.History"] = "broker:read's result, described in README's broker table",
  ["duplex.Recovery"] = "hub:recover's result, described in README's History and recovery",
  ["duplex.RedisBrokerStats"] = "broker.stats, described in README's broker table",
}

-- The option sets of lua/duplex/options.lua and their classes.
local OPTION_SETS = {
  { set = "listen", class = "duplex.ListenOptions" },
  { set = "route", class = "duplex.RouteOptions" },
  { set = "connect", class = "duplex.ConnectOptions" },
  { set = "accept", class = "duplex.AcceptOptions" },
  { set = "cqueues_listen", class = "duplex.CqueuesListenOptions" },
  { set = "nginx", class = "duplex.NginxOptions" },
  { set = "broker", class = "duplex.RedisOptions" },
  { set = "cluster", class = "duplex.RedisClusterOptions" },
}

-- The C module's userdata: metatable name -> class in the stub.
local METATABLES = {
  ["duplex.engine"] = "duplex.core.Engine",
  ["duplex.socket"] = "duplex.core.Socket",
  ["duplex.listener"] = "duplex.core.Listener",
  ["duplex.timer"] = "duplex.core.Timer",
  ["duplex.handshake_server"] = "duplex.core.HandshakeServer",
  ["duplex.handshake_client"] = "duplex.core.HandshakeClient",
  ["duplex.pmd_codec"] = "duplex.core.Codec",
  ["duplex.tls_context"] = "duplex.core.TLSContext",
  ["duplex.reader"] = "duplex.core.Reader",
  ["duplex.watcher"] = "duplex.core.Watcher",
}

local API_SECTIONS = { "API", "Embedding", "permessage-deflate" }

-- ---- reading README ----------------------------------------------------------

local function trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

-- The cells of a table row; "\|" is a "|" inside a cell.
local function split_row(line)
  local body = trim(line):gsub("^|", "")
  local cells, cur, i = {}, {}, 1
  while i <= #body do
    local ch = body:sub(i, i)
    if ch == "\\" and body:sub(i + 1, i + 1) == "|" then
      cur[#cur + 1] = "|"
      i = i + 1
    elseif ch == "|" then
      cells[#cells + 1] = trim(table.concat(cur))
      cur = {}
    else
      cur[#cur + 1] = ch
    end
    i = i + 1
  end
  if trim(table.concat(cur)) ~= "" then cells[#cells + 1] = trim(table.concat(cur)) end
  return cells
end

local function spans(cell)
  local out = {}
  for s in cell:gmatch("`([^`]+)`") do out[#out + 1] = s end
  return out
end

local function in_api(section)
  for _, prefix in ipairs(API_SECTIONS) do
    if section:sub(1, #prefix) == prefix then return true end
  end
  return false
end

--- README's tables in the API sections: { names = { {owner, member, sep,
--- heading, line} }, option_tables = { {heading, header, names, line} } }.
local function parse_readme(text)
  local lines = {}
  for l in (text .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  local out = { names = {}, option_tables = {} }
  local section, heading, fenced = "", "", false
  local i = 1
  while i <= #lines do
    local l = lines[i]
    if l:match("^```") then fenced = not fenced end
    local h2 = not fenced and l:match("^##%s+(.*)$")
    local h3 = not fenced and l:match("^###+%s+(.*)$")
    if h3 then
      heading = h3
    elseif h2 then
      section, heading = h2, h2
    end
    -- a heading that is a call (`duplex.listen(opts) -> ...`) names it
    if (h2 or h3) and in_api(section) then
      for _, s in ipairs(spans(h3 or h2)) do
        local owner, sep, member = s:match("^([%a_][%w_%.]*)([%.:])([%a_][%w_]*)%s*[%({]")
        if owner then
          out.names[#out.names + 1] = {
            owner = owner, sep = sep, member = member, heading = heading, line = i, text = s,
          }
        end
      end
    end
    local is_table = not fenced and l:match("^%s*|") and (lines[i + 1] or ""):match("^%s*|%s*:?%-%-%-")
    if is_table and in_api(section) then
      local first = i
      local rows = { split_row(l) }
      i = i + 2
      while lines[i] and lines[i]:match("^%s*|") do
        rows[#rows + 1] = split_row(lines[i])
        i = i + 1
      end
      local header = rows[1][1] or ""
      if not header:find("`", 1, true) and header:match("option$") then
        local t = { heading = heading, header = header, names = {}, bad = {}, line = first }
        for r = 2, #rows do
          for _, s in ipairs(spans(rows[r][1] or "")) do
            if s:match("^[%a_][%w_]*$") then t.names[s] = first + r else t.bad[#t.bad + 1] = s end
          end
        end
        out.option_tables[#out.option_tables + 1] = t
      else
        for r = header:find("`", 1, true) and 1 or 2, #rows do
          for _, s in ipairs(spans(rows[r][1] or "")) do
            local owner, sep, member = s:match("^([%a_][%w_%.]*)([%.:])([%a_][%w_]*)")
            if owner then
              out.names[#out.names + 1] = {
                owner = owner, sep = sep, member = member, heading = heading, line = first + r - 1, text = s,
              }
            end
          end
        end
      end
    else
      i = i + 1
    end
  end
  return out
end

-- ---- reading the annotations -----------------------------------------------

--- One file's classes, function definitions and top-level assignments, and
--- the variable it returns.
local function parse_lua(path, text)
  local f = { path = path, classes = {}, bound = {}, functions = {}, assigns = {} }
  local block_class, cur, prev_doc = nil, nil, false
  local n = 0
  for line in (text .. "\n"):gmatch("([^\n]*)\n") do
    n = n + 1
    local ann = line:match("^%s*%-%-%-(.*)$")
    if ann then
      local name, parent = ann:match("^@class%s+([%w_%.]+)%s*:%s*([%w_%.]+)")
      name = name or ann:match("^@class%s+([%w_%.]+)")
      if name then
        cur = { name = name, parent = parent, fields = {}, methods = {}, line = n, path = path }
        f.classes[#f.classes + 1] = cur
        block_class = cur
      end
      local field = ann:match("^@field%s+([%a_][%w_]*)%??%s")
      if field and cur then cur.fields[field] = { line = n, path = path } end
    else
      local var = line:match("^%s*local%s+([%a_][%w_]*)%s*=")
      if var and block_class then f.bound[var] = block_class.name end
      local fv, sep, fname = line:match("^%s*function%s+([%a_][%w_]*)([%.:])([%a_][%w_]*)%s*%(")
      if fv then
        f.functions[#f.functions + 1] = { var = fv, sep = sep, name = fname, doc = prev_doc, line = n }
      end
      local av, aname = line:match("^([%a_][%w_]*)%.([%a_][%w_]*)%s*=[^=]")
      if av then f.assigns[#f.assigns + 1] = { var = av, name = aname, doc = prev_doc, line = n } end
      local ret = line:match("^return%s+([%a_][%w_]*)%s*$")
      if ret then f.ret = ret end
      block_class, cur = nil, nil
    end
    prev_doc = ann ~= nil
  end
  return f
end

local function public(name) return name:sub(1, 1) ~= "_" end

--- The model of every file: classes (fields, methods, parent) and public
--- modules (members), with where each was annotated and whether it was.
local function build_model(files)
  local m = { classes = {}, modules = {}, files = {}, problems = {} }
  for _, file in ipairs(files) do
    local f = parse_lua(file.path, file.text)
    m.files[file.path] = true
    local modname = FILES[file.path]
    for _, c in ipairs(f.classes) do
      if m.classes[c.name] then
        m.problems[#m.problems + 1] = c.name .. " is declared twice (" .. c.path .. ":" .. c.line .. ")"
      end
      m.classes[c.name] = c
    end
    local mod
    if modname then
      mod = { name = modname, members = {}, path = file.path }
      m.modules[modname] = mod
      -- the returned table annotated as a class of the module's name: its
      -- fields are the module's
      local cname = f.ret and f.bound[f.ret]
      if cname == modname then
        m.classes[cname].module = true
        for k, where in pairs(m.classes[cname].fields) do
          mod.members[k] = { doc = true, line = where.line, path = file.path }
        end
      end
    end
    local function at(def) return { doc = def.doc, line = def.line, path = file.path } end
    for _, def in ipairs(f.functions) do
      local cname = f.bound[def.var]
      if def.var == f.ret and (def.sep == "." or not cname) then
        if mod then mod.members[def.name] = at(def) end
      elseif cname and m.classes[cname] then
        m.classes[cname].methods[def.name] = at(def)
      end
    end
    for _, def in ipairs(f.assigns) do
      local cname = f.bound[def.var]
      if def.var == f.ret then
        if mod then mod.members[def.name] = at(def) end
      elseif cname and m.classes[cname] and not def.name:match("^__") then
        m.classes[cname].methods[def.name] = at(def)
      end
    end
  end
  return m
end

-- ---- comparing -----------------------------------------------------------------

local function lineage(model, name)
  local out, seen = {}, {}
  while name and model.classes[name] and not seen[name] do
    seen[name] = true
    out[#out + 1] = model.classes[name]
    name = model.classes[name].parent
  end
  return out
end

local function descends(model, name, ancestor)
  for _, c in ipairs(lineage(model, name)) do
    if c.name == ancestor then return true end
  end
  return false
end

-- Every field of a class and its ancestors (and methods, with methods).
local function all_fields(model, name, with_methods)
  local out = {}
  for _, c in ipairs(lineage(model, name)) do
    for k in pairs(c.fields) do out[k] = true end
    if with_methods then
      for k in pairs(c.methods) do out[k] = true end
    end
  end
  return out
end

local function sorted(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

local function owner_of(heading, owner)
  for sub, map in pairs(HEADING_OWNERS) do
    if heading:find(sub, 1, true) and map[owner] then return map[owner] end
  end
  return OWNERS[owner]
end

local function option_entry(t)
  for _, e in ipairs(OPTION_TABLES) do
    if t.heading:find(e.heading, 1, true) and t.header == e.header then return e end
  end
end

--- Every mismatch between README (parsed) and the annotations (modelled),
--- as sentences naming both places.
local function compare(readme, model)
  local problems = {}
  local function problem(fmt, ...) problems[#problems + 1] = string.format(fmt, ...) end
  for _, p in ipairs(model.problems) do problem("%s", p) end

  for path in pairs(model.files) do
    if FILES[path] == nil then
      problem("%s is not classified: add it to FILES in spec/api_docs_spec.lua (its module name, or false)", path)
    end
  end

  -- which classes are public (a README owner, or an ancestor of one) and
  -- which are option classes (an option table's, or an ancestor of one)
  local public_class, option_class = {}, {}
  local targets = {}
  for _, t in pairs(OWNERS) do targets[#targets + 1] = t end
  for _, map in pairs(HEADING_OWNERS) do
    for _, t in pairs(map) do targets[#targets + 1] = t end
  end
  for _, t in ipairs(targets) do
    if t:match("^module:") then
      if not model.modules[t:sub(8)] then problem("OWNERS names %s, which no file in FILES defines", t) end
    elseif not model.classes[t] then
      problem("OWNERS names class %s, which no annotation declares", t)
    else
      for _, c in ipairs(lineage(model, t)) do public_class[c.name] = true end
    end
  end
  for _, e in ipairs(OPTION_TABLES) do
    if not model.classes[e.class] then
      problem("OPTION_TABLES names class %s, which no annotation declares", e.class)
    else
      for _, c in ipairs(lineage(model, e.class)) do option_class[c.name] = true end
    end
  end
  for name, c in pairs(model.classes) do
    if not (c.module or public_class[name] or option_class[name] or INTERNAL[name]) then
      problem("class %s (%s:%d) is not classified: map it in OWNERS or OPTION_TABLES, or list it in INTERNAL",
        name, c.path, c.line)
    end
  end

  -- annotated, every public function
  for _, mod in pairs(model.modules) do
    for k, d in pairs(mod.members) do
      if public(k) and not d.doc then problem("%s.%s (%s:%d) has no --- annotation", mod.name, k, d.path, d.line) end
    end
  end
  for name in pairs(public_class) do
    for k, d in pairs(model.classes[name].methods) do
      if public(k) and not d.doc then problem("%s:%s (%s:%d) has no --- annotation", name, k, d.path, d.line) end
    end
  end

  -- README -> annotations
  local named = {} -- target -> member -> true
  for _, n in ipairs(readme.names) do
    local target = owner_of(n.heading, n.owner)
    if not target then
      problem("README.md:%d names `%s`: its owner `%s` is not in OWNERS", n.line, n.text, n.owner)
    else
      named[target] = named[target] or {}
      named[target][n.member] = true
      local members
      if target:match("^module:") then
        local mod = model.modules[target:sub(8)]
        members = mod and mod.members or {}
      else
        members = all_fields(model, target, true)
      end
      if not members[n.member] then
        problem("README.md:%d names `%s`, but %s has no annotated %s", n.line, n.text, target, n.member)
      end
    end
  end

  -- annotations -> README
  for _, mod in pairs(model.modules) do
    local seen = named["module:" .. mod.name] or {}
    for k, d in pairs(mod.members) do
      if public(k) and not seen[k] then
        problem("%s.%s is annotated (%s:%d) but README's API tables do not name it", mod.name, k, d.path, d.line)
      end
    end
  end
  for name in pairs(public_class) do
    local c = model.classes[name]
    local function documented(k)
      for target, members in pairs(named) do
        if members[k] and not target:match("^module:") and descends(model, target, name) then return true end
      end
      return false
    end
    for _, kind in ipairs { "fields", "methods" } do
      for k, d in pairs(c[kind]) do
        if public(k) and not documented(k) then
          problem("%s.%s is annotated (%s:%d) but README's API tables do not name it", name, k, d.path, d.line)
        end
      end
    end
  end

  -- option tables
  local found = {}
  for _, t in ipairs(readme.option_tables) do
    local e = option_entry(t)
    if not e then
      problem("README.md:%d: an option table (%q under %q) that OPTION_TABLES does not map",
        t.line, t.header, t.heading)
    else
      if found[e] then problem("README.md:%d: a second table for %s", t.line, e.class) end
      found[e] = t
      for _, s in ipairs(t.bad) do problem("README.md:%d: `%s` is no option name", t.line, s) end
      local fields = all_fields(model, e.class)
      for _, k in ipairs(sorted(t.names)) do
        if not fields[k] then
          problem("README.md:%d lists option `%s`, but %s has no ---@field %s", t.names[k], k, e.class, k)
        end
      end
      if e.all then
        for _, k in ipairs(sorted(fields)) do
          if not t.names[k] then
            problem("%s has ---@field %s, but README's table of its options (README.md:%d) does not list it",
              e.class, k, t.line)
          end
        end
      end
    end
  end
  for _, e in ipairs(OPTION_TABLES) do
    if not found[e] then problem("README has no option table %q under a heading with %q", e.header, e.heading) end
  end
  for name in pairs(option_class) do
    for k, d in pairs(model.classes[name].fields) do
      local listed = false
      for e, t in pairs(found) do
        if t.names[k] and (e.class == name or (e.all and descends(model, e.class, name))) then listed = true end
      end
      if not listed then
        problem("%s has ---@field %s (%s:%d), but no README option table lists it", name, k, d.path, d.line)
      end
    end
  end
  table.sort(problems)
  return problems
end

--- The option sets of duplex.options against their classes.
local function compare_options(sets, model)
  local problems = {}
  for _, o in ipairs(OPTION_SETS) do
    local checked, fields = sets[o.set] or {}, all_fields(model, o.class)
    for _, k in ipairs(sorted(checked)) do
      if not fields[k] then problems[#problems + 1] = "options." .. o.set .. " checks " .. k .. ", " .. o.class
        .. " has no such field" end
    end
    for _, k in ipairs(sorted(fields)) do
      if not checked[k] then problems[#problems + 1] = o.class .. " has the field " .. k .. ", options." .. o.set
        .. " does not check it" end
    end
  end
  if model.classes["duplex.WorkersOptions"] then
    local run = all_fields(model, "duplex.RunOptions")
    for k in pairs(model.classes["duplex.WorkersOptions"].fields) do
      if not run[k] then problems[#problems + 1] = "duplex.WorkersOptions has " .. k .. ", duplex.RunOptions not" end
    end
  end
  table.sort(problems)
  return problems
end

--- The stub against the built C module: its functions and fields, and the
--- methods of each userdata class (from the metatables in the registry).
local function compare_core(core, registry, model)
  local problems = {}
  local stub = model.modules["duplex.core"] and model.modules["duplex.core"].members or {}
  for k in pairs(core) do
    if not stub[k] then
      problems[#problems + 1] = "duplex.core." .. k .. " is exported but not in types/duplex/core.lua"
    end
  end
  for k in pairs(stub) do
    if core[k] == nil then
      problems[#problems + 1] = "types/duplex/core.lua has core." .. k .. ", duplex.core does not"
    end
  end
  for name, mt in pairs(registry) do
    if type(name) == "string" and name:match("^duplex%.") and type(mt) == "table" and type(mt.__index) == "table"
        and not METATABLES[name] then
      problems[#problems + 1] = "metatable " .. name .. " has methods, but METATABLES maps it to no class"
    end
  end
  for mtname, cname in pairs(METATABLES) do
    local mt = registry[mtname]
    local methods = type(mt) == "table" and type(mt.__index) == "table" and mt.__index or {}
    local class = model.classes[cname]
    if type(mt) ~= "table" then problems[#problems + 1] = "no metatable " .. mtname .. " in the registry" end
    if not class then
      problems[#problems + 1] = cname .. " is not in types/duplex/core.lua"
    else
      for k in pairs(methods) do
        if not class.methods[k] then problems[#problems + 1] = cname .. ":" .. k .. " exists but is not in the stub" end
      end
      for k in pairs(class.methods) do
        if methods[k] == nil then problems[#problems + 1] = cname .. ":" .. k .. " is in the stub but not in C" end
      end
    end
  end
  table.sort(problems)
  return problems
end

-- ---- the files -----------------------------------------------------------------

local function read(path) return assert(require("support.proc").read_file(path), "cannot read " .. path) end

local function lua_files()
  local out = {}
  local p = assert(io.popen("ls lua/duplex/*.lua lua/duplex/*/*.lua types/duplex/*.lua"))
  for path in p:lines() do out[#out + 1] = { path = path, text = read(path) } end
  p:close()
  return out
end

local function with_text(files, path, fn)
  local copy = {}
  for i, f in ipairs(files) do
    copy[i] = f.path == path and { path = f.path, text = fn(f.text) } or f
  end
  return copy
end

local function listing(problems)
  return #problems .. " mismatches:\n  " .. table.concat(problems, "\n  ")
end

local function has(problems, ...)
  for _, p in ipairs(problems) do
    local all = true
    for _, word in ipairs { ... } do
      if not p:find(word, 1, true) then all = false end
    end
    if all then return true end
  end
  return false
end

-- Replace exactly one occurrence (plain text), so a self-test cannot go
-- silently stale when the text it edits changes.
local function once(text, old, new)
  local a, b = text:find(old, 1, true)
  assert(a, "self-test anchor not found: " .. old)
  assert(not text:find(old, b + 1, true), "self-test anchor not unique: " .. old)
  return text:sub(1, a - 1) .. new .. text:sub(b + 1)
end

describe("the API reference (README.md) and the LuaLS annotations", function()
  local readme_text = read("README.md")
  local files = lua_files()
  local readme = parse_readme(readme_text)
  local model = build_model(files)

  it("are parsed into something (a parser that finds nothing would pass anything)", function()
    assert.is_true(#readme.names > 100, #readme.names .. " names")
    assert.is_true(#readme.option_tables >= #OPTION_TABLES, #readme.option_tables .. " option tables")
    assert.truthy(model.classes["duplex.WebSocket"].methods.receive)
    assert.truthy(model.classes["duplex.ListenOptions"].fields.port)
    assert.truthy(model.modules["duplex"].members.listen)
    assert.truthy(model.modules["duplex.core"].members.engine)
    assert.truthy(model.classes["duplex.core.Engine"].methods.feed)
  end)

  it("name the same functions, fields and options", function()
    local problems = compare(readme, model)
    assert(#problems == 0, listing(problems))
  end)

  it("have the option classes that lua/duplex/options.lua checks", function()
    local problems = compare_options(options, model)
    assert(#problems == 0, listing(problems))
  end)

  it("have in types/duplex/core.lua every function and method the C module registers", function()
    local core = require "duplex.core"
    local problems = compare_core(core, debug.getregistry(), model)
    assert(#problems == 0, listing(problems))
  end)
end)

describe("the API docs check itself", function()
  local readme_text = read("README.md")
  local files = lua_files()
  local model = build_model(files)

  local function readme_with(old, new) return parse_readme(once(readme_text, old, new)) end

  it("reports a method named in README only", function()
    local readme = readme_with("| `ws:buffered()` |", "| `ws:frobnicate()` | x | |\n| `ws:buffered()` |")
    assert.is_true(has(compare(readme, model), "ws:frobnicate", "duplex.WebSocket has no annotated frobnicate"))
  end)

  it("reports an owner README uses that OWNERS does not know", function()
    local readme = readme_with("| `ws:buffered()` |", "| `frob:nicate()` | x | |\n| `ws:buffered()` |")
    assert.is_true(has(compare(readme, model), "`frob:nicate()`", "owner `frob`"))
  end)

  it("reports a field, a method, a module function annotated only", function()
    local m = build_model(with_text(files, "lua/duplex/websocket.lua", function(text)
      text = once(text, "---@field data table", "---@field frobnicated integer\n---@field data table")
      local anchor = "--- Bytes queued for the peer and not yet written.\n"
      return once(text, anchor,
        "function WebSocket:frob()\nend\n\n--- Documented.\nfunction WebSocket:nicate()\nend\n\n" .. anchor)
    end))
    local problems = compare(parse_readme(readme_text), m)
    assert.is_true(has(problems, "duplex.WebSocket.frobnicated", "do not name it"))
    assert.is_true(has(problems, "duplex.WebSocket:frob", "no --- annotation"))
    assert.is_true(has(problems, "duplex.WebSocket.nicate", "do not name it"))
    m = build_model(with_text(files, "lua/duplex/pubsub.lua", function(text)
      return once(text, "return pubsub", "--- Documented.\nfunction pubsub.frob() end\n\nreturn pubsub")
    end))
    assert.is_true(has(compare(parse_readme(readme_text), m), "duplex.pubsub.frob", "do not name it"))
  end)

  it("reports an option listed in README only, and one annotated only", function()
    local readme = readme_with("| `backlog` |", "| `timeot` | | |\n| `backlog` |")
    assert.is_true(has(compare(readme, model), "option `timeot`", "duplex.ListenOptions has no ---@field timeot"))
    local m = build_model(with_text(files, "lua/duplex/init.lua", function(text)
      return once(text, "---@field backlog? integer", "---@field timeot? number\n---@field backlog? integer")
    end))
    local problems = compare(parse_readme(readme_text), m)
    assert.is_true(has(problems, "duplex.ListenOptions has ---@field timeot", "does not list it"))
    assert.is_true(has(compare_options(options, m), "duplex.ListenOptions has the field timeot"))
  end)

  it("reports a class nobody classified, and an option set that disagrees with its class", function()
    local m = build_model(with_text(files, "lua/duplex/pubsub.lua", function(text)
      return once(text, "local pubsub = {}", "local pubsub = {}\n\n---@class duplex.Frob\n---@field x integer\n")
    end))
    assert.is_true(has(compare(parse_readme(readme_text), m), "class duplex.Frob", "not classified"))
    local sets = { listen = {}, route = {}, connect = {} }
    for _, k in ipairs { "listen", "route", "connect" } do
      for name, v in pairs(options[k]) do sets[k][name] = v end
    end
    sets.connect.timeot = function() end
    sets.route.handler = nil
    local problems = compare_options(sets, model)
    assert.is_true(has(problems, "options.connect checks timeot"))
    assert.is_true(has(problems, "duplex.RouteOptions has the field handler", "does not check it"))
  end)

  it("reports a C function or method missing from the stub, and one the C module lacks", function()
    local core = {}
    for k, v in pairs(require "duplex.core") do core[k] = v end
    core.frob = function() end
    core.engine = nil
    local registry = { ["duplex.engine"] = { __index = { feed = print, frob = print } } }
    local problems = compare_core(core, registry, model)
    assert.is_true(has(problems, "duplex.core.frob is exported"))
    assert.is_true(has(problems, "core.engine, duplex.core does not"))
    assert.is_true(has(problems, "duplex.core.Engine:frob exists"))
    assert.is_true(has(problems, "duplex.core.Engine:next is in the stub but not in C"))
  end)
end)
