"""Every pruning method on encoders (tiny random BERT, BERT-MLM and DistilBERT), through the same
options as on decoders: exact sparsity and bounded damage to the sentence embeddings, width and
depth round trips through stage checkpoints and the hf export, and a recipe through the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from transformers import AutoModel, AutoModelForMaskedLM

from pocketlm import PocketError
from pocketlm.builtins.export_hf import export_hf
from pocketlm.checkpoint import load_checkpoint, save_checkpoint
from pocketlm.cli import main
from pocketlm.modules import decoder_layers, get_module
from pocketlm.plugins import get_plugins
from pocketlm.sentence import embed
from pocketlm.testing import make_context
from pocketlm.testing.models import save_tiny_model, tiny_model, tiny_tokenizer, tiny_windows
from pocketlm.weights import get_mask, linear_shape, linear_weight, masks, set_linear_weight

FAMILIES = ["bert", "bert-mlm", "distilbert"]
SENTENCES = ["The cat sat on the mat near the door.", "A storm hit the coast of the island in 1998.",
             "He played football for the national team.", "The album was released to mixed reviews.",
             "Rivers flow from the mountains into the sea.", "She studied physics at the university.",
             "The bridge was built in the nineteenth century.", "Prices rose sharply after the war."]
# Half the weights of every layer linear gone: the methods keep the embeddings above this cosine
# (0.955 to 0.997 measured on seeds 0-2), a random half mask falls well below it (0.76 to 0.84).
COSINE_BOUND = 0.93


def run(method, model, windows=None, **options):
    spec = get_plugins().methods[method]
    context = make_context(tiny_windows(8, 32) if windows is None else windows, tokenizer=tiny_tokenizer(encoder=True))
    return spec.compress(model, spec.options(**options), context)


def arch_of(model):
    return make_context().architecture(model)


def targeted(model):
    arch = arch_of(model)
    return {f"{arch.layers}.{i}.{n}": get_module(layer, n)
            for i, layer in enumerate(decoder_layers(model, arch)) for g in arch.sequential for n in g}


def embeddings(model):
    return embed(model, tiny_tokenizer(encoder=True), SENTENCES)


def cosine(a, b):
    return F.cosine_similarity(a, b, dim=-1).mean().item()


def transformers_class(model):
    return AutoModelForMaskedLM if arch_of(model).lm_head else AutoModel


def exported(model, folder):
    export_hf(model, folder, None, None)
    return transformers_class(model).from_pretrained(folder, dtype=torch.float32).eval()


def checkpointed(model, folder):
    save_checkpoint(model, tiny_tokenizer(encoder=True), folder)
    return load_checkpoint(folder).model


# ---------------------------------------------------------------------------- unstructured


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_half_sparsity_is_exact_and_the_embeddings_stay_close(family, method):
    dense = tiny_model(family)
    model = tiny_model(family)
    run(method, model, sparsity=0.5)
    modules = targeted(model)
    assert len(modules) == 12 and set(masks(model)) == set(modules)  # 6 linears x 2 layers, the head untouched
    for name, module in modules.items():
        weight, mask = linear_weight(module), get_mask(module)
        assert int((~mask).sum()) == weight.numel() // 2, name
        assert (weight[~mask] == 0).all() and int((weight == 0).sum()) == weight.numel() // 2, name
    assert cosine(embeddings(model), embeddings(dense)) > COSINE_BOUND


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_random_half_mask_falls_below_the_cosine_bound(family):
    """The bound above tells informed pruning from chance at the same sparsity."""
    dense = tiny_model(family)
    model = tiny_model(family)
    generator = torch.Generator().manual_seed(0)
    for module in targeted(model).values():
        weight = linear_weight(module)
        set_linear_weight(module, weight * (torch.rand(weight.shape, generator=generator) < 0.5))
    assert cosine(embeddings(model), embeddings(dense)) < COSINE_BOUND - 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_reconstruction_sparsegpt_beats_wanda_beats_magnitude(family):
    """‖WX − ŴX‖ of the first layer's q/k/v (which see the same dense input under every method),
    on a tiny encoder whose LayerNorms give a few channels 20x the scale, as trained ones do."""
    windows = tiny_windows(8, 64)
    dense = tiny_model(family, outliers=True)
    arch = arch_of(dense)
    layer = decoder_layers(dense, arch)[0]
    inputs = {}
    hooks = [get_module(layer, n).register_forward_hook(lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0]))
             for n in arch.sequential[0]]
    with torch.no_grad():
        dense(input_ids=windows)
    for hook in hooks:
        hook.remove()
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = tiny_model(family, outliers=True)
        run(method, model, windows, sparsity=0.5)
        pruned = decoder_layers(model, arch)[0]
        total = 0.0
        for name in arch.sequential[0]:
            x = torch.cat(inputs[name]).reshape(-1, inputs[name][0].shape[-1])
            w, new = linear_weight(get_module(layer, name)), linear_weight(get_module(pruned, name))
            total += ((x @ w.t() - x @ new.t()).norm() ** 2).item()
        errors[method] = total**0.5
    assert errors["sparsegpt"] < 0.95 * errors["wanda"] and errors["wanda"] < 0.5 * errors["magnitude"], errors


# ----------------------------------------------------------------------------------- width


def zero_mlp_channels(model, channels):
    """Make intermediate channels ``channels`` exactly zero in every layer (rows and bias of the
    MLP's input linear; GELU(0) = 0, so they add nothing)."""
    arch = arch_of(model)
    for layer in decoder_layers(model, arch):
        module = get_module(layer, arch.mlp_in[0])
        weight = linear_weight(module).clone()
        weight[channels] = 0
        set_linear_weight(module, weight)
        module.bias.data[channels] = 0


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_silent_mlp_channels_keeps_embeddings_through_checkpoint_and_export(family, tmp_path):
    model = tiny_model(family)
    zero_mlp_channels(model, torch.tensor([3, 17, 40, 41, 90, 127]))
    before = embeddings(model)
    run("prune-width", model, intermediate_size=122)
    arch = arch_of(model)
    for layer in decoder_layers(model, arch):
        assert linear_shape(get_module(layer, arch.mlp_in[0])) == (122, 64)
        assert linear_shape(get_module(layer, arch.mlp_out)) == (64, 122)
    assert getattr(model.config, arch.intermediate_size_key) == 122
    torch.testing.assert_close(embeddings(model), before, atol=1e-5, rtol=1e-5)
    reloaded = checkpointed(model, tmp_path / "stage")
    assert json.loads((tmp_path / "stage" / "config.json").read_text())[arch.intermediate_size_key] == 122
    torch.testing.assert_close(embeddings(reloaded), before, atol=1e-5, rtol=1e-5)
    loaded = exported(model, tmp_path / "export")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(embeddings(loaded), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_mlp_ratio_shrinks_the_encoder_and_it_still_embeds_alike(family, tmp_path):
    dense = tiny_model(family)
    model = tiny_model(family)
    before = sum(p.numel() for p in model.parameters())
    run("prune-width", model, mlp_ratio=0.25)
    # Each of 2 layers loses 32 of 128 channels: 32 rows (+ bias) of the input, 32 columns of the output.
    assert before - sum(p.numel() for p in model.parameters()) == 2 * 32 * (64 + 1 + 64)
    assert cosine(embeddings(model), embeddings(dense)) > COSINE_BOUND
    loaded = exported(model, tmp_path)
    assert getattr(loaded.config, arch_of(model).intermediate_size_key) == 96
    torch.testing.assert_close(embeddings(loaded), embeddings(model), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_head_pruning_on_encoders_is_refused_with_the_reason(family):
    """transformers derives BERT's and DistilBERT's head width from hidden_size / heads (no
    head_dim, no pruned_heads), so a head-pruned model could not load; the method says so."""
    model = tiny_model(family)
    with pytest.raises(PocketError, match=r"head pruning is not possible.*would load as \(64, 64\)") as caught:
        run("prune-width", model, head_ratio=0.5)
    assert caught.value.field == "head_ratio" and "mlp_ratio" in caught.value.fix
    assert not masks(model) and linear_shape(get_module(decoder_layers(model, arch_of(model))[0],
                                                        arch_of(model).attention["q"])) == (64, 64)


# ----------------------------------------------------------------------------------- depth


def make_identity_layer(model, index):
    """Zero the output projections of layer ``index``: each post-norm sublayer then returns the
    LayerNorm of its input, which is its (already normalized) input."""
    arch = arch_of(model)
    layer = decoder_layers(model, arch)[index]
    for name in (arch.attention["o"], arch.mlp_out):
        module = get_module(layer, name)
        module.weight.data.zero_()
        module.bias.data.zero_()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("metric", ["block-influence", "embedding"])
def test_depth_removes_the_encoder_layer_that_does_nothing(family, metric, tmp_path):
    from pocketlm_prune.depth import DepthOptions, DepthPruner

    model = tiny_model(family, layers=3)
    make_identity_layer(model, 1)
    before = embeddings(model)
    pruner = DepthPruner(DepthOptions(layers=1, metric=metric), make_context(tiny_windows(8, 32)))
    pruner(model)
    assert pruner.removed == [1] and pruner.scores[1] < 1e-3 < min(pruner.scores[0], pruner.scores[2])
    arch = arch_of(model)
    assert len(decoder_layers(model, arch)) == 2 and getattr(model.config, arch.layer_count_key) == 2
    torch.testing.assert_close(embeddings(model), before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(embeddings(checkpointed(model, tmp_path)), before, atol=1e-4, rtol=1e-4)


def test_perplexity_metric_is_refused_on_an_encoder_and_embedding_on_a_decoder():
    with pytest.raises(PocketError, match="needs next-token predictions") as caught:
        run("prune-depth", tiny_model("bert"), metric="perplexity")
    assert caught.value.field == "metric" and "embedding" in caught.value.fix
    with pytest.raises(PocketError, match="sentence embedding of an encoder"):
        run("prune-depth", tiny_model("llama"), metric="embedding")


@pytest.mark.parametrize("family,options,kept", [
    ("bert", {"keep": "every-other"}, [0, 2, 4]),
    ("distilbert", {"keep": "every-other"}, [0, 2, 4]),
    ("bert-mlm", {"drop": [5, 0]}, [1, 2, 3, 4]),
    ("distilbert", {"drop": [1, 3, 5]}, [0, 2, 4]),
])
def test_layers_chosen_by_hand_are_removed_and_the_model_reloads(family, options, kept, tmp_path):
    original = tiny_model(family, layers=6)
    weights = [linear_weight(get_module(layer, arch_of(original).mlp_out)).clone()
               for layer in decoder_layers(original, arch_of(original))]
    model = tiny_model(family, layers=6)
    run("prune-depth", model, windows=torch.empty(0, 0), **options)  # no calibration is read
    arch = arch_of(model)
    layers = decoder_layers(model, arch)
    assert len(layers) == len(kept)
    assert all(torch.equal(linear_weight(get_module(layer, arch.mlp_out)), weights[i]) for layer, i in zip(layers, kept))
    assert getattr(model.config, arch.layer_count_key) == len(kept)
    container = get_module(model, arch.layers.rpartition(".")[0])
    assert getattr(container, arch.layer_count_key, len(kept)) == len(kept)  # DistilBERT's Transformer.n_layers
    reloaded = checkpointed(model, tmp_path / "stage")
    assert json.loads((tmp_path / "stage" / "config.json").read_text())[arch.layer_count_key] == len(kept)
    torch.testing.assert_close(embeddings(reloaded), embeddings(model), atol=1e-5, rtol=1e-5)
    assert len(decoder_layers(exported(model, tmp_path / "export"), arch)) == len(kept)


@pytest.mark.parametrize("options,message", [
    ({"drop": [1], "keep": "every-other"}, "give drop or keep, not both"),
    ({"drop": [1], "layers": 2}, "layers score layers, drop/keep choose them by hand"),
    ({"keep": "every-other", "metric": "embedding"}, "metric score layers"),
    ({"drop": []}, "drop names no layer"),
    ({"drop": [-1]}, "zero-based"),
    ({"drop": [2, 2]}, "names a layer twice"),
    ({"keep": "every-third"}, "every-other"),
])
def test_depth_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        get_plugins().methods["prune-depth"].options(**options)


@pytest.mark.parametrize("options,message", [
    ({"drop": [1, 6]}, r"drop names layers \[6\], but the model has 6 layers \(0 to 5\)"),
    ({"drop": [0, 1, 2, 3, 4, 5]}, "at least one must stay"),
])
def test_hand_chosen_layers_are_checked_against_the_model(options, message):
    model = tiny_model("bert", layers=6)
    with pytest.raises(PocketError, match=message) as caught:
        run("prune-depth", model, **options)
    assert caught.value.field == "drop" and len(decoder_layers(model, arch_of(model))) == 6


def test_depth_effect_estimates():
    options = get_plugins().methods["prune-depth"].options
    effect = get_plugins().methods["prune-depth"].effect
    assert effect(options(keep="every-other")).params_removed == 0.5
    assert effect(options(drop=[1, 3, 5])).params_removed == effect(options(layers=3)).params_removed > 0


# ------------------------------------------------------------------------------------- CLI


RECIPE = """[model]
source = "tiny"
[calibration]
samples = 4
seq_len = 32
[[stages]]
method = "prune-depth"
keep = "every-other"
[[stages]]
method = "wanda"
sparsity = 0.5
[evaluate]
metrics = ["embedding-fidelity"]
[evaluate.embedding-fidelity]
sentences = 16
[export]
format = "hf"
"""


def test_recipe_every_other_layer_then_wanda_through_the_cli(tmp_path, monkeypatch):
    save_tiny_model(tmp_path / "tiny", "bert", layers=4)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    result = CliRunner().invoke(main, ["run", "recipe.toml"])
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())
    assert "prune-depth (keep = every-other): removed layers [1, 3]; 4 -> 2 layers" in output
    assert "wanda: pruned to 50%" in output
    report = json.loads((tmp_path / "runs" / "recipe" / "report.json").read_text())
    assert report["before"]["embedding_fidelity"] == pytest.approx(1.0)
    assert 0 < report["after"]["embedding_fidelity"] < 1
    model = AutoModel.from_pretrained(tmp_path / "runs" / "recipe" / "export", dtype=torch.float32)
    assert model.config.num_hidden_layers == 2 and len(model.encoder.layer) == 2
    for name, module in targeted(model).items():
        assert (module.weight == 0).float().mean().item() == 0.5, name


def test_prune_width_refuses_an_architecture_without_a_plain_mlp():
    """MobileBERT's table names no mlp_in/mlp_out (bottlenecks, stacked feed-forward networks)."""
    from pocketlm_prune.width import WidthOptions, compress as width_compress

    with pytest.raises(PocketError, match="names no MLP input and output linears") as error:
        width_compress(tiny_model("mobilebert"), WidthOptions(mlp_ratio=0.25), make_context(tiny_windows(4, 16)))
    assert "prune-depth" in error.value.fix
