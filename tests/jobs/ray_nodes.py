"""Worker nodes of a `ray.cluster_utils.Cluster` for the multi-node tests, and how busy they are."""

from __future__ import annotations

#: one small worker node: 1 CPU, a small object store (the machine has 2 cores)
NODE = {"num_cpus": 1, "object_store_memory": 80 * 2**20}


def add_node(cluster):
    """A worker node; Ray gives a raylet 30 s to register, so on an overloaded machine try twice."""
    for attempt in (1, 2):
        try:
            node = cluster.add_node(**NODE)
            cluster.wait_for_nodes()
            return node
        except Exception:  # "The current node timed out during startup"
            if attempt == 2:
                raise


def cpu_used(node_id: str) -> float:
    """CPUs in use on one node, as the GCS sees them (no dashboard needed)."""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_status

    status = get_cluster_status(ray.get_runtime_context().gcs_address)
    for n in status.active_nodes + status.idle_nodes:
        if n.node_id == node_id and n.resource_usage is not None:
            return sum(u.used for u in n.resource_usage.usage if u.resource_name == "CPU")
    return 0.0
