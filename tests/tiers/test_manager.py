"""TierManager over an in-memory 'disk' (a dict standing in for the files, the scheduler's view of
it a HeldUnits) and a fake remote store; no vLLM, no tensors."""
import pytest

from kvplug.tiers.manager import Quota, SlowTier, TierManager
from kvplug.tiers.tier import CPU, HeldUnits

U = 100  # unit bytes
DISK = "disk"


def plan_saves(m, keys, ns=""):
    return m.plan_saves(keys, [1.0] * len(keys), ns)


def plan_loads(m, keys, ns=""):
    tiers = m.lookup(keys)
    assert len(tiers) == len(keys), "plan loads only for keys lookup() found"
    return m.plan_loads(keys, tiers, [1.0] * len(keys), ns)


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


class FakeRemote:
    """A remote store's scheduler-side view: asked directly, every call recorded."""

    def __init__(self, held=()):
        self.held, self.asked = set(held), []

    def contains_many(self, keys):
        self.asked.append(list(keys))
        return [key in self.held for key in keys]

    def noted(self, key, held):
        return

    def lost(self, keys):
        return

    def restored(self, keys):
        return

    def close(self):
        return


def manager(cpu=0, disk=None, disk_write="through", overhead=0, remote=None, payload_size=None, **kw) -> TierManager:
    """cpu/disk: capacities in bytes (disk None: no disk tier); remote: a FakeRemote or None."""
    tiers = []
    if disk is not None:
        tiers.append(SlowTier(DISK, HeldUnits(), disk, disk_write == "through", overhead, payload_size))
    if remote is not None:
        tiers.append(SlowTier("remote", remote))
    return TierManager(unit_bytes=U, cpu_bytes=cpu, tiers=tiers, **kw)


def seen_on_disk(m, *keys):
    """What the disk view learns from a rescan that finds these units (another engine's)."""
    m.tiers[DISK].view.restored(list(keys))


class FakeDisk(dict):
    most = 0  # the most units ever held at once

    def apply(self, mgr: TierManager, planned=(), ops=None):
        """Do what the worker does with a step's plans, in its order: the tier ops before the
        forward pass (as planned), the saves after it."""
        for tier, key, rows in ops.ops if ops else ():
            if tier != DISK:
                continue
            if not rows:
                self.pop(key, None)
            else:
                self._write(key)
        for s in planned:
            if DISK in s.tiers:
                self._write(s.key)

    def _write(self, key):
        self[key] = U
        self.most = max(self.most, len(self))


def test_cpu_only_save_lookup_load_and_lru_eviction():
    m = manager(cpu=3 * U, policy="lru")
    saves = plan_saves(m, [k(1), k(2), k(3)])
    assert [s.cpu_slot for s in saves] == [0, 1, 2] and not any(s.tiers for s in saves)
    m.end_step()
    assert m.lookup([k(1), k(2), k(3), k(4)]) == [CPU] * 3
    loads_ = plan_loads(m, [k(1)])  # k1 becomes most recent
    assert loads_[0].tier == CPU and loads_[0].slot == 0
    m.end_step()
    (s4,) = plan_saves(m, [k(4)])  # evicts the LRU: k2, and takes its slot
    assert s4.cpu_slot == 1
    m.end_step()
    assert m.lookup([k(2)]) == []
    assert m.lookup([k(1), k(3), k(4)]) == [CPU] * 3
    assert m.counters.take()["cpu_evictions"] == 1


def test_lookup_stops_at_first_gap_and_has_no_side_effects():
    m = manager(cpu=4 * U)
    plan_saves(m, [k(1), k(3)])
    m.end_step()
    before = m.counters.take()
    assert m.lookup([k(1), k(2), k(3)]) == [CPU]
    assert before and m.counters.take() == {}


def test_pinned_keys_are_never_evicted_in_their_step():
    m = manager(cpu=2 * U)
    plan_saves(m, [k(1), k(2)])
    m.end_step()
    plan_loads(m, [k(1), k(2)])  # both pinned this step
    assert plan_saves(m, [k(3)]) == []  # no slot can be freed: save dropped, not an error
    m.end_step()
    assert [s.key for s in plan_saves(m, [k(3)])] == [k(3)]


