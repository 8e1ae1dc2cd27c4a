"""Import the launch/ entry points' main functions (launch/ is scripts, not a package)."""

import importlib.util

from conftest import ROOT


def _main(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def train_main(argv):
    return _main("train")(argv)


def evaluate_main(argv):
    return _main("evaluate")(argv)


def build_shards_main(argv):
    return _main("build_shards")(argv)


def make_synthetic_main(argv):
    return _main("make_synthetic")(argv)
