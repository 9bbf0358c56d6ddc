--- Redis for duplex: a general client (duplex/redis/client.lua), and the
--- broker that shares duplex.pubsub's rooms between nodes through it
--- (duplex/redis/broker.lua). RESP is spoken over duplex's own non-blocking
--- sockets (the lua-resty-redis approach): no extra C dependency, and the
--- event loop never blocks on Redis.
local redis = {}

--- A general Redis client: commands, pipelines, pub/sub (duplex/redis/client.lua).
---@type fun(url_or_opts: string|table): duplex.RedisClient|nil, string|nil
redis.connect = require("duplex.redis.client").connect
--- A Redis Cluster client: slots, redirects, failover (duplex/redis/cluster.lua).
---@type fun(opts: duplex.RedisClusterOptions|string): duplex.RedisCluster|nil, string|nil
redis.cluster = require("duplex.redis.cluster").connect
--- The cluster slot of a key: CRC16 of its {hash tag} or of all of it, mod 16384.
---@type fun(key: string): integer
redis.slot = require("duplex.redis.cluster").slot

--- A broker for duplex.pubsub: rooms across nodes, with history, recovery
--- and presence (duplex/redis/broker.lua). Starts connecting in the
--- background; nil, err only for a bad URL or TLS setup.
---@type fun(opts: duplex.RedisOptions|nil): duplex.RedisBroker|nil, string|nil
redis.broker = require("duplex.redis.broker").new

return redis
