"""TierManager over in-memory 'disk' (a dict standing in for the files), no vLLM, no tensors."""
import pytest

from kvplug.tiers.manager import CPU, DISK, Quota, TierManager

U = 100  # unit bytes


def plan_saves(m, keys, ns=""):
    return m.plan_saves(keys, [1.0] * len(keys), ns)


def plan_loads(m, keys, ns=""):
    tiers = m.lookup(keys)
    assert len(tiers) == len(keys), "plan loads only for keys lookup() found"
    return m.plan_loads(keys, tiers, [1.0] * len(keys), ns)


def k(i: int) -> bytes:
    return i.to_bytes(32, "little")


class FakeDisk(dict):
    most = 0  # the most units ever held at once

    def probe(self, key):
        return self.get(key)

    def apply(self, mgr: TierManager, planned=(), ops=None):
        """Do what the worker does with a step's plans, in its order: the disk ops before the
        forward pass (as planned), the saves after it."""
        for key, rows in ops.disk_ops if ops else ():
            if not rows:
                self.pop(key, None)
            else:
                self._write(key)
        for s in planned:
            if s.to_disk:
                self._write(s.key)

    def _write(self, key):
        self[key] = U
        self.most = max(self.most, len(self))


def test_cpu_only_save_lookup_load_and_lru_eviction():
    m = TierManager(unit_bytes=U, cpu_bytes=3 * U, policy="lru")
    saves = plan_saves(m, [k(1), k(2), k(3)])
    assert [s.cpu_slot for s in saves] == [0, 1, 2] and not any(s.to_disk for s in saves)
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
    m = TierManager(unit_bytes=U, cpu_bytes=4 * U)
    plan_saves(m, [k(1), k(3)])
    m.end_step()
    before = m.counters.take()
    assert m.lookup([k(1), k(2), k(3)]) == [CPU]
    assert m.counters.take() == {k_: 0 for k_ in before}


def test_pinned_keys_are_never_evicted_in_their_step():
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U)
    plan_saves(m, [k(1), k(2)])
    m.end_step()
    plan_loads(m, [k(1), k(2)])  # both pinned this step
    assert plan_saves(m, [k(3)]) == []  # no slot can be freed: save dropped, not an error
    m.end_step()
    assert [s.key for s in plan_saves(m, [k(3)])] == [k(3)]


def test_write_through_then_cpu_eviction_leaves_disk_copy_and_disk_hit_promotes():
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U, disk_bytes=10 * U, disk_probe=disk.probe)
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
    m = TierManager(unit_bytes=U, cpu_bytes=1 * U, disk_bytes=10 * U, disk_write="on_evict", disk_probe=disk.probe)
    saves = plan_saves(m, [k(1)])
    ops = m.end_step()
    assert not saves[0].to_disk and ops.demotes == []
    plan_saves(m, [k(2)])
    ops = m.end_step()
    assert ops.demotes == [(k(1), (0,))]  # k1's slot is written to disk before k2 reuses it
    disk.apply(m, (), ops)
    assert m.lookup([k(1)]) == [DISK]


@pytest.mark.parametrize("disk_write", ["through", "on_evict"])
def test_disk_never_holds_more_than_disk_bytes_while_steps_are_carried_out(disk_write):
    # Found by the soak test: a demotion's write was queued before the delete of the unit it
    # displaced, so the directory briefly held disk_bytes + a unit + the next file being written.
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U, disk_bytes=3 * U, disk_write=disk_write,
                    disk_probe=disk.probe, policy="lru")
    for step in range(40):
        keys = [k(step * 3 + j) for j in range(3)]  # three new units a step: CPU and disk both evict
        saves = plan_saves(m, keys)
        ops = m.end_step()
        disk.apply(m, saves, ops)
        assert m.disk_used <= 3 * U
    assert disk.most == 3 and m.counters.disk_evictions > 0


def test_disk_bytes_enforced_by_deleting_victims():
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=0, disk_bytes=3 * U, disk_probe=disk.probe, policy="fifo")
    for i in range(1, 6):
        saves = plan_saves(m, [k(i)])
        assert saves[0].cpu_slot == -1 and saves[0].to_disk
        disk.apply(m, saves, m.end_step())
    assert set(disk) == {k(3), k(4), k(5)}
    assert m.disk_used == 3 * U


