"""The method interface as a newcomer meets it: the extending guide's code runs as written, its
method stays small, and composition (KD) overrides only what it changes."""

from __future__ import annotations

import os
import re
import sys
import types
from pathlib import Path

import pytest

from sparsefl.methods import HOOKS, Method, Wrapper
from sparsefl.methods.kd import KD
from sparsefl.registry import DATASETS, METHODS, PARTITIONERS

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "extending.md"


def python_blocks(path: Path) -> list[str]:
    """The fenced ``python`` code blocks of a Markdown file, in order."""
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def overridden(cls: type) -> set[str]:
    """The method hooks ``cls`` defines itself or inherits from a class below ``Method``."""
    return {h for h in HOOKS if getattr(cls, h) is not getattr(Method, h)}


@pytest.fixture
def guide_namespace(tmp_path, monkeypatch, capsys):
    """Every python block of the guide run in order, in one namespace, in a scratch folder;
    what they register is unregistered afterwards."""
    monkeypatch.chdir(tmp_path)
    before = {r: set(r.names()) for r in (METHODS, DATASETS, PARTITIONERS)}
    module = types.ModuleType("extending_guide")  # dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for block in python_blocks(GUIDE):
            exec(compile(block, str(GUIDE), "exec"), module.__dict__)  # noqa: S102 - the guide's own code
        module.__dict__["printed"] = capsys.readouterr().out.split()
        yield module.__dict__
    finally:
        for registry, names in before.items():
            for name in set(registry.names()) - names:
                del registry._entries[name]


def test_every_block_of_the_extending_guide_runs(guide_namespace) -> None:
    printed = guide_namespace["printed"]
    assert len(printed) == 5  # own_mask (accuracy, bytes), rings, by_label, custom model
    accuracy, uplink = float(printed[0]), int(printed[1])
    assert accuracy > 0.5 and uplink > 0
    assert float(printed[2]) > 0.9  # the blobs are well separated
    assert 0.19 <= float(printed[4]) <= 0.21  # the custom model at 80% sparsity
    assert (Path("runs") / "own-mask" / "summary.json").is_file()


def test_the_guide_method_is_one_small_file_overriding_few_hooks(guide_namespace) -> None:
    source = python_blocks(GUIDE)[0]
    assert len(source.splitlines()) <= 80
    method = guide_namespace["OwnMask"]
    assert issubclass(method, Method) and len(overridden(method)) <= 5


def test_the_guide_method_uploads_only_its_kept_weights(guide_namespace) -> None:
    import sparsefl
    from sparsefl.config import load_config

    dense = sparsefl.run(load_config(overrides=["federation.rounds=2"]), "runs/dense")
    cfg = load_config(overrides=["method.name=own_mask", "method.sparsity=0.9", "federation.rounds=2"])
    sparse = sparsefl.run(cfg, "runs/sparse")
    assert sparse["uplink_bytes_total"] < 0.3 * dense["uplink_bytes_total"]


def test_kd_overrides_only_what_it_changes() -> None:
    assert issubclass(KD, Wrapper)
    assert {h for h in HOOKS if h in vars(KD)} == {"setup_payload", "setup_spec", "receive", "hooks", "upload"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_overrides_only_interface_hooks(name: str) -> None:
    """A public method a subclass defines that the server or client never calls is dead weight;
    every registered method overrides hooks of the interface, or private helpers."""
    cls = METHODS.get(name)
    public = {n for k in cls.__mro__ if k not in (Method, Wrapper, object) for n in vars(k) if not n.startswith("_")}
    extra = public - set(HOOKS) - {"config_cls", "config"}
    helpers = {n for n in extra if not callable(getattr(cls, n, None)) or isinstance(getattr(cls, n), property)}
    assert extra - helpers <= {
        "ratio",  # fedskel: a client's skeleton ratio
        "signs",  # hidenseek: the global signs of a state
        "sent_masks",  # dynamic: the channels a client used
        "teacher_bytes",  # kd: the teacher's encoded size
        "projections",  # kd: a client's feature projections
    }, os.linesep.join(sorted(extra - helpers))
