"""Adapter files in peft's format, both ways, and every way a file can fail to fit."""
import copy
import json
import os

import pytest
import torch

import peftops
from peftops import LoraConfig
from tiny_models import (ALPHA_PATTERN, BUILDERS, RANK_PATTERN, assert_close, input_ids, output, patched_pair,
                         peft_at_least, peft_lora_config, randomize_lora, tiny_gpt2, tiny_llama)

peft = pytest.importorskip("peft")

CONFIGS = [LoraConfig(r=4, alpha=8), LoraConfig(r=3, alpha=6, use_rslora=True, bias="lora_only",
                                                target_modules=r".*\.(q_proj|down_proj|c_attn|c_fc|query|dense)"),
           LoraConfig(r=2, alpha=4, bias="all", target_modules=["v_proj", "up_proj"]),
           LoraConfig(r=4, alpha=8, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN),
           LoraConfig(r=2, alpha=4, target_modules="all-linear", exclude_modules=["k_proj", "mlp.c_proj"]),
           LoraConfig(r=2, alpha=4, layers_to_transform=[1], layers_pattern=["layers", "h"])]


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("config", CONFIGS,
                         ids=["plain", "rslora-lora_only-regex", "all", "patterns", "all-linear-excluded", "layer-1"])
def test_peft_loads_what_we_save(tmp_path, family, config):
    if family == "gpt2" and isinstance(config.target_modules, list):
        config = LoraConfig(r=config.r, alpha=config.alpha, bias=config.bias, target_modules=["c_proj", "c_fc"])
    base = BUILDERS[family]()
    fresh = copy.deepcopy(base)
    ours = peftops.patch(base, config)
    randomize_lora(ours)
    with torch.no_grad():  # a trained bias must travel with the adapter
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)
    peftops.save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path)
    ids = input_ids()
    assert_close(output(loaded, ids), output(ours, ids), what="peft-loaded")

    # Same keys and shapes as peft's own save_pretrained writes for this config.
    ref = peft.get_peft_model(BUILDERS[family](), peft_lora_config(config, ours))
    ref.save_pretrained(tmp_path / "peft")
    mine, theirs = peftops.io.read_weights(str(tmp_path)), peftops.io.read_weights(str(tmp_path / "peft"))
    if config.bias == "lora_only" and not peft_at_least((0, 21)):  # peft's files then left out these biases
        mine = {k: v for k, v in mine.items() if not k.endswith("base_layer.bias")}
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in theirs.items()}


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("config", [LoraConfig(r=4, alpha=8, bias="lora_only"),
                                    LoraConfig(r=4, alpha=8, rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN)],
                         ids=["lora_only", "patterns"])
def test_we_load_what_peft_saves(tmp_path, family, config):
    _, ref = patched_pair(BUILDERS[family], config, seed=5)
    with torch.no_grad():  # trained biases
        for n, p in ref.named_parameters():
            if n.endswith("base_layer.bias"):
                p.add_(0.5)
    ref.save_pretrained(tmp_path)
    ours = peftops.patch(BUILDERS[family](), config)
    ids = input_ids()
    if family == "llama" or config.bias == "none":  # no biases
        assert peftops.load_adapter(ours, str(tmp_path)) is ours
    elif peft_at_least((0, 21)):
        assert peftops.load_adapter(ours, str(tmp_path)) is ours
        assert_close(output(ours, ids), output(ref, ids), what="loaded from peft")
    else:  # peft's file has no biases: the model keeps its own, as when peft loads that file
        with pytest.warns(UserWarning, match="holds no biases"):
            peftops.load_adapter(ours, str(tmp_path))
    assert_close(output(ours, ids), output(peft.PeftModel.from_pretrained(BUILDERS[family](), tmp_path), ids),
                 what="loaded by peft and by peftops")


