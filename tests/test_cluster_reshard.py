"""Cluster mode while a Redis Cluster moves a slot to another master (resharding).

The slot of a subscribed id is moved by hand, as ``redis-cli --cluster reshard`` does it:
IMPORTING on the target, MIGRATING on the source, its keys MIGRATEd, then the slot given
to the target on every master.  Meanwhile publishes meet ``ASK`` (keys already moved) or
``TRYAGAIN`` (the script's keys split between the two): a 503 the publisher retries with
its Idempotency-Key.  Once the slot is given away, Redis ends the shard subscriptions of
its channels (a server-sent SUNSUBSCRIBE); the home must join them again at the new master
and fill the gap from the stream.  The subscriber gets every confirmed message once.
"""

import json
import time
import uuid

from redisfixtures import redislab, require_redis
from test_cluster import Model, sse_epoch, sse_messages, sse_open, totals, two_nodes

RETRY_FOR = 10.0                              # seconds a publish is retried on 503


def publish_retrying(node, ident, data, model):
    key = uuid.uuid4().hex                    # one key per message: its retries store it once
    deadline = time.monotonic() + RETRY_FOR
    while True:
        status, _, body = node.request("POST", "/pub/" + ident, data.encode(),
                                       headers={"Idempotency-Key": key})
        if status == 202:
            seq = json.loads(body)["seq"]
            model.confirm(ident, seq, data)
            return seq
        assert status == 503 and time.monotonic() < deadline, (status, body)
        time.sleep(0.05)


def move_slot(cluster, slot, source, target):
    """Give ``slot`` (and its keys) from master ``source`` to master ``target``."""
    target.command("CLUSTER", "SETSLOT", slot, "IMPORTING", source.id)
    source.command("CLUSTER", "SETSLOT", slot, "MIGRATING", target.id)
    while True:
        keys = source.command("CLUSTER", "GETKEYSINSLOT", slot, 100, encoding=None)
        if not keys:
            break
        source.command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
    for master in cluster.masters():
        master.command("CLUSTER", "SETSLOT", slot, "NODE", target.id)


def test_a_slot_moved_to_another_master_loses_and_repeats_nothing(server_factory):
    require_redis()
    with redislab.Cluster() as cluster:
        a, b = two_nodes(server_factory, cluster.urls[:3])
        model = Model()
        ident = "reshard-" + uuid.uuid4().hex[:12]
        key = "mc:{%s}" % ident
        for n in range(1, 4):
            publish_retrying(a, ident, "m%d" % n, model)
        stream = sse_open(b, "/sse/%s?since=0" % ident)
        try:
            sse_epoch(stream)
            got, _ = sse_messages(stream, 3)
            model.check(ident, got, after=0, through=3)
            source = cluster.master_for_key(key)
            target = next(m for m in cluster.masters() if m is not source)
            slot = cluster.keyslot(key)
            before = totals(b)["redis_resubscribes"]
            move_slot(cluster, slot, source, target)
            assert cluster.master_for_key(key) is target
            for n in range(4, 10):
                publish_retrying(a if n % 2 else b, ident, "m%d" % n, model)
            more, epochs = sse_messages(stream, 6)
            model.check(ident, more, after=3, through=9)
            assert epochs == []                   # the same life: nothing starts over
            assert totals(b)["redis_resubscribes"] > before
            shard_channels = target.command("PUBSUB", "SHARDCHANNELS", key)
            assert shard_channels == [key]        # B's home joined it at the new master
        finally:
            stream.close()
