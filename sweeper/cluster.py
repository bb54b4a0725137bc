"""Checks that need a running cluster: does every node see the sweep's storage?

Ray Tune writes each trial's checkpoints to ``--storage`` from the node that runs the trial, and
restores a trial on whichever node is free. A folder that only the driver's node has (the head's
``/home/ubuntu/sweeps`` without a shared mount) passes every check on the driver and fails at a
worker's first checkpoint (Ray: "A local path on the head node is not accessible by worker nodes").
:func:`check_shared_storage` asks every node, right after Ray is connected and before any trial.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from urllib.parse import urlparse

from analysis.schema import is_uri
from trainables.config import SweeperError

_HELP = (
    "use an s3://bucket/prefix URI or a folder every node mounts at the same path "
    "(NFS/EFS; cluster.yaml exports the head's /home/ubuntu/sweeps to the workers)"
)


def local_storage_path(storage: str) -> str | None:
    """The node-local folder behind ``storage`` (a path or a file:// URI); None for an object store."""
    if storage.startswith("file://"):
        return urlparse(storage).path or None
    return None if is_uri(storage) else storage


def check_shared_storage(address: str | None, storage: str, timeout: float = 120.0) -> None:
    """On a cluster (``--address`` given) with a local-path storage, make sure every alive node sees it.

    Writes a marker file with a random nonce under the storage root, then runs one tiny task pinned to
    each other alive node (``NodeAffinitySchedulingStrategy``, no CPU, so a ``CPU: 0`` head counts
    too) that reads the marker back and writes a file beside it. A node that cannot is one
    :class:`SweeperError` line naming the path and the node. A node that does not answer within
    ``timeout`` (or dies meanwhile) is a warning: the check is inconclusive there, and Ray's own
    check still stops a trial that cannot checkpoint. Ray Client addresses (``ray://``) are skipped:
    there the sweep's driver runs on the head, not here. Nodes that join later (autoscaling) are not
    checked: they run the same setup commands.
    """
    import os

    address = address or os.environ.get("RAY_ADDRESS")  # ray.init() joins RAY_ADDRESS when no --address
    if address in (None, "", "local") or address.startswith("ray://"):
        return
    path = local_storage_path(storage)
    if path is None:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    if not nodes:
        return

    def sees(marker: str, nonce: str) -> str:  # nested: pickled by value, nothing to import on the node
        import tempfile
        from pathlib import Path

        try:
            if Path(marker).read_text() != nonce:
                return "missing"
        except OSError:
            return "missing"
        try:
            with tempfile.NamedTemporaryFile(dir=Path(marker).parent, prefix=".sweeper-write-check-"):
                pass
        except OSError:
            return "read-only"
        return "ok"

    probe = ray.remote(num_cpus=0, max_retries=0)(sees)
    nonce = secrets.token_hex(16)
    marker = Path(path) / f".sweeper-shared-check-{nonce}"
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)  # a new file:// storage is not made before this
        marker.write_text(nonce)
    except OSError as e:
        raise SweeperError(f"--storage {path}: cannot write a file there: {e.strerror}") from None
    try:
        refs = {
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker), nonce
            ): n
            for n in nodes
        }
        done, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        bad, unknown = [], [refs[r] for r in pending]
        for ref in done:
            try:
                outcome = ray.get(ref)
            except Exception:  # the node died or could not take the task: not an answer about storage
                unknown.append(refs[ref])
                continue
            if outcome != "ok":
                bad.append((refs[ref], outcome))
        for ref in pending:
            ray.cancel(ref)
    finally:
        marker.unlink(missing_ok=True)
    if bad:
        names = ", ".join(
            f"{_node_name(n)} {'cannot write to it' if why == 'read-only' else 'does not see it'}" for n, why in bad[:3]
        ) + (f", and {len(bad) - 3} more nodes" if len(bad) > 3 else "")
        raise SweeperError(f"--storage {path} is not shared by every node of the cluster: {names}; {_HELP}")
    if unknown:
        print(
            f"sweeper: warning: could not check within {timeout:.0f} s that "
            f"{', '.join(map(_node_name, unknown))} sees --storage {path}; going on",
            file=sys.stderr,
        )


def _node_name(node: dict) -> str:
    return f"node {node.get('NodeManagerAddress', '?')} (id {node['NodeID'][:12]})"
