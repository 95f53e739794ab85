"""Embedding tables served from Redis Cluster (``redis://host:port[,host:port…]``).

One responsibility per module:

- :mod:`~mixexport.tables.redis.url`: parse a store URL (nodes, model name, deadline, cache size);
- :mod:`~mixexport.tables.redis.cluster`: a small cluster client over raw sockets and hiredis: the
  slot map, one pipelined round trip per node sent to every node before any reply is read, a
  deadline on the whole round trip, the slot map refreshed on MOVED/ASK or a dead node;
- :mod:`~mixexport.tables.redis.keys`: the key layout (buckets, hash tags chosen by slot range) and
  the vectorised RESP packing of HMGET/HSET;
- :mod:`~mixexport.tables.redis.publish`: ``mixexport publish``: stream, digest read-back, atomic
  pointer flip, resume, ``--gc`` with a grace period;
- :mod:`~mixexport.tables.redis.cache`: a vectorised, byte-bounded row cache per table;
- :mod:`~mixexport.tables.redis.store`: the ``redis`` table store the runtime scores through.

See the "Redis Cluster" section of docs/tables.md.
"""
