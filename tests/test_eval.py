"""Evaluation and prediction on a split model count each sample once, in every route: the Trainer's evaluation
and prediction loops (compute_metrics, preprocess_logits_for_metrics, include_for_metrics,
eval_accumulation_steps, batch_eval_metrics), TRL's evaluation through the mixin, and Accelerate's
`gather_for_metrics` in a custom loop; each compared with the same seeded model unsplit in one process.

The eval set has 10 samples and the eval batch is 3, so neither the batch nor the number of replicas divides it:
the end-of-loader remainder (Accelerate's padding of the last batch, dropped again by `gather_for_metrics`) is
exercised at TP=2 (one replica) and at TP2 x DP2 (two replicas).

Tolerances: the split forward differs from the unsplit one only in the order of fp32 sums (row-parallel partial
sums, the vocab-parallel softmax), ~1e-6 on losses and logits of order 5; we allow 1e-5. Rows, labels and inputs
are integers and must be equal. A sample counted twice moves the mean loss by ~3e-3 and changes the row count.
"""

from __future__ import annotations

import torch

import tp_plugin
from tests.dist import run_ranks
from tests.models import build

N, SEQ, EVAL_BATCH = 10, 12, 3
ATOL = 1e-5


class _Samples(torch.utils.data.Dataset):
    def __init__(self, n: int = N, seed: int = 2):
        self.data = torch.randint(3, 101, (n, SEQ), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"input_ids": self.data[i], "labels": self.data[i]}


def _argmax(logits, labels):
    return logits.argmax(-1)


def _metrics(pred):
    """Everything the metric function saw, so that the test compares it row by row."""
    preds, labels = pred.predictions, pred.label_ids
    return {"rows": int(len(preds)), "accuracy": float((preds[:, :-1] == labels[:, 1:]).mean()),
            "label_sum": int(labels.sum()), "input_rows": int(len(pred.inputs))}


class _BatchMetrics:
    """`batch_eval_metrics=True`: called per step with that step's gathered rows, then once with the result."""

    def __init__(self):
        self.rows = self.correct = 0

    def __call__(self, pred, compute_result: bool):
        preds, labels = pred.predictions, pred.label_ids
        self.rows += int(preds.shape[0])
        self.correct += int((preds[:, :-1] == labels[:, 1:]).sum())
        if not compute_result:
            return {}
        rows, correct = self.rows, self.correct
        self.rows = self.correct = 0
        return {"rows": rows, "correct": correct}


def _trainer(model, out, **overrides):
    from transformers import TrainingArguments

    from tp_plugin.integrations.trainer import TPTrainer

    settings = dict(output_dir=str(out), per_device_eval_batch_size=EVAL_BATCH, report_to="none", use_cpu=True,
                    ddp_backend="gloo", disable_tqdm=True, include_for_metrics=["inputs"])
    args = TrainingArguments(**{**settings, **overrides})
    metrics = _BatchMetrics() if overrides.get("batch_eval_metrics") else _metrics
    return TPTrainer(model=model, args=args, eval_dataset=_Samples(), compute_metrics=metrics,
                     preprocess_logits_for_metrics=_argmax)


def _evaluations(model, out) -> dict:
    """The same model through every evaluation route of the Trainer."""
    from transformers import TrainingArguments

    from tp_plugin.integrations.trainer import TPTrainer

    runs = {"evaluate": _trainer(model, out).evaluate(),
            "accumulated": _trainer(model, out, eval_accumulation_steps=2).evaluate(),
            "per_batch": _trainer(model, out, batch_eval_metrics=True).evaluate()}
    args = TrainingArguments(output_dir=str(out), per_device_eval_batch_size=EVAL_BATCH, report_to="none",
                             use_cpu=True, ddp_backend="gloo", disable_tqdm=True)
    predicted = TPTrainer(model=model, args=args).predict(_Samples())
    runs["predict"] = {"shape": list(predicted.predictions.shape), "test_loss": predicted.metrics["test_loss"],
                       "logits": predicted.predictions.tolist(), "labels": predicted.label_ids.tolist()}
    for run in runs.values():
        for key in [k for k in run if k.endswith(("runtime", "per_second", "preparation_time"))]:
            del run[key]
    return runs


