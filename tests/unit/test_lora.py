"""LoRA adapters on spans: real PEFT adapter files, compared with PEFT itself and with merged transformers weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from petalnode.compute import (
    LoraAdapter,
    active_adapter,
    attach_adapters,
    load_block_span,
    load_client_head,
    load_lora_adapter,
    load_model_info,
    span_adapters,
)
from petalnode.errors import ComputeError, ConfigError, ModelNotFoundError
from tests.tiny_models import build_lora_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
# The PEFT options each case exercises; every one changes outputs, so a wrong scaling or selection cannot pass.
CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=TARGETS),
    "rslora": dict(r=8, lora_alpha=16, target_modules=TARGETS, use_rslora=True),
    "regex_patterns": dict(r=4, lora_alpha=8, target_modules=r".*\.(k_proj|o_proj|up_proj)",
                           rank_pattern={"o_proj": 2}, alpha_pattern={"k_proj": 3}),
    "some_layers": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "q_proj"], layers_to_transform=[1, 4]),
}
SPANS = [(0, 2), (2, 6)]
PROMPT = torch.tensor([[5, 17, 42, 8, 99, 3, 250, 7]])
FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {case: build_lora_adapter(root / case, tiny_model_dir, seed=i, **kwargs)
            for i, (case, kwargs) in enumerate(CASES.items())}


def _spans_with(model_dir: Path, adapter_dir: Path | None, spans=SPANS):
    info = load_model_info(model_dir)
    out = []
    for start, end in spans:
        span = load_block_span(info, start, end)
        if adapter_dir is not None:
            attach_adapters(span, [load_lora_adapter(adapter_dir, info, start, end)])
        out.append(span)
    return info, out


def _run(spans, hidden: torch.Tensor, adapter: str | None) -> list[torch.Tensor]:
    """The output of every span, run one after the other."""
    positions = torch.arange(hidden.shape[1])[None]
    outputs = []
    with active_adapter(adapter):
        for span in spans:
            hidden = span.forward_span(hidden, None, positions)
            outputs.append(hidden)
    return outputs


@pytest.mark.parametrize("case", list(CASES))
def test_spans_with_adapter_match_peft_and_merged_weights(case: str, tiny_model_dir: Path,
                                                          adapters: dict[str, Path], tmp_path: Path) -> None:
    adapter_dir = adapters[case]
    info, spans = _spans_with(tiny_model_dir, adapter_dir)
    head = load_client_head(info)
    with torch.inference_mode():
        outputs = _run(spans, head.embed(PROMPT), adapter_dir.name)
        logits = head.logits(outputs[-1])
        base_logits = head.logits(_run(spans, head.embed(PROMPT), None)[-1])

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    peft_model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.inference_mode():
        ref = peft_model(PROMPT, output_hidden_states=True)
    # hidden_states[k] is the input of layer k: the output of the span that ends at k.
    hidden_diff = (outputs[0] - ref.hidden_states[SPANS[0][1]]).abs().max().item()
    peft_diff = (logits - ref.logits).abs().max().item()

    merged_dir = tmp_path / "merged"
    peft_model.merge_and_unload().save_pretrained(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32, attn_implementation="sdpa")
    with torch.inference_mode():
        merged_diff = (logits - merged(PROMPT).logits).abs().max().item()
    print(f"\n{case}: max |diff| vs PEFT hidden {hidden_diff:.2e}, logits {peft_diff:.2e}; "
          f"vs merged transformers logits {merged_diff:.2e}")
    assert (logits - base_logits).abs().max().item() > 1e-2, "the adapter must change the outputs"
    assert hidden_diff < FP32_TOL and peft_diff < FP32_TOL
    assert merged_diff < FP32_TOL


def test_without_an_active_adapter_the_span_is_bit_identical(tiny_model_dir: Path,
                                                             adapters: dict[str, Path]) -> None:
    _, plain = _spans_with(tiny_model_dir, None, spans=[(1, 5)])
    _, adapted = _spans_with(tiny_model_dir, adapters["plain"], spans=[(1, 5)])
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = _run(plain, hidden, None)[0]
        after = _run(adapted, hidden, None)[0]
        with_adapter = _run(adapted, hidden, "plain")[0]
    assert torch.equal(before, after)
    assert not torch.allclose(before, with_adapter, atol=1e-3)
    # Adapter matrices are not parameters: nothing to train here, and the span's parameters are unchanged.
    assert [n for n, _ in adapted[0].named_parameters()] == [
        n.replace("q_proj.", "q_proj.base_layer.").replace("v_proj.", "v_proj.base_layer.")
        .replace("down_proj.", "down_proj.base_layer.") for n, _ in plain[0].named_parameters()]


def test_subspan_views_serve_the_adapter(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    _, (span,) = _spans_with(tiny_model_dir, adapters["plain"], spans=[(1, 5)])
    view = span.subspan(2, 4)
    assert span_adapters(span) == span_adapters(view) == {"plain"}
    _, (fresh,) = _spans_with(tiny_model_dir, adapters["plain"], spans=[(2, 4)])
    hidden = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert torch.equal(_run([view], hidden, "plain")[0], _run([fresh], hidden, "plain")[0])


def test_only_the_spans_tensors_are_read(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    info = load_model_info(tiny_model_dir)
    adapter = load_lora_adapter(adapters["plain"], info, 2, 4)
    with safe_open(str(adapters["plain"] / "adapter_model.safetensors"), framework="pt") as handle:
        in_file = list(handle.keys())
    assert len(in_file) == 2 * len(TARGETS) * 6
    assert adapter.tensors_read == 2 * len(TARGETS) * 2 == 2 * len(adapter.weights)
    assert {block for block, _ in adapter.weights} == {2, 3}
    assert adapter.target_modules == {"self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"}
    assert (adapter.name, adapter.rank, adapter.alpha, adapter.start, adapter.end) == ("plain", 4, 8.0, 2, 4)


def test_gradients_reach_the_input_as_through_merged_weights(tiny_model_dir: Path, adapters: dict[str, Path],
                                                             tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapters["rslora"]).merge_and_unload().save_pretrained(tmp_path / "merged")
    shutil.copy(tiny_model_dir / "tokenizer.json", tmp_path / "merged")
    _, (merged,) = _spans_with(tmp_path / "merged", None, spans=[(1, 4)])
    _, (adapted,) = _spans_with(tiny_model_dir, adapters["rslora"], spans=[(1, 4)])
    hidden = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(4))

    def grad(span, adapter):
        x = hidden.clone().requires_grad_(True)
        (_run([span], x, adapter)[0] * weights).sum().backward()
        return x.grad

    ours, reference, base_grad = grad(adapted, "rslora"), grad(merged, None), grad(adapted, None)
    assert (ours - reference).abs().max().item() < FP32_TOL
    assert (ours - base_grad).abs().max().item() > 1e-3
    assert all(p.grad is None for p in adapted.parameters())


def test_an_adapter_the_span_lacks_is_an_error_not_the_base_model(tiny_model_dir: Path,
                                                                  adapters: dict[str, Path]) -> None:
    _, (span,) = _spans_with(tiny_model_dir, adapters["plain"], spans=[(0, 2)])
    hidden = torch.randn(1, 3, 64)
    with pytest.raises(ComputeError, match="adapter 'other' is not loaded on these blocks"):
        _run([span], hidden, "other")
    with pytest.raises(ConfigError, match="adapter name"), active_adapter("bad name!"):
        pass
    # The name is thread-local and restored after the block, even after an error.
    with active_adapter("plain"):
        with pytest.raises(ComputeError), active_adapter("other"):
            _run([span], hidden, "other")
        assert torch.equal(span.forward_span(hidden, None, torch.arange(3)[None]), _run([span], hidden, "plain")[0])


def test_attach_checks_blocks_and_names(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    info, (span,) = _spans_with(tiny_model_dir, None, spans=[(0, 3)])
    assert span_adapters(span) == span_adapters(torch.nn.Module()) == frozenset()  # stand-in spans have no layers
    with pytest.raises(ConfigError, match="loaded for blocks 1:3, not 0:3"):
        attach_adapters(span, [load_lora_adapter(adapters["plain"], info, 1, 3)])
    first = load_lora_adapter(adapters["plain"], info, 0, 3)
    renamed = load_lora_adapter(adapters["rslora"], info, 0, 3, name="team/second")
    attach_adapters(span, [first, renamed])
    assert span_adapters(span) == {"plain", "team/second"}
    with pytest.raises(ConfigError, match="used twice"):
        attach_adapters(span, [load_lora_adapter(adapters["plain"], info, 0, 3)])
    assert isinstance(first, LoraAdapter) and span_adapters(span) == {"plain", "team/second"}


# -- bad adapters -----------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(directory: Path, **changes: object) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def test_pickled_weights_are_refused(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(adapters["plain"], tmp_path / "pickled")
    (bad / "adapter_model.safetensors").rename(bad / "adapter_model.bin")
    with pytest.raises(ConfigError, match=r"adapter_model\.bin, a pickle file that petalnode never loads"):
        load_lora_adapter(bad, load_model_info(tiny_model_dir), 0, 2)


def test_missing_config_is_refused(tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = _copy(adapters["plain"], tmp_path / "noconfig")
    (bad / "adapter_config.json").unlink()
    with pytest.raises(ConfigError, match=r"no adapter_config\.json"):
        load_lora_adapter(bad, load_model_info(tiny_model_dir), 0, 2)


def test_an_adapter_for_another_hidden_size_is_refused(tiny_model_factory, tmp_path: Path) -> None:
    narrow = tiny_model_factory(hidden_size=32)
    adapter = build_lora_adapter(tmp_path / "narrow", narrow, **CASES["plain"])
    wide = tiny_model_factory(hidden_size=48)
    with pytest.raises(ConfigError, match=r"does not fit this model at block 0 .*made for another model"):
        load_lora_adapter(adapter, load_model_info(wide), 0, 2)


def test_dora_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    dora = build_lora_adapter(tmp_path / "dora", tiny_model_dir, r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        load_lora_adapter(dora, load_model_info(tiny_model_dir), 0, 2)


@pytest.mark.parametrize(("changes", "match"), [
    ({"peft_type": "IA3"}, "only LORA adapters"),
    ({"bias": "all"}, "only bias='none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj"]}, "target_modules .* do not select"),
    ({"target_modules": ["q_proj", "v_proj", "down_proj", "k_proj"]}, "no lora_A/lora_B weights"),
    ({"r": 8}, "r=8"),
    ({"r": "4"}, "r must be a positive integer"),
])
def test_configs_that_do_not_match_their_weights_are_refused(changes: dict, match: str, tiny_model_dir: Path,
                                                             adapters: dict[str, Path], tmp_path: Path) -> None:
    bad = _edit_config(_copy(adapters["plain"], tmp_path / "bad"), **changes)
    with pytest.raises(ConfigError, match=match):
        load_lora_adapter(bad, load_model_info(tiny_model_dir), 0, 2)


def test_lora_outside_the_blocks_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    head = build_lora_adapter(tmp_path / "head", tiny_model_dir, r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ConfigError, match=r"weights for lm_head.*, which is not in a transformer block"):
        load_lora_adapter(head, load_model_info(tiny_model_dir), 0, 2)


def test_unknown_paths_and_hub_ids_not_in_the_cache(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    info = load_model_info(tiny_model_dir)
    with pytest.raises(ModelNotFoundError, match="'someone/no-such-lora' is not available on this machine"):
        load_lora_adapter("someone/no-such-lora", info, 0, 2)
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_lora_adapter(tmp_path / "missing", info, 0, 2)
    with pytest.raises(ConfigError, match="adapter name"):
        load_lora_adapter(tiny_model_dir, info, 0, 2, name="spaces are not allowed")


def test_a_hub_id_in_the_local_cache_loads_under_its_id(tiny_model_dir: Path, adapters: dict[str, Path],
                                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # The Hugging Face cache layout: models--OWNER--REPO/{refs/main, snapshots/COMMIT/...}.
    repo = tmp_path / "hub" / "models--someone--tiny-lora"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(adapters["plain"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load_lora_adapter("someone/tiny-lora", load_model_info(tiny_model_dir), 0, 2)
    assert adapter.name == "someone/tiny-lora" and len(adapter.weights) == 2 * len(TARGETS)
