"""DiskView, the scheduler's knowledge of the disk tier: what it was told (planned writes and
deletes, start-up units, units the worker lost) and what its rescans of the folder find of
other engines' files, checked against files written and removed by real DiskStores."""
import torch

from kvplug.tiers.disk import DiskStore
from kvplug.tiers.disk_tier import DELETE_GRACE_S, DiskView

LAYOUT = "test-layout"


def key(i: int) -> bytes:
    return bytes([i]) * 32


def write(root, keys, ranks=(0,)):
    for rank in ranks:
        with DiskStore(root, LAYOUT, rank=rank) as store:
            for k in keys:
                store.put(k, torch.arange(64, dtype=torch.uint8) + k[0])


def remove(root, k, rank=0):
    with DiskStore(root, LAYOUT, rank=rank) as store:
        store.delete(k)


def test_a_rescan_finds_units_another_engine_wrote_once_every_rank_has_its_file(tmp_path):
    view = DiskView(tmp_path, tp_size=2)
    write(tmp_path, [key(1)], ranks=(0, 1))
    write(tmp_path, [key(2)], ranks=(0,))  # rank 1's part not there (yet)
    assert view.contains_many([key(1), key(2)]) == [False, False]  # nothing read until a rescan
    view.rescan()
    assert view.contains_many([key(1), key(2)]) == [True, False]
    write(tmp_path, [key(2)], ranks=(1,))
    view.rescan()
    assert view.contains_many([key(2)]) == [True]


def test_a_rescan_drops_units_whose_files_another_engine_deleted(tmp_path):
    view = DiskView(tmp_path, tp_size=1)
    write(tmp_path, [key(1), key(2)])
    view.rescan()
    remove(tmp_path, key(1))
    view.rescan()
    assert view.contains_many([key(1), key(2)]) == [False, True]


def test_planned_writes_count_at_once_and_a_planned_delete_is_not_undone_by_a_lingering_file(tmp_path):
    now = [0.0]
    view = DiskView(tmp_path, tp_size=1, clock=lambda: now[0])
    view.noted(key(3), True)  # planned: the worker writes it after the forward pass
    assert view.contains_many([key(3)]) == [True]
    view.rescan()  # its file is not there yet: a planned unit is not dropped for that
    assert view.contains_many([key(3)]) == [True]
    view.noted(key(4), False)  # we deleted it; the worker's delete has not run, another engine rewrote it
    write(tmp_path, [key(4)])
    view.rescan()
    assert view.contains_many([key(4)]) == [False]
    now[0] = DELETE_GRACE_S + 1
    write(tmp_path, [key(5)])  # the folder changes again; k4's file is older news
    view.rescan()
    assert view.contains_many([key(5)]) == [True]


def test_the_worker_reports_and_the_start_up_units_are_applied(tmp_path):
    view = DiskView(tmp_path, tp_size=1)
    view.restored([key(1), key(2)])
    view.lost([key(1)])
    assert view.contains_many([key(1), key(2)]) == [False, True]


def test_the_background_rescan_runs_and_stops(tmp_path):
    view = DiskView(tmp_path, tp_size=1, rescan_s=0.05)
    write(tmp_path, [key(7)])
    for _ in range(200):
        if view.contains_many([key(7)])[0]:
            break
        view._stop.wait(0.05)
    view.close()
    assert view.contains_many([key(7)]) == [True] and not view._thread.is_alive()
