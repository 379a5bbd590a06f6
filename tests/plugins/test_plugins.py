"""Plugins: built-ins through the hooks, installed packages, inline objects, failures, filters, listing."""

from __future__ import annotations

import itertools
import json
import sys
import textwrap
import warnings
from importlib.metadata import entry_points

import pytest
import torch

import ensemblekit as ek
from ensemblekit import hookimpl
from ensemblekit.cli.main import main
from ensemblekit.components.aggregators import MeanLogits, MeanProbs
from ensemblekit.core.blocks import call_block
from ensemblekit.core.interfaces import Executor
from ensemblekit.core.registry import (
    AGGREGATORS,
    LOSSES,
    REGISTRIES,
    SPLITTERS,
    TOPOLOGIES,
    DuplicateComponentError,
    UnknownComponentError,
)
from ensemblekit.plugins.manager import (
    BLOCK_ENV,
    ONLY_ENV,
    PluginError,
    PluginWarning,
    load_plugins,
    plugin_infos,
    register_plugin,
)
from ensemblekit.splitting import splitters
from ensemblekit.testing import isolated_plugins, toy_split

_ids = itertools.count()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tensors are tiny: one thread beats two competing for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean_plugins(monkeypatch):
    monkeypatch.delenv(BLOCK_ENV, raising=False)
    monkeypatch.delenv(ONLY_ENV, raising=False)
    with isolated_plugins():
        yield


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install(code, name=..., dist=...)``: an installed distribution with one ``ensemblekit`` entry point.

    Writes the plugin module and a ``.dist-info`` (metadata + entry_points.txt)
    to a fresh folder on ``sys.path``: what ``pip install`` leaves behind.
    Returns the module name.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def install(code: str, name: str = "fake", dist: str = "fake-plugin", version: str = "1.2.3") -> str:
        module = f"ek_fake_plugin_{next(_ids)}"
        (site / f"{module}.py").write_text(textwrap.dedent(code))
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[ensemblekit]\n{name} = {module}\n")
        monkeypatch.delitem(sys.modules, module, raising=False)
        return module

    return install


GOOD = """
    import ensemblekit
    from ensemblekit.components.aggregators import MeanProbs
    CALLS = []

    @ensemblekit.hookimpl
    def register_aggregators(register):
        CALLS.append(1)
        register("fake_mean", MeanProbs)
"""


def info(name):
    return next(p for p in plugin_infos() if p.name == name)


def third_party():
    return {p.name for p in plugin_infos() if not p.builtin and p.distribution not in (None, "fake-plugin")}


# ------------------------------------------------------------------ built-ins
def test_builtins_register_through_the_hooks():
    builtin = info("ensemblekit.plugins.builtins")
    assert builtin.builtin and builtin.status == "loaded" and builtin.distribution == "ensemblekit"
    assert {"tree", "chain", "independent", "multi_branch", "cascade"} <= set(builtin.components["topology"])
    assert {"mean", "mean_probs", "vote", "weighted"} <= set(builtin.components["aggregator"])
    assert {"sequential", "timm"} <= set(builtin.components["splitter"])
    loaded = {p.name for p in plugin_infos() if p.status == "loaded"}
    for registry in REGISTRIES.values():
        assert all(entry.plugin in loaded for entry in registry.entries()), registry.kind


def test_every_component_is_listed_under_its_plugin():
    listed = {(kind, name) for p in plugin_infos() for kind, names in p.components.items() for name in names}
    registered = {(r.kind, e.name) for r in REGISTRIES.values() for e in r.entries()}
    assert listed == registered


# ---------------------------------------------------------- installed packages
def test_installed_package_resolves_by_name_without_an_import(install):
    module = install(GOOD)
    assert module not in sys.modules
    ens = ek.wrap(toy_split(3), "tree", depth=2, aggregator="fake_mean")
    assert isinstance(ens.aggregator, MeanProbs)
    fake = info("fake")
    assert (fake.distribution, fake.version, fake.status) == ("fake-plugin", "1.2.3", "loaded")
    assert fake.components == {"aggregator": ["fake_mean"]}
    assert AGGREGATORS.get("fake_mean").plugin == "fake"


def test_loading_is_lazy_and_happens_once(install):
    module = install(GOOD)
    import ensemblekit  # noqa: F401  (importing the package loads nothing)

    assert module not in sys.modules
    AGGREGATORS.names()
    AGGREGATORS.get("fake_mean")
    load_plugins()
    assert sys.modules[module].CALLS == [1]


