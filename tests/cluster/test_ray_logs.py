"""Ray's noise on a healthy start is cut to one line: the placement-group cleaner's thread traceback (as captured
from a local run beside another Ray cluster) and Ray Train's worker-group startup timeout; other lines pass."""

from dist_moe.cluster.ray_logs import filter_lines

CLEANER_TRACEBACK = """Exception in thread PlacementGroupCleanerMonitor:
Traceback (most recent call last):
  File "/usr/lib/python3.11/threading.py", line 1045, in _bootstrap_inner
    self.run()
  File ".../ray/train/v2/_internal/execution/controller/placement_group_cleaner.py", line 80, in _monitor_loop
    alive = is_actor_alive(
            ^^^^^^^^^^^^^^^
  File ".../ray/_private/services.py", line 759, in canonicalize_bootstrap_address_or_die
    raise ConnectionError(
ConnectionError: Found multiple active Ray instances: {'192.0.2.2:39087', '192.0.2.2:45807'}. Please specify \
the one to connect to by setting the `--address` flag or `RAY_ADDRESS` environment variable.""".splitlines()

STARTUP_TIMEOUT = """Retrying the launch of the training worker group. The previous launch attempt encountered:
Traceback (most recent call last):
  File ".../ray/train/v2/_internal/execution/worker_group/worker_group.py", line 300, in _start
    raise WorkerGroupStartupTimeoutError(
ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError: The worker group startup timed out after 30 \
seconds waiting for 2 workers.""".splitlines()


def test_cleaner_traceback_becomes_one_line_and_its_continuation_is_dropped():
    out = filter_lines({"actor_name": "PlacementGroupCleaner", "lines": CLEANER_TRACEBACK})
    assert len(out) == 1 and "placement-group cleaner stopped (ConnectionError: Found multiple" in out[0]
    assert filter_lines({"actor_name": "PlacementGroupCleaner", "lines": CLEANER_TRACEBACK[2:6]}) == []
    cleanup = ["Detected that the Ray Train controller actor (ab12) is dead. Cleaning up placement group = [cd34]"]
    assert filter_lines({"actor_name": "PlacementGroupCleaner", "lines": cleanup}) == cleanup


def test_startup_timeout_traceback_becomes_one_line_and_other_lines_pass():
    out = filter_lines({"actor_name": "TrainController", "lines": STARTUP_TIMEOUT})
    assert out[0] == STARTUP_TIMEOUT[0] and len(out) == 2 and "did not start in time" in out[1]
    training = ["rank 0 of 2 on node 10.1.2.3", "step      4/4 | loss 6.0250", "Traceback (most recent call last):",
                '  File "train.py", line 3', "ValueError: a real failure of ours"]
    assert filter_lines({"actor_name": "RayTrainWorker", "lines": training}) == training
