from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys

import pytest

import procval
from procval.run.snapshot import take_snapshot


def test_config_is_immutable_and_validated():
    config = procval.Config("a", env={"K": "v"}, seed=1, values={"x": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "b"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.env["K"] = "w"  # type: ignore[index]
    with pytest.raises(ValueError, match="non-empty string"):
        procval.Config("")
    with pytest.raises(TypeError, match=r"Config\.env entries must be str to str"):
        procval.Config(env={"PORT": 8080})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match=r"Config\.seed must be an int"):
        procval.Config(seed="42")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"Config\.setup must be a callable"):
        procval.Config(setup="dspy.configure")  # type: ignore[arg-type]


def test_env_values_are_secret_in_repr_and_description():
    config = procval.Config("a", env={"OPENAI_API_KEY": "sk-very-secret"})
    assert "sk-very-secret" not in repr(config)
    assert "sk-very-secret" not in str(config.describe())
    assert "OPENAI_API_KEY" in config.describe()["env"]


def test_snapshot_fingerprint_and_identity():
    config = procval.Config("a", seed=3, values={"model": "m"})
    snap = take_snapshot(config)
    assert pickle.loads(snap.data) == (config, None, None)
    assert snap.fingerprint == take_snapshot(config).fingerprint
    assert snap.identity != take_snapshot(dataclasses.replace(config, seed=4)).identity


def test_identity_is_stable_across_processes():
    code = (
        "import procval; print(procval.Config('a', setup=lambda: print('hi'), seed=1, "
        "env={'K': 'v'}, values={'m': [1, 2]}).identity())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(outs) == 1
