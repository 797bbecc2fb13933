"""`tp-plugin verify`: split a (tiny or given) model on N local CPU ranks and compare it with the unsplit one.

    verify_model("llama", tp=2)              # tiny random model of that architecture
    verify_model("/path/to/model_dir", tp=2) # a local checkpoint
    sweep(tp=2)                              # every causal-LM architecture of the installed transformers

Each architecture runs in freshly forked gloo ranks (the parent has imported torch and transformers, so a
fork costs milliseconds), so one architecture that hangs or crashes cannot poison the next. On every rank:
build the same seeded model, run the unsplit copy forward and backward (if that fails the architecture
"cannot be built from a tiny config" and is left out of the rate), split with `tp_plugin.parallelize` (the
policy chain: registered policy, translated base_model_tp_plan, structural fallback), run the split model on
the same batch, and compare logits, loss and every parameter's gradient (gathered from the shards).

Tolerance: fp32 throughout; the split only reorders floating-point sums (row-parallel partial sums, the
vocab-parallel embedding), which moves results by a few ulps. We accept max|split - unsplit| <= 1e-4 x
max(1, max|unsplit|) per tensor (logits, loss, each gradient): about 1000 ulps of headroom for deep-ish
reductions and eager-softmax paths, still orders of magnitude below the O(0.1) errors a mis-sliced head,
bias or missing all-reduce gives.
"""

from __future__ import annotations

import copy
import math
import multiprocessing as mp
import os
import shutil
import time
import traceback

import torch
import torch.distributed as dist

from ..runtime.comm import gather_whole
from ..testing import init_rank, reap, spawn
from ..testing.count import count_collectives
from ..state import tp_state
from .tiny_models import BATCH, SEQ, VOCAB, build_tiny, load_local  # noqa: F401  (re-exported)
from .tiny_vlms import VLM_TYPES, build_tiny_vlm, vlm_inputs
from .verify_report import (VLM_SECTION, Result, _read, _write, _write_vlm_section, above_minimum, collectives_cell,
                            summary_line, table)

TOL = 1e-4


# ---------------------------------------------------------------- one architecture on one rank

def _how(policy_name: str) -> str:
    if "translated" in policy_name:
        return "translated plan"
    if "fallback" in policy_name:
        return "fallback"
    return "policy"


def _gather_full(param, group):
    """A parameter's whole gradient (None where the batch does not reach it, e.g. an expert no token chose)."""
    spec = getattr(param, "tp_shard", None)
    if spec is None:
        return param.grad
    present = [None] * dist.get_world_size(group)
    dist.all_gather_object(present, param.grad is not None, group=group)
    if not any(present):
        return None
    if not all(present):
        raise RuntimeError(f"a sharded parameter got a gradient on some ranks only ({present})")
    return gather_whole(param.grad, spec, group)


def _rel(a, b) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    return (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())


