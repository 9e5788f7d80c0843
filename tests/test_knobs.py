"""infra/lens.yaml is the reference of every knob: generated from the typed configs, and every section of it
is accepted by the config class that reads it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from lens.batch.config import EmbedConfig
from lens.index.build import BuildConfig
from lens.serve.config import AppArgs
from lens.serve.events.config import EventsConfig
from lens.serve.frontdoor import FrontDoorConfig

from lens.runtime.config import DecodeConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[1]


def test_infra_lens_yaml_is_generated_from_the_configs():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "knobs.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_every_section_is_valid_and_gives_the_defaults():
    data = yaml.safe_load((ROOT / "infra" / "lens.yaml").read_text())
    assert set(data) == {"model", "decode", "embed", "index", "train", "serve", "events_app", "events", "frontdoor"}
    model = ModelConfig.model_validate(data["model"])
    assert model == ModelConfig(cache_dir=model.cache_dir)
    assert DecodeConfig.model_validate(data["decode"]) == DecodeConfig()
    embed = EmbedConfig.model_validate(data["embed"] | {"input": "in", "output": "out"})
    assert embed == EmbedConfig(input="in", output="out", model=embed.model)
    assert BuildConfig.model_validate(data["index"] | {"embeddings": ["e"], "output": "o"}) == \
        BuildConfig(embeddings=("e",), output="o")
    from lens.train.config import TrainConfig

    train = TrainConfig.model_validate(data["train"] | {"data": "d", "output": "o"})
    assert train == TrainConfig(data="d", output="o", model=train.model)
    pool = data["serve"]["pools"][0]
    pool = pool | {"model": {}, "decode": {}, "versions": pool["versions"] | {"registry": "r", "model": "m"},
                   "drift": pool["drift"] | {"reference": "p"}}
    serve = data["serve"] | {"search": data["serve"]["search"] | {"index": "idx"}, "pools": [pool],
                             "feedback": data["serve"]["feedback"] | {"sink": "s"}}
    args = AppArgs.model_validate(serve)
    assert args.pools[0].batching == AppArgs().pools[0].batching and args.api == AppArgs().api
    assert args.rollout == AppArgs().rollout and args.pools[0].versions.poll_s == 2.0
    assert EventsConfig.model_validate(data["events"]) == EventsConfig()
    from lens.serve.events.app import EventsAppArgs

    assert EventsAppArgs.model_validate(data["events_app"]) == EventsAppArgs()
    assert FrontDoorConfig.model_validate(data["frontdoor"]) == FrontDoorConfig()


def test_a_new_field_makes_the_reference_stale(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import knobs

    before = knobs.generate()
    from lens.serve.events import config as events_config
    from pydantic import Field

    class Wider(events_config.EventsConfig):
        brand_new_knob: int = Field(7, description="a knob nobody documented")

    monkeypatch.setattr(knobs, "EventsConfig", Wider)
    after = knobs.generate()
    assert "brand_new_knob: 7" in after and "a knob nobody documented" in after and after != before
