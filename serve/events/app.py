"""The event consumer on Ray Serve, and a plain-process runner for it.

``build_events_app`` is a Serve application builder (``import_path: lens.serve.events.app:build_events_app``):
one ``EventConsumer`` deployment that polls the queue and tags through a handle to the model pool of
the tagging application, so events and online requests share the same replicas and batches.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pydantic import Field

from lens.runtime.config import DecodeConfig, ModelConfig, StrictModel, validate

from lens.serve.config import PoolConfig

from .config import EventsConfig
from .consumer import EventProcessor, LocalTagger, Poller

__all__ = ["BULK_NICE", "EventsAppArgs", "build_events_app", "run_in_process"]

logger = logging.getLogger("lens.events")


#: The niceness of the events application's own pool unless its ``nice`` says otherwise: the most yielding, so
#: interactive pools on the same node (Ray's workers run at 15) get the cores first (scripts/bench_priority.py).
BULK_NICE = 19


class EventsAppArgs(StrictModel):
    events: EventsConfig = EventsConfig()
    pool: PoolConfig | None = Field(
        None, description="a model pool of the events application's own (a deployment named pool.name in it): "
        f"event images never queue in front of interactive requests, and it runs at CPU niceness {BULK_NICE} "
        "unless pool.nice says otherwise, so interactive pools on the same node get the cores first. None: tag "
        "through tagger_deployment of tagger_app, sharing its replicas and batches with HTTP requests")
    nice: int | None = Field(BULK_NICE, ge=0, le=19, description="CPU niceness of the consumer's own process (it "
                             "polls, reads objects and writes sidecars: bulk work, like its pool). None: Ray's "
                             "worker niceness (15)")
    tagger_app: str = Field("lens", description="Serve application holding the model pool (without pool:)")
    tagger_deployment: str = Field("Tagger", description="the model pool deployment in that application (without "
                                   "pool:)")


def _make_consumer_class():
    from ray import serve

    @serve.deployment(name="EventConsumer", num_replicas=1, ray_actor_options={"num_cpus": 0},
                      health_check_period_s=10, logging_config={"enable_access_log": False})
    class EventConsumer:
        def __init__(self, args: dict, pool=None) -> None:
            from collections import Counter

            from lens.serve.logs import to_replica_log

            to_replica_log()

            from .setup import clients, count_calls

            self.args = validate(EventsAppArgs, args, where="EventConsumer args")
            s3, sqs = clients(self.args.events.region, concurrency=self.args.events.concurrency)
            self.aws_calls: Counter = Counter()  # every S3/SQS request this consumer makes, by operation
            count_calls(s3, self.aws_calls)
            count_calls(sqs, self.aws_calls)
            self._handle = pool if pool is not None else serve.get_deployment_handle(self.args.tagger_deployment,
                                                                                       self.args.tagger_app)
            self.tagger_calls = self.tagger_images = 0  # handle calls to the model pool, and the images they carried
            self.processor = EventProcessor(self.args.events, s3, self._tag_many, {}, calls=self.aws_calls)
            from lens.serve.metrics import EventMetrics

            self.poller = Poller(self.args.events, self.processor, sqs, EventMetrics())
            self._task = asyncio.get_event_loop().create_task(self._start())

        async def _tag_many(self, items: list[bytes], top_k: int, embedding: bool) -> list:
            """The processor's tagger: a poll's images reach the model pool in one handle call (``tag_many``), where
            they join the replica's batches one by one."""
            self.tagger_calls += 1
            self.tagger_images += len(items)
            return await self._handle.tag_many.remote(items, top_k, embedding)

        async def _start(self) -> None:
            self.processor.model_info = await self._handle.info.remote()  # model + weights checksum for sidecars
            await self.poller.run()

        async def pool_info(self) -> dict:
            """What the model pool this consumer tags through says of itself (its ``info``)."""
            return await self._handle.info.remote()

        def check_health(self) -> None:
            if self._task.done() and self._task.exception() is not None:
                raise RuntimeError(f"poller stopped: {self._task.exception()}")

        def status(self) -> dict:
            """Pollers, outcome counts, S3/SQS requests made by operation, calls to the model pool and the images they
            carried, and this process's CPU seconds (the consumer's own work: the model runs in the pool's replicas,
            S3/SQS in their servers)."""
            import time

            return {"pollers": self.poller.pollers, "processed": dict(self.poller.totals),
                    "aws_calls": dict(self.aws_calls), "cpu_s": time.process_time(),
                    "s3_client": self.processor.objects.name,
                    "tagger_calls": self.tagger_calls, "tagger_images": self.tagger_images}

        def __del__(self) -> None:
            self.poller.stop()

    return EventConsumer


def build_events_app(args: dict | None = None):
    cfg = validate(EventsAppArgs, args or {}, where="events application args")
    pool = None
    if cfg.pool is not None:
        from lens.serve.app import pool_options
        from lens.serve.deployments import Tagger

        pool = Tagger.options(**pool_options(cfg.pool, nice=BULK_NICE)).bind(cfg.pool.model_dump(mode="json"), None)
    from lens.cluster import worker_niceness_env

    consumer = _make_consumer_class()
    env = worker_niceness_env(cfg.nice)
    if env:
        consumer = consumer.options(ray_actor_options={**consumer.ray_actor_options, "runtime_env": env})
    return consumer.bind(cfg.model_dump(mode="json"), pool)


async def _run(cfg: EventsConfig, model_cfg: ModelConfig, stop: asyncio.Event) -> dict:
    from lens.runtime.predictor import Predictor

    from .setup import clients

    predictor = Predictor.from_config(model_cfg, DecodeConfig(max_bytes=cfg.max_object_bytes))
    predictor.warmup()
    s3, sqs = clients(cfg.region, concurrency=cfg.concurrency)
    tagger = LocalTagger(predictor)
    poller = Poller(cfg, EventProcessor(cfg, s3, tagger, predictor.info()), sqs)
    task = asyncio.create_task(poller.run())
    await stop.wait()
    poller.stop()
    task.cancel()
    return poller.totals


def run_in_process(cfg: EventsConfig, model_cfg: ModelConfig) -> dict:
    """Consume events in this process with a local predictor until SIGINT/SIGTERM (no Ray)."""
    async def main() -> dict:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await _run(cfg, model_cfg, stop)

    return asyncio.run(main())


if __name__ == "__main__":  # python -m lens.serve.events.app EVENTS_JSON MODEL_JSON (used by the fault tests)
    import json
    import sys

    logging.basicConfig(level=logging.INFO)
    totals = run_in_process(EventsConfig.model_validate(json.loads(sys.argv[1])),
                            ModelConfig.model_validate(json.loads(sys.argv[2])))
    print(json.dumps({"processed": totals}), flush=True)
