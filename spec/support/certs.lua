-- Throwaway certificates for the TLS specs, made with the openssl CLI in a
-- private temp directory:
--
--   local certs = require "support.certs"
--   local c = certs.generate()   -- c.ca, c.cert, c.key: a CA and a server
--                                -- certificate for localhost, 127.0.0.1, ::1
--   c.wrong_cert, c.wrong_key    -- signed by the same CA for another name
--   c.other_ca                   -- a CA that signed none of them
--   c.partial_cert, c.partial_key -- for "b*.example.test" (a partial wildcard)
--   c.wild_cert, c.wild_key       -- for "*.example.test"
--   c.node_cert, c.node_key       -- c.cert's names, for servers and clients both (the
--                                 -- Redis Cluster bus, where each node is both)
--   c.cleanup()
local certs = {}

local function quote(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

local function sh(cmd)
  local ok = os.execute(cmd .. " >/dev/null 2>&1")
  assert(ok, "command failed: " .. cmd)
end

local write = require("support.proc").write_file

local function make_ca(dir, name)
  local cnf = dir .. "/" .. name .. ".cnf"
  write(cnf, table.concat({
    "[req]", "distinguished_name = dn", "prompt = no", "[dn]", "CN = duplex test " .. name,
    "[ext]", "basicConstraints = critical,CA:TRUE", "keyUsage = critical,keyCertSign,cRLSign",
    "subjectKeyIdentifier = hash", ""}, "\n"))
  sh(("openssl req -x509 -config %s -extensions ext -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    .. " -keyout %s -out %s -days 2"):format(quote(cnf), quote(dir .. "/" .. name .. ".key"),
    quote(dir .. "/" .. name .. ".pem")))
  return dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".key"
end

local function make_leaf(dir, name, cn, san, ca, ca_key, usage)
  local cnf = dir .. "/" .. name .. ".cnf"
  write(cnf, table.concat({
    "[req]", "distinguished_name = dn", "prompt = no", "[dn]", "CN = " .. cn,
    "[ext]", "basicConstraints = critical,CA:FALSE", "keyUsage = critical,digitalSignature",
    "extendedKeyUsage = " .. (usage or "serverAuth"), "subjectAltName = " .. san, ""}, "\n"))
  local key, csr, pem = dir .. "/" .. name .. ".key", dir .. "/" .. name .. ".csr", dir .. "/" .. name .. ".pem"
  sh(("openssl req -new -config %s -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s -out %s")
    :format(quote(cnf), quote(key), quote(csr)))
  sh(("openssl x509 -req -in %s -CA %s -CAkey %s -CAcreateserial -out %s -days 2 -extfile %s -extensions ext")
    :format(quote(csr), quote(ca), quote(ca_key), quote(pem), quote(cnf)))
  return pem, key
end

function certs.generate()
  local dir = os.tmpname()
  os.remove(dir)
  sh("mkdir -m 700 " .. quote(dir))
  local c = {dir = dir}
  local ca_key
  c.ca, ca_key = make_ca(dir, "ca")
  c.other_ca = make_ca(dir, "other-ca")
  c.cert, c.key = make_leaf(dir, "server", "localhost", "DNS:localhost, IP:127.0.0.1, IP:::1", c.ca, ca_key)
  c.wrong_cert, c.wrong_key = make_leaf(dir, "wrong", "wrong.example", "DNS:wrong.example", c.ca, ca_key)
  c.partial_cert, c.partial_key = make_leaf(dir, "partial", "partial wildcard", "DNS:b*.example.test", c.ca, ca_key)
  c.wild_cert, c.wild_key = make_leaf(dir, "wild", "wildcard", "DNS:*.example.test", c.ca, ca_key)
  c.node_cert, c.node_key = make_leaf(dir, "node", "localhost", "DNS:localhost, IP:127.0.0.1, IP:::1", c.ca, ca_key,
    "serverAuth, clientAuth")
  function c.cleanup() os.execute("rm -rf " .. quote(dir)) end
  return c
end

return certs