def test_files_written_by_another_engine_are_found_and_deleted_files_miss():
    disk = FakeDisk({k(7): U})
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U, disk_bytes=5 * U, disk_probe=disk.probe)
    assert m.lookup([k(7)]) == [DISK]
    assert plan_saves(m, [k(7)]) == []  # already there: not written again
    m.end_step()
    del disk[k(7)]  # removed by the other engine (or found corrupt)
    assert m.lookup([k(7)]) == []
    assert [s.key for s in plan_saves(m, [k(7)])] == [k(7)]  # stale index entry dropped, saved anew


def test_restore_disk_index_respects_disk_bytes():
    disk = FakeDisk({k(i): U for i in range(5)})
    m = TierManager(unit_bytes=U, cpu_bytes=U, disk_bytes=3 * U, disk_probe=disk.probe, policy="lru")
    assert m.restore_disk_index([k(i) for i in range(5)]) == 5
    ops = m.end_step()
    assert ops.disk_deletes == [k(0), k(1)]  # oldest first
    assert m.disk_used == 3 * U


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "arc", "s3fifo", "cost_aware"])
def test_every_policy_runs_a_mixed_trace_within_capacity(policy):
    import random

    rng = random.Random(0)
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=4 * U, disk_bytes=8 * U, policy=policy, disk_probe=disk.probe)
    for _ in range(300):
        keys = [k(rng.randrange(20)) for _ in range(rng.randrange(1, 4))]
        tiers = m.lookup(keys)
        if tiers:
            m.plan_loads(keys[: len(tiers)], tiers, [1.0] * len(tiers))
        rest = keys[len(tiers) :]
        planned = m.plan_saves(rest, [rng.random() * 10 for _ in rest])
        disk.apply(m, planned, m.end_step())
        assert m.cpu_used_slots <= 4 and m.disk_used <= 8 * U and len(disk) <= 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="unit_bytes"):
        TierManager(unit_bytes=0, cpu_bytes=10)
    with pytest.raises(ValueError, match="eviction_policy"):
        TierManager(unit_bytes=U, cpu_bytes=10 * U, policy="random")


def test_lookup_batches_the_remote_store_after_the_local_run():
    asked = []

    def remote(keys):
        asked.append(list(keys))
        return [key in (k(2), k(3)) for key in keys]

    m = TierManager(unit_bytes=U, cpu_bytes=4 * U, remote_probe=remote)
    plan_saves(m, [k(1)])
    m.end_step()
    assert m.lookup([k(1), k(2), k(3), k(4), k(2)]) == [CPU, "remote", "remote"]
    assert asked == [[k(2), k(3), k(4), k(2)]]  # one batch for everything after the local run
    (l2,) = m.plan_loads([k(2)], ["remote"], [1.0])
    assert l2.tier == "remote" and l2.slot >= 0  # promoted into CPU
    assert m.counters.take()["remote_hits"] == 1


def test_namespace_quota_evicts_only_its_own_units():
    m = TierManager(unit_bytes=U, cpu_bytes=6 * U, quotas={"greedy": Quota(cpu_bytes=2 * U)})
    plan_saves(m, [k(1), k(2)], ns="quiet")
    m.end_step()
    for i in range(10, 16):  # the greedy tenant writes 6 units into its 2-unit quota
        plan_saves(m, [k(i)], ns="greedy")
        m.end_step()
    assert m.lookup([k(1), k(2)]) == [CPU, CPU]  # the other tenant kept everything
    assert m.used_by("greedy")[0] == 2 * U and m.used_by("quiet")[0] == 2 * U
    assert m.lookup([k(15)]) == [CPU] and m.lookup([k(10)]) == []


def test_namespace_ttl_stops_serving_old_units_and_they_are_saved_afresh():
    now = [0.0]
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=4 * U, disk_bytes=8 * U, disk_probe=disk.probe,
                    quotas={"short": Quota(ttl_s=10)}, clock=lambda: now[0])
    disk.apply(m, plan_saves(m, [k(1)], ns="short"), m.end_step())
    disk.apply(m, plan_saves(m, [k(2)], ns="long"), m.end_step())
    now[0] = 5
    assert m.lookup([k(1)]) == [CPU] and m.lookup([k(2)]) == [CPU]
    now[0] = 11
    assert m.lookup([k(1)]) == []  # past the tenant's TTL: a miss in every tier
    assert m.lookup([k(2)]) == [CPU]  # other tenants unaffected
    (again,) = plan_saves(m, [k(1)], ns="short")  # recomputed KV replaces it
    ops = m.end_step()
    assert k(1) in ops.disk_deletes and again.cpu_slot >= 0
    disk.apply(m, [again], None)
    assert m.lookup([k(1)]) == [CPU]