def _split_trainer_eval(rank, world, tp, out):
    return _evaluations(tp_plugin.parallelize(build("llama", 2), tp_size=tp), out)


def _unsplit_trainer_eval(rank, world, out):
    return _evaluations(build("llama", 2), out)


def _assert_same_evaluations(got: dict, ref: dict) -> None:
    for route, expected in ref.items():
        for key, value in expected.items():
            if key == "logits":
                err = (torch.tensor(got[route][key]) - torch.tensor(value)).abs().max().item()
                assert err <= ATOL, (route, err)
            elif isinstance(value, float):
                assert abs(got[route][key] - value) <= ATOL, (route, key, got[route][key], value)
            else:
                assert got[route][key] == value, (route, key, got[route][key], value)


def test_trainer_evaluate_and_predict_count_each_sample_once(tmp_path):
    """TP=2 against one process; TP2 x DP2 against the unsplit model under DDP on 2 ranks (its last batch is
    padded with samples 0 and 1, so its per-batch eval loss weights them as a DDP run does)."""
    single = run_ranks(1, _unsplit_trainer_eval, tmp_path / "ref")[0]
    ddp = run_ranks(2, _unsplit_trainer_eval, tmp_path / "ddp")[0]
    assert single["evaluate"]["eval_rows"] == N and single["predict"]["shape"] == [N, SEQ, 101], single
    assert single["per_batch"]["eval_rows"] == N and ddp["evaluate"]["eval_rows"] == N
    assert ddp["predict"]["labels"] == single["predict"]["labels"]
    for world, ref in ((2, single), (4, ddp)):
        for got in run_ranks(world, _split_trainer_eval, 2, tmp_path / f"split{world}"):
            _assert_same_evaluations(got, ref)


# ---- TRL's evaluation through the mixin -------------------------------------------------------------------------

def _trl_eval(rank, world, out, kind, split):
    """RewardTrainer or SFTTrainer: 2 training steps, then `evaluate` on a set the eval batch does not divide.
    lr 1e-3: AdamW moves every weight by ~lr whatever its gradient's size, so at 1e-2 the last-ulp differences of
    near-zero reward-head gradients grow to ~3e-5 in the rewards after 2 steps; at 1e-3 they stay below 1e-6."""
    import transformers
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

    from tests.test_trl import _tokenizer, _texts
    from tp_plugin import TPTrainerMixin

    common = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=2, per_device_eval_batch_size=2,
                  learning_rate=1e-3, report_to="none", seed=0, use_cpu=True, bf16=False, disable_tqdm=True,
                  train_sampling_strategy="sequential", save_strategy="no", ddp_backend="gloo",
                  gradient_checkpointing=False)
    if kind == "reward":
        config = build("llama", 2).config
        config.num_labels = 1
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        base, args = RewardTrainer, RewardConfig(**common, max_length=24)
        pairs = lambda n, seed: Dataset.from_dict({"chosen": _texts(n, seed), "rejected": _texts(n, seed + 1)})
        train, evaluation = pairs(8, 1), pairs(5, 3)
    else:
        model = build("llama", 2)
        base, args = SFTTrainer, SFTConfig(**common, max_length=24, dataset_text_field="text")
        train, evaluation = (Dataset.from_dict({"text": _texts(n, seed)}) for n, seed in ((8, 1), (5, 3)))
    if split:
        model = tp_plugin.parallelize(model, tp_size=2)
        base = type("TPTrainer", (TPTrainerMixin, base), {})
    trainer = base(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                   processing_class=_tokenizer())
    trainer.train()
    return {k: v for k, v in trainer.evaluate().items() if not k.endswith(("runtime", "per_second", "time"))}


