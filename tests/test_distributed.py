"""DDP and FSDP2 (gloo, 2 spawned CPU processes) over a patched tiny Llama, a few AdamW steps, for LoRA with
dropout 0 and 0.1 and each other technique (DoRA, IA3, prefix tuning, bottleneck adapters; dropout 0): the
parameters equal, to float32 rounding, those of one process trained on the full batch with the same seeds
(lora_training.py explains how the reference replays each rank's dropout masks), and only trainable parameters are
communicated or get gradients. Each kind spawns once (module-scoped) and runs every case in the same ranks."""
import pytest
import torch

import dist_utils
import dist_workers
from lora_training import SEED, TECHNIQUES, full_state, patched_llama, reference
from tiny_models import assert_close

WORLD = 2
# (technique, dropout): LoRA with and without dropout, every other technique without.
CASES = [("lora", 0.0), ("lora", 0.1)] + [(t, 0.0) for t in TECHNIQUES if t != "lora"]
CASE_IDS = [f"{t}-{d}" for t, d in CASES]


def _spawn(kind, tmp_path_factory):
    out = tmp_path_factory.mktemp(kind)
    dist_utils.run(getattr(dist_workers, kind), str(out), CASES, world=WORLD)
    return [torch.load(out / f"{kind}-rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    return _spawn("ddp", tmp_path_factory)


@pytest.fixture(scope="module")
def fsdp2_ranks(tmp_path_factory):
    if not hasattr(torch.cpu.current_stream(), "record_event"):  # torch 2.6's FSDP2 cannot run on the CPU
        pytest.skip("this torch's FSDP2 needs a CPU stream with record_event (torch 2.6 has none)")
    return _spawn("fsdp2", tmp_path_factory)


@pytest.fixture(scope="module")
def references():
    return {(t, d): full_state(reference(d, technique=t)) for t, d in CASES}


@pytest.fixture(scope="module")
def initial():
    """technique -> (initial parameters, sorted trainable names)."""
    result = {}
    for technique in TECHNIQUES:
        model = patched_llama(0.0, technique)
        result[technique] = full_state(model), sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return result


def _check_matches_reference(ranks, references, initial, case):
    start, trainable = initial[case[0]]
    ref = references[case]
    for r, result in enumerate(ranks):
        state = result[case]["state"]
        assert state.keys() == ref.keys()
        for name in ref:
            assert_close(state[name], ref[name], 1e-5, f"rank {r} {case} {name}")
    for name in trainable:  # the comparison means something only if training moved every trainable parameter
        assert (ref[name] - start[name]).abs().max() > 1e-3, f"{case} {name} did not move"
    for name in set(ref) - set(trainable):
        assert torch.equal(ref[name], start[name]), f"{case} frozen {name} changed"
    # Ranks stay in lockstep: bit-identical parameters (same all-reduced gradients, same optimizer steps).
    for name in ref:
        assert torch.equal(ranks[0][case]["state"][name], ranks[1][case]["state"][name]), (case, name)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ddp_matches_one_process(ddp_ranks, references, initial, case):
    _check_matches_reference(ddp_ranks, references, initial, case)


def test_reference_sees_the_dropout_masks(ddp_ranks, references):
    """The dropout-on comparison is not vacuous: replaying the ranks' seeds in the other order (other masks for
    each half) gives parameters far outside the tolerance."""
    swapped = full_state(reference(0.1, seeds=[SEED + 1, SEED]))
    state = ddp_ranks[0]["lora", 0.1]["state"]
    worst = max((swapped[n] - state[n]).abs().max().item() / state[n].abs().max().item()
                for n in state if "lora_" in n)
    assert worst > 1e-3, worst


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_ddp_reduces_only_trainable_parameters(ddp_ranks, initial, case):
    start, trainable = initial[case[0]]
    numel = {n: p.numel() for n, p in start.items()}
    trainable_numel = sum(numel[n] for n in trainable)
    assert 0 < trainable_numel < sum(numel.values()) / 2  # a real split: frozen weights are most of the model
    for r, result in enumerate(ddp_ranks):
        res = result[case]
        assert sorted(res["trainable"]) == trainable
        # The reducer's parameters and bucket bytes are exactly the trainable ones: no bucket for frozen weights.
        assert res["reducer_count"] == len(trainable), (r, case)
        assert res["reducer_numel"] == trainable_numel, (r, case)
        assert res["bucket_bytes"] == 4 * trainable_numel, (r, case)
        # After backward, frozen parameters have no .grad on any rank.
        assert res["with_grad"] == trainable, (r, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fsdp2_matches_one_process(fsdp2_ranks, references, initial, case):
    _check_matches_reference(fsdp2_ranks, references, initial, case)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_fsdp2_shards_and_gives_gradients_only_to_trainable(fsdp2_ranks, initial, case):
    _, trainable = initial[case[0]]
    results = [ranks[case] for ranks in fsdp2_ranks]
    for res in results:
        assert res["is_dtensor"]  # fully_shard turned every parameter, frozen or not, into a sharded DTensor
        assert res["with_grad"] == trainable  # frozen weights: no gradient, so no gradient memory
    for name in trainable:  # each rank holds only its shard (dim 0 split) of a trainable parameter's gradient
        full = results[0]["full_numel"][name]
        local = [res["local_numel"][name] for res in results]
        # A parameter whose dim 0 is 1 (IA3's (1, in) vector on down_proj) lands whole on rank 0.
        assert sum(local) == full and (max(local) < full or local[1] == 0), (name, local, full)


def test_fsdp2_bf16_mixed_precision_trains(fsdp2_ranks, references, initial):
    """With MixedPrecisionPolicy(param_dtype=bf16) the ops get bf16 weights and activations: training runs,
    ranks agree, and the update points where the float32 run's does (elementwise closeness would be fragile:
    AdamW moves every element by ~lr whatever its gradient's size, so bf16 rounding can flip tiny ones)."""
    start, trainable = initial["lora"]
    ref = references["lora", 0.1]
    states = [ranks["bf16"]["state"] for ranks in fsdp2_ranks]
    for name in trainable:
        assert torch.isfinite(states[0][name]).all(), name
        assert torch.equal(states[0][name], states[1][name]), name
        assert (states[0][name] - start[name]).abs().max() > 1e-3, f"{name} did not move"
    update = torch.cat([(states[0][n] - start[n]).flatten() for n in trainable])
    update_fp32 = torch.cat([(ref[n] - start[n]).flatten() for n in trainable])
    cosine = torch.nn.functional.cosine_similarity(update, update_fp32, dim=0).item()
    assert cosine > 0.9, cosine  # 0.966 here; an unrelated update would be near 0
