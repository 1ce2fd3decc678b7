"""``FlowerEngine``: runs the server loop's client tasks on Flower nodes through a ``Grid``.

Everything the server decides (sampling, faults, encoding, decoding, aggregation,
evaluation) happens in :class:`sparsefl.runtime.server.Server`; this engine only carries each
:class:`~sparsefl.protocol.messages.ClientTask` to the node hosting the client and brings back a
:class:`~sparsefl.protocol.messages.ClientResult` or a :class:`~sparsefl.runtime.server.ClientFailure`,
in task order, exactly as :class:`~sparsefl.engines.embedded.EmbeddedEngine` does.

Client ``c`` lives on node ``sorted(node_ids)[c mod N]`` for the whole run
(:func:`node_of_client`), because its state is in that
node's ``context.state``. A node never has two of our messages in flight: when a round
samples several clients of one node, they go in *waves* (the k-th client of every node in
wave k). Flower's simulation runtime runs two messages for one node concurrently and keeps
the context of whichever finishes last, so without waves one client's new state would be lost.

Failures: a reply carrying an ``Error`` (the client raised, the node is unavailable, the
ClientApp could not load), a reply that does not decode as ours, a message Flower could not
push, and no reply within the wait all become ``ClientFailure`` for that client only; the round
goes on with the others. Replies are polled every ``poll`` seconds rather than through
``Grid.send_and_receive``, which sleeps 3 s between polls in flwr 1.41.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from sparsefl.engines.flower.records import (
    DOWN,
    ERROR_PREFIX,
    UP,
    result_from_content,
    task_content,
)
from sparsefl.protocol.messages import ClientFailure, ClientResult, ClientTask
from sparsefl.runtime.server import ResultCallback


def node_of_client(client_id: int, node_ids: list[int]) -> int:
    """The node that hosts client ``client_id``: ``sorted(node_ids)[client_id mod N]``.

    Fixed for the whole run (the node list is taken once, before round 1), because a client's
    state lives in that node's ``context.state``. Several clients share a node when there are
    more clients than nodes.
    """
    ids = sorted(node_ids)
    return ids[client_id % len(ids)]


def serialized_bytes(obj: Any) -> int:
    """Bytes of a Flower record as serialized for the wire (every nested object, deflated)."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(obj).values())