def test_a_unit_we_deleted_is_not_found_while_its_file_lingers():
    """The worker deletes asynchronously: the file may outlive the plan that deleted it."""
    now = [0.0]
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=0, disk_bytes=2 * U, disk_probe=disk.probe, policy="fifo",
                    clock=lambda: now[0])
    for i in (1, 2, 3):
        disk.apply(m, plan_saves(m, [k(i)]), None)  # deletes NOT applied: files linger
        m.end_step()
    assert k(1) in disk  # still on disk ...
    assert m.lookup([k(1)]) == []  # ... but we evicted it: never plan a load of it
    now[0] = 100.0  # long after: a file seen now was written again (e.g. by another engine)
    assert m.lookup([k(1)]) == [DISK]


def test_admitting_one_loaded_unit_never_evicts_another_of_the_same_request():
    disk = FakeDisk({k(i): U for i in range(3)})
    m = TierManager(unit_bytes=U, cpu_bytes=0, disk_bytes=2 * U, disk_probe=disk.probe, policy="fifo")
    m.restore_disk_index([k(1), k(2)])  # the index is full with k1, k2; k0 is on disk too
    m.end_step()
    tiers = m.lookup([k(0), k(1), k(2)])
    assert tiers == [DISK] * 3
    m.plan_loads([k(0), k(1), k(2)], tiers, [1.0] * 3)
    assert m.end_step().disk_deletes == []  # indexing k0 must not delete k1 or k2 being loaded


def test_disk_accounting_uses_the_size_a_unit_has_on_disk():
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=0, disk_unit_bytes=U + 50, disk_bytes=3 * U, disk_probe=disk.probe,
                    policy="fifo")
    for i in range(5):
        disk.apply(m, plan_saves(m, [k(i)]), m.end_step())
    assert m.disk_used == 2 * (U + 50) <= 3 * U  # a third unit would not fit with its header


def test_a_codec_disk_size_charges_blocks_and_chunks_at_their_encoded_bytes():
    """disk_size (a KV codec halving payloads, plus a 10-byte header): twice the units fit the cap,
    which holds; a chunk is charged by its own encoded size."""
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=0, disk_size=lambda n: n // 2 + 10, disk_bytes=3 * U, disk_probe=disk.probe,
                    policy="fifo")
    for i in range(8):
        disk.apply(m, plan_saves(m, [k(i)]), m.end_step())
    assert m.disk_used == 5 * (U // 2 + 10) <= 3 * U and len(disk) == 5
    (c,) = m.plan_saves([k(20)], [1.0], nbytes=[3 * U])
    assert c.to_disk and m.disk_used <= 3 * U and m.used_by("")[1] == m.disk_used
    assert 3 * U // 2 + 10 <= m.disk_used


# ---- chunk units: variable sizes in the same tiers -------------------------------------------
def test_a_chunk_takes_as_many_rows_as_its_bytes_need_and_shares_the_budget_with_blocks():
    m = TierManager(unit_bytes=U, cpu_bytes=4 * U, policy="lru")
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
    disk = FakeDisk({k(5): 3 * U})
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U, disk_bytes=10 * U, disk_probe=disk.probe, policy="lru")
    plan_saves(m, [k(2)])
    m.end_step()
    asked = []
    m._remote_probe = lambda keys: asked.append(list(keys)) or [key == k(9) for key in keys]
    assert m.lookup_each([k(1), k(2), k(5), k(9)]) == [None, CPU, DISK, "remote"]
    assert asked == [[k(1), k(9)]]  # one batch for what no local tier holds


def test_an_evicted_chunk_is_demoted_with_all_its_rows_and_its_own_disk_size():
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=3 * U, disk_unit_bytes=U + 10, disk_bytes=20 * U,
                    disk_probe=disk.probe, disk_write="on_evict", policy="fifo")
    (c,) = m.plan_saves([k(1)], [1.0], nbytes=[3 * U])
    m.end_step()
    plan_saves(m, [k(2)])
    ops = m.end_step()
    assert ops.demotes == [(k(1), c.slots)]
    assert m.disk_used == 3 * U + 10  # the chunk's payload plus the per-unit overhead


def test_a_chunk_larger_than_the_cpu_tier_goes_to_disk_only():
    disk = FakeDisk()
    m = TierManager(unit_bytes=U, cpu_bytes=2 * U, disk_bytes=10 * U, disk_probe=disk.probe, policy="lru")
    plan_saves(m, [k(1)])
    (c,) = m.plan_saves([k(2)], [1.0], nbytes=[5 * U])
    assert c.slots == () and c.to_disk and m.lookup([k(1)]) == [CPU]  # nothing evicted for it
