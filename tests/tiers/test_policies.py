"""Eviction policies: hand-worked traces per policy, pinning, ghost lists, ARC's p, S3-FIFO's
probation queue, GDSF aging, make_policy errors, and a hypothesis property test.

Trace language (one op per token): "a" inserts key a with size 1 and cost 1, "a:2" size 2,
"a:2:10" size 2 cost 10, "*a" touches a, "-a" deletes a (remove(evicted=False)). The traces
run through kvplug.tiers.index.TierIndex, the accounting the tier manager uses, so they check
the one order of calls the manager makes (insert first, then victims while over capacity).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplug.tiers.index import TierIndex
from kvplug.tiers.policies import POLICIES, EvictionPolicy, make_policy

ALL = sorted(POLICIES)


class Sim:
    """A TierIndex of `capacity` bytes under one policy; records evicted keys in order."""

    def __init__(self, name: str, capacity: int):
        self.index = TierIndex(capacity, 1, name)
        self.policy = self.index._policy
        self.evicted: list[bytes] = []

    def insert(self, key: bytes, nbytes: int = 1, cost: float = 1.0) -> bool:
        admitted, evicted = self.index.admit(key, "", cost, (), nbytes)
        self.evicted += [k for k, _ in evicted]
        return admitted

    def run(self, trace: str) -> str:
        for tok in trace.split():
            if tok[0] == "*":
                self.index.touch(tok[1:].encode())
            elif tok[0] == "-":
                self.index.remove(tok[1:].encode())
            else:
                key, *rest = tok.split(":")
                nbytes = int(rest[0]) if rest else 1
                cost = float(rest[1]) if len(rest) > 1 else 1.0
                self.insert(key.encode(), nbytes, cost)
        return " ".join(k.decode() for k in self.evicted)


def evictions(name: str, capacity: int, trace: str) -> str:
    return Sim(name, capacity).run(trace)


# --- hand-worked traces ---------------------------------------------------------------------
TRACES = [
    # LRU, cap 3: a b c full; *a -> order b c a; d evicts b -> c a d; e evicts c.
    ("lru", 3, "a b c *a d e", "b c"),
    # LRU, cap 4: a:2 b c full; *a -> b c a; d:2 (6 bytes) evicts b then c -> a d;
    # *d -> a d; e:3 (7 bytes) evicts a then d.
    ("lru", 4, "a:2 b c *a d:2 *d e:3", "b c a d"),
    # LRU, cap 3: a b c; -b deletes (not an eviction) -> a c; d fits; e evicts a.
    ("lru", 3, "a b c -b d e", "a"),
    # FIFO, cap 3: touches ignored; d evicts a (oldest) despite *a; e evicts b despite *b.
    ("fifo", 3, "a b c *a d *b e", "a b"),
    # FIFO, cap 5: a:3 b c full; d:2 (7) evicts a; e fits (5); f:2 (7) evicts b then c.
    ("fifo", 5, "a:3 b c *a d:2 e f:2", "a b c"),
    # LFU, cap 3: counts a=3 b=2 c=1; d evicts c; now a3 b2 d1, e evicts d (count 1).
    ("lfu", 3, "a b c *a *a *b d e", "c d"),
    # LFU, cap 3: all counts 2, last use a<b<c; d evicts a (LRU tie-break); e evicts d (count 1).
    ("lfu", 3, "a b c *a *b *c d e", "a d"),
    # LFU, cap 4: a:2 count 1, b c count 2; d:2 evicts a; *d *d -> d=3; e: b and c tie at 2,
    # b used earlier -> b.
    ("lfu", 4, "a:2 b c *b *c d:2 *d *d e", "a b"),
    # GDSF, cap 4: H a=2/2=1 b=4/1=4 c=1/1=1; d:1:3 -> a and c tie at 1, a older -> evict a,
    # L=1, d rescored 1+3=4; *c -> H c=1+2*1=3; e:2:10 (H 1+5=6) -> min of b4 c3 d4 is c.
    ("cost_aware", 4, "a:2:2 b:1:4 c:1:1 d:1:3 *c e:2:10", "a c"),
    # GDSF, cap 3: s H=2, big H=2/2=1, n:1:100 -> evict big (cheap per byte) though s is older.
    ("cost_aware", 3, "s:1:2 big:2:2 n:1:100", "big"),
    # ARC, cap 2: T1=[a b]; *a -> T1=[b] T2=[a]; c -> T1 (excluding c) = 1 > p=0: evict b -> B1.
    # b (B1 hit) -> p=0+1*max(1,0/1)=1, T2=[a b]; T1=[c] is 1, not > 1 -> evict T2's LRU a -> B2.
    # a (B2 hit) -> p=max(0,1-1)=0, T2=[b a]; T1=[c] 1 > 0 -> evict c.
    ("arc", 2, "a b *a c b a", "b a c"),
    # ARC, cap 4: T2=[a b]; x:2 -> T1=[x]; y -> evict x (T1 2 > 0) -> B1=[x]. x:2 (B1 hit):
    # p=0+2*max(1,0/2)=2, T2=[a b x]; T1=[y]=1 not > 2 -> evict a -> B2=[a]. a (B2 hit):
    # p=max(0,2-1*max(1,0/1))=1, T2=[b x a]; T1=[y]=1 == p and a came from B2 -> evict y.
    ("arc", 4, "a b *a *b x:2 y x:2 a", "x a y"),
    # S3-FIFO, cap 4 (S target 0.4): e -> S has 4 >= 0.4: a (freq 1) -> M, b (freq 0) evicted
    # -> G=[b]; f -> c evicted -> G=[b c]; b (in G) -> M=[a b]; S=[d e f] -> d evicted.
    ("s3fifo", 4, "a b c d *a e f b", "b c d"),
    # S3-FIFO, cap 10 (S target 1): d -> S a(1)->M, b(1)->M, c(0) evicted; *a; e fits;
    # f:2 -> S=[d e] 2 >= 1: d evicted, S=[e] 1 >= 1: e evicted; *f; g -> S=[f] 2 >= 1:
    # f(1)->M, S holds only the incoming g -> scan M=[a(1) b(0) f(0)]: a -> freq 0, to head;
    # b (freq 0) evicted.
    ("s3fifo", 10, "a:4 b:4 *a *b c:2 d:1 *a e:1 f:2 *f g:1", "c d e b"),
]


@pytest.mark.parametrize(
    "name,capacity,trace,expected", TRACES, ids=[f"{t[0]}-{i}" for i, t in enumerate(TRACES)]
)
def test_hand_worked_trace(name, capacity, trace, expected):
    assert evictions(name, capacity, trace) == expected


def test_every_policy_has_two_traces():
    counts = {name: sum(t[0] == name for t in TRACES) for name in ALL}
    assert all(n >= 2 for n in counts.values()), counts


# --- pinning (can_evict) --------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_can_evict_skips_pinned_and_all_pinned_gives_none(name):
    # a b c, unit sizes, no touches, roomy tier: every policy's first choice is a, then b
    # (LRU/FIFO/LFU/ARC-T1/S3-FIFO-S order by age; GDSF: all H=1, oldest first).
    p = make_policy(name, 100)
    for k in (b"a", b"b", b"c"):
        p.insert(k, 1, 1.0)
    assert p.victim(lambda k: True) == b"a"
    assert p.victim(lambda k: k != b"a") == b"b"
    assert p.victim(lambda k: k == b"c") == b"c"
    assert p.victim(lambda k: False) is None
    assert p.victim(lambda k: True) == b"a"  # pinning a reordered nothing
    assert len(p) == 3 and all(k in p for k in (b"a", b"b", b"c"))


@pytest.mark.parametrize("name", ALL)
def test_incoming_entry_is_the_last_resort(name):
    # Insert-first order, cap 2: a is pinned, b:2 arrives (3 bytes > 2). Nothing but the
    # newcomer can go, so it is named; with a unpinned, a goes instead.
    p = make_policy(name, 2)
    p.insert(b"a", 1, 1.0)
    p.insert(b"b", 2, 1.0)
    assert p.victim(lambda k: k != b"a") == b"b"
    assert p.victim(lambda k: True) == b"a"


@pytest.mark.parametrize("name", ALL)
def test_index_admits_nothing_that_cannot_fit_and_evicts_nothing_for_it(name):
    # Through TierIndex: a unit larger than the tier, or one that only fits by evicting pinned
    # units, is refused; in the first case nothing is evicted, in the second only what can go.
    sim = Sim(name, 3)
    assert sim.insert(b"a") and sim.insert(b"b")
    assert not sim.insert(b"big", 4) and sim.evicted == [] and b"big" not in sim.index
    admitted, evicted = sim.index.admit(b"c", "", 1.0, {b"a", b"b"}, 2)
    assert not admitted and evicted == [] and b"c" not in sim.index and sim.index.used == 2
    assert sim.insert(b"c", 2) and sim.index.used <= 3


# --- ghost lists ------------------------------------------------------------------------------
def test_arc_deletion_does_not_feed_ghosts():
    p = make_policy("arc", 4)
    for k in (b"a", b"b"):
        p.insert(k, 1, 1.0)
    p.remove(b"a", evicted=False)
    assert p.ghost_keys() == ([], [])
    p.insert(b"a", 1, 1.0)  # a plain miss: back to T1, p untouched
    assert p.resident_lists() == ([b"b", b"a"], []) and p.p == 0
    p.remove(b"a", evicted=True)
    assert p.ghost_keys() == ([b"a"], [])


def test_arc_p_grows_on_b1_hit_and_shrinks_on_b2_hit():
    sim = Sim("arc", 2)
    sim.run("a b *a c")  # evicts b from T1 -> B1=[b]
    assert sim.policy.ghost_keys() == ([b"b"], []) and sim.policy.p == 0
    sim.run("b")  # B1 hit: p = 0 + 1 * max(1, 0/1) = 1; evicts a from T2 -> B2=[a]
    assert sim.policy.p == 1 and sim.policy.ghost_keys() == ([], [b"a"])
    sim.run("a")  # B2 hit: p = max(0, 1 - 1 * max(1, 0/1)) = 0
    assert sim.policy.p == 0
    assert sim.policy.resident_lists() == ([], [b"b", b"a"])


def test_arc_ghost_hit_is_weighted_by_size():
    # cap 8: T2=[a b]; x:3 y:3 fill T1 (8 bytes); z: T1 excl z = 6 > p=0 evicts x -> B1=[x(3)]
    # (T1 + B1 = 4 + 3 <= 8, so x's ghost stays). x:3 again: p = 0 + 3 * max(1, 0/3) = 3 bytes,
    # not 1; then T1 = [y z] = 4 > 3 evicts y.
    sim = Sim("arc", 8)
    sim.run("a *a b *b x:3 y:3 z")
    assert sim.evicted == [b"x"] and sim.policy.ghost_keys() == ([b"x"], [])
    sim.run("x:3")
    assert sim.policy.p == 3 and sim.evicted == [b"x", b"y"]


def test_arc_ghost_bounds_hold():
    # cap 3, a stream of 8 one-hit keys: T1 + B1 <= 3 bytes, so B1 keeps the latest evictions
    # only: after h, T1=[f g h] and B1 must be empty (3 + |B1| <= 3).
    sim = Sim("arc", 3)
    sim.run("a b c d e f g h")
    assert sim.policy.resident_lists() == ([b"f", b"g", b"h"], [])
    assert sim.policy.ghost_keys() == ([], [])


def test_s3fifo_deletion_does_not_feed_ghost():
    p = make_policy("s3fifo", 10)
    p.insert(b"a", 1, 1.0)
    p.remove(b"a", evicted=False)
    p.insert(b"a", 1, 1.0)  # not a ghost hit: back to S, not M
    assert p.queues() == ([b"a"], [], [])
    p.remove(b"a", evicted=True)
    assert p.queues() == ([], [], [b"a"])
    p.insert(b"a", 1, 1.0)  # ghost hit: straight to M
    assert p.queues() == ([], [b"a"], [])


def test_s3fifo_one_hit_wonder_leaves_before_touched_entry():
    # cap 4: a is touched once; e, f arrive. a is the oldest, yet b and c (never hit) go
    # first and a sits in M. FIFO on the same trace evicts a first.
    sim = Sim("s3fifo", 4)
    assert sim.run("a b c d *a e f") == "b c"
    assert sim.policy.queues() == ([b"d", b"e", b"f"], [b"a"], [b"b", b"c"])
    assert evictions("fifo", 4, "a b c d *a e f") == "a b"


def test_s3fifo_ghost_is_bounded_by_main_share():
    # cap 10: ghost limit 9 bytes. Ten one-hit unit keys past a full S... G keeps the 9 newest.
    sim = Sim("s3fifo", 10)
    sim.run(" ".join(f"k{i}" for i in range(20)))  # evicts k0..k9
    ghost = sim.policy.queues()[2]
    assert ghost == [f"k{i}".encode() for i in range(1, 10)]


# --- cost_aware -------------------------------------------------------------------------------
def test_cost_aware_cheap_large_goes_before_expensive_small():
    # cap 4: dear:1:5 (H=5), cheap:3:3 (H=3/3=1); n:1:1 (H=1) arrives -> evict cheap, though
    # dear is the older entry (LRU and FIFO would evict dear).
    assert evictions("cost_aware", 4, "dear:1:5 cheap:3:3 n:1:1") == "cheap"


def test_cost_aware_aging_evicts_once_hot_entry():
    # cap 2: hot:1:10 touched twice -> H = 3*10/1 = 30. Then cheap unit keys c1, c2, ...
    # c1 H=1 fits; each later ci evicts c(i-1), whose H is i-1, setting L=i-1 and H(ci)=i.
    # When c31 arrives, c30 (H 30) and hot (H 30) tie; hot's H was set first -> hot goes.
    sim = Sim("cost_aware", 2)
    sim.run("hot:1:10 *hot *hot " + " ".join(f"c{i}" for i in range(1, 32)))
    expected = [f"c{i}".encode() for i in range(1, 30)] + [b"hot"]
    assert sim.evicted == expected
    assert sim.policy.inflation == 30


def test_cost_aware_touch_uses_current_inflation():
    p = make_policy("cost_aware", 10)
    p.insert(b"a", 2, 4.0)  # H = 0 + 1*4/2 = 2
    p.insert(b"b", 1, 5.0)  # H = 5
    p.remove(b"a", evicted=True)  # L = 2
    p.touch(b"b")  # H = 2 + 2*5/1 = 12
    assert p.inflation == 2 and p.priority(b"b") == 12


# --- errors -----------------------------------------------------------------------------------
def test_make_policy_rejects_unknown_name():
    with pytest.raises(ValueError) as err:
        make_policy("x", 10)
    assert str(err.value) == "eviction_policy='x': allowed values are arc, cost_aware, fifo, lfu, lru, s3fifo"


@pytest.mark.parametrize("name", ALL)
def test_bad_arguments_are_rejected(name):
    with pytest.raises(ValueError, match="capacity_bytes=-1"):
        make_policy(name, -1)
    p = make_policy(name, 10)
    assert isinstance(p, EvictionPolicy) and isinstance(p, POLICIES[name])
    p.insert(b"a", 1, 0.0)
    with pytest.raises(ValueError, match="already present"):
        p.insert(b"a", 1, 1.0)
    with pytest.raises(ValueError, match="nbytes=0"):
        p.insert(b"b", 0, 1.0)
    with pytest.raises(ValueError, match="cost=nan"):
        p.insert(b"b", 1, float("nan"))
    with pytest.raises(KeyError):
        p.touch(b"zz")
    with pytest.raises(KeyError):
        p.remove(b"zz", evicted=True)
    assert len(p) == 1 and b"b" not in p
    with pytest.raises(ValueError, match="capacity_bytes=True"):
        make_policy(name, True)


@pytest.mark.parametrize("name", ALL)
def test_numpy_sizes_and_costs_are_accepted(name):
    p = make_policy(name, np.int64(10))
    p.insert(b"a", np.int64(3), np.float32(2.5))
    assert p.resident_bytes == 3 and type(p.resident_bytes) is int


# --- property test ----------------------------------------------------------------------------
OPS = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert", "touch", "delete", "victim", "evict"]),
        st.integers(0, 7),  # key index
        st.integers(1, 4),  # size
        st.integers(0, 10),  # cost
        st.integers(0, 255),  # pinned-key bitmask
    ),
    max_size=60,
)


def _check_victim(policy, resident, pins):
    def can_evict(k):
        return k not in pins

    v = policy.victim(can_evict)
    if v is None:
        assert all(k in pins for k in resident), "None although an evictable key exists"
    else:
        assert v in resident and v not in pins
    return v, can_evict


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=150, deadline=None)
@given(capacity=st.integers(0, 12), ops=OPS)
def test_random_ops_keep_policy_consistent(name, capacity, ops):
    policy = make_policy(name, capacity)
    resident: dict[bytes, int] = {}
    for op, ki, size, cost, mask in ops:
        key = bytes([ki])
        pins = {bytes([i]) for i in range(8) if mask >> i & 1}
        if op == "insert" and key not in resident:
            policy.insert(key, size, float(cost))
            resident[key] = size
            while sum(resident.values()) > capacity:
                v, _ = _check_victim(policy, resident, pins)
                if v is None:
                    break
                policy.remove(v, evicted=True)
                del resident[v]
        elif op in ("insert", "touch") and key in resident:
            policy.touch(key)
        elif op == "delete" and key in resident:
            policy.remove(key, evicted=False)
            del resident[key]
        elif op in ("victim", "evict"):
            v, _ = _check_victim(policy, resident, pins)
            if op == "evict" and v is not None:
                policy.remove(v, evicted=True)
                del resident[v]
        assert len(policy) == len(resident)
        assert all((bytes([i]) in policy) == (bytes([i]) in resident) for i in range(8))
        _check_internal(name, policy, resident, capacity)


def _check_internal(name, policy, resident, capacity):
    """Structural invariants of the policies with ghost lists."""
    if name == "arc":
        (t1, t2), (b1, b2), nbytes = policy.resident_lists(), policy.ghost_keys(), policy.list_bytes()
        assert set(t1) | set(t2) == set(resident) and not (set(b1) | set(b2)) & set(resident)
        assert nbytes["t1"] == sum(resident[k] for k in t1) and 0 <= policy.p <= capacity
        if sum(resident.values()) <= capacity:  # the bounds hold once the tier fits
            assert nbytes["t1"] + nbytes["b1"] <= capacity
            assert sum(nbytes.values()) <= 2 * capacity
    if name == "s3fifo":
        small, main, ghost = policy.queues()
        assert set(small) | set(main) == set(resident) and not set(ghost) & set(resident)
        assert policy.queue_bytes()[2] <= policy.ghost_limit


def test_policies_import_without_torch_or_vllm():
    # Layering: policies are pure Python, usable by the scheduler side with no heavy imports.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['vllm'] = None; "
        "import kvplug.tiers.policies as p; print(sorted(p.POLICIES))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['arc', 'cost_aware', 'fifo', 'lfu', 'lru', 's3fifo']"