def test_write_through_then_cpu_eviction_leaves_disk_copy_and_disk_hit_promotes():
    disk = FakeDisk()
    m = manager(cpu=2 * U, disk=10 * U)
    disk.apply(m, plan_saves(m, [k(1), k(2)]), m.end_step())
    assert set(disk) == {k(1), k(2)}
    disk.apply(m, plan_saves(m, [k(3)]), m.end_step())  # evicts k1 from CPU
    assert m.lookup([k(1), k(2), k(3)]) == [DISK, CPU, CPU]  # k1 only on disk now
    assert m.lookup([k(2), k(3)]) == [CPU, CPU]
    (load,) = plan_loads(m, [k(1)])
    assert load.tier == DISK and load.slot >= 0  # disk hit, promoted into CPU
    m.end_step()
    assert m.lookup([k(1)]) == [CPU]
    c = m.counters.take()
    assert c["disk_hits"] == 1 and c["cpu_evictions"] == 2


def test_on_evict_mode_demotes_only_when_cpu_evicts():
    disk = FakeDisk()
    m = manager(cpu=1 * U, disk=10 * U, disk_write="on_evict")
    saves = plan_saves(m, [k(1)])
    ops = m.end_step()
    assert saves[0].tiers == () and ops.demotes(DISK) == []
    plan_saves(m, [k(2)])
    ops = m.end_step()
    assert ops.demotes(DISK) == [(k(1), (0,))]  # k1's slot is written to disk before k2 reuses it
    disk.apply(m, (), ops)
    assert m.lookup([k(1)]) == [DISK]


@pytest.mark.parametrize("disk_write", ["through", "on_evict"])
def test_disk_never_holds_more_than_disk_bytes_while_steps_are_carried_out(disk_write):
    evictions = 0
    # Found by the soak test: a demotion's write was queued before the delete of the unit it
    # displaced, so the directory briefly held disk_bytes + a unit + the next file being written.
    disk = FakeDisk()
    m = manager(cpu=2 * U, disk=3 * U, disk_write=disk_write, policy="lru")
    for step in range(40):
        keys = [k(step * 3 + j) for j in range(3)]  # three new units a step: CPU and disk both evict
        saves = plan_saves(m, keys)
        ops = m.end_step()
        disk.apply(m, saves, ops)
        assert m.used(DISK) <= 3 * U
        evictions += m.counters.take().get("disk_evictions", 0)
    assert disk.most == 3 and evictions > 0


def test_disk_bytes_enforced_by_deleting_victims():
    disk = FakeDisk()
    m = manager(disk=3 * U, policy="fifo")
    for i in range(1, 6):
        saves = plan_saves(m, [k(i)])
        assert saves[0].cpu_slot == -1 and saves[0].tiers == (DISK,)
        disk.apply(m, saves, m.end_step())
    assert set(disk) == {k(3), k(4), k(5)}
    assert m.used(DISK) == 3 * U


def test_units_another_engine_wrote_are_found_and_deleted_ones_miss():
    m = manager(cpu=2 * U, disk=5 * U)
    seen_on_disk(m, k(7))  # what the disk view's rescan reports
    assert m.lookup([k(7)]) == [DISK]
    assert plan_saves(m, [k(7)]) == []  # already there: not written again
    m.end_step()
    m.tiers[DISK].view.lost([k(7)])  # removed by the other engine (or found corrupt)
    assert m.lookup([k(7)]) == []
    assert [s.key for s in plan_saves(m, [k(7)])] == [k(7)]  # stale index entry dropped, saved anew


def test_restore_respects_the_tier_capacity():
    m = manager(cpu=U, disk=3 * U, policy="lru")
    assert m.restore(DISK, [k(i) for i in range(5)]) == 5
    ops = m.end_step()
    assert ops.deletes(DISK) == [k(0), k(1)]  # oldest first
    assert m.used(DISK) == 3 * U
    assert m.lookup([k(0)]) == [] and m.lookup([k(2), k(3), k(4)]) == [DISK] * 3


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware"])
def test_every_policy_runs_a_mixed_trace_within_capacity(policy):
    import random

    rng = random.Random(0)
    disk = FakeDisk()
    m = manager(cpu=4 * U, disk=8 * U, policy=policy)
    for _ in range(300):
        keys = [k(rng.randrange(20)) for _ in range(rng.randrange(1, 4))]
        tiers = m.lookup(keys)
        if tiers:
            m.plan_loads(keys[: len(tiers)], tiers, [1.0] * len(tiers))
        rest = keys[len(tiers) :]
        planned = m.plan_saves(rest, [rng.random() * 10 for _ in rest])
        disk.apply(m, planned, m.end_step())
        assert m.cpu_used_slots <= 4 and m.used(DISK) <= 8 * U and len(disk) <= 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit_bytes"):
        TierManager(unit_bytes=0, cpu_bytes=10)
    with pytest.raises(ValueError, match="eviction_policy"):
        manager(cpu=10 * U, policy="random")


