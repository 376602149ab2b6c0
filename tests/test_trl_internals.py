"""The import-time check of the TRL names ESTrainer relies on (trl_ext.trl_internals): the installed TRL passes it, and
a TRL lacking one of them fails with an error naming that name, the installed version and the supported range."""

import re
import sys
from pathlib import Path

import pytest
import trl
import trl.trainer.grpo_trainer as grpo_trainer_module
from trl import GRPOTrainer

from trl_ext import trl_internals
from trl_ext.trl_internals import (INSTANCE_ATTRIBUTES, METHODS, MODULE_NAMES, SUPPORTED, UnsupportedTRLError,
                                   check_trl, missing_trl_names)

ROOT = Path(__file__).resolve().parents[1]


def test_installed_trl_has_every_name():
    assert missing_trl_names() == []
    check_trl()


def test_every_name_is_checked_with_a_reason():
    for table in (MODULE_NAMES, INSTANCE_ATTRIBUTES):
        assert all(isinstance(why, str) and why for why in table.values())
    assert all(why for _, why in METHODS.values())


def test_names_trl_ext_uses_are_listed():
    """Every private GRPOTrainer name trl_ext's sources use on self is in the list (a new one must be added)."""
    used = set()
    for path in (ROOT / "trl_ext").glob("*.py"):
        used |= set(re.findall(r"\bself\.(_[a-z][a-z_]*)\b", path.read_text()))
    trl_private = {name for name in used if name in trl_internals.trl_assigned_attributes(GRPOTrainer)
                   or (hasattr(GRPOTrainer, name) and name in vars(_trl_class_defining(name)))}
    assert trl_private <= set(INSTANCE_ATTRIBUTES) | set(METHODS), trl_private - set(INSTANCE_ATTRIBUTES) - set(METHODS)


def _trl_class_defining(name):
    for cls in GRPOTrainer.__mro__:
        if name in vars(cls):
            return cls if cls.__module__.startswith("trl") else object
    return object


def _error(monkeypatch=None) -> str:
    with pytest.raises(UnsupportedTRLError) as caught:
        check_trl()
    message = str(caught.value)
    assert trl.__version__ in message
    assert f"trl{SUPPORTED}" in message
    return message


def test_a_missing_method_is_named(monkeypatch):
    monkeypatch.delattr(GRPOTrainer, "_generate")
    message = _error()
    assert "GRPOTrainer._generate" in message
    assert "_calculate_rewards" not in message  # only what is missing


def test_a_changed_signature_is_named(monkeypatch):
    def _calculate_rewards(self, inputs):  # one argument where ES passes four
        raise AssertionError

    monkeypatch.setattr(GRPOTrainer, "_calculate_rewards", _calculate_rewards)
    assert "GRPOTrainer._calculate_rewards(inputs, prompts, completions, completion_ids_list)" in _error()


def test_the_patched_module_global_is_named(monkeypatch):
    monkeypatch.delattr(grpo_trainer_module, "gather")
    assert "trl.trainer.grpo_trainer.gather" in _error()


def test_a_missing_import_is_named(monkeypatch):
    import trl.trainer.utils

    monkeypatch.delattr(trl.trainer.utils, "identity")
    assert "trl.trainer.utils.identity" in _error()


def test_a_missing_instance_attribute_is_named(monkeypatch):
    """Instance attributes are looked for in TRL's source: one that no TRL class assigns is reported."""
    monkeypatch.setitem(INSTANCE_ATTRIBUTES, "_renamed_metrics_buffer", "stands for a renamed one")
    assert "self._renamed_metrics_buffer" in _error()


def test_instance_attributes_are_read_from_assignments_in_any_method():
    source = '''
class Trainer:
    def __init__(self):
        self._metrics = {}
        self.a, (self.b, *self.c) = 1, (2, 3)
        other._not_self = 1
        self._logs: dict = {}
    def later(self):
        self._tokenizer += 1
        local = self._read_only
'''
    assert trl_internals._assigned_self_attributes(source) == {"_metrics", "a", "b", "c", "_logs", "_tokenizer"}


def test_unreadable_source_skips_the_attribute_check(monkeypatch):
    def no_source(obj):
        raise OSError("could not get source code")

    monkeypatch.setattr(trl_internals.inspect, "getsource", no_source)
    monkeypatch.setitem(INSTANCE_ATTRIBUTES, "_renamed_metrics_buffer", "stands for a renamed one")
    assert trl_internals.trl_assigned_attributes(GRPOTrainer) is None
    check_trl()


def test_importing_trl_ext_fails_with_the_check(monkeypatch):
    """trl_ext checks before it imports its modules, so a TRL lacking a name fails at ``import trl_ext``."""
    monkeypatch.delattr(GRPOTrainer, "_calculate_rewards")
    for name in [name for name in sys.modules if name == "trl_ext" or name.startswith("trl_ext.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"GRPOTrainer\._calculate_rewards"):
        import trl_ext  # noqa: F401


def test_a_release_outside_the_tested_range_warns(monkeypatch, recwarn):
    monkeypatch.setattr(trl_internals, "installed_trl_version", lambda: "1.17.0")
    with pytest.warns(UserWarning, match=r"tested with trl>=1\.14,<1\.17; the installed TRL 1\.17\.0"):
        check_trl()
    monkeypatch.setattr(trl_internals, "installed_trl_version", lambda: "1.16.0")
    check_trl()
    assert not [w for w in recwarn if "was not tested" in str(w.message)]


def test_supported_range_is_pyproject_requirement():
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (trl_requirement,) = [d for d in dependencies if re.match(r"trl\b", d)]
    assert trl_requirement.replace(" ", "") == f"trl{SUPPORTED}"
