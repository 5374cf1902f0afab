"""A data processor SIGKILLed mid-task takes its workers, their tasks and their Qlib cache locks with
it: another processor computes the feature set, and the dataset is served normally afterwards."""

from __future__ import annotations

import time

import pandas.testing as pdt
import psutil
import pytest
from clients import local_qlib, run_pyqlib
from conftest import wait_until
from faults import busy_workers, consumers, cpu_seconds, crowd, feature_body, salt, slow_terms, worker_processes
from qlib.data.cache import DiskDatasetCache

from qlib_server.broker.base import light_queue

pytestmark = pytest.mark.integration

START, END = "2019-03-01", "2019-08-30"


def gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_killed_data_processor_takes_its_workers_along_and_another_computes_their_feature_set(
        start_server, services, dataset):
    handler = start_server(modules=("request_handler",))
    processors = [start_server(modules=("data_processor",), wait=False) for _ in range(2)]
    tasks = handler.config["task_queue"]
    wait_until(lambda: (consumers(services, tasks), consumers(services, light_queue(tasks))) == (4, 2), 120,
               what="the workers of both processors consuming")
    workers = {processor.proc.pid: worker_processes(processor) for processor in processors}
    everyone = [w for group in workers.values() for w in group]
    baseline = [cpu_seconds(w) for w in everyone]
    fields = slow_terms(12, salt())
    body = feature_body(fields)
    with crowd([handler.url], 3) as waiting:
        waiting.send("feature", [body] * 3)
        busy = wait_until(lambda: busy_workers(everyone, baseline), 90, what="a worker computing the feature set")[0]
        victim = psutil.Process(busy.ppid())
        assert victim.pid in workers, "the busy worker is not a processor's child"
        victim.kill()  # the whole `-m data_processor` process
        killed = time.monotonic()
        wait_until(lambda: all(gone(w) for w in workers[victim.pid]), 10, what="the killed processor's workers gone")
        print(f"\nprocessor {victim.pid} SIGKILLed while its worker {busy.pid} computed; its "
              f"{len(workers[victim.pid])} workers were gone {time.monotonic() - killed:.1f}s later")
        answers = waiting.receive("feature", 180)
        print(f"statuses {[a['status'] for a in answers]} {time.monotonic() - killed:.1f}s after the kill")
    assert [a["status"] for a in answers] == [0, 0, 0], answers[0]["detailed_info"]
    uri = answers[0]["result"]
    assert {a["result"] for a in answers} == {uri}
    assert handler.metric("qlib_server_tasks_redelivered_total", type="feature") == 1
    assert handler.metric("qlib_server_tasks_processed_total", type="feature", status="0") == 1

    served = DiskDatasetCache.read_data_from_cache(dataset / "dataset_cache" / uri, None, None, fields)
    script = f"""
fields = {fields!r}
result = (D.features(D.instruments("all"), fields, disk_cache=1),
          D.features(D.instruments("all"), fields, {START!r}, {END!r}, disk_cache=1))
"""
    local = local_qlib(script, dataset)
    assert not local[0].empty and local[0].notna().mean().min() > 0.9
    pdt.assert_frame_equal(served.sort_index(), local[0].sort_index(), check_freq=False)

    with crowd([handler.url], 1) as again:  # the same dataset, asked again
        second = again.clients[0].request("feature", body)
    assert (second["status"], second["result"]) == (0, uri)
    started = time.monotonic()
    whole, window = run_pyqlib(script, handler.port, dataset)  # a real client, another time window too
    print(f"afterwards a pyqlib client got the whole history and {START}..{END} in {time.monotonic() - started:.1f}s")
    pdt.assert_frame_equal(whole.sort_index(), local[0].sort_index(), check_freq=False)
    pdt.assert_frame_equal(window.sort_index(), local[1].sort_index(), check_freq=False)