def test_lookup_batches_the_remote_store_after_the_local_run():
    remote = FakeRemote({k(2), k(3)})
    m = manager(cpu=4 * U, remote=remote)
    plan_saves(m, [k(1)])
    m.end_step()
    assert m.lookup([k(1), k(2), k(3), k(4), k(2)]) == [CPU, "remote", "remote"]
    assert remote.asked == [[k(2), k(3), k(4), k(2)]]  # one batch for everything the CPU tier lacks
    (l2,) = m.plan_loads([k(2)], ["remote"], [1.0])
    assert l2.tier == "remote" and l2.slot >= 0  # promoted into CPU
    assert m.counters.take()["remote_hits"] == 1


def test_namespace_quota_evicts_only_its_own_units():
    m = manager(cpu=6 * U, quotas={"greedy": Quota({CPU: 2 * U})})
    plan_saves(m, [k(1), k(2)], ns="quiet")
    m.end_step()
    for i in range(10, 16):  # the greedy tenant writes 6 units into its 2-unit quota
        plan_saves(m, [k(i)], ns="greedy")
        m.end_step()
    assert m.lookup([k(1), k(2)]) == [CPU, CPU]  # the other tenant kept everything
    assert m.used_by("greedy")[CPU] == 2 * U and m.used_by("quiet")[CPU] == 2 * U
    assert m.lookup([k(15)]) == [CPU] and m.lookup([k(10)]) == []


def test_namespace_ttl_stops_serving_old_units_and_they_are_saved_afresh():
    now = [0.0]
    disk = FakeDisk()
    m = manager(cpu=4 * U, disk=8 * U, quotas={"short": Quota(ttl_s=10)}, clock=lambda: now[0])
    disk.apply(m, plan_saves(m, [k(1)], ns="short"), m.end_step())
    disk.apply(m, plan_saves(m, [k(2)], ns="long"), m.end_step())
    now[0] = 5
    assert m.lookup([k(1)]) == [CPU] and m.lookup([k(2)]) == [CPU]
    now[0] = 11
    assert m.lookup([k(1)]) == []  # past the tenant's TTL: a miss in every tier
    assert m.lookup([k(2)]) == [CPU]  # other tenants unaffected
    (again,) = plan_saves(m, [k(1)], ns="short")  # recomputed KV replaces it
    ops = m.end_step()
    assert k(1) in ops.deletes(DISK) and again.cpu_slot >= 0
    disk.apply(m, [again], None)
    assert m.lookup([k(1)]) == [CPU]


def test_a_unit_we_deleted_is_not_found_while_its_file_lingers():
    """The worker deletes asynchronously: the file may outlive the plan that deleted it."""
    disk = FakeDisk()
    m = manager(disk=2 * U, policy="fifo")
    for i in (1, 2, 3):
        disk.apply(m, plan_saves(m, [k(i)]), None)  # deletes NOT applied: files linger
        m.end_step()
    assert k(1) in disk  # still on disk ...
    assert m.lookup([k(1)]) == []  # ... but we evicted it: never plan a load of it


def test_admitting_one_loaded_unit_never_evicts_another_of_the_same_request():
    m = manager(disk=2 * U, policy="fifo")
    m.restore(DISK, [k(1), k(2)])  # the index is full with k1, k2
    seen_on_disk(m, k(0))  # and another engine's k0 is on disk too
    m.end_step()
    tiers = m.lookup([k(0), k(1), k(2)])
    assert tiers == [DISK] * 3
    m.plan_loads([k(0), k(1), k(2)], tiers, [1.0] * 3)
    assert m.end_step().deletes(DISK) == []  # indexing k0 must not delete k1 or k2 being loaded


def test_disk_accounting_uses_the_size_a_unit_has_on_disk():
    disk = FakeDisk()
    m = manager(disk=3 * U, overhead=50, policy="fifo")
    for i in range(5):
        disk.apply(m, plan_saves(m, [k(i)]), m.end_step())
    assert m.used(DISK) == 2 * (U + 50) <= 3 * U  # a third unit would not fit with its header