def test_trl_evaluation_counts_each_sample_once(tmp_path):
    for kind in ("reward", "sft"):
        single = run_ranks(1, _trl_eval, tmp_path / f"{kind}-ref", kind, False)[0]
        ddp = run_ranks(2, _trl_eval, tmp_path / f"{kind}-ddp", kind, False)[0]
        for world, ref in ((2, single), (4, ddp)):
            for got in run_ranks(world, _trl_eval, tmp_path / f"{kind}-{world}", kind, True):
                assert set(got) == set(ref), (got, ref)
                for key, value in ref.items():
                    assert abs(got[key] - value) <= ATOL * max(1.0, abs(value)), (kind, world, key, got, ref)


# ---- a custom Accelerate evaluation loop ------------------------------------------------------------------------

def _accelerate_eval(rank, world, split):
    """Accelerate's documented evaluation loop: per-sample losses and predictions through gather_for_metrics."""
    from accelerate import Accelerator

    model = build("llama", 2).eval()
    if split:
        tp_plugin.parallelize(model, tp_size=2)
    accelerator = Accelerator(cpu=True)
    loader = torch.utils.data.DataLoader(_Samples().data, batch_size=EVAL_BATCH)
    model, loader = accelerator.prepare(model, loader)
    losses, preds, rows = [], [], []
    for ids in loader:
        with torch.no_grad():
            logits = model(ids).logits
        per_sample = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:],
                                                       reduction="none").mean(-1)
        loss, pred = accelerator.gather_for_metrics((per_sample, logits.argmax(-1)))
        losses.append(loss)
        preds.append(pred)
        rows += accelerator.gather_for_metrics(ids.tolist(), use_gather_object=True)  # objects: another route
    return {"losses": torch.cat(losses).tolist(), "preds": torch.cat(preds).tolist(), "rows": rows}


def test_accelerate_gather_for_metrics_counts_each_sample_once():
    ref = run_ranks(1, _accelerate_eval, False)[0]
    assert len(ref["losses"]) == N
    for world in (2, 4):
        for got in run_ranks(world, _accelerate_eval, True):
            assert len(got["losses"]) == N and got["preds"] == ref["preds"], (world, got)
            assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= ATOL
            assert got["rows"] == _Samples().data.tolist()  # every sample once, in order, the padding dropped


def _loss_parallel_eval(rank, world, out):
    model = tp_plugin.parallelize(build("llama", 2), tp_size=2, loss_parallel=True)
    runs = _evaluations(model, out)
    with torch.no_grad():  # generate reads the full logits of an eval-mode forward
        runs["generate"] = {"tokens": model.generate(_Samples().data[:2, :5], max_new_tokens=4,
                                                     do_sample=False).tolist()}
    model.train()
    ids = _Samples().data[:2]
    runs["training"] = {"logits_width": model(ids, labels=ids).logits.shape[-1]}  # training: the shard
    return runs


def _unsplit_loss_parallel_reference(rank, world, out):
    model = build("llama", 2)
    runs = _evaluations(model, out)
    with torch.no_grad():
        runs["generate"] = {"tokens": model.generate(_Samples().data[:2, :5], max_new_tokens=4,
                                                     do_sample=False).tolist()}
    return runs


def test_loss_parallel_evaluates_and_generates_with_the_full_vocabulary(tmp_path):
    """With loss_parallel=True the training forward returns vocabulary shards; evaluation, prediction and generate
    (eval mode) see the full logits, so metrics, predictions and tokens are the unsplit model's."""
    ref = run_ranks(1, _unsplit_loss_parallel_reference, tmp_path / "ref")[0]
    for got in run_ranks(2, _loss_parallel_eval, tmp_path / "split"):
        assert got.pop("training") == {"logits_width": 51}  # 101 padded to 102, half of it
        _assert_same_evaluations(got, ref)