@pytest.mark.parametrize("dist, entry, components", [
    ("ensemblekit-poe", "poe", {"aggregator": ["poe"], "halting policy": ["poe_support"]}),
    ("ensemblekit-moe", "moe", {"aggregator": ["moe_gate"]}),
    ("ensemblekit-snapshot", "snapshot", {"schedule": ["snapshot", "fge"]}),
])
def test_sample_plugins_when_installed(dist, entry, components):
    if not any(ep.name == entry and ep.dist and ep.dist.name == dist for ep in entry_points(group="ensemblekit")):
        pytest.skip(f"{dist} is not installed: pip install ./plugins/{dist}")
    sample = info(entry)
    assert (sample.status, sample.distribution, sample.components) == ("loaded", dist, components)


# ------------------------------------------------------------- inline plugins
class Inline:
    @hookimpl
    def register_aggregators(self, register):
        register("inline_mean", MeanLogits)

    @hookimpl
    def register_topologies(self, register):
        register("inline_tree", ek.topologies.Tree)


def test_inline_plugin_object():
    registered = register_plugin(Inline(), "inline")
    assert registered.components == {"topology": ["inline_tree"], "aggregator": ["inline_mean"]}
    ens = ek.wrap(toy_split(3), {"name": "inline_tree", "depth": 2}, aggregator="inline_mean")
    assert ens.num_members == 4 and isinstance(ens.aggregator, MeanLogits)
    assert info("inline").distribution is None


def test_reset_forgets_what_a_test_registered():
    register_plugin(Inline(), "inline")
    with isolated_plugins():
        assert "inline_mean" not in AGGREGATORS.names()
        assert "mean" in AGGREGATORS.names()


def test_plugin_splitter_is_tried_before_the_builtin_ones():
    def mine(model, num_blocks, example_input):
        return None

    class Splitters:
        @hookimpl
        def register_backbone_splitters(self, register):
            register("mine", mine)

    register_plugin(Splitters(), "splitters")
    order = splitters()
    assert order.index(mine) < order.index(SPLITTERS.get("timm").factory)
    with isolated_plugins():
        assert mine not in splitters()


# ------------------------------------------------------------------ duplicates
class AlsoFakeMean:
    @hookimpl
    def register_losses(self, register):
        register("also_fake_loss", lambda: None)

    @hookimpl
    def register_aggregators(self, register):
        register("fake_mean", MeanLogits)


def test_duplicate_name_names_both_plugins_and_keeps_nothing_of_the_second(install):
    install(GOOD)
    load_plugins()
    with pytest.raises(PluginError, match="aggregator 'fake_mean' is registered twice: by plugin 'fake' and "
                                          "by plugin 'second'"):
        register_plugin(AlsoFakeMean(), "second")
    assert AGGREGATORS.get("fake_mean").plugin == "fake"
    assert "also_fake_loss" not in LOSSES.names()
    assert info("second").status == "failed" and info("second").components == {}


def test_plugin_cannot_take_a_builtin_name(install):
    install("""
        import ensemblekit
        from ensemblekit.components.aggregators import MeanProbs

        @ensemblekit.hookimpl
        def register_aggregators(register):
            register("mean", MeanProbs)
    """)
    with pytest.warns(PluginWarning, match="'mean' is registered twice: by plugin 'ensemblekit.plugins.builtins' "
                                           "and by plugin 'fake'"):
        load_plugins()
    assert AGGREGATORS.get("mean").factory is MeanLogits


def test_same_name_twice_in_one_plugin():
    class Twice:
        @hookimpl
        def register_aggregators(self, register):
            register("twice", MeanLogits)
            register("twice", MeanProbs)

    with pytest.raises(PluginError, match="'twice' is registered twice by plugin 'twice'"):
        register_plugin(Twice(), "twice")
    assert "twice" not in AGGREGATORS.names()


def test_registry_register_reports_both_plugins():
    with pytest.raises(DuplicateComponentError, match="by plugin 'ensemblekit.plugins.builtins' and by plugin 'me'"):
        TOPOLOGIES.register("tree", ek.topologies.Tree, plugin="me")