def test_own_round_trip_and_legacy_bin(tmp_path):
    config = LoraConfig(r=4, alpha=8)
    ours = peftops.patch(tiny_llama(), config)
    randomize_lora(ours)
    peftops.save_adapter(ours, str(tmp_path / "a"))
    other = peftops.patch(tiny_llama(), config)
    peftops.load_adapter(other, str(tmp_path / "a"))
    ids = input_ids()
    assert torch.equal(output(other, ids), output(ours, ids))
    # A legacy adapter_model.bin of plain tensors loads through torch.load(weights_only=True).
    os.makedirs(tmp_path / "b")
    torch.save(peftops.io.read_weights(str(tmp_path / "a")), tmp_path / "b" / "adapter_model.bin")
    third = peftops.patch(tiny_llama(), config)
    peftops.load_adapter(third, str(tmp_path / "b"))
    assert torch.equal(output(third, ids), output(ours, ids))


class _RunsCode:
    def __reduce__(self):
        return (os.makedirs, ("SHOULD_NOT_EXIST",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = peftops.patch(tiny_llama(), LoraConfig(r=4))
    before = state(model)
    torch.save({"x": _RunsCode()}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="would run code"):
        peftops.load_adapter(model, str(tmp_path))
    assert not os.path.exists(tmp_path / "SHOULD_NOT_EXIST")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _corrupt(tmp_path, edit):
    source = peftops.patch(tiny_llama(), LoraConfig(r=4, alpha=8))
    randomize_lora(source)
    peftops.save_adapter(source, str(tmp_path))
    from safetensors.torch import save_file
    tensors = peftops.io.read_weights(str(tmp_path))
    edit(tensors)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))


K = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.pop(K), K), (lambda t: t.update(extra=torch.zeros(1)), "extra"),
    (lambda t: t.update({K: torch.zeros(4, 31)}), "(4, 31)"),
])
def test_mismatched_tensors_name_the_keys_and_leave_the_model_unchanged(tmp_path, edit, named):
    _corrupt(tmp_path, edit)
    model = peftops.patch(tiny_llama(), LoraConfig(r=4, alpha=8))
    before = state(model)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        peftops.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("config, named", [
    (LoraConfig(r=2, alpha=8), "file r=4 scaling=2, model r=2 scaling=4"),
    (LoraConfig(r=4, alpha=16), "file r=4 scaling=2, model r=4 scaling=4"),
    (LoraConfig(r=4, alpha=8, use_rslora=True), "use_rslora"),
    (LoraConfig(r=4, alpha=8, alpha_pattern={"q_proj": 16}), r"layers\.0\.self_attn\.q_proj: file r=4 scaling=2, "
                                                               "model r=4 scaling=4"),
    (LoraConfig(r=4, alpha=8, rank_pattern={"layers.1.self_attn.v_proj": 2}), "v_proj: file r=4 scaling=2, model r=2"),
])
def test_other_config_is_refused(tmp_path, config, named):
    source = peftops.patch(tiny_llama(), LoraConfig(r=4, alpha=8))
    peftops.save_adapter(source, str(tmp_path))
    model = peftops.patch(tiny_llama(), config)
    before = state(model)
    with pytest.raises(ValueError, match=named):
        peftops.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overlapping_patterns_keep_their_order_in_the_file(tmp_path):
    # the first matching pattern wins, so the order is part of the adapter: the file keeps it (peft's writer sorts)
    config = LoraConfig(r=4, alpha=8, rank_pattern={"q_proj": 6, r"layers\.0\..*": 2},
                        alpha_pattern={"v_proj": 16, r"layers\.1\..*": 4})
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    ours = peftops.patch(base, config)
    randomize_lora(ours)
    peftops.save_adapter(ours, str(tmp_path))
    with open(tmp_path / "adapter_config.json") as f:
        saved = json.load(f)
    assert list(saved["rank_pattern"]) == ["q_proj", r"layers\.0\..*"]
    assert list(saved) == sorted(saved)
    ids = input_ids()
    assert_close(output(peft.PeftModel.from_pretrained(fresh, tmp_path), ids), output(ours, ids), what="peft-loaded")
    # patterns in the other order give layer 0's q_proj rank 2: refused before any tensor is read
    swapped = LoraConfig(r=4, alpha=8, rank_pattern={r"layers\.0\..*": 2, "q_proj": 6},
                         alpha_pattern=config.alpha_pattern)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj: file r=6 scaling=1\.33333, model r=2"):
        peftops.load_adapter(peftops.patch(tiny_llama(), swapped), str(tmp_path))


