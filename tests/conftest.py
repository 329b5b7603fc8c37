"""Suite-wide JAX settings (exact fp32 matmuls, 8 simulated CPU devices for the sharding tests, XLA:CPU's cheap
backend mode, a compilation cache for the run) and the --no-oracle option that leaves out the tests marked `oracle`
(they need PyTorch and transformers)."""

import gc
import importlib.abc
import os
import pathlib
import shutil
import sys
import tempfile

# Must be set before JAX initialises its CPU backend; harmless for single-device tests. Appended, so
# XLA_FLAGS the caller already set are kept.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

# XLA:CPU's backend at its cheapest (LLVM -O0, no expensive passes): the suite is bound by compiling hundreds of
# small programs that it then runs a few times. XLA's HLO passes (fusion, layouts, rematerialisation) still run,
# and LLVM's levels keep IEEE results, so a test compares the values users get. An environment variable, so the
# scripts that tests start as subprocesses compile the same way; JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# A compilation cache on disk for this run only, shared by pytest-xdist's workers (they inherit the controller's
# environment) and the scripts tests start: every module drops its compiled programs when it ends (below), and later
# modules, the other worker and the subprocesses compile many of the same programs (the demo model's steps) again.
# 231 -> 200 s for the generation, decode and scheduler modules. A hit still reports JAX's backend-compile event,
# so the tests that check that nothing recompiles (inference.clock) see it. A directory set by the caller is kept.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="model1-jax-test-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the suite's programs compile in under 1 s
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import oracle_marks  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Each test module's compiled programs are dropped when it ends: the whole suite runs in one process, and
    hundreds of cached XLA executables would otherwise keep growing its memory (XLA:CPU then crashed compiling
    late in the run on a busy machine)."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module")
def eight_devices():
    """8 devices for a module (`pytestmark = usefixtures("eight_devices")`), or a failure that says how."""
    if jax.device_count() < 8:
        pytest.fail(f"these tests need 8 devices, found {jax.device_count()}: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS "
                    "is already set)")


def pytest_addoption(parser):
    parser.addoption("--no-oracle", action="store_true",
                     help="deselect the tests marked `oracle` (PyTorch / transformers) and make importing torch or "
                          "transformers fail; for a Python without a CPU PyTorch wheel (.ci/python313.sh)")


class _BlockOracleImports(importlib.abc.MetaPathFinder):
    """Under --no-oracle an unmarked test that reaches torch fails here, even where torch is installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"{name} imported under --no-oracle: mark the test `pytest.mark.oracle` "
                                      "(tests/oracle_marks.py)", name=name)
        return None


def pytest_configure(config):
    config.oracle_left_out = {"modules": set(), "tests": 0}
    if config.getoption("--no-oracle"):
        sys.meta_path.insert(0, _BlockOracleImports())


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the process that made the cache directory: the controller
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_ignore_collect(collection_path, config):
    """A module marked as a whole is not imported under --no-oracle (its imports need torch)."""
    path = pathlib.Path(collection_path)
    if (config.getoption("--no-oracle") and path.suffix == ".py" and path.name.startswith("test_")
            and path.parent == oracle_marks.TESTS and oracle_marks.module_marked(path)):
        config.oracle_left_out["modules"].add(path.name)
        return True
    return None


class _LeftOutModule(pytest.Module):
    """A module marked oracle as a whole, named on the command line under --no-oracle: reported as skipped, never
    imported (pytest_ignore_collect is not asked about the paths given as arguments)."""

    def collect(self):
        pytest.skip("needs the PyTorch oracle (marked oracle as a whole); left out under --no-oracle")


def pytest_pycollect_makemodule(module_path, parent):
    config = parent.config
    path = pathlib.Path(module_path)
    if (config.getoption("--no-oracle") and path.parent == oracle_marks.TESTS
            and oracle_marks.module_marked(path)):
        config.oracle_left_out["modules"].add(path.name)
        return _LeftOutModule.from_parent(parent, path=path)
    return None


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--no-oracle"):
        return
    oracle = [item for item in items if item.get_closest_marker("oracle")]
    if oracle:
        config.hook.pytest_deselected(items=oracle)
        items[:] = [item for item in items if not item.get_closest_marker("oracle")]
    config.oracle_left_out["tests"] = len(oracle)


def pytest_terminal_summary(terminalreporter, config):
    left = config.oracle_left_out
    if config.getoption("--no-oracle") and config.pluginmanager.getplugin("dsession") is not None:
        # pytest-xdist's controller collects nothing: its workers left the oracle tests out
        terminalreporter.write_line("--no-oracle: the worker processes left out the tests marked oracle and did not "
                                    "import the modules marked as a whole (`-n 0` lists them)")
    elif config.getoption("--no-oracle"):
        terminalreporter.write_line(
            f"--no-oracle: {left['tests']} tests marked oracle deselected; modules marked oracle as a whole, not "
            f"imported: {', '.join(sorted(left['modules'])) or 'none'}")
