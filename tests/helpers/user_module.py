"""A user's own module (importable, not __main__) whose configs set module-level state."""

from __future__ import annotations

from typing import Any

import procval

SETTINGS: dict[str, Any] = {"model": None}


def program(example: int) -> str:
    return f"{SETTINGS['model']}:{example}"


def make_configs() -> dict[str, procval.Config]:
    def make_setup(model: str):
        def setup() -> None:  # a closure defined in this module
            SETTINGS["model"] = model

        return setup

    return {
        "lambda": procval.Config(setup=lambda: SETTINGS.update(model="via-lambda")),
        "closure": procval.Config(setup=make_setup("via-closure")),
    }