def test_other_rank_without_config_file_is_caught_by_shapes(tmp_path):
    source = peftops.patch(tiny_llama(), LoraConfig(r=4))
    peftops.save_adapter(source, str(tmp_path))
    os.remove(tmp_path / "adapter_config.json")
    with pytest.raises(ValueError, match="wrong shapes"):
        peftops.load_adapter(peftops.patch(tiny_llama(), LoraConfig(r=8)), str(tmp_path))


def test_io_errors(tmp_path):
    with pytest.raises(ValueError, match="not patched"):
        peftops.save_adapter(tiny_llama(), str(tmp_path))
    with pytest.raises(ValueError, match="not patched"):
        peftops.load_adapter(tiny_llama(), str(tmp_path))
    with pytest.raises(FileNotFoundError, match="adapter_model"):
        peftops.load_adapter(peftops.patch(tiny_llama(), LoraConfig()), str(tmp_path))
    with open(tmp_path / "adapter_config.json", "w") as f:
        json.dump({"peft_type": "IA3"}, f)
    with pytest.raises(ValueError, match="IA3"):
        peftops.load_adapter(peftops.patch(tiny_llama(), LoraConfig()), str(tmp_path))


def test_backend_mode_delegates_to_peft(tmp_path):
    ref = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True))
    randomize_lora(ref)
    peftops.patch(ref)
    peftops.save_adapter(ref, str(tmp_path / "a"))
    target = peftops.patch(peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True)))
    peftops.load_adapter(target, str(tmp_path / "a"))
    ids = input_ids()
    assert torch.equal(output(target, ids), output(ref, ids))
    # A rank-2 peft model refuses the rank-4 file and keeps its weights.
    small = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=2, lora_alpha=8, fan_in_fan_out=True))
    before = state(small)
    with pytest.raises(ValueError, match="file r=4 scaling=2, model r=2 scaling=4"):
        peftops.load_adapter(small, str(tmp_path / "a"))
    # as is a model whose alpha_pattern differs (same shapes, another scale for those layers)
    patterned = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True,
                                                                  alpha_pattern={"c_attn": 32}))
    with pytest.raises(ValueError, match="c_attn: file r=4 scaling=2, model r=4 scaling=8"):
        peftops.load_adapter(patterned, str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "adapter_config.json")
    with pytest.raises(ValueError, match="wrong shapes"):
        peftops.load_adapter(small, str(tmp_path / "a"))
    assert all(torch.equal(v, before[k]) for k, v in small.state_dict().items())


def test_lora_only_biases_load_into_a_peft_model(tmp_path):
    # the trained biases of bias="lora_only" travel into a peft model too (peft before 0.21 leaves them out of its
    # state dict, but loads them)
    config = LoraConfig(r=4, alpha=8, bias="lora_only", target_modules=["c_attn", "c_fc"])
    ours = peftops.patch(tiny_gpt2(), config)
    randomize_lora(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.5)
    peftops.save_adapter(ours, str(tmp_path))
    target = peft.get_peft_model(tiny_gpt2(), peft_lora_config(config, ours))
    peftops.load_adapter(target, str(tmp_path))
    ids = input_ids()
    assert_close(output(target, ids), output(ours, ids), what="peft model loaded by peftops")


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])
def test_peft_bias_all_file_of_a_classification_model_loads(tmp_path, task_type):
    # bias="all" saves the head's bias as an adapter bias without its weight (no task), or beside the whole head
    # and, by the same rule, copies inside peft's head wrapper (SEQ_CLS): peft loads both, and so does peftops
    import transformers
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, num_labels=3)

    def build():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(copy.deepcopy(config)).eval()

    ref = peft.get_peft_model(build(), peft.LoraConfig(task_type=task_type, r=4, lora_alpha=8, bias="all"))
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    ours = peftops.patch(build(), LoraConfig(r=4, alpha=8, bias="all"))
    peftops.load_adapter(ours, str(tmp_path))
    ids = input_ids(vocab=100)
    assert_close(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, what="logits")