def test_a_codec_payload_size_charges_blocks_and_chunks_at_their_encoded_bytes():
    """payload_size (a KV codec halving payloads) plus a 10-byte header: nearly twice the units fit
    the cap, which holds; a chunk is charged by its own encoded size."""
    disk = FakeDisk()
    m = manager(disk=3 * U, overhead=10, payload_size=lambda n: n // 2, policy="fifo")
    for i in range(8):
        disk.apply(m, plan_saves(m, [k(i)]), m.end_step())
    assert m.used(DISK) == 5 * (U // 2 + 10) <= 3 * U and len(disk) == 5
    (c,) = m.plan_saves([k(20)], [1.0], nbytes=[3 * U])
    assert DISK in c.tiers and 3 * U // 2 + 10 <= m.used(DISK) <= 3 * U


# ---- chunk units: variable sizes in the same tiers -------------------------------------------
def test_a_chunk_takes_as_many_rows_as_its_bytes_need_and_shares_the_budget_with_blocks():
    m = manager(cpu=4 * U, policy="lru")
    (block,) = plan_saves(m, [k(1)])
    (chunk,) = m.plan_saves([k(2)], [1.0], nbytes=[2 * U + 1])  # 3 rows
    assert len(block.slots) == 1 and len(chunk.slots) == 3 and not set(block.slots) & set(chunk.slots)
    m.end_step()
    assert m.cpu_used_slots == 4
    (other,) = m.plan_saves([k(3)], [1.0], nbytes=[2 * U])  # 2 rows: the LRU (the block) and the chunk go
    assert len(other.slots) == 2 and m.counters.take()["cpu_evictions"] == 2
    m.end_step()
    assert m.lookup_each([k(1), k(2), k(3)]) == [None, None, CPU]


def test_lookup_each_finds_every_cached_key_not_only_the_leading_run():
    remote = FakeRemote({k(9)})
    m = manager(cpu=2 * U, disk=10 * U, remote=remote, policy="lru")
    seen_on_disk(m, k(5))
    plan_saves(m, [k(2)])
    m.end_step()
    remote.asked.clear()
    assert m.lookup_each([k(1), k(2), k(5), k(9)]) == [None, CPU, DISK, "remote"]
    assert remote.asked == [[k(1), k(9)]]  # one batch for what no local tier holds


def test_an_evicted_chunk_is_demoted_with_all_its_rows_and_its_own_disk_size():
    m = manager(cpu=3 * U, disk=20 * U, overhead=10, disk_write="on_evict", policy="fifo")
    (c,) = m.plan_saves([k(1)], [1.0], nbytes=[3 * U])
    m.end_step()
    plan_saves(m, [k(2)])
    ops = m.end_step()
    assert ops.demotes(DISK) == [(k(1), c.slots)]
    assert m.used(DISK) == 3 * U + 10  # the chunk's payload plus the per-unit overhead


def test_a_chunk_larger_than_the_cpu_tier_goes_to_disk_only():
    m = manager(cpu=2 * U, disk=10 * U, policy="lru")
    plan_saves(m, [k(1)])
    (c,) = m.plan_saves([k(2)], [1.0], nbytes=[5 * U])
    assert c.slots == () and c.tiers == (DISK,) and m.lookup([k(1)]) == [CPU]  # nothing evicted for it


def test_cpu_bytes_and_cpu_quotas_count_all_tensor_parallel_ranks_as_disk_bytes_does():
    """cpu_bytes of 4 units x 2 ranks: 4 rows on each rank; a tenant's CPU quota of 2 units x 2 ranks
    holds 2 of its units (the third evicts its own oldest); disk_bytes caps both ranks' files."""
    m = manager(cpu=4 * U * 2, disk=3 * U * 2, tp_size=2, policy="fifo",
                quotas={"t": Quota({CPU: 2 * U * 2}, None)})
    assert m.num_slots == 4
    for i in range(3):
        plan_saves(m, [k(i)], ns="t")
        m.end_step()
    assert m.lookup([k(0)]) != [CPU] and m.lookup([k(1), k(2)]) == [CPU, CPU]
    for i in range(10, 14):
        plan_saves(m, [k(i)])
        m.end_step()
    assert m.used(DISK) <= 3 * U * 2