def _peer_split(engine: str, model, name: str, tp: int):
    """Split `model` with a peer's own tensor parallelism; returns the module to run (forward only)."""
    if engine == "deepspeed":  # DeepSpeed AutoTP (module-name heuristics)
        import deepspeed

        # the training path (the inference path's CPU shm all-reduce hangs under forked gloo ranks)
        engine, *_ = deepspeed.initialize(model=model, config={
            "train_micro_batch_size_per_gpu": 1, "tensor_parallel": {"autotp_size": tp},
            "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0})
        return engine.module
    if engine == "transformers":  # transformers' own tp_plan (DTensor), loaded from a saved copy
        import tempfile

        from transformers import AutoModelForCausalLM

        path = os.path.join(tempfile.gettempdir(), f"tp_plugin_verify_{os.environ['MASTER_PORT']}_{name}")
        if dist.get_rank() == 0:
            model.save_pretrained(path)
        dist.barrier()
        try:
            return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", torch_dtype=torch.float32).eval()
        finally:
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(path, ignore_errors=True)
    raise ValueError(f"unknown engine {engine!r} (tp_plugin, deepspeed, transformers)")


def check_one(name: str, tp: int, load=None, engine: str = "tp_plugin", sequence_parallel: bool = False,
              vlm: bool = False) -> Result:
    """On every rank of an initialised gloo world: build, split, compare. Same result on every rank. `vlm`: `name`
    is a vision-language model type, run on a prompt with a random image (`tiny_vlms`)."""
    import tp_plugin
    from ..sharding import TPSplitError

    torch.manual_seed(0)
    try:
        model = load(name) if load else build_tiny_vlm(name, tp=tp) if vlm else build_tiny(name, tp=tp)
        if sequence_parallel:  # a training-time layout (tiny configs have no dropout, so train() is safe)
            model.train()
        ref = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(1)
        vocab = model.get_input_embeddings().weight.shape[0]
        ids = torch.randint(3, min(vocab, VOCAB), (BATCH, SEQ), generator=gen)
        inputs = vlm_inputs(model) if vlm else {"input_ids": ids, "labels": ids}
        ref_out = ref(**inputs)
        ref_out.loss.backward()
    except Exception as exc:  # noqa: BLE001  (the unsplit model itself does not run: not ours to judge)
        return Result(name, "unbuildable", detail=f"{type(exc).__name__}: {str(exc)[:200]}")
    if engine != "tp_plugin":  # a peer: logits only (its shards' layouts are its own)
        try:
            split = _peer_split(engine, model, name, tp)
            with torch.no_grad():
                logits = split(input_ids=ids).logits
            logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
            err = _rel(logits, ref_out.logits.detach())
        except Exception as exc:  # noqa: BLE001
            return Result(name, "error", how=engine, detail=f"{type(exc).__name__}: {str(exc)[:200]}")
        return Result(name, "match" if err <= TOL else "mismatch", how=engine, errors={"logits": err},
                      detail="" if err <= TOL else f"logits {err:.2e}")
    try:
        tp_plugin.parallelize(model, tp_size=tp, sequence_parallel=sequence_parallel)
    except TPSplitError as exc:
        return Result(name, "refused", detail=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001
        return Result(name, "error", detail=f"parallelize: {type(exc).__name__}: {str(exc)[:300]}")
    plan = tp_state(model).plan
    numel = sum(p.numel() for p in ref.parameters())
    split = sum(p.numel() for n, p in ref.named_parameters() if n not in set(plan.replicated))
    result = Result(name, "match", how=_how(plan.policy_name), policy=plan.policy_name, sharded=split / numel,
                    plan=str(plan))
    try:
        with count_collectives(model) as counts:
            out = model(**inputs)
            counts.forward_done()
            out.loss.backward()
        result.collectives = counts.summary()
        group = tp_state(model).mesh.tp_group
        result.errors["logits"] = _rel(out.logits, ref_out.logits)
        result.errors["loss"] = _rel(out.loss, ref_out.loss)
        ref_params = dict(ref.named_parameters())
        worst, worst_name = 0.0, ""
        for pname, param in model.named_parameters():
            err = _rel(_gather_full(param, group), ref_params[pname].grad)
            if err > worst:
                worst, worst_name = err, pname
        result.errors["grads"] = worst
        result.errors["worst_grad"] = worst_name
    except Exception as exc:  # noqa: BLE001
        result.status, result.detail = "error", f"split forward/backward: {type(exc).__name__}: {str(exc)[:300]}"
        return result
    bad = [k for k in ("logits", "loss", "grads") if not result.errors[k] <= TOL]
    if bad:
        result.status = "mismatch"
        result.detail = ", ".join(f"{k} {result.errors[k]:.2e}" for k in bad) + \
            (f" ({result.errors['worst_grad']})" if "grads" in bad else "")
    elif above_minimum(result.collectives) and not result.collectives["reasons"]:
        result.status = "excess"  # right numbers, more collectives than Megatron's minimum and no reason why
        result.detail = f"collectives {collectives_cell(result.collectives)}"
    return result


# ---------------------------------------------------------------- ranks

def _rank_main(rank, world, port, queue, timeout_s, names, tp, load, engine="tp_plugin", sequence_parallel=False,
               vlm=False):
    current = names[0] if names else "?"
    try:
        init_rank(rank, world, port, timeout_s)
        for name in names:
            current = name
            result = check_one(name, tp, load, engine, sequence_parallel, vlm)
            if rank == 0:
                queue.put(result)
    except BaseException:  # noqa: BLE001
        queue.put(Result(current, "error", detail=traceback.format_exc()[-600:]))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(names: list[str], tp: int, *, load=None, timeout_s: float = 60.0,
                 engine: str = "tp_plugin", sequence_parallel: bool = False, vlm: bool = False) -> list[Result]:
    """Check `names` one after another in one set of `tp` forked ranks; a timeout marks the rest as errors."""
    store, queue, procs = spawn(mp.get_context("fork"), tp, _rank_main,
                                (names, tp, load, engine, sequence_parallel, vlm), timeout_s)
    results = []
    try:
        while len(results) < len(names):
            result = queue.get(timeout=timeout_s + 15)
            if any(r.name == result.name for r in results):
                continue  # several ranks reported the same failure
            results.append(result)
            if result.status == "error" and result.detail.startswith("Traceback"):
                break
    except Exception:  # noqa: BLE001  (a rank hung or died)
        pass
    finally:
        reap(procs, timeout_s=2)
        del store
    done = {r.name for r in results}
    results += [Result(n, "error", detail="timed out or crashed (a rank hung past the timeout)")
                for n in names if n not in done]
    return results


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _preimport(names: list[str], vlm: bool = False) -> None:
    """Import every architecture's modeling module once in the parent, so forked ranks share it."""
    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    import tp_plugin  # noqa: F401
    from .. import auto  # noqa: F401

    mapping = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES if vlm else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    for name in names:
        try:
            getattr(transformers, mapping[name])
        except Exception:  # noqa: BLE001  (an architecture whose import fails is reported by its run)
            pass


def sweep(tp: int, names: list[str] | None = None, *, chunk: int = 12, progress=None,
          engine: str = "tp_plugin", sequence_parallel: bool = False, vlm: bool = False) -> list[Result]:
    """Verify many architectures at `tp`, `chunk` per set of ranks (a crash costs at most one chunk)."""
    names = names or (list(VLM_TYPES) if vlm else causal_lm_types())
    _preimport(names, vlm)
    results: list[Result] = []
    pending = list(names)
    while pending:
        batch, pending = pending[:chunk], pending[chunk:]
        # hybrid SSMs run reference kernels, slow on CPU; more ranks than cores share them (tp=8 on 2 cores)
        run = lambda names: run_on_ranks(names, tp, timeout_s=150.0 * max(1.0, tp / 4), engine=engine,  # noqa: E731
                                         sequence_parallel=sequence_parallel, vlm=vlm)
        got = run(batch)
        # after a crash, the architectures after the culprit in its chunk are re-run on fresh ranks
        ok = [r for r in got if not r.detail.startswith("timed out or crashed")]
        retry = [r.name for r in got if r.detail.startswith("timed out or crashed")]
        if retry and len(retry) < len(batch):
            culprit, rest = retry[0], retry[1:]
            ok.append(Result(culprit, "error", detail="a rank hung or crashed"))
            pending = rest + pending
        else:
            ok += [r for r in got if r.name in retry]
        # a rank that died or a rendezvous that timed out may be the machine's (memory, load): once more, alone
        ok = [run([r.name])[0] if _harness_failure(r) else r for r in ok]
        for r in ok:
            results.append(r)
            if progress:
                progress(r)
    return results


def _harness_failure(r: Result) -> bool:
    return r.status == "error" and (r.detail.startswith(("Traceback", "timed out or crashed"))
                                    or r.detail == "a rank hung or crashed")


def verify_model(name: str, tp: int, *, sequence_parallel: bool = False, vlm: bool = False) -> Result:
    """One architecture (model_type) or a local model directory."""
    load = load_local if os.path.isdir(name) else None
    _preimport([] if load else [name], vlm)
    return run_on_ranks([name], tp, load=load, timeout_s=120.0, sequence_parallel=sequence_parallel, vlm=vlm)[0]


def main_verify(args) -> int:
    """The `tp-plugin verify` subcommand (argparse namespace: target, tp, all_architectures, markdown, only)."""
    tps = args.tp or [2]
    sp = bool(getattr(args, "sequence_parallel", False))
    vlm = bool(getattr(args, "vlm", False))
    if not args.all_architectures:
        if not args.target:
            raise SystemExit("tp-plugin verify: give MODEL_OR_CONFIG (a model_type or a local model dir) "
                             "or --all-architectures")
        code = 0
        for tp in tps:
            r = verify_model(args.target, tp, sequence_parallel=sp, vlm=vlm)
            if r.plan:
                print(r.plan)
            errs = ", ".join(f"{k} {v:.1e}" for k, v in r.errors.items() if isinstance(v, float))
            print(f"{args.target} tp={tp}: {r.status.upper()} ({r.how or 'no split'}) {errs} {r.detail}".rstrip())
            code |= r.status != "match"
        return code
    names = args.only.split(",") if args.only else None
    engine = getattr(args, "engine", None) or "tp_plugin"
    results_by_tp = {}
    for tp in tps:
        start = time.time()
        results_by_tp[tp] = sweep(tp, names, engine=engine, sequence_parallel=sp, vlm=vlm, progress=lambda r, tp=tp: print(
            f"  tp={tp} {r.name:28s} {r.status:11s} {r.how:16s} {r.detail.splitlines()[-1][:100] if r.detail else ''}",
            flush=True))
        print(f"{summary_line(results_by_tp[tp], tp, engine, sp)} in {time.time() - start:.0f} s", flush=True)
    print(table(results_by_tp))
    for tp in tps:
        print(summary_line(results_by_tp[tp], tp, engine, sp))
    if args.markdown and vlm:
        _write_vlm_section(args.markdown, tps, results_by_tp)
    elif args.markdown:
        title = "# Architectures with sequence parallelism" if sp else "# Architectures"
        lines = [title, "",
                 "Generated by `tp-plugin verify --all-architectures " + " ".join(f"--tp {t}" for t in tps) +
                 (" --sequence-parallel" if sp else "") +
                 f" --markdown {args.markdown}`: every causal-LM architecture of the installed transformers, "
                 "built from a tiny random config, split and compared with the unsplit model (logits, loss, every "
                 "gradient; tolerance 1e-4 relative). `how`: a hand-written policy, the model's own "
                 "`base_model_tp_plan` translated, or the structural fallback; `split params`: the share of "
                 "parameters that are sharded (the rest is replicated); `collectives`: how many one forward / one "
                 "backward issues, against Megatron's minimum (one reduction out of and one into every split "
                 "sub-block, plus the vocabulary's), with the layout that needs more where it is above it (an "
                 "architecture above it without such a reason is reported `excess`)." +
                 (" With sequence parallelism, a model is refused when a module that mixes tokens (an attention "
                  "the policy keeps whole, a state-space or convolution mixer, cross-attention) would run on one "
                  "rank's tokens only, or when its layers are not one list of decoder layers." if sp else ""), ""]
        lines += [summary_line(results_by_tp[tp], tp, engine, sp) + "  " for tp in tps]
        lines += ["", table(results_by_tp, markdown=True)]
        _, vlm_heading, vlm_rest = _read(args.markdown).partition(VLM_SECTION)  # the VLM sweep's section stays
        _write(args.markdown, "\n".join(lines) + "\n" + vlm_heading + vlm_rest)
    return 0