@pytest.mark.parametrize("config", [LoraConfig(r=2), peftops.PrefixConfig(num_virtual_tokens=2),
                                    peftops.BitFitConfig()], ids=["lora", "prefix", "bitfit"])
def test_unreadable_files_are_clear_errors_naming_the_file(tmp_path, config):
    model = peftops.patch(BUILDERS["bert"](), config)
    peftops.save_adapter(model, str(tmp_path))
    before = state(model)
    [config_file] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    text = (tmp_path / config_file).read_text()
    for bad, named in [("[1, 2]", "does not hold a JSON object"), ("null", "does not hold a JSON object"),
                       ("{bad", "is not valid JSON")]:
        (tmp_path / config_file).write_text(bad)
        with pytest.raises(ValueError, match=f"{config_file} {named}"):
            peftops.load_adapter(model, str(tmp_path))
    (tmp_path / config_file).write_text(text)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        peftops.load_adapter(model, str(tmp_path))
    os.remove(tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_model.bin").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="adapter_model.bin: it is not plain tensor data"):
        peftops.load_adapter(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", ["BertForSequenceClassification", "LlamaForSequenceClassification"])
def test_peft_classification_file_with_its_head_loads(tmp_path, cls):
    # peft's SEQ_CLS files carry the trained classification head (its modules_to_save) next to the LoRA weights:
    # load_adapter takes it into the model's head, so the logits are peft's.
    import transformers
    config = (transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=48, num_labels=3) if cls.startswith("Bert") else
              transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0))

    def build():
        torch.manual_seed(0)
        return getattr(transformers, cls)(copy.deepcopy(config)).eval()

    targets = ["query", "value"] if cls.startswith("Bert") else ["q_proj", "v_proj"]
    ref = peft.get_peft_model(build(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                       target_modules=targets))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.requires_grad:  # the LoRA weights and the head's trainable copy
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path)
    ours = peftops.patch(build(), LoraConfig(r=4, alpha=8, target_modules=targets))
    peftops.load_adapter(ours, tmp_path)
    ids = input_ids(vocab=100)
    assert_close(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, what="logits")
    head = "classifier" if cls.startswith("Bert") else "score"
    config.num_labels = 2
    narrower = peftops.patch(build(), LoraConfig(r=4, alpha=8, target_modules=targets))
    with pytest.raises(ValueError, match="wrong shapes.*" + head):  # a head of another width is named, not loaded
        peftops.load_adapter(narrower, tmp_path)
    # saved again, the head goes with the adapter (peft's task type and modules_to_save), so both peftops and peft
    # get the same logits back on a model whose head starts elsewhere
    peftops.save_adapter(ours, tmp_path / "again")
    config.num_labels = 3

    def other_head():
        model = build()
        torch.nn.init.normal_(getattr(model, head).weight, 0, 1)
        return model

    fresh = peftops.patch(other_head(), LoraConfig(r=4, alpha=8, target_modules=targets))
    peftops.load_adapter(fresh, tmp_path / "again")
    assert_close(fresh(input_ids=ids).logits, ref(input_ids=ids).logits, what="reloaded by peftops")
    theirs = peft.PeftModel.from_pretrained(other_head(), tmp_path / "again")
    assert_close(theirs.eval()(input_ids=ids).logits, ref(input_ids=ids).logits, what="reloaded by peft")