# ------------------------------------------------------------ broken plugins
BROKEN = {
    "import error": ("import not_a_module_anywhere", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    "hook raises": ("""
        import ensemblekit
        from ensemblekit.components.aggregators import MeanProbs

        @ensemblekit.hookimpl
        def register_losses(register):
            register("half_registered", lambda: None)

        @ensemblekit.hookimpl
        def register_aggregators(register):
            raise RuntimeError("boom")
    """, "RuntimeError: boom"),
    "misspelt hook": ("""
        import ensemblekit

        @ensemblekit.hookimpl
        def register_aggregator(register):
            pass
    """, "unknown hook 'register_aggregator'; did you mean 'register_aggregators'?"),
    "wrong argument": ("""
        import ensemblekit

        @ensemblekit.hookimpl
        def register_aggregators(reg):
            pass
    """, "reg"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_broken_plugin_is_isolated_recorded_and_shown(install, case, capsys):
    code, error = BROKEN[case]
    install(code, name="broken", dist="broken-plugin")
    install(GOOD)
    with pytest.warns(PluginWarning, match="plugin 'broken' \\(from broken-plugin\\) was skipped"):
        load_plugins()
    broken = info("broken")
    assert broken.status == "failed" and error in broken.error and broken.traceback
    assert broken.components == {}
    assert "half_registered" not in LOSSES.names()
    assert info("fake").status == "loaded" and "fake_mean" in AGGREGATORS.names()
    with pytest.raises(UnknownComponentError, match="Not loaded: broken \\("):
        AGGREGATORS.get("broken_thing")
    assert main(["plugins"]) == 0
    assert "broken  broken-plugin 1.2.3  FAILED" in capsys.readouterr().out


def test_broken_inline_plugin_raises_and_leaves_the_registries_alone():
    class Raises:
        @hookimpl
        def register_aggregators(self, register):
            register("never", MeanLogits)
            raise RuntimeError("half way")

    with pytest.raises(PluginError, match="half way"):
        register_plugin(Raises(), "raises")
    assert "never" not in AGGREGATORS.names()


# ------------------------------------------------------- block / allow lists
BOMB = "raise RuntimeError('imported although blocked')"


def test_block_variable_skips_the_import(install, monkeypatch):
    install(BOMB, name="bomb", dist="bomb-plugin")
    install(GOOD)
    monkeypatch.setenv(BLOCK_ENV, "bomb, other")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)  # 'other' is not installed
        load_plugins()
    assert (info("bomb").status, info("bomb").error) == ("blocked", f"blocked by {BLOCK_ENV}")
    assert info("fake").status == "loaded"


def test_only_variable_allows_listed_plugins_and_builtins(install, monkeypatch):
    install(BOMB, name="bomb", dist="bomb-plugin")
    install(GOOD)
    monkeypatch.setenv(ONLY_ENV, "fake")
    assert "fake_mean" in AGGREGATORS.names() and "mean" in AGGREGATORS.names()
    assert (info("bomb").status, info("bomb").error) == ("blocked", f"not in {ONLY_ENV}")
    assert all(info(name).status == "blocked" for name in third_party())


def test_builtins_cannot_be_blocked_and_unknown_names_warn(monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "ensemblekit.plugins.builtins,typo")
    with pytest.warns(PluginWarning) as record:
        load_plugins()
    messages = " ".join(str(w.message) for w in record)
    assert "built-in plugins always load" in messages and "'typo', ignored" in messages
    assert info("ensemblekit.plugins.builtins").status == "loaded" and "tree" in TOPOLOGIES.names()


def test_unknown_component_names_the_blocked_plugin(install, monkeypatch):
    install(GOOD)
    monkeypatch.setenv(BLOCK_ENV, "fake")
    with pytest.raises(UnknownComponentError, match=f"Not loaded: fake \\(blocked by {BLOCK_ENV}\\)"):
        ek.wrap(toy_split(3), "tree", depth=2, aggregator="fake_mean")


# --------------------------------------------------------------------- listing
def test_listing_plain(install, capsys):
    install(GOOD)
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ensemblekit.plugins.builtins  ensemblekit ")
    assert any(line.startswith("  topology: ") and "tree" in line for line in out.splitlines())
    assert "fake  fake-plugin 1.2.3\n  aggregator: fake_mean\n" in out


def test_listing_json_and_verbose(install, capsys):
    install("import not_a_module_anywhere", name="broken", dist="broken-plugin")
    with pytest.warns(PluginWarning):
        assert main(["plugins", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert listed["ensemblekit.plugins.builtins"]["builtin"] is True
    assert "tree" in listed["ensemblekit.plugins.builtins"]["components"]["topology"]
    broken = listed["broken"]
    assert (broken["distribution"], broken["version"], broken["status"]) == ("broken-plugin", "1.2.3", "failed")
    assert broken["error"].startswith("ModuleNotFoundError") and "Traceback" in broken["traceback"]
    assert main(["plugins", "-v"]) == 0
    assert "    Traceback (most recent call last):" in capsys.readouterr().out


def test_conformance_helpers_are_usable_by_plugin_authors():
    from ensemblekit.testing import check_component

    register_plugin(Inline(), "inline")
    check_component("aggregator", "inline_mean")
    check_component("topology", "inline_tree")


# ------------------------------------------------------- executors and recipes
class ReverseLoop(Executor):
    """Runs the nodes of a level last to first (the same results as the loop), counting the levels."""

    name = "reverse_loop"

    def __init__(self, label: str = "") -> None:
        self.label = label
        self._levels = 0  # private: pickling keeps only the constructor's arguments

    @property
    def levels(self) -> int:
        return self._levels

    def run(self, modules, inputs):
        self._levels += 1
        outputs = [call_block(m, s) for m, s in zip(reversed(modules), reversed(inputs))]
        return outputs[::-1]


def soft_tree(backbone, depth: int = 1, **options):
    """A tree whose members are averaged in probability; other options go to wrap()."""
    return ek.wrap(backbone, "tree", depth=depth, aggregator="mean_probs", **options)


soft_tree.passes_kwargs_to = ek.wrap


class ExecutorAndRecipe:
    @hookimpl
    def register_executors(self, register):
        register("reverse_loop", ReverseLoop)

    @hookimpl
    def register_recipes(self, register):
        register("soft_tree", soft_tree)


TINY = {"backbone": "resnet10t", "num_classes": 3, "image_size": 16,
        "backbone_options": {"stem_width": 8, "channels": [8, 16, 16, 16]}}


def test_plugin_adds_an_executor_and_a_recipe():
    from ensemblekit.testing import check_component

    registered = register_plugin(ExecutorAndRecipe(), "mine")
    assert registered.components == {"execution strategy": ["reverse_loop"], "recipe": ["soft_tree"]}
    assert "reverse_loop" in ek.list_components("execution strategy") and "soft_tree" in ek.list_components("recipe")
    check_component("execution strategy", "reverse_loop")
    ens = ek.wrap(toy_split(3), "tree", depth=2, execution={"name": "reverse_loop", "label": "x"}).eval()
    assert ens.execution == "reverse_loop" and ens.executor.label == "x"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        out = ens(x)
        ens.execution = "loop"
        assert torch.allclose(ens(x), out, atol=1e-6)
    by_recipe = ek.recipes.hne(toy_split(2), depth=1, execution="reverse_loop")
    assert by_recipe.execution == "reverse_loop"
    by_recipe(torch.randn(2, 3, 8, 8))
    assert by_recipe.executor.levels == 2


def test_config_resolves_a_plugin_recipe_by_name():
    from ensemblekit.training.config import ConfigError, ModelConfig, build_ensemble

    register_plugin(ExecutorAndRecipe(), "mine")
    config = ModelConfig(**TINY, recipe="soft_tree", recipe_options={"depth": 2, "execution": "reverse_loop"})
    ens = build_ensemble(config)
    assert ens.num_members == 4 and isinstance(ens.aggregator, MeanProbs) and ens.execution == "reverse_loop"
    with pytest.raises(ConfigError, match="model.recipe_options: recipe 'soft_tree' does not take leaves; it takes: "
                                          "depth, aggregator, loss, num_classes"):
        ModelConfig(**TINY, recipe="soft_tree", recipe_options={"leaves": 2})
    with pytest.raises(ConfigError, match="model.recipe must be one of .*'soft_tree'"):
        ModelConfig(**TINY, recipe="soft_trees")


# ------------------------------------------------ a broken plugin cannot take the others down
def sequential_backbone() -> torch.nn.Sequential:
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3), head)


def test_a_splitter_that_raises_is_skipped_for_that_model_with_a_warning_naming_the_plugin():
    import timm

    tried = []

    def crashes(model, num_blocks, example_input):
        tried.append(type(model).__name__)
        raise RuntimeError("my splitter is broken")

    def answers_junk(model, num_blocks, example_input):
        return "not a split"

    class Broken:
        @hookimpl
        def register_backbone_splitters(self, register):
            register("crashes", crashes)
            register("junk", answers_junk)

    register_plugin(Broken(), "broken_splitters")
    with pytest.warns(PluginWarning) as record:
        ens = ek.wrap(sequential_backbone(), "independent", members=2)  # the built-in splitter takes over
    assert ens.num_members == 2 and tried == ["Sequential"]
    messages = [str(w.message) for w in record]
    assert ("splitter 'crashes' of plugin 'broken_splitters' raised RuntimeError: my splitter is broken; it is "
            "skipped for this Sequential and the other splitters are tried") in messages
    assert ("splitter 'junk' of plugin 'broken_splitters' returned a str, not a BlockSplit or None; it is skipped "
            "for this Sequential") in " ".join(messages)
    with pytest.warns(PluginWarning) as record:
        assert ek.wrap(timm.create_model("test_resnet", num_classes=3), "tree", depth=1).num_members == 2
    assert "'crashes' of plugin 'broken_splitters' raised RuntimeError" in str(record[0].message)
    assert tried == ["Sequential", "ResNet"]


def test_a_splitter_that_cannot_split_as_asked_still_says_why():
    from ensemblekit.splitting import SplitError

    def strict(model, num_blocks, example_input):
        raise SplitError("my models come in 2 blocks only")

    class Strict:
        @hookimpl
        def register_backbone_splitters(self, register):
            register("strict", strict)

    register_plugin(Strict(), "strict")
    with pytest.raises(SplitError, match="my models come in 2 blocks only"):
        ek.wrap(sequential_backbone(), "independent", members=2)


def test_a_plugin_calling_sys_exit_at_import_is_listed_as_failed(install, capsys):
    install("import sys\nsys.exit(3)\n", name="quitter", dist="quitter-plugin")
    install(GOOD)
    with pytest.warns(PluginWarning, match=r"plugin 'quitter' \(from quitter-plugin\) was skipped: SystemExit: "
                                           r"the plugin called sys.exit\(3\) while loading"):
        load_plugins()
    assert info("quitter").status == "failed" and "SystemExit" in info("quitter").traceback
    assert info("fake").status == "loaded" and "fake_mean" in AGGREGATORS.names()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "quitter  quitter-plugin 1.2.3  FAILED\n  SystemExit: the plugin called sys.exit(3) while loading" in out


def test_a_hook_calling_sys_exit_is_caught_too():
    class Quits:
        @hookimpl
        def register_aggregators(self, register):
            register("never", MeanLogits)
            sys.exit("bye")

    with pytest.raises(PluginError, match=r"plugin 'quits' failed to load: SystemExit: the plugin called "
                                          r"sys.exit\('bye'\)"):
        register_plugin(Quits(), "quits")
    assert "never" not in AGGREGATORS.names()


def test_a_class_of_the_wrong_kind_is_refused_at_registration_naming_the_plugin():
    class WrongKind:
        @hookimpl
        def register_topologies(self, register):
            register("mean_tree", MeanLogits)  # an aggregator registered as a topology

    with pytest.raises(PluginError, match="topology 'mean_tree' of plugin 'wrong_kind': the factory is the class "
                                          "MeanLogits, which does not derive from SharingTopology"):
        register_plugin(WrongKind(), "wrong_kind")
    assert "mean_tree" not in TOPOLOGIES.names() and info("wrong_kind").status == "failed"


def test_a_factory_returning_the_wrong_type_is_refused_when_resolved_naming_the_plugin():
    from ensemblekit.core.registry import RECIPES, ComponentTypeError

    class Liar:
        @hookimpl
        def register_topologies(self, register):
            register("liar_tree", lambda depth=1: "a tree, trust me")

        @hookimpl
        def register_aggregators(self, register):
            register("liar_mean", lambda: None)

        @hookimpl
        def register_recipes(self, register):
            register("liar_recipe", lambda backbone, **options: backbone)

    register_plugin(Liar(), "liar")
    with pytest.raises(ComponentTypeError, match=r"topology 'liar_tree' of plugin 'liar' is broken: its factory "
                                                 r"returned 'a tree, trust me' \(str\) where a SharingTopology was "
                                                 r"expected; fix or remove that plugin"):
        ek.wrap(toy_split(3), "liar_tree")
    with pytest.raises(ek.EnsembleKitError, match="aggregator 'liar_mean' of plugin 'liar' is broken: its factory "
                                                  "returned None"):
        ek.wrap(toy_split(3), "tree", depth=2, aggregator="liar_mean")
    with pytest.raises(TypeError, match="recipe 'liar_recipe' of plugin 'liar' is broken: .* where a Ensemble"):
        RECIPES.create("liar_recipe", backbone=toy_split(2))
    assert isinstance(ek.wrap(toy_split(3), "tree", depth=2).aggregator, MeanLogits)  # the others still work
