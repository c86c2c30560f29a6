"""The lines tests/cluster/netns_cluster.py prints for an operator run as printed: inside a namespace PATH
need not hold the venv, so every program after `ip netns exec NAME` is an absolute path that exists."""

import os
import re

from tests.cluster.netns_cluster import NetnsCluster, walkthrough


def test_printed_commands_name_existing_programs_by_absolute_path():
    cluster = NetnsCluster(3)  # names and addresses only: no namespace is made before start()
    try:
        text = walkthrough(cluster, cpus_per_node=1)
    finally:
        cluster.close()
    programs = re.findall(r"ip netns exec \S+ (\S+)", text)
    assert len(programs) == 4 and {os.path.basename(p) for p in programs} == {"dist-moe", "ray"}
    for program in programs:
        assert os.path.isabs(program) and os.access(program, os.X_OK), program
    assert f"RAY_AUTH_TOKEN={cluster.env['RAY_AUTH_TOKEN']}" in text and "GLOO_SOCKET_IFNAME=eth0" in text
    assert f"--address {cluster.address}" in text and f"--node-ip-address {cluster.ips[2]}" in text