def test_a_head_saved_by_peft_suffix_rule_travels_both_ways(tmp_path):
    # peft saves every module whose name ends with the head's: DistilBERT's pre_classifier goes with its classifier
    import transformers

    def build():
        torch.manual_seed(0)
        return transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(
            vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=48, num_labels=3)).eval()

    ref = peft.get_peft_model(build(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                       target_modules=["q_lin", "v_lin"]))
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ref.save_pretrained(tmp_path / "peft")
    ids = input_ids(vocab=100)
    ours = peftops.patch(build(), LoraConfig(r=4, alpha=8, target_modules=["q_lin", "v_lin"]))
    peftops.load_adapter(ours, tmp_path / "peft")
    assert_close(ours(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, what="peft's file in peftops")
    peftops.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours")
    assert_close(theirs.eval()(input_ids=ids).logits, ref(input_ids=ids).logits, what="peftops' file in peft")
    # a file that carries the classifier alone (as peftops saved them before) still loads: each head module the
    # file has is loaded whole, the others are left as they are
    from safetensors.torch import load_file, save_file
    weights = tmp_path / "ours" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "pre_classifier" not in k}, weights)
    again = peftops.patch(build(), LoraConfig(r=4, alpha=8, target_modules=["q_lin", "v_lin"]))
    peftops.load_adapter(again, tmp_path / "ours")
    assert torch.equal(again.classifier.weight, ours.classifier.weight)
    save_file({k: v for k, v in load_file(weights).items() if not k.endswith("classifier.bias")}, weights)
    with pytest.raises(ValueError, match="classifier.bias"):  # half a module is not loaded
        peftops.load_adapter(again, tmp_path / "ours")


def _bert_classifier():
    import transformers
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        num_labels=3)).eval()


def test_a_head_that_an_adapter_wraps_is_saved_as_that_adapter(tmp_path):
    # "all-linear" reaches a classification head: it is an adapted layer, so the file is a plain LoRA file (no task
    # head of its own) that peft and peftops load onto the same base with the same logits
    ours = peftops.patch(_bert_classifier(), LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    randomize_lora(ours)
    peftops.save_adapter(ours, tmp_path)
    config = json.load(open(tmp_path / "adapter_config.json"))
    assert config["task_type"] is None and config["modules_to_save"] is None
    ids = input_ids(vocab=100)
    again = peftops.load_adapter(peftops.patch(_bert_classifier(), LoraConfig(r=4, alpha=8,
                                                                             target_modules="all-linear")), tmp_path)
    assert_close(again(input_ids=ids).logits, ours(input_ids=ids).logits, what="peftops")
    theirs = peft.PeftModel.from_pretrained(_bert_classifier(), tmp_path).eval()
    assert_close(theirs(input_ids=ids).logits, ours(input_ids=ids).logits, what="peft")


def test_a_file_with_a_head_loads_into_a_peft_model_without_that_task(tmp_path):
    # a file saved from a classification model carries its head; peftops.load_adapter into a peft model built
    # without the task puts the head into the base model, as it does in adapter mode
    ours = peftops.patch(_bert_classifier(), LoraConfig(r=4, alpha=8, target_modules=["query", "value"]))
    randomize_lora(ours)
    with torch.no_grad():
        ours.classifier.weight.normal_()
    peftops.save_adapter(ours, tmp_path)
    target = peft.get_peft_model(_bert_classifier(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                     target_modules=["query", "value"]))
    peftops.load_adapter(target, tmp_path)
    ids = input_ids(vocab=100)
    assert_close(target.eval()(input_ids=ids).logits, ours(input_ids=ids).logits, what="logits")


@pytest.mark.parametrize("config", [peftops.BitFitConfig(), peftops.AdapterConfig(bottleneck=4)],
                         ids=["bitfit", "bottleneck"])
def test_own_format_reads_a_legacy_bin_as_data_only(tmp_path, monkeypatch, config):
    # as the peft-format files: a plain-tensor adapter_model.bin loads, one that would run code is refused
    monkeypatch.chdir(tmp_path)
    source = peftops.patch(tiny_gpt2(), config)
    with torch.no_grad():
        for p in source.parameters():
            if p.requires_grad:
                p.normal_()
    peftops.save_adapter(source, str(tmp_path / "a"))
    tensors = peftops.io.read_weights(str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    torch.save(tensors, tmp_path / "a" / "adapter_model.bin")
    target = peftops.patch(tiny_gpt2(), config)
    peftops.load_adapter(target, str(tmp_path / "a"))
    ids = input_ids()
    assert torch.equal(output(target, ids), output(source, ids))
    torch.save({"x": _RunsCode()}, tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(ValueError, match="would run code"):
        peftops.load_adapter(target, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "SHOULD_NOT_EXIST")
