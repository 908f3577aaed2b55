"""Models named by Hub id (io/hub.py): resolved and downloaded through huggingface_hub from a local
stand-in for the Hub (tests/hub_helpers.py), then used offline from the cache huggingface_hub wrote.

The golden value of every merge is the same merge of the same models as plain folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from ckpt_helpers import extend_vocabulary
from eval_helpers import MC_DOCS, MC_SPEC, write_task
from hub_helpers import FakeHub, folder_files, use_hub
from langmerge.analysis.cli import training_tokens
from langmerge.analysis.diagnostics import analyze
from langmerge.cli import main
from langmerge.errors import LangmergeError
from langmerge.evaluation import evaluate
from langmerge.io.hub import (
    CACHED,
    DOWNLOADED,
    LOCAL,
    TO_DOWNLOAD,
    ResolvedModel,
    hub_cache_dir,
    parse_hub_id,
    resolve_model,
)
from langmerge.io.lora import AdapterMismatch, LoraSettings, check_adapter_base
from langmerge.io.reader import CheckpointReader, open_checkpoint
from langmerge.merge import merge
from langmerge.merge.check import check_recipe
from langmerge.study import build_plan, load_study
from langmerge.study.run_steps import model_path
from langmerge.study.steps import Context, run_step
from langmerge.synthetic import LlamaShape, write_model
from langmerge.training import LoraOptions, train_sft
from langmerge.tuning import tune
from study_helpers import study_dict, write_inputs, write_study
from train_helpers import fast_options

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=1, heads=2, kv_heads=1)
NEW_TOKENS = ["வணக்கம்", "தமிழ்"]
SECRET = "hf_test_token"
# What a merge of org/ct (sharded, with training metadata) fetches; the repository also holds files it must not fetch.
CT_NEEDED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "langmerge_training.json",
    "model.safetensors.index.json",
}
JUNK = {
    "pytorch_model.bin": b"pickle",
    "consolidated.safetensors": b"junk",
    "onnx/model.onnx": b"onnx",
    "README.md": b"# card",
}


def _adapter(folder: Path, recorded_base: str) -> Path:
    """A PEFT LoRA adapter folder written by hand (r=2 on q_proj), recording ``recorded_base``."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(11)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {
            f"{prefix}.lora_A.weight": torch.randn(2, SHAPE.hidden, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(SHAPE.hidden, 2, generator=g),
        },
        str(folder / "adapter_model.safetensors"),
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
                "base_model_name_or_path": recorded_base,
            }
        )
    )
    return folder


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plain")
    models = {
        "base": write_model(root / "base", SHAPE, seed=0),
        "base-v1": write_model(root / "base-v1", SHAPE, seed=5),  # an older commit of org/base
        "ct": write_model(root / "ct", SHAPE, seed=0, delta_scale=0.3, delta_key="ct", shard_bytes=20_000),
        "sft": write_model(root / "sft", SHAPE, seed=0, delta_scale=0.1, delta_key="sft"),
        "ct-ext": write_model(root / "ct-ext", SHAPE, seed=0, delta_scale=0.3, delta_key="ct"),
    }
    (models["ct"] / "langmerge_training.json").write_text(json.dumps({"kind": "ct", "tokens": {"target": 1234}}))
    extend_vocabulary(models["ct-ext"], NEW_TOKENS)
    models["adapter"] = _adapter(root / "adapter", "org/base")
    pickled = root / "pickled"
    pickled.mkdir()
    torch.save(load_file(str(models["sft"] / "model.safetensors")), pickled / "pytorch_model.bin")
    shutil.copy(models["sft"] / "config.json", pickled / "config.json")
    models["pickled"] = pickled
    return models


@pytest.fixture(scope="module")
def hub(plain):
    with FakeHub() as server:
        server.commits.update(
            {
                "base-v1": server.push("org/base", folder_files(plain["base-v1"]), refs=("v1", "dev")),
                "base": server.push("org/base", folder_files(plain["base"])),
                "ct": server.push("org/ct", folder_files(plain["ct"]) | JUNK),
                "sft": server.push(
                    "org/sft", folder_files(plain["sft"]) | {"pytorch_model.bin": b"pickle", "README.md": b"#"}
                ),
                "ct-ext": server.push("org/ct-ext", folder_files(plain["ct-ext"])),
                "adapter": server.push("org/adapter", folder_files(plain["adapter"])),
                "pickled": server.push("org/pickled", folder_files(plain["pickled"])),
                "gated": server.push("org/gated", folder_files(plain["sft"])),
            }
        )
        server.repos["org/gated"].gated_token = SECRET
        yield server


