"""How the service reconciles a big edge: every part queued at once, each part's commands
published when it is done, a part that fails costs only its own devices, and a full pass
waits while an edge runs (SQLite, no broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry

from fleet.config import FleetSettings
from fleet.core import Reconciled
from fleet.outbound import Publish
from fleet.service import RECONCILE_PART, FleetService


def _service(tmp_path: Path) -> FleetService:
    settings = FleetSettings(
        database_url=f"sqlite:///{tmp_path / 'f.db'}", signing_key_file=tmp_path / "key.pem"
    )
    service = FleetService(settings, registry=CollectorRegistry())
    service.plans.leader = True
    return service


async def test_an_edge_queues_every_part_and_a_failed_part_costs_only_its_devices(
    tmp_path: Path,
) -> None:
    service = _service(tmp_path)
    ids = [f"dev-e{i:05d}" for i in range(3 * RECONCILE_PART)]
    calls: list[str] = []
    published: list[str] = []

    def reconcile(part: list[str], now: float) -> Reconciled:
        calls.append(part[0])
        if part[0] == ids[RECONCILE_PART]:
            raise RuntimeError("database hiccup")
        return Reconciled([Publish(f"t/{d}", b"x") for d in part], dict.fromkeys(part))

    async def publish(items: list[Publish]) -> None:
        published.extend(p.topic for p in items)

    service.ops.reconcile = reconcile  # type: ignore[method-assign]
    service.publish = publish  # type: ignore[method-assign]
    try:
        try:
            await service._on_edge(ids)
        except RuntimeError:
            pass
        else:
            raise AssertionError("the failed part's error must reach the scheduler")
        assert calls == [ids[0], ids[RECONCILE_PART], ids[2 * RECONCILE_PART]]
        # The first and the last part's commands went out; the failed part's devices did not.
        assert published == [f"t/{d}" for d in ids[:RECONCILE_PART] + ids[2 * RECONCILE_PART :]]
        assert service._no_edge.is_set()
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()


async def test_a_full_pass_waits_while_an_edge_runs(tmp_path: Path) -> None:
    service = _service(tmp_path)
    order: list[str] = []
    release = asyncio.Event()

    async def edge_work(device_ids: list[str], *, edge: bool = False) -> None:
        order.append("edge start")
        await release.wait()
        order.append("edge end")

    def reconcile(part: list[str], now: float) -> Reconciled:
        order.append("full pass part")
        return Reconciled([], {})

    service.ops.reconcile = reconcile  # type: ignore[method-assign]
    try:
        real_reconcile = service.reconcile
        service.reconcile = edge_work  # type: ignore[method-assign]
        edge = asyncio.create_task(service._on_edge(["dev-e1"]))
        await asyncio.sleep(0.05)
        service.reconcile = real_reconcile  # type: ignore[method-assign]
        full = asyncio.create_task(service._reconcile(["dev-e2"], full_pass=True))
        await asyncio.sleep(0.2)
        assert order == ["edge start"]  # the full pass waits
        release.set()
        await asyncio.gather(edge, full)
        assert order == ["edge start", "edge end", "full pass part"]
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()


class _Inbound:
    """The device-message queue as ``_after_edges`` sees it: busy until told otherwise."""

    def __init__(self) -> None:
        self.quiet = 0.0

    def quiet_for(self) -> float:
        return self.quiet

    def seal(self) -> None:
        pass


async def _full_pass_order(service: FleetService, order: list[str], background: bool) -> None:
    def begin(now: float) -> tuple[list[Publish], list[str]]:
        order.append("full pass")
        return [], ["dev-e3"]

    service.ops.begin_full_pass = begin  # type: ignore[method-assign]
    service.ops.reconcile = lambda part, now: Reconciled([], {})  # type: ignore[method-assign,assignment]
    await service.reconcile(None, background=background)


async def test_the_sweep_after_an_edge_waits_until_its_acks_are_in(tmp_path: Path) -> None:
    """The periodic sweep (and the gauges) after a window start wait until no device message
    has been queued for a while (the storm's acks and state reports are applied), at most a
    sweep interval after the edge; any other full pass (a reconnect) waits only for the edge
    itself, and long after an edge nothing waits."""
    service = _service(tmp_path)
    service.settings.sweep_interval_s = 3.0  # settles after 0.3 s of quiet
    inbound = _Inbound()
    service.ingest.inbound = inbound  # type: ignore[assignment]
    service.ops.reconcile = lambda part, now: Reconciled([], {})  # type: ignore[method-assign,assignment]
    order: list[str] = []
    try:
        await service._on_edge(["dev-e1"])
        sweep = asyncio.create_task(_full_pass_order(service, order, background=True))
        await asyncio.sleep(0.5)
        assert order == []  # the edge's device messages are still coming in
        await _full_pass_order(service, order, background=False)
        assert order == ["full pass"]  # a reconnect's pass does not wait for them
        inbound.quiet = 0.3
        await asyncio.wait_for(sweep, 2)
        assert order == ["full pass", "full pass"]

        # Messages that never pause: the sweep still runs, a sweep interval after it began
        # to wait.
        inbound.quiet = 0.0
        service.settings.sweep_interval_s = 0.5
        await service._on_edge(["dev-e1"])
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(_full_pass_order(service, order, background=True), 2)
        assert 0.4 <= asyncio.get_running_loop().time() - t0 < 1.5
        # Long after the edge it does not wait at all.
        await asyncio.wait_for(_full_pass_order(service, order, background=True), 0.2)
        assert len(order) == 4

        # Edges that keep coming and messages that never pause: the sweep still waits no
        # longer than a sweep interval from when it began to wait (never starved).
        async def edges() -> None:
            while True:
                await service._on_edge(["dev-e1"])
                await asyncio.sleep(0.05)

        churn = asyncio.create_task(edges())
        await asyncio.sleep(0.1)
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(_full_pass_order(service, order, background=True), 3)
        assert 0.4 <= asyncio.get_running_loop().time() - t0 < 1.5
        churn.cancel()
        assert len(order) == 5
    finally:
        service._executor.shutdown(wait=True)
        service.engine.dispose()