class FlowerEngine:
    """Runs client tasks on Flower nodes (implements :class:`sparsefl.runtime.server.Engine`).

    Parameters
    ----------
    grid:
        The ServerApp's ``Grid``.
    node_ids:
        The nodes of the run, fixed before round 1.
    experiment:
        Short hash of the resolved config; a ClientApp whose config differs refuses the task.
    codec_down, codec_up:
        Codec names for the Array ``stype`` tags (``comm.down``, ``comm.up``).
    reply_timeout:
        Seconds to wait for one wave of replies.
    poll:
        Seconds between reply polls.
    trace:
        Optional JSONL file: one line per task with the bytes Flower carried (see :meth:`run`).
    """

    def __init__(
        self,
        grid: Grid,
        node_ids: Sequence[int],
        *,
        experiment: str,
        codec_down: str,
        codec_up: str,
        reply_timeout: float,
        poll: float = 0.2,
        trace: str | Path | None = None,
    ) -> None:
        if not node_ids:
            raise ValueError("FlowerEngine needs at least one node")
        self.grid = grid
        self.node_ids = sorted(int(n) for n in node_ids)
        self.experiment = experiment
        self.codec_down, self.codec_up = codec_down, codec_up
        self.reply_timeout = reply_timeout
        self.poll = poll
        self.trace = Path(trace) if trace else None

    def node_of(self, client_id: int) -> int:
        """The node hosting ``client_id``."""
        return node_of_client(client_id, self.node_ids)

    def waves(self, tasks: Sequence[ClientTask]) -> list[list[int]]:
        """Task indices grouped so that no node appears twice in a group (order kept)."""
        waves: list[list[int]] = []
        seen: dict[int, int] = {}
        for i, t in enumerate(tasks):
            node = self.node_of(t.client_id)
            k = seen.get(node, 0)
            seen[node] = k + 1
            if k == len(waves):
                waves.append([])
            waves[k].append(i)
        return waves

    def run(
        self, tasks: Sequence[ClientTask], on_result: ResultCallback | None = None
    ) -> list[ClientResult | ClientFailure]:
        """Send every task to its node and collect one result or failure per task, in order
        (``on_result`` is not called: the server decodes after this returns, rather than
        delay the next wave's push).

        With ``trace`` set, appends per task: round, client, node, wave, ``down_bytes`` /
        ``up_bytes`` (our payload lengths), ``down_count_bytes`` / ``up_count_bytes``
        (``ArrayRecord.count_bytes()`` of what Flower carried), ``up_serialized_bytes`` (the
        reply's ArrayRecord as serialized objects), ``wall`` (seconds until the reply) and
        ``failure``.
        """
        out: list[ClientResult | ClientFailure | None] = [None] * len(tasks)
        lines: list[dict[str, Any]] = []
        for w, wave in enumerate(self.waves(tasks)):
            self._run_wave([tasks[i] for i in wave], wave, out, lines, w)
        if self.trace is not None:
            self.trace.parent.mkdir(parents=True, exist_ok=True)
            with open(self.trace, "a") as f:
                f.writelines(json.dumps(line) + "\n" for line in lines)
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]

    def _run_wave(
        self,
        tasks: list[ClientTask],
        index: list[int],
        out: list[ClientResult | ClientFailure | None],
        lines: list[dict[str, Any]],
        wave: int,
    ) -> None:
        msgs = []
        for t in tasks:
            content = task_content(t, self.codec_down, self.experiment)
            msgs.append(Message(content, self.node_of(t.client_id), MessageType.TRAIN, group_id=str(t.round)))
            lines.append(
                {
                    "round": t.round,
                    "client": t.client_id,
                    "node": self.node_of(t.client_id),
                    "wave": wave,
                    "down_bytes": t.downlink_bytes,
                    "down_count_bytes": content.array_records[DOWN].count_bytes(),
                }
            )
        traced = lines[-len(tasks) :]
        t0 = time.monotonic()
        ids = list(self.grid.push_messages(msgs))
        if len(ids) != len(msgs):  # HttpGrid answers [] when the batch is too large: push one by one
            ids = [next(iter(self.grid.push_messages([m])), None) for m in msgs]
        pending: dict[str, int] = {}
        for j, mid in enumerate(ids):
            if mid:
                pending[mid] = j
            else:
                out[index[j]] = ClientFailure(tasks[j].client_id, "flower: the message could not be pushed")
        deadline = t0 + self.reply_timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                j = pending.pop(reply.metadata.reply_to_message_id, -1)
                if j < 0:
                    continue
                out[index[j]] = self._convert(tasks[j], reply, traced[j])
                traced[j]["wall"] = round(time.monotonic() - t0, 3)
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        for j in pending.values():
            node = self.node_of(tasks[j].client_id)
            out[index[j]] = ClientFailure(
                tasks[j].client_id, f"timeout: no reply from node {node} within {self.reply_timeout:g} s"
            )
        for j, t in enumerate(tasks):
            o = out[index[j]]
            traced[j]["failure"] = o.reason if isinstance(o, ClientFailure) else None
            assert o is None or o.client_id == t.client_id

    def _convert(self, task: ClientTask, reply: Message, line: dict[str, Any]) -> ClientResult | ClientFailure:
        if reply.has_error():
            err = reply.error
            reason = err.reason or ""
            if reason.startswith(ERROR_PREFIX):
                return ClientFailure(task.client_id, reason[len(ERROR_PREFIX) :])
            return ClientFailure(task.client_id, f"flower error {err.code}: {reason}")
        try:
            res = result_from_content(reply.content)
        except (KeyError, ValueError, TypeError) as e:
            return ClientFailure(task.client_id, f"flower: malformed reply ({type(e).__name__}: {e})")
        if (res.round, res.client_id) != (task.round, task.client_id):
            return ClientFailure(
                task.client_id, f"flower: reply for client {res.client_id} round {res.round}, expected this task's"
            )
        up = reply.content.array_records[UP]
        line.update(
            up_bytes=res.uplink_bytes, up_count_bytes=up.count_bytes(), up_serialized_bytes=serialized_bytes(up)
        )
        return res

    def close(self) -> None:
        """Nothing to release: the Grid belongs to the ServerApp."""