@pytest.fixture(scope="module")
def filled(hub, tmp_path_factory) -> Path:
    """A cache written by huggingface_hub itself: every model downloaded once, by id (and org/base also @v1)."""
    cache = tmp_path_factory.mktemp("filled") / "hub"
    with pytest.MonkeyPatch.context() as mp:
        use_hub(mp, cache, hub.url)
        for ref in ("org/base", "org/base@v1", "org/ct", "org/sft", "org/ct-ext", "org/adapter"):
            assert resolve_model(ref, progress=False).origin == DOWNLOADED
    hub.clear()
    return cache


@pytest.fixture
def offline(filled, monkeypatch, hub):
    use_hub(monkeypatch, filled, offline=True)
    hub.clear()
    yield filled
    assert hub.requests == [], "an offline run asked the Hub"


def _recipe(base: str, ct: str, sft: str, **extra) -> dict:
    return {
        "merge_method": "ties_sv",
        "base_model": base,
        "models": [
            {"model": ct, "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": sft, "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"slack": 1.0, "protect": [sft]},
        "dtype": "float32",
        **extra,
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and ta
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


@pytest.fixture(scope="module")
def golden(plain, tmp_path_factory) -> Path:
    """The TIES-SV merge of the plain folders."""
    out = tmp_path_factory.mktemp("golden") / "merged"
    merge(_recipe(str(plain["base"]), str(plain["ct"]), str(plain["sft"])), out, progress=False)
    return out


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize(
    "ref, parsed",
    [
        ("org/name", ("org/name", None)),
        ("meta-llama/Llama-2-7b-hf@main", ("meta-llama/Llama-2-7b-hf", "main")),
        ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
        ("org/name@" + "a" * 40, ("org/name", "a" * 40)),
        ("name", None),
        ("./org/name", None),
        ("/abs/path", None),
        ("a/b/c", None),
        ("org/name@", None),
        ("../name", None),
        ("org--x/name", None),
        ("org/name@../../x", None),
        ("org/name@/etc", None),
        ("org/name@a b", None),
    ],
)
def test_parse_hub_id(ref, parsed):
    assert parse_hub_id(ref) == parsed


def test_a_local_folder_named_like_an_id_wins(plain, hub, tmp_path, monkeypatch):
    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(plain["base-v1"], tmp_path / "org" / "base")
    hub.clear()
    model = resolve_model("org/base")
    assert model.origin == LOCAL and model.folder == Path("org/base") and model.repo_id is None
    assert hub.requests == []


def test_missing_folder_that_is_no_id_keeps_its_message(tmp_path):
    with pytest.raises(LangmergeError, match=r"folder \./nowhere does not exist"):
        resolve_model("./nowhere")


# ----------------------------------------------------------------------------- downloading from the stand-in Hub


def test_download_fetches_only_what_the_merge_reads_and_equals_the_plain_merge(
    plain, hub, golden, tmp_path, monkeypatch
):
    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    hub.clear()
    merge(_recipe("org/base", "org/ct", "org/sft"), tmp_path / "merged", progress=False)
    _assert_same(tmp_path / "merged", golden)
    shards = {p.name for p in plain["ct"].glob("model-*.safetensors")}
    assert len(shards) > 1
    fetched = hub.downloads()
    assert len(fetched) == len(set(fetched)), "a file was fetched twice"
    by_repo = {}
    for repo, path in fetched:
        by_repo.setdefault(repo, set()).add(path)
    single = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"}
    assert by_repo == {"org/base": single, "org/sft": single, "org/ct": CT_NEEDED | shards}

    # The cache is huggingface_hub's own layout: snapshots of symlinks into blobs, and refs/main.
    repo = tmp_path / "cache" / "models--org--ct"
    assert (repo / "refs" / "main").read_text() == hub.commits["ct"]
    snapshot = repo / "snapshots" / hub.commits["ct"]
    assert all((snapshot / f).is_symlink() for f in CT_NEEDED | shards)

    # Offline from the cache just written: the same merge, and not one request.
    use_hub(monkeypatch, tmp_path / "cache", offline=True)
    hub.clear()
    merge(_recipe("org/base", "org/ct", "org/sft"), tmp_path / "again", progress=False)
    _assert_same(tmp_path / "again", golden)
    assert hub.requests == []


def test_revisions_branch_tag_and_commit(plain, hub, filled, tmp_path, monkeypatch):
    use_hub(monkeypatch, filled, hub.url)
    old = hub.commits["base-v1"]
    branch = resolve_model("org/base@dev")  # a branch at the old commit, whose files @v1 already cached
    assert (branch.commit, branch.origin, branch.revision) == (old, CACHED, "dev")
    assert resolve_model("org/base").commit == hub.commits["base"]
    with pytest.raises(LangmergeError, match="org/base has no revision 'nope' on the Hub"):
        resolve_model("org/base@nope")

    use_hub(monkeypatch, filled, offline=True)
    hub.clear()
    for ref in ("org/base@v1", f"org/base@{old}"):
        model = resolve_model(ref)
        assert model.commit == old and model.origin == CACHED
        assert (
            load_file(str(model.folder / "model.safetensors")).keys()
            == load_file(str(plain["base-v1"] / "model.safetensors")).keys()
        )
    with pytest.raises(
        LangmergeError, match=r"org/base@dev is not \(completely\) in the Hugging Face cache .* offline mode is on"
    ):
        resolve_model("org/base@dev")  # resolved online above, but never downloaded: no ref in the cache
    merge(_recipe(f"org/base@{old}", "org/ct", "org/sft"), tmp_path / "by-commit", progress=False)
    merge(_recipe("org/base@v1", "org/ct", "org/sft"), tmp_path / "by-tag", progress=False)
    merge(_recipe(str(plain["base-v1"]), str(plain["ct"]), str(plain["sft"])), tmp_path / "plain", progress=False)
    _assert_same(tmp_path / "by-commit", tmp_path / "plain")
    _assert_same(tmp_path / "by-tag", tmp_path / "plain")
    assert hub.requests == []


def test_offline_and_not_cached_is_one_line_and_exit_2(filled, hub, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("org/base", "org/unknown", "org/sft")))
    use_hub(monkeypatch, filled, offline=True)
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "org/unknown" in err and "not (completely) in the Hugging Face cache" in err and "offline mode is on" in err
    assert not (tmp_path / "out").exists()

    use_hub(monkeypatch, filled)  # online, but nothing listens at the endpoint
    assert main(["merge", str(recipe), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "org/unknown" in err and "the Hub is not reachable at http://127.0.0.1:9" in err
    )


def test_unreachable_hub_falls_back_to_the_cache_with_a_warning(filled, hub, monkeypatch, caplog):
    use_hub(monkeypatch, filled)
    with caplog.at_level(logging.WARNING, logger="langmerge.io.hub"):
        model = resolve_model("org/sft")
    assert model.origin == CACHED and model.commit == hub.commits["sft"]
    assert "the Hub is not reachable" in caplog.text and "using the cached commit" in caplog.text


def test_unknown_gated_and_token(hub, tmp_path, monkeypatch):
    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    with pytest.raises(LangmergeError, match="no model org/nope on the Hub .*HF_TOKEN"):
        resolve_model("org/nope")
    with pytest.raises(
        LangmergeError, match=r"org/gated is gated on the Hub: accept its conditions at .* set HF_TOKEN"
    ):
        resolve_model("org/gated")
    monkeypatch.setenv("HF_TOKEN", SECRET)  # read when the request is made, as huggingface_hub's get_token does
    model = resolve_model("org/gated", progress=False)
    assert model.origin == DOWNLOADED and (model.folder / "model.safetensors").is_file()


def test_pickle_weights_only_with_allow_pickle(plain, hub, tmp_path, monkeypatch):
    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    hub.clear()
    with pytest.raises(LangmergeError, match=r"org/pickled.*only pickle \(\.bin\) weights.*--allow-pickle"):
        resolve_model("org/pickled")
    assert hub.downloads() == []  # refused before anything was fetched
    model = resolve_model("org/pickled", allow_pickle=True, progress=False)
    assert set(model.files) == {"config.json", "pytorch_model.bin"}
    reader = open_checkpoint(model.folder, allow_pickle=True)
    expected = load_file(str(plain["sft"] / "model.safetensors"))
    assert set(reader.names) == set(expected) and all(torch.equal(reader.get(n), expected[n]) for n in expected)


def test_check_reports_each_model_before_downloading_it(plain, hub, tmp_path, monkeypatch, capsys):
    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    hub.clear()
    heard = []

    def announce(ref, model):
        weights = [f for _, f in hub.downloads() if f.endswith(".safetensors")]
        heard.append((ref, model.origin, model.commit, weights))

    report = check_recipe(_recipe("org/base", "org/ct", "org/sft"), announce=announce, progress=False)
    assert report.exit_code == 0, report.text()
    assert [(r, o, c) for r, o, c, _ in heard] == [
        ("org/base", TO_DOWNLOAD, hub.commits["base"]),
        ("org/ct", TO_DOWNLOAD, hub.commits["ct"]),
        ("org/sft", TO_DOWNLOAD, hub.commits["sft"]),
    ]
    assert all(weights == [] for *_, weights in heard), "weights were downloaded before every model was reported"
    assert {m.origin for m in report.resolved.values()} == {DOWNLOADED}
    text = report.text()
    assert f"org/ct: org/ct@main -> commit {hub.commits['ct']}, downloaded," in text
    assert report.to_dict()["resolved"]["org/sft"]["pinned"] == f"org/sft@{hub.commits['sft']}"

    # The command prints each resolution on stderr first; a second check finds everything cached.
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe("org/base", "org/ct", "org/sft")))
    assert main(["check", str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert f"langmerge check: org/ct: org/ct@main -> commit {hub.commits['ct']}, cached," in out.err
    assert "resolved:" in out.out and "OK: the merge would succeed" in out.out


def test_local_dir_download_is_a_plain_folder(plain, hub, golden, tmp_path, monkeypatch):
    from huggingface_hub import snapshot_download  # reads the environment when imported (hub_helpers.use_hub)

    use_hub(monkeypatch, tmp_path / "cache", hub.url)
    local = Path(
        snapshot_download(
            "org/ct",
            local_dir=tmp_path / "ct-local",
            endpoint=hub.url,
            allow_patterns=["*.json", "model-*.safetensors"],
        )
    )
    assert (local / ".cache" / "huggingface").is_dir()
    assert resolve_model(str(local)).origin == LOCAL
    merge(_recipe(str(plain["base"]), str(local), str(plain["sft"])), tmp_path / "merged", progress=False)
    _assert_same(tmp_path / "merged", golden)


# ----------------------------------------------------------------------------- snapshot folders and the symlink rule


def test_snapshot_folders_by_path_merge_and_keep_their_ids(plain, offline, golden, tmp_path, hub):
    snaps = {k: resolve_model(f"org/{k}").folder for k in ("base", "ct", "sft")}
    assert all("snapshots" in str(f) for f in snaps.values())
    model = resolve_model(str(snaps["ct"]))
    assert (model.origin, model.repo_id, model.commit) == (LOCAL, "org/ct", hub.commits["ct"])
    merge(_recipe(str(snaps["base"]), str(snaps["ct"]), str(snaps["sft"])), tmp_path / "merged", progress=False)
    _assert_same(tmp_path / "merged", golden)
    front = yaml.safe_load((tmp_path / "merged" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["org/base", "org/ct", "org/sft"]


def test_symlink_leaving_its_cache_repository_is_refused(offline, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    shutil.copytree(offline, cache, symlinks=True)
    use_hub(monkeypatch, cache, offline=True)
    ct = resolve_model("org/ct").folder
    sft = resolve_model("org/sft").folder
    shard = sorted(ct.glob("model-*.safetensors"))[0]
    foreign = os.path.realpath(sft / "model.safetensors")  # a blob of another cache repository
    shard.unlink()
    os.symlink(foreign, shard)
    with pytest.raises(
        LangmergeError, match=rf"weight map entry '{shard.name}' points outside the model folder; refused"
    ):
        CheckpointReader(ct)
    (tmp_path / "elsewhere.safetensors").write_bytes(Path(foreign).read_bytes())
    single = sft / "model.safetensors"
    single.unlink()
    os.symlink(tmp_path / "elsewhere.safetensors", single)
    with pytest.raises(LangmergeError, match="points outside the model folder; refused"):
        CheckpointReader(sft)


def test_plain_folder_keeps_its_rule(plain, tmp_path):
    folder = tmp_path / "ct"
    shutil.copytree(plain["ct"], folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    moved = tmp_path / "blobs" / "shard"
    moved.parent.mkdir()
    shutil.move(shard, moved)
    os.symlink(Path("..") / "blobs" / "shard", shard)  # like a snapshot's link, but no cache repository around it
    with pytest.raises(LangmergeError, match="points outside the model folder; refused"):
        CheckpointReader(folder)


# ----------------------------------------------------------------------------- what the output records


def test_model_card_and_pinned_recipe_reproduce_the_merge(offline, golden, tmp_path, hub):
    out = tmp_path / "merged"
    merge(_recipe("org/base", "org/ct", "org/sft"), out, progress=False)
    _assert_same(out, golden)
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["org/base", "org/ct", "org/sft"]
    assert front["base_model_relation"] == "merge" and "merge" in front["tags"]
    assert f"[org/ct](https://huggingface.co/org/ct) at commit `{hub.commits['ct']}`" in card
    text = (out / "langmerge_recipe.yaml").read_text()
    assert f"# org/ct: org/ct@main resolved to commit {hub.commits['ct']}" in text
    written = yaml.safe_load(text)
    c = hub.commits
    assert written["base_model"] == f"org/base@{c['base']}"
    assert [m["model"] for m in written["models"]] == [f"org/ct@{c['ct']}", f"org/sft@{c['sft']}"]
    assert written["parameters"]["protect"] == [f"org/sft@{c['sft']}"]
    merge(out / "langmerge_recipe.yaml", tmp_path / "rerun", progress=False)
    _assert_same(tmp_path / "rerun", golden)


# ----------------------------------------------------------------------------- every entry point takes an id


def test_adapter_by_id_on_a_base_by_id(plain, offline, tmp_path, hub):
    def recipe(base, adapter, sft):
        return {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": "float32",
            "models": [
                {"model": adapter, "parameters": {"weight": 0.7}},
                {"model": sft, "parameters": {"weight": 0.5}},
            ],
        }

    merge(recipe("org/base", "org/adapter", "org/sft"), tmp_path / "ids", progress=False)
    merge(recipe(f"org/base@{hub.commits['base']}", "org/adapter", "org/sft"), tmp_path / "pinned", progress=False)
    merge(recipe(str(plain["base"]), str(plain["adapter"]), str(plain["sft"])), tmp_path / "plain", progress=False)
    _assert_same(tmp_path / "ids", tmp_path / "plain")
    _assert_same(tmp_path / "pinned", tmp_path / "plain")
    assert yaml.safe_load((tmp_path / "ids" / "README.md").read_text().split("---")[1])["base_model"] == [
        "org/base",
        "org/adapter",
        "org/sft",
    ]


def test_base_plus_adapter_by_ids_and_mixed(plain, offline, tmp_path, hub):
    """mergekit's ``BASE+ADAPTER`` with a Hub id on either side: the adapter applies to the base named with it."""

    def recipe(first):
        return {
            "merge_method": "linear",
            "dtype": "float32",
            "models": [
                {"model": first, "parameters": {"weight": 0.7}},
                {"model": "org/sft", "parameters": {"weight": 0.3}},
            ],
        }

    commit = hub.commits["base"]
    merge(recipe(f"org/base@{commit}+org/adapter"), tmp_path / "ids", progress=False)
    merge(recipe(f"{plain['base']}+org/adapter"), tmp_path / "mixed", progress=False)
    merge(recipe(f"org/base+{plain['adapter']}"), tmp_path / "mixed2", progress=False)
    # the same adapter on the same base, both plain folders (linear takes no base_model: it would be one more input)
    merge(recipe(f"{plain['base']}+{plain['adapter']}"), tmp_path / "plain", progress=False)
    for name in ("ids", "mixed", "mixed2"):
        _assert_same(tmp_path / name, tmp_path / "plain")
    pinned = yaml.safe_load((tmp_path / "ids" / "langmerge_recipe.yaml").read_text())
    assert pinned["models"][0]["model"] == f"org/base@{commit}+org/adapter@{hub.commits['adapter']}"


def test_adapter_base_recorded_as_an_id(tmp_path):
    settings = LoraSettings(2, 4.0, False, False, {}, {}, "org/base")
    base = ResolvedModel("org/base@v1", tmp_path / "snapshots" / ("c" * 40), "org/base", "v1", "c" * 40, CACHED)
    check_adapter_base(settings, tmp_path / "adapter", "org/base@v1", {}, base)  # the ids agree
    other = ResolvedModel("org/other", tmp_path / "other", "org/other", None, "d" * 40, CACHED)
    with pytest.raises(AdapterMismatch, match="its base is 'org/base'"):
        check_adapter_base(settings, tmp_path / "adapter", "org/other", {}, other)


def test_tokenizer_source_by_id(plain, offline, tmp_path):
    def recipe(base, ct, sft):
        # linear takes no base: a base_model would be merged as one more input (and need a weight), as in mergekit
        return {
            "merge_method": "linear",
            "tokenizer_source": ct,
            "dtype": "float32",
            "models": [
                {"model": ct, "parameters": {"weight": 0.5}},
                {"model": sft, "parameters": {"weight": 0.5}},
                {"model": base, "parameters": {"weight": 0.0}},
            ],
        }

    merge(recipe("org/base", "org/ct-ext", "org/sft"), tmp_path / "ids", progress=False)
    merge(recipe(str(plain["base"]), str(plain["ct-ext"]), str(plain["sft"])), tmp_path / "plain", progress=False)
    _assert_same(tmp_path / "ids", tmp_path / "plain")
    rows = _tensors(tmp_path / "ids")["model.embed_tokens.weight"].shape[0]
    assert (
        rows
        == _tensors(plain["ct-ext"])["model.embed_tokens.weight"].shape[0]
        > _tensors(plain["sft"])["model.embed_tokens.weight"].shape[0]
    )
    assert (tmp_path / "ids" / "tokenizer.json").read_text() == (plain["ct-ext"] / "tokenizer.json").read_text()


def test_eval_model_by_id(plain, offline, tmp_path, hub):
    task = write_task(tmp_path / "tasks", MC_SPEC, MC_DOCS)
    by_id = evaluate("org/sft", [str(task)], progress=False)
    by_folder = evaluate(plain["sft"], [str(task)], progress=False)
    assert by_id.tasks["toy_mc"].metrics == by_folder.tasks["toy_mc"].metrics
    assert by_id.model == "org/sft" and by_id.model_source["commit"] == hub.commits["sft"]


def test_train_base_by_id(plain, offline, tmp_path, hub, capsys):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{k} + 1 =", "response": f" {k + 1}"}) + "\n" for k in range(8)))
    assert (
        main(
            [
                "train",
                "sft",
                "--base",
                "org/base",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "by-id"),
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--micro-batch-size",
                "2",
                "--lr",
                "3e-3",
                "--warmup",
                "0.1",
                "--seed",
                "0",
                "--no-progress",
            ]
        )
        == 0
    )
    by_folder = train_sft(plain["base"], data, tmp_path / "by-folder", options=fast_options(), progress=False)
    meta = json.loads((tmp_path / "by-id" / "langmerge_training.json").read_text())
    assert meta["base"] == f"org/base@{hub.commits['base']}"
    assert meta["final_loss"] == by_folder.final_loss
    _assert_same(tmp_path / "by-id", tmp_path / "by-folder")


def test_analyze_by_id(plain, offline):
    by_id = analyze(_recipe("org/base", "org/ct", "org/sft"), slacks=[0.0, 1.0], progress=False).to_dict()
    by_folder = analyze(
        _recipe(str(plain["base"]), str(plain["ct"]), str(plain["sft"])), slacks=[0.0, 1.0], progress=False
    ).to_dict()
    assert by_id["total"] == by_folder["total"] and by_id["by_tensor"] == by_folder["by_tensor"]
    assert training_tokens("org/ct") == 1234  # read from the model's langmerge_training.json, fetched with it


def test_tune_by_id(plain, offline, hub):
    def objective(model, tokenizer):
        return -float(model.model.layers[0].self_attn.q_proj.weight.detach().abs().sum())

    def space(ct):
        return {"parameters.slack": {"values": [0.0, 1.0]}, f"models[{ct}].parameters.density": {"values": [0.3, 0.7]}}

    by_id = tune(_recipe("org/base", "org/ct", "org/sft"), space("org/ct"), objective, progress=False)
    by_folder = tune(
        _recipe(str(plain["base"]), str(plain["ct"]), str(plain["sft"])), space(plain["ct"]), objective, progress=False
    )
    assert [t.score for t in by_id.trials] == [t.score for t in by_folder.trials]
    best = by_id.best_recipe()
    assert best["base_model"] == f"org/base@{hub.commits['base']}"  # the best recipe names the commits tuned
    assert [m["model"] for m in best["models"]] == [f"org/ct@{hub.commits['ct']}", f"org/sft@{hub.commits['sft']}"]


def test_study_given_models_by_id(offline, tmp_path, hub):
    write_inputs(tmp_path / "inputs")
    d = study_dict(tmp_path / "inputs", tmp_path / "out", base={"path": "org/base"})
    d["sft"]["path"] = "org/sft"
    d["languages"]["ny"]["budgets"] = [300]
    d["languages"]["ny"]["checkpoints"] = {"300": "org/ct"}
    study = load_study(write_study(tmp_path / "study.yaml", d))
    plan = build_plan(study)
    c = hub.commits
    assert plan.base.settings.model_dump() == {"hub": "org/base", "commit": c["base"]}
    assert plan.sft.settings.model_dump() == {"hub": "org/sft", "commit": c["sft"]}
    assert plan.ct_step("ny", 300).settings.model_dump() == {"hub": "org/ct", "commit": c["ct"]}
    ctx = Context(tmp_path / "cache", progress=False)
    record = run_step(plan.base, ctx)
    assert record.info["path"] == str(model_path(ctx, plan.base)) == str(resolve_model("org/base").folder)

    bad = dict(d, base={"path": "org/missing"})
    with pytest.raises(LangmergeError, match=r"base\.path: model org/missing: .*offline mode is on"):
        load_study(write_study(tmp_path / "bad.yaml", bad))


def test_lora_trained_on_a_hub_base_records_its_id_and_merges_on_it(offline, tmp_path, hub):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{k} + 2 =", "response": f" {k + 2}"}) + "\n" for k in range(8)))
    train_sft(
        "org/base",
        data,
        tmp_path / "adapter",
        options=fast_options(lora=LoraOptions(rank=2, alpha=4), lr=1e-2),
        progress=False,
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/base", hub.commits["base"])
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": "org/base",
        "dtype": "float32",
        "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}],
    }
    merge(recipe, tmp_path / "merged", progress=False)  # the recorded id is the base's: accepted
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["merge", "eval", "train"])
def test_output_inside_the_cache_repository_of_an_input_by_id_is_refused(offline, tmp_path, command, capsys):
    """An input named by Hub id is its cache repository: an output there is refused before any work."""
    repo = hub_cache_dir() / "models--org--base"
    assert repo.is_dir()
    before = sorted(str(p.relative_to(repo)) for p in repo.rglob("*"))
    out = repo / "merged"
    if command == "merge":
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(_recipe("org/base", "org/ct", "org/sft")))
        argv = ["merge", str(recipe), str(out), "--no-progress"]
    elif command == "eval":
        argv = ["eval", "org/base", "--tasks", "next_day_en", "--out", str(out), "--no-progress"]
    else:
        data = tmp_path / "sft.jsonl"
        data.write_text(json.dumps({"prompt": "1 + 1 =", "response": " 2"}) + "\n")
        argv = ["train", "sft", "--base", "org/base", "--data", str(data), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "langmerge: error:" in err and "models--org--base" in err and len(err.strip().splitlines()) == 1
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == before
